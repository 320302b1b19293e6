//! The norm-target regularizer: for each chosen layer, the per-token L2 norm (over the hidden
//! dim, not the RMS) of the `post_attention_layernorm` output, squared distance to a target,
//! averaged over tokens, then over layers, times a weight.

use crate::RegError;
use burn::tensor::{Tensor, TensorData};
use phi_model::{ModelConfig, TapRequest, Taps};

#[derive(Debug, Clone, PartialEq)]
pub struct NormTarget {
    /// 0-based decoder layer indices.
    pub layers: Vec<usize>,
    pub weight: f64,
    pub target: f64,
    /// false: only positions with attention_mask != 0 count (the default); true: every
    /// position, pads included (the formula as LLaMA-Factory's recipe describes it).
    pub include_padding: bool,
}

impl NormTarget {
    /// `"2,4"`: layer indices, comma-separated.
    pub fn parse_layers(s: &str) -> Result<Vec<usize>, RegError> {
        let bad = || RegError::new("rmsnorm_reg_layers", s, "comma-separated layer indices");
        let layers: Vec<usize> = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        if layers.is_empty() {
            return Err(bad());
        }
        Ok(layers)
    }

    /// An architecture without post-attention RMSNorm, or a layer out of range, is an error:
    /// silently regularizing nothing would look like a working recipe.
    pub fn check(&self, cfg: &ModelConfig) -> Result<(), RegError> {
        let list = || {
            self.layers
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        if !cfg.has_post_attention_layernorm() {
            return Err(RegError::new(
                "use_rmsnorm_regularization",
                "true",
                format!(
                    "a model with post-attention RMSNorm; {} has no post_attention_layernorm",
                    cfg.arch.hf_class()
                ),
            ));
        }
        let n = cfg.num_hidden_layers;
        if let Some(bad) = self.layers.iter().find(|&&l| l >= n) {
            return Err(RegError::new(
                "rmsnorm_reg_layers",
                list(),
                format!("layer indices below {n} (layer {bad} does not exist)"),
            ));
        }
        if !self.weight.is_finite() || !self.target.is_finite() {
            return Err(RegError::new(
                "rmsnorm_reg_weight / rmsnorm_reg_target_norm",
                format!("{} / {}", self.weight, self.target),
                "finite numbers",
            ));
        }
        Ok(())
    }

    pub fn taps(&self) -> TapRequest {
        TapRequest {
            post_attention_layernorm: self.layers.clone(),
            ..TapRequest::none()
        }
    }

    /// Mean over counted tokens of (‖h[b,t]‖ − τ)², one value per chosen layer, unweighted.
    /// `mask` is [batch·seq] (any nonzero value counts, so packed segment ids work).
    pub fn per_layer(&self, taps: &Taps, mask: Option<&[i64]>) -> Vec<Tensor<1>> {
        self.layers
            .iter()
            .map(|l| {
                let h = taps
                    .post_attention_layernorm
                    .get(l)
                    .unwrap_or_else(|| panic!("forward ran without the taps of NormTarget::taps"));
                let [b, t, _] = h.dims();
                let norms = h
                    .clone()
                    .powf_scalar(2.0)
                    .sum_dim(2)
                    .sqrt()
                    .reshape([b * t]);
                let sq = (norms - self.target).powf_scalar(2.0);
                match mask.filter(|_| !self.include_padding) {
                    None => sq.mean(),
                    Some(m) => {
                        let w: Vec<f32> =
                            m.iter().map(|&v| if v != 0 { 1.0 } else { 0.0 }).collect();
                        let count = w.iter().sum::<f32>().max(1.0);
                        let w = Tensor::<1>::from_data(TensorData::new(w, [b * t]), &sq.device());
                        (sq * w).sum() / count as f64
                    }
                }
            })
            .collect()
    }

    /// weight · mean over layers: the term added to the LM loss.
    pub fn loss(&self, taps: &Taps, mask: Option<&[i64]>) -> Tensor<1> {
        let per = self.per_layer(taps, mask);
        let k = per.len() as f64;
        let sum = per
            .into_iter()
            .reduce(|a, b| a + b)
            .expect("at least one layer");
        sum * (self.weight / k)
    }
}
