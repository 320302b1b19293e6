//! f32 batched matmul into a buffer we own. Flex's matmul runs the same `gemm` calls, but its
//! output comes from `FlexTensor::empty`, which zeroes a byte vector and then copies it into a
//! 16-byte-aligned allocation: two passes over every product's output before the GEMM writes
//! it (7 % of a phi3-small LoRA step in `perf`, docs/benchmarks.md). Here the buffer starts
//! unfilled: gemm stores every element (it does not read C).

use super::flex;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::{DType, Flex, TensorMetadata};
use rayon::prelude::*;

/// Products below this many multiply-adds run on one thread (Flex's threshold).
const PARALLEL: usize = 192 * 192 * 192;
/// A batch of small products with this much work in all is split across threads (Flex's).
const BATCH: usize = 128 * 128 * 128;

/// `a · b` over the last two dims, a [.., m, k] and b [.., k, n] of the same batch dims, any
/// strides. Other cases (broadcast batch dims, other dtypes) go to Flex's matmul.
pub(crate) fn matmul(a: FlexTensor, b: FlexTensor) -> FlexTensor {
    let (sa, sb) = (a.shape(), b.shape());
    let rank = sa.num_dims();
    let same_batch = rank >= 2 && sb.num_dims() == rank && sa[..rank - 2] == sb[..rank - 2];
    if !same_batch || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Flex::float_matmul(a, b);
    }
    let (m, k, n) = (sa[rank - 2], sa[rank - 1], sb[rank - 1]);
    let batch: Vec<usize> = sa[..rank - 2].to_vec();
    let count: usize = batch.iter().product();
    let mut out: Vec<f32> = Vec::with_capacity(count * m * n);
    let (la, lb) = (a.layout(), b.layout());
    let (da, db) = (a.storage::<f32>(), b.storage::<f32>());
    // Element offset of matrix `i` (row-major over the batch dims) in a layout.
    let offset = |strides: &[isize], start: usize, mut i: usize| {
        let mut off = start as isize;
        for d in (0..batch.len()).rev() {
            off += (i % batch[d]) as isize * strides[d];
            i /= batch[d];
        }
        off
    };
    let (ta, tb) = (la.strides(), lb.strides());
    let one = |i: usize, c: *mut f32, par: gemm::Parallelism| {
        let pa = offset(ta, la.start_offset(), i);
        let pb = offset(tb, lb.start_offset(), i);
        // SAFETY: the offsets and strides are the layouts' own, so every element gemm reads
        // lies in `da` / `db`; `c` points at m·n floats, written row-major.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c,
                1,
                n as isize,
                false,
                da.as_ptr().offset(pa),
                ta[rank - 1],
                ta[rank - 2],
                db.as_ptr().offset(pb),
                tb[rank - 1],
                tb[rank - 2],
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    let work = m * n * k;
    // Flex's strategy: one large product threads inside gemm; many small ones thread over
    // the batch; the rest run on this thread.
    let big = work >= PARALLEL && count < 4;
    let inner = if big {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let over_batch = !big && count > 1 && work * count >= BATCH;
    if work == 0 {
        // Nothing to sum (k = 0 or an empty side): zeros.
        out.resize(count * m * n, 0.0);
    } else {
        let cells = &mut out.spare_capacity_mut()[..count * m * n];
        let cell = |c: &mut [std::mem::MaybeUninit<f32>]| c.as_mut_ptr().cast::<f32>();
        if over_batch {
            cells
                .par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, c)| one(i, cell(c), inner));
        } else {
            for (i, c) in cells.chunks_mut(m * n).enumerate() {
                one(i, cell(c), inner);
            }
        }
        // SAFETY: gemm stored all m·n elements of each of the count products.
        unsafe { out.set_len(count * m * n) };
    }
    let mut dims = batch;
    dims.extend([m, n]);
    flex(out, dims.into())
}
