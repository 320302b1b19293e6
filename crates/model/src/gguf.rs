//! GGUF reader for Llama-architecture files: metadata, an HF-style config, and tensors under
//! their HF names, dequantized to f32 (F32, F16, BF16 and every block type `phi_kernels::quant`
//! decodes: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) or kept in their blocks.

use memmap2::Mmap;
use phi_kernels::quant::{QType, QuantWeight, Scales};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{file}: {what}")]
pub struct GgufError {
    pub file: String,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            GgufValue::U64(v) => Some(*v),
            GgufValue::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::F64(v) => Some(*v),
            GgufValue::U64(v) => Some(*v as f64),
            GgufValue::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// ggml type ids this reader dequantizes, and (values per block, bytes per block) of every
/// type it knows, so truncation is caught at open time even for types it cannot decode.
pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q8_0: u32 = 8;
pub const BF16: u32 = 30;

fn type_name(t: u32) -> String {
    let names = [
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
        (15, "Q8_K"),
        (30, "BF16"),
    ];
    names
        .iter()
        .find(|(i, _)| *i == t)
        .map_or(format!("type {t}"), |(_, n)| n.to_string())
}

fn block_layout(t: u32) -> Option<(usize, usize)> {
    Some(match t {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        _ => return None,
    })
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// ggml order: dims[0] is the innermost (contiguous) one.
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    /// Absolute byte offset in the file.
    pub start: usize,
}

/// A tensor's GGUF name, info, bytes and HF shape.
type Raw<'a> = (&'a str, &'a TensorInfo, &'a [u8], Vec<usize>);

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: BTreeMap<String, GgufValue>,
    tensors: BTreeMap<String, TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> GgufError {
        GgufError {
            file: self.file.display().to_string(),
            what: what.into(),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "truncated: {what} needs bytes {}..{} but the file has {}",
                    self.pos,
                    self.pos.saturating_add(n),
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)? as usize;
        let b = self.take(n, what)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str) -> Result<GgufValue, GgufError> {
        let what = format!("metadata {key}");
        Ok(match ty {
            0 => GgufValue::U64(self.take(1, &what)?[0] as u64),
            1 => GgufValue::I64(self.take(1, &what)?[0] as i8 as i64),
            2 => GgufValue::U64(u16::from_le_bytes(
                self.take(2, &what)?.try_into().unwrap_or([0; 2]),
            ) as u64),
            3 => GgufValue::I64(i16::from_le_bytes(
                self.take(2, &what)?.try_into().unwrap_or([0; 2]),
            ) as i64),
            4 => GgufValue::U64(self.u32(&what)? as u64),
            5 => GgufValue::I64(self.u32(&what)? as i32 as i64),
            6 => GgufValue::F64(f32::from_bits(self.u32(&what)?) as f64),
            7 => GgufValue::Bool(self.take(1, &what)?[0] != 0),
            8 => GgufValue::Str(self.string(&what)?),
            9 => {
                let ety = self.u32(&what)?;
                let n = self.u64(&what)? as usize;
                // Guard against absurd counts before allocating.
                if n > self.buf.len() {
                    return Err(self.err(format!(
                        "metadata {key}: array of {n} items exceeds the file"
                    )));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(ety, key)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(&what)?),
            11 => GgufValue::I64(self.u64(&what)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(&what)?)),
            other => return Err(self.err(format!("metadata {key}: unknown value type {other}"))),
        })
    }
}

/// How an architecture's tensors and metadata are named in llama.cpp's files; the
/// architecture's file gives it (`Architecture::gguf`), so this reader knows none by name.
#[derive(Debug, Clone, Copy)]
pub struct GgufLayout {
    /// `general.architecture`, also the prefix of the model's metadata keys.
    pub name: &'static str,
    /// The HF class config.json names.
    pub class: &'static str,
    /// Tensors outside the layers: (llama.cpp name, HF name).
    pub fixed: &'static [(&'static str, &'static str)],
    /// A layer's tensors: (llama.cpp name under `blk.N.`, HF name under `model.layers.N.`).
    pub layer_tensors: &'static [(&'static str, &'static str)],
    /// HF names under a layer whose rows llama.cpp interleaves for its rotary, with the
    /// metadata key (after the prefix) holding their head count.
    pub permuted: &'static [(&'static str, &'static str)],
}

/// The tensors outside the layers of llama.cpp's llama-style files (llama, phi3).
pub const LLAMA_FIXED: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// HF name of a llama.cpp tensor name; None for tensors HF has no counterpart for.
pub fn hf_name(gguf: &str, layout: &GgufLayout) -> Option<String> {
    if let Some((_, h)) = layout.fixed.iter().find(|(g, _)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = layout.layer_tensors.iter().find(|(g, _)| *g == tail)?.1;
    Some(format!("model.layers.{layer}.{module}"))
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes `n` values of type `ty` from `bytes` (None: a type we do not decode).
pub fn dequantize(ty: u32, bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(n);
    match ty {
        F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        F16 => out.extend(bytes.chunks_exact(2).map(f16)),
        BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        ty => {
            let q = QType::from_ggml(ty)?;
            let per = q.block().0;
            let w = QuantWeight::new(q, n / per, per, bytes.to_vec(), Scales::None).ok()?;
            out = w.dequantize();
        }
    }
    Some(out)
}

/// llama.cpp's q/k row order for `heads` heads of `rows / heads` rows: GGUF row (h, 2i + j)
/// holds HF row (h, j·d/2 + i), rotary pairs interleaved rather than in two halves. Returns
/// the GGUF row of each HF row.
pub fn gguf_row(hf: usize, rows: usize, heads: usize) -> usize {
    let d = rows / heads;
    let (h, within) = (hf / d, hf % d);
    let (j, i) = (within / (d / 2), within % (d / 2));
    h * d + 2 * i + j
}

/// Rows moved so that row `to(r)` of the result is row r of `data` ([rows, cols]).
pub fn move_rows(data: &[f32], rows: usize, to: impl Fn(usize) -> usize) -> Vec<f32> {
    let cols = data.len() / rows.max(1);
    let mut out = vec![0.0; data.len()];
    for (r, row) in data.chunks_exact(cols.max(1)).enumerate() {
        let t = to(r);
        out[t * cols..(t + 1) * cols].copy_from_slice(row);
    }
    out
}

/// Undoes llama.cpp's q/k row permutation (interleaved rotary pairs back to HF's halves).
pub fn unpermute_rows(data: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let mut hf_of = vec![0; rows];
    for (r, slot) in (0..rows).map(|r| (r, gguf_row(r, rows, heads))) {
        hf_of[slot] = r;
    }
    move_rows(data, rows, |g| hf_of[g])
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let err = |what: String| GgufError {
            file: path.display().to_string(),
            what,
        };
        let f = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|e| err(format!("cannot map: {e}")))?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            file: path,
        };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(err(format!(
                "not a GGUF file (magic {magic:?}, expected \"GGUF\")"
            )));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(err(format!("GGUF version {version} (supported: 2, 3)")));
        }
        let n_tensors = c.u64("tensor count")? as usize;
        let n_kv = c.u64("metadata count")? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&format!("metadata {key}"))?;
            let v = c.value(ty, &key)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32(&format!("tensor {name}"))? as usize;
            if nd > 4 {
                return Err(err(format!(
                    "tensor {name}: {nd} dimensions (GGUF allows at most 4)"
                )));
            }
            let dims = (0..nd)
                .map(|_| c.u64(&format!("tensor {name}")).map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()?;
            let ty = c.u32(&format!("tensor {name}"))?;
            let off = c.u64(&format!("tensor {name}"))? as usize;
            infos.push((name, dims, ty, off));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, off) in infos {
            let n: usize = dims.iter().product();
            let start = data_start + off;
            if let Some((per, bytes)) = block_layout(ty) {
                if !n.is_multiple_of(per) {
                    return Err(err(format!(
                        "tensor {name}: {n} values is not a multiple of the {} block size {per}",
                        type_name(ty)
                    )));
                }
                let end = start + n / per * bytes;
                if end > mmap.len() {
                    return Err(err(format!(
                        "truncated: tensor data of {name} ends at byte {end} but the file has {} bytes",
                        mmap.len()
                    )));
                }
            }
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ggml_type: ty,
                    start,
                },
            );
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
        })
    }

    pub fn err(&self, what: impl Into<String>) -> GgufError {
        GgufError {
            file: self.path.display().to_string(),
            what: what.into(),
        }
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn tensor_infos(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(GgufValue::as_str)
    }

    /// An HF-style (transformers-4) config.json for a file of `layout`'s architecture.
    pub fn hf_config(&self, layout: &GgufLayout) -> Result<Value, GgufError> {
        self.expect_architecture(layout)?;
        let p = layout.name;
        let num = |k: &str| -> Result<u64, GgufError> {
            self.metadata
                .get(k)
                .and_then(GgufValue::as_u64)
                .ok_or_else(|| self.err(format!("key {k}: expected an integer (missing)")))
        };
        let opt_f = |k: &str| self.metadata.get(k).and_then(GgufValue::as_f64);
        let opt_u = |k: &str| self.metadata.get(k).and_then(GgufValue::as_u64);
        let heads = num(&format!("{p}.attention.head_count"))?;
        let vocab = match self.metadata.get("tokenizer.ggml.tokens") {
            Some(GgufValue::Array(a)) => a.len() as u64,
            _ => num(&format!("{p}.vocab_size"))?,
        };
        let mut cfg = json!({
            "architectures": [layout.class],
            "model_type": p,
            "hidden_size": num(&format!("{p}.embedding_length"))?,
            "intermediate_size": num(&format!("{p}.feed_forward_length"))?,
            "num_hidden_layers": num(&format!("{p}.block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": opt_u(&format!("{p}.attention.head_count_kv")).unwrap_or(heads),
            "rms_norm_eps": opt_f(&format!("{p}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            "rope_theta": opt_f(&format!("{p}.rope.freq_base")).unwrap_or(10000.0),
            "max_position_embeddings": opt_u(&format!("{p}.context_length")).unwrap_or(2048),
            "vocab_size": vocab,
            "tie_word_embeddings": !self.tensors.contains_key("output.weight"),
            "torch_dtype": "float32",
        });
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(v) = opt_u(gguf_key) {
                cfg[hf_key] = json!(v);
            }
        }
        Ok(cfg)
    }

    pub fn hf_tensor_names(&self, layout: &GgufLayout) -> Vec<String> {
        self.tensors
            .keys()
            .filter_map(|k| hf_name(k, layout))
            .collect()
    }

    fn expect_architecture(&self, layout: &GgufLayout) -> Result<(), GgufError> {
        match self.architecture() {
            Some(a) if a == layout.name => Ok(()),
            other => Err(self.err(format!(
                "key general.architecture: expected {:?}, found {other:?}",
                layout.name
            ))),
        }
    }

    /// The tensor under its HF name as (GGUF name, info, bytes, HF shape).
    fn raw(&self, hf: &str, layout: &GgufLayout) -> Result<Raw<'_>, GgufError> {
        let (name, info) = self
            .tensors
            .iter()
            .find(|(k, _)| hf_name(k, layout).as_deref() == Some(hf))
            .ok_or_else(|| self.err(format!("tensor {hf}: missing")))?;
        let n: usize = info.dims.iter().product();
        let (per, bytes) = block_layout(info.ggml_type).unwrap_or((1, 0));
        let raw = &self.mmap[info.start..info.start + n / per * bytes];
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        Ok((name, info, raw, shape))
    }

    fn unsupported(&self, name: &str, ty: u32) -> GgufError {
        self.err(format!(
            "tensor {name}: unsupported GGUF type {} (supported: F32, F16, BF16, Q8_0, Q4_0, \
             Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)",
            type_name(ty)
        ))
    }

    /// The tensor under its HF name as (HF shape, row-major f32).
    pub fn tensor_f32(
        &self,
        hf: &str,
        layout: &GgufLayout,
    ) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let (name, info, raw, shape) = self.raw(hf, layout)?;
        let n: usize = info.dims.iter().product();
        let data = dequantize(info.ggml_type, raw, n)
            .ok_or_else(|| self.unsupported(name, info.ggml_type))?;
        let data = match self.heads(hf, name, &shape, layout)? {
            Some(heads) => unpermute_rows(&data, shape[0], heads),
            None => data,
        };
        Ok((shape, data))
    }

    /// A tensor by its GGUF name in f32 as stored (None where the file has no such tensor).
    pub fn gguf_tensor_f32(&self, name: &str) -> Result<Option<Vec<f32>>, GgufError> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        let n: usize = info.dims.iter().product();
        let (per, bytes) = block_layout(info.ggml_type).unwrap_or((1, 0));
        let raw = &self.mmap[info.start..info.start + n / per * bytes];
        dequantize(info.ggml_type, raw, n)
            .map(Some)
            .ok_or_else(|| self.unsupported(name, info.ggml_type))
    }

    /// A 2-D tensor kept in its block type (rows in HF's order), or None where it is stored
    /// as F32 / F16 / BF16; a block type we do not decode is an error naming it.
    pub fn tensor_quant(
        &self,
        hf: &str,
        layout: &GgufLayout,
    ) -> Result<Option<QuantWeight>, GgufError> {
        let (name, info, raw, shape) = self.raw(hf, layout)?;
        if matches!(info.ggml_type, F32 | F16 | BF16) || shape.len() != 2 {
            return Ok(None);
        }
        let ty = QType::from_ggml(info.ggml_type)
            .ok_or_else(|| self.unsupported(name, info.ggml_type))?;
        let mut w = QuantWeight::new(ty, shape[0], shape[1], raw.to_vec(), Scales::None)
            .map_err(|e| self.err(format!("tensor {name}: {e}")))?;
        if let Some(heads) = self.heads(hf, name, &shape, layout)? {
            let rows = shape[0];
            w.permute_rows(|dst| gguf_row(dst, rows, heads));
        }
        Ok(Some(w))
    }

    /// The head count of a tensor whose rows llama.cpp interleaved for its rotary.
    fn heads(
        &self,
        hf: &str,
        name: &str,
        shape: &[usize],
        layout: &GgufLayout,
    ) -> Result<Option<usize>, GgufError> {
        let heads_key = layout
            .permuted
            .iter()
            .find(|(n, _)| hf.ends_with(&format!(".{n}")))
            .map(|(_, k)| format!("{}.{k}", layout.name));
        let all_heads = format!("{}.attention.head_count", layout.name);
        match heads_key {
            Some(k) if shape.len() == 2 => {
                let heads = self
                    .metadata
                    .get(&k)
                    .or_else(|| self.metadata.get(&all_heads))
                    .and_then(GgufValue::as_u64)
                    .ok_or_else(|| self.err(format!("key {k}: expected an integer (missing)")))?
                    as usize;
                if heads == 0 || !shape[0].is_multiple_of(2 * heads) {
                    return Err(self.err(format!(
                        "tensor {name}: {} rows do not split into {heads} heads",
                        shape[0]
                    )));
                }
                Ok(Some(heads))
            }
            _ => Ok(None),
        }
    }
}
