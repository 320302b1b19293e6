//! Backward passes of the fused ops on Autodiff<Flex>. Inputs the backward reads are handed
//! to Burn's checkpointer (as its own matmul does), not held: under balanced gradient
//! checkpointing an input made by a cheap op is then dropped and recomputed, which holding
//! it would prevent. Own outputs (softmax probabilities, LoRA's s·x·A, the logsumexp) are
//! kept; the ops are registered compute-bound, so they are never recomputed.

use super::attention::{self, CausalAttention, Probs};
use super::bf16::{self, PackedB};
use super::kernels::{self, Causal, Layout};
use super::matmul::matmul;
use super::packed::PackedWeight;
use super::rotary::{Heads, Rotary};
use super::thin;
use super::{
    contiguous, cross_entropy_forward, f32s, flex, frozen_forward, frozen_input_grad,
    frozen_lora_bf16, frozen_lora_forward, head_loss, last_dim, lora_forward, norm, owned,
    pack_weight, rms_norm_forward, FusedOps,
};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Flex, TensorMetadata};
use std::any::TypeId;
use std::sync::Arc;

/// dx = dy·Wᵀ on the weight's path; W is frozen, so x is not kept.
#[derive(Debug)]
struct FrozenLinear;

impl Backward<Flex, 1> for FrozenLinear {
    type State = Arc<PackedWeight>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            let w = ops.state;
            grads.register::<Flex>(node.id, frozen_input_grad(grad, &w));
        }
    }
}

/// `bf16_train_linear`: dx = dy·Wᵀ on the forward's packing; dW = xᵀ·dy with dy packed, or
/// for a weight stored [out, in] dyᵀ·x with x packed.
#[derive(Debug)]
struct Bf16TrainLinear {
    out_in: bool,
}

impl Backward<Flex, 2> for Bf16TrainLinear {
    /// x (checkpointed) and W's packing from the forward.
    type State = (NodeId, Arc<PackedWeight>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (id, w) = ops.state;
        let (d_in, d_out) = (w.d_in(), w.d_out());
        if let Some(node) = node_w {
            let x = retrieve(c, id);
            let rows = f32s(&x).len() / d_in.max(1);
            let (a, b, shape) = match self.out_in {
                true => ((&dy, d_out), (&x, d_in), [d_out, d_in]),
                false => ((&x, d_in), (&dy, d_out), [d_in, d_out]),
            };
            let b = PackedB::from_rows(f32s(b.0), rows, b.1);
            let path = w
                .path
                .expect("a trainable weight's packing has a bf16 path");
            let dw = bf16::product_t(path, f32s(a.0), rows, a.1, &b);
            grads.register::<Flex>(node.id, flex(dw, shape.into()));
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, frozen_input_grad(dy, &w));
        }
    }
}

/// `linear`: dx = dy·Wᵀ, dW = xᵀ·dy (each only where asked), the transposes as strides.
#[derive(Debug)]
struct F32Linear;

impl Backward<Flex, 2> for F32Linear {
    /// x and W (checkpointed).
    type State = [NodeId; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, c: &mut Checkpointer) {
        use burn::backend::ops::FloatTensorOps;
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let [x, w] = ops.state;
        if let Some(node) = node_w {
            let x = retrieve(c, x);
            grads.register::<Flex>(node.id, matmul(Flex::float_transpose(x), dy.clone()));
        }
        if let Some(node) = node_x {
            let w = retrieve(c, w);
            grads.register::<Flex>(node.id, matmul(dy, Flex::float_transpose(w)));
        }
    }
}

#[derive(Debug)]
struct SwigluPair;

fn retrieve(c: &mut Checkpointer, id: NodeId) -> FlexTensor {
    contiguous(c.retrieve_node_output::<FlexTensor>(id))
}

/// An input kept for a backward: checkpointed, or rounded to bf16 as `T` (plain values, or
/// rows packed for the bf16 kernels), its shape beside it.
enum Saved<T = bf16::Bf16Buf> {
    Node(NodeId),
    Bf16(Arc<T>, burn::tensor::Shape),
}

impl<T> Clone for Saved<T> {
    fn clone(&self) -> Self {
        match self {
            Saved::Node(id) => Saved::Node(*id),
            Saved::Bf16(v, shape) => Saved::Bf16(v.clone(), shape.clone()),
        }
    }
}

impl<T> std::fmt::Debug for Saved<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Saved::Node(id) => write!(f, "Saved::Node({id:?})"),
            Saved::Bf16(_, shape) => write!(f, "Saved::Bf16({shape:?})"),
        }
    }
}

impl Saved {
    fn rounded(t: &FlexTensor) -> Saved {
        Saved::Bf16(Arc::new(bf16::round_all(f32s(t))), t.shape())
    }

    /// The input as f32: retrieved, or widened from its bf16 values.
    fn get(self, c: &mut Checkpointer) -> FlexTensor {
        match self {
            Saved::Node(id) => retrieve(c, id),
            Saved::Bf16(v, shape) => flex(bf16::widen_all(&v), shape),
        }
    }
}

impl Backward<Flex, 2> for SwigluPair {
    type State = (Saved, Saved);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let (g, u) = (ops.state.0.get(c), ops.state.1.get(c));
        let shape = g.shape();
        let (dg, du) = kernels::swiglu_backward(f32s(&g), f32s(&u), f32s(&grad), Layout::Pair);
        if let Some(node) = node_g {
            grads.register::<Flex>(node.id, flex(dg, shape.clone()));
        }
        if let Some(node) = node_u {
            grads.register::<Flex>(node.id, flex(du, shape));
        }
    }
}

#[derive(Debug)]
struct SwigluPacked;

impl Backward<Flex, 1> for SwigluPacked {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let gu = ops.state.get(c);
        let width = *gu.shape().as_slice().last().unwrap() / 2;
        let (dgu, _) =
            kernels::swiglu_backward(f32s(&gu), &[], f32s(&grad), Layout::Packed { width });
        if let Some(node) = node {
            grads.register::<Flex>(node.id, flex(dgu, gu.shape()));
        }
    }
}

#[derive(Debug)]
struct RmsNorm;

impl Backward<Flex, 2> for RmsNorm {
    /// x, w (checkpointed) and each row's 1 / rms.
    type State = (NodeId, NodeId, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, w) = (retrieve(c, ops.state.0), retrieve(c, ops.state.1));
        let want_dw = node_w.is_some();
        let (dx, dw) =
            norm::rms_norm_backward(f32s(&x), f32s(&w), &ops.state.2, f32s(&grad), want_dw);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, flex(dx, x.shape()));
        }
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<Flex>(node.id, flex(dw, w.shape()));
        }
    }
}

#[derive(Debug)]
struct CausalSoftmax {
    scale: f32,
    causal: Causal,
}

impl Backward<Flex, 1> for CausalSoftmax {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let p = ops.state;
        let s = *p.shape().as_slice().last().unwrap();
        let dx = kernels::softmax_backward(f32s(&p), f32s(&grad), s, self.scale, Some(self.causal));
        if let Some(node) = node {
            grads.register::<Flex>(node.id, flex(dx, p.shape()));
        }
    }
}

#[derive(Debug)]
struct LoraLinear {
    scale: f64,
}

impl Backward<Flex, 5> for LoraLinear {
    /// x, xd, w, a, b (checkpointed) and hs = s·(xd·a).
    type State = ([NodeId; 5], FlexTensor);

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, c: &mut Checkpointer) {
        use burn::backend::ops::FloatTensorOps;
        let [node_x, node_xd, node_w, node_a, node_b] = ops.parents.map(|n| n.map(|n| n.id));
        let dy = grads.consume::<Flex>(&ops.node);
        let (ids, hs) = ops.state;
        // Without dropout xd is x: one gradient, the rank-r term added into it in place.
        let shared = ids[0] == ids[1];
        let [x, xd, w, a, b] = ids.map(|id| retrieve(c, id));
        if let Some(node) = node_w {
            grads.register::<Flex>(node, matmul(Flex::float_transpose(x), dy.clone()));
        }
        let low_rank = LowRankGrads {
            hs,
            xd: Xd::F32(xd),
            a,
            b,
            scale: self.scale,
        };
        let base_dx = |dy| owned(matmul(dy, Flex::float_transpose(w)));
        low_rank.backward(
            dy,
            [node_x, node_xd, node_a, node_b],
            shared,
            base_dx,
            grads,
        );
    }
}

/// dx = dy·Wᵀ on the weight's path plus the adapter's terms, as `LoraLinear` (W frozen).
#[derive(Debug)]
struct FrozenLoraLinear {
    scale: f64,
}

/// xd as the backward reads it. A LoRA linear on a bf16 path without dropout keeps the bf16
/// rows its forward product read (half the bytes, what autocast keeps; one packing for every
/// linear reading the same input, `packed_input`), others checkpoint xd.
enum Xd {
    F32(FlexTensor),
    Bf16(Arc<bf16::PackedA>, burn::tensor::Shape),
}

impl Xd {
    fn shape(&self) -> burn::tensor::Shape {
        match self {
            Xd::F32(t) => t.shape(),
            Xd::Bf16(_, shape) => shape.clone(),
        }
    }
}

thread_local! {
    /// The input last packed for a frozen LoRA linear, by its graph node: q, k and v (gate
    /// and up) read one normed input, rounded once and kept once for their backward. Weak:
    /// the backward states own the packing.
    static LAST_PACKED: std::cell::RefCell<Option<(NodeId, std::sync::Weak<bf16::PackedA>)>> =
        const { std::cell::RefCell::new(None) };
}

/// x rounded and packed in bf16, shared with the previous call for the same node.
fn packed_input(node: NodeId, x: FlexTensor, d_in: usize) -> Arc<bf16::PackedA> {
    let hit = LAST_PACKED.with_borrow(|last| {
        last.as_ref()
            .filter(|(n, _)| *n == node)
            .and_then(|(_, p)| p.upgrade())
    });
    if let Some(p) = hit.filter(|p| p.k == d_in) {
        return p;
    }
    let x = contiguous(x);
    let rows = f32s(&x).len() / d_in.max(1);
    let p = Arc::new(bf16::PackedA::rows(f32s(&x), rows, d_in));
    LAST_PACKED.set(Some((node, Arc::downgrade(&p))));
    p
}

impl Backward<Flex, 4> for FrozenLoraLinear {
    /// xd (see `Xd`), a, b (checkpointed; x is not read: W has no gradient), hs =
    /// s·(xd·a), W.
    type State = (
        Saved<bf16::PackedA>,
        [NodeId; 2],
        bool,
        FlexTensor,
        Arc<PackedWeight>,
    );

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, c: &mut Checkpointer) {
        let nodes = ops.parents.map(|n| n.map(|n| n.id));
        let dy = grads.consume::<Flex>(&ops.node);
        let (kept, ids, shared, hs, w) = ops.state;
        let xd = match kept {
            Saved::Node(id) => Xd::F32(retrieve(c, id)),
            Saved::Bf16(p, shape) => Xd::Bf16(p, shape),
        };
        let [a, b] = ids.map(|id| retrieve(c, id));
        let low_rank = LowRankGrads {
            hs,
            xd,
            a,
            b,
            scale: self.scale,
        };
        if let (Some(path), true, [Some(node_x), _, node_a, node_b]) = (w.path, shared, nodes) {
            // dx = dy·Wᵀ + gs·aᵀ in one pass, gs = s·dy·bᵀ from the same packing of dy.
            let dy = contiguous(dy);
            let (d_in, d_out) = (w.d_in(), w.d_out());
            let rows = f32s(&dy).len() / d_out.max(1);
            let (a, b) = (
                contiguous(low_rank.a.clone()),
                contiguous(low_rank.b.clone()),
            );
            let r = last_dim(&a);
            let pdy = bf16::PackedA::rows(f32s(&dy), rows, d_out);
            let bt = PackedB::from_cols(f32s(&b), d_out, r);
            let mut gs = bf16::product_packed(path, &pdy, &bt, None);
            kernels::scale_all(&mut gs, self.scale as f32);
            let at = PackedB::from_cols(f32s(&a), r, d_in);
            let low = (bf16::PackedA::rows(&gs, rows, r), at);
            let gs = flex(gs, [rows, r].into());
            let want = [node_a.is_some(), node_b.is_some()];
            let (dx, factors) = rayon::join(
                || w.input_grad_packed(&pdy, Some((&low.0, &low.1))),
                || low_rank.factors(&dy, &gs, want),
            );
            grads.register::<Flex>(node_x, flex(dx, [rows, d_in].into()));
            register_factors(grads, [node_a, node_b], factors);
            return;
        }
        let base_dx = |dy| frozen_input_grad(dy, &w);
        low_rank.backward(dy, nodes, shared, base_dx, grads);
    }
}

/// What a LoRA path's backward reads besides dy: hs = s·(xd·a) and the tensors.
struct LowRankGrads {
    hs: FlexTensor,
    xd: Xd,
    a: FlexTensor,
    b: FlexTensor,
    scale: f64,
}

impl LowRankGrads {
    /// da = xdᵀ·gs and db = hsᵀ·dy, for gs = s·dy·bᵀ (the gradient at xd·a), as sums of
    /// outer products in f32 on every path ([`thin`]).
    /// [da, db], each where `want` asks for it.
    ///
    /// The sums stream dy and x from memory: callers run them beside the input gradient's
    /// GEMM (`rayon::join`), which is compute-bound, so each fills the other's stalls (phi3-small
    /// `--bf16` LoRA step +14 %).
    fn factors(self, dy: &FlexTensor, gs: &FlexTensor, want: [bool; 2]) -> [Option<FlexTensor>; 2] {
        let r = last_dim(gs);
        let db = want[1].then(|| {
            let (hs, dy) = (contiguous(self.hs), contiguous(dy.clone()));
            let d_out = last_dim(&dy);
            let db = thin::thin_t_wide(f32s(&hs), r, f32s(&dy), d_out);
            flex(db, [r, d_out].into())
        });
        let da = want[0].then(|| {
            let gs = contiguous(gs.clone());
            let (da, d_in) = match self.xd {
                Xd::F32(xd) => {
                    let xd = contiguous(xd);
                    let d_in = last_dim(&xd);
                    (thin::wide_t_thin(f32s(&gs), r, f32s(&xd), d_in), d_in)
                }
                Xd::Bf16(p, _) => {
                    let wide = thin::Wide::Bf16(p.data());
                    let da = thin::wide_rows_t_thin(f32s(&gs), r, wide, p.k, p.stride());
                    (da, p.k)
                }
            };
            flex(da, [d_in, r].into())
        });
        [da, db]
    }

    /// Registers db, da and the input gradients of x (`base_dx(dy)`, the base weight's term)
    /// and xd (the rank-r term), or their sum on x when xd is x (`shared`).
    fn backward(
        self,
        dy: FlexTensor,
        [node_x, node_xd, node_a, node_b]: [Option<NodeId>; 4],
        shared: bool,
        base_dx: impl FnOnce(FlexTensor) -> FlexTensor + Send,
        grads: &mut Gradients,
    ) {
        use burn::backend::ops::FloatTensorOps;
        let t = Flex::float_transpose;
        // gs = s·dy·bᵀ [N, r], the gradient at xd·a.
        let gs = matmul(dy.clone(), t(self.b.clone()));
        let gs = contiguous(Flex::float_mul_scalar(gs, self.scale.into()));
        let shape = self.xd.shape();
        let at = contiguous(t(self.a.clone()));
        let want = [node_a.is_some(), node_b.is_some()];
        let (dx, factors) = rayon::join(
            || node_x.map(|node| (node, base_dx(dy.clone()))),
            || self.factors(&dy, &gs, want),
        );
        register_factors(grads, [node_a, node_b], factors);
        let r = last_dim(&gs);
        // gs·aᵀ added in place onto dy·wᵀ (or zeros) rather than computed as a k = r GEMM.
        let add_low_rank = |mut base: FlexTensor| {
            let cols = last_dim(&base);
            kernels::add_low_rank(base.storage_mut::<f32>(), f32s(&gs), f32s(&at), r, cols);
            base
        };
        match (dx, node_xd) {
            (Some((node, dx)), _) if shared => {
                grads.register::<Flex>(node, add_low_rank(dx));
            }
            (dx, node_xd) => {
                if let Some((node, dx)) = dx {
                    grads.register::<Flex>(node, dx);
                }
                if let Some(node) = node_xd {
                    let zeros = flex(kernels::zeroed(shape.num_elements()), shape);
                    grads.register::<Flex>(node, add_low_rank(zeros));
                }
            }
        }
    }
}

fn register_factors(grads: &mut Gradients, nodes: [Option<NodeId>; 2], g: [Option<FlexTensor>; 2]) {
    for (node, g) in nodes.into_iter().zip(g) {
        if let (Some(node), Some(g)) = (node, g) {
            grads.register::<Flex>(node, g);
        }
    }
}

/// `rotary_attention`: the projected inputs' gradients through attention, RoPE and the head
/// split, one per distinct input (a fused qkv gets one, not three to add up).
#[derive(Debug)]
struct RotaryAttention {
    heads: Heads,
    rope: Arc<Rotary>,
    mask: Option<Arc<Vec<bool>>>,
    scale: f32,
}

impl Backward<Flex, 3> for RotaryAttention {
    /// The inputs (checkpointed) and P or the logsumexp.
    type State = ([NodeId; 3], Probs);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, c: &mut Checkpointer) {
        let nodes = ops.parents.map(|n| n.map(|n| n.id));
        let d_out = grads.consume::<Flex>(&ops.node);
        let (ids, probs) = ops.state;
        // Which input part p is in, numbered in order of first appearance (as `scatter`
        // returns their gradients): parts of one fused qkv share one.
        let mut input = [0; 3];
        let mut firsts = Vec::new();
        for p in 0..3 {
            input[p] = match (0..p).find(|&q| ids[q] == ids[p]) {
                Some(q) => input[q],
                None => {
                    firsts.push(p);
                    firsts.len() - 1
                }
            };
        }
        let inputs = ids.map(|id| retrieve(c, id));
        let (h, rope, mask) = (
            &self.heads,
            &*self.rope,
            self.mask.as_deref().map(|m| &m[..]),
        );
        let g =
            attention::rotary_backward(&inputs, probs, d_out, (h, rope, self.scale, mask), input);
        for (p, grad) in firsts.into_iter().zip(g) {
            if let Some(node) = nodes[p] {
                grads.register::<Flex>(node, grad);
            }
        }
    }
}

#[derive(Debug)]
struct CrossEntropySum;

impl Backward<Flex, 1> for CrossEntropySum {
    type State = (NodeId, Vec<i64>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let g = f32s(&grad)[0];
        let (id, targets, lse) = ops.state;
        let x = retrieve(c, id);
        let v = *x.shape().as_slice().last().unwrap();
        let dx = kernels::cross_entropy_backward(f32s(&x), v, &targets, &lse, g);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, flex(dx, x.shape()));
        }
    }
}

/// `bf16_head_loss`: h's gradient of the summed loss was made in the forward (`head_loss`);
/// the backward scales it by the loss's upstream gradient.
#[derive(Debug)]
struct FrozenHeadLoss;

impl Backward<Flex, 1> for FrozenHeadLoss {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let g = f32s(&grad)[0];
        if let Some(node) = node {
            let mut dh = owned(ops.state);
            kernels::scale_all(dh.storage_mut::<f32>(), g);
            grads.register::<Flex>(node.id, dh);
        }
    }
}

/// Whether attention's backward keeps P under checkpointing strategy C (not under balanced
/// checkpointing, which recomputes it).
fn keeps_probs<C: CheckpointStrategy>() -> bool {
    TypeId::of::<C>() != TypeId::of::<BalancedCheckpointing>()
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn swiglu_pair(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        bf16_saved: bool,
    ) -> FloatTensor<Self> {
        match SwigluPair
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = (!bf16_saved).then(|| [&gate, &up].map(|t| prep.checkpoint(t)));
                let (g, u) = (gate.into_primitive(), up.into_primitive());
                let (g, u) = (contiguous(g), contiguous(u));
                let state = match ids {
                    Some([ig, iu]) => (Saved::Node(ig), Saved::Node(iu)),
                    None => (Saved::rounded(&g), Saved::rounded(&u)),
                };
                prep.finish(state, Flex::swiglu_pair(g, u, false))
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::swiglu_pair(
                gate.into_primitive(),
                up.into_primitive(),
                false,
            )),
        }
    }

    fn swiglu_packed(gate_up: FloatTensor<Self>, bf16_saved: bool) -> FloatTensor<Self> {
        match SwigluPacked
            .prepare::<C>([gate_up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = (!bf16_saved).then(|| prep.checkpoint(&gate_up));
                let gu = contiguous(gate_up.into_primitive());
                let state = id.map_or_else(|| Saved::rounded(&gu), Saved::Node);
                prep.finish(state, Flex::swiglu_packed(gu, false))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::swiglu_packed(gate_up.into_primitive(), false))
            }
        }
    }

    fn causal_softmax(
        scores: FloatTensor<Self>,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> FloatTensor<Self> {
        let back = CausalSoftmax {
            scale: scale as f32,
            causal: Causal { t, offset },
        };
        match back
            .prepare::<C>([scores.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let p = Flex::causal_softmax(scores.into_primitive(), scale, t, offset);
                prep.finish(p.clone(), p)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::causal_softmax(
                scores.into_primitive(),
                scale,
                t,
                offset,
            )),
        }
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        t: usize,
        offset: usize,
    ) -> FloatTensor<Self> {
        let back = CausalAttention {
            scale: scale as f32,
            causal: Causal { t, offset },
        };
        match back
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&q, &k, &v].map(|t| prep.checkpoint(t));
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let causal = Causal { t, offset };
                let keep = keeps_probs::<C>();
                let (o, probs) = attention::forward(q, k, v, (scale as f32, causal), keep);
                prep.finish((ids, probs), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::causal_attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                scale,
                t,
                offset,
            )),
        }
    }

    fn rotary_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: Heads,
        rope: Arc<Rotary>,
        mask: Option<Arc<Vec<bool>>>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let back = RotaryAttention {
            heads,
            rope: rope.clone(),
            mask: mask.clone(),
            scale: scale as f32,
        };
        match back
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&q, &k, &v].map(|t| prep.checkpoint(t));
                let inputs = [q, k, v].map(|t| contiguous(t.into_primitive()));
                let hidden = mask.as_deref().map(|m| &m[..]);
                let keep = keeps_probs::<C>();
                let (o, probs) =
                    attention::rotary_forward(&inputs, &heads, &rope, (scale as f32, hidden), keep);
                prep.finish((ids, probs), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::rotary_attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                heads,
                rope,
                mask,
                scale,
            )),
        }
    }

    fn lora_linear(
        x: FloatTensor<Self>,
        xd: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        match (LoraLinear { scale })
            .prepare::<C>([x.node(), xd.node(), w.node(), a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&x, &xd, &w, &a, &b].map(|t| prep.checkpoint(t));
                let (x, xd, w, a, b) = (
                    x.into_primitive(),
                    xd.into_primitive(),
                    w.into_primitive(),
                    a.into_primitive(),
                    b.into_primitive(),
                );
                let (y, hs) = lora_forward(owned(matmul(x, w)), xd, a, b, scale);
                prep.finish((ids, hs), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::lora_linear(
                x.into_primitive(),
                xd.into_primitive(),
                w.into_primitive(),
                a.into_primitive(),
                b.into_primitive(),
                scale,
            )),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        match RmsNorm
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let (ix, iw) = (prep.checkpoint(&x), prep.checkpoint(&w));
                let (y, inv) = rms_norm_forward(x.into_primitive(), w.into_primitive(), eps);
                prep.finish((ix, iw, inv), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::rms_norm(x.into_primitive(), w.into_primitive(), eps))
            }
        }
    }

    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        match F32Linear
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&x, &w].map(|t| prep.checkpoint(t));
                prep.finish(ids, matmul(x.into_primitive(), w.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(matmul(x.into_primitive(), w.into_primitive())),
        }
    }

    fn frozen_linear(x: FloatTensor<Self>, w: Arc<PackedWeight>) -> FloatTensor<Self> {
        match FrozenLinear
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = Flex::frozen_linear(x.into_primitive(), w.clone());
                prep.finish(w, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::frozen_linear(x.into_primitive(), w)),
        }
    }

    fn frozen_head_loss(
        h: FloatTensor<Self>,
        w: Arc<PackedWeight>,
        targets: Vec<i64>,
    ) -> FloatTensor<Self> {
        match FrozenHeadLoss
            .prepare::<C>([h.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let h = contiguous(h.into_primitive());
                let shape = h.shape();
                let (sum, dh) = head_loss::head_loss(f32s(&h), &w, &targets, true);
                let dh = dh.expect("asked for h's gradient");
                prep.finish(flex(dh, shape), flex(vec![sum], [1].into()))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::frozen_head_loss(h.into_primitive(), w, targets))
            }
        }
    }

    fn bf16_train_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        out_in: bool,
        path: bf16::Path,
    ) -> FloatTensor<Self> {
        match (Bf16TrainLinear { out_in })
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = prep.checkpoint(&x);
                let w = Arc::new(pack_weight(w.into_primitive(), out_in, path));
                let y = frozen_forward(x.into_primitive(), &w);
                prep.finish((id, w), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::bf16_train_linear(
                x.into_primitive(),
                w.into_primitive(),
                out_in,
                path,
            )),
        }
    }

    fn frozen_lora_linear(
        x: FloatTensor<Self>,
        xd: FloatTensor<Self>,
        w: Arc<PackedWeight>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        match (FrozenLoraLinear { scale })
            .prepare::<C>([x.node(), xd.node(), a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let shared = x.node().id() == xd.node().id();
                let ids = [&a, &b].map(|t| prep.checkpoint(t));
                let (a, b) = (a.into_primitive(), b.into_primitive());
                if let (true, Some(path)) = (shared, w.path) {
                    let shape = x.shape();
                    let px = packed_input(x.node().id(), x.into_primitive(), w.d_in());
                    let (y, hs) = frozen_lora_bf16(path, (&px, None), &w, (a, b, scale));
                    let kept = Saved::Bf16(px, shape);
                    return prep.finish((kept, ids, shared, hs, w), y);
                }
                let kept = Saved::Node(prep.checkpoint(&xd));
                let xd = (!shared).then(|| xd.into_primitive());
                let (y, hs) = frozen_lora_forward(x.into_primitive(), xd, &w, a, b, scale);
                prep.finish((kept, ids, shared, hs, w), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::frozen_lora_linear(
                x.into_primitive(),
                xd.into_primitive(),
                w,
                a.into_primitive(),
                b.into_primitive(),
                scale,
            )),
        }
    }

    fn cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<i64>) -> FloatTensor<Self> {
        match CrossEntropySum
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = prep.checkpoint(&logits);
                let x = contiguous(logits.into_primitive());
                let (sum, lse) = cross_entropy_forward(&x, &targets);
                prep.finish((id, targets, lse), sum)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::cross_entropy_sum(logits.into_primitive(), targets))
            }
        }
    }
}
