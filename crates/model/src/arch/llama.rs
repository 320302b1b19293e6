//! Llama (and Mistral): separate q/k/v projections with GQA, SwiGLU MLP, pre-norm RMSNorm.

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::nn::{load_norm_pair, rotary_attention, LayerCache, LayerCtx, Linear, RmsNorm};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use phi_kernels::swiglu;

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
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl LlamaLayer {
    pub fn load(
        src: &dyn TensorSource,
        p: &str,
        c: &ModelConfig,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let ab = c.attention_bias;
        let (input_layernorm, post_attention_layernorm) =
            load_norm_pair(src, p, h, c.norm_eps, device)?;
        let lin = |name: &str, i, o, b| Linear::load(src, &format!("{p}.{name}"), i, o, b, device);
        Ok(LlamaLayer {
            self_attn: LlamaAttention {
                q_proj: lin("self_attn.q_proj", h, qd, ab)?,
                k_proj: lin("self_attn.k_proj", h, kvd, ab)?,
                v_proj: lin("self_attn.v_proj", h, kvd, ab)?,
                o_proj: lin("self_attn.o_proj", qd, h, ab)?,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
            },
            mlp: LlamaMlp {
                gate_proj: lin("mlp.gate_proj", h, c.intermediate_size, c.mlp_bias)?,
                up_proj: lin("mlp.up_proj", h, c.intermediate_size, c.mlp_bias)?,
                down_proj: lin("mlp.down_proj", c.intermediate_size, h, c.mlp_bias)?,
            },
            input_layernorm,
            post_attention_layernorm,
        })
    }

    pub fn forward(
        &self,
        x: Tensor<3>,
        ctx: &LayerCtx,
        cache: Option<&mut LayerCache>,
        taps: &mut LayerTaps,
    ) -> Tensor<3> {
        let a = &self.self_attn;
        let normed = self.input_layernorm.forward(x.clone());
        taps.input_layernorm(&normed);
        let qkv = (
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
        let act = swiglu(
            m.gate_proj.forward(normed.clone()),
            m.up_proj.forward(normed),
        );
        h + m.down_proj.forward(act)
    }
}
