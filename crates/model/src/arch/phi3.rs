//! Phi-3 / Phi-3.5: a Llama block whose q/k/v and gate/up projections are fused, as the HF
//! checkpoints store them (`qkv_proj` rows [q | k | v], `gate_up_proj` rows [gate | up]).

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::nn::{load_norm_pair, rotary_attention, LayerCache, LayerCtx, Linear, RmsNorm};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use phi_kernels::swiglu_packed;

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
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl Phi3Layer {
    pub fn load(
        src: &dyn TensorSource,
        p: &str,
        c: &ModelConfig,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let qd = c.num_attention_heads * d;
        let qkv = qd + 2 * c.num_key_value_heads * d;
        let i = c.intermediate_size;
        let ab = c.attention_bias;
        let (input_layernorm, post_attention_layernorm) =
            load_norm_pair(src, p, h, c.norm_eps, device)?;
        let lin = |name: &str, di, dout, b| {
            Linear::load(src, &format!("{p}.{name}"), di, dout, b, device)
        };
        Ok(Phi3Layer {
            self_attn: Phi3Attention {
                qkv_proj: lin("self_attn.qkv_proj", h, qkv, ab)?,
                o_proj: lin("self_attn.o_proj", qd, h, ab)?,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
            },
            mlp: Phi3Mlp {
                gate_up_proj: lin("mlp.gate_up_proj", h, 2 * i, c.mlp_bias)?,
                down_proj: lin("mlp.down_proj", i, h, c.mlp_bias)?,
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
        let qkv = a.qkv_proj.forward(normed);
        let [b, t, n] = qkv.dims();
        let d = n / (a.heads + 2 * a.kv_heads);
        let (qd, kvd) = (a.heads * d, a.kv_heads * d);
        let parts = (
            qkv.clone().slice([0..b, 0..t, 0..qd]),
            qkv.clone().slice([0..b, 0..t, qd..qd + kvd]),
            qkv.slice([0..b, 0..t, qd + kvd..n]),
        );
        let h = x + a
            .o_proj
            .forward(rotary_attention(parts, a.heads, a.kv_heads, ctx, cache));
        let normed = self.post_attention_layernorm.forward(h.clone());
        taps.post_attention_layernorm(&normed);
        let gu = self.mlp.gate_up_proj.forward(normed);
        h + self.mlp.down_proj.forward(swiglu_packed(gu))
    }
}
