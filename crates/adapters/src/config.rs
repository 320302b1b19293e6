//! LoRA settings and their PEFT form, `adapter_config.json`.

use crate::error::AdapterError;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Which linear layers get an adapter, as PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Every linear layer except the output head.
    AllLinear,
    /// A module matches when its path equals a name or ends with `.name`.
    Names(Vec<String>),
    /// A string target: the whole module path must match the regex (PEFT's `re.fullmatch`).
    Regex(String),
}

impl Targets {
    /// `all-linear`, a comma-separated list, or (with `re:` in front) a regex.
    pub fn parse(s: &str) -> Targets {
        let s = s.trim();
        if s == "all-linear" || s == "all" {
            Targets::AllLinear
        } else if let Some(re) = s.strip_prefix("re:") {
            Targets::Regex(re.to_string())
        } else {
            Targets::Names(
                s.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect(),
            )
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Targets,
    pub use_rslora: bool,
    /// Whole modules trained and saved beside the adapter (LLaMA-Factory's `additional_target`).
    pub modules_to_save: Vec<String>,
    /// Per-module rank and alpha overrides, keyed by a name or regex matched at the path's end.
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub base_model_name_or_path: Option<String>,
    /// Seed of the A initialisation.
    pub seed: u64,
    /// Fields of a read adapter_config.json that are not interpreted here, written back as read.
    pub extra: Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Targets::AllLinear,
            use_rslora: false,
            modules_to_save: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            base_model_name_or_path: None,
            seed: 42,
            extra: Map::new(),
        }
    }
}

/// PEFT's `get_pattern_key`: `(.*\.)?(key)$` matched from the start of the path.
fn pattern_value<T: Copy>(pattern: &BTreeMap<String, T>, path: &str) -> Option<T> {
    pattern.iter().find_map(|(k, v)| {
        let re = regex::Regex::new(&format!(r"^(.*\.)?({k})$")).ok()?;
        re.is_match(path).then_some(*v)
    })
}

impl LoraConfig {
    pub fn rank_for(&self, path: &str) -> usize {
        pattern_value(&self.rank_pattern, path).unwrap_or(self.r)
    }

    /// alpha/r, or alpha/√r with rsLoRA, with the module's own rank and alpha.
    pub fn scale_for(&self, path: &str) -> f64 {
        let r = self.rank_for(path) as f64;
        let alpha = pattern_value(&self.alpha_pattern, path).unwrap_or(self.alpha);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Reads a PEFT `adapter_config.json`, refusing what this crate would silently get wrong.
    pub fn from_file(path: &Path) -> Result<Self, AdapterError> {
        let f = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| AdapterError::Other(format!("{f}: cannot read: {e}")))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| AdapterError::Other(format!("{f}: not valid JSON: {e}")))?;
        let Value::Object(mut m) = v else {
            return Err(AdapterError::config(&f, "(top level)", "a JSON object"));
        };
        let bad = |k: &str, want: &str| AdapterError::config(&f, k, want);
        let mut take = |k: &str| m.remove(k).unwrap_or(Value::Null);

        match take("peft_type") {
            Value::String(s) if s == "LORA" => {}
            Value::Null => {}
            other => return Err(bad("peft_type", &format!("\"LORA\", found {other}"))),
        }
        for (key, ok) in [
            ("use_dora", false),
            ("fan_in_fan_out", false),
            ("lora_bias", false),
        ] {
            match take(key) {
                Value::Null => {}
                Value::Bool(b) if b == ok => {}
                other => return Err(bad(key, &format!("{ok} (not supported), found {other}"))),
            }
        }
        match take("bias") {
            Value::Null => {}
            Value::String(s) if s == "none" => {}
            other => {
                return Err(bad(
                    "bias",
                    &format!("\"none\" (trained biases are not supported), found {other}"),
                ))
            }
        }
        for key in [
            "target_parameters",
            "layer_replication",
            "trainable_token_indices",
        ] {
            let v = take(key);
            if !(v.is_null() || v == json!([]) || v == json!({})) {
                return Err(bad(key, &format!("null (not supported), found {v}")));
            }
        }
        let r = take("r")
            .as_u64()
            .filter(|r| *r > 0)
            .ok_or_else(|| bad("r", "a positive integer"))? as usize;
        let alpha = match take("lora_alpha") {
            Value::Null => 8.0,
            v => v.as_f64().ok_or_else(|| bad("lora_alpha", "a number"))?,
        };
        let dropout = match take("lora_dropout") {
            Value::Null => 0.0,
            v => v
                .as_f64()
                .filter(|d| (0.0..1.0).contains(d))
                .ok_or_else(|| bad("lora_dropout", "a number in [0, 1)"))?,
        };
        let targets = match take("target_modules") {
            Value::String(s) if s == "all-linear" => Targets::AllLinear,
            Value::String(s) => Targets::Regex(s),
            Value::Array(a) => Targets::Names(
                a.iter()
                    .map(|x| x.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("target_modules", "a list of module names"))?,
            ),
            other => {
                return Err(bad(
                    "target_modules",
                    &format!("a list of names or a string, found {other}"),
                ))
            }
        };
        let use_rslora = take("use_rslora").as_bool().unwrap_or(false);
        let names = |v: Value, key: &str| -> Result<Vec<String>, AdapterError> {
            match v {
                Value::Null => Ok(Vec::new()),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad(key, "a list of module names")),
                other => Err(bad(key, &format!("a list of module names, found {other}"))),
            }
        };
        let modules_to_save = names(take("modules_to_save"), "modules_to_save")?;
        let layers_to_transform = match take("layers_to_transform") {
            Value::Null => None,
            Value::Number(n) => Some(vec![n
                .as_u64()
                .ok_or_else(|| bad("layers_to_transform", "layer indices"))?
                as usize]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("layers_to_transform", "layer indices"))?,
            ),
            other => {
                return Err(bad(
                    "layers_to_transform",
                    &format!("layer indices, found {other}"),
                ))
            }
        };
        let map_of = |v: Value, key: &str| -> Result<BTreeMap<String, f64>, AdapterError> {
            match v {
                Value::Null => Ok(BTreeMap::new()),
                Value::Object(o) => o
                    .into_iter()
                    .map(|(k, v)| v.as_f64().map(|x| (k, x)))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad(key, "an object of numbers")),
                other => Err(bad(key, &format!("an object of numbers, found {other}"))),
            }
        };
        let rank_pattern = map_of(take("rank_pattern"), "rank_pattern")?
            .into_iter()
            .map(|(k, v)| (k, v as usize))
            .collect();
        let alpha_pattern = map_of(take("alpha_pattern"), "alpha_pattern")?;
        let base_model_name_or_path = take("base_model_name_or_path").as_str().map(String::from);
        // Read again on save so a round trip keeps them exactly.
        for key in [
            "peft_type",
            "use_dora",
            "fan_in_fan_out",
            "bias",
            "lora_bias",
        ] {
            m.remove(key);
        }
        Ok(LoraConfig {
            r,
            alpha,
            dropout,
            targets,
            use_rslora,
            modules_to_save,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            base_model_name_or_path,
            seed: 0,
            extra: m,
        })
    }

    /// PEFT's adapter_config.json; `resolved` is the explicit target list (PEFT writes
    /// `all-linear` out as the module names it found).
    pub fn to_json(&self, resolved: &[String]) -> Value {
        let mut m = self.extra.clone();
        let num = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        let target_modules = match &self.targets {
            Targets::Regex(re) => json!(re),
            _ => json!(resolved),
        };
        let fields = [
            ("peft_type", json!("LORA")),
            ("task_type", json!("CAUSAL_LM")),
            ("r", json!(self.r)),
            ("lora_alpha", num(self.alpha)),
            ("lora_dropout", json!(self.dropout)),
            ("target_modules", target_modules),
            ("use_rslora", json!(self.use_rslora)),
            (
                "modules_to_save",
                if self.modules_to_save.is_empty() {
                    Value::Null
                } else {
                    json!(self.modules_to_save)
                },
            ),
            (
                "base_model_name_or_path",
                json!(self.base_model_name_or_path),
            ),
            ("bias", json!("none")),
            ("fan_in_fan_out", json!(false)),
            ("use_dora", json!(false)),
            ("lora_bias", json!(false)),
            ("inference_mode", json!(true)),
            ("init_lora_weights", json!(true)),
            ("layers_to_transform", json!(self.layers_to_transform)),
            ("rank_pattern", json!(self.rank_pattern)),
            (
                "alpha_pattern",
                Value::Object(
                    self.alpha_pattern
                        .iter()
                        .map(|(k, v)| (k.clone(), num(*v)))
                        .collect(),
                ),
            ),
        ];
        for (k, v) in fields {
            // Keep a read file's own spelling of a field that means the same.
            if !(k == "task_type" && m.contains_key(k)) {
                m.insert(k.to_string(), v);
            }
        }
        Value::Object(m)
    }
}
