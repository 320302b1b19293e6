//! Attention on GPU backends that keeps no [B, H, rows, S] tensor for its backward: causal,
//! and with padding or packing, through an additive bias built once per forward.
//! Burn's `attention` under autodiff is a matmul and a composed softmax, every intermediate of
//! [B, H, T, S] kept until the backward (at T = S = 2048 and 32 heads, 2 GiB per layer in f32).
//! Here the forward keeps q, k, v (checkpointed) and each row's max and sum of exponentials
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
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;

#[backend_extension(Cube, Autodiff, Fusion)]
pub trait GpuAttention: Backend {
    /// softmax(scale·q·kᵀ + bias)·v for q [B, kv, g·t, d] (each kv head's g query heads
    /// stacked), k and v [B, kv, S, d], and an additive bias [B or 1, 1, t, S] the g heads
    /// share (`crate::attention_bias`).
    #[fusion(default)]
    fn gpu_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        forward::<Self>([q, k, v], bias, scale).0
    }
}

impl GpuAttention for CubeBackend {}

/// scale·q·kᵀ plus the bias, broadcast over the stacked heads (a reshape of the contiguous
/// matmul output, so no [B, kv, g·t, S] copy of the bias is made).
fn scores<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    bias: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let s = B::float_matmul(q, B::float_swap_dims(k, 2, 3));
    let s = B::float_mul_scalar(s, Scalar::Float(scale));
    let [b, kv, rows, keys] = s.shape().dims::<4>();
    let [bb, _, t, _] = bias.shape().dims::<4>();
    let s = B::float_reshape(s, Shape::new([b, kv, rows / t, t, keys]));
    let bias = B::float_reshape(bias, Shape::new([bb, 1, 1, t, keys]));
    B::float_reshape(B::float_add(s, bias), Shape::new([b, kv, rows, keys]))
}

/// The output and each row's (max, Σ exp(score − max)) [B, H, rows, 1], from which the
/// backward recomputes the probabilities exactly as they were made here. (FlashAttention keeps
/// one log-sum-exp, which rounds the recomputed probabilities to a few of its ulps: on
/// lavapipe that took phi-train's Llama LoRA run from 2.6e-5 to 5.0e-5 off the HF Trainer's
/// weights, at an element whose gradient is below Adam's eps, against a 5e-5 tolerance.)
fn forward<B: Backend>(
    [q, k, v]: [FloatTensor<B>; 3],
    bias: FloatTensor<B>,
    scale: f64,
) -> (FloatTensor<B>, [FloatTensor<B>; 2]) {
    let s = scores::<B>(q, k, bias, scale);
    let m = B::float_max_dim(s.clone(), 3);
    let e = B::float_exp(B::float_sub(s, m.clone()));
    let l = B::float_sum_dim(e.clone(), 3);
    let out = B::float_matmul(B::float_div(e, l.clone()), v);
    (out, [m, l])
}

/// (dq, dk, dv) for the upstream gradient `d_out`: P = exp(S − max) / Σ recomputed, dP =
/// d_out·vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)): the composed softmax's backward, in its order.
/// (FlashAttention's rowsum(d_out ⊙ out) reads less, but on lavapipe left that run 3.8e-5
/// off; this form 2.6e-5, as Burn's composed attention.)
fn backward<B: Backend>(
    [q, k, v]: [FloatTensor<B>; 3],
    [m, l]: [FloatTensor<B>; 2],
    d_out: FloatTensor<B>,
    (bias, scale): (FloatTensor<B>, f64),
) -> [FloatTensor<B>; 3] {
    let s = scores::<B>(q.clone(), k.clone(), bias, scale);
    let p = B::float_div(B::float_exp(B::float_sub(s, m)), l);
    let dv = B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), d_out.clone());
    let dp = B::float_matmul(d_out.clone(), B::float_swap_dims(v, 2, 3));
    let row = B::float_sum_dim(B::float_mul(dp.clone(), p.clone()), 3);
    let ds = B::float_mul(p, B::float_sub(dp, row));
    let ds = B::float_mul_scalar(ds, Scalar::Float(scale));
    let dq = B::float_matmul(ds.clone(), k);
    let dk = B::float_matmul(B::float_swap_dims(ds, 2, 3), q);
    [dq, dk, dv]
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend> Backward<B, 3> for AttentionBackward {
    /// q, k, v (checkpointed), the rows' max and sum, the bias and the scale.
    type State = ([NodeId; 3], [FloatTensor<B>; 2], (FloatTensor<B>, f64));

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, c: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let (ids, stats, bias) = ops.state;
        let qkv = ids.map(|id| c.retrieve_node_output::<FloatTensor<B>>(id));
        let d = backward::<B>(qkv, stats, d_out, bias);
        for (node, d) in ops.parents.into_iter().zip(d) {
            if let Some(node) = node {
                grads.register::<B>(node.id, d);
            }
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> GpuAttention for Autodiff<B, C> {
    fn gpu_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        // The bias is a constant (`attention_bias`): it gets no gradient.
        let bias = bias.into_primitive();
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&q, &k, &v].map(|x| prep.checkpoint(x));
                let qkv = [q, k, v].map(|x| x.into_primitive());
                let (out, stats) = forward::<B>(qkv, bias.clone(), scale);
                prep.finish((ids, stats, (bias, scale)), out)
            }
            OpsKind::UnTracked(prep) => {
                let qkv = [q, k, v].map(|x| x.into_primitive());
                prep.finish(forward::<B>(qkv, bias, scale).0)
            }
        }
    }
}
