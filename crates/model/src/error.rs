//! One error type for the model crate; every message is one line that names the file and the
//! key or tensor, and what was expected.

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{file}: {what}")]
    Io { file: String, what: String },
    #[error("{file}: key {key}: expected {expected}")]
    Config {
        file: String,
        key: String,
        expected: String,
    },
    #[error("{file}: unsupported architecture {arch:?} (supported: {supported})")]
    UnsupportedArch {
        file: String,
        arch: String,
        supported: String,
    },
    #[error("{file}: tensor {tensor}: {expected}")]
    Tensor {
        file: String,
        tensor: String,
        expected: String,
    },
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("{0}")]
    Other(String),
}

impl ModelError {
    pub fn io(file: impl std::fmt::Display, what: impl std::fmt::Display) -> Self {
        ModelError::Io {
            file: file.to_string(),
            what: what.to_string(),
        }
    }
    pub fn config(
        file: impl std::fmt::Display,
        key: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ModelError::Config {
            file: file.to_string(),
            key: key.into(),
            expected: expected.into(),
        }
    }
    pub fn tensor(
        file: impl std::fmt::Display,
        tensor: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ModelError::Tensor {
            file: file.to_string(),
            tensor: tensor.into(),
            expected: expected.into(),
        }
    }
}
