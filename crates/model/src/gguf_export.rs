//! A model as llama.cpp's `convert_hf_to_gguf.py` writes it (then `llama-quantize` for the
//! 4- and 5-bit types): its architecture's tensor names, q/k row order and hyper-parameter
//! keys (`Architecture::gguf_export`), the tokenizer's keys as the caller gives them, and each
//! tensor in the type the converter picks for it. tests/fixtures/gguf-export holds the
//! converter's own output for the cases this is checked on.

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::{gguf_row, move_rows, GgufLayout, BF16, F16, F32};
use crate::gguf_write::{write_file, MetaValue, TensorPlan};
use crate::model::CausalLm;
use crate::weights::HostTensor;
use phi_kernels::quant::{encode, QType};
use std::path::Path;

/// `--outtype`: the type of the 2-D weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    /// llama-quantize's K mixes: Q4_K / Q5_K weights, some layers' attn_v and ffn_down one step up.
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
}

impl OutType {
    pub const NAMES: &'static str =
        "f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_s, q4_k_m (q4_k), q5_k_s, q5_k_m (q5_k), q6_k";

    pub fn parse(s: &str) -> Result<OutType, ModelError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => OutType::F32,
            "f16" => OutType::F16,
            "bf16" => OutType::BF16,
            "q8_0" => OutType::Q8_0,
            "q4_0" => OutType::Q4_0,
            "q4_1" => OutType::Q4_1,
            "q5_0" => OutType::Q5_0,
            "q5_1" => OutType::Q5_1,
            "q4_k_s" => OutType::Q4KS,
            // llama-quantize's aliases: the plain K names are the _M mixes.
            "q4_k_m" | "q4_k" => OutType::Q4KM,
            "q5_k_s" => OutType::Q5KS,
            "q5_k_m" | "q5_k" => OutType::Q5KM,
            "q6_k" => OutType::Q6K,
            _ => {
                return Err(ModelError::Other(format!(
                    "--outtype {s}: expected one of {}",
                    OutType::NAMES
                )))
            }
        })
    }

    /// The adapter converter's types are f32, f16, bf16 and q8_0.
    pub fn converter_writes(self) -> bool {
        !self.low_bit()
    }

    fn ggml(self) -> u32 {
        match self {
            OutType::F32 => F32,
            OutType::F16 => F16,
            OutType::BF16 => BF16,
            OutType::Q8_0 => 8,
            OutType::Q4_0 => 2,
            OutType::Q4_1 => 3,
            OutType::Q5_0 => 6,
            OutType::Q5_1 => 7,
            OutType::Q4KS | OutType::Q4KM => 12,
            OutType::Q5KS | OutType::Q5KM => 13,
            OutType::Q6K => 14,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q4_0 => 2,
            OutType::Q4_1 => 3,
            OutType::Q8_0 => 7,
            OutType::Q5_0 => 8,
            OutType::Q5_1 => 9,
            OutType::BF16 => 32,
            OutType::Q4KS => 14,
            OutType::Q4KM => 15,
            OutType::Q5KS => 16,
            OutType::Q5KM => 17,
            OutType::Q6K => 18,
        }
    }

    /// The 4-, 5- and 6-bit types come from `llama-quantize`, not the converter.
    fn low_bit(self) -> bool {
        !matches!(
            self,
            OutType::F32 | OutType::F16 | OutType::BF16 | OutType::Q8_0
        )
    }
}

/// What an architecture adds to the common part of a file.
pub struct ArchMeta {
    /// Keys the converter writes while preparing tensors: right after general.architecture.
    pub early: Vec<(String, MetaValue)>,
    /// The hyper-parameter keys in the converter's order, `general.file_type` among them.
    pub hparams: Vec<(String, MetaValue)>,
    /// Tensors the converter computes (rope factors), written first.
    pub tensors: Vec<(String, Vec<f32>)>,
}

/// A key and value, for the architectures' lists.
pub fn kv(key: impl Into<String>, v: MetaValue) -> (String, MetaValue) {
    (key.into(), v)
}

/// llama.cpp's q/k row order (`permute` in the converter): rotary pairs interleaved.
pub fn interleave_rows(w: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    move_rows(w, rows, |r| gguf_row(r, rows, heads))
}

/// The head count llama.cpp interleaves an HF weight's rows by (q, k under llama), or None
/// where the rows keep HF's order.
pub fn permuted_heads(hf: &str, layout: &GgufLayout, c: &ModelConfig) -> Option<usize> {
    let tail = hf.split('.').skip(3).collect::<Vec<_>>().join(".");
    let (_, key) = layout.permuted.iter().find(|(h, _)| *h == tail)?;
    Some(match *key {
        "attention.head_count_kv" => c.num_key_value_heads,
        _ => c.num_attention_heads,
    })
}

/// The GGUF name of an HF tensor under `layout`.
pub fn gguf_name(hf: &str, layout: &GgufLayout) -> Option<String> {
    if let Some((g, _)) = layout.fixed.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = layout.layer_tensors.iter().find(|(_, h)| *h == tail)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The type the converter (or llama-quantize) gives a tensor of a model with `layers` layers.
pub fn tensor_type(name: &str, shape: &[usize], out: OutType, tied: bool, layers: usize) -> u32 {
    if shape.len() <= 1 || name.ends_with("_norm.weight") {
        return F32;
    }
    let row = *shape.last().unwrap_or(&0);
    if out.low_bit() {
        return quantize_type(name, row, out, tied, layers);
    }
    if out == OutType::Q8_0 && !row.is_multiple_of(32) {
        return F16;
    }
    out.ggml()
}

const Q5_0: u32 = 6;
const Q5_1: u32 = 7;
const Q8_0: u32 = 8;
const Q4_K: u32 = 12;
const Q5_K: u32 = 13;
const Q6_K: u32 = 14;

fn block_len(ty: u32) -> usize {
    QType::from_ggml(ty).map_or(1, |q| q.block().0)
}

/// `llama-quantize`'s choice without an importance matrix (llama_tensor_get_type in
/// llama-quant.cpp, for the tensors of llama, phi3 and phi2): the output matrix (the
/// embedding when tied) Q6_K; the K mixes give attn_v / attn_qkv and ffn_down of some layers
/// more bits; a type whose blocks do not divide the rows falls back to a 32-block type, then F16.
fn quantize_type(name: &str, row: usize, out: OutType, tied: bool, layers: usize) -> u32 {
    let base = out.ggml();
    let layer = layer_of(name);
    // The first and last eighth of the layers and every third between (use_more_bits).
    let more_bits = |i: usize| {
        let n = layers;
        i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
    };
    let mut ty = if name == "output.weight" || (tied && name == "token_embd.weight") {
        if !row.is_multiple_of(block_len(base)) {
            Q8_0
        } else {
            Q6_K
        }
    } else if let (Some(i), true) = (
        layer,
        name.contains("attn_qkv.weight") || name.contains("attn_v.weight"),
    ) {
        match out {
            OutType::Q4KM | OutType::Q5KM if more_bits(i) => Q6_K,
            OutType::Q4KS if i < 4 => Q5_K,
            _ => base,
        }
    } else if let (Some(i), true) = (layer, name.contains("ffn_down")) {
        match out {
            OutType::Q4KM | OutType::Q5KM if more_bits(i) => Q6_K,
            OutType::Q4KS if i < layers / 8 => Q5_K,
            _ => base,
        }
    } else {
        base
    };
    if !row.is_multiple_of(block_len(ty)) {
        ty = match ty {
            Q4_K => Q5_0,
            Q5_K => Q5_1,
            Q6_K => Q8_0,
            t => t,
        };
        if !row.is_multiple_of(block_len(ty)) {
            ty = F16;
        }
    }
    ty
}

/// llama-quantize's tensor order: tensors outside the layers first, then layer by layer, by
/// name within each.
fn quantize_order(name: &str) -> (i64, &str) {
    (layer_of(name).map_or(-1, |l| l as i64), name)
}

/// N of a `blk.N.` tensor name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// `data` in ggml type `ty`.
pub fn encode_as(ty: u32, data: &[f32]) -> Result<Vec<u8>, String> {
    Ok(match ty {
        F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        F16 => data
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        BF16 => data
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => {
            let q = QType::from_ggml(ty).ok_or_else(|| format!("ggml type {ty}"))?;
            encode(q, data).map_err(|e| e.0)?
        }
    })
}

/// Bytes of `n` values in ggml type `ty`.
pub fn type_bytes(ty: u32, n: usize) -> usize {
    match ty {
        F32 => 4 * n,
        F16 | BF16 => 2 * n,
        _ => {
            let (per, bytes) = QType::from_ggml(ty).map_or((1, 0), |q| q.block());
            n / per * bytes
        }
    }
}

/// `general.size_label` as gguf-py rounds a parameter count ("3.2M", "16M", "3.8B").
pub fn size_label(params: u64) -> String {
    let p = params as f64;
    let (scaled, suffix) = if p > 1e12 {
        (p * 1e-12, "T")
    } else if p > 1e9 {
        (p * 1e-9, "B")
    } else if p > 1e6 {
        (p * 1e-6, "M")
    } else {
        (p * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round_ties_even() as u64);
    let digits = digits.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// The model's weights as `path`: `name` for general.name, `vocab` the tokenizer's keys in
/// their order (written after the model's, as the converter does).
pub fn write_model(
    path: &Path,
    model: &CausalLm,
    c: &ModelConfig,
    name: &str,
    vocab: Vec<(String, MetaValue)>,
    out: OutType,
) -> Result<(), ModelError> {
    let what = path.display().to_string();
    let unsupported = || {
        ModelError::Other(format!(
            "{what}: GGUF export of {} is not supported (llama, phi3, phi2 are)",
            c.arch.hf_class()
        ))
    };
    let layout = c.arch.gguf().ok_or_else(unsupported)?;
    let arch = c
        .arch
        .gguf_export(c, out.file_type())
        .ok_or_else(unsupported)?;
    // HF tensors in the converter's order: lexicographic names (safetensors' key order).
    let mut names: Vec<(String, Vec<usize>)> = model
        .params()
        .into_iter()
        .filter(|p| matches!(p.kind, crate::params::ParamKind::Base { .. }))
        .map(|p| (p.name, p.shape))
        .collect();
    names.sort();
    let tied = !names.iter().any(|(n, _)| n == "lm_head.weight");
    let mut plans = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    for (i, (t, values)) in arch.tensors.iter().enumerate() {
        plans.push(TensorPlan {
            name: t.clone(),
            shape: vec![values.len()],
            ggml_type: F32,
            bytes: 4 * values.len(),
        });
        sources.push(Source::Extra(i));
    }
    for (hf, shape) in &names {
        let g = gguf_name(hf, &layout).ok_or_else(|| {
            ModelError::tensor(&what, hf, format!("has no {} GGUF name", layout.name))
        })?;
        let ty = tensor_type(&g, shape, out, tied, c.num_hidden_layers);
        plans.push(TensorPlan {
            bytes: type_bytes(ty, shape.iter().product()),
            name: g,
            shape: shape.clone(),
            ggml_type: ty,
        });
        sources.push(Source::Hf(hf.clone()));
    }
    let params: u64 = plans
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum();
    let mut meta = vec![kv(
        "general.architecture",
        MetaValue::Str(layout.name.into()),
    )];
    meta.extend(arch.early);
    meta.push(kv("general.type", MetaValue::Str("model".into())));
    meta.push(kv("general.name", MetaValue::Str(name.into())));
    meta.push(kv("general.size_label", MetaValue::Str(size_label(params))));
    meta.extend(arch.hparams);
    meta.push(kv("general.quantization_version", MetaValue::U32(2)));
    // A key written twice keeps its first place (gguf-py's writer overwrites in place).
    for (k, v) in vocab {
        match meta.iter_mut().find(|(m, _)| *m == k) {
            Some(slot) => slot.1 = v,
            None => meta.push((k, v)),
        }
    }
    if out.low_bit() {
        // As llama-quantize writes a converter's file over: its two keys last, tensors sorted.
        for key in ["general.quantization_version", "general.file_type"] {
            if let Some(at) = meta.iter().position(|(k, _)| k == key) {
                let kv = meta.remove(at);
                meta.push(kv);
            }
        }
        let mut order: Vec<usize> = (0..plans.len()).collect();
        order.sort_by(|&a, &b| quantize_order(&plans[a].name).cmp(&quantize_order(&plans[b].name)));
        let mut slots: Vec<Option<(TensorPlan, Source)>> =
            plans.into_iter().zip(sources).map(Some).collect();
        (plans, sources) = order
            .iter()
            .map(|&i| slots[i].take().expect("each index once"))
            .unzip();
    }
    write_file(path, &meta, &plans, |i| {
        let plan = &plans[i];
        let data = match &sources[i] {
            Source::Extra(k) => arch.tensors[*k].1.clone(),
            Source::Hf(hf) => {
                let mut got = model.hf_tensors_named(|n| n == hf);
                let (_, HostTensor { shape, data }) = got
                    .pop()
                    .ok_or_else(|| ModelError::tensor(&what, hf, "not in the model"))?;
                match permuted_heads(hf, &layout, c) {
                    Some(h) => interleave_rows(&data, shape[0], h),
                    None => data,
                }
            }
        };
        encode_as(plan.ggml_type, &data).map_err(|e| ModelError::tensor(&what, &plan.name, e))
    })
}

enum Source {
    Extra(usize),
    Hf(String),
}
