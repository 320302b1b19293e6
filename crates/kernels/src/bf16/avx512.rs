//! The AVX512-BF16 path: `vdpbf16ps` adds a row's (k, k+1) pair times a packed B row of 16
//! pairs into 16 f32 lanes. A micro-tile of 12 rows × 2 panels keeps its 24 accumulators in
//! registers (with the two B rows and a broadcast, 27 of the 32) while each B row is loaded
//! once. The row count is a const parameter so the rows unroll without tests: with a
//! run-time count (8 rows before) the compiler compared it after every row's two products.
//! On a 2-core Zen 4 the kernel went from 344–387 to 372–408 GFLOP/s, twice Flex's f32
//! GEMM there (docs/benchmarks.md).

use super::Block;

pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// C rows [0, rows) = A rows · B (A bf16 with `kp` columns), in the columns of `panels`
/// (whole pairs).
///
/// # Safety
/// `c` points at `rows` rows `ld` floats apart, whose columns under `panels` (below `n`) no
/// one else touches meanwhile.
pub unsafe fn block(t: Block) {
    assert!(available() && t.panels.start.is_multiple_of(2) && t.panels.end <= t.b.panels);
    assert!(t.extra.as_ref().is_none_or(|e| e.b.panels == t.b.panels));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX512F and AVX512-BF16 (checked above); `c` is the caller's.
    unsafe {
        x86::block(t)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::{Block, Panels, PANEL};
    use std::arch::x86_64::*;

    type Terms<'a> = [(&'a [u16], usize, Panels<'a>)];

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block(t: Block) {
        let terms = t.terms();
        for p in t.panels.clone().step_by(2) {
            let j0 = p * PANEL;
            if j0 >= t.n {
                break;
            }
            let cols = (t.n - j0).min(2 * PANEL);
            let mut i0 = 0;
            while i0 < t.rows {
                let c = t.c.add(i0 * t.ld + j0);
                let at = (i0, p, c, t.ld, cols);
                // Whole micro-tiles, then the rest in powers of two.
                i0 += match t.rows - i0 {
                    12.. => tile::<12>(&terms, at),
                    8.. => tile::<8>(&terms, at),
                    4.. => tile::<4>(&terms, at),
                    2.. => tile::<2>(&terms, at),
                    _ => tile::<1>(&terms, at),
                };
            }
        }
    }

    /// C's R rows from `c` (stride `ld`), `cols` ≤ 32 columns = Σ over terms of A's rows
    /// i0..i0+R times panels p, p+1. Returns R.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn tile<const R: usize>(
        terms: &Terms,
        (i0, p, c, ld, cols): (usize, usize, *mut f32, usize, usize),
    ) -> usize {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for &(a, kp, b) in terms {
            let (b0, b1) = (b.panel(p).as_ptr(), b.panel(p + 1).as_ptr());
            let a = a[i0 * kp..(i0 + R) * kp].as_ptr();
            for r in 0..kp / 2 {
                let w0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b0.add(r * 2 * PANEL) as *const _));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b1.add(r * 2 * PANEL) as *const _));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let pair = (a.add(i * kp + 2 * r) as *const i32).read_unaligned();
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                }
            }
        }
        let lanes = |n: usize| (((1u32 << n.min(PANEL)) - 1) & 0xffff) as __mmask16;
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(PANEL)));
        for (i, acc) in acc.iter().enumerate() {
            let row = c.add(i * ld);
            _mm512_mask_storeu_ps(row, m0, acc[0]);
            _mm512_mask_storeu_ps(row.add(PANEL), m1, acc[1]);
        }
        R
    }
}
