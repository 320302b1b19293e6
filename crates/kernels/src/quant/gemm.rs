//! Products with a quantized weight W [d_out, d_in] that decode its blocks next to the GEMM:
//! y = x·Wᵀ (the forward) and dx = dy·W (the input gradient), on the bf16 kernels or in f32.
//!
//! bf16: B's columns are decoded a chunk of pairs of panels at a time (about 16 MB, rounded to
//! bf16 in the kernels' pair layout: one decoding pass over the weight per product), and the
//! bf16 GEMM runs over each chunk as over a packed weight. The weight is never held decoded
//! whole, and A is streamed once per chunk rather than once per pair. f32: strips of 64 columns of B are decoded to f32 and multiplied by `gemm`, a task
//! a strip.

use super::QuantWeight;
use crate::bf16::{self, Bf16Buf, Out, Panels, Path, PANEL};
use rayon::prelude::*;

/// Bytes of decoded panels a product holds at once.
const CHUNK_BYTES: usize = 16 << 20;
/// B columns a task of the f32 products decodes at once.
const STRIP: usize = 64;

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

/// Two values rounded to bf16 (as `bf16::to_bf16`, without its branch) in one pair word.
#[inline(always)]
fn pair_word(a: f32, b: f32) -> u32 {
    let r = |x: f32| {
        let b = x.to_bits();
        let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
        let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
        if nan {
            (b >> 16) | 0x40
        } else {
            rounded
        }
    };
    r(a) | r(b) << 16
}

/// B's panels 2p and 2p + 1 in bf16 pairs, into `slab` (k_pad·32 values).
fn decode_pair(w: &QuantWeight, side: Side, p: usize, k_pad: usize, slab: &mut [u16]) {
    // SAFETY: a u16 slice reinterpreted as pairs; the buffer starts on a cache line (Bf16Buf)
    // and panels hold whole pair rows, so every u32 is aligned and in bounds.
    let words: &mut [u32] =
        unsafe { std::slice::from_raw_parts_mut(slab.as_mut_ptr().cast::<u32>(), slab.len() / 2) };
    #[cfg(target_arch = "x86_64")]
    if super::simd::applies(w) {
        // SAFETY: checked by `applies`; the slab holds the two panels from a line boundary.
        unsafe { super::simd::decode_pair(w, side == Side::Forward, p, k_pad, words) };
        return;
    }
    decode_pair_scalar(w, side, p, k_pad, words)
}

/// `decode_pair` for any block format, 32 values at a time through `QuantWeight::decode`.
pub(super) fn decode_pair_scalar(
    w: &QuantWeight,
    side: Side,
    p: usize,
    k_pad: usize,
    words: &mut [u32],
) {
    let per_panel = k_pad * PANEL;
    let mut v = [0f32; 32];
    match side {
        Side::Forward => {
            // B column j is W's row j: its (k, k+1) values sit side by side in a pair. 16
            // rows' chunks become pair words, then a 16 × 16 transpose writes them a pair
            // row (16 words, one cache line) at a time.
            let mut rows = [[0u32; 16]; PANEL];
            for panel in 0..2 {
                let base = panel * per_panel / 2;
                for c in 0..w.d_in / 32 {
                    for (col, row) in rows.iter_mut().enumerate() {
                        let j = 2 * PANEL * p + PANEL * panel + col;
                        if j < w.d_out {
                            w.decode(j, c, &mut v);
                        } else {
                            v = [0.0; 32];
                        }
                        for (r, o) in row.iter_mut().enumerate() {
                            *o = pair_word(v[2 * r], v[2 * r + 1]);
                        }
                    }
                    for r in 0..16 {
                        let line = &mut words[base + (16 * c + r) * PANEL..][..PANEL];
                        for (o, row) in line.iter_mut().zip(&rows) {
                            *o = row[r];
                        }
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
    let pairs = n.div_ceil(2 * PANEL);
    let slab = k_pad * 2 * PANEL;
    // Pairs decoded together: about 16 MB of bf16 panels, so A (streamed once per chunk)
    // is read a few times per product, not once per pair.
    let chunk = (CHUNK_BYTES / (2 * slab)).clamp(1, pairs);
    let mut buf = take_buffer(chunk.min(pairs) * slab);
    for p0 in (0..pairs).step_by(chunk) {
        let count = chunk.min(pairs - p0);
        buf[..count * slab]
            .par_chunks_mut(slab)
            .enumerate()
            .for_each(|(i, s)| decode_pair(w, side, p0 + i, k_pad, s));
        let j0 = 2 * PANEL * p0;
        let b = Panels {
            data: &buf[..count * slab],
            k_pad,
            panels: 2 * count,
        };
        let extra = extra.map(|(a2, b2)| (a2.data(), b2.panel_range(2 * p0, 2 * count)));
        // SAFETY: C has m rows of n floats; columns j0.. of this chunk's panels are below n.
        unsafe {
            bf16::run_panels(
                path,
                (a.data(), b),
                extra,
                (m, n - j0, n),
                c.as_mut_ptr().add(j0),
            )
        };
    }
    POOL.lock().map(|mut p| p.push(buf)).ok();
    // SAFETY: the chunks cover every pair, and each block stores all its elements.
    unsafe { c.set_len(m * n) };
    c
}

/// Decoding buffers kept between products (a fresh 16 MB buffer costs its page faults on
/// every call). A pool, not one per thread: products nest under rayon's work stealing.
static POOL: std::sync::Mutex<Vec<Bf16Buf>> = std::sync::Mutex::new(Vec::new());

/// A buffer of at least `len` values from the pool, or a new one.
fn take_buffer(len: usize) -> Bf16Buf {
    let got = POOL.lock().ok().and_then(|mut p| {
        let i = p.iter().position(|b| b.len() >= len)?;
        Some(p.swap_remove(i))
    });
    got.unwrap_or_else(|| Bf16Buf::zeroed(len))
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
