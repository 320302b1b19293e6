//! Products with a quantized weight W [d_out, d_in] that decode its blocks next to the GEMM:
//! y = x·Wᵀ (the forward) and dx = dy·W (the input gradient), on the bf16 kernels or in f32.
//!
//! bf16: each task decodes the two panels it multiplies by (32 columns of B, rounded to bf16
//! in the kernels' pair layout) into a buffer of its thread, then runs the bf16 block over
//! its rows: the decode is a pass over the weight per 256-row block, the product m/256 times
//! that. f32: strips of 64 columns of B are decoded to f32 and multiplied by `gemm`, a task
//! a strip.

use super::QuantWeight;
use crate::bf16::{self, Bf16Buf, Block, Out, Panels, Path, Term, PANEL};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows per task (as the bf16 GEMM's).
const ROWS: usize = 256;
/// B columns a task of the f32 products decodes at once.
const STRIP: usize = 64;

thread_local! {
    static SLAB: RefCell<Bf16Buf> = RefCell::new(Bf16Buf::zeroed(0));
}

/// Which product: B = Wᵀ (k = d_in, n = d_out) or B = W (k = d_out, n = d_in).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Forward,
    InputGrad,
}

impl Side {
    fn kn(self, w: &QuantWeight) -> (usize, usize) {
        match self {
            Side::Forward => (w.d_in, w.d_out),
            Side::InputGrad => (w.d_out, w.d_in),
        }
    }
}

fn pair_word(a: f32, b: f32) -> u32 {
    bf16::to_bf16(a) as u32 | (bf16::to_bf16(b) as u32) << 16
}

/// B's panels 2p and 2p + 1 in bf16 pairs, into `slab` (k_pad·32 values).
fn decode_pair(w: &QuantWeight, side: Side, p: usize, k_pad: usize, slab: &mut [u16]) {
    let per_panel = k_pad * PANEL;
    // SAFETY: a u16 slice reinterpreted as pairs; the buffer starts on a cache line (Bf16Buf)
    // and panels hold whole pair rows, so every u32 is aligned and in bounds.
    let words: &mut [u32] =
        unsafe { std::slice::from_raw_parts_mut(slab.as_mut_ptr().cast::<u32>(), slab.len() / 2) };
    let mut v = [0f32; 32];
    match side {
        Side::Forward => {
            // B column j is W's row j: its (k, k+1) values sit side by side in a pair.
            for jj in 0..2 * PANEL {
                let (panel, col) = (jj / PANEL, jj % PANEL);
                let j = 2 * PANEL * p + jj;
                let base = panel * per_panel / 2 + col;
                if j >= w.d_out {
                    for r in 0..k_pad / 2 {
                        words[base + r * PANEL] = 0;
                    }
                    continue;
                }
                for c in 0..w.d_in / 32 {
                    w.decode(j, c, &mut v);
                    for t in 0..16 {
                        words[base + (16 * c + t) * PANEL] = pair_word(v[2 * t], v[2 * t + 1]);
                    }
                }
            }
        }
        Side::InputGrad => {
            // B row k is W's row k: a pair row interleaves two of W's rows over 32 columns.
            let mut v1 = [0f32; 32];
            for r in 0..k_pad / 2 {
                let (k0, k1) = (2 * r, 2 * r + 1);
                if k0 < w.d_out {
                    w.decode(k0, p, &mut v);
                } else {
                    v = [0.0; 32];
                }
                if k1 < w.d_out {
                    w.decode(k1, p, &mut v1);
                } else {
                    v1 = [0.0; 32];
                }
                for jj in 0..2 * PANEL {
                    let (panel, col) = (jj / PANEL, jj % PANEL);
                    words[panel * per_panel / 2 + r * PANEL + col] = pair_word(v[jj], v1[jj]);
                }
            }
        }
    }
}

/// C [m, n] = A · B on a bf16 path, A [m, k] given packed (`bf16::PackedA`), B decoded from
/// `w` a pair of panels at a time; `extra` = (A2, B2) adds A2·B2 into the same tiles (a LoRA
/// side path).
pub fn product_bf16(
    path: Path,
    w: &QuantWeight,
    side: Side,
    a: &bf16::PackedA,
    extra: Option<(&bf16::PackedA, &bf16::PackedB)>,
) -> Vec<f32> {
    let (k, n) = side.kn(w);
    let m = a.m;
    assert_eq!(a.k, k, "A's columns are not B's rows");
    let k_pad = bf16::round_up(k.max(1), bf16::KSTEP);
    if let Some((a2, b2)) = extra {
        assert!(
            a2.m == m && a2.k == b2.k && b2.n == n,
            "the extra product's shape"
        );
    }
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    if m == 0 || n == 0 {
        c.resize(m * n, 0.0);
        return c;
    }
    let path = if path.available() { path } else { Path::Scalar };
    let pairs = n.div_ceil(2 * PANEL);
    let row_blocks = m.div_ceil(ROWS);
    let out = Out(c.as_mut_ptr());
    let ad = a.data();
    (0..row_blocks * pairs).into_par_iter().for_each(|t| {
        let (rb, p) = (t / pairs, t % pairs);
        let r0 = rb * ROWS;
        let rows = (m - r0).min(ROWS);
        SLAB.with(|s| {
            let mut slab = s.borrow_mut();
            if slab.len() != k_pad * 2 * PANEL {
                *slab = Bf16Buf::zeroed(k_pad * 2 * PANEL);
            }
            decode_pair(w, side, p, k_pad, &mut slab);
            let j0 = 2 * PANEL * p;
            let extra = extra.map(|(a2, b2)| Term {
                a: &a2.data()[r0 * b2.k_pad..(r0 + rows) * b2.k_pad],
                kp: b2.k_pad,
                b: b2.pair(2 * p),
            });
            let task = Block {
                a: &ad[r0 * k_pad..(r0 + rows) * k_pad],
                rows,
                kp: k_pad,
                b: Panels {
                    data: &slab,
                    k_pad,
                    panels: 2,
                },
                extra,
                panels: 0..2,
                c: out.at(r0 * n + j0),
                n: n - j0,
                ld: n,
            };
            // SAFETY: C has m·n floats; this task writes rows r0..r0 + rows of columns
            // j0..j0 + 32 (below n) only, and no two tasks share both.
            unsafe { bf16::run_block(path, task) }
        });
    });
    // SAFETY: the tasks cover every (row block, pair), and each block stores all its
    // elements.
    unsafe { c.set_len(m * n) };
    c
}

/// C [m, n] = A · B in f32 for A row-major [m, k], B decoded from `w` a strip of 64 columns
/// at a time.
pub fn product_f32(w: &QuantWeight, side: Side, a: &[f32], m: usize) -> Vec<f32> {
    let (k, n) = side.kn(w);
    assert_eq!(a.len(), m * k, "A is not m×k");
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    if m == 0 || n == 0 || k == 0 {
        c.resize(m * n, 0.0);
        return c;
    }
    let out = Out(c.as_mut_ptr());
    (0..n.div_ceil(STRIP)).into_par_iter().for_each(|s| {
        let j0 = s * STRIP;
        let cols = (n - j0).min(STRIP);
        // The strip as B's [k, cols] block: for the forward W's rows j0.. (each a column of
        // B, so B's row stride is 1 and its column stride d_in); for the input gradient W's
        // columns j0.. of every row, gathered row-major [k, cols].
        let mut v = [0f32; 32];
        let (strip, rs, cs) = match side {
            Side::Forward => {
                let mut strip = vec![0f32; cols * k];
                for (jj, row) in strip.chunks_exact_mut(k).enumerate() {
                    for (c, chunk) in row.chunks_exact_mut(32).enumerate() {
                        w.decode(j0 + jj, c, &mut v);
                        chunk.copy_from_slice(&v);
                    }
                }
                (strip, 1isize, k as isize)
            }
            Side::InputGrad => {
                let mut strip = vec![0f32; k * cols];
                for (r, row) in strip.chunks_exact_mut(cols).enumerate() {
                    for (cc, chunk) in row.chunks_mut(32).enumerate() {
                        w.decode(r, j0 / 32 + cc, &mut v);
                        chunk.copy_from_slice(&v[..chunk.len()]);
                    }
                }
                (strip, cols as isize, 1isize)
            }
        };
        // SAFETY: A is m×k row-major, the strip k×cols at strides (rs, cs); this task
        // writes columns j0..j0 + cols of C's m rows (row stride n) only.
        unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                out.at(j0),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                strip.as_ptr(),
                cs,
                rs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    // SAFETY: the strips cover all n columns of all m rows.
    unsafe { c.set_len(m * n) };
    c
}
