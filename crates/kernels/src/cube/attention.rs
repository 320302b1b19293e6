//! Causal attention on GPU backends that keeps no [B, H, rows, S] tensor for its backward.
//! Burn's `attention` under autodiff is a matmul and a composed softmax, every intermediate of
//! [B, H, T, S] kept until the backward (at T = S = 2048 and 32 heads, 2 GiB per layer in f32).
//! Here the forward keeps q, k, v (checkpointed), its output and each row's log-sum-exp
//! [B, H, rows, 1]; the backward recomputes the probabilities from them, as FlashAttention's
//! does, so the [B, H, rows, S] tensors live one layer's backward at a time.
//!
//! Written with the backend's own tensor ops (matmuls, and elementwise chains that Burn's
//! fusion compiles into its kernels), generic over the backend: a CubeCL kernel of our own
//! would have to beat Burn's matmul at its own tiles.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Scalar, TensorMetadata};
use burn::tensor::TensorData;
use burn_cubecl::CubeBackend;

/// Rows of q per kv head: `t` queries of each of the kv head's query heads, stacked; row r is
/// query r mod t at absolute position offset + r mod t, and sees keys up to it.
#[derive(Clone, Copy, Debug)]
pub struct Causal {
    pub scale: f64,
    pub t: usize,
    pub offset: usize,
}

#[backend_extension(Cube, Autodiff, Fusion)]
pub trait GpuAttention: Backend {
    /// softmax(scale·q·kᵀ, causal)·v for q [B, H, rows, d], k and v [B, H, S, d].
    #[fusion(default)]
    fn gpu_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> FloatTensor<Self> {
        forward::<Self>(q, k, v, Causal { scale, t, offset }).0
    }
}

impl GpuAttention for CubeBackend {}

/// Far below any score, finite: exp(score + MASKED − lse) is 0 without an infinity in the
/// kernels.
const MASKED: f32 = -1.0e30;

/// 0 on and below the diagonal, MASKED above it: [1, 1, rows, S], added with broadcasting
/// (a float bias rather than a bool mask: the CubeCL backends take bool data only in their
/// own storage type).
fn mask<B: Backend>(like: &FloatTensor<B>, rows: usize, s: usize, c: Causal) -> FloatTensor<B> {
    let m: Vec<f32> = (0..rows * s)
        .map(|i| match i % s > c.offset + (i / s) % c.t {
            true => MASKED,
            false => 0.0,
        })
        .collect();
    B::float_from_data(TensorData::new(m, [1, 1, rows, s]), &like.device())
}

/// scale·q·kᵀ with the causal mask added.
fn scores<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, c: Causal) -> FloatTensor<B> {
    let s = B::float_matmul(q, B::float_swap_dims(k, 2, 3));
    let s = B::float_mul_scalar(s, Scalar::Float(c.scale));
    let [_, _, rows, keys] = s.shape().dims::<4>();
    let m = mask::<B>(&s, rows, keys, c);
    B::float_add(s, m)
}

/// (output, log-sum-exp of each row's masked scores [B, H, rows, 1]).
fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    c: Causal,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = scores::<B>(q, k, c);
    let m = B::float_max_dim(s.clone(), 3);
    let p = B::float_exp(B::float_sub(s, m.clone()));
    let l = B::float_sum_dim(p.clone(), 3);
    let out = B::float_div(B::float_matmul(p, v), l.clone());
    (out, B::float_add(m, B::float_log(l)))
}

/// (dq, dk, dv) for the upstream gradient `d_out`: P = exp(S − lse) recomputed,
/// dS = P ⊙ (d_out·vᵀ − rowsum(d_out ⊙ out)).
fn backward<B: Backend>(
    [q, k, v]: [FloatTensor<B>; 3],
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    d_out: FloatTensor<B>,
    c: Causal,
) -> [FloatTensor<B>; 3] {
    let p = B::float_exp(B::float_sub(scores::<B>(q.clone(), k.clone(), c), lse));
    let dv = B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), d_out.clone());
    let dp = B::float_matmul(d_out.clone(), B::float_swap_dims(v, 2, 3));
    let row = B::float_sum_dim(B::float_mul(d_out, out), 3);
    let ds = B::float_mul(p, B::float_sub(dp, row));
    let ds = B::float_mul_scalar(ds, Scalar::Float(c.scale));
    let dq = B::float_matmul(ds.clone(), k);
    let dk = B::float_matmul(B::float_swap_dims(ds, 2, 3), q);
    [dq, dk, dv]
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend> Backward<B, 3> for AttentionBackward {
    /// q, k, v (checkpointed), the output and the rows' log-sum-exp.
    type State = ([NodeId; 3], FloatTensor<B>, FloatTensor<B>, Causal);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, c: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let (ids, out, lse, causal) = ops.state;
        let qkv = ids.map(|id| c.retrieve_node_output::<FloatTensor<B>>(id));
        let d = backward::<B>(qkv, out, lse, d_out, causal);
        for (node, d) in ops.parents.into_iter().zip(d) {
            if let Some(node) = node {
                grads.register::<B>(node.id, d);
            }
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> GpuAttention for Autodiff<B, C> {
    fn gpu_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> FloatTensor<Self> {
        let c = Causal { scale, t, offset };
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&q, &k, &v].map(|x| prep.checkpoint(x));
                let [q, k, v] = [q, k, v].map(|x| x.into_primitive());
                let (out, lse) = forward::<B>(q, k, v, c);
                prep.finish((ids, out.clone(), lse, c), out)
            }
            OpsKind::UnTracked(prep) => {
                let [q, k, v] = [q, k, v].map(|x| x.into_primitive());
                prep.finish(forward::<B>(q, k, v, c).0)
            }
        }
    }
}
