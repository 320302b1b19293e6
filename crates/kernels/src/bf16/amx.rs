//! The AMX path: `tdpbf16ps` on 16×16 f32 tiles. A block of 32 rows times two panels (32
//! columns) is four C tiles, fed by two A tiles (16 rows × 32 k) and two B tiles (16 pair
//! rows × 16 columns) per step of 32 in k. Stable Rust has no AMX intrinsics, so the tile
//! instructions are inline assembly; Linux hands out the tile state only on request.

use super::{Bf16Buf, Block, KSTEP, PANEL};
use std::arch::asm;
use std::sync::OnceLock;

/// `ldtilecfg`'s 64-byte operand: palette 1, then bytes per row and rows of each tile.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// CPUID leaf 7: AMX-BF16 (edx bit 22) and AMX-TILE (bit 24); then Linux's permission to use
/// the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), asked once.
pub fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let l = std::arch::x86_64::__cpuid_count(7, 0);
            if (l.edx >> 22) & 1 == 0 || (l.edx >> 24) & 1 == 0 {
                return false;
            }
            const SYS_ARCH_PRCTL: i64 = 158;
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            let ret: i64;
            // SAFETY: a plain syscall with integer arguments; it only changes which
            // register state the kernel lets this process use.
            unsafe {
                asm!("syscall",
                    inlateout("rax") SYS_ARCH_PRCTL => ret,
                    in("rdi") ARCH_REQ_XCOMP_PERM,
                    in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _, lateout("r11") _,
                    options(nostack));
            }
            ret == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// C rows [0, rows) = A rows · B for A's rows in bf16 (`kp` columns), in the columns of
/// `panels` (whole pairs): two panels at a time, 32 rows at a time under each pair.
///
/// # Safety
/// `c` points at `rows` rows `ld` floats apart, whose columns under `panels` (below `n`) no
/// one else touches meanwhile.
pub unsafe fn block(t: Block) {
    let (rows, b, c, n, ld) = (t.rows, t.b, t.c, t.n, t.ld);
    let panels = t.panels.clone();
    let terms = t.terms();
    assert!(available() && panels.start.is_multiple_of(2));
    assert!(panels.end <= b.panels && panels.len().is_multiple_of(2));
    assert!(terms
        .iter()
        .all(|&(_, kp, tb)| kp.is_multiple_of(KSTEP) && tb.panels == b.panels));
    // Whole tiles only: a short last sub-block runs on zero-padded copies.
    let full = rows / 32 * 32;
    let tails: Vec<Bf16Buf> = terms
        .iter()
        .map(|&(a, kp, _)| {
            let mut tail = Bf16Buf::zeroed(0);
            if full < rows {
                tail = Bf16Buf::zeroed(32 * kp);
                tail[..(rows - full) * kp].copy_from_slice(&a[full * kp..rows * kp]);
            }
            tail
        })
        .collect();
    // Aligned as the operands, for the tile stores.
    #[repr(align(64))]
    struct Staging([f32; 32 * 32]);
    let mut staging = Staging([0f32; 32 * 32]);
    let out = &mut staging.0;
    let cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };
    // SAFETY: AMX is available (checked above). Tile loads read 16 rows of 64 bytes inside
    // 32 rows of kp bf16 (`a` or `tail`) or inside a panel (kp/2 rows of 64 bytes); stores
    // write 32 rows of 32 floats inside `out`, or inside `c` where rows i0..i0+32 and columns
    // j0..j0+32 all exist (i0 + 32 ≤ full ≤ rows, cols = 32) and are this call's (the
    // caller's contract).
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack));
        for p in panels.step_by(2) {
            let j0 = p * PANEL;
            if j0 >= n {
                break;
            }
            let cols = (n - j0).min(2 * PANEL);
            // The next pair's panels (contiguous, kp·64 bytes) are fetched into L2 a few lines
            // per k step while this pair runs: a frozen weight comes from DRAM, and its first
            // use otherwise stalls every tile load on it.
            let kp = b.k_pad;
            let next =
                (p + 2 < t.panels.end && (p + 2) * PANEL < n).then(|| b.panel(p + 2).as_ptr());
            let steps = rows.div_ceil(32) * (kp / KSTEP);
            let per = kp.div_ceil(steps.max(1));
            for i0 in (0..rows).step_by(32) {
                let pf = next.map(|at| {
                    let at = at as *const u8;
                    Prefetch {
                        at: at.wrapping_add((i0 / 32) * (kp / KSTEP) * per * 64),
                        end: at.wrapping_add(kp * 64),
                        per,
                    }
                });
                let mut ops = [(std::ptr::null(), 0, std::ptr::null(), std::ptr::null()); 2];
                for (o, (&(a, kp, tb), tail)) in ops.iter_mut().zip(terms.iter().zip(&tails)) {
                    let src = if i0 < full { &a[i0 * kp..] } else { &tail[..] };
                    *o = (
                        src.as_ptr(),
                        kp,
                        tb.panel(p).as_ptr(),
                        tb.panel(p + 1).as_ptr(),
                    );
                }
                let ops = &ops[..terms.len()];
                if i0 < full && cols == 32 {
                    // A whole 32×32 block of C: the tiles store straight into it.
                    tile_product(ops, c.add(i0 * ld + j0), ld, pf);
                    continue;
                }
                tile_product(ops, out.as_mut_ptr(), 32, pf);
                for i in 0..(rows - i0).min(32) {
                    let at = c.add((i0 + i) * ld + j0);
                    std::ptr::copy_nonoverlapping(out.as_ptr().add(i * 32), at, cols);
                }
            }
        }
        asm!("tilerelease", options(nostack));
    }
}

/// out (32×32, row stride `ld` floats) = Σ over `ops` of 32 rows of A (stride kp) · two
/// panels (b0, b1), with tiles configured.
#[inline(always)]
unsafe fn tile_product(
    ops: &[(*const u16, usize, *const u16, *const u16)],
    out: *mut f32,
    ld: usize,
    pf: Option<Prefetch>,
) {
    let mut pf = pf.unwrap_or(Prefetch {
        at: std::ptr::null(),
        end: std::ptr::null(),
        per: 0,
    });
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack)
    );
    for &(a, kp, b0, b1) in ops {
        for kb in 0..kp / KSTEP {
            for _ in 0..pf.per {
                if pf.at < pf.end {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                        pf.at as *const i8,
                    );
                    pf.at = pf.at.wrapping_add(64);
                }
            }
            let a0 = a.add(kb * KSTEP);
            let off = kb * KSTEP * PANEL;
            asm!(
                // Each load as late as its first product allows: the tile registers are not
                // renamed, so a load waits for the products still reading the old tile
                // (15 % over four loads up front, measured on one core).
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a0.add(16 * kp),
                b0 = in(reg) b0.add(off),
                b1 = in(reg) b1.add(off),
                sa = in(reg) kp * 2,
                sb = in(reg) 64usize,
                options(nostack)
            );
        }
    }
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) out,
        c1 = in(reg) out.add(16),
        c2 = in(reg) out.add(16 * ld),
        c3 = in(reg) out.add(16 * ld + 16),
        s = in(reg) ld * 4,
        options(nostack)
    );
}

/// Lines to fetch ahead: `per` a k step from `at` up to `end` (addresses only compared and
/// prefetched, never read, so they are formed with wrapping arithmetic).
#[derive(Clone, Copy)]
struct Prefetch {
    at: *const u8,
    end: *const u8,
    per: usize,
}
