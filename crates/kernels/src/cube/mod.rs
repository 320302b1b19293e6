//! Our ops on Burn's CubeCL backends (`--features vulkan`, or `cuda`): SwiGLU, RMSNorm and
//! cross-entropy as CubeCL kernels, forward and backward, f32; causal attention with a
//! backward of its own, from the backend's tensor ops.
//!
//! Each op is two extension traits of its own rather than a `Cube` selector on `FusedOps`: a
//! backend a trait is routed to must implement all of its methods, and `FusedOps`' others take
//! CPU-side packed weights and rotary tables. Burn's `Cube` backend is `Fusion<CubeBackend>`
//! (burn-wgpu turns on burn-cubecl's `fusion`), so the kernels are written for `CubeBackend`
//! and the macro's `Fusion` wrapper records each call as an opaque op in the fusion stream.
//! The backward kernels are a second trait without `Autodiff`: only the backward passes here
//! call them, on the inner backend, and they have no derivative of their own.

mod attention;
mod cross_entropy;
mod head_loss;
mod rms_norm;
mod swiglu;

pub use attention::GpuAttention;
pub use cross_entropy::CubeCrossEntropy;
pub use head_loss::GpuHeadLoss;
pub use rms_norm::CubeRmsNorm;
pub use swiglu::CubeSwiglu;

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::DispatchDevice;
use burn::tensor::{DType, Device, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim};

/// Whether `device` runs these kernels: a CubeCL device, with or without autodiff.
pub fn on_cube(device: &Device) -> bool {
    match device.as_dispatch() {
        DispatchDevice::Cube(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Cube(_)),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The kernels index every float tensor as one row-major f32 buffer.
fn rows(t: CubeTensor) -> CubeTensor {
    assert_eq!(t.dtype, DType::F32, "our CubeCL kernels take f32");
    into_contiguous(t)
}

fn empty(like: &CubeTensor, shape: Shape) -> CubeTensor {
    let (client, device) = (like.client.clone(), like.device.clone());
    empty_device_contiguous_dtype(client, device, shape, DType::F32)
}

/// One unit per element of `n`, in cubes sized as Burn sizes its own elementwise kernels.
fn grid(t: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&t.client, n);
    (
        cubecl::calculate_cube_count_elemwise(&t.client, n, dim),
        dim,
    )
}

/// Units per cube of the row kernels (cross-entropy, RMSNorm): enough to keep a GPU's lanes
/// busy on a row of thousands, few enough for every Vulkan device's workgroup limit (≥ 128 by
/// the spec's minimum).
const UNITS: u32 = 128;

/// One cube per row of `n`, rows past a grid dimension's 65535 cubes wrapping into y (the
/// kernels read CUBE_POS), and the units per cube, which the kernels take as a comptime size.
fn row_grid(t: &CubeTensor, n: usize) -> (CubeCount, CubeDim, u32) {
    let x = n.min(65_535);
    let units = UNITS.min(t.client.properties().hardware.max_cube_dim.0);
    let count = CubeCount::Static(x as u32, n.div_ceil(x) as u32, 1);
    (count, CubeDim::new_1d(units), units)
}

/// [N, ..] → [N].
pub fn first_dim(shape: &Shape) -> Shape {
    Shape::new([shape[0]])
}

/// Any shape → [1] (a summed loss).
pub fn one(_: &Shape) -> Shape {
    Shape::new([1])
}

/// A per-row output's metadata for the Fusion wrappers: [N] of `x`'s dtype.
fn per_row(x: &TensorSpec) -> TensorSpec {
    TensorSpec::new(first_dim(&x.shape), x.dtype)
}
