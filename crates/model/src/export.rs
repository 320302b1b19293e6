//! Writing a checkpoint as transformers writes it: `model.safetensors`, or shards
//! `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, in f32/f16/bf16.

use crate::error::ModelError;
use crate::io::write_atomic;
use crate::weights::HostTensor;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    F16,
    BF16,
}

impl OutDtype {
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(OutDtype::F32),
            "f16" | "float16" | "fp16" => Ok(OutDtype::F16),
            "bf16" | "bfloat16" => Ok(OutDtype::BF16),
            _ => Err(ModelError::Other(format!(
                "--dtype {s}: expected f32, f16 or bf16"
            ))),
        }
    }

    /// The name config.json uses (`dtype` / `torch_dtype`).
    pub fn hf_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::F16 => "float16",
            OutDtype::BF16 => "bfloat16",
        }
    }

    fn st(self) -> Dtype {
        match self {
            OutDtype::F32 => Dtype::F32,
            OutDtype::F16 => Dtype::F16,
            OutDtype::BF16 => Dtype::BF16,
        }
    }

    fn size(self) -> usize {
        if self == OutDtype::F32 {
            4
        } else {
            2
        }
    }

    fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            OutDtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            OutDtype::F16 => data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            OutDtype::BF16 => data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

/// `2GB`, `500MB`, `1.5GiB`, or a bare number of GB (LLaMA-Factory's `export_size`).
pub fn parse_size(s: &str) -> Result<u64, ModelError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "GB" | "G" => 1e9,
        "MB" | "M" => 1e6,
        "KB" | "K" => 1e3,
        "B" => 1.0,
        "GIB" => (1u64 << 30) as f64,
        "MIB" => (1u64 << 20) as f64,
        "KIB" => 1024.0,
        _ => f64::NAN,
    };
    match num.parse::<f64>() {
        Ok(n) if n > 0.0 && mult.is_finite() => Ok((n * mult) as u64),
        _ => Err(ModelError::Other(format!(
            "--shard-size {s}: expected a size such as 2GB, 500MB or 5 (GB)"
        ))),
    }
}

/// Writes `tensors` into `dir` (which must exist), one file when they fit in `shard_bytes`,
/// else shards plus an index. Returns the file names written.
pub fn write_checkpoint(
    dir: &Path,
    tensors: &[(String, HostTensor)],
    dtype: OutDtype,
    shard_bytes: u64,
) -> Result<Vec<String>, ModelError> {
    let specs: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect();
    let values = |i: usize| Ok(std::borrow::Cow::Borrowed(&tensors[i].1.data[..]));
    write_checkpoint_with(dir, &specs, dtype, shard_bytes, values)
}

/// `write_checkpoint` for tensors given by name and shape, their values fetched a shard at a
/// time by index (a model larger than memory in f32 is written without holding it).
pub fn write_checkpoint_with<'a>(
    dir: &Path,
    specs: &[(String, Vec<usize>)],
    dtype: OutDtype,
    shard_bytes: u64,
    values: impl Fn(usize) -> Result<std::borrow::Cow<'a, [f32]>, ModelError>,
) -> Result<Vec<String>, ModelError> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0u64;
    for (i, (_, shape)) in specs.iter().enumerate() {
        let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        if used > 0 && used + bytes > shard_bytes {
            shards.push(Vec::new());
            used = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        used += bytes;
    }
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (shard, file) in shards.iter().zip(&names) {
        let path = dir.join(file);
        let encoded: Vec<(&str, Vec<u8>, &[usize])> = shard
            .iter()
            .map(|&i| {
                let (k, shape) = &specs[i];
                Ok((k.as_str(), dtype.encode(&values(i)?), shape.as_slice()))
            })
            .collect::<Result<_, ModelError>>()?;
        let mut views = Vec::with_capacity(encoded.len());
        for (k, b, shape) in &encoded {
            total += b.len() as u64;
            weight_map.insert(k.to_string(), file.clone());
            let v = TensorView::new(dtype.st(), shape.to_vec(), b).map_err(|e| {
                ModelError::tensor(path.display(), *k, format!("cannot serialize: {e:?}"))
            })?;
            views.push((k.to_string(), v));
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| ModelError::io(path.display(), format!("cannot serialize: {e:?}")))?;
        write_atomic(&path, &bytes)?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).expect("json");
        write_atomic(&dir.join("model.safetensors.index.json"), text.as_bytes())?;
    }
    remove_stale_weights(dir, &names)?;
    Ok(names)
}

/// Removes an earlier export's weight files that the one just written does not have (a
/// sharded export replaced by a single file, or the reverse): a stale index.json beside a
/// new model.safetensors would make a loader read the old weights. Runs after the new files
/// are in place, so a failed write still leaves the earlier export whole.
fn remove_stale_weights(dir: &Path, written: &[String]) -> Result<(), ModelError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let sharded = written.len() > 1;
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = if name == "model.safetensors.index.json" {
            !sharded
        } else {
            let weights = name == "model.safetensors"
                || (name.starts_with("model-") && name.ends_with(".safetensors"));
            weights && !written.contains(&name)
        };
        if stale {
            std::fs::remove_file(e.path()).map_err(|err| {
                ModelError::io(
                    e.path().display(),
                    format!("cannot remove an earlier export: {err}"),
                )
            })?;
        }
    }
    Ok(())
}

/// The base's config.json as JSON, or one built from GGUF metadata.
pub fn source_config(
    dir: Option<&Path>,
    gguf: Option<&Path>,
) -> Result<serde_json::Value, ModelError> {
    if let Some(dir) = dir {
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p)
            .map_err(|e| ModelError::io(p.display(), format!("cannot read: {e}")))?;
        return serde_json::from_str(&text)
            .map_err(|e| ModelError::io(p.display(), format!("invalid JSON: {e}")));
    }
    if let Some(g) = gguf {
        let file = crate::gguf::GgufFile::open(g)?;
        let layout = crate::Arch::gguf_layout(&file)?;
        return file
            .hf_config(&layout)
            .map_err(|e| ModelError::Other(format!("{}: {e}", g.display())));
    }
    Err(ModelError::Other(
        "the model has no config.json to export".into(),
    ))
}

/// The dtype a config declares (`dtype`, or transformers-4's `torch_dtype`), else f32.
pub fn config_dtype(cfg: &serde_json::Value) -> OutDtype {
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| cfg[*k].as_str())
        .and_then(|s| OutDtype::parse(s).ok())
        .unwrap_or(OutDtype::F32)
}

/// Files a model folder carries beside its weights that a loader of the export needs.
pub const BESIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer.json.gz",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Copies `BESIDE_FILES` found in `from` into `out`; returns the names copied.
pub fn copy_beside(from: &Path, out: &Path) -> Result<Vec<String>, ModelError> {
    let mut copied = Vec::new();
    for f in BESIDE_FILES {
        let src = from.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src)
                .map_err(|e| ModelError::io(src.display(), format!("cannot read: {e}")))?;
            write_atomic(&out.join(f), &bytes)?;
            copied.push(f.to_string());
        }
    }
    Ok(copied)
}

/// A folder transformers loads as is: weights (sharded past `shard_bytes`), config.json
/// with its dtype set, and the tokenizer files of `from`. Returns the files written.
pub fn write_model_folder(
    out: &Path,
    tensors: &[(String, HostTensor)],
    mut config: serde_json::Value,
    dtype: OutDtype,
    shard_bytes: u64,
    from: Option<&Path>,
) -> Result<Vec<String>, ModelError> {
    let mut files = write_checkpoint(out, tensors, dtype, shard_bytes)?;
    // transformers 5 reads `dtype`, 4 `torch_dtype`: keep whichever the base had.
    let keys: Vec<&str> = ["dtype", "torch_dtype"]
        .into_iter()
        .filter(|k| config.get(*k).is_some())
        .collect();
    for k in if keys.is_empty() { vec!["dtype"] } else { keys } {
        config[k] = serde_json::Value::from(dtype.hf_name());
    }
    let text = serde_json::to_string_pretty(&config).expect("json");
    write_atomic(&out.join("config.json"), text.as_bytes())?;
    files.push("config.json".into());
    if let Some(d) = from {
        files.extend(copy_beside(d, out)?);
    }
    Ok(files)
}

/// A model folder of random weights (`RandomSource`'s init) for `config` in `dtype`, as
/// transformers would save it (2 GB shards): for benchmarks and for running recipes without
/// downloading a checkpoint. Tensors are made a shard at a time, so a seed-size model is
/// written without holding it in f32.
pub fn write_random_model(
    out: &Path,
    mut config: serde_json::Value,
    seed: u64,
    dtype: OutDtype,
) -> Result<Vec<String>, ModelError> {
    use crate::quantize::{quantizing, QuantSpec};
    use crate::weights::TensorSource;
    let cfg = crate::ModelConfig::from_value(config.clone(), &out.display().to_string())?;
    let src = crate::weights::RandomSource { seed };
    // Names and shapes from the model itself, its linears held in 4 bits meanwhile (in f32
    // where rows are not whole blocks of 64: tiny test shapes).
    let spec = QuantSpec {
        ty: phi_kernels::quant::QType::Nf4,
        nested: false,
    };
    let dev = crate::cpu_device();
    let shapes = match crate::CausalLm::load(&cfg, &quantizing(&src, spec), &dev) {
        Ok(m) => m,
        Err(_) => crate::CausalLm::load(&cfg, &src, &dev)?,
    };
    let specs: Vec<(String, Vec<usize>)> = shapes
        .params()
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect();
    drop(shapes);
    std::fs::create_dir_all(out)
        .map_err(|e| ModelError::io(out.display(), format!("cannot create: {e}")))?;
    let values = |i: usize| {
        let (name, shape) = &specs[i];
        Ok(std::borrow::Cow::Owned(src.load_shaped(name, shape)?.data))
    };
    let mut files = write_checkpoint_with(out, &specs, dtype, 2_000_000_000, values)?;
    config["dtype"] = serde_json::Value::from(dtype.hf_name());
    let text = serde_json::to_string_pretty(&config).expect("json");
    write_atomic(&out.join("config.json"), text.as_bytes())?;
    files.push("config.json".into());
    Ok(files)
}
