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

/// The wide operand: row-major f32, or bf16 rows (an input kept rounded for the backward,
/// as autocast keeps a matmul's input), each row `w` values apart.
#[derive(Clone, Copy)]
pub enum Wide<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Wide<'_> {
    fn len(self) -> usize {
        match self {
            Wide::F32(v) => v.len(),
            Wide::Bf16(v) => v.len(),
        }
    }

    #[inline(always)]
    fn get(self, i: usize) -> f32 {
        match self {
            Wide::F32(v) => v[i],
            Wide::Bf16(v) => f32::from_bits((v[i] as u32) << 16),
        }
    }
}

simd! {
    /// out [cols × r] (row j: column j0 + j of wide, rows `w` apart) = Σ_t wide[t, j0 +
    /// j]·thin[t, :], the sums in token order.
    fn columns(thin: &[f32], r: usize, wide: Wide, w: usize, j0: usize, out: &mut [f32]) {
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
                            let th = Cols(thin, r, ic);
                            match wide {
                                Wide::F32(v) => {
                                    block_v512(th, Cols(v, w, j0 + jc), rows.clone(), &mut acc)
                                }
                                Wide::Bf16(v) => {
                                    block_v512(th, Cols(v, w, j0 + jc), rows.clone(), &mut acc)
                                }
                            }
                        };
                    } else {
                        for t in rows.clone() {
                            let th = &thin[t * r + ic..][..cr];
                            for (acc, &h) in acc.iter_mut().zip(th) {
                                for (j, a) in acc.iter_mut().enumerate().take(cw) {
                                    *a = h.mul_add(wide.get(t * w + j0 + jc + j), *a);
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
    wide_rows_t_thin(thin, r, Wide::F32(wide), w, w)
}

/// wideᵀ·thin [w × r] for thin [T × r] and wide's T rows of `stride` values (w of them used).
pub fn wide_rows_t_thin(thin: &[f32], r: usize, wide: Wide, w: usize, stride: usize) -> Vec<f32> {
    assert!(w <= stride, "rows shorter than their width");
    assert_eq!(
        thin.len() / r.max(1),
        wide.len() / stride.max(1),
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
        .for_each(|(b, o)| columns(thin, r, wide, stride, b * per, o));
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
struct Cols<'a, T>(&'a [T], usize, usize);

/// 32 values of a row as f32, from f32 or bf16 storage.
#[cfg(target_arch = "x86_64")]
trait Load32: Copy {
    /// # Safety
    /// AVX-512F is available and `at` is followed by 32 values.
    unsafe fn load32(at: *const Self) -> [std::arch::x86_64::__m512; 2];
}

#[cfg(target_arch = "x86_64")]
impl Load32 for f32 {
    #[inline(always)]
    unsafe fn load32(at: *const f32) -> [std::arch::x86_64::__m512; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's.
        unsafe { [_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16))] }
    }
}

#[cfg(target_arch = "x86_64")]
impl Load32 for u16 {
    /// bf16 widened: each value's bits shifted into an f32's high half.
    #[inline(always)]
    unsafe fn load32(at: *const u16) -> [std::arch::x86_64::__m512; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's.
        unsafe {
            let v = _mm512_loadu_si512(at as *const _);
            let widen =
                |h: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
            [
                widen(_mm512_castsi512_si256(v)),
                widen(_mm512_extracti64x4_epi64::<1>(v)),
            ]
        }
    }
}

/// One whole register block on AVX-512: acc[i][j] += Σ_t thin[t, ic + i]·wide[t, jc + j]
/// over `rows`. (Written with intrinsics: as a plain loop LLVM kept the 8 × 32 sums on the
/// stack, a load and a store around every FMA.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_v512<T: Load32>(
    Cols(thin, r, ic): Cols<f32>,
    Cols(wide, w, jc): Cols<T>,
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
        let ([x0, x1], th) = unsafe {
            (
                T::load32(wide.as_ptr().add(t * w + jc)),
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
