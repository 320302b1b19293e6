//! phi-bench: times the forward, and forward + backward, of a randomly initialised model of a
//! named shape, and prints one JSON line per run (tokens/s, peak RSS).

use anyhow::{bail, Result};
use burn::tensor::Tensor;
use clap::Parser;
use phi_adapters::freeze::{self, trainable_names, Counts, Selection};
use phi_adapters::{lora, LoraConfig};
use phi_model::loss::causal_lm_loss;
use phi_model::weights::RandomSource;
use phi_model::{CausalLm, Inputs, ModelConfig, TapRequest};
use serde_json::json;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// smollm2-135m or phi3-small.
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    /// forward, or fwd-bwd (forward + backward of the LM loss through every weight).
    #[arg(long, default_value = "forward")]
    mode: String,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With fwd-bwd: what trains. full, norm-only (base frozen, backward through every
    /// layer), or lora (all-linear, --lora-r, base frozen).
    #[arg(long, default_value = "full")]
    train: String,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    /// Attach the LoRA adapter in forward mode too (to time its forward overhead).
    #[arg(long)]
    lora: bool,
    /// Write the shape's random model (config.json + model.safetensors) to this folder and
    /// exit: a stand-in checkpoint for timing whole phi-train recipes.
    #[arg(long)]
    save_random: Option<std::path::PathBuf>,
}

fn shape_json(name: &str) -> Result<serde_json::Value> {
    Ok(match name {
        "smollm2-135m" => json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
            "vocab_size": 49152, "tie_word_embeddings": true, "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2
        }),
        "phi3-small" => json!({
            "architectures": ["Phi3ForCausalLM"], "hidden_size": 1024, "num_hidden_layers": 8,
            "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 2816,
            "vocab_size": 32064, "tie_word_embeddings": false, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
            "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000
        }),
        other => bail!("--shape {other}: expected smollm2-135m or phi3-small"),
    })
}

fn shape_config(name: &str) -> Result<ModelConfig> {
    Ok(ModelConfig::from_value(shape_json(name)?, name)?)
}

/// Peak resident set size of this process (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn sync(t: Tensor<1>) -> f32 {
    t.try_into_vec_as::<f32>().map(|v| v[0]).unwrap_or(f32::NAN)
}

/// Sum of the gradient of the parameter named `name`.
fn probe_grad(model: &CausalLm, name: &str, grads: &burn::tensor::Gradients) -> f32 {
    if let Some(module) = name.strip_suffix(".lora_A.weight") {
        let lin = model.linears().into_iter().find(|(p, _)| p == module);
        if let Some(l) = lin.and_then(|(_, l)| l.lora.as_ref()) {
            return l.a.val().grad(grads).map_or(f32::NAN, |g| sync(g.sum()));
        }
    }
    let norms = model.norm_params();
    if let Some((_, w)) = norms.iter().find(|(n, _)| n == name) {
        return w.grad(grads).map_or(f32::NAN, |g| sync(g.sum()));
    }
    model
        .model
        .embed_tokens
        .weight
        .val()
        .grad(grads)
        .map_or(f32::NAN, |g| sync(g.sum()))
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(dir) = &a.save_random {
        let files = phi_model::export::write_random_model(dir, shape_json(&a.shape)?, 0)?;
        println!("{}: {}", dir.display(), files.join(", "));
        return Ok(());
    }
    let cfg = shape_config(&a.shape)?;
    let base = phi_model::device_from_name(&a.device)?;
    let train = match a.mode.as_str() {
        "forward" => false,
        "fwd-bwd" => true,
        m => bail!("--mode {m}: expected forward or fwd-bwd"),
    };
    let device = if train { base.autodiff() } else { base };
    let mut model = CausalLm::load(&cfg, &RandomSource { seed: 0 }, &device)?;
    let lora_cfg = LoraConfig {
        r: a.lora_r,
        alpha: 2.0 * a.lora_r as f64,
        ..Default::default()
    };
    let selection = match a.train.as_str() {
        "full" => Selection::Full,
        "norm-only" => Selection::NormOnly,
        "lora" => Selection::Lora {
            modules_to_save: vec![],
        },
        t => bail!("--train {t}: expected full, norm-only or lora"),
    };
    if a.lora || (train && selection != Selection::Full && a.train == "lora") {
        lora::attach(&mut model, &lora_cfg)?;
    }
    let names = trainable_names(&model, &selection)?;
    let counts = Counts::of(&model, &names);
    let model = if train {
        freeze::apply(model, &names)
    } else {
        model
    };
    // A parameter that trains in every setting, read to force the backward to finish.
    let probe = model
        .params()
        .into_iter()
        .find(|p| names.contains(&p.name))
        .map(|p| p.name)
        .unwrap_or_default();
    let n = a.batch * a.seq;
    let ids: Vec<i64> = (0..n)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as i64)
        .collect();
    let inp = Inputs::new(a.batch, a.seq, ids.clone());
    let mut times = Vec::new();
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let logits = model.forward(&inp, &TapRequest::none()).logits;
        let loss = causal_lm_loss(logits, &ids);
        if train {
            let grads = loss.backward();
            // Reading one gradient forces the whole backward pass to finish.
            std::hint::black_box(probe_grad(&model, &probe, &grads));
        } else {
            std::hint::black_box(sync(loss));
        }
        if step >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let line = json!({
        "shape": a.shape, "mode": a.mode, "batch": a.batch, "seq": a.seq, "steps": a.steps,
        "device": a.device, "train": if train { a.train.as_str() } else { "-" },
        "lora_r": if a.lora || a.train == "lora" { a.lora_r } else { 0 },
        "trainable_params": counts.trainable, "all_params": counts.all,
        "step_s_median": median, "tokens_per_s": n as f64 / median,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{line}");
    Ok(())
}
