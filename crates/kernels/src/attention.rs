//! Causal attention as one op over GQA-stacked query blocks: q [B, kv, g·T, d] against
//! k, v [B, kv, S, d], run in row blocks (`attention_blocks`). Without gradient checkpointing
//! the f32 backward keeps the blocks' probabilities P (close to half of a [B, kv, g·T, S]
//! tensor a layer); with it, and on bf16, only each row's logsumexp is kept and P is
//! recomputed in the backward, as flash attention does: at 4 × 1024 tokens on the SmolLM2
//! shape that saves about 75 MB a layer for one more q·kᵀ product.

pub(crate) use super::attention_blocks::Probs;
use super::attention_blocks::{self as blocks, Dims, Setup};
use super::kernels::Causal;
use super::rotary::{self, Heads, Rotary};
use super::{contiguous, f32s, flex};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::{Flex, TensorMetadata};

/// A padding or packing mask, [B, t, S] (true = hidden), over scores whose rows hold
/// `per_batch` rows a batch.
#[derive(Clone, Copy)]
pub(crate) struct Masked<'a> {
    pub hidden: &'a [bool],
    pub per_batch: usize,
}

/// A score far below any real one, finite so that a row with nothing visible stays finite.
pub(crate) const HIDDEN: f32 = -1e30;

/// The f32 setup for q [B, kv, rows, d] against k [B, kv, s, d].
fn setup_of(q: &FlexTensor, k: &FlexTensor, scale: f32, causal: Causal) -> Setup<'static> {
    let (sq, sk) = (q.shape(), k.shape());
    let dims = Dims {
        items: sq[0] * sq[1],
        rows: sq[2],
        s: sk[2],
        d: sq[3],
    };
    Setup {
        dims,
        scale,
        causal,
        mask: None,
        bf16: None,
    }
}

/// O [B, kv, rows, d] and what the backward needs of P (the blocks' P where `keep`).
pub(crate) fn forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    (scale, causal): (f32, Causal),
    keep: bool,
) -> (FlexTensor, Probs) {
    let [q, k, v] = [q, k, v].map(contiguous);
    let st = setup_of(&q, &k, scale, causal);
    let (o, probs) = blocks::forward(f32s(&q), f32s(&k), f32s(&v), st, keep);
    (flex(o, q.shape()), probs)
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
        let d_o = contiguous(grads.consume::<Flex>(&ops.node));
        let (ids, probs) = ops.state;
        let [q, k, v] = ids.map(|id| contiguous(c.retrieve_node_output::<FlexTensor>(id)));
        let st = setup_of(&q, &k, self.scale, self.causal);
        let g = blocks::backward([&q, &k, &v].map(f32s), &probs, f32s(&d_o), st);
        let shapes = [&q, &k, &v].map(|x| x.shape());
        for ((node, g), shape) in nodes.into_iter().zip(g).zip(shapes) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, flex(g, shape));
            }
        }
    }
}

/// The mask over the GQA-stacked scores: all heads of a batch row share it.
fn masked<'a>(hidden: Option<&'a [bool]>, h: &Heads, rope: &Rotary) -> Option<Masked<'a>> {
    hidden.map(|hidden| Masked {
        hidden,
        per_batch: h.heads * rope.t,
    })
}

/// q, k, v as `attention_blocks` takes them (q GQA-stacked) from the projected inputs
/// [B, T, width].
fn heads_from(inputs: &[FlexTensor; 3], h: &Heads, rope: &Rotary) -> [Vec<f32>; 3] {
    let b = inputs[0].shape()[0];
    rotary::gather(inputs.each_ref().map(f32s), h, rope, b)
}

/// `FusedOps::rotary_attention`'s forward: [B, T, heads·d] and what the backward needs of
/// the probabilities (the blocks' P where `keep` and the f32 path runs; else the
/// logsumexps).
pub(crate) fn rotary_forward(
    inputs: &[FlexTensor; 3],
    h: &Heads,
    rope: &Rotary,
    (scale, mask): (f32, Option<&[bool]>),
    keep: bool,
) -> (FlexTensor, Probs) {
    let b = inputs[0].shape()[0];
    let [q, k, v] = heads_from(inputs, h, rope);
    let st = setup(h, rope, b, (scale, masked(mask, h, rope)));
    let (o, probs) = blocks::forward(&q, &k, &v, st, keep);
    let out = rotary::merge_heads(&o, h.heads, rope.t, h.d, false);
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
    let st = setup(h, rope, b, (scale, masked(mask, h, rope)));
    let [dq, dk, dv] = blocks::backward([&q, &k, &v], &probs, &d_o, st);
    rotary::scatter([&dq, &dk, &dv], h, rope, b, input)
        .into_iter()
        .map(|(g, width)| flex(g, [b, t, width].into()))
        .collect()
}

/// The blocks' sizes for `heads_from`'s layout, on `h`'s products (bf16 or f32).
fn setup<'a>(
    h: &Heads,
    rope: &Rotary,
    b: usize,
    (scale, mask): (f32, Option<Masked<'a>>),
) -> Setup<'a> {
    let dims = Dims {
        items: b * h.kv_heads,
        rows: h.heads / h.kv_heads * rope.t,
        s: rope.t,
        d: h.d,
    };
    let causal = Causal {
        t: rope.t,
        offset: 0,
    };
    Setup {
        dims,
        scale,
        causal,
        mask,
        bf16: h.bf16,
    }
}
