//! Which linear layers a LoRA config targets, resolved as PEFT resolves them.

use crate::config::{LoraConfig, Targets};
use crate::error::AdapterError;
use phi_model::CausalLm;

/// `model.layers.12.mlp.down_proj` → 12.
pub fn layer_index(path: &str) -> Option<usize> {
    path.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn leaf(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// PEFT's `check_target_module_exists` for one module path.
pub fn matches(targets: &Targets, path: &str) -> Result<bool, AdapterError> {
    Ok(match targets {
        Targets::AllLinear => path != "lm_head",
        Targets::Names(names) => names
            .iter()
            .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        Targets::Regex(re) => regex::Regex::new(&format!("^(?:{re})$"))
            .map_err(|e| AdapterError::config("target_modules", re, format!("a valid regex: {e}")))?
            .is_match(path),
    })
}

/// Module paths of the targeted linear layers, in model order. As PEFT's `inject_adapter`,
/// fails only when nothing matches at all: a name list may hold names this architecture
/// lacks (one config for Llama and Phi-3 lists both `q_proj` and `qkv_proj`).
pub fn resolve(model: &CausalLm, cfg: &LoraConfig) -> Result<Vec<String>, AdapterError> {
    let linears: Vec<String> = model.linears().into_iter().map(|(p, _)| p).collect();
    let mut out = Vec::new();
    for p in &linears {
        let in_layers = match (&cfg.layers_to_transform, layer_index(p)) {
            (Some(keep), Some(i)) => keep.contains(&i),
            (Some(_), None) => false,
            (None, _) => true,
        };
        if in_layers && matches(&cfg.targets, p)? {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        let wanted = match &cfg.targets {
            Targets::AllLinear => "all-linear".to_string(),
            Targets::Names(n) => n.join(", "),
            Targets::Regex(re) => format!("re:{re}"),
        };
        let layers = match &cfg.layers_to_transform {
            Some(l) => format!(" in layers_to_transform {l:?}"),
            None => String::new(),
        };
        let known: std::collections::BTreeSet<&str> = linears.iter().map(|p| leaf(p)).collect();
        return Err(AdapterError::Other(format!(
            "target_modules [{wanted}]: no linear module of this model matches{layers} (its linear modules: {})",
            known.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(out)
}

/// The leaf names PEFT writes for `all-linear`: unique, sorted.
pub fn leaf_names(paths: &[String]) -> Vec<String> {
    let mut names: Vec<String> = paths.iter().map(|p| leaf(p).to_string()).collect();
    names.sort();
    names.dedup();
    names
}
