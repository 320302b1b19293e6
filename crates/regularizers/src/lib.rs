//! phi-regularizers: extra loss terms and input edits the seed recipes add to the LM loss.
//! They read the forward's taps (never global hooks), so they work under autodiff and
//! with any backend.

pub mod bos;
pub mod norm_target;

pub use bos::BosScale;
pub use norm_target::NormTarget;

#[derive(Debug, thiserror::Error)]
#[error("{key} = {value}: {expected}")]
pub struct RegError {
    pub key: String,
    pub value: String,
    pub expected: String,
}

impl RegError {
    pub fn new(key: &str, value: impl ToString, expected: impl Into<String>) -> Self {
        RegError {
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}
