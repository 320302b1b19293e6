//! Timed steps: a forward pass with the loss, or a full training step done as phi-train does
//! it (forward, the trainer's loss, backward, gradient clipping, the trainer's AdamW update).

use crate::shapes::{median, shape_config, step_flops};
use crate::Args;
use anyhow::{bail, Result};
use burn::tensor::{Device, Tensor};
use phi_adapters::freeze::{self, trainable_names, Counts, Selection};
use phi_adapters::{lora, LoraConfig};
use phi_kernels::quant::QType;
use phi_model::bf16::packing;
use phi_model::export::OutDtype;
use phi_model::quantize::{quantizing, QuantSpec};
use phi_model::weights::RandomSource;
use phi_model::{CausalLm, Inputs, TapRequest};
use phi_trainer::layerwise;
use phi_trainer::optim::{self, Kind, Optimizer};
use serde_json::json;
use std::time::Instant;

/// torch.optim.AdamW's defaults except lr, which is LLaMA-Factory's usual 1e-4.
const LR: f64 = 1e-4;
const WEIGHT_DECAY: f64 = 0.01;
/// HF Trainer's default max_grad_norm.
const MAX_GRAD_NORM: f64 = 1.0;

fn scalar(t: Tensor<1>) -> f64 {
    t.inner()
        .try_into_vec_as::<f32>()
        .map_or(f64::NAN, |v| v[0] as f64)
}

/// `--base` as a quantization of the frozen base (None: f32, or bf16 packing).
fn base_quant(a: &Args) -> Result<Option<QuantSpec>> {
    let (ty, nested) = match a.base.as_str() {
        "f32" | "bf16" => return Ok(None),
        "nf4" | "q4" => (QType::Nf4, true),
        "fp4" => (QType::Fp4, true),
        "int8" | "q8" => (QType::Int8, false),
        b => bail!("--base {b}: expected f32, bf16, nf4 (q4), fp4 or int8 (q8)"),
    };
    Ok(Some(QuantSpec { ty, nested }))
}

/// `--base` as the dtype `--save-random` writes.
pub fn save_dtype(a: &Args) -> Result<OutDtype> {
    match a.base.as_str() {
        "f32" => Ok(OutDtype::F32),
        "bf16" => Ok(OutDtype::BF16),
        b => bail!("--base {b} with --save-random: expected f32 or bf16"),
    }
}

pub fn run(a: &Args) -> Result<()> {
    let cfg = shape_config(&a.shape)?;
    let base = phi_model::device_from_name(&a.device)?;
    let (train, selection) = match a.mode.as_str() {
        "forward" => (false, Selection::Full),
        "full" => (true, Selection::Full),
        "norm-only" => (true, Selection::NormOnly),
        "lora" => (
            true,
            Selection::Lora {
                modules_to_save: vec![],
            },
        ),
        m => bail!("--mode {m}: expected lora, full, norm-only or forward"),
    };
    if (a.gradient_checkpointing || a.checkpoint_layers) && !train {
        bail!("--gradient-checkpointing needs a training mode (lora, full, norm-only)");
    }
    if a.gradient_checkpointing && a.checkpoint_layers {
        bail!("--checkpoint-layers: instead of --gradient-checkpointing, not with it");
    }
    let device: Device = match (train, a.gradient_checkpointing) {
        (false, _) => base,
        (true, false) => base.autodiff(),
        (true, true) => base.autodiff().gradient_checkpointing(),
    };
    // bf16 on a CPU with matrix units is phi-train's --bf16 there: the frozen base on our
    // kernels (packed below), everything else f32; elsewhere Burn's autocast.
    let kernels = match (a.dtype.as_str(), a.device.as_str()) {
        ("bf16", "cpu") => phi_model::bf16::cpu_path(),
        _ => None,
    };
    let compute = match a.dtype.as_str() {
        "f32" => None,
        "bf16" if kernels.is_some() => None,
        "bf16" => Some(burn::tensor::DType::BF16),
        "f16" => Some(burn::tensor::DType::F16),
        d => bail!("--dtype {d}: expected f32, bf16 or f16"),
    };
    let _autocast = phi_model::precision::autocast(compute);
    let quant = base_quant(a)?;
    if a.base == "bf16" && kernels.is_none() {
        bail!("--base bf16: needs --dtype bf16 on a CPU with bf16 matrix units (AMX)");
    }
    if quant.is_some() && a.mode == "full" {
        bail!(
            "--base {}: a quantized base is not fully fine-tuned (lora, norm-only)",
            a.base
        );
    }
    let src = RandomSource { seed: 0 };
    let mut model = match (quant, kernels.filter(|_| a.base == "bf16")) {
        (Some(spec), _) => CausalLm::load(&cfg, &quantizing(&src, spec), &device)?,
        // A bf16 base packed weight by weight as it loads, never whole in f32.
        (None, Some(path)) => CausalLm::load(&cfg, &packing(&src, path), &device)?,
        (None, None) => CausalLm::load(&cfg, &src, &device)?,
    };
    let quant_mb = model.quant_summary().bytes as f64 / 1e6;
    let with_lora = a.mode == "lora" || a.lora;
    if with_lora {
        let lora_cfg = LoraConfig {
            r: a.rank,
            alpha: 2.0 * a.rank as f64,
            ..Default::default()
        };
        lora::attach(&mut model, &lora_cfg)?;
    }
    let names = trainable_names(&model, &selection)?;
    let counts = Counts::of(&model, &names);
    let mut model = if train {
        freeze::apply(model, &names)
    } else {
        model
    };
    // Frozen weights held in bf16, trainable ones rounded per step; the tied head of a full
    // fine-tune stays f32.
    let packed = kernels.map_or(0, |p| model.pack_bf16(p) + model.bf16_trainable());
    let kernels = kernels.filter(|_| packed > 0);
    let flops = step_flops(&model, &cfg, a.batch, a.seq, train, a.mode == "full");
    let mut opt = Optimizer::new(
        &model,
        match a.optim.as_str() {
            "adamw_torch" => Kind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            "adamw_8bit" => Kind::AdamW8 {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            o => bail!("--optim {o}: expected adamw_torch or adamw_8bit"),
        },
        WEIGHT_DECAY,
    );

    let n = a.batch * a.seq;
    let ids: Vec<i64> = (0..n)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as i64)
        .collect();
    let inp = Inputs::new(a.batch, a.seq, ids.clone());
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    // The steps' own peak, apart from loading's (the f32 checkpoint before `pack_bf16`).
    let loaded_mb = phi_model::alloc::peak_rss_mb().unwrap_or(0.0);
    let phased = phi_model::alloc::reset_peak_rss();
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        if train && a.checkpoint_layers {
            let count = phi_model::loss::shifted_targets(a.batch, a.seq, &ids).1;
            let (g, sum) = layerwise::grads(&model, &inp, &ids, None, count.max(1) as f64, 1.0);
            opt.clip(&g, MAX_GRAD_NORM);
            model = opt.step(model, g, LR);
            let dt = t0.elapsed().as_secs_f64();
            if a.verbose {
                eprintln!("step {step}: {dt:.3} s, loss {:.5}", sum / count as f64);
            }
            losses.push(sum / count.max(1) as f64);
            if step >= a.warmup {
                times.push(dt);
            }
            continue;
        }
        let emb = model.embed(&inp);
        let (h, _) = model.forward_hidden(emb, &inp, &TapRequest::none(), None);
        let (sum, count) = model.loss_sum(h, &ids);
        let loss = sum / count.max(1) as f64;
        let loss_val;
        if train {
            loss_val = scalar(loss.clone());
            let grads = loss.backward();
            let g = optim::collect(&model, &grads);
            drop(grads);
            opt.clip(&g, MAX_GRAD_NORM);
            model = opt.step(model, g, LR);
        } else {
            loss_val = scalar(loss);
        }
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
        let dt = t0.elapsed().as_secs_f64();
        if a.verbose {
            eprintln!("step {step}: {dt:.3} s, loss {loss_val:.5}");
        }
        losses.push(loss_val);
        if step >= a.warmup {
            times.push(dt);
        }
    }
    let med = median(&mut times.clone());
    let line = json!({
        "shape": a.shape, "mode": a.mode, "batch": a.batch, "seq": a.seq, "steps": a.steps,
        "step_s_median": med, "tokens_per_s": n as f64 / med,
        "peak_rss_mb": phi_model::alloc::peak_rss_mb().unwrap_or(0.0).max(loaded_mb),
        "steps_peak_rss_mb": if phased { phi_model::alloc::peak_rss_mb() } else { None },
        "gflops_per_s": flops.per_step / med / 1e9,
        "gflop_per_step": flops.per_step / 1e9,
        "warmup": a.warmup, "device": a.device, "rank": if with_lora { a.rank } else { 0 },
        "gradient_checkpointing": a.gradient_checkpointing, "dtype": a.dtype,
        "checkpoint_layers": a.checkpoint_layers, "optim": a.optim,
        "base": a.base, "quantized_base_mb": quant_mb,
        "trainable_params": counts.trainable, "all_params": counts.all,
        "matmul_params": flops.base_matmul_params + flops.lora_matmul_params,
        "step_s": times, "losses": losses, "impl": format!("phi-tune/burn-{}", backend(&a.device)),
        "gemm": kernels.map_or(if compute.is_some() { "burn autocast" } else { "burn f32" }, |p| p.name()),
    });
    println!("{line}");
    Ok(())
}

/// Burn's backend behind a `--device` name (flex is the CPU's).
fn backend(device: &str) -> &'static str {
    match device.split(':').next() {
        Some("vulkan") => "wgpu",
        Some("cuda") => "cuda",
        Some("ndarray") => "ndarray",
        _ => "flex",
    }
}
