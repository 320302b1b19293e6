//! phi-adapters: which weights train and how an adapter changes a layer. LoRA / rsLoRA on
//! PEFT-resolved targets, freeze masks, PEFT's adapter format both ways, and merging.
//! The model crate only carries the low-rank side path (`phi_model::lowrank`).

pub mod config;
pub mod error;
pub mod freeze;
pub mod gguf;
pub mod lora;
pub mod merge;
pub mod peft;
pub mod targets;

pub use config::{LoraConfig, Targets};
pub use error::AdapterError;
pub use freeze::{Counts, LayerSel, Selection};
