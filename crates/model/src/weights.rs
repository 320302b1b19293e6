//! Reading checkpoint tensors by their HF names, as f32, from safetensors (single file or
//! sharded) or GGUF. Every tensor is converted to f32 at load: training needs f32 master
//! weights, and one dtype keeps the forward identical across checkpoints.

use crate::error::ModelError;
use crate::gguf::{GgufFile, GgufLayout};
use memmap2::Mmap;
use phi_kernels::packed::PackedWeight;
use phi_kernels::quant::QuantWeight;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// A tensor as loaded: HF shape and row-major f32 values.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A linear weight as a source gives it: f32 values, a quantized base's blocks, or bf16
/// panels packed as it loaded.
pub enum LinearWeight {
    F32(HostTensor),
    Quant(QuantWeight),
    Packed(PackedWeight),
}

/// The methods of a `TensorSource` that hands every tensor on to its field `$f` (the
/// wrappers below differ in `load_linear` only).
macro_rules! delegate_tensors {
    ($f:tt) => {
        fn file_of(&self, name: &str) -> String {
            self.$f.file_of(name)
        }
        fn contains(&self, name: &str) -> bool {
            self.$f.contains(name)
        }
        fn names(&self) -> Vec<String> {
            self.$f.names()
        }
        fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
            self.$f.load(name)
        }
        fn load_shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor, ModelError> {
            self.$f.load_shaped(name, shape)
        }
    };
}

pub trait TensorSource {
    /// Path used in error messages for `name` (the shard that holds it, or the file).
    fn file_of(&self, name: &str) -> String;
    fn contains(&self, name: &str) -> bool;
    fn names(&self) -> Vec<String>;
    fn load(&self, name: &str) -> Result<HostTensor, ModelError>;

    /// Loads `name` and checks its shape, so a misshaped checkpoint fails with one line.
    fn load_shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor, ModelError> {
        if !self.contains(name) {
            return Err(ModelError::tensor(
                self.file_of(name),
                name,
                format!("missing (expected shape {shape:?})"),
            ));
        }
        let t = self.load(name)?;
        if t.shape != shape {
            return Err(ModelError::tensor(
                self.file_of(name),
                name,
                format!("expected shape {shape:?}, found {:?}", t.shape),
            ));
        }
        Ok(t)
    }

    /// A linear layer's [d_out, d_in] weight (HF's layout): f32 unless the source keeps or
    /// makes it quantized.
    fn load_linear(
        &self,
        name: &str,
        d_out: usize,
        d_in: usize,
    ) -> Result<LinearWeight, ModelError> {
        self.load_shaped(name, &[d_out, d_in])
            .map(LinearWeight::F32)
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    infos: BTreeMap<String, TensorInfo>,
}

pub struct SafetensorsSource {
    shards: Vec<Shard>,
    index: BTreeMap<String, usize>,
}

fn open_mmap(path: &Path) -> Result<Mmap, ModelError> {
    let f = File::open(path)
        .map_err(|e| ModelError::io(path.display(), format!("cannot open: {e}")))?;
    // SAFETY: the file is opened read-only; a concurrent truncation by another process is the
    // only hazard, as with every mmap-based safetensors reader.
    unsafe { Mmap::map(&f) }.map_err(|e| ModelError::io(path.display(), format!("cannot map: {e}")))
}

impl Shard {
    fn open(path: &Path) -> Result<Shard, ModelError> {
        let mmap = open_mmap(path)?;
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            let what = match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer
                | safetensors::SafeTensorError::InvalidHeaderLength
                | safetensors::SafeTensorError::HeaderTooSmall => format!(
                    "truncated or corrupt safetensors file ({} bytes): {e:?}",
                    mmap.len()
                ),
                other => format!("invalid safetensors header: {other:?}"),
            };
            ModelError::io(path.display(), what)
        })?;
        let infos = meta
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            header_len: n + 8,
            infos,
        })
    }
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            return Self::open_files(&[single]);
        }
        if index.exists() {
            return Self::open_index(&index);
        }
        Err(ModelError::io(
            dir.display(),
            "no model.safetensors or model.safetensors.index.json in this folder",
        ))
    }

    pub fn open_index(index: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(index)
            .map_err(|e| ModelError::io(index.display(), format!("cannot read: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::io(index.display(), format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                file: index.display().to_string(),
                key: "weight_map".into(),
                expected: "an object mapping tensor names to shard files".into(),
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        let src = Self::open_files(&files)?;
        for (name, shard) in map {
            if !src.index.contains_key(name) {
                return Err(ModelError::tensor(
                    dir.join(shard.as_str().unwrap_or("?")).display(),
                    name,
                    "listed in model.safetensors.index.json but absent from its shard",
                ));
            }
        }
        Ok(src)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self, ModelError> {
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let s = Shard::open(f)?;
            for k in s.infos.keys() {
                index.insert(k.clone(), i);
            }
            shards.push(s);
        }
        Ok(SafetensorsSource { shards, index })
    }
}

fn to_f32(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        other => {
            return Err(ModelError::tensor(
                path.display(),
                name,
                format!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
            ))
        }
    };
    Ok(out)
}

impl TensorSource for SafetensorsSource {
    fn file_of(&self, name: &str) -> String {
        let i = self.index.get(name).copied().unwrap_or(0);
        self.shards
            .get(i)
            .map(|s| s.path.display().to_string())
            .unwrap_or_default()
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }
    fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| ModelError::tensor(self.file_of(name), name, "missing"))?;
        let s = &self.shards[i];
        let info = &s.infos[name];
        let (a, b) = info.data_offsets;
        let bytes = &s.mmap[s.header_len + a..s.header_len + b];
        let data = to_f32(&s.path, name, info.dtype, bytes)?;
        // The file's pages back to the system once read: mapped pages count in the process's
        // resident set, and a 3.8 B model's shards are 7.7 GB (the QLoRA budget is 4 GB).
        // SAFETY: the map is read-only and file-backed; dropped pages are read again from the
        // file if touched, and no reference into these bytes outlives this call.
        #[cfg(unix)]
        let _ = unsafe {
            s.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                s.header_len + a,
                b - a,
            )
        };
        Ok(HostTensor {
            shape: info.shape.clone(),
            data,
        })
    }
}

/// An integer tensor: shape and row-major values.
pub type IntTensor = (Vec<usize>, Vec<i64>);

/// Integer tensors (input ids, masks) from a safetensors file, for the CLIs and tests.
pub fn read_i64(path: &Path, name: &str) -> Result<Option<IntTensor>, ModelError> {
    let mmap = open_mmap(path)?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| ModelError::io(path.display(), format!("invalid safetensors: {e:?}")))?;
    let Ok(v) = st.tensor(name) else {
        return Ok(None);
    };
    let data: Vec<i64> = match v.dtype() {
        Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        Dtype::I32 => v
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
            .collect(),
        other => {
            return Err(ModelError::tensor(
                path.display(),
                name,
                format!("expected an int64 or int32 tensor, found {other:?}"),
            ))
        }
    };
    Ok(Some((v.shape().to_vec(), data)))
}

/// A GGUF file's tensors under their HF names, as `layout` (its architecture's) maps them.
pub struct GgufSource {
    path: PathBuf,
    file: GgufFile,
    layout: GgufLayout,
    names: Vec<String>,
}

impl GgufSource {
    pub fn new(path: &Path, file: GgufFile, layout: GgufLayout) -> Self {
        let names = file.hf_tensor_names(&layout);
        GgufSource {
            path: path.to_path_buf(),
            file,
            layout,
            names,
        }
    }
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }
    pub fn hf_config(&self) -> Result<serde_json::Value, ModelError> {
        Ok(crate::Arch::gguf_hf_config(&self.file, &self.layout)?)
    }
}

impl TensorSource for GgufSource {
    fn file_of(&self, _name: &str) -> String {
        self.path.display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
        let (shape, data) = self.file.tensor_f32(name, &self.layout)?;
        Ok(HostTensor { shape, data })
    }
    fn load_linear(
        &self,
        name: &str,
        d_out: usize,
        d_in: usize,
    ) -> Result<LinearWeight, ModelError> {
        // Linear weights stay in their block types (`Widening` asks for f32).
        if self.contains(name) {
            if let Some(q) = self.file.tensor_quant(name, &self.layout)? {
                if (q.d_out, q.d_in) != (d_out, d_in) {
                    return Err(ModelError::tensor(
                        self.file_of(name),
                        name,
                        format!(
                            "expected shape {:?}, found {:?}",
                            [d_out, d_in],
                            [q.d_out, q.d_in]
                        ),
                    ));
                }
                return Ok(LinearWeight::Quant(q));
            }
        }
        self.load_shaped(name, &[d_out, d_in])
            .map(LinearWeight::F32)
    }
}

/// Random weights for any config, for benchmarks and tests that need a model of a given
/// shape: linear weights N(0, 1/fan_in), norm weights 1 + N(0, 0.1²), biases N(0, 0.02²),
/// embeddings N(0, 0.4²) (the oracle's init, which gives non-uniform logits).
pub struct RandomSource {
    pub seed: u64,
}

impl TensorSource for RandomSource {
    fn file_of(&self, _name: &str) -> String {
        format!("<random seed {}>", self.seed)
    }
    fn contains(&self, _name: &str) -> bool {
        true
    }
    fn names(&self) -> Vec<String> {
        vec![]
    }
    fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
        Err(ModelError::tensor(
            self.file_of(name),
            name,
            "random tensors need a shape",
        ))
    }
    fn load_shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor, ModelError> {
        let h = name
            .bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let mut rng = crate::rng::SplitMix(h);
        let n: usize = shape.iter().product();
        let (mean, std) = if name.contains("embed_tokens") {
            (0.0, 0.4)
        } else if shape.len() == 2 {
            (0.0, 1.0 / (shape[1] as f32).sqrt())
        } else if name.contains("norm") && name.ends_with("weight") {
            (1.0, 0.1)
        } else {
            (0.0, 0.02)
        };
        let data = (0..n).map(|_| mean + std * rng.next_normal()).collect();
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
    }
}

/// A source whose linear weights all come as f32 (a GGUF file's blocks decoded): for training
/// that updates them.
pub struct Widening<'a>(pub &'a dyn TensorSource);

impl TensorSource for Widening<'_> {
    delegate_tensors!(0);
}

/// A source whose f32 linear weights are converted as each loads (`quantize::quantizing`,
/// `bf16::packing`), the f32 copy's pages handed back to the system before the next tensor:
/// `alloc::tune` keeps freed memory, and the next conversions would land around the holes
/// (+2 GB at Phi-3-mini size).
pub struct Converting<'a, F> {
    pub inner: &'a dyn TensorSource,
    /// A weight's HF name and its [d_out, d_in] f32 values, to what the model holds.
    pub convert: F,
}

impl<F> TensorSource for Converting<'_, F>
where
    F: Fn(&str, HostTensor) -> Result<LinearWeight, ModelError>,
{
    delegate_tensors!(inner);
    fn load_linear(
        &self,
        name: &str,
        d_out: usize,
        d_in: usize,
    ) -> Result<LinearWeight, ModelError> {
        let out = match self.inner.load_linear(name, d_out, d_in)? {
            LinearWeight::F32(w) => (self.convert)(name, w)?,
            other => other,
        };
        crate::alloc::release_free();
        Ok(out)
    }
}
