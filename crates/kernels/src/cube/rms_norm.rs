//! RMSNorm on CubeCL devices. Composed, it is a square, a mean, a sqrt, a reciprocal and two
//! products, with [N, D] intermediates kept for the backward; here the forward reads each row
//! twice in one cube and keeps only 1/rms per row [N] (x and w go to the checkpointer), and
//! the backward is one cube per row for dx and one unit per column for dw.

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

use super::{empty, grid, per_row, row_grid, rows};

#[backend_extension(Cube, Autodiff, Fusion)]
pub trait CubeRmsNorm: Backend {
    /// x / sqrt(mean(x²) + eps) · w over the rows of x [N, D], w [D].
    #[fusion(dtype = x, shape = x)]
    fn cube_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
}

#[backend_extension(Cube, Fusion)]
pub trait CubeRmsNormGrad: Backend {
    /// (`cube_rms_norm`, each row's 1 / sqrt(mean(x²) + eps) [N]).
    #[fusion(meta = |x, _w, _eps| (x.clone(), per_row(x)))]
    fn cube_rms_norm_rstd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// (dx, dw) for the upstream gradient dy [N, D].
    #[fusion(meta = |x, w, _rstd, _dy| (x.clone(), w.clone()))]
    fn cube_rms_norm_grad(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

mod kernels {
    use cubecl::prelude::*;

    /// Σ of each unit's strided share of `row_sum`'s terms, totalled by every unit from
    /// shared memory (so all of them go on with the row's value).
    #[cube]
    fn cube_total(part: f32, #[comptime] units: usize) -> f32 {
        let mut sums = Shared::<[f32]>::new_slice(units);
        sums[UNIT_POS as usize] = part;
        sync_cube();
        let mut total = f32::new(0.0);
        for k in 0..units {
            total += sums[k];
        }
        total
    }

    /// One cube per row: y = x·r·w with r = 1 / sqrt(mean(x²) + eps), r kept.
    #[cube(launch)]
    pub fn rms_rows(
        x: &Tensor<f32>,
        w: &Tensor<f32>,
        y: &mut Tensor<f32>,
        rstd: &mut Tensor<f32>,
        eps: f32,
        #[comptime] units: usize,
    ) {
        let row = CUBE_POS;
        if row >= rstd.len() {
            terminate!();
        }
        let d = w.len();
        let base = row * d;
        let mut part = f32::new(0.0);
        let mut j = UNIT_POS as usize;
        while j < d {
            let v = x[base + j];
            part += v * v;
            j += units;
        }
        let total = cube_total(part, units);
        let r = 1.0f32 / (total / f32::cast_from(d) + eps).sqrt();
        if UNIT_POS == 0 {
            rstd[row] = r;
        }
        let mut j = UNIT_POS as usize;
        while j < d {
            y[base + j] = x[base + j] * r * w[j];
            j += units;
        }
    }

    /// One cube per row: dx = r·w·dy − x·r³·mean(dy·w·x).
    #[cube(launch)]
    pub fn rms_rows_grad(
        x: &Tensor<f32>,
        w: &Tensor<f32>,
        rstd: &Tensor<f32>,
        dy: &Tensor<f32>,
        dx: &mut Tensor<f32>,
        #[comptime] units: usize,
    ) {
        let row = CUBE_POS;
        if row >= rstd.len() {
            terminate!();
        }
        let d = w.len();
        let base = row * d;
        let mut part = f32::new(0.0);
        let mut j = UNIT_POS as usize;
        while j < d {
            part += dy[base + j] * w[j] * x[base + j];
            j += units;
        }
        let total = cube_total(part, units);
        let r = rstd[row];
        let c = r * r * r * total / f32::cast_from(d);
        let mut j = UNIT_POS as usize;
        while j < d {
            dx[base + j] = r * w[j] * dy[base + j] - x[base + j] * c;
            j += units;
        }
    }

    /// One unit per column: dw = Σ over rows of dy·x·r.
    #[cube(launch)]
    pub fn rms_w_grad(x: &Tensor<f32>, rstd: &Tensor<f32>, dy: &Tensor<f32>, dw: &mut Tensor<f32>) {
        let j = ABSOLUTE_POS;
        if j < dw.len() {
            let d = dw.len();
            let mut acc = f32::new(0.0);
            for r in 0..rstd.len() {
                acc += dy[r * d + j] * x[r * d + j] * rstd[r];
            }
            dw[j] = acc;
        }
    }
}

fn dims(x: &CubeTensor, w: &CubeTensor) -> (usize, usize) {
    let [n, d] = x.shape().dims::<2>();
    assert_eq!(
        w.shape().num_elements(),
        d,
        "RMSNorm: rows of {d}, weight of {}",
        w.shape()
    );
    (n, d)
}

fn rms_rows(x: CubeTensor, w: CubeTensor, eps: f64) -> (CubeTensor, CubeTensor) {
    let (x, w) = (rows(x), rows(w));
    let (n, d) = dims(&x, &w);
    let (y, rstd) = (empty(&x, x.shape()), empty(&x, Shape::new([n])));
    if n * d > 0 {
        let (count, dim, units) = row_grid(&x, n);
        let client = x.client.clone();
        kernels::rms_rows::launch(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            eps as f32,
            units as usize,
        );
    }
    (y, rstd)
}

impl CubeRmsNorm for CubeBackend {
    fn cube_rms_norm(x: CubeTensor, w: CubeTensor, eps: f64) -> CubeTensor {
        rms_rows(x, w, eps).0
    }
}

impl CubeRmsNormGrad for CubeBackend {
    fn cube_rms_norm_rstd(x: CubeTensor, w: CubeTensor, eps: f64) -> (CubeTensor, CubeTensor) {
        rms_rows(x, w, eps)
    }

    fn cube_rms_norm_grad(
        x: CubeTensor,
        w: CubeTensor,
        rstd: CubeTensor,
        dy: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let [x, w, rstd, dy] = [x, w, rstd, dy].map(rows);
        let (n, d) = dims(&x, &w);
        let (dx, dw) = (empty(&x, x.shape()), empty(&w, w.shape()));
        if n * d > 0 {
            let (count, dim, units) = row_grid(&x, n);
            let client = x.client.clone();
            kernels::rms_rows_grad::launch(
                &client,
                count,
                dim,
                x.clone().into_tensor_arg(),
                w.into_tensor_arg(),
                rstd.clone().into_tensor_arg(),
                dy.clone().into_tensor_arg(),
                dx.clone().into_tensor_arg(),
                units as usize,
            );
            let (count, dim) = grid(&dw, d);
            kernels::rms_w_grad::launch(
                &client,
                count,
                dim,
                x.into_tensor_arg(),
                rstd.into_tensor_arg(),
                dy.into_tensor_arg(),
                dw.clone().into_tensor_arg(),
            );
        }
        (dx, dw)
    }
}

/// x and w go to the checkpointer (as the CPU path's); the rows' 1/rms [N] is kept.
#[derive(Debug)]
struct RmsNormBackward;

impl<B: CubeRmsNormGrad> Backward<B, 2> for RmsNormBackward {
    type State = ([NodeId; 2], FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, c: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (ids, rstd) = ops.state;
        let [x, w] = ids.map(|id| c.retrieve_node_output::<FloatTensor<B>>(id));
        let (dx, dw) = B::cube_rms_norm_grad(x, w, rstd, dy);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, dw);
        }
    }
}

impl<B, C> CubeRmsNorm for Autodiff<B, C>
where
    B: CubeRmsNorm + CubeRmsNormGrad,
    C: CheckpointStrategy,
{
    fn cube_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        match RmsNormBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [&x, &w].map(|t| prep.checkpoint(t));
                let (y, rstd) = B::cube_rms_norm_rstd(x.into_primitive(), w.into_primitive(), eps);
                prep.finish((ids, rstd), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cube_rms_norm(
                x.into_primitive(),
                w.into_primitive(),
                eps,
            )),
        }
    }
}
