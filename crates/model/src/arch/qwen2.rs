//! Qwen2 / Qwen2.5: the Llama block with biases on q, k and v (not on o, the MLP or the
//! head; config.json has no key for them), and sliding-window settings of its own.

use super::llama::{linears, LlamaLayer};
use super::{Architecture, DecoderLayer, LinearSpec, Mlp};
use crate::config::{ConfigReader, ModelConfig};
use crate::error::ModelError;
use crate::weights::TensorSource;
use burn::tensor::Device;

#[derive(Debug)]
pub struct Qwen2;

impl Architecture for Qwen2 {
    fn classes(&self) -> &'static [&'static str] {
        &["Qwen2ForCausalLM"]
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen2"]
    }

    fn layer_linears(&self, c: &ModelConfig) -> Vec<LinearSpec> {
        linears(c, [true, true, true, false], false)
    }

    fn load_layer(
        &self,
        src: &dyn TensorSource,
        prefix: &str,
        c: &ModelConfig,
        device: &Device,
    ) -> Result<DecoderLayer, ModelError> {
        let specs = self.layer_linears(c);
        LlamaLayer::load(src, prefix, c, &specs, device).map(DecoderLayer::Llama)
    }

    fn mlp(&self) -> Mlp {
        Mlp::SwiGlu
    }

    /// transformers uses `sliding_window` only with `use_sliding_window` (Hub configs carry a
    /// window with the switch off), and then only in the layers `layer_types` marks
    /// `sliding_attention`, or without that list in layers from `max_window_layers` on. One
    /// window for every layer or none is what the forward does; a mix is refused.
    fn configure(&self, r: &ConfigReader, c: &mut ModelConfig) -> Result<(), ModelError> {
        if r.opt_bool("use_sliding_window")? != Some(true) {
            c.sliding_window = None;
        }
        let Some(w) = c.sliding_window else {
            return Ok(());
        };
        let n = c.num_hidden_layers;
        let (key, sliding) = match r.opt_str_list("layer_types")? {
            Some(types) => {
                if types.len() != n {
                    return Err(r.err("layer_types", &format!("{n} entries, one per layer")));
                }
                let s = types.iter().filter(|t| **t == "sliding_attention").count();
                ("layer_types", s)
            }
            None => {
                let first = r.opt_usize("max_window_layers")?.unwrap_or(28);
                ("max_window_layers", n.saturating_sub(first))
            }
        };
        c.sliding_window = match sliding {
            0 => None,
            s if s == n => Some(w),
            s => {
                return Err(r.err(
                    key,
                    &format!("a sliding window in all {n} layers or in none ({s} slide): one window per model is implemented"),
                ))
            }
        };
        Ok(())
    }
}
