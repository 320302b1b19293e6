//! Phi-3 / Phi-3.5: a Llama block whose q/k/v and gate/up projections are fused, as the HF
//! checkpoints store them (`qkv_proj` rows [q | k | v], `gate_up_proj` rows [gate | up]).

use super::{block_listing, Architecture, Block, DecoderLayer, Fused, LinearSpec, Linears, Mlp};
use crate::config::{ModelConfig, RopeScaling};
use crate::error::ModelError;
use crate::nn::{load_norm_pair, rotary_attention, LayerCache, LayerCtx, Linear, Norm, Projected};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use phi_kernels::swiglu_packed;
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
        h + self.mlp.down_proj.forward(swiglu_packed(gu))
    }
}
