//! Turning `--model` into a config and a tensor source: a local folder, a `.gguf` file, or a
//! hub id looked up in the Hugging Face cache (downloaded when a network allows).

use crate::config::{Arch, ModelConfig};
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::weights::{GgufSource, SafetensorsSource, TensorSource};
use std::path::{Path, PathBuf};

pub struct Resolved {
    pub config: ModelConfig,
    pub source: Box<dyn TensorSource>,
    /// The folder holding config.json and tokenizer files, when there is one.
    pub dir: Option<PathBuf>,
    /// The GGUF file, when the model came from one (it also carries the vocabulary).
    pub gguf: Option<PathBuf>,
}

/// HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub: transformers' order.
pub fn hub_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// The snapshot folder of a hub id in the cache, downloading config, weights and tokenizer
/// files first when online.
fn hub_snapshot(id: &str) -> Result<PathBuf, ModelError> {
    let cache = hf_hub::Cache::new(hub_cache_dir());
    let repo = cache.model(id.to_string());
    if let Some(cfg) = repo.get("config.json") {
        let has_weights = repo.get("model.safetensors").is_some()
            || repo.get("model.safetensors.index.json").is_some();
        if has_weights || offline() {
            return Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default());
        }
    }
    if offline() {
        return Err(ModelError::io(
            hub_cache_dir().display(),
            format!("{id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
        ));
    }
    download(id)
}

fn download(id: &str) -> Result<PathBuf, ModelError> {
    eprintln!(
        "{id}: no such file or folder here; downloading it as a Hugging Face hub id into {}",
        hub_cache_dir().display()
    );
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(hub_cache_dir()))
        .build()
        .map_err(|e| ModelError::io(id, format!("cannot reach the hub: {e}")))?;
    let repo = api.model(id.to_string());
    let get = |f: &str| {
        repo.get(f)
            .map_err(|e| ModelError::io(format!("{id}/{f}"), format!("download failed: {e}")))
    };
    let cfg = get("config.json")?;
    let dir = cfg.parent().map(Path::to_path_buf).unwrap_or_default();
    if get("model.safetensors").is_err() {
        let index = get("model.safetensors.index.json")?;
        let text =
            std::fs::read_to_string(&index).map_err(|e| ModelError::io(index.display(), e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::io(index.display(), e))?;
        let mut shards: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            get(&s)?;
        }
    }
    for optional in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let _ = repo.get(optional);
    }
    Ok(dir)
}

pub fn resolve(spec: &str) -> Result<Resolved, ModelError> {
    let path = Path::new(spec);
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let file = GgufFile::open(path)?;
        let layout = Arch::gguf_layout(&file)?;
        let src = GgufSource::new(path, file, layout);
        let cfg_json = src.hf_config()?;
        let config = ModelConfig::from_value(cfg_json, spec)?;
        return Ok(Resolved {
            config,
            source: Box::new(src),
            dir: None,
            gguf: Some(path.to_path_buf()),
        });
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if path.exists() {
        return Err(ModelError::io(spec, "not a model folder or a .gguf file"));
    } else if looks_like_hub_id(spec) {
        // `models/smol` may be a mistyped folder as well as owner/name: say both.
        hub_snapshot(spec).map_err(|e| {
            ModelError::io(
                spec,
                format!("no such file or folder; as a Hugging Face hub id: {e}"),
            )
        })?
    } else {
        return Err(ModelError::io(
            spec,
            "no such file or folder (and not a hub id of the form owner/name)",
        ));
    };
    resolve_dir(&dir)
}

pub fn resolve_dir(dir: &Path) -> Result<Resolved, ModelError> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(ModelError::io(
            cfg_path.display(),
            "missing: a model folder needs config.json",
        ));
    }
    let config = ModelConfig::from_file(&cfg_path)?;
    let source = SafetensorsSource::open_dir(dir)?;
    Ok(Resolved {
        config,
        source: Box::new(source),
        dir: Some(dir.to_path_buf()),
        gguf: None,
    })
}
