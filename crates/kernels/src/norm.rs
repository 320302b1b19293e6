//! RMSNorm (Llama's, Phi-3's: x / sqrt(mean(x²) + eps) · w, in f32) as one pass over each row
//! forward and one backward, where the composed version runs five ops with a tensor each
//! (square, mean, add-sqrt-recip, two products) and their backward passes.

use super::kernels::zeroed;
use rayon::prelude::*;

/// Rows per task.
const ROWS: usize = 16;

/// Σ x² in 16 lanes (a form the compiler vectorises), then across them.
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    acc.iter().sum::<f32>() + tail
}

/// Σ a·b·c in 16 lanes.
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        for l in 0..16 {
            acc[l] += a[i + l] * b[i + l] * c[i + l];
        }
    }
    let tail: f32 = (n..a.len()).map(|i| a[i] * b[i] * c[i]).sum();
    acc.iter().sum::<f32>() + tail
}

/// out = x · inv · w per row of `x` (rows of w.len()); returns each row's inv =
/// 1 / sqrt(mean(x²) + eps), which the backward needs.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Vec<f32> {
    let d = w.len().max(1);
    let mut inv = vec![0f32; x.len() / d];
    out.par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d))
        .zip(inv.par_chunks_mut(ROWS))
        .for_each(|((o, x), inv)| {
            for ((o, x), r) in o.chunks_mut(d).zip(x.chunks(d)).zip(inv) {
                *r = (sum_sq(x) / d as f32 + eps).sqrt().recip();
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * *r * w;
                }
            }
        });
    inv
}

/// dx = inv·(dy·w) − x·inv³·mean(dy·w·x) per row, and dw = Σ over rows of dy·x·inv when
/// `want_dw`.
pub fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    inv: &[f32],
    dy: &[f32],
    want_dw: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let d = w.len().max(1);
    let mut dx = zeroed(x.len());
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d))
        .zip(dy.par_chunks(ROWS * d))
        .zip(inv.par_chunks(ROWS))
        .map(|(((dx, x), dy), inv)| {
            let mut dw = if want_dw { vec![0f32; d] } else { Vec::new() };
            for (((dx, x), dy), &r) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)).zip(inv)
            {
                let c = r * r * r * dot3(dy, w, x) / d as f32;
                for j in 0..d {
                    dx[j] = r * dy[j] * w[j] - x[j] * c;
                }
                if want_dw {
                    for j in 0..d {
                        dw[j] += dy[j] * x[j] * r;
                    }
                }
            }
            dw
        })
        .collect();
    let dw = want_dw.then(|| {
        let mut dw = vec![0f32; d];
        for p in &partial {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        dw
    });
    (dx, dw)
}
