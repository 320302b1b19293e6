//! `checkpoint-N/` folders as HF's Trainer lays them out: the adapter (or the trainable
//! weights), optimizer and scheduler state, RNG state and `trainer_state.json`. A checkpoint
//! is written under a temp name and renamed, so a crash never leaves a half one behind.

use crate::error::TrainError;
use crate::optim::Optimizer;
use phi_adapters::{peft, LoraConfig};
use phi_model::io::{write_atomic, write_safetensors};
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_model::CausalLm;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const TRAINABLE_FILE: &str = "trainable_weights.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

pub fn write_json(path: &Path, v: &Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(v).expect("json");
    write_atomic(path, text.as_bytes())?;
    Ok(())
}

pub fn read_json(path: &Path) -> Result<Value, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::file(path, format!("invalid JSON: {e}")))
}

/// The trainable weights (HF names and layout) of a non-LoRA run.
pub fn save_trainable(model: &CausalLm, names: &[String], path: &Path) -> Result<(), TrainError> {
    let keep: std::collections::BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = model
        .hf_tensors_named(|k| keep.contains(k))
        .into_iter()
        .map(|(k, t)| (k, (t.shape, t.data)))
        .collect();
    write_safetensors(path, &tensors, None)?;
    Ok(())
}

pub fn load_trainable(model: CausalLm, path: &Path) -> Result<CausalLm, TrainError> {
    let src = SafetensorsSource::open_files(&[path.to_path_buf()])?;
    let mut values = BTreeMap::new();
    for name in src.names() {
        values.insert(name.clone(), src.load(&name)?);
    }
    Ok(model.set_hf_tensors(&path.display().to_string(), values)?)
}

pub struct Snapshot<'a> {
    pub model: &'a CausalLm,
    pub lora: Option<&'a LoraConfig>,
    pub trainable: &'a [String],
    pub optimizer: &'a Optimizer,
    pub scheduler: Value,
    pub rng: Value,
    pub trainer_state: Value,
}

/// The file a run locks in its output folder.
pub const LOCK_FILE: &str = ".phi-train.lock";

/// Creates `out` and takes the run's exclusive lock on it, or says which run holds it.
pub fn lock(out: &Path) -> Result<std::fs::File, TrainError> {
    std::fs::create_dir_all(out).map_err(|e| TrainError::file(out, e))?;
    let path = out.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| TrainError::file(&path, e))?;
    match f.try_lock() {
        Ok(()) => {
            // The holder's pid, for the message a second run prints.
            let _ = f.set_len(0);
            let _ = (&f).write_all(std::process::id().to_string().as_bytes());
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            Err(TrainError::file(
                out,
                format!(
                    "another phi-train run (pid {}) is using this output folder; wait for it or choose another output_dir",
                    pid.trim()
                ),
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(TrainError::file(&path, format!("cannot lock: {e}")))
        }
    }
}

/// Removes what interrupted writes leave in `out`: `.checkpoint-N.tmp…` folders and
/// `.<name>.tmp<pid>` files. Only the run holding the folder's lock calls it.
pub fn clear_temps(out: &Path) -> Result<(), TrainError> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let checkpoint_tmp = name.starts_with(".checkpoint-") && name.contains(".tmp");
        let file_tmp = name.starts_with('.')
            && name
                .rsplit_once(".tmp")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()));
        if !(checkpoint_tmp || file_tmp) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|err| TrainError::file(&p, format!("cannot remove a stale temp: {err}")))?;
    }
    Ok(())
}

/// Writes `checkpoint-{step}` into `out`; returns its path.
pub fn save(out: &Path, step: usize, s: &Snapshot) -> Result<PathBuf, TrainError> {
    let dir = out.join(format!("checkpoint-{step}"));
    let tmp = out.join(format!(".checkpoint-{step}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::file(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::file(&tmp, e))?;
    match s.lora {
        Some(cfg) => peft::save(s.model, cfg, &tmp)?,
        None => save_trainable(s.model, s.trainable, &tmp.join(TRAINABLE_FILE))?,
    }
    s.optimizer.save(&tmp.join("optimizer.safetensors"))?;
    write_json(&tmp.join("scheduler.json"), &s.scheduler)?;
    write_json(&tmp.join("rng_state.json"), &s.rng)?;
    write_json(&tmp.join(STATE_FILE), &s.trainer_state)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::file(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| TrainError::file(&dir, e))?;
    Ok(dir)
}

/// checkpoint-N folders of `out`, oldest first.
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            e.path().join(STATE_FILE).exists().then(|| (n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Deletes the oldest checkpoints beyond `limit` (HF's save_total_limit).
pub fn rotate(out: &Path, limit: Option<usize>) -> Result<(), TrainError> {
    let Some(limit) = limit.filter(|l| *l > 0) else {
        return Ok(());
    };
    let all = list(out);
    for (_, p) in all.iter().take(all.len().saturating_sub(limit)) {
        std::fs::remove_dir_all(p).map_err(|e| TrainError::file(p, e))?;
    }
    Ok(())
}

/// `latest` → the newest checkpoint in `out`; otherwise the folder named.
pub fn resolve(spec: &str, out: &Path) -> Result<PathBuf, TrainError> {
    if spec == "latest" || spec == "true" {
        return list(out).pop().map(|(_, p)| p).ok_or_else(|| {
            TrainError::arg(
                "resume_from_checkpoint",
                spec,
                format!("a checkpoint-N folder in {}, found none", out.display()),
            )
        });
    }
    let p = PathBuf::from(spec);
    if !p.join(STATE_FILE).exists() {
        return Err(TrainError::arg(
            "resume_from_checkpoint",
            spec,
            format!("a checkpoint folder holding {STATE_FILE}"),
        ));
    }
    Ok(p)
}
