//! The causal LM shared by every architecture: embedding, decoder layers, final norm, head.

use crate::arch::Arch;
pub use crate::arch::DecoderLayer;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::nn::{param2, LayerCache, LayerCtx, Linear, Norm};
use crate::precision::{self, to_compute, to_f32};
use crate::rope::Rope;
use crate::taps::{LayerTaps, TapRequest, Taps};
use crate::weights::TensorSource;
use burn::module::{Module, Param};
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use phi_kernels::bf16::Path;
use phi_kernels::packed::PackedWeight;
use std::sync::Arc;

#[derive(Module, Debug)]
pub struct Embedding {
    /// [vocab, hidden], the HF layout.
    pub weight: Param<Tensor<2>>,
}

/// HF's `model.*` submodule.
#[derive(Module, Debug)]
pub struct Backbone {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    /// The final norm, under the name its architecture gives it (Phi-2: `final_layernorm`).
    pub norm: Norm,
}

#[derive(Module, Debug)]
pub struct CausalLm {
    pub model: Backbone,
    /// None when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub arch: Arch,
    #[module(skip)]
    pub rope: Rope,
    /// Mistral / Phi-3 local attention: a query sees only the last `w` keys (itself included).
    #[module(skip)]
    pub sliding_window: Option<usize>,
    /// config.json's max_position_embeddings: the longest sequence the model was built for.
    #[module(skip)]
    pub max_positions: usize,
    /// The tied head's table in bf16 for the CPU's matrix units (see `bf16::pack`).
    #[module(skip)]
    pub head_bf16: Option<Arc<PackedWeight>>,
    /// `--bf16` with a trainable tied embedding: the head's bf16 path (the table rounded and
    /// packed per call, as trainable linears are).
    #[module(skip)]
    pub head_train_bf16: Option<Path>,
    /// `--bf16`: attention's products on this bf16 path too (set by `pack_bf16`).
    #[module(skip)]
    pub attention_bf16: Option<Path>,
}

/// A batch as the forward sees it: host ids (the masks are built on the host anyway).
#[derive(Debug, Clone)]
pub struct Inputs {
    pub batch: usize,
    pub seq: usize,
    /// [batch, seq] row-major.
    pub input_ids: Vec<i64>,
    /// [batch, seq]: 1 for real tokens, 0 for padding.
    pub attention_mask: Option<Vec<i64>>,
    /// [batch, seq]; defaults to 0..seq (offset by the cache length).
    pub position_ids: Option<Vec<i64>>,
}

impl Inputs {
    pub fn new(batch: usize, seq: usize, input_ids: Vec<i64>) -> Self {
        Inputs {
            batch,
            seq,
            input_ids,
            attention_mask: None,
            position_ids: None,
        }
    }
    pub fn with_mask(mut self, mask: Vec<i64>) -> Self {
        self.attention_mask = Some(mask);
        self
    }
}

/// Keys and values of every layer for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Tokens already encoded (also the key-side mask length).
    pub len: usize,
    /// Key-side attention mask of the cached positions, [batch, len].
    pub mask: Vec<i64>,
    /// Which longrope table encoded the cached keys; a switch forces a re-encode.
    pub long: bool,
}

pub struct Output {
    /// [batch, seq, vocab].
    pub logits: Tensor<3>,
    pub taps: Taps,
}

impl CausalLm {
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn TensorSource,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let emb = src.load_shaped("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(cfg.arch.load_layer(src, &p, cfg, device)?);
        }
        let norm = format!("model.{}", cfg.arch.final_norm());
        let norm = Norm::load(src, &norm, h, cfg.norm_kind(), device)?;
        // Some tied checkpoints still ship lm_head.weight; tying wins, as in transformers.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let bias = cfg.arch.lm_head_bias();
            Some(Linear::load(src, "lm_head", h, v, bias, device)?)
        };
        Ok(CausalLm {
            model: Backbone {
                embed_tokens: Embedding {
                    weight: param2(emb, device),
                },
                layers,
                norm,
            },
            lm_head,
            arch: cfg.arch,
            rope: Rope::new(cfg),
            sliding_window: cfg.sliding_window,
            max_positions: cfg.max_position_embeddings,
            head_bf16: None,
            head_train_bf16: None,
            attention_bf16: None,
        })
    }

    pub fn device(&self) -> Device {
        self.model.embed_tokens.weight.val().device()
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    /// Token embeddings [batch, seq, hidden]; separate so BOS scaling can edit them.
    pub fn embed(&self, inp: &Inputs) -> Tensor<3> {
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(inp.input_ids.clone(), [inp.batch, inp.seq]),
            &self.device(),
        );
        embedding(self.model.embed_tokens.weight.val(), ids)
    }

    /// `embeds` [batch, seq, hidden] with every sequence's first position times `factor`
    /// (the BOS-scaling recipe). Without `position_ids` position 0 is the first column; with
    /// them (packed rows) every token whose position id is 0 starts a sequence.
    pub fn scale_sequence_starts(
        embeds: Tensor<3>,
        factor: f64,
        position_ids: Option<&[i64]>,
    ) -> Tensor<3> {
        let [b, t, _] = embeds.dims();
        let f = factor as f32;
        let (scale, shape) = match position_ids {
            None => {
                let mut s = vec![1.0f32; t];
                s[0] = f;
                (s, [1, t, 1])
            }
            Some(p) => (
                p.iter().map(|&x| if x == 0 { f } else { 1.0 }).collect(),
                [b, t, 1],
            ),
        };
        let scale = Tensor::<3>::from_data(TensorData::new(scale, shape), &embeds.device());
        embeds * scale
    }

    pub fn forward(&self, inp: &Inputs, req: &TapRequest) -> Output {
        self.forward_embeds(self.embed(inp), inp, req, None)
    }

    pub fn head(&self, h: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(l) => l.forward(h),
            None => {
                let table = &self.model.embed_tokens.weight;
                // Without lm_head, `fused_head` is the tied table's packing while it is frozen.
                if let Some(w) = self.fused_head().filter(|_| phi_kernels::fusable(&h)) {
                    return phi_kernels::frozen_linear(h, w);
                }
                let trains = table.is_require_grad() && phi_kernels::fusable(&h);
                if let Some(path) = self.head_train_bf16.filter(|_| trains) {
                    return phi_kernels::bf16_train_linear(h, table.val(), true, path);
                }
                // W·hᵀ reads the [V, H] embedding in its stored layout; hᵀ·Wᵀ would make the
                // backend copy the whole transposed table on every call.
                let [b, t, d] = h.dims();
                let w = to_compute(self.model.embed_tokens.weight.val());
                let v = w.dims()[0];
                let h = to_compute(h.reshape([b * t, d]));
                to_f32(w.matmul(h.transpose()).transpose().reshape([b, t, v]))
            }
        }
    }

    pub fn forward_embeds(
        &self,
        embeds: Tensor<3>,
        inp: &Inputs,
        req: &TapRequest,
        cache: Option<&mut KvCache>,
    ) -> Output {
        let (h, taps) = self.forward_hidden(embeds, inp, req, cache);
        Output {
            logits: self.head(h),
            taps,
        }
    }

    /// The summed token loss of `labels` (HF's shifted cross-entropy, `loss`) from the final
    /// hidden states [B, T, hidden], and the tokens it counts. A frozen head held in bf16 runs
    /// with the loss on the bf16 kernels, a chunk of counted rows at a time, so the
    /// [B·T, vocab] logits are never held (`bf16_head_loss`).
    pub fn loss_sum(&self, h: Tensor<3>, labels: &[i64]) -> (Tensor<1>, usize) {
        let [b, t, d] = h.dims();
        if let Some((w, out_in)) = self.gpu_head(&h) {
            let (targets, count) = crate::loss::shifted_targets(b, t, labels);
            let h = h.reshape([b * t, d]);
            return (phi_kernels::head_loss(h, w, out_in, targets), count);
        }
        match self.fused_head().filter(|_| phi_kernels::fusable(&h)) {
            Some(w) => {
                let (targets, count) = crate::loss::shifted_targets(b, t, labels);
                let h = h.reshape([b * t, d]);
                (phi_kernels::frozen_head_loss(h, w, targets), count)
            }
            None => crate::loss::causal_lm_loss_sum(self.head(h), labels),
        }
    }

    /// On the GPU in f32, the head's weight for `phi_kernels::head_loss`, which never holds
    /// the [B·T, vocab] logits: a plain lm_head's [hidden, vocab] (no bias or adapter), or the
    /// tied embedding table [vocab, hidden] (`true`: read transposed).
    fn gpu_head(&self, h: &Tensor<3>) -> Option<(Tensor<2>, bool)> {
        let gpu = phi_kernels::kernel_path(h) == phi_kernels::KernelPath::Gpu;
        if !gpu || precision::compute_dtype().is_some() {
            return None;
        }
        let (w, out_in) = match &self.lm_head {
            Some(l) if l.lora.is_none() && l.bias.is_none() && l.packed.is_none() => {
                (l.weight.val(), false)
            }
            Some(_) => return None,
            None => (self.model.embed_tokens.weight.val(), true),
        };
        (phi_kernels::kernel_path(&w) == phi_kernels::KernelPath::Gpu).then_some((w, out_in))
    }

    /// The head's bf16 packing `loss_sum` runs with the loss: a frozen head without bias
    /// or adapter, packed by `pack_bf16`.
    pub fn fused_head(&self) -> Option<&Arc<PackedWeight>> {
        match &self.lm_head {
            Some(l) => l.plain_bf16(),
            None => self.head_bf16.as_ref().filter(|_| {
                let table = &self.model.embed_tokens.weight;
                !table.is_require_grad()
            }),
        }
    }

    /// The final norm's output [B, T, hidden] and the taps: the forward without its head.
    pub fn forward_hidden(
        &self,
        embeds: Tensor<3>,
        inp: &Inputs,
        req: &TapRequest,
        mut cache: Option<&mut KvCache>,
    ) -> (Tensor<3>, Taps) {
        let ctx = self.layer_ctx(inp, cache.as_deref_mut());
        let mut taps = Taps::default();
        let mut x = embeds;
        if req.hidden_states {
            taps.hidden_states.push(x.clone());
        }
        let n = self.model.layers.len();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let mut lt = LayerTaps::for_layer(req, i);
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.block().forward(x, &ctx, lc, &mut lt);
            if let Some(t) = lt.input {
                taps.input_layernorm.insert(i, t);
            }
            if let Some(t) = lt.post {
                taps.post_attention_layernorm.insert(i, t);
            }
            if req.hidden_states && i + 1 < n {
                taps.hidden_states.push(x.clone());
            }
        }
        if req.hidden_states {
            taps.last_layer = Some(x.clone());
        }
        let h = self.model.norm.forward(x);
        if req.hidden_states {
            taps.hidden_states.push(h.clone());
        }
        (h, taps)
    }

    /// Decoder layer `i` alone on x [B, T, hidden], no cache or taps (a layer recomputed in
    /// the backward pass under per-layer checkpointing).
    pub fn layer(&self, i: usize, x: Tensor<3>, ctx: &LayerCtx) -> Tensor<3> {
        let mut lt = LayerTaps::for_layer(&TapRequest::none(), i);
        self.model.layers[i].block().forward(x, ctx, None, &mut lt)
    }

    /// The final norm (after the last layer).
    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        self.model.norm.forward(x)
    }

    /// What every layer reads besides its input: the rotary tables and the attention mask for
    /// `inp`'s positions (after a cache's, whose mask and length this extends).
    pub fn layer_ctx(&self, inp: &Inputs, cache: Option<&mut KvCache>) -> LayerCtx {
        let (b, t) = (inp.batch, inp.seq);
        let past = cache.as_ref().map_or(0, |c| c.len);
        let positions: Vec<i64> = match &inp.position_ids {
            Some(p) => p.clone(),
            None => (0..b)
                .flat_map(|_| (past..past + t).map(|p| p as i64))
                .collect(),
        };
        let max_pos = positions.iter().copied().max().unwrap_or(0).max(0) as usize;
        let long = self.rope.wants_long(max_pos);
        let device = self.device();
        let rows = if inp.position_ids.is_some() { b } else { 1 };
        let pos_rows = if rows == 1 {
            &positions[..t]
        } else {
            &positions[..]
        };
        let (cos, sin, rope) = self.rope.tables(pos_rows, rows, long, &device);

        let new_mask = inp.attention_mask.clone().unwrap_or_else(|| vec![1; b * t]);
        // Training on a GPU takes the attention op with an additive bias: made once here,
        // not per layer (nor again in each layer's backward).
        let gpu_training = cache.is_none()
            && cos.is_autodiff()
            && phi_kernels::kernel_path(&cos) == phi_kernels::KernelPath::Gpu;
        let key_mask = if let Some(c) = cache {
            let mut merged = Vec::with_capacity(b * (past + t));
            for r in 0..b {
                merged.extend_from_slice(&c.mask[r * past..(r + 1) * past]);
                merged.extend_from_slice(&new_mask[r * t..(r + 1) * t]);
            }
            c.mask = merged.clone();
            c.len = past + t;
            c.long = long;
            if c.layers.is_empty() {
                c.layers = vec![LayerCache::default(); self.num_layers()];
            }
            merged
        } else {
            new_mask
        };
        let (mask, hidden) =
            build_mask(&key_mask, b, t, past, self.sliding_window, &device).unzip();
        let bias = gpu_training.then(|| {
            let hidden = hidden.as_ref().map(|h| h.as_slice());
            phi_kernels::attention_bias(hidden, b, t, past + t, past, &device)
        });
        LayerCtx {
            cos,
            sin,
            rope,
            mask,
            hidden,
            bias,
            bf16: self.attention_bf16,
        }
    }
}

/// The [B, 1, T, S] mask (true = blocked) for causal attention over `past` cached keys plus
/// `t` new ones, where keys whose `key_mask` is 0 are padding and, with a sliding window `w`,
/// keys `w` or more positions back are out of reach. Packed rows number their examples 1, 2,
/// ... in `key_mask` (LF's neat packing): a query then sees only keys of its own example.
/// None when nothing is blocked beyond plain causality, so the backend takes its causal path.
fn build_mask(
    key_mask: &[i64],
    b: usize,
    t: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> Option<(Tensor<4, Bool>, Arc<Vec<bool>>)> {
    let s = past + t;
    let window = window.filter(|&w| s > w);
    if window.is_none() && key_mask.iter().all(|&m| m == 1) {
        return None;
    }
    let mut m = vec![false; b * t * s];
    for r in 0..b {
        for q in 0..t {
            let qpos = past + q;
            let keys = &key_mask[r * s..(r + 1) * s];
            // A padding query keeps causal sight of real keys, so its softmax row stays finite.
            let qseg = keys[qpos];
            let row = &mut m[(r * t + q) * s..(r * t + q + 1) * s];
            for (k, cell) in row.iter_mut().enumerate() {
                let out_of_window = window.is_some_and(|w| k + w <= qpos);
                let other_example = qseg != 0 && keys[k] != qseg;
                *cell = k > qpos || keys[k] == 0 || out_of_window || other_example;
            }
        }
    }
    let host = Arc::new(m.clone());
    Some((
        Tensor::from_data(TensorData::new(m, [b, 1, t, s]), device),
        host,
    ))
}
