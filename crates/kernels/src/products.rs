//! Attention's batched products, [.., m, k] by [.., k, n] per leading index: Burn's f32
//! matmul, or under `--bf16` the bf16 kernels, one product per [B, kv] item (items in
//! parallel; each operand rounded as it is packed, f32 sums, as autocast runs them).

use super::bf16::{self, PackedB, Path};
use super::matmul::matmul;
use super::{contiguous, f32s, flex};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Flex, TensorMetadata};
use rayon::prelude::*;

fn swap(x: FlexTensor) -> FlexTensor {
    let r = x.shape().num_dims();
    Flex::float_swap_dims(x, r - 2, r - 1)
}

/// How y enters a bf16 item product: y, yᵀ, or y with x transposed (xᵀ·y).
#[derive(Clone, Copy)]
enum Form {
    AB,
    ABt,
    AtB,
}

#[derive(Clone, Copy)]
pub(crate) struct Products(pub Option<Path>);

impl Products {
    /// x·y for x [.., m, k], y [.., k, n].
    pub fn a_b(self, x: FlexTensor, y: FlexTensor) -> FlexTensor {
        match self.0 {
            None => matmul(x, y),
            Some(path) => items(path, x, y, Form::AB),
        }
    }

    /// x·yᵀ for x [.., m, k], y [.., n, k].
    pub fn a_bt(self, x: FlexTensor, y: FlexTensor) -> FlexTensor {
        match self.0 {
            None => matmul(x, swap(y)),
            Some(path) => items(path, x, y, Form::ABt),
        }
    }

    /// xᵀ·y for x [.., k, m], y [.., k, n].
    pub fn at_b(self, x: FlexTensor, y: FlexTensor) -> FlexTensor {
        match self.0 {
            None => matmul(swap(x), y),
            Some(path) => items(path, x, y, Form::AtB),
        }
    }
}

fn items(path: Path, x: FlexTensor, y: FlexTensor, form: Form) -> FlexTensor {
    let (x, y) = (contiguous(x), contiguous(y));
    let (xs, ys) = (x.shape(), y.shape());
    let r = xs.num_dims();
    let (x1, x2, y1, y2) = (xs[r - 2], xs[r - 1], ys[r - 2], ys[r - 1]);
    // Per item: A's (m, k) and B's (k, n).
    let ((m, k), n) = match form {
        Form::AB => ((x1, x2), y2),
        Form::ABt => ((x1, x2), y1),
        Form::AtB => ((x2, x1), y2),
    };
    let count = f32s(&x).len() / (x1 * x2).max(1);
    // Unfilled: every path stores each element of C.
    let mut out: Vec<f32> = Vec::with_capacity(count * m * n);
    if m * n > 0 && k > 0 {
        let (xv, yv) = (f32s(&x), f32s(&y));
        let cells = &mut out.spare_capacity_mut()[..count * m * n];
        cells.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            let a = &xv[i * x1 * x2..(i + 1) * x1 * x2];
            let b = &yv[i * y1 * y2..(i + 1) * y1 * y2];
            let c = c.as_mut_ptr().cast::<f32>();
            // SAFETY: c is this item's m·n floats.
            unsafe {
                match form {
                    Form::AB => bf16::gemm_into(path, a, m, &PackedB::from_rows(b, k, n), c),
                    Form::ABt => bf16::gemm_into(path, a, m, &PackedB::from_cols(b, k, n), c),
                    Form::AtB => bf16::gemm_t_into(path, a, k, m, &PackedB::from_rows(b, k, n), c),
                }
            }
        });
        // SAFETY: all count·m·n elements were stored above.
        unsafe { out.set_len(count * m * n) };
    } else {
        out.resize(count * m * n, 0.0);
    }
    let mut shape = xs.clone();
    shape[r - 2] = m;
    shape[r - 1] = n;
    flex(out, shape)
}
