//! Attention's data movement as one pass each way: the projected q, k, v columns (one fused
//! qkv tensor or three tensors) gathered into heads with RoPE applied, and the heads' output
//! written back as [B, T, heads·d]; the backward runs the same passes inverted. Composed from
//! Burn ops this is three slices, two transposes and RoPE's slice, neg, cat, mul and add, each
//! a pass over the tensor, and their backward zero-fills full-size gradients and adds them up
//! on one thread (a fifth of a phi3-small `--bf16` step's serial time in `perf`).

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// cos and sin for one call's positions, [rows, T, rot] row-major (rows 1: one table for the
/// whole batch), RoPE on the first `rot` dims of each head (HF's rotate-half form).
#[derive(Debug, Clone)]
pub struct Rotary {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub rows: usize,
    pub t: usize,
    pub rot: usize,
}

impl Rotary {
    fn at(&self, batch: usize, pos: usize) -> (&[f32], &[f32]) {
        let i = ((batch % self.rows.max(1)) * self.t + pos) * self.rot;
        (&self.cos[i..i + self.rot], &self.sin[i..i + self.rot])
    }
}

/// Where the heads sit in the projected inputs: input i is [B, T, width[i]] and its heads
/// (q: `heads`, k and v: `kv_heads`, `d` wide each) start at column start[i].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub width: [usize; 3],
    pub start: [usize; 3],
    /// The bf16 kernel path attention's products run on (`--bf16`); None: f32.
    pub bf16: Option<crate::bf16::Path>,
}

impl Heads {
    fn count(&self, part: usize) -> usize {
        if part == 0 {
            self.heads
        } else {
            self.kv_heads
        }
    }
}

/// A new buffer of n floats written in parallel chunks of `chunk` by `f(chunk index, chunk)`.
/// Each task zeroes its own chunk just before filling it (while it is in cache) rather than
/// the whole buffer being zeroed first in one serial pass.
pub(crate) fn par_filled(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| {
            c.fill(MaybeUninit::new(0.0));
            // SAFETY: every element of the chunk was just written.
            f(i, unsafe {
                &mut *(c as *mut [MaybeUninit<f32>] as *mut [f32])
            });
        });
    // SAFETY: the chunks cover all n elements, each written above.
    unsafe { out.set_len(n) };
    out
}

/// out = x·cos + rotate_half(x)·sin on the first rot dims, x on the rest.
fn rope(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let (rot, half) = (cos.len(), cos.len() / 2);
    for j in 0..half {
        out[j] = x[j] * cos[j] - x[j + half] * sin[j];
        out[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
    }
    out[rot..].copy_from_slice(&x[rot..]);
}

/// The gradient at x of `rope`'s out for its gradient dy (the transposed rotation).
fn rope_back(dy: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
    let (rot, half) = (cos.len(), cos.len() / 2);
    for j in 0..half {
        dx[j] = dy[j] * cos[j] + dy[j + half] * sin[j + half];
        dx[j + half] = dy[j + half] * cos[j + half] - dy[j] * sin[j];
    }
    dx[rot..].copy_from_slice(&dy[rot..]);
}

/// q [B, heads, T, d], k and v [B, kv_heads, T, d] from the inputs (`parts[i]` the data of
/// input i), RoPE applied to q and k. q's heads of one kv head are adjacent, so q is also
/// the GQA-stacked [B, kv_heads, g·T, d] that `attention` takes.
pub fn gather(parts: [&[f32]; 3], h: &Heads, rope_t: &Rotary, b: usize) -> [Vec<f32>; 3] {
    let (t, d) = (rope_t.t, h.d);
    [0, 1, 2].map(|p| {
        let (src, width, start) = (parts[p], h.width[p], h.start[p]);
        let count = h.count(p);
        par_filled(b * count * t * d, t * d, |i, out| {
            let (bi, head) = (i / count, i % count);
            let col = start + head * d;
            for (pos, o) in out.chunks_mut(d).enumerate() {
                let row = &src[(bi * t + pos) * width + col..][..d];
                if p < 2 {
                    let (cos, sin) = rope_t.at(bi, pos);
                    rope(row, cos, sin, o);
                } else {
                    o.copy_from_slice(row);
                }
            }
        })
    })
}

/// [B, heads, T, d] → [B, T, heads·d] (or back, with `to_heads`).
pub fn merge_heads(x: &[f32], heads: usize, t: usize, d: usize, to_heads: bool) -> Vec<f32> {
    if to_heads {
        par_filled(x.len(), t * d, |i, out| {
            let (bi, head) = (i / heads, i % heads);
            for (pos, o) in out.chunks_mut(d).enumerate() {
                o.copy_from_slice(&x[(bi * t + pos) * heads * d + head * d..][..d]);
            }
        })
    } else {
        par_filled(x.len(), heads * d, |r, out| {
            let (bi, pos) = (r / t, r % t);
            for (head, o) in out.chunks_mut(d).enumerate() {
                o.copy_from_slice(&x[((bi * heads + head) * t + pos) * d..][..d]);
            }
        })
    }
}

/// `gather`'s backward: the gradients of q, k, v (as `gather` returns them) written into
/// one gradient per distinct input, with its width. `input[p]` names which of them part p
/// came from (parts of one fused qkv share one). Columns no part covers are 0.
pub fn scatter(
    grads: [&[f32]; 3],
    h: &Heads,
    rope_t: &Rotary,
    b: usize,
    input: [usize; 3],
) -> Vec<(Vec<f32>, usize)> {
    let (t, d) = (rope_t.t, h.d);
    let inputs = input.iter().max().map_or(0, |m| m + 1);
    (0..inputs)
        .map(|j| {
            let width = h.width[input
                .iter()
                .position(|&x| x == j)
                .expect("input j has a part")];
            let grad = par_filled(b * t * width, width, |r, row| {
                let (bi, pos) = (r / t, r % t);
                for p in (0..3).filter(|&p| input[p] == j) {
                    let count = h.count(p);
                    for head in 0..count {
                        let g = &grads[p][((bi * count + head) * t + pos) * d..][..d];
                        let o = &mut row[h.start[p] + head * d..][..d];
                        if p < 2 {
                            let (cos, sin) = rope_t.at(bi, pos);
                            rope_back(g, cos, sin, o);
                        } else {
                            o.copy_from_slice(g);
                        }
                    }
                }
            });
            (grad, width)
        })
        .collect()
}
