//! Cross-entropy on CubeCL devices. The composed op keeps the [N, V] log-softmax for its
//! backward (on top of the logits); here the forward reads each row of logits once, one cube
//! per row (a running max and sum of exponentials per unit, merged through shared memory),
//! and keeps only the per-row log-sum-exp [N]; the backward recomputes the softmax from the
//! (checkpointed) logits, one unit per logit.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend, TensorMetadata};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;

use super::{empty, first_dim, grid, per_row, row_grid, rows};

#[backend_extension(Cube, Autodiff, Fusion)]
pub trait CubeCrossEntropy: Backend {
    /// Per row of logits [N, V]: log Σ exp − the target's logit; 0 where the target (of
    /// targets [N]) is negative, an ignored row.
    #[fusion(dtype = logits, shape = first_dim(logits))]
    fn cube_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>)
        -> FloatTensor<Self>;
}

#[backend_extension(Cube, Fusion)]
pub trait CubeCrossEntropyGrad: Backend {
    /// (`cube_cross_entropy`, each row's log Σ exp), both [N].
    #[fusion(meta = |logits, _targets| (per_row(logits), per_row(logits)))]
    fn cube_cross_entropy_lse(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// d logits = grad_r·(softmax(x_r) − onehot(t_r)) on counted rows, 0 on ignored ones,
    /// for the upstream gradient `grad` [N] of the per-row losses.
    #[fusion(dtype = logits, shape = logits)]
    fn cube_cross_entropy_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

mod kernels {
    use cubecl::prelude::*;

    /// One cube per row: each unit keeps a running max m and s = Σ exp(x − m) over its
    /// strided share of the row, then unit 0 merges the units' pairs from shared memory.
    #[cube(launch)]
    pub fn lse_rows(
        logits: &Tensor<f32>,
        targets: &Tensor<i32>,
        loss: &mut Tensor<f32>,
        lse: &mut Tensor<f32>,
        #[comptime] units: usize,
    ) {
        let row = CUBE_POS;
        if row >= loss.len() {
            terminate!();
        }
        let v = logits.len() / loss.len();
        let base = row * v;
        let unit = UNIT_POS as usize;
        // A finite floor (WGSL has no infinity literal): exp(floor − x) is 0 for any logit,
        // and a unit with no share keeps s = 0, which the merge weighs as nothing. Mutable
        // values start as runtime ones (`f32::new`): a literal would be a compile-time one.
        let mut m = f32::new(-3.0e38);
        let mut s = f32::new(0.0);
        let mut j = unit;
        while j < v {
            let x = logits[base + j];
            if x > m {
                s = s * (m - x).exp() + 1.0f32;
                m = x;
            } else {
                s += (x - m).exp();
            }
            j += units;
        }
        let mut ms = Shared::<[f32]>::new_slice(units);
        let mut ss = Shared::<[f32]>::new_slice(units);
        ms[unit] = m;
        ss[unit] = s;
        sync_cube();
        if unit == 0 {
            let mut mt = ms[0];
            let mut st = ss[0];
            for k in 1..units {
                let mk = ms[k];
                let sk = ss[k];
                if mk > mt {
                    st = st * (mt - mk).exp() + sk;
                    mt = mk;
                } else {
                    st += sk * (mk - mt).exp();
                }
            }
            let l = mt + st.ln();
            lse[row] = l;
            let t = targets[row];
            let mut out = f32::new(0.0);
            if t >= 0 {
                out = l - logits[base + u32::cast_from(t) as usize];
            }
            loss[row] = out;
        }
    }

    #[cube(launch)]
    pub fn lse_rows_grad(
        logits: &Tensor<f32>,
        targets: &Tensor<i32>,
        lse: &Tensor<f32>,
        grad: &Tensor<f32>,
        d_logits: &mut Tensor<f32>,
    ) {
        let i = ABSOLUTE_POS;
        if i < d_logits.len() {
            let v = d_logits.len() / lse.len();
            let row = i / v;
            let t = targets[row];
            let mut d = f32::new(0.0);
            if t >= 0 {
                let p = (logits[i] - lse[row]).exp();
                if u32::cast_from(t) as usize == i % v {
                    d = grad[row] * (p - 1.0f32);
                } else {
                    d = grad[row] * p;
                }
            }
            d_logits[i] = d;
        }
    }
}

/// Targets as contiguous i32 (the backend's int type may differ).
fn targets_i32(t: CubeTensor) -> CubeTensor {
    into_contiguous(if t.dtype == DType::I32 {
        t
    } else {
        cast(t, DType::I32)
    })
}

/// [N, V] logits' rows and vocabulary size, with targets [N].
fn dims(logits: &CubeTensor, targets: &CubeTensor) -> (usize, usize) {
    let [n, v] = logits.shape().dims::<2>();
    assert_eq!(
        targets.shape().num_elements(),
        n,
        "cross-entropy: {n} rows of logits, {} targets",
        targets.shape().num_elements()
    );
    (n, v)
}

fn lse_rows(logits: CubeTensor, targets: CubeTensor) -> (CubeTensor, CubeTensor) {
    let (logits, targets) = (rows(logits), targets_i32(targets));
    let (n, v) = dims(&logits, &targets);
    let (loss, lse) = (
        empty(&logits, Shape::new([n])),
        empty(&logits, Shape::new([n])),
    );
    if n > 0 && v > 0 {
        let (count, dim, units) = row_grid(&logits, n);
        let client = logits.client.clone();
        kernels::lse_rows::launch(
            &client,
            count,
            dim,
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            loss.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            units as usize,
        );
    }
    (loss, lse)
}

impl CubeCrossEntropy for CubeBackend {
    fn cube_cross_entropy(logits: CubeTensor, targets: CubeTensor) -> CubeTensor {
        lse_rows(logits, targets).0
    }
}

impl CubeCrossEntropyGrad for CubeBackend {
    fn cube_cross_entropy_lse(logits: CubeTensor, targets: CubeTensor) -> (CubeTensor, CubeTensor) {
        lse_rows(logits, targets)
    }

    fn cube_cross_entropy_grad(
        logits: CubeTensor,
        targets: CubeTensor,
        lse: CubeTensor,
        grad: CubeTensor,
    ) -> CubeTensor {
        let (logits, targets) = (rows(logits), targets_i32(targets));
        let (lse, grad) = (rows(lse), rows(grad));
        let (n, v) = dims(&logits, &targets);
        let d_logits = empty(&logits, logits.shape());
        if n * v > 0 {
            let (count, dim) = grid(&d_logits, n * v);
            let client = logits.client.clone();
            kernels::lse_rows_grad::launch(
                &client,
                count,
                dim,
                logits.into_tensor_arg(),
                targets.into_tensor_arg(),
                lse.into_tensor_arg(),
                grad.into_tensor_arg(),
                d_logits.clone().into_tensor_arg(),
            );
        }
        d_logits
    }
}

/// The logits are handed to the checkpointer (as the CPU path does); targets and the per-row
/// log-sum-exp ([N] each) are kept.
#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: CubeCrossEntropyGrad> Backward<B, 1> for CrossEntropyBackward {
    type State = (NodeId, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            let (id, targets, lse) = ops.state;
            let logits = c.retrieve_node_output::<FloatTensor<B>>(id);
            let d = B::cube_cross_entropy_grad(logits, targets, lse, grad);
            grads.register::<B>(node.id, d);
        }
    }
}

impl<B, C> CubeCrossEntropy for Autodiff<B, C>
where
    B: CubeCrossEntropy + CubeCrossEntropyGrad,
    C: CheckpointStrategy,
{
    fn cube_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = prep.checkpoint(&logits);
                let (loss, lse) =
                    B::cube_cross_entropy_lse(logits.into_primitive(), targets.clone());
                prep.finish((id, targets, lse), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::cube_cross_entropy(logits.into_primitive(), targets))
            }
        }
    }
}
