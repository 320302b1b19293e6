//! Causal attention as one op over GQA-stacked query blocks: q [B, kv, g·T, d] against
//! k, v [B, kv, S, d]. Without gradient checkpointing the backward keeps the probabilities P
//! (one [B, kv, g·T, S] tensor per layer); with it, only each row's logsumexp is kept and P is
//! recomputed from q·kᵀ in the backward, as flash attention does: at 4 × 1024 tokens on the
//! SmolLM2 shape that is 151 MB a layer, 4.5 GB a step, for one more q·kᵀ product.

use super::attention_bf16::{self as items, Dims, Setup};
use super::kernels::{self, Causal};
use super::matmul::matmul;
use super::rotary::{self, Heads, Rotary};
use super::{bf16, contiguous, f32s, flex, last_dim, owned};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Flex, TensorMetadata};

fn kt(k: FlexTensor) -> FlexTensor {
    Flex::float_swap_dims(k, 2, 3)
}

/// A padding or packing mask, [B, t, S] (true = hidden), over scores whose rows hold
/// `per_batch` rows a batch.
#[derive(Clone, Copy)]
pub(crate) struct Masked<'a> {
    pub hidden: &'a [bool],
    pub per_batch: usize,
}

/// A score far below any real one, finite so that a row with nothing visible stays finite.
pub(crate) const HIDDEN: f32 = -1e30;

/// O, P and each row's logsumexp.
pub(crate) fn forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    scale: f32,
    causal: Causal,
    mask: Option<Masked>,
) -> (FlexTensor, FlexTensor, Vec<f32>) {
    let mut scores = owned(matmul(q, kt(k)));
    let s = last_dim(&scores);
    let shape = scores.shape();
    if let Some(m) = mask {
        let x = scores.storage_mut::<f32>();
        kernels::fill_masked(x, s, causal.t, m.per_batch, m.hidden, HIDDEN);
    }
    let mut p = kernels::zeroed(f32s(&scores).len());
    let lse = kernels::softmax_forward_lse(f32s(&scores), s, scale, Some(causal), &mut p);
    drop(scores);
    if let Some(m) = mask {
        kernels::fill_masked(&mut p, s, causal.t, m.per_batch, m.hidden, 0.0);
    }
    let p = flex(p, shape);
    (matmul(p.clone(), v), p, lse)
}

/// What the backward has of the probabilities.
#[derive(Debug, Clone)]
pub(crate) enum Probs {
    Kept(FlexTensor),
    Lse(Vec<f32>),
}

#[derive(Debug)]
pub(crate) struct CausalAttention {
    pub scale: f32,
    pub causal: Causal,
}

impl Backward<Flex, 3> for CausalAttention {
    /// q, k, v (checkpointed) and P or the logsumexp.
    type State = ([NodeId; 3], Probs);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, c: &mut Checkpointer) {
        let nodes = ops.parents;
        let d_o = grads.consume::<Flex>(&ops.node);
        let (ids, probs) = ops.state;
        let [q, k, v] = ids.map(|id| c.retrieve_node_output::<FlexTensor>(id));
        let want = [0, 1, 2].map(|i| nodes[i].is_some());
        let dqkv = backward(q, k, v, probs, d_o, (self.scale, self.causal, None), want);
        for (node, g) in nodes.into_iter().zip(dqkv) {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// dq, dk, dv (those `want` asks for) from dO.
pub(crate) fn backward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: Probs,
    d_o: FlexTensor,
    (scale, causal, mask): (f32, Causal, Option<Masked>),
    want: [bool; 3],
) -> [Option<FlexTensor>; 3] {
    let p = match probs {
        Probs::Kept(p) => p,
        Probs::Lse(lse) => {
            let mut p = owned(matmul(q.clone(), kt(k.clone())));
            let s = last_dim(&p);
            let scores = p.storage_mut::<f32>();
            kernels::softmax_recompute(scores, s, scale, Some(causal), &lse);
            // Each entry comes from its own score and the row's logsumexp, so hidden ones
            // need no large negative first, only their zero after.
            if let Some(m) = mask {
                kernels::fill_masked(scores, s, causal.t, m.per_batch, m.hidden, 0.0);
            }
            p
        }
    };
    let dv = want[2].then(|| matmul(kt(p.clone()), d_o.clone()));
    let dp = contiguous(matmul(d_o, kt(v)));
    let s = last_dim(&p);
    let p = contiguous(p);
    let ds = kernels::softmax_backward(f32s(&p), f32s(&dp), s, scale, Some(causal));
    let ds = flex(ds, p.shape());
    drop((p, dp));
    let dk = want[1].then(|| matmul(kt(ds.clone()), q));
    let dq = want[0].then(|| matmul(ds, k));
    [dq, dk, dv]
}

/// The mask over the GQA-stacked scores: all heads of a batch row share it.
fn masked<'a>(hidden: Option<&'a [bool]>, h: &Heads, rope: &Rotary) -> Option<Masked<'a>> {
    hidden.map(|hidden| Masked {
        hidden,
        per_batch: h.heads * rope.t,
    })
}

/// q, k, v as `forward` takes them (q GQA-stacked) from the projected inputs [B, T, width].
fn heads_from(inputs: &[FlexTensor; 3], h: &Heads, rope: &Rotary) -> [FlexTensor; 3] {
    let b = inputs[0].shape()[0];
    let (t, d, kv) = (rope.t, h.d, h.kv_heads);
    let [q, k, v] = rotary::gather(inputs.each_ref().map(f32s), h, rope, b);
    [
        flex(q, [b, kv, h.heads / kv * t, d].into()),
        flex(k, [b, kv, t, d].into()),
        flex(v, [b, kv, t, d].into()),
    ]
}

/// `FusedOps::rotary_attention`'s forward: [B, T, heads·d] and what the backward needs of
/// the probabilities (P itself where `keep` and the f32 path runs; else the logsumexps).
pub(crate) fn rotary_forward(
    inputs: &[FlexTensor; 3],
    h: &Heads,
    rope: &Rotary,
    (scale, mask): (f32, Option<&[bool]>),
    keep: bool,
) -> (FlexTensor, Probs) {
    let b = inputs[0].shape()[0];
    let [q, k, v] = heads_from(inputs, h, rope);
    let causal = Causal {
        t: rope.t,
        offset: 0,
    };
    let (o, probs) = match h.bf16 {
        Some(path) => {
            let st = setup(h, rope, b, (scale, causal, masked(mask, h, rope)), path);
            let (o, lse) = items::forward(f32s(&q), f32s(&k), f32s(&v), st);
            (flex(o, q.shape()), Probs::Lse(lse))
        }
        None => {
            let (o, p, lse) = forward(q, k, v, scale, causal, masked(mask, h, rope));
            let probs = if keep {
                Probs::Kept(p)
            } else {
                Probs::Lse(lse)
            };
            (contiguous(o), probs)
        }
    };
    let out = rotary::merge_heads(f32s(&o), h.heads, rope.t, h.d, false);
    (flex(out, [b, rope.t, h.heads * h.d].into()), probs)
}

/// Its backward: one gradient per distinct input (`input[p]`: which input part p is in).
pub(crate) fn rotary_backward(
    inputs: &[FlexTensor; 3],
    probs: Probs,
    d_out: FlexTensor,
    (h, rope, scale, mask): (&Heads, &Rotary, f32, Option<&[bool]>),
    input: [usize; 3],
) -> Vec<FlexTensor> {
    let (b, t) = (inputs[0].shape()[0], rope.t);
    let [q, k, v] = heads_from(inputs, h, rope);
    let d_out = contiguous(d_out);
    let d_o = rotary::merge_heads(f32s(&d_out), h.heads, t, h.d, true);
    let causal = Causal { t, offset: 0 };
    let mask = masked(mask, h, rope);
    let [dq, dk, dv] = match (h.bf16, probs) {
        (Some(path), Probs::Lse(lse)) => {
            let st = setup(h, rope, b, (scale, causal, mask), path);
            let [sq, sk, sv] = [&q, &k, &v].map(|x| x.shape());
            let [gq, gk, gv] = items::backward([&q, &k, &v].map(f32s), &lse, &d_o, st);
            [flex(gq, sq), flex(gk, sk), flex(gv, sv)]
        }
        (_, probs) => {
            let d_o = flex(d_o, q.shape());
            let grads = backward(q, k, v, probs, d_o, (scale, causal, mask), [true; 3]);
            grads.map(|g| contiguous(g.expect("all three asked for")))
        }
    };
    rotary::scatter([f32s(&dq), f32s(&dk), f32s(&dv)], h, rope, b, input)
        .into_iter()
        .map(|(g, width)| flex(g, [b, t, width].into()))
        .collect()
}

/// The per-item bf16 path's sizes for `heads_from`'s layout.
fn setup<'a>(
    h: &Heads,
    rope: &Rotary,
    b: usize,
    (scale, causal, mask): (f32, Causal, Option<Masked<'a>>),
    path: bf16::Path,
) -> Setup<'a> {
    let dims = Dims {
        items: b * h.kv_heads,
        kv: h.kv_heads,
        rows: h.heads / h.kv_heads * rope.t,
        s: rope.t,
        d: h.d,
    };
    Setup {
        dims,
        scale,
        causal,
        mask,
        path,
    }
}
