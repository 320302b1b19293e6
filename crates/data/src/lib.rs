//! phi-data: datasets, chat templates, tokenization, label masks and batches, encoding
//! exactly as LLaMA-Factory's supervised processor does (docs/data.md).

pub mod batch;
pub mod dataset;
pub mod encode;
pub mod error;
pub mod gguf_vocab;
pub mod jinja;
pub mod load;
pub mod preview;
pub mod template;
pub mod tokenizer;

pub use batch::{Batch, Collator};
pub use encode::{ChatFormat, EncodeOptions, Encoded, IGNORE};
pub use error::DataError;
pub use load::{prepare, LoadOptions, Skipped};
pub use template::{Conversation, Message, Role, Template};
pub use tokenizer::{Special, Tok};
