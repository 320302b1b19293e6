//! Aᵀ·B where one side is a LoRA factor's rank r: its gradients da = xdᵀ·gs [d_in × r] and
//! db = hsᵀ·dy [r × d_out] as sums of T outer products (T tokens). As GEMMs their output
//! size r starves the f32 library's blocking, and on the bf16 path the transposed rounding of
//! the wide operand took 13 % of a phi3-small step (docs/benchmarks.md); here the wide
//! operand is read once, in f32, by rows, and each f32 sum runs in token order.

use crate::kernels::simd;
#[cfg(target_arch = "x86_64")]
use crate::kernels::LEVEL;
use rayon::prelude::*;

/// Output columns (of the wide side) per register block, and thin rows per block: 8 × 32
/// accumulators are 16 AVX-512 registers.
const CW: usize = 32;
const CR: usize = 8;

/// Tokens per pass over a task's columns: the pass's rows of them (≤ 256 × 704 floats on the
/// phi3-small shapes) stay in L2 for the next register block. Without it every block walked
/// all T rows at a stride of w floats, which for w = 1024 maps them onto a few cache sets.
const TB: usize = 256;

simd! {
    /// out [cols × r] (row j: column j0 + j of wide) = Σ_t wide[t, j0 + j]·thin[t, :], the
    /// sums in token order.
    fn columns(thin: &[f32], r: usize, wide: &[f32], w: usize, j0: usize, out: &mut [f32]) {
        let (t_len, cols) = (thin.len() / r.max(1), out.len() / r.max(1));
        for t0 in (0..t_len).step_by(TB) {
            let rows = t0..(t0 + TB).min(t_len);
            for jc in (0..cols).step_by(CW) {
                let cw = (cols - jc).min(CW);
                for ic in (0..r).step_by(CR) {
                    let cr = (r - ic).min(CR);
                    let mut acc = [[0f32; CW]; CR];
                    if t0 > 0 {
                        for (i, acc) in acc.iter_mut().enumerate().take(cr) {
                            for (j, a) in acc.iter_mut().enumerate().take(cw) {
                                *a = out[(jc + j) * r + ic + i];
                            }
                        }
                    }
                    if cw == CW && cr == CR && block_path() == "avx512" {
                        // SAFETY: "avx512" means AVX-512F was detected; the block is whole.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            let (th, wi) = (Cols(thin, r, ic), Cols(wide, w, j0 + jc));
                            block_v512(th, wi, rows.clone(), &mut acc)
                        };
                    } else {
                        for t in rows.clone() {
                            let wr = &wide[t * w + j0 + jc..][..cw];
                            let th = &thin[t * r + ic..][..cr];
                            for (acc, &h) in acc.iter_mut().zip(th) {
                                for (a, &x) in acc.iter_mut().zip(wr) {
                                    *a = h.mul_add(x, *a);
                                }
                            }
                        }
                    }
                    for (j, o) in out[jc * r..(jc + cw) * r].chunks_exact_mut(r).enumerate() {
                        for (i, o) in o[ic..ic + cr].iter_mut().enumerate() {
                            *o = acc[i][j];
                        }
                    }
                }
            }
        }
    }
}

/// wideᵀ·thin [w × r] for thin [T × r] and wide [T × w], both row-major.
pub fn wide_t_thin(thin: &[f32], r: usize, wide: &[f32], w: usize) -> Vec<f32> {
    assert_eq!(
        thin.len() / r.max(1),
        wide.len() / w.max(1),
        "thin and wide differ in rows"
    );
    let mut out = vec![0f32; w * r];
    if r == 0 || w == 0 {
        return out;
    }
    // A few tasks a thread, whole register blocks each.
    let tasks = 4 * rayon::current_num_threads();
    let per = w.div_ceil(tasks).div_ceil(CW) * CW;
    out.par_chunks_mut(per * r)
        .enumerate()
        .for_each(|(b, o)| columns(thin, r, wide, w, b * per, o));
    out
}

/// thinᵀ·wide [r × w]: `wide_t_thin` transposed (r·w values, a small pass).
pub fn thin_t_wide(thin: &[f32], r: usize, wide: &[f32], w: usize) -> Vec<f32> {
    let wt = wide_t_thin(thin, r, wide, w);
    let mut out = vec![0f32; r * w];
    for (j, row) in wt.chunks_exact(r.max(1)).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * w + j] = v;
        }
    }
    out
}

/// A row-major matrix (values, row length) from a column on.
#[derive(Clone, Copy)]
struct Cols<'a>(&'a [f32], usize, usize);

/// One whole register block on AVX-512: acc[i][j] += Σ_t thin[t, ic + i]·wide[t, jc + j]
/// over `rows`. (Written with intrinsics: as a plain loop LLVM kept the 8 × 32 sums on the
/// stack, a load and a store around every FMA.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_v512(
    Cols(thin, r, ic): Cols,
    Cols(wide, w, jc): Cols,
    rows: std::ops::Range<usize>,
    acc: &mut [[f32; CW]; CR],
) {
    use std::arch::x86_64::*;
    let last = rows.end.saturating_sub(1);
    assert!(
        rows.is_empty() || (last * r + ic + CR <= thin.len() && last * w + jc + CW <= wide.len())
    );
    // SAFETY (loads and stores below): each row of acc holds 32 floats; rows t < rows.end
    // are inside both slices (asserted above).
    let mut lo: [__m512; CR] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(acc[i].as_ptr()) });
    let mut hi: [__m512; CR] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_ps(acc[i].as_ptr().add(16)) });
    for t in rows {
        let (x0, x1, th) = unsafe {
            let wr = wide.as_ptr().add(t * w + jc);
            (
                _mm512_loadu_ps(wr),
                _mm512_loadu_ps(wr.add(16)),
                thin.as_ptr().add(t * r + ic),
            )
        };
        for i in 0..CR {
            let h = _mm512_set1_ps(unsafe { *th.add(i) });
            lo[i] = _mm512_fmadd_ps(h, x0, lo[i]);
            hi[i] = _mm512_fmadd_ps(h, x1, hi[i]);
        }
    }
    for i in 0..CR {
        unsafe {
            _mm512_storeu_ps(acc[i].as_mut_ptr(), lo[i]);
            _mm512_storeu_ps(acc[i].as_mut_ptr().add(16), hi[i]);
        }
    }
}

/// Which code runs the whole register blocks on this CPU ("avx512" or "portable").
pub fn block_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if *LEVEL == 2 {
        return "avx512";
    }
    "portable"
}
