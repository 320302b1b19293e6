//! Test support, kept out of the library crates: oracle case discovery with NaN-strict
//! comparisons (`oracle`), and a small GGUF writer for fixtures built in tests (`gguf_write`).

pub mod gguf_write;
pub mod oracle;
