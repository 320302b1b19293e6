//! One-line errors: the file, then the line or record, then what was expected.

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: {what}")]
    File { file: String, what: String },
    /// `at` is "line 12" (JSONL) or "record 3" (JSON array), 1-based as editors show them.
    #[error("{file}: {at}: {what}")]
    Record {
        file: String,
        at: String,
        what: String,
    },
}

impl DataError {
    pub fn file(file: impl std::fmt::Display, what: impl std::fmt::Display) -> Self {
        DataError::File {
            file: file.to_string(),
            what: what.to_string(),
        }
    }
    pub fn record(
        file: impl std::fmt::Display,
        at: impl std::fmt::Display,
        what: impl std::fmt::Display,
    ) -> Self {
        DataError::Record {
            file: file.to_string(),
            at: at.to_string(),
            what: what.to_string(),
        }
    }
}
