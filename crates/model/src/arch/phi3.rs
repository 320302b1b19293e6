//! Phi-3 / Phi-3.5: a Llama block whose q/k/v and gate/up projections are fused, as the HF
//! checkpoints store them (`qkv_proj` rows [q | k | v], `gate_up_proj` rows [gate | up]).

use super::{block_listing, Architecture, Block, DecoderLayer, Fused, LinearSpec, Linears, Mlp};
use crate::config::{ModelConfig, RopeScaling};
use crate::error::ModelError;
use crate::gguf::{GgufError, GgufFile, GgufLayout};
use crate::gguf_export::{kv, ArchMeta};
use crate::gguf_write::MetaValue;
use crate::nn::{load_norm_pair, rotary_attention, LayerCache, LayerCtx, Linear, Norm, Projected};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use phi_kernels::swiglu_packed_saving;
use serde_json::{json, Value};

#[derive(Debug)]
pub struct Phi3;

impl Architecture for Phi3 {
    fn classes(&self) -> &'static [&'static str] {
        &["Phi3ForCausalLM"]
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["phi3"]
    }

    fn layer_linears(&self, c: &ModelConfig) -> Vec<LinearSpec> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let qd = c.num_attention_heads * c.head_dim;
        let qkv = qd + 2 * c.num_key_value_heads * c.head_dim;
        let (ab, mb) = (c.attention_bias, c.mlp_bias);
        let spec = |name, d_in, d_out, bias| LinearSpec {
            name,
            d_in,
            d_out,
            bias,
        };
        vec![
            spec("self_attn.qkv_proj", h, qkv, ab),
            spec("self_attn.o_proj", qd, h, ab),
            spec("mlp.gate_up_proj", h, 2 * i, mb),
            spec("mlp.down_proj", i, h, mb),
        ]
    }

    fn load_layer(
        &self,
        src: &dyn TensorSource,
        p: &str,
        c: &ModelConfig,
        device: &Device,
    ) -> Result<DecoderLayer, ModelError> {
        let mut lin = Linears::load(src, p, &self.layer_linears(c), device)?;
        let (input_layernorm, post_attention_layernorm) =
            load_norm_pair(src, p, c.hidden_size, c.norm_kind(), device)?;
        Ok(DecoderLayer::Phi3(Phi3Layer {
            self_attn: Phi3Attention {
                qkv_proj: lin.take("self_attn.qkv_proj"),
                o_proj: lin.take("self_attn.o_proj"),
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
            },
            mlp: Phi3Mlp {
                gate_up_proj: lin.take("mlp.gate_up_proj"),
                down_proj: lin.take("mlp.down_proj"),
            },
            input_layernorm,
            post_attention_layernorm,
        }))
    }

    fn mlp(&self) -> Mlp {
        Mlp::PackedSwiGlu
    }

    fn gguf(&self) -> Option<GgufLayout> {
        Some(GgufLayout {
            name: "phi3",
            class: self.classes()[0],
            fixed: crate::gguf::LLAMA_FIXED,
            layer_tensors: &[
                ("attn_norm.weight", "input_layernorm.weight"),
                ("ffn_norm.weight", "post_attention_layernorm.weight"),
                ("attn_qkv.weight", "self_attn.qkv_proj.weight"),
                ("attn_output.weight", "self_attn.o_proj.weight"),
                ("ffn_up.weight", "mlp.gate_up_proj.weight"),
                ("ffn_down.weight", "mlp.down_proj.weight"),
            ],
            permuted: &[],
        })
    }

    fn gguf_config(&self, file: &GgufFile, cfg: &mut Value) -> Result<(), GgufError> {
        let m = file.metadata();
        let u = |k: &str| m.get(k).and_then(|v| v.as_u64());
        if let Some(w) = u("phi3.attention.sliding_window").filter(|&w| w > 0) {
            cfg["sliding_window"] = json!(w);
        }
        if let Some(n) = u("phi3.rope.dimension_count") {
            let h = cfg["hidden_size"].as_u64().unwrap_or(1) as f64;
            let heads = cfg["num_attention_heads"].as_u64().unwrap_or(1) as f64;
            let factor = n as f64 * heads / h;
            if factor != 1.0 {
                cfg["partial_rotary_factor"] = json!(factor);
            }
        }
        let orig = u("phi3.rope.scaling.original_context_length");
        if let Some(o) = orig {
            cfg["original_max_position_embeddings"] = json!(o);
        }
        let long = file.gguf_tensor_f32("rope_factors_long.weight")?;
        let short = file.gguf_tensor_f32("rope_factors_short.weight")?;
        if let (Some(long), Some(short)) = (long, short) {
            let o = orig.ok_or_else(|| {
                file.err("key phi3.rope.scaling.original_context_length: expected it beside rope_factors_long")
            })?;
            cfg["rope_scaling"] = json!({
                "type": "longrope", "long_factor": long, "short_factor": short,
                "original_max_position_embeddings": o,
            });
        }
        Ok(())
    }

    fn gguf_export(&self, c: &ModelConfig, file_type: u32) -> Option<ArchMeta> {
        use MetaValue::{F32, U32};
        let u = |v: usize| U32(v as u32);
        let raw_orig = c.raw["original_max_position_embeddings"].as_u64();
        let (mut early, mut tensors) = (vec![], vec![]);
        let orig = match &c.rope_scaling {
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings: o,
                ..
            } => {
                let scale = c.max_position_embeddings as f64 / *o as f64;
                let attn = match scale > 1.0 {
                    true => (1.0 + scale.ln() / (*o as f64).ln()).sqrt(),
                    false => 1.0,
                };
                early.push(kv("phi3.rope.scaling.attn_factor", F32(attn as f32)));
                let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                tensors.push(("rope_factors_long.weight".to_string(), f(long_factor)));
                tensors.push(("rope_factors_short.weight".to_string(), f(short_factor)));
                *o
            }
            RopeScaling::Llama3 { .. } => return None,
            // The converter requires the key; Phi-3 configs carry it.
            RopeScaling::Default => raw_orig.map_or(c.max_position_embeddings, |o| o as usize),
        };
        let rope_dims =
            (c.partial_rotary_factor * c.hidden_size as f64) as usize / c.num_attention_heads;
        let hparams = vec![
            kv("phi3.context_length", u(c.max_position_embeddings)),
            kv("phi3.rope.scaling.original_context_length", u(orig)),
            kv("phi3.embedding_length", u(c.hidden_size)),
            kv("phi3.feed_forward_length", u(c.intermediate_size)),
            kv("phi3.block_count", u(c.num_hidden_layers)),
            kv("phi3.attention.head_count", u(c.num_attention_heads)),
            kv("phi3.attention.head_count_kv", u(c.num_key_value_heads)),
            kv(
                "phi3.attention.layer_norm_rms_epsilon",
                F32(c.norm_eps as f32),
            ),
            kv("phi3.rope.dimension_count", u(rope_dims)),
            kv("phi3.rope.freq_base", F32(c.rope_theta as f32)),
            kv("general.file_type", U32(file_type)),
            kv(
                "phi3.attention.sliding_window",
                u(c.sliding_window.unwrap_or(0)),
            ),
        ];
        Some(ArchMeta {
            early,
            hparams,
            tensors,
        })
    }

    fn fused(&self, c: &ModelConfig) -> Vec<Fused> {
        let d = c.head_dim;
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let i = c.intermediate_size;
        vec![
            Fused {
                module: "self_attn.qkv_proj",
                parts: vec![("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
            },
            Fused {
                module: "mlp.gate_up_proj",
                parts: vec![("gate_proj", i), ("up_proj", i)],
            },
        ]
    }

    /// Phi-3 with split projections is a Llama checkpoint, exact only where
    /// LlamaForCausalLM computes what Phi3ForCausalLM does.
    fn unfused_config(&self, cfg: &mut Value, model: &ModelConfig) -> Result<(), String> {
        if let RopeScaling::LongRope { .. } = model.rope_scaling {
            // Even where Llama's forward applies longrope alike, Phi3ForCausalLM's generate
            // drops the KV cache and re-encodes when a sequence crosses the original context,
            // and Llama's does not: its keys cached with the short factors would go stale.
            return Err("a longrope Phi-3 cannot become a LlamaForCausalLM checkpoint: Llama's generate keeps the short-factor KV cache when a sequence crosses original_max_position_embeddings, where Phi-3 re-encodes, so generations would differ; export the model fused, or only the adapter split (--split-fused --adapter-only)".into());
        }
        if model.partial_rotary_factor != 1.0 {
            return Err(format!("a partial-rotary Phi-3 (partial_rotary_factor {}) cannot become a LlamaForCausalLM checkpoint: Llama rotates the whole head; export the model fused, or only the adapter split (--split-fused --adapter-only)", model.partial_rotary_factor));
        }
        cfg["architectures"] = json!(["LlamaForCausalLM"]);
        cfg["model_type"] = json!("llama");
        cfg["head_dim"] = json!(model.head_dim);
        if let Some(o) = cfg.as_object_mut() {
            for k in [
                "auto_map",
                "sliding_window",
                "embd_pdrop",
                "resid_pdrop",
                "original_max_position_embeddings",
            ] {
                o.remove(k);
            }
        }
        Ok(())
    }
}

#[derive(Module, Debug)]
pub struct Phi3Attention {
    pub qkv_proj: Linear,
    pub o_proj: Linear,
    #[module(skip)]
    pub heads: usize,
    #[module(skip)]
    pub kv_heads: usize,
}

#[derive(Module, Debug)]
pub struct Phi3Mlp {
    pub gate_up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct Phi3Layer {
    pub self_attn: Phi3Attention,
    pub mlp: Phi3Mlp,
    pub input_layernorm: Norm,
    pub post_attention_layernorm: Norm,
}

impl Block for Phi3Layer {
    block_listing!(
        linears: [self_attn.qkv_proj, self_attn.o_proj, mlp.gate_up_proj, mlp.down_proj],
        norms: [input_layernorm, post_attention_layernorm]
    );

    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &LayerCtx,
        cache: Option<&mut LayerCache>,
        taps: &mut LayerTaps,
    ) -> Tensor<3> {
        let a = &self.self_attn;
        let normed = self.input_layernorm.forward(x.clone());
        taps.input_layernorm(&normed);
        let qkv = Projected::Fused(a.qkv_proj.forward(normed));
        let h = x + a
            .o_proj
            .forward(rotary_attention(qkv, a.heads, a.kv_heads, ctx, cache));
        let normed = self.post_attention_layernorm.forward(h.clone());
        taps.post_attention_layernorm(&normed);
        let gu = self.mlp.gate_up_proj.forward(normed);
        let bf16 = self.mlp.gate_up_proj.on_bf16_kernels();
        h + self.mlp.down_proj.forward(swiglu_packed_saving(gu, bf16))
    }
}
