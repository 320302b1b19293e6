//! Prompt rows from a safetensors file of token ids, with padding removed.

use anyhow::{bail, Context, Result};
use phi_model::weights::read_i64;
use std::path::Path;

/// The mask that belongs to `key`: `<prefix>attention_mask` for `<prefix>input_ids` (so a
/// tokenizer's or the oracle's `input_ids` finds its `attention_mask`), else none.
pub fn default_mask_key(key: &str) -> Option<String> {
    key.strip_suffix("input_ids")
        .map(|prefix| format!("{prefix}attention_mask"))
}

/// Rows of `key` [B,T], each cut to its real tokens. With a mask (`mask_key`, which must then
/// exist, or the default one when present) a row keeps its one run of 1s, so a right- or
/// left-padded row continues from its last real token, as transformers' generate does.
pub fn prompt_rows(path: &Path, key: &str, mask_key: Option<&str>) -> Result<Vec<Vec<i64>>> {
    let f = path.display();
    let (shape, ids) = read_i64(path, key)?
        .with_context(|| format!("{f}: tensor {key}: missing (expected int64 [B,T])"))?;
    if shape.len() != 2 || shape[1] == 0 {
        bail!("{f}: tensor {key}: expected shape [B,T] with T > 0, found {shape:?}");
    }
    let t = shape[1];
    let mask = match mask_key {
        Some(m) => Some((
            m.to_string(),
            read_i64(path, m)?.with_context(|| {
                format!("{f}: tensor {m}: missing (expected int64 {shape:?}, 1 = real token)")
            })?,
        )),
        None => match default_mask_key(key) {
            Some(m) => read_i64(path, &m)?.map(|v| (m, v)),
            None => None,
        },
    };
    let Some((mname, (mshape, mask))) = mask else {
        return Ok(ids.chunks(t).map(<[i64]>::to_vec).collect());
    };
    if mshape != shape {
        bail!("{f}: tensor {mname}: expected shape {shape:?} (as {key}), found {mshape:?}");
    }
    ids.chunks(t)
        .zip(mask.chunks(t))
        .enumerate()
        .map(|(row, (ids, m))| {
            let first = m.iter().position(|&x| x != 0);
            let last = m.iter().rposition(|&x| x != 0);
            let (Some(a), Some(b)) = (first, last) else {
                bail!("{f}: tensor {mname}: row {row} has no real token (all 0)");
            };
            if m[a..=b].contains(&0) {
                bail!(
                    "{f}: tensor {mname}: row {row}: expected one run of 1s (left or right padding), found a 0 inside"
                );
            }
            Ok(ids[a..=b].to_vec())
        })
        .collect()
}
