//! The AVX512-BF16 path: `vdpbf16ps` adds a row's (k, k+1) pair times a packed B row of 16
//! pairs into 16 f32 lanes. A micro-tile of 8 rows × 2 panels keeps 16 accumulators in
//! registers while each B row is loaded once.

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
    use super::super::{Block, PANEL};
    use std::arch::x86_64::*;

    const MR: usize = 8;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block(t: Block) {
        let (rows, c, n, ld) = (t.rows, t.c, t.n, t.ld);
        let panels = t.panels.clone();
        let terms = t.terms();
        for p in panels.step_by(2) {
            let j0 = p * PANEL;
            if j0 >= n {
                break;
            }
            let cols = (n - j0).min(2 * PANEL);
            for i0 in (0..rows).step_by(MR) {
                let mr = (rows - i0).min(MR);
                let mut acc = [[_mm512_setzero_ps(); 2]; MR];
                for &(a, kp, b) in &terms {
                    let (b0, b1) = (b.panel(p), b.panel(p + 1));
                    for r in 0..kp / 2 {
                        let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                            b0.as_ptr().add(r * 2 * PANEL) as *const __m512i,
                        ));
                        let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                            b1.as_ptr().add(r * 2 * PANEL) as *const __m512i,
                        ));
                        for (i, acc) in acc.iter_mut().enumerate().take(mr) {
                            let pair = (a.as_ptr().add((i0 + i) * kp + 2 * r) as *const i32)
                                .read_unaligned();
                            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                            acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                            acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate().take(mr) {
                    let mut row = [0f32; 2 * PANEL];
                    _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
                    _mm512_storeu_ps(row.as_mut_ptr().add(PANEL), acc[1]);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), c.add((i0 + i) * ld + j0), cols);
                }
            }
        }
    }
}
