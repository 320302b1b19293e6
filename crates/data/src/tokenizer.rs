//! A thin wrapper over HF `tokenizers` that finds tokenizer.json and reports one-line errors.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: {what}")]
    File { file: String, what: String },
}

pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

impl Tok {
    /// `path` is a tokenizer.json or a folder holding one.
    pub fn load(path: &Path) -> Result<Tok, DataError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| DataError::File {
            file: file.display().to_string(),
            what: format!("cannot load tokenizer: {e}"),
        })?;
        Ok(Tok { inner, path: file })
    }

    /// Encodes as `tokenizer(text)` does in transformers: with the tokenizer's own special
    /// tokens (e.g. a BOS added by its post-processor) when `special` is true.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, DataError> {
        self.inner
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::File {
                file: self.path.display().to_string(),
                what: format!("cannot encode text: {e}"),
            })
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.inner.decode(ids, skip_special).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
