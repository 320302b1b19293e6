//! phi-data: tokenization now; datasets, templates and batching build on it.

pub mod tokenizer;

pub use tokenizer::{DataError, Tok};
