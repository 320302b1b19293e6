//! HF's `ForCausalLMLoss`: cross-entropy of logits[:, :-1] against labels[:, 1:], ignoring
//! -100, averaged over every counted token of the batch (not per sequence).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

pub const IGNORE_INDEX: i64 = -100;

/// Sum of the token losses and the number of counted tokens; the sum form lets gradient
/// accumulation normalise over the whole accumulated batch.
pub fn causal_lm_loss_sum(logits: Tensor<3>, labels: &[i64]) -> (Tensor<1>, usize) {
    let [b, t, v] = logits.dims();
    let device = logits.device();
    let n = b * (t - 1);
    let mut targets = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    for r in 0..b {
        for i in 1..t {
            let l = labels[r * t + i];
            let keep = l != IGNORE_INDEX;
            targets.push(if keep { l } else { 0 });
            weights.push(if keep { 1.0f32 } else { 0.0 });
        }
    }
    let count = weights.iter().filter(|w| **w > 0.0).count();
    let shifted = logits.slice([0..b, 0..t - 1, 0..v]).reshape([n, v]);
    let logp = log_softmax(shifted, 1);
    let idx = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let picked = logp.gather(1, idx).reshape([n]);
    let w = Tensor::<1>::from_data(TensorData::new(weights, [n]), &device);
    ((picked * w).sum().neg(), count)
}

/// Mean token loss; 0 (not NaN) when no token is counted.
pub fn causal_lm_loss(logits: Tensor<3>, labels: &[i64]) -> Tensor<1> {
    let (sum, count) = causal_lm_loss_sum(logits, labels);
    sum / (count.max(1) as f64)
}
