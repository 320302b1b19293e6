//! PEFT's on-disk adapter, both ways: `adapter_config.json` and `adapter_model.safetensors`
//! with keys `base_model.model.<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r],
//! and whole `modules_to_save` tensors as `base_model.model.<module>.<param>`.

use crate::config::LoraConfig;
use crate::error::AdapterError;
use crate::freeze::modules_to_save_prefixes;
use crate::lora::{adapted, matrix};
use crate::targets::{self, leaf_names};
use phi_model::lowrank::LowRank;
use phi_model::nn::transpose_host;
use phi_model::params::ParamKind;
use phi_model::weights::{HostTensor, SafetensorsSource, TensorSource};
use phi_model::CausalLm;
use std::collections::BTreeMap;
use std::path::Path;

pub const PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// One adapter tensor key, understood.
enum Key<'a> {
    /// (module path, true for A).
    Factor(&'a str, bool),
    /// A whole saved parameter, HF name.
    Saved(&'a str),
}

fn parse_key(key: &str) -> Option<Key<'_>> {
    let k = key.strip_prefix(PREFIX)?;
    for (tag, is_a) in [(".lora_A.", true), (".lora_B.", false)] {
        if let Some(i) = k.find(tag) {
            // `.weight`, or `.<adapter name>.weight` as in a model's named_parameters().
            return k[i + tag.len()..]
                .ends_with("weight")
                .then_some(Key::Factor(&k[..i], is_a));
        }
    }
    Some(Key::Saved(k))
}

/// A LoRA factor pair per module path, as read.
pub type Factors = BTreeMap<String, [Option<HostTensor>; 2]>;

/// Loads a PEFT LoRA adapter folder onto `model`. Returns the config, with the module paths
/// it adapted.
pub fn load(
    model: CausalLm,
    dir: &Path,
) -> Result<(CausalLm, LoraConfig, Vec<String>), AdapterError> {
    let (cfg, factors, saved, fname) = read_folder(dir)?;
    attach(model, cfg, factors, saved, &fname)
}

/// `load` for a PEFT folder or a llama.cpp LoRA GGUF file (`c`: the base's config).
pub fn load_any(
    model: CausalLm,
    path: &Path,
    c: &phi_model::ModelConfig,
) -> Result<(CausalLm, LoraConfig, Vec<String>), AdapterError> {
    if path.is_file() {
        let (cfg, factors) = crate::gguf::read_adapter(path, c)?;
        return attach(
            model,
            cfg,
            factors,
            BTreeMap::new(),
            &path.display().to_string(),
        );
    }
    load(model, path)
}

type Folder = (LoraConfig, Factors, BTreeMap<String, HostTensor>, String);

fn read_folder(dir: &Path) -> Result<Folder, AdapterError> {
    let cfg = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
    let file = dir.join(WEIGHTS_FILE);
    if !file.exists() {
        let hint = if dir.join("adapter_model.bin").exists() {
            "missing (adapter_model.bin is a pickle; re-save it with safe_serialization=True)"
        } else {
            "missing"
        };
        return Err(AdapterError::Other(format!("{}: {hint}", file.display())));
    }
    let src = SafetensorsSource::open_files(std::slice::from_ref(&file))?;
    let fname = file.display().to_string();
    let mut factors: Factors = BTreeMap::new();
    let mut saved = BTreeMap::new();
    for key in src.names() {
        match parse_key(&key) {
            Some(Key::Factor(module, is_a)) => {
                factors.entry(module.to_string()).or_default()[usize::from(!is_a)] =
                    Some(src.load(&key)?);
            }
            Some(Key::Saved(name)) => {
                saved.insert(name.to_string(), src.load(&key)?);
            }
            None => {
                return Err(AdapterError::tensor(
                    &fname,
                    key,
                    format!("a key starting with {PREFIX}"),
                ))
            }
        }
    }
    Ok((cfg, factors, saved, fname))
}

/// Puts read factors (and modules_to_save values) on `model`.
fn attach(
    model: CausalLm,
    cfg: LoraConfig,
    factors: Factors,
    saved: BTreeMap<String, HostTensor>,
    fname: &str,
) -> Result<(CausalLm, LoraConfig, Vec<String>), AdapterError> {
    let mut model = model;
    let targeted = targets::resolve(&model, &cfg)?;
    for path in &targeted {
        if !factors.contains_key(path) {
            return Err(AdapterError::tensor(
                fname,
                format!("{PREFIX}{path}.lora_A.weight"),
                "missing (adapter_config.json targets this module)",
            ));
        }
    }
    let device = model.device();
    for (path, [a, b]) in factors {
        let key = |ab: &str| format!("{PREFIX}{path}.lora_{ab}.weight");
        let lin = model.linear_mut(&path).ok_or_else(|| {
            AdapterError::tensor(fname, key("A"), "names no linear layer of the base model")
        })?;
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (None, _) => return Err(AdapterError::tensor(fname, key("A"), "missing")),
            (_, None) => return Err(AdapterError::tensor(fname, key("B"), "missing")),
        };
        let r = cfg.rank_for(&path);
        let (din, dout) = (lin.d_in(), lin.d_out());
        if a.shape != [r, din] {
            return Err(AdapterError::tensor(
                fname,
                key("A"),
                format!(
                    "expected shape [{r}, {din}] (r, the base layer's inputs), found {:?}",
                    a.shape
                ),
            ));
        }
        if b.shape != [dout, r] {
            return Err(AdapterError::tensor(
                fname,
                key("B"),
                format!(
                    "expected shape [{dout}, {r}] (the base layer's outputs, r), found {:?}",
                    b.shape
                ),
            ));
        }
        let (a, b) = (transpose_host(&a), transpose_host(&b));
        lin.lora = Some(LowRank::new(
            matrix(a.data, [din, r], &device),
            matrix(b.data, [r, dout], &device),
            cfg.scale_for(&path),
            cfg.dropout,
        ));
    }
    if !saved.is_empty() {
        let prefixes = modules_to_save_prefixes(&model, &cfg.modules_to_save)?;
        if let Some(k) = saved
            .keys()
            .find(|k| !prefixes.iter().any(|p| k.starts_with(p)))
        {
            return Err(AdapterError::tensor(
                fname,
                format!("{PREFIX}{k}"),
                "neither a LoRA factor nor part of modules_to_save",
            ));
        }
        model = model.set_hf_tensors(fname, saved)?;
    }
    let paths = adapted(&model);
    Ok((model, cfg, paths))
}

/// Writes the adapter on `model` (and its `modules_to_save`) in PEFT's format into `dir`,
/// which must exist. Files are written to temp names and renamed.
pub fn save(model: &CausalLm, cfg: &LoraConfig, dir: &Path) -> Result<(), AdapterError> {
    let paths = adapted(model);
    if paths.is_empty() {
        return Err(AdapterError::Other(
            "the model carries no adapter to save".into(),
        ));
    }
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = model
        .lora_tensors()
        .into_iter()
        .map(|(k, t)| (format!("{PREFIX}{k}"), (t.shape, t.data)))
        .collect();
    if !cfg.modules_to_save.is_empty() {
        let prefixes = modules_to_save_prefixes(model, &cfg.modules_to_save)?;
        for (k, t) in model.hf_tensors() {
            if prefixes.iter().any(|p| k.starts_with(p)) {
                tensors.insert(format!("{PREFIX}{k}"), (t.shape, t.data));
            }
        }
    }
    write_adapter(dir, cfg, &leaf_names(&paths), &tensors)
}

pub fn write_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    targets: &[String],
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) -> Result<(), AdapterError> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    phi_model::io::write_safetensors(&dir.join(WEIGHTS_FILE), tensors, Some(meta))?;
    let json = serde_json::to_string_pretty(&cfg.to_json(targets))
        .map_err(|e| AdapterError::Other(format!("adapter_config.json: {e}")))?;
    phi_model::io::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    Ok(())
}

/// PEFT's parameter names (`...lora_A.default.weight`), as `named_parameters()` gives them.
pub fn peft_param_name(name: &str, kind: ParamKind, adapter: &str) -> String {
    match kind {
        ParamKind::LoraA | ParamKind::LoraB => {
            let (m, ab) = name.rsplit_once(".weight").map_or((name, ""), |x| x);
            format!("{PREFIX}{m}.{adapter}.weight{ab}")
        }
        ParamKind::Base { .. } => format!("{PREFIX}{name}"),
    }
}

/// `loaded` with the adapter in `dir` applied, or unchanged when there is none.
pub fn with_adapter(
    loaded: phi_model::Loaded,
    dir: Option<&Path>,
) -> Result<phi_model::Loaded, AdapterError> {
    let Some(dir) = dir else {
        return Ok(loaded);
    };
    let phi_model::Loaded {
        model,
        config,
        dir: model_dir,
        gguf,
    } = loaded;
    let (model, _, _) = load_any(model, dir, &config)?;
    Ok(phi_model::Loaded {
        model,
        config,
        dir: model_dir,
        gguf,
    })
}
