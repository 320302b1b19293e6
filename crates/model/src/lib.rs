//! phi-model: HF causal LMs (Llama/Mistral, Phi-3, Phi-2, Qwen2) on Burn, loaded from HF checkpoints
//! or GGUF, reproducing transformers' numbers.

pub mod alloc;
pub mod arch;
pub mod bf16;
pub mod capture;
pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_write;
pub mod io;
pub mod loss;
pub mod lowrank;
pub mod model;
pub mod nn;
pub mod params;
pub mod precision;
pub mod quantize;
pub mod resolve;
pub mod rng;
pub mod rope;
pub mod surgery;
pub mod taps;
pub mod weights;

pub use config::{Arch, ModelConfig, RopeScaling};
pub use error::ModelError;
pub use model::{CausalLm, Inputs, KvCache, Output};
pub use phi_kernels::pool::on_pool;
pub use taps::{TapRequest, Taps};

use burn::tensor::Device;

/// The CPU device: flex, chosen explicitly because `Device::default()` prefers CUDA when
/// that feature is compiled in.
pub fn cpu_device() -> Device {
    Device::flex()
}

/// `cpu`, or `cuda` / `cuda:N` when built with the `cuda` feature.
pub fn device_from_name(name: &str) -> Result<Device, ModelError> {
    match name {
        "cpu" => Ok(cpu_device()),
        #[cfg(feature = "ndarray")]
        "ndarray" => Ok(Device::ndarray()),
        #[cfg(feature = "cuda")]
        n if n == "cuda" || n.starts_with("cuda:") => {
            let idx: usize = n.strip_prefix("cuda:").map_or(Ok(0), |i| i.parse()).map_err(|_| {
                ModelError::Other(format!("--device {n}: expected cuda or cuda:N"))
            })?;
            Ok(Device::cuda(idx))
        }
        #[cfg(not(feature = "cuda"))]
        n if n.starts_with("cuda") => Err(ModelError::Other(format!(
            "--device {n}: this binary was built without the `cuda` feature (cargo build --features cuda)"
        ))),
        #[cfg(feature = "vulkan")]
        n if n == "vulkan" || n.starts_with("vulkan:") => vulkan_device(n),
        #[cfg(not(feature = "vulkan"))]
        n if n.starts_with("vulkan") => Err(ModelError::Other(format!(
            "--device {n}: this binary was built without the `vulkan` feature (cargo build --features vulkan)"
        ))),
        n => Err(ModelError::Other(format!(
            "--device {n}: expected cpu, vulkan[:cpu|:N] or cuda[:N]"
        ))),
    }
}

/// `vulkan` (wgpu's default adapter), `vulkan:cpu` (a software device such as Mesa's
/// lavapipe) or `vulkan:N` (the Nth discrete GPU).
#[cfg(feature = "vulkan")]
fn vulkan_device(n: &str) -> Result<Device, ModelError> {
    use burn::tensor::DeviceKind;
    let kind = match n.strip_prefix("vulkan:") {
        None => DeviceKind::DefaultDevice,
        Some("cpu") => DeviceKind::Cpu,
        Some(i) => DeviceKind::DiscreteGpu(i.parse().map_err(|_| {
            ModelError::Other(format!(
                "--device {n}: expected vulkan, vulkan:cpu or vulkan:N"
            ))
        })?),
    };
    Ok(Device::wgpu(kind))
}

/// A model's tokenizer/config folder from where it was loaded: its folder, else the GGUF
/// file's.
pub fn files_dir(
    dir: Option<&std::path::Path>,
    gguf: Option<&std::path::Path>,
) -> Option<std::path::PathBuf> {
    dir.or_else(|| gguf?.parent()).map(|p| p.to_path_buf())
}

pub struct Loaded {
    pub model: CausalLm,
    pub config: ModelConfig,
    pub dir: Option<std::path::PathBuf>,
    pub gguf: Option<std::path::PathBuf>,
}

impl Loaded {
    /// The folder holding the model's tokenizer and config files: the model folder, or the
    /// one the GGUF file is in.
    pub fn files_dir(&self) -> Option<std::path::PathBuf> {
        files_dir(self.dir.as_deref(), self.gguf.as_deref())
    }

    /// Rejects token ids outside the vocabulary before they reach the embedding.
    pub fn check_ids(&self, what: &str, ids: &[i64]) -> Result<(), ModelError> {
        let vocab = self.config.vocab_size as i64;
        match ids.iter().find(|&&i| i < 0 || i >= vocab) {
            Some(bad) => Err(ModelError::Other(format!(
                "{what}: token id {bad} is outside the vocabulary (0..{vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// EOS ids from config.json plus generation_config.json (which may list several).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = self.config.eos_token_ids.clone();
        if let Some(dir) = &self.dir {
            let gen = dir.join("generation_config.json");
            if let Ok(v) = std::fs::read_to_string(&gen)
                .map_err(|_| ())
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|_| ()))
            {
                match &v["eos_token_id"] {
                    serde_json::Value::Array(a) => {
                        ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    x => ids.extend(x.as_u64().map(|x| x as u32)),
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// How [`load_with`] holds the base's linear weights.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoadOptions {
    /// Quantize a safetensors base's decoder-layer linears as they load (QLoRA).
    pub quantize: Option<quantize::QuantSpec>,
    /// Decode a GGUF file's quantized linears to f32 (training that updates them); by
    /// default they stay in their blocks.
    pub widen: bool,
    /// Pack the other linears in bf16 for this kernel path as they load (`--bf16` on a
    /// frozen base), never holding them in f32.
    pub pack: Option<phi_kernels::bf16::Path>,
}

/// Resolves `spec` (folder, .gguf file or hub id) and loads it onto `device`, a GGUF file's
/// quantized linears kept in their blocks.
pub fn load(spec: &str, device: &Device) -> Result<Loaded, ModelError> {
    load_with(spec, device, LoadOptions::default())
}

/// [`load`] with the base's weights held as `opts` says.
pub fn load_with(spec: &str, device: &Device, opts: LoadOptions) -> Result<Loaded, ModelError> {
    let r = resolve::resolve(spec)?;
    let src = r.source.as_ref();
    let quantized;
    let src: &dyn weights::TensorSource = match opts.quantize {
        Some(spec) => {
            quantized = quantize::quantizing(src, spec);
            &quantized
        }
        None => src,
    };
    let model = match (opts.widen, opts.pack) {
        (true, _) => CausalLm::load(&r.config, &weights::Widening(src), device)?,
        (false, Some(path)) => CausalLm::load(&r.config, &bf16::packing(src, path), device)?,
        (false, None) => CausalLm::load(&r.config, src, device)?,
    };
    Ok(Loaded {
        model,
        config: r.config,
        dir: r.dir,
        gguf: r.gguf,
    })
}
