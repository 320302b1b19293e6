//! BOS scaling: the embedding output at position 0 of every sequence times a factor
//! (0 zeroes it, 1 is off). Position 0 is where the attention sink forms; scaling its
//! input is the recipe's lever on it.

use crate::RegError;
use burn::tensor::Tensor;
use serde_json::{json, Value};
use std::path::Path;

/// Written beside a trained adapter or model so later runs can apply the same scaling.
pub const CONFIG_FILE: &str = "bos_zero_config.json";

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

    /// `embeds` with every sequence's first position scaled (`CausalLm::scale_sequence_starts`,
    /// which generation uses too).
    pub fn apply(&self, embeds: Tensor<3>, position_ids: Option<&[i64]>) -> Tensor<3> {
        phi_model::CausalLm::scale_sequence_starts(embeds, self.factor, position_ids)
    }

    /// The content of `bos_zero_config.json`.
    pub fn config_json(&self) -> Value {
        json!({
            "use_bos_zero_training": true,
            "bos_scaling_factor": self.factor,
            "applies_to": "embedding output at position 0 of every sequence",
        })
    }

    /// The scaling recorded in `dir/bos_zero_config.json`, if that file is there.
    pub fn read_config(dir: &Path) -> Result<Option<BosScale>, RegError> {
        let p = dir.join(CONFIG_FILE);
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Ok(None);
        };
        let shown = p.display().to_string();
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| RegError::new(&shown, "(unreadable)", format!("valid JSON: {e}")))?;
        if v["use_bos_zero_training"] == json!(false) {
            return Ok(None);
        }
        let f = v["bos_scaling_factor"].as_f64().ok_or_else(|| {
            RegError::new(
                &format!("{shown}: bos_scaling_factor"),
                &v["bos_scaling_factor"],
                "a number",
            )
        })?;
        BosScale::new(f).map(Some)
    }

    /// phi-generate's and phi-capture's `--bos-scaling`: `auto` applies the adapter folder's
    /// bos_zero_config.json when it has one, `off` never scales, a number is the factor.
    /// Returns the scaling and, when one applies, a line saying where it came from.
    pub fn from_flag(
        flag: &str,
        adapter: Option<&Path>,
    ) -> Result<(Option<BosScale>, Option<String>), RegError> {
        match flag {
            "off" => Ok((None, None)),
            "auto" => {
                let Some(dir) = adapter else {
                    return Ok((None, None));
                };
                let found = BosScale::read_config(dir)?;
                let note = found.map(|b| {
                    format!(
                        "BOS scaling {} from {} (as in training; --bos-scaling off to disable)",
                        b.factor,
                        dir.join(CONFIG_FILE).display()
                    )
                });
                Ok((found, note))
            }
            x => {
                let f: f64 = x
                    .parse()
                    .map_err(|_| RegError::new("--bos-scaling", x, "auto, off or a number"))?;
                let b = BosScale::new(f)?;
                Ok((Some(b), Some(format!("BOS scaling {f} (--bos-scaling)"))))
            }
        }
    }
}
