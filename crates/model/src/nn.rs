//! Building blocks shared by the architectures: HF-layout linear layers, norms, attention with
//! GQA and a KV cache, and the host-side helpers that turn checkpoint tensors into params.

use crate::error::ModelError;
use crate::lowrank::LowRank;
use crate::precision::{self, to_compute, to_f32};
use crate::weights::{HostTensor, LinearWeight, TensorSource};
use burn::module::{Module, Param};
use burn::tensor::module::{attention, layer_norm, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};
use phi_kernels as fused;
use phi_kernels::bf16::Path;
use phi_kernels::packed::PackedWeight;
use phi_kernels::rotary::{Heads, Rotary};
use std::sync::Arc;

pub fn param1(t: HostTensor, device: &Device) -> Param<Tensor<1>> {
    let n = t.data.len();
    Param::from_tensor(Tensor::from_data(TensorData::new(t.data, [n]), device))
}

pub fn param2(t: HostTensor, device: &Device) -> Param<Tensor<2>> {
    let shape = [t.shape[0], t.shape[1]];
    Param::from_tensor(Tensor::from_data(TensorData::new(t.data, shape), device))
}

/// Row-major [rows, cols] → [cols, rows] on the host, so the device copy is contiguous.
pub fn transpose_host(t: &HostTensor) -> HostTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut out = vec![0.0f32; r * c];
    for i in 0..r {
        let row = &t.data[i * c..(i + 1) * c];
        for (j, v) in row.iter().enumerate() {
            out[j * r + i] = *v;
        }
    }
    HostTensor {
        shape: vec![c, r],
        data: out,
    }
}

/// A linear layer. The weight is kept as [in, out] (Burn's layout, so the forward is one
/// matmul with no transpose); checkpoints and PEFT use [out, in] and are transposed at the
/// boundary.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    /// An adapter's side path (see `lowrank`); None for a plain layer.
    pub lora: Option<LowRank>,
    /// The frozen weight in the form its products read: bf16 panels for the CPU's matrix
    /// units (`--bf16`), or a quantized base's blocks; the f32 weight is then an empty [0, 0]
    /// tensor (see `f32_dropped`).
    #[module(skip)]
    pub packed: Option<Arc<PackedWeight>>,
    /// Set by `--bf16` on a trainable weight: its products run on this bf16 path, the weight
    /// rounded and packed per call from its f32 master.
    #[module(skip)]
    pub train_bf16: Option<Path>,
}

/// A quantized weight as f32, for a device without our block kernels (they run on the CPU
/// backend only): said once per process.
fn widened(q: phi_kernels::quant::QuantWeight) -> LinearWeight {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "base: {} weights widened to f32 on this device (the quantized products are CPU kernels)",
            q.ty.name()
        )
    });
    LinearWeight::F32(HostTensor {
        shape: vec![q.d_out, q.d_in],
        data: q.dequantize(),
    })
}

impl Linear {
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let w = src.load_linear(&format!("{prefix}.weight"), d_out, d_in)?;
        let bias = if bias {
            Some(param1(
                src.load_shaped(&format!("{prefix}.bias"), &[d_out])?,
                device,
            ))
        } else {
            None
        };
        let w = match w {
            LinearWeight::Quant(q) if !phi_kernels::on_flex(device) => widened(q),
            w => w,
        };
        let (weight, packed) = match w {
            LinearWeight::F32(w) => (param2(transpose_host(&w), device), None),
            // Held only in its blocks, f32 slot empty (as a `--bf16` packing); products in f32
            // until `pack_bf16` moves them to the matrix units.
            LinearWeight::Quant(q) => (
                Param::from_tensor(Tensor::zeros([0, 0], device)),
                Some(Arc::new(PackedWeight::quantized(q, None))),
            ),
            LinearWeight::Packed(w) => (
                Param::from_tensor(Tensor::zeros([0, 0], device)),
                Some(Arc::new(w)),
            ),
        };
        Ok(Linear {
            weight,
            bias,
            lora: None,
            packed,
            train_bf16: None,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // A weight that trains again (after `pack_bf16`) must get its gradient: f32 path,
        // where there still is an f32 weight (`pack_bf16` again restores it).
        let packed = self.frozen_bf16();
        // A dropped f32 weight has only this path (PHI_FUSED=0 included).
        if let Some(w) = packed.filter(|_| fused::fusable(&x) || self.f32_dropped()) {
            let y = match &self.lora {
                Some(l) if fused::fusable(&x) => {
                    let xd = (l.dropout.prob > 0.0).then(|| l.dropout.forward(x.clone()));
                    fused::frozen_lora_linear(x, xd, w, l.a.val(), l.b.val(), l.scale)
                }
                Some(l) => fused::frozen_linear(x.clone(), w) + l.forward(x),
                None => fused::frozen_linear(x, w),
            };
            return match &self.bias {
                Some(b) => y + b.val().unsqueeze(),
                None => y,
            };
        }
        let trains = self.weight.is_require_grad() && self.lora.is_none();
        if let Some(path) = self.train_bf16.filter(|_| trains && fused::fusable(&x)) {
            let y = fused::bf16_train_linear(x, self.weight.val(), false, path);
            return match &self.bias {
                Some(b) => y + b.val().unsqueeze(),
                None => y,
            };
        }
        if precision::compute_dtype().is_some() {
            return self.forward_autocast(x);
        }
        let bias = self.bias.as_ref().map(|b| b.val());
        match &self.lora {
            Some(l) if fused::fusable(&x) => {
                let xd = (l.dropout.prob > 0.0).then(|| l.dropout.forward(x.clone()));
                let (w, a, b) = (self.weight.val(), l.a.val(), l.b.val());
                let y = fused::lora_linear(x, xd, w, a, b, l.scale);
                match bias {
                    Some(b) => y + b.unsqueeze(),
                    None => y,
                }
            }
            Some(l) => linear(x.clone(), self.weight.val(), bias) + l.forward(x),
            None if fused::fusable(&x) => {
                let y = fused::linear(x, self.weight.val());
                match bias {
                    Some(b) => y + b.unsqueeze(),
                    None => y,
                }
            }
            None => linear(x, self.weight.val(), bias),
        }
    }

    /// The same in the autocast dtype, returning f32.
    fn forward_autocast<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = to_compute(x);
        let y = linear(
            x.clone(),
            to_compute(self.weight.val()),
            self.bias.as_ref().map(|b| to_compute(b.val())),
        );
        // The sum in f32: a small adapter term added to the base output in bf16 would mostly
        // round away (8 bits of mantissa).
        match &self.lora {
            Some(l) => to_f32(y) + to_f32(l.forward(x)),
            None => to_f32(y),
        }
    }

    /// Whether its products run on the CPU's bf16 kernels (`--bf16`): its outputs are then
    /// sums of bf16 products, which the ops after it may keep in bf16 for their backward.
    pub fn on_bf16_kernels(&self) -> bool {
        self.train_bf16.is_some() || self.packed.as_ref().is_some_and(|w| w.path.is_some())
    }

    pub fn d_in(&self) -> usize {
        match &self.packed {
            Some(w) => w.d_in(),
            None => self.weight.val().dims()[0],
        }
    }

    pub fn d_out(&self) -> usize {
        match &self.packed {
            Some(w) => w.d_out(),
            None => self.weight.val().dims()[1],
        }
    }

    /// Whether the weight lives only in its bf16 packing (`CausalLm::pack_bf16`), its f32
    /// slot left empty.
    pub fn f32_dropped(&self) -> bool {
        self.packed
            .as_ref()
            .is_some_and(|w| self.f32_dropped_with(w))
    }

    /// The bf16 packing `forward` multiplies by alone (frozen, no adapter, no bias): what a
    /// head fused with its loss can read.
    pub fn plain_bf16(&self) -> Option<&Arc<PackedWeight>> {
        let plain = self.lora.is_none() && self.bias.is_none();
        self.frozen_bf16().filter(|_| plain)
    }

    /// The packing `forward` multiplies by: the weight is frozen, or lives only there.
    fn frozen_bf16(&self) -> Option<&Arc<PackedWeight>> {
        let frozen = !self.weight.is_require_grad() || self.f32_dropped();
        self.packed.as_ref().filter(|_| frozen)
    }

    /// `f32_dropped` for a packing taken out of `bf16`.
    pub(crate) fn f32_dropped_with(&self, w: &PackedWeight) -> bool {
        self.weight.val().dims() == [0, 0] && w.d_in() * w.d_out() > 0
    }
}

#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let w = src.load_shaped(&format!("{prefix}.weight"), &[dim])?;
        Ok(RmsNorm {
            weight: param1(w, device),
            eps,
        })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        fused::rms_norm(x, self.weight.val(), self.eps)
    }
}

#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(LayerNorm {
            weight: param1(
                src.load_shaped(&format!("{prefix}.weight"), &[dim])?,
                device,
            ),
            bias: param1(src.load_shaped(&format!("{prefix}.bias"), &[dim])?, device),
            eps,
        })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        layer_norm(x, self.weight.val(), Some(self.bias.val()), self.eps)
    }
}

/// A norm slot: the architecture's RMSNorm, or its LayerNorm (Phi-2), which norm surgery may
/// have turned into an RMSNorm; either keeps the HF name of the slot, so freeze masks, exports
/// and taps see no difference.
/// Which norm a slot holds, with its eps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    Layer(f64),
    Rms(f64),
}

#[derive(Module, Debug)]
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        dim: usize,
        kind: NormKind,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(match kind {
            NormKind::Layer(eps) => Norm::Layer(LayerNorm::load(src, prefix, dim, eps, device)?),
            NormKind::Rms(eps) => Norm::Rms(RmsNorm::load(src, prefix, dim, eps, device)?),
        })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }

    pub fn weight(&self) -> &Param<Tensor<1>> {
        match self {
            Norm::Layer(n) => &n.weight,
            Norm::Rms(n) => &n.weight,
        }
    }

    pub fn bias(&self) -> Option<&Param<Tensor<1>>> {
        match self {
            Norm::Layer(n) => Some(&n.bias),
            Norm::Rms(_) => None,
        }
    }

    /// `layernorm` or `rmsnorm`, for summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            Norm::Layer(_) => "layernorm",
            Norm::Rms(_) => "rmsnorm",
        }
    }

    /// The RMSNorm surgery of one slot: the LayerNorm's weight (same parameter) with `eps`,
    /// its bias dropped. Returns whether anything changed.
    pub fn make_rms(&mut self, eps: f64) -> bool {
        let Norm::Layer(n) = self else {
            return false;
        };
        *self = Norm::Rms(RmsNorm {
            weight: n.weight.clone(),
            eps,
        });
        true
    }
}

/// Keys and values already seen, per layer, stored before GQA expansion.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub kv: Option<(Tensor<4>, Tensor<4>)>,
}

/// What every layer of one forward call shares: rotary tables and the attention mask.
pub struct LayerCtx {
    /// [B or 1, 1, T, rot] for the positions of this call.
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
    /// The same tables on the host, for the fused attention.
    pub rope: Arc<Rotary>,
    /// [B, 1, T, S] with true = masked out; None means plain causal attention.
    pub mask: Option<Tensor<4, Bool>>,
    /// The same mask on the host, for the fused attention.
    pub hidden: Option<Arc<Vec<bool>>>,
    /// Training on a GPU: the mask (or plain causality) as the additive bias
    /// `phi_kernels::attention_with_bias` takes, built once for all layers.
    pub bias: Option<Tensor<4>>,
    /// `--bf16` on a CPU with bf16 units: the kernel path of the fused attention's products.
    pub bf16: Option<phi_kernels::bf16::Path>,
}

/// HF's rotate-half RoPE on the first `rot` dims of each head.
pub fn apply_rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let rot = cos.dims()[3];
    let half = rot / 2;
    let (x_rot, x_pass) = if rot == d {
        (x, None)
    } else {
        (
            x.clone().slice([0..b, 0..h, 0..t, 0..rot]),
            Some(x.slice([0..b, 0..h, 0..t, rot..d])),
        )
    };
    let x1 = x_rot.clone().slice([0..b, 0..h, 0..t, 0..half]);
    let x2 = x_rot.clone().slice([0..b, 0..h, 0..t, half..rot]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let out = x_rot * cos.clone() + rotated * sin.clone();
    match x_pass {
        None => out,
        Some(p) => Tensor::cat(vec![out, p], 3),
    }
}

/// Scaled dot-product attention over [B, heads, T, d] queries and [B, kv, S, d] keys/values,
/// appending to the cache first. Returns [B, T, heads·d].
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    ctx: &LayerCtx,
    cache: Option<&mut LayerCache>,
) -> Tensor<3> {
    let (k, v) = match cache {
        Some(c) => {
            let (k, v) = match c.kv.take() {
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                None => (k, v),
            };
            c.kv = Some((k.clone(), v.clone()));
            (k, v)
        }
        None => (k, v),
    };
    let [b, h, t, d] = q.dims();
    let kv_heads = k.dims()[1];
    let s = k.dims()[2];
    let scale = 1.0 / (d as f64).sqrt();
    // On a GPU only under autodiff: there the composed op keeps [B, H, T, S] for the backward;
    // without it Burn's own attention kernel runs.
    let gpu_training = fused::kernel_path(&q) == fused::KernelPath::Gpu && q.is_autodiff();
    if let (true, Some(bias)) = (gpu_training, &ctx.bias) {
        return grouped(q, k, v, |q, k, v| {
            fused::attention_with_bias(q, k, v, bias, scale)
        });
    }
    if ctx.mask.is_none() && (fused::fusable(&q) || gpu_training) {
        let offset = s - t;
        return grouped(q, k, v, |q, k, v| {
            fused::causal_attention(q, k, v, scale, t, offset)
        });
    }
    let (k, v) = if kv_heads == h {
        (k, v)
    } else {
        // repeat_kv: kv head j serves query heads j·g .. j·g+g-1.
        let g = h / kv_heads;
        let rep = |x: Tensor<4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kv_heads, g, s, d])
                .reshape([b, h, s, d])
        };
        (rep(k), rep(v))
    };
    let options = AttentionModuleOptions {
        scale: Some(scale),
        softcap: None,
        is_causal: ctx.mask.is_none(),
    };
    let mask = ctx.mask.clone().map(|m| m.expand([b, h, t, s]));
    let out = attention(q, k, v, mask, None, options);
    out.swap_dims(1, 2).reshape([b, t, h * d])
}

/// Attention with each kv head's g query heads stacked as one [g·T, d] block, so GQA needs no
/// repeated k/v, in one fused op `op` (Burn's `attention` under autodiff is matmul + a
/// composed softmax that keeps every intermediate of [B, H, T, S]).
fn grouped(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    op: impl FnOnce(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
) -> Tensor<3> {
    let [b, h, t, d] = q.dims();
    let kv = k.dims()[1];
    let q = q.reshape([b, kv, h / kv * t, d]);
    op(q, k, v)
        .reshape([b, h, t, d])
        .swap_dims(1, 2)
        .reshape([b, t, h * d])
}

/// What the attention projections gave: q, k, v [B, T, heads·d] apart, or one fused
/// [B, T, (heads + 2·kv_heads)·d] (Phi-3's `qkv_proj`).
#[allow(clippy::large_enum_variant)] // built and taken apart once a layer call
pub enum Projected {
    Split(Tensor<3>, Tensor<3>, Tensor<3>),
    Fused(Tensor<3>),
}

/// Projected q/k/v → heads, rotary on q and k, attention: [B, T, heads·d].
pub fn rotary_attention(
    qkv: Projected,
    heads: usize,
    kv_heads: usize,
    ctx: &LayerCtx,
    cache: Option<&mut LayerCache>,
) -> Tensor<3> {
    let fused_qkv = matches!(qkv, Projected::Fused(_));
    let (q, k, v, start) = match qkv {
        Projected::Split(q, k, v) => (q, k, v, [0; 3]),
        Projected::Fused(qkv) => {
            let n = qkv.dims()[2];
            let d = n / (heads + 2 * kv_heads);
            let start = [0, heads * d, (heads + kv_heads) * d];
            (qkv.clone(), qkv.clone(), qkv, start)
        }
    };
    let [b, t, _] = q.dims();
    let d = match fused_qkv {
        true => start[1] / heads,
        false => q.dims()[2] / heads,
    };
    // Training (no cache) runs as one fused op, which also takes a fused qkv whole: no
    // slices, transposes or RoPE passes, forward or back. It reads the host mask, so a
    // context with only the tensor one takes the composed path.
    let host_mask = ctx.mask.is_some() == ctx.hidden.is_some();
    if cache.is_none() && host_mask && fused::fusable(&q) && ctx.rope.t == t {
        let layout = Heads {
            heads,
            kv_heads,
            d,
            width: [&q, &k, &v].map(|x| x.dims()[2]),
            start,
            bf16: ctx.bf16,
        };
        let scale = 1.0 / (d as f64).sqrt();
        return fused::rotary_attention(q, k, v, layout, &ctx.rope, ctx.hidden.as_ref(), scale);
    }
    let part = |x: Tensor<3>, i: usize, count: usize| match fused_qkv {
        true => x.slice([0..b, 0..t, start[i]..start[i] + count * d]),
        false => x,
    };
    let q = apply_rotary(split_heads(part(q, 0, heads), heads), &ctx.cos, &ctx.sin);
    let k = apply_rotary(
        split_heads(part(k, 1, kv_heads), kv_heads),
        &ctx.cos,
        &ctx.sin,
    );
    attend(
        q,
        k,
        split_heads(part(v, 2, kv_heads), kv_heads),
        ctx,
        cache,
    )
}

/// The two norms of a pre-norm block, under their HF names.
pub fn load_norm_pair(
    src: &dyn TensorSource,
    prefix: &str,
    dim: usize,
    kind: NormKind,
    device: &Device,
) -> Result<(Norm, Norm), ModelError> {
    let load = |name: &str| Norm::load(src, &format!("{prefix}.{name}"), dim, kind, device);
    Ok((load("input_layernorm")?, load("post_attention_layernorm")?))
}

/// [B, T, heads·d] → [B, heads, T, d].
pub fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, t, hd] = x.dims();
    x.reshape([b, t, heads, hd / heads]).swap_dims(1, 2)
}
