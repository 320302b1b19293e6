//! Norm surgery (Composer's LayerNorm → RMSNorm swap): every LayerNorm of a LayerNorm model
//! (Phi-2) becomes an RMSNorm that keeps the LayerNorm's weight parameter and drops its bias.
//! The result is a different function (no mean subtraction, no bias), which training is
//! expected to absorb; `config_keys` records the swap so a saved model reloads with RMSNorms.

use crate::model::CausalLm;
use serde_json::Value;

/// Composer's default eps for the swapped norms.
pub const DEFAULT_EPS: f64 = 1e-8;

/// Swaps every LayerNorm for an RMSNorm; returns the model and how many norms were swapped
/// (0 for a model with RMSNorms only).
pub fn layernorm_to_rmsnorm(mut model: CausalLm, eps: f64) -> (CausalLm, usize) {
    let mut swapped = 0;
    for layer in &mut model.model.layers {
        for (_, n) in layer.block_mut().norms_mut() {
            swapped += usize::from(n.make_rms(eps));
        }
    }
    swapped += usize::from(model.model.norm.make_rms(eps));
    (model, swapped)
}

/// Adds the keys our loader reads back (`norm_surgery`, `rms_norm_eps`) to a config.json.
/// transformers' PhiForCausalLM ignores them and would build LayerNorms, missing biases.
pub fn record_in_config(config: &mut Value, eps: f64) {
    config["norm_surgery"] = Value::from("rmsnorm");
    config["rms_norm_eps"] = Value::from(eps);
}
