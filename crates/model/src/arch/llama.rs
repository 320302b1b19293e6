//! Llama (and Mistral): separate q/k/v projections with GQA, SwiGLU MLP, pre-norm RMSNorm.
//! Qwen2 reuses this block with its own biases.

use super::{block_listing, Architecture, Block, DecoderLayer, LinearSpec, Linears, Mlp};
use crate::config::ModelConfig;
use crate::config::RopeScaling;
use crate::error::ModelError;
use crate::gguf::{GgufError, GgufFile, GgufLayout};
use crate::gguf_export::{kv, ArchMeta};
use crate::gguf_write::MetaValue;
use crate::nn::{load_norm_pair, rotary_attention, LayerCache, LayerCtx, Linear, Norm, Projected};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use phi_kernels::swiglu_saving;
use serde_json::{json, Value};

#[derive(Debug)]
pub struct Llama;

impl Architecture for Llama {
    fn classes(&self) -> &'static [&'static str] {
        // Mistral is this block with a sliding window, which the config carries.
        &["LlamaForCausalLM", "MistralForCausalLM"]
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["llama", "mistral"]
    }

    fn layer_linears(&self, c: &ModelConfig) -> Vec<LinearSpec> {
        let ab = c.attention_bias;
        linears(c, [ab, ab, ab, ab], c.mlp_bias)
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

    fn gguf(&self) -> Option<GgufLayout> {
        Some(GgufLayout {
            name: "llama",
            class: self.classes()[0],
            fixed: crate::gguf::LLAMA_FIXED,
            layer_tensors: &[
                ("attn_norm.weight", "input_layernorm.weight"),
                ("ffn_norm.weight", "post_attention_layernorm.weight"),
                ("attn_q.weight", "self_attn.q_proj.weight"),
                ("attn_k.weight", "self_attn.k_proj.weight"),
                ("attn_v.weight", "self_attn.v_proj.weight"),
                ("attn_output.weight", "self_attn.o_proj.weight"),
                ("ffn_gate.weight", "mlp.gate_proj.weight"),
                ("ffn_up.weight", "mlp.up_proj.weight"),
                ("ffn_down.weight", "mlp.down_proj.weight"),
            ],
            permuted: &[
                ("self_attn.q_proj.weight", "attention.head_count"),
                ("self_attn.k_proj.weight", "attention.head_count_kv"),
            ],
        })
    }

    fn gguf_config(&self, file: &GgufFile, cfg: &mut Value) -> Result<(), GgufError> {
        let m = file.metadata();
        let heads = cfg["num_attention_heads"].as_u64().unwrap_or(1);
        let dim = match m.get("llama.attention.key_length").and_then(|v| v.as_u64()) {
            Some(d) => {
                cfg["head_dim"] = json!(d);
                d
            }
            None => cfg["hidden_size"].as_u64().unwrap_or(0) / heads,
        } as usize;
        if let Some(stored) = file.gguf_tensor_f32("rope_freqs.weight")? {
            let theta = cfg["rope_theta"].as_f64().unwrap_or(10000.0);
            let s = Llama3::from_factors(&stored, theta, dim).ok_or_else(|| {
                file.err(
                    "tensor rope_freqs.weight: matches no Llama-3 rope scaling (original \
                     context 2..2^20, frequency factors 1-4 / 2-32)",
                )
            })?;
            cfg["rope_scaling"] = json!({
                "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low,
                "high_freq_factor": s.high, "original_max_position_embeddings": s.old,
            });
        }
        Ok(())
    }

    fn gguf_export(&self, c: &ModelConfig, file_type: u32) -> Option<ArchMeta> {
        use MetaValue::{F32, U32};
        if matches!(c.rope_scaling, RopeScaling::LongRope { .. }) {
            return None;
        }
        let u = |v: usize| U32(v as u32);
        let hparams = vec![
            kv("llama.block_count", u(c.num_hidden_layers)),
            kv("llama.context_length", u(c.max_position_embeddings)),
            kv("llama.embedding_length", u(c.hidden_size)),
            kv("llama.feed_forward_length", u(c.intermediate_size)),
            kv("llama.attention.head_count", u(c.num_attention_heads)),
            kv("llama.attention.head_count_kv", u(c.num_key_value_heads)),
            kv("llama.rope.freq_base", F32(c.rope_theta as f32)),
            kv(
                "llama.attention.layer_norm_rms_epsilon",
                F32(c.norm_eps as f32),
            ),
            kv("llama.attention.key_length", u(c.head_dim)),
            kv("llama.attention.value_length", u(c.head_dim)),
            kv("general.file_type", U32(file_type)),
            kv("llama.vocab_size", u(c.vocab_size)),
            kv("llama.rope.dimension_count", u(c.head_dim)),
        ];
        let tensors = match &c.rope_scaling {
            RopeScaling::Llama3 { .. } => vec![("rope_freqs.weight".into(), llama3_factors(c))],
            _ => vec![],
        };
        Some(ArchMeta {
            early: vec![],
            hparams,
            tensors,
        })
    }
}

/// The block's linears with biases on q, k, v, o (in that order) and on the MLP as given.
pub fn linears(c: &ModelConfig, qkvo_bias: [bool; 4], mlp_bias: bool) -> Vec<LinearSpec> {
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (qd, kvd) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let spec = |name, d_in, d_out, bias| LinearSpec {
        name,
        d_in,
        d_out,
        bias,
    };
    let [qb, kb, vb, ob] = qkvo_bias;
    vec![
        spec("self_attn.q_proj", h, qd, qb),
        spec("self_attn.k_proj", h, kvd, kb),
        spec("self_attn.v_proj", h, kvd, vb),
        spec("self_attn.o_proj", qd, h, ob),
        spec("mlp.gate_proj", h, i, mlp_bias),
        spec("mlp.up_proj", h, i, mlp_bias),
        spec("mlp.down_proj", i, h, mlp_bias),
    ]
}

#[derive(Module, Debug)]
pub struct LlamaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    #[module(skip)]
    pub heads: usize,
    #[module(skip)]
    pub kv_heads: usize,
}

#[derive(Module, Debug)]
pub struct LlamaMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct LlamaLayer {
    pub self_attn: LlamaAttention,
    pub mlp: LlamaMlp,
    pub input_layernorm: Norm,
    pub post_attention_layernorm: Norm,
}

impl LlamaLayer {
    /// The layer at `p` with the linears `specs` lists (their biases differ by architecture).
    pub fn load(
        src: &dyn TensorSource,
        p: &str,
        c: &ModelConfig,
        specs: &[LinearSpec],
        device: &Device,
    ) -> Result<Self, ModelError> {
        let mut lin = Linears::load(src, p, specs, device)?;
        let (input_layernorm, post_attention_layernorm) =
            load_norm_pair(src, p, c.hidden_size, c.norm_kind(), device)?;
        Ok(LlamaLayer {
            self_attn: LlamaAttention {
                q_proj: lin.take("self_attn.q_proj"),
                k_proj: lin.take("self_attn.k_proj"),
                v_proj: lin.take("self_attn.v_proj"),
                o_proj: lin.take("self_attn.o_proj"),
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
            },
            mlp: LlamaMlp {
                gate_proj: lin.take("mlp.gate_proj"),
                up_proj: lin.take("mlp.up_proj"),
                down_proj: lin.take("mlp.down_proj"),
            },
            input_layernorm,
            post_attention_layernorm,
        })
    }
}

impl Block for LlamaLayer {
    block_listing!(
        linears: [
            self_attn.q_proj,
            self_attn.k_proj,
            self_attn.v_proj,
            self_attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        ],
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
        let qkv = Projected::Split(
            a.q_proj.forward(normed.clone()),
            a.k_proj.forward(normed.clone()),
            a.v_proj.forward(normed),
        );
        let h = x + a
            .o_proj
            .forward(rotary_attention(qkv, a.heads, a.kv_heads, ctx, cache));
        let normed = self.post_attention_layernorm.forward(h.clone());
        taps.post_attention_layernorm(&normed);
        let m = &self.mlp;
        let bf16 = m.gate_proj.on_bf16_kernels() && m.up_proj.on_bf16_kernels();
        let act = swiglu_saving(
            m.gate_proj.forward(normed.clone()),
            m.up_proj.forward(normed),
            bf16,
        );
        h + m.down_proj.forward(act)
    }
}

/// The converter's `rope_freqs` for Llama-3 scaling: per rotary pair, the factor its frequency
/// is divided by (1 for short wavelengths, `factor` for long ones, a blend between), in f32
/// throughout as its torch arithmetic runs (Python's constants rounded to f32 first).
fn llama3_factors(c: &ModelConfig) -> Vec<f32> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = c.rope_scaling
    else {
        return vec![];
    };
    let s = Llama3 {
        factor,
        low: low_freq_factor,
        high: high_freq_factor,
        old: original_max_position_embeddings,
    };
    s.factors(c.rope_theta, c.head_dim)
}

/// Llama-3 rope scaling's parameters.
struct Llama3 {
    factor: f64,
    low: f64,
    high: f64,
    old: usize,
}

impl Llama3 {
    fn factors(&self, theta: f64, dim: usize) -> Vec<f32> {
        let Llama3 {
            factor,
            low,
            high,
            old,
        } = *self;
        let base = theta as f32;
        let (low_wl, high_wl) = ((old as f64 / low) as f32, (old as f64 / high) as f32);
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        (0..dim / 2)
            .map(|i| {
                let f = 1.0 / base.powf((2 * i) as f32 / dim as f32);
                let wl = two_pi / f;
                if wl < high_wl {
                    1.0
                } else if wl > low_wl {
                    factor as f32
                } else {
                    let smooth = (old as f32 / wl - low as f32) / ((high - low) as f32);
                    1.0 / ((1.0 - smooth) / factor as f32 + smooth)
                }
            })
            .collect()
    }

    /// The parameters that give `stored` (a GGUF's rope_freqs, which keeps only the factors):
    /// searched over the values Llama-3 models use and their neighbours, exact to the bit.
    fn from_factors(stored: &[f32], theta: f64, dim: usize) -> Option<Llama3> {
        let factor = stored.iter().fold(1f32, |m, &v| m.max(v)) as f64;
        for p in 1..=20 {
            for low in [1.0, 2.0, 4.0] {
                for high in [2.0, 4.0, 8.0, 16.0, 32.0] {
                    let s = Llama3 {
                        factor,
                        low,
                        high,
                        old: 1 << p,
                    };
                    if high > low && s.factors(theta, dim) == stored {
                        return Some(s);
                    }
                }
            }
        }
        None
    }
}
