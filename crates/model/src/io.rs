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

/// Creates `dir` for output, refusing a non-empty existing folder unless `overwrite`.
pub fn prepare_out_dir(dir: &Path, overwrite: bool) -> Result<(), ModelError> {
    if dir.exists() {
        let non_empty = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir.display(), format!("cannot list: {e}")))?
            .next()
            .is_some();
        if non_empty && !overwrite {
            return Err(ModelError::io(
                dir.display(),
                "output folder exists and is not empty (pass --overwrite to replace its files)",
            ));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::io(dir.display(), format!("cannot create: {e}")))
}
