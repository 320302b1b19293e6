//! phi-merge: fold a PEFT LoRA adapter into its base model and write a folder transformers
//! loads as is (or, with --adapter-only, re-write the adapter itself).

use anyhow::{bail, Result};
use clap::Parser;
use phi_adapters::merge::{merge, split_fused, split_target_names};
use phi_adapters::peft::{self, PREFIX};
use phi_adapters::targets::leaf_names;
use phi_model::export::{config_dtype, parse_size, source_config, write_model_folder, OutDtype};
use phi_model::io::prepare_out_dir;
use phi_model::Loaded;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(about = "Merge a LoRA adapter into its base model and export safetensors")]
struct Args {
    /// Base model: folder, hub id, or .gguf file.
    #[arg(long)]
    model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// f32, f16 or bf16 (LLaMA-Factory's export_dtype); default: the base config's dtype.
    #[arg(long)]
    dtype: Option<String>,
    /// Largest shard, e.g. 2GB or 500MB (LLaMA-Factory's export_size, in GB when bare).
    #[arg(long, default_value = "5GB")]
    shard_size: String,
    /// Write fused projections (Phi-3's qkv_proj / gate_up_proj) as q/k/v and gate/up.
    #[arg(long)]
    split_fused: bool,
    /// Write the (possibly split) adapter instead of a merged model.
    #[arg(long)]
    adapter_only: bool,
    /// Replace files in a non-empty output folder.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() {
    phi_model::alloc::tune();
    phi_cli::exit_on_error(run(phi_cli::parse()));
}

fn run(a: Args) -> Result<()> {
    let device = phi_model::device_from_name(&a.device)?;
    // Everything a user can get wrong is checked before the (slow) load and before any write.
    let want_dtype = a.dtype.as_deref().map(OutDtype::parse).transpose()?;
    let shard = parse_size(&a.shard_size)?;
    if !a.adapter.join("adapter_config.json").exists() {
        bail!(
            "{}: no adapter_config.json (expected a PEFT adapter folder)",
            a.adapter.display()
        );
    }
    prepare_out_dir(&a.out, a.overwrite)?;
    let Loaded {
        model,
        config: mcfg,
        dir,
        gguf,
    } = phi_model::load(&a.model, &device)?;
    if a.split_fused && mcfg.arch.fused(&mcfg).is_empty() {
        bail!(
            "--split-fused: {} has no fused projections (Phi-3 has)",
            mcfg.arch.hf_class()
        );
    }
    let mut config = match a.adapter_only {
        true => Value::Null,
        false => source_config(dir.as_deref(), gguf.as_deref())?,
    };
    if a.split_fused && !a.adapter_only {
        let arch = mcfg.arch;
        arch.unfused_config(&mut config, &mcfg)
            .map_err(|e| anyhow::anyhow!("--split-fused: {e}"))?;
    }
    let (model, mut cfg, paths) = peft::load(model, &a.adapter)?;
    eprintln!(
        "adapter on {} modules, scale {}",
        paths.len(),
        cfg.scale_for(&paths[0])
    );
    if a.adapter_only {
        let mut tensors: Vec<_> = model.lora_tensors();
        let mut targets = leaf_names(&paths);
        if a.split_fused {
            tensors = split_fused(&mcfg, tensors);
            targets = split_target_names(&mcfg, &targets);
            if let phi_adapters::Targets::Regex(_) = cfg.targets {
                cfg.targets = phi_adapters::Targets::Names(targets.clone());
            }
        }
        let map = tensors
            .into_iter()
            .map(|(k, t)| (format!("{PREFIX}{k}"), (t.shape, t.data)))
            .collect();
        peft::write_adapter(&a.out, &cfg, &targets, &map)?;
        eprintln!("wrote adapter to {}", a.out.display());
        return Ok(());
    }
    let dtype = want_dtype.unwrap_or_else(|| config_dtype(&config));
    let q = model.quant_summary();
    if q.weights > 0 {
        eprintln!(
            "base: {} linear weights stored quantized ({}): merged into their dequantized values, written as {}",
            q.weights,
            q.types.join(", "),
            dtype.hf_name()
        );
    }
    let merged = merge(model);
    let mut tensors = merged.hf_tensors();
    if a.split_fused {
        tensors = split_fused(&mcfg, tensors);
    }
    let from = dir.or_else(|| gguf.as_ref()?.parent().map(Path::to_path_buf));
    let files = write_model_folder(&a.out, &tensors, config, dtype, shard, from.as_deref())?;
    eprintln!(
        "merged {} modules; wrote {} ({}) to {}",
        paths.len(),
        files.join(", "),
        dtype.hf_name(),
        a.out.display()
    );
    Ok(())
}
