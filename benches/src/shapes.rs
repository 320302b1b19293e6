//! The benchmark shapes (the same configs benches/torch_baseline.py builds) and the FLOP count
//! of one step.

use anyhow::{bail, Result};
use phi_model::{CausalLm, ModelConfig};
use serde_json::json;

/// The config.json of a named shape.
pub fn shape_json(name: &str) -> Result<serde_json::Value> {
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
        // Phi-3-mini-4k-instruct's config (3.8 B): the seed recipes' model, random weights.
        "phi3-mini" => json!({
            "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 8192,
            "vocab_size": 32064, "tie_word_embeddings": false, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
            "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000
        }),
        other => bail!("--shape {other}: expected smollm2-135m, phi3-small or phi3-mini"),
    })
}

pub fn shape_config(name: &str) -> Result<ModelConfig> {
    Ok(ModelConfig::from_value(shape_json(name)?, name)?)
}

/// Model FLOPs of one step (see docs/benchmarks.md, "How GFLOP/s is counted").
///
/// Every linear costs 2·d_in·d_out per token forward. Training adds the input-gradient GEMM
/// (another 2·d_in·d_out) for every linear and the weight-gradient GEMM only for trainable
/// weights: ×3 when trainable, ×2 when frozen (LoRA, norm-only). LoRA factors are trainable
/// linears of r·(d_in + d_out) params. Attention (QKᵀ and PV) is 4·T²·d per layer and sequence
/// forward, ×3 when training. The tied head counts as a vocab × hidden linear.
pub struct Flops {
    /// Weights of the base linears (and head), frozen or not.
    pub base_matmul_params: usize,
    pub lora_matmul_params: usize,
    pub per_step: f64,
}

pub fn step_flops(
    model: &CausalLm,
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    train: bool,
    base_trains: bool,
) -> Flops {
    let mut base = 0usize;
    let mut lora = 0usize;
    for (_, l) in model.linears() {
        base += l.d_in() * l.d_out();
        if let Some(lr) = &l.lora {
            let [din, r] = lr.a.val().dims();
            let [_, dout] = lr.b.val().dims();
            lora += r * (din + dout);
        }
    }
    if cfg.tie_word_embeddings {
        base += cfg.vocab_size * cfg.hidden_size;
    }
    let tokens = (batch * seq) as f64;
    let d = (cfg.num_attention_heads * cfg.head_dim) as f64;
    let attn = 4.0 * (seq as f64).powi(2) * d * (cfg.num_hidden_layers * batch) as f64;
    let (base_mul, lora_mul, attn_mul) = match (train, base_trains) {
        (false, _) => (1.0, 1.0, 1.0),
        (true, true) => (3.0, 3.0, 3.0),
        (true, false) => (2.0, 3.0, 3.0),
    };
    let per_step =
        2.0 * tokens * (base as f64 * base_mul + lora as f64 * lora_mul) + attn * attn_mul;
    Flops {
        base_matmul_params: base,
        lora_matmul_params: lora,
        per_step,
    }
}

/// Median of the timings (sorted in place).
pub fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    match times.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => times[n / 2],
        n => 0.5 * (times[n / 2 - 1] + times[n / 2]),
    }
}
