//! SwiGLU on CubeCL devices: one elementwise kernel forward and one backward, where the
//! composed op is a sigmoid, two products (and for the packed form two slices) each way, with
//! every intermediate kept for the backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, TensorMetadata};
use burn::tensor::Shape;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;

use super::{empty, grid, rows};

#[backend_extension(Cube, Autodiff, Fusion)]
pub trait CubeSwiglu: Backend {
    /// silu(gate)·up over two f32 tensors of one shape.
    #[fusion(dtype = gate, shape = gate)]
    fn cube_swiglu_pair(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// silu(gate)·up where each row of `gate_up` is gate then up: [.., 2w] → [.., w].
    #[fusion(dtype = gate_up, shape = half_last(gate_up))]
    fn cube_swiglu_packed(gate_up: FloatTensor<Self>) -> FloatTensor<Self>;
}

#[backend_extension(Cube, Fusion)]
pub trait CubeSwigluGrad: Backend {
    /// (d gate, d up) of silu(gate)·up for the upstream gradient `grad`.
    #[fusion(meta = |gate, up, _| (gate.clone(), up.clone()))]
    fn cube_swiglu_pair_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// d gate_up of the packed form, laid out as gate_up.
    #[fusion(dtype = gate_up, shape = gate_up)]
    fn cube_swiglu_packed_grad(
        gate_up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// [.., 2w] → [.., w]: the packed form's output shape (also what the Fusion wrapper reports
/// before the kernel runs).
pub fn half_last(shape: &Shape) -> Shape {
    let mut out = shape.clone();
    let d = out.num_dims() - 1;
    out[d] /= 2;
    out
}

mod kernels {
    use cubecl::prelude::*;

    // Left operands are suffixed literals: the macro types a literal from the other operand,
    // and on the left there is none yet.
    #[cube]
    fn sigmoid(x: f32) -> f32 {
        1.0f32 / (1.0f32 + (-x).exp())
    }

    #[cube(launch)]
    pub fn swiglu_pair(gate: &Tensor<f32>, up: &Tensor<f32>, out: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i < out.len() {
            let g = gate[i];
            out[i] = g * sigmoid(g) * up[i];
        }
    }

    /// One unit per output element; its gate sits at the same column of its row's first
    /// half, its up `width` further on.
    #[cube(launch)]
    pub fn swiglu_packed(gate_up: &Tensor<f32>, out: &mut Tensor<f32>, width: u32) {
        let i = ABSOLUTE_POS;
        if i < out.len() {
            let w = width as usize;
            let at = i / w * 2 * w + i % w;
            let g = gate_up[at];
            out[i] = g * sigmoid(g) * gate_up[at + w];
        }
    }

    /// d up = dy·silu(g); d gate = dy·u·silu'(g), silu'(g) = s·(1 + g·(1 − s)) for s = σ(g).
    #[cube(launch)]
    pub fn swiglu_pair_grad(
        gate: &Tensor<f32>,
        up: &Tensor<f32>,
        grad: &Tensor<f32>,
        d_gate: &mut Tensor<f32>,
        d_up: &mut Tensor<f32>,
    ) {
        let i = ABSOLUTE_POS;
        if i < grad.len() {
            let g = gate[i];
            let s = sigmoid(g);
            let d = grad[i];
            d_up[i] = d * g * s;
            d_gate[i] = d * up[i] * s * (1.0f32 + g * (1.0f32 - s));
        }
    }

    /// `swiglu_pair_grad` per element of the packed form's upstream gradient [.., w], both
    /// halves of d gate_up written by the unit that reads them.
    #[cube(launch)]
    pub fn swiglu_packed_grad(
        gate_up: &Tensor<f32>,
        grad: &Tensor<f32>,
        d_gate_up: &mut Tensor<f32>,
        width: u32,
    ) {
        let i = ABSOLUTE_POS;
        if i < grad.len() {
            let w = width as usize;
            let at = i / w * 2 * w + i % w;
            let g = gate_up[at];
            let u = gate_up[at + w];
            let s = sigmoid(g);
            let d = grad[i];
            d_gate_up[at] = d * u * s * (1.0f32 + g * (1.0f32 - s));
            d_gate_up[at + w] = d * g * s;
        }
    }
}

/// The packed form's half width, for [.., 2w].
fn half_width(gate_up: &CubeTensor) -> u32 {
    let last = *gate_up.shape().as_slice().last().expect("rank ≥ 1");
    assert!(
        last.is_multiple_of(2),
        "gate_up's last dim {last} is not two halves"
    );
    u32::try_from(last / 2).expect("a width that fits u32")
}

impl CubeSwiglu for CubeBackend {
    fn cube_swiglu_pair(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
        let (gate, up) = (rows(gate), rows(up));
        assert_eq!(gate.shape(), up.shape(), "gate and up differ in shape");
        let out = empty(&gate, gate.shape());
        let n = out.shape().num_elements();
        if n > 0 {
            let (count, dim) = grid(&out, n);
            kernels::swiglu_pair::launch(
                &out.client,
                count,
                dim,
                gate.into_tensor_arg(),
                up.into_tensor_arg(),
                out.clone().into_tensor_arg(),
            );
        }
        out
    }

    fn cube_swiglu_packed(gate_up: CubeTensor) -> CubeTensor {
        let gate_up = rows(gate_up);
        let width = half_width(&gate_up);
        let out = empty(&gate_up, half_last(&gate_up.shape()));
        let n = out.shape().num_elements();
        if n > 0 {
            let (count, dim) = grid(&out, n);
            kernels::swiglu_packed::launch(
                &out.client,
                count,
                dim,
                gate_up.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                width,
            );
        }
        out
    }
}

impl CubeSwigluGrad for CubeBackend {
    fn cube_swiglu_pair_grad(
        gate: CubeTensor,
        up: CubeTensor,
        grad: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let [gate, up, grad] = [gate, up, grad].map(rows);
        let (d_gate, d_up) = (empty(&gate, gate.shape()), empty(&gate, gate.shape()));
        let n = grad.shape().num_elements();
        if n > 0 {
            let (count, dim) = grid(&grad, n);
            let client = grad.client.clone();
            kernels::swiglu_pair_grad::launch(
                &client,
                count,
                dim,
                gate.into_tensor_arg(),
                up.into_tensor_arg(),
                grad.into_tensor_arg(),
                d_gate.clone().into_tensor_arg(),
                d_up.clone().into_tensor_arg(),
            );
        }
        (d_gate, d_up)
    }

    fn cube_swiglu_packed_grad(gate_up: CubeTensor, grad: CubeTensor) -> CubeTensor {
        let (gate_up, grad) = (rows(gate_up), rows(grad));
        let width = half_width(&gate_up);
        let d_gate_up = empty(&gate_up, gate_up.shape());
        let n = grad.shape().num_elements();
        if n > 0 {
            let (count, dim) = grid(&grad, n);
            let client = grad.client.clone();
            kernels::swiglu_packed_grad::launch(
                &client,
                count,
                dim,
                gate_up.into_tensor_arg(),
                grad.into_tensor_arg(),
                d_gate_up.clone().into_tensor_arg(),
                width,
            );
        }
        d_gate_up
    }
}

/// Backward of `cube_swiglu_pair`: gate and up are handed to the checkpointer (as the CPU
/// path does), so under balanced checkpointing a cheaply made input is recomputed, not held.
#[derive(Debug)]
struct PairBackward;

impl<B: CubeSwigluGrad> Backward<B, 2> for PairBackward {
    type State = [NodeId; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let [g, u] = ops
            .state
            .map(|id| c.retrieve_node_output::<FloatTensor<B>>(id));
        let (dg, du) = B::cube_swiglu_pair_grad(g, u, grad);
        if let Some(node) = node_g {
            grads.register::<B>(node.id, dg);
        }
        if let Some(node) = node_u {
            grads.register::<B>(node.id, du);
        }
    }
}

#[derive(Debug)]
struct PackedBackward;

impl<B: CubeSwigluGrad> Backward<B, 1> for PackedBackward {
    type State = NodeId;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            let gu = c.retrieve_node_output::<FloatTensor<B>>(ops.state);
            grads.register::<B>(node.id, B::cube_swiglu_packed_grad(gu, grad));
        }
    }
}

impl<B, C> CubeSwiglu for Autodiff<B, C>
where
    B: CubeSwiglu + CubeSwigluGrad,
    C: CheckpointStrategy,
{
    fn cube_swiglu_pair(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match PairBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&gate, &up].map(|t| prep.checkpoint(t));
                let out = B::cube_swiglu_pair(gate.into_primitive(), up.into_primitive());
                prep.finish(ids, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cube_swiglu_pair(
                gate.into_primitive(),
                up.into_primitive(),
            )),
        }
    }

    fn cube_swiglu_packed(gate_up: FloatTensor<Self>) -> FloatTensor<Self> {
        match PackedBackward
            .prepare::<C>([gate_up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = prep.checkpoint(&gate_up);
                prep.finish(id, B::cube_swiglu_packed(gate_up.into_primitive()))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::cube_swiglu_packed(gate_up.into_primitive()))
            }
        }
    }
}
