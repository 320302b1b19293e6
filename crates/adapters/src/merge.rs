//! Folding adapters into the base (PEFT's `merge_and_unload`: W += s·B·A) and splitting
//! Phi-3's fused projections for tools that want q/k/v and gate/up apart.

use burn::module::Param;
use phi_model::weights::HostTensor;
use phi_model::{CausalLm, ModelConfig};

/// Merges every adapter into its layer's weight and drops the side paths.
pub fn merge(mut model: CausalLm) -> CausalLm {
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

/// Row blocks of a fused projection: (suffix of the fused module, [(part, rows)]).
pub fn fused_parts(cfg: &ModelConfig) -> Vec<(&'static str, Vec<(&'static str, usize)>)> {
    let d = cfg.head_dim;
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    vec![
        (
            "self_attn.qkv_proj",
            vec![("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
        ),
        (
            "mlp.gate_up_proj",
            vec![
                ("gate_proj", cfg.intermediate_size),
                ("up_proj", cfg.intermediate_size),
            ],
        ),
    ]
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
    let parts = fused_parts(cfg);
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let hit = parts.iter().find_map(|(fused, ps)| {
            let i = name.find(&format!(".{fused}."))?;
            Some((i, *fused, ps))
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

/// Target names after splitting: `qkv_proj` → q/k/v, `gate_up_proj` → gate/up.
pub fn split_target_names(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = names
        .iter()
        .flat_map(|n| match n.as_str() {
            "qkv_proj" => vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
            "gate_up_proj" => vec!["gate_proj".into(), "up_proj".into()],
            _ => vec![n.clone()],
        })
        .collect();
    out.sort();
    out.dedup();
    out
}
