//! Atomic output: every file is written to a temp name in its folder, then renamed, so a
//! crash never leaves a half-written file under the final name.

use crate::error::ModelError;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .map_err(|e| ModelError::io(tmp.display(), format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| ModelError::io(path.display(), format!("cannot rename into place: {e}")))
}

/// f32 tensors (name → shape, values) as one safetensors file, keys sorted.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), ModelError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            (
                k.clone(),
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(k, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| {
                    ModelError::tensor(
                        path.display(),
                        k.clone(),
                        format!("cannot serialize: {e:?}"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let out = safetensors::serialize(views, metadata)
        .map_err(|e| ModelError::io(path.display(), format!("cannot serialize: {e:?}")))?;
    write_atomic(path, &out)
}

/// Whether output folder `dir` already holds something: an entry not named in `ignore`
/// (a file of the tool's own, such as a lock). A folder not there yet holds nothing. Every
/// binary's refusal of a used output folder rests on this one test.
pub fn holds_other_than(dir: &Path, ignore: &[&str]) -> std::io::Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
        if !ignore.iter().any(|n| name == **n) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Creates `dir` for output, refusing a non-empty existing folder unless `overwrite`.
pub fn prepare_out_dir(dir: &Path, overwrite: bool) -> Result<(), ModelError> {
    let used = holds_other_than(dir, &[])
        .map_err(|e| ModelError::io(dir.display(), format!("cannot list: {e}")))?;
    if used && !overwrite {
        return Err(ModelError::io(
            dir.display(),
            "output folder exists and is not empty (pass --overwrite to replace its files)",
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::io(dir.display(), format!("cannot create: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_holding_only_ignored_names_is_unused() {
        let dir = std::env::temp_dir().join(format!("phi-model-io-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!holds_other_than(&dir, &[]).unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".lock"), "").unwrap();
        assert!(!holds_other_than(&dir, &[".lock"]).unwrap());
        assert!(holds_other_than(&dir, &[]).unwrap());
        std::fs::create_dir(dir.join("checkpoint-1")).unwrap();
        assert!(holds_other_than(&dir, &[".lock"]).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
