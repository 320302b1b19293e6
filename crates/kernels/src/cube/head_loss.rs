//! The LM head and the cross-entropy as one op on CubeCL devices, a chunk of rows at a time,
//! so the [N, V] logits are never held whole: the step's largest activation (at 4 × 2048
//! tokens and Llama-3's 128 k vocabulary, 4.2 GB in f32), and past what one wgpu buffer may
//! bind (lavapipe refuses the 192 MB of 1024 × 49 k). Under autodiff the gradients of h (and of
//! W where it trains) are made in the forward, chunk by chunk, and scaled by the upstream
//! gradient in the backward, as Liger-Kernel's fused linear cross-entropy does: the backward
//! recomputes nothing, and the op keeps dh [N, d] (and dW) instead of the logits.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend, TensorMetadata};
use burn::tensor::{FloatDType, Shape, Slice};
use burn_cubecl::CubeBackend;

use super::cross_entropy::CubeCrossEntropyGrad;
use super::one;

#[backend_extension(Cube, Autodiff, Fusion)]
pub trait GpuHeadLoss: Backend {
    /// Σ over rows with a target ≥ 0 (targets [N]) of −log softmax(h·W)[target], as [1], for
    /// h [N, d] and W [d, V], or W [V, d] with `out_in` (a tied embedding table, read in place),
    /// `chunk` rows of logits at a time.
    #[fusion(dtype = h, shape = one(h))]
    fn gpu_head_loss(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        out_in: bool,
        chunk: usize,
    ) -> FloatTensor<Self>;
}

impl GpuHeadLoss for CubeBackend {
    fn gpu_head_loss(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        out_in: bool,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let head = Head { out_in, chunk };
        chunks::<Self>(h, w, targets, head, [false; 2]).0
    }
}

#[derive(Clone, Copy, Debug)]
struct Head {
    out_in: bool,
    chunk: usize,
}

/// (the summed loss [1], dh [N, d] if `want[0]`, dW in W's layout if `want[1]`), the
/// gradients for an upstream gradient of 1.
#[allow(clippy::type_complexity)]
fn chunks<B: CubeCrossEntropyGrad>(
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    targets: IntTensor<B>,
    head: Head,
    want: [bool; 2],
) -> (
    FloatTensor<B>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
) {
    let [n, d] = h.shape().dims::<2>();
    let device = h.device();
    // [d, V]: a transposed view of a tied table, which the matmul reads in place.
    let w_dv = match head.out_in {
        true => B::float_swap_dims(w, 0, 1),
        false => w,
    };
    let mut loss = B::float_zeros(Shape::new([1]), &device, FloatDType::F32);
    let (mut dh, mut dw) = (Vec::new(), None);
    for r0 in (0..n).step_by(head.chunk.max(1)) {
        let r1 = (r0 + head.chunk).min(n);
        let rows = Slice::new(r0 as isize, Some(r1 as isize), 1);
        let hc = B::float_slice(h.clone(), &[rows, Slice::new(0, Some(d as isize), 1)]);
        let tc = B::int_slice(targets.clone(), &[rows]);
        let logits = B::float_matmul(hc.clone(), w_dv.clone());
        let (per_row, lse) = B::cube_cross_entropy_lse(logits.clone(), tc.clone());
        loss = B::float_add(loss, B::float_sum(per_row));
        if !want.contains(&true) {
            continue;
        }
        let ones = B::float_ones(Shape::new([r1 - r0]), &device, FloatDType::F32);
        let g = B::cube_cross_entropy_grad(logits, tc, lse, ones);
        if want[0] {
            dh.push(B::float_matmul(
                g.clone(),
                B::float_swap_dims(w_dv.clone(), 0, 1),
            ));
        }
        if want[1] {
            let part = match head.out_in {
                true => B::float_matmul(B::float_swap_dims(g, 0, 1), hc),
                false => B::float_matmul(B::float_swap_dims(hc, 0, 1), g),
            };
            dw = Some(match dw {
                None => part,
                Some(sum) => B::float_add(sum, part),
            });
        }
    }
    let dh = (want[0] && !dh.is_empty()).then(|| B::float_cat(dh, 0));
    (loss, dh, dw)
}

/// dh and dW for an upstream gradient of 1, made in the forward.
#[derive(Debug)]
struct HeadLossBackward;

impl<B: Backend> Backward<B, 2> for HeadLossBackward {
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let g = B::float_reshape(g, Shape::new([1, 1]));
        let (dh, dw) = ops.state;
        for (node, d) in ops.parents.into_iter().zip([dh, dw]) {
            if let (Some(node), Some(d)) = (node, d) {
                grads.register::<B>(node.id, B::float_mul(d, g.clone()));
            }
        }
    }
}

impl<B, C> GpuHeadLoss for Autodiff<B, C>
where
    B: GpuHeadLoss + CubeCrossEntropyGrad,
    C: CheckpointStrategy,
{
    fn gpu_head_loss(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        out_in: bool,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let want = [h.is_tracked(), w.is_tracked()];
        let head = Head { out_in, chunk };
        match HeadLossBackward
            .prepare::<C>([h.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (h, w) = (h.into_primitive(), w.into_primitive());
                let (loss, dh, dw) = chunks::<B>(h, w, targets, head, want);
                prep.finish((dh, dw), loss)
            }
            OpsKind::UnTracked(prep) => {
                let (h, w) = (h.into_primitive(), w.into_primitive());
                prep.finish(B::gpu_head_loss(h, w, targets, out_in, chunk))
            }
        }
    }
}
