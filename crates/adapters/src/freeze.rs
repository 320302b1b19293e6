//! Which parameters train. Every choice ends as a set of HF parameter names, so the trainer,
//! the counts and the saved files agree on one list.

use crate::error::AdapterError;
use crate::targets::layer_index;
use burn::module::{Module, ParamGroup};
use phi_model::params::{ParamInfo, ParamKind};
use phi_model::CausalLm;
use std::collections::BTreeSet;

/// LLaMA-Factory's `freeze_trainable_layers`, plus explicit lists.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerSel {
    All,
    /// The last N layers (LF: N > 0).
    Last(usize),
    /// The first N layers (LF: N < 0).
    First(usize),
    List(BTreeSet<usize>),
}

impl LayerSel {
    /// `all`; a signed integer as LF reads it; or a list with ranges, `2,4,10-12`.
    pub fn parse(s: &str) -> Result<LayerSel, AdapterError> {
        let s = s.trim();
        let bad = || {
            AdapterError::config(
                "freeze_trainable_layers",
                s,
                "all, a signed count (2 = last two, -2 = first two) or a list such as 2,4,10-12",
            )
        };
        if s == "all" {
            return Ok(LayerSel::All);
        }
        if let Ok(n) = s.parse::<i64>() {
            return match n {
                0 => Err(bad()),
                n if n > 0 => Ok(LayerSel::Last(n as usize)),
                n => Ok(LayerSel::First(n.unsigned_abs() as usize)),
            };
        }
        let mut set = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (usize, usize) = (
                        a.trim().parse().map_err(|_| bad())?,
                        b.trim().parse().map_err(|_| bad())?,
                    );
                    if a > b {
                        return Err(bad());
                    }
                    set.extend(a..=b);
                }
                None => {
                    set.insert(part.parse().map_err(|_| bad())?);
                }
            }
        }
        if set.is_empty() {
            return Err(bad());
        }
        Ok(LayerSel::List(set))
    }

    pub fn layers(&self, n: usize) -> Result<BTreeSet<usize>, AdapterError> {
        let too_many = |k: usize| {
            AdapterError::config(
                "freeze_trainable_layers",
                k.to_string(),
                format!("at most the model's {n} layers"),
            )
        };
        Ok(match self {
            LayerSel::All => (0..n).collect(),
            LayerSel::Last(k) if *k > n => return Err(too_many(*k)),
            LayerSel::First(k) if *k > n => return Err(too_many(*k)),
            LayerSel::Last(k) => (n - k..n).collect(),
            LayerSel::First(k) => (0..*k).collect(),
            LayerSel::List(s) => {
                if let Some(bad) = s.iter().find(|i| **i >= n) {
                    return Err(AdapterError::config(
                        "freeze_trainable_layers",
                        bad.to_string(),
                        format!("a layer index below {n}"),
                    ));
                }
                s.clone()
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// Full fine-tuning: every base parameter.
    Full,
    /// Every RMSNorm/LayerNorm weight and bias, nothing else.
    NormOnly,
    /// LLaMA-Factory's freeze tuning.
    Freeze {
        layers: LayerSel,
        /// Names directly under a layer (`self_attn`, `mlp`, `input_layernorm`, ...); empty or
        /// `all` = the whole layer.
        modules: Vec<String>,
        /// Outside the layers: `embed_tokens`, `norm`, `lm_head`.
        extra: Vec<String>,
    },
    /// The LoRA factors plus whole modules to save (`modules_to_save`).
    Lora { modules_to_save: Vec<String> },
}

fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(m, _)| m)
}

fn is_norm(name: &str) -> bool {
    module_of(name)
        .rsplit('.')
        .next()
        .unwrap_or("")
        .ends_with("norm")
}

/// Names of the parameters that `sel` trains.
pub fn trainable_names(model: &CausalLm, sel: &Selection) -> Result<Vec<String>, AdapterError> {
    let params = model.params();
    let base = |p: &&ParamInfo| matches!(p.kind, ParamKind::Base { .. });
    let names: Vec<String> = match sel {
        Selection::Full => params.iter().filter(base).map(|p| p.name.clone()).collect(),
        Selection::NormOnly => params
            .iter()
            .filter(base)
            .filter(|p| is_norm(&p.name))
            .map(|p| p.name.clone())
            .collect(),
        Selection::Freeze {
            layers,
            modules,
            extra,
        } => {
            let ids = layers.layers(model.num_layers())?;
            let under: BTreeSet<String> = params
                .iter()
                .filter_map(|p| {
                    let rest = p.name.strip_prefix("model.layers.")?;
                    Some(rest.split('.').nth(1)?.to_string())
                })
                .collect();
            let all = modules.is_empty() || modules.iter().any(|m| m == "all");
            for m in modules.iter().filter(|m| *m != "all") {
                if !under.contains(m) {
                    return Err(AdapterError::config(
                        "freeze_trainable_modules",
                        m,
                        format!(
                            "all or names under a layer: {}",
                            under.iter().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
            let extra_prefixes = extra_prefixes(model, extra)?;
            params
                .iter()
                .filter(base)
                .filter(|p| {
                    let in_layer = layer_index(&p.name).is_some_and(|i| ids.contains(&i))
                        && (all
                            || p.name
                                .strip_prefix("model.layers.")
                                .and_then(|r| r.split('.').nth(1))
                                .is_some_and(|m| modules.iter().any(|x| x == m)));
                    in_layer || extra_prefixes.iter().any(|x| p.name.starts_with(x))
                })
                .map(|p| p.name.clone())
                .collect()
        }
        Selection::Lora { modules_to_save } => {
            let saved = modules_to_save_prefixes(model, modules_to_save)?;
            params
                .iter()
                .filter(|p| !base(p) || saved.iter().any(|x| p.name.starts_with(x)))
                .map(|p| p.name.clone())
                .collect()
        }
    };
    Ok(names)
}

/// `embed_tokens`, `norm` (whatever the architecture calls its final norm) and `lm_head` as
/// name prefixes.
fn extra_prefixes(model: &CausalLm, extra: &[String]) -> Result<Vec<String>, AdapterError> {
    let tied = model.lm_head.is_none();
    extra
        .iter()
        .map(|e| match e.as_str() {
            "embed_tokens" => Ok("model.embed_tokens.".to_string()),
            "norm" | "final_layernorm" => Ok(format!("model.{}.", model.arch.final_norm())),
            "lm_head" if tied => Err(AdapterError::config(
                "freeze_extra_modules",
                e,
                "embed_tokens (this model ties lm_head to embed_tokens)",
            )),
            "lm_head" => Ok("lm_head.".into()),
            _ => Err(AdapterError::config(
                "freeze_extra_modules",
                e,
                "embed_tokens, norm or lm_head",
            )),
        })
        .collect()
}

/// PEFT matches `modules_to_save` like targets: the module path or its `.name` suffix.
pub fn modules_to_save_prefixes(
    model: &CausalLm,
    names: &[String],
) -> Result<Vec<String>, AdapterError> {
    let modules: BTreeSet<String> = model
        .params()
        .iter()
        .filter(|p| matches!(p.kind, ParamKind::Base { .. }))
        .map(|p| module_of(&p.name).to_string())
        .collect();
    let mut out = Vec::new();
    for n in names {
        let hits: Vec<&String> = modules
            .iter()
            .filter(|m| *m == n || m.ends_with(&format!(".{n}")))
            .collect();
        if hits.is_empty() {
            let hint = if n == "lm_head" && model.lm_head.is_none() {
                "a module of this model (lm_head is tied to embed_tokens here)".to_string()
            } else {
                "a module of this model, such as embed_tokens, norm or lm_head".to_string()
            };
            return Err(AdapterError::config("modules_to_save", n, hint));
        }
        out.extend(hits.into_iter().map(|m| format!("{m}.")));
    }
    Ok(out)
}

/// Turns gradients on for exactly `names` and off for everything else.
pub fn apply(model: CausalLm, names: &[String]) -> CausalLm {
    let keep: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let ids = model
        .params()
        .into_iter()
        .filter(|p| keep.contains(p.name.as_str()))
        .map(|p| p.id)
        .collect();
    model
        .set_require_grad(false)
        .set_require_grad_group(ParamGroup::from_ids(ids), true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub trainable: usize,
    pub all: usize,
}

impl Counts {
    pub fn of(model: &CausalLm, names: &[String]) -> Counts {
        let keep: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let params = model.params();
        Counts {
            trainable: params
                .iter()
                .filter(|p| keep.contains(p.name.as_str()))
                .map(ParamInfo::numel)
                .sum(),
            all: params.iter().map(ParamInfo::numel).sum(),
        }
    }
}

/// PEFT's `print_trainable_parameters` line.
impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn commas(n: usize) -> String {
            let s = n.to_string();
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i).is_multiple_of(3) {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        let pct = 100.0 * self.trainable as f64 / self.all.max(1) as f64;
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            commas(self.trainable),
            commas(self.all)
        )
    }
}
