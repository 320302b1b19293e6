//! One file per architecture. Each file holds its decoder layer (loading and forward) and,
//! behind [`Architecture`], everything else the workspace needs to know of it: config.json's
//! class names and defaults, its linears and norms by HF name, how its fused projections
//! split, whether it has a post-attention norm. Nothing outside this folder branches on an
//! architecture; it asks the trait. Adding one is a file plus a line in `architectures!`.

pub mod llama;
pub mod phi2;
pub mod phi3;
pub mod qwen2;

use crate::config::{ConfigReader, ModelConfig};
use crate::error::ModelError;
use crate::nn::{LayerCache, LayerCtx, Linear, Norm};
use crate::taps::LayerTaps;
use crate::weights::TensorSource;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde_json::Value;

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

/// llama.cpp's names for an architecture's tensors and metadata.
#[derive(Debug, Clone, Copy)]
pub struct GgufLayout {
    /// `general.architecture`, also the prefix of the model's metadata keys.
    pub name: &'static str,
    /// A layer's tensors: (llama.cpp name under `blk.N.`, HF name under `model.layers.N.`).
    pub layer_tensors: &'static [(&'static str, &'static str)],
    /// HF names under a layer whose rows llama.cpp interleaves for its rotary, with the
    /// metadata key (after the prefix) holding their head count.
    pub permuted: &'static [(&'static str, &'static str)],
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

        /// A supported architecture; its behaviour is the [`Architecture`] it derefs to.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Arch {
            $($av),*
        }

        impl Arch {
            pub const ALL: &'static [Arch] = &[$(Arch::$av),*];

            fn get(self) -> &'static dyn Architecture {
                match self {
                    $(Arch::$av => &$ai),*
                }
            }
        }
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
        self.get()
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

    /// The architecture a GGUF file's `general.architecture` names.
    pub fn find_gguf(name: &str) -> Option<(Arch, GgufLayout)> {
        Arch::ALL
            .iter()
            .find_map(|a| a.gguf().filter(|g| g.name == name).map(|g| (*a, g)))
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
