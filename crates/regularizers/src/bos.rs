//! BOS scaling: the embedding output at position 0 of every sequence times a factor
//! (0 zeroes it, 1 is off). Position 0 is where the attention sink forms; scaling its
//! input is the recipe's lever on it.

use crate::RegError;
use burn::tensor::{Tensor, TensorData};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BosScale {
    pub factor: f64,
}

impl BosScale {
    pub fn new(factor: f64) -> Result<Self, RegError> {
        if !factor.is_finite() {
            return Err(RegError::new(
                "bos_scaling_factor",
                factor,
                "a finite number",
            ));
        }
        Ok(BosScale { factor })
    }

    /// `embeds` [batch, seq, hidden]. Without `position_ids` position 0 is the first column;
    /// with them (packed rows) every token whose position id is 0 starts a sequence.
    pub fn apply(&self, embeds: Tensor<3>, position_ids: Option<&[i64]>) -> Tensor<3> {
        let [b, t, _] = embeds.dims();
        let f = self.factor as f32;
        let (scale, shape) = match position_ids {
            None => {
                let mut s = vec![1.0f32; t];
                s[0] = f;
                (s, [1, t, 1])
            }
            Some(p) => (
                p.iter().map(|&x| if x == 0 { f } else { 1.0 }).collect(),
                [b, t, 1],
            ),
        };
        let scale = Tensor::<3>::from_data(TensorData::new(scale, shape), &embeds.device());
        embeds * scale
    }
}
