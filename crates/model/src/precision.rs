//! Mixed precision as torch's autocast does it: the matmuls (every linear, the LM head) run in
//! bf16 or f16, while parameters stay f32 (the master weights the optimizer updates) and
//! everything between matmuls (norms, rotary, softmax, the residual stream, the loss) stays
//! f32. Gradients reach the f32 parameters through the casts' backward.
//!
//! The setting is per thread, so a training loop turns it on for its own forwards only.

use burn::tensor::{DType, Tensor};
use std::cell::Cell;

thread_local! {
    static COMPUTE: Cell<Option<DType>> = const { Cell::new(None) };
}

/// The matmul dtype of this thread (None: f32 throughout).
pub fn compute_dtype() -> Option<DType> {
    COMPUTE.with(Cell::get)
}

/// Restores the previous setting when dropped.
pub struct Autocast {
    prev: Option<DType>,
}

impl Drop for Autocast {
    fn drop(&mut self) {
        COMPUTE.with(|c| c.set(self.prev));
    }
}

/// Runs this thread's matmuls in `dtype` (BF16 or F16; None or F32 turns autocast off) until
/// the returned guard is dropped.
pub fn autocast(dtype: Option<DType>) -> Autocast {
    let dtype = dtype.filter(|d| *d != DType::F32);
    Autocast {
        prev: COMPUTE.with(|c| c.replace(dtype)),
    }
}

/// `x` in the compute dtype (unchanged when autocast is off or it already is).
///
/// Panics where the device has no kernels for that dtype: Burn's wgpu backend casts to bf16
/// without complaint and computes garbage (lavapipe, 2026-11-29: losses off by 3–550 %), so
/// callers (phi-train's `mixed_precision`) ask the device first.
pub fn to_compute<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    match compute_dtype() {
        Some(dt) if x.dtype() != dt => {
            let device = x.device();
            assert!(
                device.supports_dtype(dt),
                "autocast to {dt:?} on {device:?}, which has no {dt:?} kernels"
            );
            x.cast(dt)
        }
        _ => x,
    }
}

/// A matmul result back in f32 (unchanged when it already is).
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    }
}
