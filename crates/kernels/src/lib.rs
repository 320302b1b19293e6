//! Fused ops for the training step's memory-bound parts (issue 6's profile): silu(gate)·up,
//! the causal attention softmax and the causal-LM cross-entropy. Composed from Burn ops each
//! of these is 4–8 passes over a large tensor forward and as many backward, with every
//! intermediate kept for the backward; fused, each is one pass forward and one backward, with
//! a vectorised exp, keeping only its inputs (or the softmax output).
//!
//! They are a Burn backend extension implemented for Flex (the CPU backend) and for
//! Autodiff<Flex> with hand-written backward passes. With `--features vulkan` (or `cuda`)
//! SwiGLU, RMSNorm, the cross-entropy and attention also run on Burn's CubeCL backends
//! (src/cube/). Other backends, other dtypes and the other ops there take the composed path,
//! which is also the reference the tests compare against.
//! `PHI_FUSED=0` turns the fused path off (for benchmarks).

pub mod adam8;
mod attention;
mod attention_blocks;
mod autodiff;
pub mod bf16;
#[cfg(feature = "cube")]
mod cube;
mod head_loss;
pub mod kernels;
mod matmul;
mod norm;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod rotary;
pub mod thin;

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, DispatchDevice, Flex, TensorMetadata};
use burn::tensor::{DType, Device, Tensor, TensorData};
use kernels::{Causal, Layout};
use matmul::matmul;
use packed::PackedWeight;
use rotary::{Heads, Rotary};
use std::sync::Arc;

#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// silu(gate)·up over two tensors of one shape. With `bf16_saved` the backward reads
    /// gate and up rounded to bf16 (what autocast keeps of a bf16 product's outputs), kept at
    /// half the bytes of the f32 inputs.
    fn swiglu_pair(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        bf16_saved: bool,
    ) -> FloatTensor<Self>;
    /// silu(gate)·up where each row of `gate_up` is gate then up: [.., 2w] → [.., w].
    fn swiglu_packed(gate_up: FloatTensor<Self>, bf16_saved: bool) -> FloatTensor<Self>;
    /// softmax(scale·x) over the last dim, causal over blocks of `t` query rows at `offset`.
    fn causal_softmax(
        scores: FloatTensor<Self>,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> FloatTensor<Self>;
    /// softmax(scale·q·kᵀ)·v for q [B, kv, g·t, d] (g query heads of each kv head stacked,
    /// t queries at `offset`), k, v [B, kv, S, d]; causal as `causal_softmax`.
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> FloatTensor<Self>;
    /// x·w + scale·(xd·a)·b over [N, in] rows: a linear layer with its LoRA path, whose
    /// input xd is x after the adapter's dropout (x itself without one).
    fn lora_linear(
        x: FloatTensor<Self>,
        xd: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;
    /// Σ over rows with a target ≥ 0 of −log softmax(logits[r])[target[r]], as a [1] tensor.
    fn cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<i64>) -> FloatTensor<Self>;
    /// x·W over [N, in] rows for an f32 W [in, out]: the product and both gradients through
    /// our matmul (Flex's zeroes each output and copies it before its GEMM writes it).
    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    /// x·W over [N, in] rows for a frozen W held packed (bf16 for `--bf16` on the CPU's
    /// matrix units, or quantized): the input gradient flows, W has none.
    fn frozen_linear(x: FloatTensor<Self>, w: Arc<PackedWeight>) -> FloatTensor<Self>;
    /// x·W over [N, in] rows for a trainable W under `--bf16`: W rounded and packed per call,
    /// the input gradient and W's gradient (xᵀ·dy) on the bf16 kernels too, all with f32
    /// accumulation and outputs (W's f32 master and its gradient stay f32). W is [in, out],
    /// or [out, in] with `out_in` (a tied head's embedding table, read in place).
    fn bf16_train_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        out_in: bool,
        path: bf16::Path,
    ) -> FloatTensor<Self>;
    /// `cross_entropy_sum` of h·W for h [N, in] and a frozen head W held packed, a chunk of
    /// counted rows at a time (the [N, vocab] logits never held); h's gradient is made in the
    /// forward where one is wanted.
    fn frozen_head_loss(
        h: FloatTensor<Self>,
        w: Arc<PackedWeight>,
        targets: Vec<i64>,
    ) -> FloatTensor<Self>;
    /// `lora_linear` on `frozen_linear`'s base: the adapter's factors stay f32 (its products
    /// on the weight's bf16 path where it has one).
    fn frozen_lora_linear(
        x: FloatTensor<Self>,
        xd: FloatTensor<Self>,
        w: Arc<PackedWeight>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;
    /// Causal attention from the projected inputs [B, T, width] (q, k, v: three tensors, or
    /// one fused qkv passed three times), RoPE and the head split done inside: [B, T,
    /// heads·d]. No cache (training); positions from `rope`; `mask` [B, T, T] (true =
    /// hidden) for padding and packing, on top of the causal one.
    fn rotary_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: Heads,
        rope: Arc<Rotary>,
        mask: Option<Arc<Vec<bool>>>,
        scale: f64,
    ) -> FloatTensor<Self>;
    /// x / sqrt(mean(x²) + eps) · w over the last dim (w [d]).
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
}

/// f32 storage of a Flex tensor in row-major order, copying only a strided view.
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// `t` with a buffer that is exactly its elements in row-major order, so `storage_mut`
/// edits it in place; copies only a view (strided or offset) or a short buffer.
pub(crate) fn owned(t: FlexTensor) -> FlexTensor {
    let t = contiguous(t);
    if t.storage::<f32>().len() == f32s(&t).len() {
        t
    } else {
        flex(f32s(&t).to_vec(), t.shape())
    }
}

pub(crate) fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 Flex tensor")
}

pub(crate) fn flex(data: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

pub(crate) fn last_dim(t: &FlexTensor) -> usize {
    *t.shape().as_slice().last().expect("a tensor of rank ≥ 1")
}

impl FusedOps for Flex {
    fn swiglu_pair(gate: FlexTensor, up: FlexTensor, _: bool) -> FlexTensor {
        let (gate, up) = (contiguous(gate), contiguous(up));
        let mut out = kernels::zeroed(f32s(&gate).len());
        kernels::swiglu_forward(f32s(&gate), f32s(&up), Layout::Pair, &mut out);
        flex(out, gate.shape())
    }

    fn swiglu_packed(gate_up: FlexTensor, _: bool) -> FlexTensor {
        let gu = contiguous(gate_up);
        let width = last_dim(&gu) / 2;
        let mut out = kernels::zeroed(f32s(&gu).len() / 2);
        kernels::swiglu_forward(f32s(&gu), &[], Layout::Packed { width }, &mut out);
        let mut shape = gu.shape();
        let d = shape.num_dims() - 1;
        shape[d] = width;
        flex(out, shape)
    }

    fn causal_softmax(scores: FlexTensor, scale: f64, t: usize, offset: usize) -> FlexTensor {
        let x = contiguous(scores);
        let s = last_dim(&x);
        let mut out = kernels::zeroed(f32s(&x).len());
        let causal = Some(Causal { t, offset });
        kernels::softmax_forward(f32s(&x), s, scale as f32, causal, &mut out);
        flex(out, x.shape())
    }

    fn causal_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> FlexTensor {
        attention::forward(q, k, v, (scale as f32, Causal { t, offset }), false).0
    }

    fn lora_linear(
        x: FlexTensor,
        xd: FlexTensor,
        w: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        s: f64,
    ) -> FlexTensor {
        lora_forward(owned(matmul(x, w)), xd, a, b, s).0
    }

    fn frozen_lora_linear(
        x: FlexTensor,
        xd: FlexTensor,
        w: Arc<PackedWeight>,
        a: FlexTensor,
        b: FlexTensor,
        s: f64,
    ) -> FlexTensor {
        frozen_lora_forward(x, Some(xd), &w, a, b, s).0
    }

    fn cross_entropy_sum(logits: FlexTensor, targets: Vec<i64>) -> FlexTensor {
        cross_entropy_forward(&contiguous(logits), &targets).0
    }

    fn rotary_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        heads: Heads,
        rope: Arc<Rotary>,
        mask: Option<Arc<Vec<bool>>>,
        scale: f64,
    ) -> FlexTensor {
        let inputs = [q, k, v].map(contiguous);
        let hidden = mask.as_deref().map(|m| &m[..]);
        attention::rotary_forward(&inputs, &heads, &rope, (scale as f32, hidden), false).0
    }

    fn bf16_train_linear(
        x: FlexTensor,
        w: FlexTensor,
        out_in: bool,
        path: bf16::Path,
    ) -> FlexTensor {
        frozen_forward(x, &pack_weight(w, out_in, path))
    }

    fn frozen_linear(x: FlexTensor, w: Arc<PackedWeight>) -> FlexTensor {
        frozen_forward(x, &w)
    }

    fn frozen_head_loss(h: FlexTensor, w: Arc<PackedWeight>, targets: Vec<i64>) -> FlexTensor {
        let h = contiguous(h);
        let (sum, _) = head_loss::head_loss(f32s(&h), &w, &targets, false);
        flex(vec![sum], [1].into())
    }

    fn linear(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        matmul(x, w)
    }

    fn rms_norm(x: FlexTensor, w: FlexTensor, eps: f64) -> FlexTensor {
        rms_norm_forward(x, w, eps).0
    }
}

/// RMSNorm's output and each row's 1 / rms (kept for the backward).
pub(crate) fn rms_norm_forward(x: FlexTensor, w: FlexTensor, eps: f64) -> (FlexTensor, Vec<f32>) {
    let (x, w) = (contiguous(x), contiguous(w));
    let mut out = kernels::zeroed(f32s(&x).len());
    let inv = norm::rms_norm_forward(f32s(&x), f32s(&w), eps as f32, &mut out);
    (flex(out, x.shape()), inv)
}

/// An f32 weight, [in, out] or with `out_in` [out, in], packed for `path`.
pub(crate) fn pack_weight(w: FlexTensor, out_in: bool, path: bf16::Path) -> PackedWeight {
    let w = contiguous(w);
    let [rows, cols] = [0, 1].map(|i| w.shape()[i]);
    match out_in {
        true => PackedWeight::out_in(f32s(&w), rows, cols, path),
        false => PackedWeight::in_out(f32s(&w), rows, cols, path),
    }
}

/// [N, in] rows times a packed W: [N, out].
pub(crate) fn frozen_forward(x: FlexTensor, w: &PackedWeight) -> FlexTensor {
    let x = contiguous(x);
    let rows = f32s(&x).len() / w.d_in().max(1);
    flex(w.forward(f32s(&x), rows), [rows, w.d_out()].into())
}

/// [N, out] rows times a packed W's transpose: [N, in] (the input gradient).
pub(crate) fn frozen_input_grad(dy: FlexTensor, w: &PackedWeight) -> FlexTensor {
    let dy = contiguous(dy);
    let rows = f32s(&dy).len() / w.d_out().max(1);
    flex(w.input_grad(f32s(&dy), rows), [rows, w.d_in()].into())
}

/// The summed loss as a [1] tensor and each row's logsumexp (kept for the backward).
pub(crate) fn cross_entropy_forward(x: &FlexTensor, targets: &[i64]) -> (FlexTensor, Vec<f32>) {
    let (loss, lse) = kernels::cross_entropy_forward(f32s(x), last_dim(x), targets);
    let sum = loss.iter().map(|&l| l as f64).sum::<f64>() as f32;
    (flex(vec![sum], [1].into()), lse)
}

/// base + s·(xd·a)·b and s·(xd·a) (kept for the backward), for base = x·w (its own buffer).
pub(crate) fn lora_forward(
    mut y: FlexTensor,
    xd: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    s: f64,
) -> (FlexTensor, FlexTensor) {
    use burn::backend::ops::FloatTensorOps;
    let h = contiguous(Flex::float_mul_scalar(matmul(xd, a), s.into()));
    let b = contiguous(b);
    let (r, cols) = (last_dim(&h), last_dim(&y));
    kernels::add_low_rank(y.storage_mut::<f32>(), f32s(&h), f32s(&b), r, cols);
    (y, h)
}

/// x·W + s·(xd·a)·b on a packed W and s·(xd·a) (kept for the backward), xd None where it is
/// x. On a bf16 path x is rounded and packed once for both of its products, and the rank-r
/// term is summed into the base's tiles before they are stored (a bf16 product of the
/// rounded s·(xd·a) and b, as autocast's LoRA path computes it in bf16 too); a quantized
/// weight in f32 adds the f32 term to its f32 product (`lora_forward`).
pub(crate) fn frozen_lora_forward(
    x: FlexTensor,
    xd: Option<FlexTensor>,
    w: &PackedWeight,
    a: FlexTensor,
    b: FlexTensor,
    s: f64,
) -> (FlexTensor, FlexTensor) {
    let Some(path) = w.path else {
        let xd = xd.unwrap_or_else(|| x.clone());
        return lora_forward(frozen_forward(x, w), xd, a, b, s);
    };
    let x = contiguous(x);
    let rows = f32s(&x).len() / w.d_in().max(1);
    let px = bf16::PackedA::rows(f32s(&x), rows, w.d_in());
    frozen_lora_bf16(path, (&px, xd), w, (a, b, s))
}

/// `frozen_lora_forward` on a bf16 path for x already rounded and packed (`px`), the
/// adapter's (a, b, scale) given.
pub(crate) fn frozen_lora_bf16(
    path: bf16::Path,
    (px, xd): (&bf16::PackedA, Option<FlexTensor>),
    w: &PackedWeight,
    (a, b, s): (FlexTensor, FlexTensor, f64),
) -> (FlexTensor, FlexTensor) {
    let (a, b) = (contiguous(a), contiguous(b));
    let (d_in, d_out, r) = (w.d_in(), w.d_out(), last_dim(&a));
    let rows = px.m;
    let pa = bf16::PackedB::from_rows(f32s(&a), d_in, r);
    let mut h = match xd.map(contiguous) {
        None => bf16::product_packed(path, px, &pa, None),
        Some(xd) => {
            let pxd = bf16::PackedA::rows(f32s(&xd), rows, d_in);
            bf16::product_packed(path, &pxd, &pa, None)
        }
    };
    kernels::scale_all(&mut h, s as f32);
    let low = (
        bf16::PackedA::rows(&h, rows, r),
        bf16::PackedB::from_rows(f32s(&b), r, d_out),
    );
    let y = w.forward_packed(px, Some((&low.0, &low.1)));
    (flex(y, [rows, d_out].into()), flex(h, [rows, r].into()))
}

/// Whether the fused kernels can run this tensor: f32 on Flex (with or without autodiff),
/// and not switched off by `PHI_FUSED=0`.
pub fn fusable<const N: usize>(t: &Tensor<N>) -> bool {
    fused_enabled() && t.dtype() == DType::F32 && on_flex(&t.device())
}

/// Not switched off by `PHI_FUSED=0`.
fn fused_enabled() -> bool {
    static ENABLED: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var("PHI_FUSED").map_or(true, |v| v != "0"));
    *ENABLED
}

/// Which implementation an op with kernels of its own runs for a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Our CPU kernels (Flex, `fusable`).
    Cpu,
    /// Our kernels for Burn's CubeCL backends (`--features vulkan` or `cuda`), f32: SwiGLU,
    /// RMSNorm, the cross-entropy and attention (causal, or with a padding / packing bias).
    Gpu,
    /// Burn's ops composed (`reference`).
    Composed,
}

/// The path the ops with kernels of their own (`swiglu`, `swiglu_packed` and their `_saving`
/// forms, `rms_norm`, `causal_attention`, `attention_with_bias` (GPU only), `cross_entropy_sum`)
/// take for `t`: for a SwiGLU pair
/// or RMSNorm's x and w both tensors must have it, and on the GPU a packed last dim must be
/// even, else they compose.
pub fn kernel_path<const N: usize>(t: &Tensor<N>) -> KernelPath {
    if fusable(t) {
        return KernelPath::Cpu;
    }
    #[cfg(feature = "cube")]
    if fused_enabled() && t.dtype() == DType::F32 && cube::on_cube(&t.device()) {
        return KernelPath::Gpu;
    }
    KernelPath::Composed
}

/// Whether `device` runs our CPU kernels (Burn's Flex backend, with or without autodiff).
pub fn on_flex(device: &Device) -> bool {
    match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

type D = burn::backend::Dispatch;

/// silu(gate)·up.
pub fn swiglu<const N: usize>(gate: Tensor<N>, up: Tensor<N>) -> Tensor<N> {
    swiglu_saving(gate, up, false)
}

/// silu(gate)·up with gate and up the two halves of the last dim (Phi-3's `gate_up_proj`).
pub fn swiglu_packed<const N: usize>(gate_up: Tensor<N>) -> Tensor<N> {
    swiglu_packed_saving(gate_up, false)
}

/// `swiglu`, its backward reading gate and up rounded to bf16 where `bf16_saved` (`--bf16`
/// on the CPU's matrix units, where they come out of bf16 products: autocast keeps them in
/// bf16 too) on the CPU's fused path. The GPU kernels keep f32 (WGSL has no bf16, and
/// phi-train trains in f32 there under `--bf16`).
pub fn swiglu_saving<const N: usize>(
    gate: Tensor<N>,
    up: Tensor<N>,
    bf16_saved: bool,
) -> Tensor<N> {
    let path = kernel_path(&gate);
    if path != kernel_path(&up) || gate.dims() != up.dims() {
        return reference::swiglu(gate, up);
    }
    match path {
        KernelPath::Cpu => {
            let (g, u) = (gate.into_dispatch(), up.into_dispatch());
            Tensor::from_dispatch(D::swiglu_pair(g, u, bf16_saved))
        }
        #[cfg(feature = "cube")]
        KernelPath::Gpu => {
            use cube::CubeSwiglu;
            let (g, u) = (gate.into_dispatch(), up.into_dispatch());
            Tensor::from_dispatch(D::cube_swiglu_pair(g, u))
        }
        _ => reference::swiglu(gate, up),
    }
}

/// `swiglu_packed`, saving as `swiglu_saving`.
pub fn swiglu_packed_saving<const N: usize>(gate_up: Tensor<N>, bf16_saved: bool) -> Tensor<N> {
    match kernel_path(&gate_up) {
        KernelPath::Cpu => {
            Tensor::from_dispatch(D::swiglu_packed(gate_up.into_dispatch(), bf16_saved))
        }
        #[cfg(feature = "cube")]
        KernelPath::Gpu if gate_up.dims()[N - 1].is_multiple_of(2) => {
            use cube::CubeSwiglu;
            Tensor::from_dispatch(D::cube_swiglu_packed(gate_up.into_dispatch()))
        }
        _ => reference::swiglu_packed(gate_up),
    }
}

/// x and the adapter's input as [rows, in]. Without dropout xd is x itself, one reshape and
/// so one autodiff node: the op sees them as one and sums both gradients in one pass (two
/// reshapes are two nodes, whose gradients Burn adds up afterwards).
fn flat_pair<const N: usize>(
    x: Tensor<N>,
    xd: Option<Tensor<N>>,
    shape: [usize; 2],
) -> (FloatTensor<D>, FloatTensor<D>) {
    let x = x.reshape(shape);
    let xd = xd.map_or_else(|| x.clone(), |xd| xd.reshape(shape));
    (x.into_dispatch(), xd.into_dispatch())
}

/// x·w + scale·(xd·a)·b for x [.., in], w [in, out], a [in, r], b [r, out], with xd the
/// adapter's input (x after dropout; None: x). Only where `fusable` (callers check).
pub fn lora_linear<const N: usize>(
    x: Tensor<N>,
    xd: Option<Tensor<N>>,
    w: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<N> {
    let mut dims = x.dims();
    let d_in = dims[N - 1];
    let rows = x.shape().num_elements() / d_in.max(1);
    dims[N - 1] = w.dims()[1];
    let (x, xd) = flat_pair(x, xd, [rows, d_in]);
    let (w, a, b) = (w.into_dispatch(), a.into_dispatch(), b.into_dispatch());
    Tensor::<2>::from_dispatch(D::lora_linear(x, xd, w, a, b, scale)).reshape(dims)
}

/// x / sqrt(mean(x²) + eps) · w over the last dim.
pub fn rms_norm<const N: usize>(x: Tensor<N>, w: Tensor<1>, eps: f64) -> Tensor<N> {
    let d = w.dims()[0];
    let path = kernel_path(&x);
    if path != kernel_path(&w) || x.dims()[N - 1] != d {
        return reference::rms_norm(x, w, eps);
    }
    match path {
        KernelPath::Cpu => {
            let x = x.into_dispatch();
            Tensor::from_dispatch(D::rms_norm(x, w.into_dispatch(), eps))
        }
        #[cfg(feature = "cube")]
        KernelPath::Gpu => {
            use cube::CubeRmsNorm;
            let dims = x.dims();
            let x = x
                .reshape([dims[..N - 1].iter().product(), d])
                .into_dispatch();
            let y = D::cube_rms_norm(x, w.into_dispatch(), eps);
            Tensor::<2>::from_dispatch(y).reshape(dims)
        }
        _ => reference::rms_norm(x, w, eps),
    }
}

/// x·W for x [.., in] and W [in, out] in f32. Only where `fusable` (callers check).
pub fn linear<const N: usize>(x: Tensor<N>, w: Tensor<2>) -> Tensor<N> {
    let mut dims = x.dims();
    let [d_in, d_out] = w.dims();
    let rows = x.shape().num_elements() / d_in.max(1);
    dims[N - 1] = d_out;
    let x = x.reshape([rows, d_in]).into_dispatch();
    Tensor::<2>::from_dispatch(D::linear(x, w.into_dispatch())).reshape(dims)
}

/// x·W for x [.., in] and a frozen packed W. Only where `fusable` (callers check).
pub fn frozen_linear<const N: usize>(x: Tensor<N>, w: &Arc<PackedWeight>) -> Tensor<N> {
    let mut dims = x.dims();
    let rows = x.shape().num_elements() / w.d_in().max(1);
    dims[N - 1] = w.d_out();
    let x = x.reshape([rows, w.d_in()]).into_dispatch();
    Tensor::<2>::from_dispatch(D::frozen_linear(x, w.clone())).reshape(dims)
}

/// Σ −log softmax(h[r]·W)[targets[r]] over rows with a target ≥ 0, for h [rows, in] and a
/// frozen packed head W: [1]. Only where `fusable` (callers check).
pub fn frozen_head_loss(h: Tensor<2>, w: &Arc<PackedWeight>, targets: Vec<i64>) -> Tensor<1> {
    Tensor::from_dispatch(D::frozen_head_loss(h.into_dispatch(), w.clone(), targets))
}

/// x·W for x [.., in] and a trainable W ([in, out], or [out, in] with `out_in`) on the bf16
/// kernels (`--bf16`). Only where `fusable` (callers check).
pub fn bf16_train_linear<const N: usize>(
    x: Tensor<N>,
    w: Tensor<2>,
    out_in: bool,
    path: bf16::Path,
) -> Tensor<N> {
    let mut dims = x.dims();
    let [d_in, d_out] = match out_in {
        true => [w.dims()[1], w.dims()[0]],
        false => w.dims(),
    };
    let rows = x.shape().num_elements() / d_in.max(1);
    dims[N - 1] = d_out;
    let x = x.reshape([rows, d_in]).into_dispatch();
    let y = D::bf16_train_linear(x, w.into_dispatch(), out_in, path);
    Tensor::<2>::from_dispatch(y).reshape(dims)
}

/// x·W + scale·(xd·a)·b for a frozen packed W (`lora_linear`'s other base). Only where
/// `fusable` (callers check).
pub fn frozen_lora_linear<const N: usize>(
    x: Tensor<N>,
    xd: Option<Tensor<N>>,
    w: &Arc<PackedWeight>,
    a: Tensor<2>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<N> {
    let mut dims = x.dims();
    let rows = x.shape().num_elements() / w.d_in().max(1);
    dims[N - 1] = w.d_out();
    let (x, xd) = flat_pair(x, xd, [rows, w.d_in()]);
    let (a, b) = (a.into_dispatch(), b.into_dispatch());
    Tensor::<2>::from_dispatch(D::frozen_lora_linear(x, xd, w.clone(), a, b, scale)).reshape(dims)
}

/// `FusedOps::rotary_attention` for inputs [B, T, width]. Only where `fusable` (callers check).
pub fn rotary_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: Heads,
    rope: &Arc<Rotary>,
    mask: Option<&Arc<Vec<bool>>>,
    scale: f64,
) -> Tensor<3> {
    let [q, k, v] = [q, k, v].map(|t| t.into_dispatch());
    let (rope, mask) = (rope.clone(), mask.cloned());
    Tensor::from_dispatch(D::rotary_attention(q, k, v, heads, rope, mask, scale))
}

/// softmax(scale·q·kᵀ)·v with GQA-stacked query blocks (see `FusedOps::causal_attention`);
/// on a CubeCL backend (`--features vulkan` or `cuda`) with a backward that keeps no
/// [B, H, rows, S] tensor (src/cube/attention.rs), elsewhere composed from matmuls and
/// `causal_softmax`.
pub fn causal_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    t: usize,
    offset: usize,
) -> Tensor<4> {
    match kernel_path(&q) {
        KernelPath::Cpu => {
            let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
            Tensor::from_dispatch(D::causal_attention(q, k, v, scale, t, offset))
        }
        #[cfg(feature = "cube")]
        KernelPath::Gpu => {
            let bias = attention_bias(None, 1, t, k.dims()[2], offset, &q.device());
            attention_with_bias(q, k, v, &bias, scale)
        }
        _ => reference::causal_softmax(q.matmul(k.swap_dims(2, 3)), scale, t, offset).matmul(v),
    }
}

/// The targets as the GPU kernels read them: i32, −1 for an ignored row. The CPU path and the
/// composed gather stop on a target past the vocabulary too; a kernel would read another row's
/// logit.
#[cfg(feature = "cube")]
fn gpu_targets(
    targets: &[i64],
    n: usize,
    v: usize,
    device: &Device,
) -> Tensor<1, burn::tensor::Int> {
    assert_eq!(
        targets.len(),
        n,
        "cross-entropy: {n} rows, {} targets",
        targets.len()
    );
    let t: Vec<i32> = targets
        .iter()
        .map(|&t| match usize::try_from(t) {
            Ok(u) if u < v => u as i32,
            Ok(_) => panic!("cross-entropy: target {t} outside a vocabulary of {v}"),
            Err(_) => -1,
        })
        .collect();
    Tensor::from_data(TensorData::new(t, [n]), device)
}

/// `cross_entropy_sum` of h·W for h [N, d] and W [d, V], or [V, d] with `out_in` (a tied
/// embedding table, read in place). On the GPU (`kernel_path` of both) one op that takes a
/// chunk of rows at a time, so the [N, V] logits are never held (src/cube/head_loss.rs);
/// elsewhere composed.
pub fn head_loss(h: Tensor<2>, w: Tensor<2>, out_in: bool, targets: Vec<i64>) -> Tensor<1> {
    #[cfg(feature = "cube")]
    if kernel_path(&h) == KernelPath::Gpu && kernel_path(&w) == KernelPath::Gpu {
        use cube::GpuHeadLoss;
        let [n, d] = h.dims();
        let v = w.dims()[if out_in { 0 } else { 1 }];
        let t = gpu_targets(&targets, n, v, &h.device());
        let chunk = head_chunk(n, d, v);
        let (h, w, t) = (h.into_dispatch(), w.into_dispatch(), t.into_dispatch());
        return Tensor::from_dispatch(D::gpu_head_loss(h, w, t, out_in, chunk));
    }
    let logits = match out_in {
        true => h.matmul(w.transpose()),
        false => h.matmul(w),
    };
    cross_entropy_sum(logits, targets)
}

/// Rows of logits per chunk of `head_loss` on the GPU: as Liger-Kernel sizes them, a chunk's
/// logits about as large as h (N·d / V rows, to a power of two), and at most 64 MiB, under
/// what any wgpu device binds as one buffer (128 MiB by WebGPU's default limit).
#[cfg(feature = "cube")]
fn head_chunk(n: usize, d: usize, v: usize) -> usize {
    let cap = (64 << 20) / (4 * v.max(1));
    (n * d)
        .div_ceil(v.max(1))
        .next_power_of_two()
        .min(cap)
        .max(1)
}

/// Added to a hidden score: far below any real one yet finite, so exp(score − max) is 0
/// without an infinity in a kernel (WGSL has no infinity literal).
pub const MASKED: f32 = -1.0e30;

/// The additive bias of `attention_with_bias`, [B or 1, 1, t, s]: MASKED where query q (at
/// position offset + q) may not see key j, 0 elsewhere. A key past the query is hidden, and
/// with `hidden` ([B, 1, t, s], true = hidden: padding, packing, a sliding window) so is every
/// key it names; without it the bias is [1, 1, t, s], shared by the batch.
pub fn attention_bias(
    hidden: Option<&[bool]>,
    b: usize,
    t: usize,
    s: usize,
    offset: usize,
    device: &Device,
) -> Tensor<4> {
    let rows = if hidden.is_some() { b } else { 1 };
    let bias: Vec<f32> = (0..rows * t * s)
        .map(|i| {
            let past = i % s > offset + (i / s) % t;
            match past || hidden.is_some_and(|h| h[i]) {
                true => MASKED,
                false => 0.0,
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(bias, [rows, 1, t, s]), device)
}

/// softmax(scale·q·kᵀ + bias)·v for q [B, kv, g·t, d] (each kv head's g query heads stacked:
/// GQA without repeated k and v), k, v [B, kv, S, d] and a bias from `attention_bias` that the
/// g heads share. On the GPU one op that keeps no [B, kv, g·t, S] tensor for its backward
/// (it recomputes the probabilities there); elsewhere composed.
pub fn attention_with_bias(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: &Tensor<4>,
    scale: f64,
) -> Tensor<4> {
    match kernel_path(&q) {
        #[cfg(feature = "cube")]
        KernelPath::Gpu => {
            use cube::GpuAttention;
            let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
            let bias = bias.clone().into_dispatch();
            Tensor::from_dispatch(D::gpu_attention(q, k, v, bias, scale))
        }
        _ => reference::attention_with_bias(q, k, v, bias.clone(), scale),
    }
}

/// softmax(scale·scores) over the last dim of [B, heads, rows, S], where row r is query
/// r mod t at absolute position offset + r mod t and sees keys up to it.
pub fn causal_softmax(scores: Tensor<4>, scale: f64, t: usize, offset: usize) -> Tensor<4> {
    if fusable(&scores) {
        let d = scores.into_dispatch();
        return Tensor::from_dispatch(D::causal_softmax(d, scale, t, offset));
    }
    reference::causal_softmax(scores, scale, t, offset)
}

/// Σ −log softmax(logits[r])[targets[r]] over [rows, V] logits, rows with a negative target
/// skipped; a [1] tensor.
pub fn cross_entropy_sum(logits: Tensor<2>, targets: Vec<i64>) -> Tensor<1> {
    match kernel_path(&logits) {
        KernelPath::Cpu => {
            let d = logits.into_dispatch();
            Tensor::from_dispatch(D::cross_entropy_sum(d, targets))
        }
        #[cfg(feature = "cube")]
        KernelPath::Gpu => {
            use cube::CubeCrossEntropy;
            let [n, v] = logits.dims();
            let t = gpu_targets(&targets, n, v, &logits.device());
            let d = D::cube_cross_entropy(logits.into_dispatch(), t.into_dispatch());
            Tensor::<1>::from_dispatch(d).sum()
        }
        _ => reference::cross_entropy_sum(logits, targets),
    }
}

/// Whether `adamw` can run on these tensors (all f32 on Flex, outside autodiff).
pub fn adamw_fusable(ts: [&Tensor<1>; 4]) -> bool {
    ts.iter().all(|t| fusable(*t) && !t.is_autodiff())
}

/// One AdamW update of a flat parameter in place on Flex: (p, m, v) after the step and
/// whether p is all finite. Only where `adamw_fusable`; elsewhere the caller composes it from
/// tensor ops.
pub fn adamw(
    p: Tensor<1>,
    g: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    h: kernels::AdamW,
) -> (Tensor<1>, Tensor<1>, Tensor<1>, bool) {
    let prim = |t: Tensor<1>| contiguous(t.try_into_primitive::<Flex>().expect("a Flex tensor"));
    let own = |t: Tensor<1>| owned(prim(t));
    let (mut p, g, mut m, mut v) = (own(p), prim(g), own(m), own(v));
    let finite = kernels::adamw(
        p.storage_mut::<f32>(),
        m.storage_mut::<f32>(),
        v.storage_mut::<f32>(),
        f32s(&g),
        h,
    );
    let back = |t: FlexTensor| Tensor::<1>::from_primitive::<Flex>(t);
    (back(p), back(m), back(v), finite)
}

/// `f` over the values of a flat f32 Flex tensor outside autodiff; None elsewhere.
fn on_flex_values<R>(x: &Tensor<1>, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !fusable(x) || x.is_autodiff() {
        return None;
    }
    let t = contiguous(
        x.clone()
            .try_into_primitive::<Flex>()
            .expect("a Flex tensor"),
    );
    Some(f(f32s(&t)))
}

/// No NaN and no infinity in `x`.
pub fn all_finite(x: &Tensor<1>) -> bool {
    on_flex_values(x, kernels::all_finite).unwrap_or_else(|| {
        !(x.clone().is_nan().any().into_scalar::<bool>()
            || x.clone().is_inf().any().into_scalar::<bool>())
    })
}

/// Σ x² of a flat tensor in f64 on Flex (gradient clipping's norm), else composed.
pub fn sum_squares(x: &Tensor<1>) -> f64 {
    on_flex_values(x, kernels::sum_squares)
        .unwrap_or_else(|| x.clone().square().sum().into_scalar::<f32>() as f64)
}

/// The same ops composed from Burn's: the path of other backends and dtypes, and what the
/// tests hold the fused ones to.
pub mod reference {
    use burn::tensor::activation::{log_softmax, silu, softmax};
    use burn::tensor::{Bool, Int, Tensor, TensorData};

    pub fn swiglu<const N: usize>(gate: Tensor<N>, up: Tensor<N>) -> Tensor<N> {
        silu(gate) * up
    }

    /// transformers' LlamaRMSNorm in f32.
    pub fn rms_norm<const N: usize>(x: Tensor<N>, w: Tensor<1>, eps: f64) -> Tensor<N> {
        let inv = (x.clone().square().mean_dim(N - 1) + eps).sqrt().recip();
        x * inv * w.unsqueeze::<N>()
    }

    pub fn swiglu_packed<const N: usize>(gate_up: Tensor<N>) -> Tensor<N> {
        let w = gate_up.dims()[N - 1] / 2;
        let gate = gate_up.clone().narrow(N - 1, 0, w);
        silu(gate) * gate_up.narrow(N - 1, w, w)
    }

    pub fn causal_softmax(scores: Tensor<4>, scale: f64, t: usize, offset: usize) -> Tensor<4> {
        let [b, h, r, s] = scores.dims();
        let masked: Vec<bool> = (0..r * s)
            .map(|i| i % s >= (offset + (i / s) % t + 1).min(s))
            .collect();
        let device = scores.device();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(masked, [r, s]), &device)
            .unsqueeze::<4>()
            .expand([b, h, r, s]);
        softmax((scores * scale).mask_fill(mask, f32::NEG_INFINITY), 3)
    }

    /// `attention_with_bias` composed.
    pub fn attention_with_bias(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        bias: Tensor<4>,
        scale: f64,
    ) -> Tensor<4> {
        let [b, kv, rows, _] = q.dims();
        let [bb, _, t, s] = bias.dims();
        let scores = q.matmul(k.swap_dims(2, 3)) * scale;
        let scores = scores.reshape([b, kv, rows / t, t, s]) + bias.reshape([bb, 1, 1, t, s]);
        softmax(scores.reshape([b, kv, rows, s]), 3).matmul(v)
    }

    pub fn cross_entropy_sum(logits: Tensor<2>, targets: Vec<i64>) -> Tensor<1> {
        let [n, _] = logits.dims();
        let device = logits.device();
        let weights: Vec<f32> = targets.iter().map(|&t| (t >= 0) as u8 as f32).collect();
        let idx: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [n, 1]), &device);
        let picked = log_softmax(logits, 1).gather(1, idx).reshape([n]);
        let w = Tensor::<1>::from_data(TensorData::new(weights, [n]), &device);
        (picked * w).sum().neg()
    }
}
