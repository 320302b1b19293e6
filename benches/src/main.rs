//! phi-bench: times full training steps (forward, loss, backward, clipping, AdamW update, as
//! phi-train does them) or the forward of a randomly initialised model of a named shape, and
//! prints one JSON line per run. `--gemm` measures the machine's f32 GEMM rate instead, and
//! `--save-random` writes the shape's random model as a checkpoint folder (f32 or bf16 shards).

mod gemm;
mod profile;
mod shapes;
mod step;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(about = "phi-tune benchmark: one JSON line per run (docs/benchmarks.md)")]
pub struct Args {
    /// smollm2-135m (Llama), phi3-small or phi3-mini (Phi-3; phi3-mini is the 3.8 B seed model).
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    /// lora (all-linear, --rank, α = 2·rank, base frozen), full, norm-only (a frozen base
    /// with its norm weights training), or forward (no graph).
    #[arg(long, default_value = "lora")]
    mode: String,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps before them.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// LoRA rank.
    #[arg(long, alias = "lora-r", default_value_t = 16)]
    rank: usize,
    /// cpu (Burn's flex), vulkan[:cpu|:N] (with --features vulkan), cuda[:N] (with --features
    /// cuda), ndarray (with --features ndarray).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Burn's gradient checkpointing (`Device::gradient_checkpointing`, balanced strategy).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// transformers' per-layer gradient checkpointing instead (phi-train's
    /// checkpoint_layers): only each layer's input kept, layers recomputed in the backward.
    #[arg(long)]
    checkpoint_layers: bool,
    /// Matmul dtype: f32, or bf16 / f16 autocast with f32 master weights (phi-train's
    /// --bf16 / --fp16; no loss scaling here). bf16 on a CPU with AMX is phi-train's --bf16
    /// there: the frozen weights on our bf16 kernels, the rest f32.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// How the frozen base is held: f32, bf16 (needs --dtype bf16 on a CPU with bf16 matrix
    /// units), nf4 (= q4: bitsandbytes' NF4 with double-quantized scales, QLoRA), fp4, or
    /// int8 (= q8: LLM.int8's rows). With --save-random: the checkpoint's dtype (f32, bf16).
    #[arg(long, default_value = "f32")]
    base: String,
    /// The optimizer: adamw_torch, or adamw_8bit (bitsandbytes' 8-bit moments).
    #[arg(long, default_value = "adamw_torch")]
    optim: String,
    /// In forward mode, attach the LoRA adapter too (to time its forward overhead).
    #[arg(long)]
    lora: bool,
    /// Print each step's time and loss on stderr.
    #[arg(long, short)]
    verbose: bool,
    /// Measure Burn's f32 GEMM rate (1024³, 2048³ and the shape's GEMMs at batch × seq tokens)
    /// instead of running the model.
    #[arg(long)]
    gemm: bool,
    /// With --gemm: seconds to spend on each product.
    #[arg(long, default_value_t = 2.0)]
    gemm_seconds: f64,
    /// Time the model's ops in isolation at the shape's sizes (matmul, attention, softmax,
    /// norm, rope, cross-entropy, optimizer), forward and forward + backward.
    #[arg(long)]
    profile: bool,
    /// Write the shape's random model (config.json + model.safetensors) to this folder and
    /// exit: a stand-in checkpoint for timing whole phi-train recipes.
    #[arg(long)]
    save_random: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    phi_model::alloc::tune();
    let a: Args = phi_cli::parse();
    if let Some(dir) = &a.save_random {
        let json = shapes::shape_json(&a.shape)?;
        let files = phi_model::export::write_random_model(dir, json, 0, step::save_dtype(&a)?)?;
        println!("{}: {}", dir.display(), files.join(", "));
        return Ok(());
    }
    // On a pool thread, as the binaries run (phi_kernels::pool).
    phi_model::on_pool(|| {
        if a.gemm {
            gemm::run(&a)
        } else if a.profile {
            profile::run(&a)
        } else {
            step::run(&a)
        }
    })
}
