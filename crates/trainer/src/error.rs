//! One-line errors: what (file, key or step) and what was expected.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] phi_model::ModelError),
    #[error(transparent)]
    Adapter(#[from] phi_adapters::AdapterError),
    #[error(transparent)]
    Data(#[from] phi_data::DataError),
    #[error(transparent)]
    Reg(#[from] phi_regularizers::RegError),
    #[error("{0}")]
    Msg(String),
}

impl TrainError {
    pub fn file(path: &Path, what: impl std::fmt::Display) -> Self {
        TrainError::Msg(format!("{}: {what}", path.display()))
    }
    /// A setting with a bad value: `key = value: expected`.
    pub fn arg(key: &str, value: impl std::fmt::Display, expected: impl std::fmt::Display) -> Self {
        TrainError::Msg(format!("{key} = {value}: expected {expected}"))
    }
}

impl From<std::io::Error> for TrainError {
    fn from(e: std::io::Error) -> Self {
        TrainError::Msg(e.to_string())
    }
}
