//! Rotary position tables, computed on the host in float32 the way transformers does
//! (`inv_freq` in f32, `freqs = pos·inv_freq` in f32), so positions far from zero match.

use crate::config::{ModelConfig, RopeScaling};
use burn::tensor::{Device, Tensor, TensorData};
use phi_kernels::rotary::Rotary;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Rope {
    pub rot_dim: usize,
    /// Frequencies for calls whose longest position fits the original context.
    pub inv_freq: Vec<f32>,
    /// Phi-3 longrope only: frequencies for calls that go beyond it.
    pub long_inv_freq: Option<Vec<f32>>,
    pub original_max_positions: usize,
    /// Multiplies cos and sin (longrope's attention factor; 1 otherwise).
    pub attention_scaling: f32,
}

fn base_exponents(rot_dim: usize) -> Vec<f32> {
    (0..rot_dim / 2)
        .map(|i| (2 * i) as f32 / rot_dim as f32)
        .collect()
}

fn pow_f32(base: f64, e: f32) -> f32 {
    base.powf(e as f64) as f32
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let rot_dim = cfg.rotary_dim();
        let theta = cfg.rope_theta;
        let exps = base_exponents(rot_dim);
        let default: Vec<f32> = exps.iter().map(|&e| 1.0f32 / pow_f32(theta, e)).collect();
        match &cfg.rope_scaling {
            RopeScaling::Default => Rope {
                rot_dim,
                inv_freq: default,
                long_inv_freq: None,
                original_max_positions: usize::MAX,
                attention_scaling: 1.0,
            },
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let orig = *original_max_position_embeddings as f64;
                let low_wl = orig / low_freq_factor;
                let high_wl = orig / high_freq_factor;
                let inv = default
                    .iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wl = 2.0 * std::f64::consts::PI / f;
                        let v = if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let s = (orig / wl - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - s) * f / factor + s * f
                        };
                        v as f32
                    })
                    .collect();
                Rope {
                    rot_dim,
                    inv_freq: inv,
                    long_inv_freq: None,
                    original_max_positions: usize::MAX,
                    attention_scaling: 1.0,
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let with = |ext: &[f64]| -> Vec<f32> {
                    exps.iter()
                        .zip(ext)
                        .map(|(&e, &x)| 1.0f32 / ((x as f32) * pow_f32(theta, e)))
                        .collect()
                };
                Rope {
                    rot_dim,
                    inv_freq: with(short_factor),
                    long_inv_freq: Some(with(long_factor)),
                    original_max_positions: *original_max_position_embeddings,
                    attention_scaling: *attention_factor as f32,
                }
            }
        }
    }

    /// transformers picks long factors for a whole call when its largest position is beyond
    /// the original context.
    pub fn wants_long(&self, max_position: usize) -> bool {
        self.long_inv_freq.is_some() && max_position + 1 > self.original_max_positions
    }

    /// cos and sin for `positions` ([rows, T] flattened row-major) as [rows, 1, T, rot_dim],
    /// and the same values for the fused attention.
    pub fn tables(
        &self,
        positions: &[i64],
        rows: usize,
        long: bool,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>, Arc<Rotary>) {
        let inv = match (&self.long_inv_freq, long) {
            (Some(l), true) => l,
            _ => &self.inv_freq,
        };
        let half = self.rot_dim / 2;
        let t = positions.len() / rows.max(1);
        let mut cos = Vec::with_capacity(positions.len() * self.rot_dim);
        let mut sin = Vec::with_capacity(positions.len() * self.rot_dim);
        for &p in positions {
            let start = cos.len();
            for &f in inv {
                let angle = (p as f32) * f;
                cos.push((angle as f64).cos() as f32 * self.attention_scaling);
                sin.push((angle as f64).sin() as f32 * self.attention_scaling);
            }
            // cat(freqs, freqs): the second half repeats the first.
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let shape = [rows, 1, t, self.rot_dim];
        let table = Arc::new(Rotary {
            cos: cos.clone(),
            sin: sin.clone(),
            rows,
            t,
            rot: self.rot_dim,
        });
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
            table,
        )
    }
}
