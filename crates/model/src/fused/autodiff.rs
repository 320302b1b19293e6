//! Backward passes of the fused ops on Autodiff<Flex>. Each op keeps what its backward reads
//! (swiglu: its inputs; softmax: its output; cross-entropy: the logits and per-row logsumexp)
//! and is registered compute-bound, so balanced checkpointing keeps rather than recomputes it.

use super::kernels::{self, Causal, Layout};
use super::{contiguous, f32s, flex, FusedOps};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Flex, TensorMetadata};

#[derive(Debug)]
struct SwigluPair;

impl Backward<Flex, 2> for SwigluPair {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let (g, u) = ops.state;
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
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let gu = ops.state;
        let width = *gu.shape().as_slice().last().unwrap() / 2;
        let (dgu, _) =
            kernels::swiglu_backward(f32s(&gu), &[], f32s(&grad), Layout::Packed { width });
        if let Some(node) = node {
            grads.register::<Flex>(node.id, flex(dgu, gu.shape()));
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
struct CrossEntropySum;

impl Backward<Flex, 1> for CrossEntropySum {
    type State = (FlexTensor, Vec<i64>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let g = f32s(&grad)[0];
        let (x, targets, lse) = ops.state;
        let v = *x.shape().as_slice().last().unwrap();
        let dx = kernels::cross_entropy_backward(f32s(&x), v, &targets, &lse, g);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, flex(dx, x.shape()));
        }
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn swiglu_pair(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwigluPair
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (g, u) = (
                    contiguous(gate.into_primitive()),
                    contiguous(up.into_primitive()),
                );
                let out = Flex::swiglu_pair(g.clone(), u.clone());
                prep.finish((g, u), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::swiglu_pair(
                gate.into_primitive(),
                up.into_primitive(),
            )),
        }
    }

    fn swiglu_packed(gate_up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwigluPacked
            .prepare::<C>([gate_up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let gu = contiguous(gate_up.into_primitive());
                let out = Flex::swiglu_packed(gu.clone());
                prep.finish(gu, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::swiglu_packed(gate_up.into_primitive())),
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

    fn cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<i64>) -> FloatTensor<Self> {
        match CrossEntropySum
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = contiguous(logits.into_primitive());
                let v = *x.shape().as_slice().last().unwrap();
                let (loss, lse) = kernels::cross_entropy_forward(f32s(&x), v, &targets);
                let sum = loss.iter().map(|&l| l as f64).sum::<f64>() as f32;
                prep.finish((x, targets, lse), flex(vec![sum], [1].into()))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::cross_entropy_sum(logits.into_primitive(), targets))
            }
        }
    }
}
