//! HF's `ForCausalLMLoss`: cross-entropy of logits[:, :-1] against labels[:, 1:], ignoring
//! -100, averaged over every counted token of the batch (not per sequence).

use burn::tensor::Tensor;
use phi_kernels::cross_entropy_sum;

pub const IGNORE_INDEX: i64 = -100;

/// Sum of the token losses and the number of counted tokens; the sum form lets gradient
/// accumulation normalise over the whole accumulated batch.
pub fn causal_lm_loss_sum(logits: Tensor<3>, labels: &[i64]) -> (Tensor<1>, usize) {
    let [b, t, v] = logits.dims();
    let (targets, count) = shifted_targets(b, t, labels);
    (
        cross_entropy_sum(logits.reshape([b * t, v]), targets),
        count,
    )
}

/// Each of the B·T rows' target (−1 where none counts) and the number counted: row r·t+i
/// predicts labels[r·t+i+1], and each sequence's last row predicts nothing. Keeping every row
/// (rather than slicing logits[:, :-1]) keeps the [B·T, V] view free of copies.
pub fn shifted_targets(b: usize, t: usize, labels: &[i64]) -> (Vec<i64>, usize) {
    let targets: Vec<i64> = (0..b * t)
        .map(|j| match labels.get(j + 1) {
            Some(&l) if (j + 1) % t != 0 && l != IGNORE_INDEX => l,
            _ => -1,
        })
        .collect();
    let count = targets.iter().filter(|&&l| l >= 0).count();
    (targets, count)
}

/// Mean token loss; 0 (not NaN) when no token is counted.
pub fn causal_lm_loss(logits: Tensor<3>, labels: &[i64]) -> Tensor<1> {
    let (sum, count) = causal_lm_loss_sum(logits, labels);
    sum / (count.max(1) as f64)
}
