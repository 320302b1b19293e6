//! The LM head and the cross-entropy together, on a frozen head packed in bf16 (`--bf16`) or
//! quantized:
//! the counted rows run through head, loss and gradient a chunk at a time, so the
//! [tokens, vocab] logits and their gradient (the largest tensors of a step: 131 MB each for
//! 1024 tokens of Phi-3's vocabulary, 201 MB for SmolLM2's) are never held whole, and rows the
//! loss ignores (masked prompts, each sequence's last position) cost nothing. As Liger's and
//! Unsloth's fused losses do, the input gradient is made in the forward, from the gradient of
//! the summed loss; the backward only scales it.

use super::bf16::{self, PackedA};
use super::kernels;
use super::packed::{PackedWeight, Store};
use rayon::prelude::*;

/// Rows a chunk: as many as the GEMM's row block, since each chunk streams the whole head
/// weight from memory twice (forward and transposed); chunks of 64 rows were slower than
/// the unfused head.
const CHUNK: usize = 256;

/// Σ over rows with a target ≥ 0 of −log softmax(h[r]·W)[target[r]] (summed in f64, in row
/// order, as the unfused loss), and with `grad` d sum / d h [rows, d_in]: (softmax − onehot)
/// times Wᵀ, zero on ignored rows; on a bf16 path the factor rounded to bf16 first
/// (autocast's input to the backward GEMM).
pub(crate) fn head_loss(
    h: &[f32],
    w: &PackedWeight,
    targets: &[i64],
    grad: bool,
) -> (f32, Option<Vec<f32>>) {
    let (d, v) = (w.d_in(), w.d_out());
    assert_eq!(h.len(), targets.len() * d, "h is not [targets, d_in]");
    let counted: Vec<usize> = (0..targets.len()).filter(|&r| targets[r] >= 0).collect();
    // A bf16 head's panels transposed once for all chunks (a quantized head decodes its
    // blocks per product anyway).
    let wt = match (&w.store, grad) {
        (Store::Bf16(b), true) => Some(b.transposed()),
        _ => None,
    };
    let mut dh = grad.then(|| kernels::zeroed(h.len()));
    let mut sum = 0f64;
    let mut x = Vec::with_capacity(CHUNK.min(counted.len()) * d);
    for rows in counted.chunks(CHUNK) {
        x.clear();
        for &r in rows {
            x.extend_from_slice(&h[r * d..(r + 1) * d]);
        }
        let t: Vec<i64> = rows.iter().map(|&r| targets[r]).collect();
        let mut logits = w.forward(&x, rows.len());
        let (loss, lse) = kernels::cross_entropy_forward(&logits, v, &t);
        sum += loss.iter().map(|&l| l as f64).sum::<f64>();
        if let Some(dh) = dh.as_mut() {
            // softmax − onehot (every row here is counted).
            let dx = match (w.path, &wt) {
                (None, _) => {
                    let rows_t = t.par_iter().zip(lse.par_iter());
                    logits
                        .par_chunks_mut(v)
                        .zip(rows_t)
                        .for_each(|(z, (&t, &lse))| {
                            kernels::exp_minus(z, 1.0, lse);
                            z[t as usize] -= 1.0;
                        });
                    w.input_grad(&logits, rows.len())
                }
                (Some(path), wt) => {
                    // Rounded to bf16 as it is made, into the GEMM's rows: the f32 logits
                    // are read once more, not written back and read again to round.
                    let fill = |i: usize, out: &mut [std::mem::MaybeUninit<u16>]| {
                        let (z, t) = (&logits[i * v..(i + 1) * v], t[i] as usize);
                        kernels::exp_minus_rounded(z, lse[i], out);
                        out[t].write(bf16::to_bf16(kernels::exp(z[t] - lse[i]) - 1.0));
                    };
                    // SAFETY: a row of the logits and of the output are both v values, and
                    // `exp_minus_rounded` writes one for each.
                    let g = unsafe { PackedA::rows_with(rows.len(), v, fill) };
                    drop(logits);
                    match wt {
                        Some(wt) => bf16::product_packed(path, &g, wt, None),
                        None => w.input_grad_packed(&g, None),
                    }
                }
            };
            for (&r, src) in rows.iter().zip(dx.chunks(d)) {
                dh[r * d..(r + 1) * d].copy_from_slice(src);
            }
        }
    }
    (sum as f32, dh)
}
