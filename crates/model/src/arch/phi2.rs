//! Phi-2: one LayerNorm per block feeding attention and MLP in parallel, partial rotary,
//! gelu_new, biases everywhere, and `dense` as the attention output projection.

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::nn::{rotary_attention, LayerCache, LayerCtx, Linear, Norm};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::{Device, Tensor};

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

impl Phi2Layer {
    pub fn load(
        src: &dyn TensorSource,
        p: &str,
        c: &ModelConfig,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let lin = |name: &str, i, o| Linear::load(src, &format!("{p}.{name}"), i, o, true, device);
        Ok(Phi2Layer {
            self_attn: Phi2Attention {
                q_proj: lin("self_attn.q_proj", h, qd)?,
                k_proj: lin("self_attn.k_proj", h, kvd)?,
                v_proj: lin("self_attn.v_proj", h, kvd)?,
                dense: lin("self_attn.dense", qd, h)?,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
            },
            mlp: Phi2Mlp {
                fc1: lin("mlp.fc1", h, c.intermediate_size)?,
                fc2: lin("mlp.fc2", c.intermediate_size, h)?,
                tanh_gelu: c.hidden_act != "gelu",
            },
            input_layernorm: Norm::load(src, &format!("{p}.input_layernorm"), h, c, device)?,
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
