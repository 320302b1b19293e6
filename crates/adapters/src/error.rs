//! One-line errors naming the file, the key or tensor, and what was expected; the shapes of
//! those lines are the model crate's, so both crates read alike.

use phi_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Other(String),
}

impl AdapterError {
    pub fn config(
        file: impl std::fmt::Display,
        key: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ModelError::config(file, key, expected).into()
    }
    pub fn tensor(
        file: impl std::fmt::Display,
        tensor: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ModelError::tensor(file, tensor, expected).into()
    }
}
