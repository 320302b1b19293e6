//! What `phi-capture` records: logits, every per-layer tap, the norm weights under their HF
//! names, and per-layer statistics of the per-token L2 norms (the BOS/RMSNorm experiments'
//! measurements).
//!
//! summary.json: `hidden_states` is a list of L+1 statistics (`index` i is `hidden_states.{i}`),
//! `layers` a list of L entries (`layer` i) with `input_layernorm` and, where the architecture
//! has one, `post_attention_layernorm`. Each statistic has mean, std (population), min, max
//! over real tokens, `pos0` (mean over rows of the value at position 0), `pos0_per_row` and
//! `tokens` (how many real tokens). Each layer entry and `final_norm_type` name the norm the
//! slot holds (`rmsnorm` / `layernorm`), which shows norm surgery.

use crate::model::{CausalLm, Inputs};
use crate::nn::Norm;
use crate::taps::TapRequest;
use burn::tensor::Tensor;
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub type HostMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn host<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    (shape, t.try_into_vec_as::<f32>().unwrap_or_default())
}

/// Per-token L2 norms of a [B, T, H] tap, over real tokens only, summarised.
fn norm_stats(shape: &[usize], data: &[f32], mask: &[i64]) -> Value {
    let (b, t, h) = (shape[0], shape[1], shape[2]);
    let norms: Vec<f64> = (0..b * t)
        .map(|i| {
            data[i * h..(i + 1) * h]
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let kept: Vec<f64> = norms
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m != 0)
        .map(|(n, _)| *n)
        .collect();
    let n = kept.len().max(1) as f64;
    let mean = kept.iter().sum::<f64>() / n;
    let std = (kept.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let pos0: Vec<f64> = (0..b).map(|r| norms[r * t]).collect();
    json!({
        "mean": mean,
        "std": std,
        "min": kept.iter().cloned().fold(f64::INFINITY, f64::min),
        "max": kept.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        "pos0": pos0.iter().sum::<f64>() / b.max(1) as f64,
        "pos0_per_row": pos0,
        "tokens": kept.len(),
    })
}

impl CausalLm {
    /// Every norm slot under its HF module path, layers first, then the final norm.
    pub fn norms(&self) -> Vec<(String, &Norm)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (name, n) in layer.block().norms() {
                out.push((format!("model.layers.{i}.{name}"), n));
            }
        }
        let last = format!("model.{}", self.arch.final_norm());
        out.push((last, &self.model.norm));
        out
    }

    /// Every normalisation weight (and bias) under its HF name.
    pub fn norm_params(&self) -> Vec<(String, Tensor<1>)> {
        let mut out = Vec::new();
        for (prefix, n) in self.norms() {
            out.push((format!("{prefix}.weight"), n.weight().val()));
            if let Some(b) = n.bias() {
                out.push((format!("{prefix}.bias"), b.val()));
            }
        }
        out
    }

    /// Which norm each layer's slots hold (`rmsnorm` / `layernorm`), then the final one's:
    /// after norm surgery a Phi-2 reports `rmsnorm` where the checkpoint had LayerNorms.
    pub fn norm_kinds(&self) -> (Vec<&'static str>, &'static str) {
        let layers = self
            .model
            .layers
            .iter()
            .map(|l| l.block().norms().first().map_or("none", |(_, n)| n.kind()))
            .collect();
        (layers, self.model.norm.kind())
    }
}

/// Runs one forward with every tap and returns the tensors to save and the summary.
/// The forward's logits, hidden states and norm outputs with their statistics; `bos_scale`
/// scales each sequence's first embedding as BOS-scaling training did.
pub fn capture(model: &CausalLm, inp: &Inputs, bos_scale: Option<f64>) -> (HostMap, Value) {
    let mut embeds = model.embed(inp);
    if let Some(f) = bos_scale {
        embeds = CausalLm::scale_sequence_starts(embeds, f, inp.position_ids.as_deref());
    }
    let out = model.forward_embeds(embeds, inp, &TapRequest::all(model.num_layers()), None);
    let mask = inp
        .attention_mask
        .clone()
        .unwrap_or_else(|| vec![1; inp.batch * inp.seq]);
    let mut tensors = HostMap::new();
    let mut layers = Vec::new();
    let mut hidden = Vec::new();
    tensors.insert("logits".into(), host(out.logits));
    // HF's convention: L+1 entries (embeddings, each layer's output, the final norm's output),
    // so these are listed apart from the L decoder layers.
    for (i, h) in out.taps.hidden_states.into_iter().enumerate() {
        let (shape, data) = host(h);
        let mut stats = norm_stats(&shape, &data, &mask);
        stats["index"] = json!(i);
        hidden.push(stats);
        tensors.insert(format!("hidden_states.{i}"), (shape, data));
    }
    let (kinds, final_kind) = model.norm_kinds();
    for (i, kind) in kinds.iter().enumerate() {
        let mut entry = serde_json::Map::new();
        entry.insert("layer".into(), json!(i));
        entry.insert("norm_type".into(), json!(kind));
        for (kind, map) in [
            ("input_layernorm", &out.taps.input_layernorm),
            (
                "post_attention_layernorm",
                &out.taps.post_attention_layernorm,
            ),
        ] {
            if let Some(t) = map.get(&i) {
                let (shape, data) = host(t.clone());
                entry.insert(kind.into(), norm_stats(&shape, &data, &mask));
                tensors.insert(format!("{kind}.{i}"), (shape, data));
            }
        }
        layers.push(Value::Object(entry));
    }
    for (name, w) in model.norm_params() {
        tensors.insert(name, host(w));
    }
    let summary = json!({
        "batch": inp.batch,
        "seq_len": inp.seq,
        "real_tokens": mask.iter().filter(|m| **m != 0).count(),
        "statistic": "per-token L2 norm over the hidden dim, real (unpadded) tokens only; pos0 = position 0",
        "hidden_states": hidden,
        "layers": layers,
        "final_norm_type": final_kind,
    });
    (tensors, summary)
}
