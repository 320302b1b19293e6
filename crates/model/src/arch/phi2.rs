//! Phi-2: one LayerNorm per block feeding attention and MLP in parallel, partial rotary,
//! gelu_new, biases everywhere, and `dense` as the attention output projection.

use super::{block_listing, Architecture, Block, DecoderLayer, LinearSpec, Linears, Mlp};
use crate::config::{ConfigReader, ModelConfig};
use crate::error::ModelError;
use crate::gguf::{GgufError, GgufFile, GgufLayout};
use crate::gguf_export::{kv, ArchMeta};
use crate::gguf_write::MetaValue;
use crate::nn::{rotary_attention, LayerCache, LayerCtx, Linear, Norm, Projected};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::{Device, Tensor};
use serde_json::{json, Value};

#[derive(Debug)]
pub struct Phi2;

impl Architecture for Phi2 {
    fn classes(&self) -> &'static [&'static str] {
        &["PhiForCausalLM"]
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["phi"]
    }

    fn layer_linears(&self, c: &ModelConfig) -> Vec<LinearSpec> {
        let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let spec = |name, d_in, d_out| LinearSpec {
            name,
            d_in,
            d_out,
            bias: true,
        };
        vec![
            spec("self_attn.q_proj", h, qd),
            spec("self_attn.k_proj", h, kvd),
            spec("self_attn.v_proj", h, kvd),
            spec("self_attn.dense", qd, h),
            spec("mlp.fc1", h, i),
            spec("mlp.fc2", i, h),
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
        let norm = format!("{p}.input_layernorm");
        Ok(DecoderLayer::Phi2(Phi2Layer {
            self_attn: Phi2Attention {
                q_proj: lin.take("self_attn.q_proj"),
                k_proj: lin.take("self_attn.k_proj"),
                v_proj: lin.take("self_attn.v_proj"),
                dense: lin.take("self_attn.dense"),
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
            },
            mlp: Phi2Mlp {
                fc1: lin.take("mlp.fc1"),
                fc2: lin.take("mlp.fc2"),
                tanh_gelu: c.hidden_act != "gelu",
            },
            input_layernorm: Norm::load(src, &norm, c.hidden_size, c.norm_kind(), device)?,
        }))
    }

    fn mlp(&self) -> Mlp {
        Mlp::Gelu
    }

    fn activations(&self) -> &'static [&'static str] {
        &["gelu_new", "gelu_pytorch_tanh", "gelu"]
    }

    fn configure(&self, r: &ConfigReader, c: &mut ModelConfig) -> Result<(), ModelError> {
        if r.opt_bool("qk_layernorm")? == Some(true) {
            return Err(r.err("qk_layernorm", "false (q/k LayerNorms are not implemented)"));
        }
        // transformers' PhiModel has no local attention, whatever the config says.
        c.sliding_window = None;
        Ok(())
    }

    fn final_norm(&self) -> &'static str {
        "final_layernorm"
    }

    fn layer_norms(&self) -> bool {
        true
    }

    fn post_attention_norm(&self) -> bool {
        false
    }

    fn lm_head_bias(&self) -> bool {
        true
    }

    fn gguf(&self) -> Option<GgufLayout> {
        Some(GgufLayout {
            name: "phi2",
            class: self.classes()[0],
            fixed: &[
                ("token_embd.weight", "model.embed_tokens.weight"),
                ("output_norm.weight", "model.final_layernorm.weight"),
                ("output_norm.bias", "model.final_layernorm.bias"),
                ("output.weight", "lm_head.weight"),
                ("output.bias", "lm_head.bias"),
            ],
            layer_tensors: &[
                ("attn_norm.weight", "input_layernorm.weight"),
                ("attn_norm.bias", "input_layernorm.bias"),
                ("attn_q.weight", "self_attn.q_proj.weight"),
                ("attn_q.bias", "self_attn.q_proj.bias"),
                ("attn_k.weight", "self_attn.k_proj.weight"),
                ("attn_k.bias", "self_attn.k_proj.bias"),
                ("attn_v.weight", "self_attn.v_proj.weight"),
                ("attn_v.bias", "self_attn.v_proj.bias"),
                ("attn_output.weight", "self_attn.dense.weight"),
                ("attn_output.bias", "self_attn.dense.bias"),
                ("ffn_up.weight", "mlp.fc1.weight"),
                ("ffn_up.bias", "mlp.fc1.bias"),
                ("ffn_down.weight", "mlp.fc2.weight"),
                ("ffn_down.bias", "mlp.fc2.bias"),
            ],
            permuted: &[],
        })
    }

    fn gguf_config(&self, file: &GgufFile, cfg: &mut Value) -> Result<(), GgufError> {
        let m = file.metadata();
        if let Some(eps) = m
            .get("phi2.attention.layer_norm_epsilon")
            .and_then(|v| v.as_f64())
        {
            cfg["layer_norm_eps"] = json!(eps);
        }
        if let Some(n) = m.get("phi2.rope.dimension_count").and_then(|v| v.as_u64()) {
            let h = cfg["hidden_size"].as_u64().unwrap_or(1) as f64;
            let heads = cfg["num_attention_heads"].as_u64().unwrap_or(1) as f64;
            cfg["partial_rotary_factor"] = json!(n as f64 * heads / h);
        }
        cfg["hidden_act"] = json!("gelu_new");
        Ok(())
    }

    fn gguf_export(&self, c: &ModelConfig, file_type: u32) -> Option<ArchMeta> {
        use MetaValue::{Bool, F32, U32};
        let u = |v: usize| U32(v as u32);
        let rope_dims =
            (c.partial_rotary_factor * c.hidden_size as f64) as usize / c.num_attention_heads;
        // The converter writes 4·hidden for the MLP width (Phi-2's own); the config's value is
        // written instead, which is the same for every Phi-2 and right for any other.
        let hparams = vec![
            kv("phi2.context_length", u(c.max_position_embeddings)),
            kv("phi2.embedding_length", u(c.hidden_size)),
            kv("phi2.feed_forward_length", u(c.intermediate_size)),
            kv("phi2.block_count", u(c.num_hidden_layers)),
            kv("phi2.attention.head_count", u(c.num_attention_heads)),
            kv("phi2.attention.head_count_kv", u(c.num_key_value_heads)),
            kv("phi2.attention.layer_norm_epsilon", F32(c.norm_eps as f32)),
            kv("phi2.rope.dimension_count", u(rope_dims)),
            kv("general.file_type", U32(file_type)),
            kv("tokenizer.ggml.add_bos_token", Bool(false)),
        ];
        Some(ArchMeta {
            early: vec![],
            hparams,
            tensors: vec![],
        })
    }
}

#[derive(Module, Debug)]
pub struct Phi2Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub dense: Linear,
    #[module(skip)]
    pub heads: usize,
    #[module(skip)]
    pub kv_heads: usize,
}

#[derive(Module, Debug)]
pub struct Phi2Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    /// gelu_new / gelu_pytorch_tanh use the tanh form; plain gelu the erf form.
    #[module(skip)]
    pub tanh_gelu: bool,
}

#[derive(Module, Debug)]
pub struct Phi2Layer {
    pub self_attn: Phi2Attention,
    pub mlp: Phi2Mlp,
    /// A LayerNorm, or an RMSNorm after norm surgery.
    pub input_layernorm: Norm,
}

impl Block for Phi2Layer {
    block_listing!(
        linears: [
            self_attn.q_proj,
            self_attn.k_proj,
            self_attn.v_proj,
            self_attn.dense,
            mlp.fc1,
            mlp.fc2,
        ],
        norms: [input_layernorm]
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
        let qkv = Projected::Split(
            a.q_proj.forward(normed.clone()),
            a.k_proj.forward(normed.clone()),
            a.v_proj.forward(normed.clone()),
        );
        let attn = a
            .dense
            .forward(rotary_attention(qkv, a.heads, a.kv_heads, ctx, cache));
        let f = self.mlp.fc1.forward(normed);
        let f = if self.mlp.tanh_gelu {
            gelu_approximate(f)
        } else {
            gelu(f)
        };
        x + attn + self.mlp.fc2.forward(f)
    }
}
