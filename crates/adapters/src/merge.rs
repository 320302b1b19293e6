//! Folding adapters into the base (PEFT's `merge_and_unload`: W += s·B·A) and splitting
//! fused projections (the architecture's `fused`) for tools that want them apart.

use burn::module::Param;
use phi_model::weights::HostTensor;
use phi_model::{CausalLm, ModelConfig};

/// Merges every adapter into its layer's weight and drops the side paths.
pub fn merge(mut model: CausalLm) -> CausalLm {
    model.unpack_bf16();
    let paths = crate::lora::adapted(&model);
    for path in paths {
        if let Some(lin) = model.linear_mut(&path) {
            if let Some(l) = lin.lora.take() {
                let w = lin.weight.val() + l.delta();
                lin.weight = Param::initialized(lin.weight.id, w);
            }
        }
    }
    model
}

/// Rows [start, start+n) of a row-major matrix (or a vector).
fn rows(t: &HostTensor, start: usize, n: usize) -> HostTensor {
    let cols: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = n;
    HostTensor {
        shape,
        data: t.data[start * cols..(start + n) * cols].to_vec(),
    }
}

/// Splits fused tensors by name. `name` is an HF parameter name or a PEFT key; a fused
/// weight or bias, or a LoRA B, splits by rows; a LoRA A is shared by the parts.
pub fn split_fused(
    cfg: &ModelConfig,
    tensors: Vec<(String, HostTensor)>,
) -> Vec<(String, HostTensor)> {
    let fused = cfg.arch.fused(cfg);
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let hit = fused.iter().find_map(|f| {
            let i = name.find(&format!(".{}.", f.module))?;
            Some((i, f.module, &f.parts))
        });
        let Some((i, fused, ps)) = hit else {
            out.push((name, t));
            continue;
        };
        let head = &name[..i];
        let parent = fused.split('.').next().unwrap_or("");
        let tail = &name[i + fused.len() + 2..];
        let mut start = 0;
        for (part, n) in ps {
            let new = format!("{head}.{parent}.{part}.{tail}");
            let piece = if tail.starts_with("lora_A") {
                t.clone()
            } else {
                rows(&t, start, *n)
            };
            start += n;
            out.push((new, piece));
        }
    }
    out
}

/// Target names after splitting: a fused projection's leaf name (`qkv_proj`) becomes its
/// parts' (`q_proj`, `k_proj`, `v_proj`).
pub fn split_target_names(cfg: &ModelConfig, names: &[String]) -> Vec<String> {
    let fused = cfg.arch.fused(cfg);
    let leaf = |m: &str| m.rsplit('.').next().unwrap_or(m).to_string();
    let mut out: Vec<String> = names
        .iter()
        .flat_map(|n| match fused.iter().find(|f| leaf(f.module) == *n) {
            Some(f) => f.parts.iter().map(|(p, _)| p.to_string()).collect(),
            None => vec![n.clone()],
        })
        .collect();
    out.sort();
    out.dedup();
    out
}
