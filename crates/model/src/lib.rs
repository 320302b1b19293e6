//! phi-model: HF causal LMs (Llama/Mistral, Phi-3, Phi-2) on Burn, loaded from HF checkpoints
//! or GGUF, reproducing transformers' numbers.

pub mod arch;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod loss;
pub mod model;
pub mod nn;
pub mod oracle;
pub mod resolve;
pub mod rope;
pub mod taps;
pub mod weights;

pub use config::{Arch, ModelConfig, RopeScaling};
pub use error::ModelError;
pub use model::{CausalLm, Inputs, KvCache, Output};
pub use taps::{TapRequest, Taps};

use burn::tensor::Device;

/// The CPU device: flex, chosen explicitly because `Device::default()` prefers CUDA when
/// that feature is compiled in.
pub fn cpu_device() -> Device {
    Device::flex()
}

pub struct Loaded {
    pub model: CausalLm,
    pub config: ModelConfig,
    pub dir: Option<std::path::PathBuf>,
    pub gguf: Option<std::path::PathBuf>,
}

/// Resolves `spec` (folder, .gguf file or hub id) and loads it onto `device`.
pub fn load(spec: &str, device: &Device) -> Result<Loaded, ModelError> {
    let r = resolve::resolve(spec)?;
    let model = CausalLm::load(&r.config, r.source.as_ref(), device)?;
    Ok(Loaded {
        model,
        config: r.config,
        dir: r.dir,
        gguf: r.gguf,
    })
}
