//! One file per architecture. Each file holds its decoder layer (loading and forward) and,
//! behind [`Architecture`], everything else the workspace needs to know of it: config.json's
//! class names and defaults, its linears and norms by HF name, how its fused projections
//! split, whether it has a post-attention norm. Nothing outside this folder branches on an
//! architecture; it asks the trait. Adding one is a file plus a line in `architectures!`.

pub mod llama;
pub mod phi2;
pub mod phi3;
pub mod qwen2;

pub use crate::config::Arch;
use crate::config::{self, ConfigReader, ModelConfig};
use crate::error::ModelError;
use crate::gguf::{GgufError, GgufFile, GgufLayout};
use crate::gguf_export::ArchMeta;
use crate::nn::{LayerCache, LayerCtx, Linear, Norm, NormKind};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde_json::Value;
use std::path::Path;

/// What an architecture answers; every method but the first five has the answer most
/// architectures give.
pub trait Architecture: Sync + std::fmt::Debug {
    /// config.json `architectures` entries this file loads; the first names it in messages.
    fn classes(&self) -> &'static [&'static str];

    /// config.json `model_type` values, for configs without `architectures`.
    fn model_types(&self) -> &'static [&'static str];

    /// One layer's linears: their HF names under `model.layers.N`, shapes and biases.
    fn layer_linears(&self, c: &ModelConfig) -> Vec<LinearSpec>;

    fn load_layer(
        &self,
        src: &dyn TensorSource,
        prefix: &str,
        c: &ModelConfig,
        device: &Device,
    ) -> Result<DecoderLayer, ModelError>;

    /// The MLP's form (for benches that time its pieces apart).
    fn mlp(&self) -> Mlp;

    /// `hidden_act` values the forward implements; the first is the default.
    fn activations(&self) -> &'static [&'static str] {
        &["silu"]
    }

    /// Reads what this architecture keeps in config.json beyond the keys all share, after
    /// those are read into `c`.
    fn configure(&self, _r: &ConfigReader, _c: &mut ModelConfig) -> Result<(), ModelError> {
        Ok(())
    }

    /// The final norm's name under `model.`.
    fn final_norm(&self) -> &'static str {
        "norm"
    }

    /// LayerNorms (eps in `layer_norm_eps`) rather than RMSNorms; norm surgery applies.
    fn layer_norms(&self) -> bool {
        false
    }

    /// Whether each layer has a `post_attention_layernorm` (the norm-target regularizer's tap).
    fn post_attention_norm(&self) -> bool {
        true
    }

    fn lm_head_bias(&self) -> bool {
        false
    }

    /// Projections that hold several HF-standard ones stacked by rows.
    fn fused(&self, _c: &ModelConfig) -> Vec<Fused> {
        Vec::new()
    }

    /// How llama.cpp's GGUF files store this architecture; None: not read from GGUF.
    fn gguf(&self) -> Option<GgufLayout> {
        None
    }

    /// What this architecture's GGUF files keep beyond the keys all share, added to the
    /// config.json `GgufFile::hf_config` builds.
    fn gguf_config(&self, _file: &GgufFile, _cfg: &mut Value) -> Result<(), GgufError> {
        Ok(())
    }

    /// The keys and computed tensors llama.cpp's converter writes for this architecture
    /// (`general.file_type` = `file_type` among them); None: not written as GGUF.
    fn gguf_export(&self, _c: &ModelConfig, _file_type: u32) -> Option<ArchMeta> {
        None
    }

    /// Rewrites a config.json for the checkpoint with `fused` projections split, as the
    /// architecture that stores them apart; Err says why that cannot be exact.
    fn unfused_config(&self, _config: &mut Value, _c: &ModelConfig) -> Result<(), String> {
        Err(format!("{} has no fused projections", self.classes()[0]))
    }
}

/// A linear layer of a decoder layer, as the checkpoint stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    /// Under the layer: `self_attn.q_proj`.
    pub name: &'static str,
    pub d_in: usize,
    pub d_out: usize,
    pub bias: bool,
}

/// A fused projection (`self_attn.qkv_proj`) and the parts its rows hold, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    pub module: &'static str,
    /// (HF name of the part's own projection, rows).
    pub parts: Vec<(&'static str, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    /// silu(gate)·up from two projections.
    SwiGlu,
    /// silu(gate)·up from one projection holding [gate | up].
    PackedSwiGlu,
    /// fc2(gelu(fc1)).
    Gelu,
}

/// What the forward and the workspace ask of one decoder layer.
pub trait Block {
    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &LayerCtx,
        cache: Option<&mut LayerCache>,
        taps: &mut LayerTaps,
    ) -> Tensor<3>;
    /// Every linear under its HF name relative to the layer, in module order.
    fn linears(&self) -> Vec<(&'static str, &Linear)>;
    fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)>;
    /// Every norm slot under its HF name relative to the layer.
    fn norms(&self) -> Vec<(&'static str, &Norm)>;
    fn norms_mut(&mut self) -> Vec<(&'static str, &mut Norm)>;
}

/// The `Block` listings from the layer's field paths, which are HF's names: a name table
/// kept apart from the fields could drift from them.
macro_rules! block_listing {
    (linears: [$($a:ident . $b:ident),* $(,)?], norms: [$($n:ident),* $(,)?]) => {
        fn linears(&self) -> Vec<(&'static str, &Linear)> {
            vec![$((concat!(stringify!($a), ".", stringify!($b)), &self.$a.$b)),*]
        }
        fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
            vec![$((concat!(stringify!($a), ".", stringify!($b)), &mut self.$a.$b)),*]
        }
        fn norms(&self) -> Vec<(&'static str, &Norm)> {
            vec![$((stringify!($n), &self.$n)),*]
        }
        fn norms_mut(&mut self) -> Vec<(&'static str, &mut Norm)> {
            vec![$((stringify!($n), &mut self.$n)),*]
        }
    };
}
pub(crate) use block_listing;

/// The layer types as one Burn module enum (a model's layers live in one Vec), and the
/// architectures by name.
macro_rules! architectures {
    (layers: [$($lv:ident($lt:ty)),* $(,)?], archs: [$($av:ident => $ai:expr),* $(,)?] $(,)?) => {
        // The size gap costs a few KB per model; a Box would need Burn's Module impl for Box,
        // which the derive does not route through.
        #[allow(clippy::large_enum_variant)]
        #[derive(Module, Debug)]
        pub enum DecoderLayer {
            $($lv($lt)),*
        }

        impl DecoderLayer {
            pub fn block(&self) -> &dyn Block {
                match self {
                    $(DecoderLayer::$lv(l) => l),*
                }
            }
            pub fn block_mut(&mut self) -> &mut dyn Block {
                match self {
                    $(DecoderLayer::$lv(l) => l),*
                }
            }
        }

        enum Id {
            $($av),*
        }

        // Named like the variants they stand for, so `Arch::Llama` reads as an enum's.
        #[allow(non_upper_case_globals)]
        impl Arch {
            $(pub const $av: Arch = Arch(Id::$av as u8);)*
            pub const ALL: &'static [Arch] = &[$(Arch::$av),*];
        }

        static REGISTRY: &[(&str, &dyn Architecture)] = &[$((stringify!($av), &$ai)),*];
    };
}

architectures! {
    layers: [Llama(llama::LlamaLayer), Phi3(phi3::Phi3Layer), Phi2(phi2::Phi2Layer)],
    archs: [
        Llama => llama::Llama,
        Phi3 => phi3::Phi3,
        Phi2 => phi2::Phi2,
        Qwen2 => qwen2::Qwen2,
    ],
}

impl std::ops::Deref for Arch {
    type Target = dyn Architecture;
    fn deref(&self) -> &Self::Target {
        REGISTRY[self.0 as usize].1
    }
}

impl std::fmt::Debug for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REGISTRY[self.0 as usize].0)
    }
}

impl Arch {
    /// The HF class that names it (`LlamaForCausalLM`).
    pub fn hf_class(self) -> &'static str {
        self.classes()[0]
    }

    /// The architecture config.json names by class, else by model_type.
    pub fn find(class: Option<&str>, model_type: Option<&str>) -> Option<Arch> {
        let by = |f: fn(&Arch) -> &'static [&'static str], name: &str| {
            Arch::ALL.iter().copied().find(|a| f(a).contains(&name))
        };
        match class {
            Some(c) => by(|a| a.classes(), c),
            None => by(|a| a.model_types(), model_type?),
        }
    }

    /// The config.json of a GGUF file of `layout`: the keys all architectures share, then
    /// the architecture's own (`Architecture::gguf_config`).
    pub fn gguf_hf_config(file: &GgufFile, layout: &GgufLayout) -> Result<Value, GgufError> {
        let mut cfg = file.hf_config(layout)?;
        if let Some(a) = Arch::ALL
            .iter()
            .find(|a| a.gguf().is_some_and(|g| g.name == layout.name))
        {
            a.gguf_config(file, &mut cfg)?;
        }
        Ok(cfg)
    }

    /// How llama.cpp lays out the architecture a GGUF file names.
    pub fn gguf_layout(file: &GgufFile) -> Result<GgufLayout, GgufError> {
        let name = file.architecture();
        let layouts = Arch::ALL.iter().filter_map(|a| a.gguf());
        if let Some(l) = layouts.clone().find(|g| Some(g.name) == name) {
            return Ok(l);
        }
        let known: Vec<String> = layouts.map(|g| format!("{:?}", g.name)).collect();
        Err(file.err(format!(
            "key general.architecture: expected {}, found {name:?}",
            known.join(" or ")
        )))
    }

    /// Every class name we load, for messages.
    pub fn supported() -> String {
        Arch::ALL
            .iter()
            .flat_map(|a| a.classes().iter().copied())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Reading a config.json needs the architectures (which class, which defaults), so it lives
/// here, above them; `crate::config` reads the keys they share.
impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_value(config::read_json(path)?, &path.display().to_string())
    }

    pub fn from_value(v: Value, file: &str) -> Result<Self, ModelError> {
        let r = ConfigReader::new(file, &v);
        let (class, model_type) = config::named_class(&r);
        let Some(arch) = Arch::find(class, model_type) else {
            return Err(match class.or(model_type) {
                Some(other) => ModelError::UnsupportedArch {
                    file: file.to_string(),
                    arch: other.to_string(),
                    supported: Arch::supported(),
                },
                None => r.err("architectures", "a list naming the model class"),
            });
        };
        let eps = match arch.layer_norms() {
            true => ("layer_norm_eps", 1e-5),
            false => ("rms_norm_eps", 1e-6),
        };
        let acts = arch.activations();
        let mut c = ModelConfig::read_common(&r, arch, eps, acts[0])?;
        if !acts.contains(&c.hidden_act.as_str()) {
            return Err(r.err(
                "hidden_act",
                &format!(
                    "one of {} for {} (got {:?})",
                    acts.join(", "),
                    arch.hf_class(),
                    c.hidden_act
                ),
            ));
        }
        match r.opt_str("norm_surgery")? {
            None | Some("none") => {}
            Some("rmsnorm") if arch.layer_norms() => {}
            Some(other) => {
                return Err(r.err(
                    "norm_surgery",
                    &format!("\"rmsnorm\" on a LayerNorm model (Phi-2), or none (got {other:?})"),
                ))
            }
        }
        arch.configure(&r, &mut c)?;
        Ok(c)
    }

    /// The RMSNorm eps when config.json records phi-tune's norm surgery (`"norm_surgery":
    /// "rmsnorm"`, eps in `rms_norm_eps`): the LayerNorm slots then hold RMSNorms.
    pub fn rms_surgery_eps(&self) -> Option<f64> {
        (self.arch.layer_norms() && self.raw["norm_surgery"].as_str() == Some("rmsnorm"))
            .then(|| self.raw["rms_norm_eps"].as_f64().unwrap_or(1e-8))
    }

    /// What the norm slots hold as loaded: the architecture's norm, or RMSNorms after surgery.
    pub fn norm_kind(&self) -> NormKind {
        match (self.arch.layer_norms(), self.rms_surgery_eps()) {
            (true, None) => NormKind::Layer(self.norm_eps),
            (true, Some(eps)) => NormKind::Rms(eps),
            (false, _) => NormKind::Rms(self.norm_eps),
        }
    }

    /// Whether the architecture has a post-attention RMSNorm (the regularizer's tap).
    pub fn has_post_attention_layernorm(&self) -> bool {
        self.arch.post_attention_norm()
    }
}

/// A layer's linears loaded from their specs, taken out one by one into the layer's fields.
pub struct Linears(Vec<(&'static str, Linear)>);

impl Linears {
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        specs: &[LinearSpec],
        device: &Device,
    ) -> Result<Self, ModelError> {
        specs
            .iter()
            .map(|s| {
                let p = format!("{prefix}.{}", s.name);
                Ok((
                    s.name,
                    Linear::load(src, &p, s.d_in, s.d_out, s.bias, device)?,
                ))
            })
            .collect::<Result<_, ModelError>>()
            .map(Linears)
    }

    pub fn take(&mut self, name: &str) -> Linear {
        let i = self.0.iter().position(|(n, _)| *n == name);
        // The names come from the same file's spec list: a miss is a bug in that file.
        let i = i.unwrap_or_else(|| panic!("layer spec lists no linear {name}"));
        self.0.swap_remove(i).1
    }
}
