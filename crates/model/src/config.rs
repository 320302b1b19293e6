//! HF `config.json` parsing, accepting both the transformers-4 layout (`rope_theta`,
//! `rope_scaling`, `torch_dtype`) and the transformers-5 layout (`rope_parameters`, `dtype`).

use crate::error::ModelError;
use serde_json::Value;
use std::path::Path;

/// An architecture, by its place in the registry of `crate::arch`, where it derefs to that
/// file's `Architecture` and has its name (`Arch::Llama`). It is only an id here: this module
/// is below the architectures, which read their settings through it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch(pub(crate) u8);

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// RMSNorm eps for Llama/Phi-3, LayerNorm eps for Phi-2.
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint declares (`dtype` or `torch_dtype`); weights are computed in f32.
    pub dtype: Option<String>,
    pub sliding_window: Option<usize>,
    /// The parsed JSON, kept so exports can write it back with only the changed keys.
    pub raw: Value,
}

/// Typed access to config.json's keys, with one-line errors naming the file and key.
pub struct ConfigReader<'a> {
    file: &'a str,
    v: &'a Value,
}

impl<'a> ConfigReader<'a> {
    pub fn new(file: &'a str, v: &'a Value) -> Self {
        ConfigReader { file, v }
    }

    pub fn err(&self, key: &str, expected: &str) -> ModelError {
        ModelError::Config {
            file: self.file.to_string(),
            key: key.to_string(),
            expected: expected.to_string(),
        }
    }
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "a positive integer (key missing)"))
    }
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, "a non-negative integer")),
        }
    }
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, "a number")),
        }
    }
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, "true or false")),
        }
    }
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, "a string")),
        }
    }
    pub fn f64_list(&self, key: &str) -> Result<Vec<f64>, ModelError> {
        let arr = self
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| self.err(key, "a list of numbers"))?;
        arr.iter()
            .map(|x| x.as_f64().ok_or_else(|| self.err(key, "a list of numbers")))
            .collect()
    }
    pub fn opt_str_list(&self, key: &str) -> Result<Option<Vec<&'a str>>, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .map(Some)
            .ok_or_else(|| self.err(key, "a list of strings"))
    }
    /// Token ids may be an int or a list of ints (Llama-3 has several EOS ids).
    pub fn ids(&self, key: &str) -> Result<Vec<u32>, ModelError> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| self.err(key, "a token id or list of ids"))
                })
                .collect(),
            Some(x) => x
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.err(key, "a token id or list of ids")),
        }
    }
}

/// config.json as JSON, with one-line errors.
pub fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        file: path.display().to_string(),
        what: format!("cannot read config: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Io {
        file: path.display().to_string(),
        what: format!(
            "invalid JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        ),
    })
}

/// The class config.json names: `architectures[0]`, else `model_type`.
pub fn named_class<'a>(r: &ConfigReader<'a>) -> (Option<&'a str>, Option<&'a str>) {
    let class = r
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    (class, r.get("model_type").and_then(Value::as_str))
}

impl ModelConfig {
    /// The keys every architecture shares, for `arch`; `ModelConfig::from_value` (in
    /// `crate::arch`, which knows the architectures) then applies the architecture's own.
    /// The norm eps is read from `eps_key` (default `eps_default`) and the activation
    /// defaults to `act_default`.
    pub(crate) fn read_common(
        r: &ConfigReader,
        arch: Arch,
        (eps_key, eps_default): (&str, f64),
        act_default: &str,
    ) -> Result<Self, ModelError> {
        let file = r.file;
        let hidden_size = r.usize("hidden_size")?;
        let num_attention_heads = r.usize("num_attention_heads")?;
        let num_key_value_heads = r
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(r.err("num_attention_heads", "at least one head"));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(r.err(
                "num_key_value_heads",
                &format!("a divisor of num_attention_heads ({num_attention_heads})"),
            ));
        }
        let head_dim = r
            .opt_usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);

        // transformers 5 nests rope settings in rope_parameters; 4 keeps them top level.
        let rope_params = r.get("rope_parameters");
        let rp = rope_params.map(|v| ConfigReader { file, v });
        let rope_theta = match &rp {
            Some(p) => p.opt_f64("rope_theta")?,
            None => None,
        }
        .or(r.opt_f64("rope_theta")?)
        .unwrap_or(10000.0);
        let partial_rotary_factor = match &rp {
            Some(p) => p.opt_f64("partial_rotary_factor")?,
            None => None,
        }
        .or(r.opt_f64("partial_rotary_factor")?)
        .unwrap_or(1.0);
        let max_position_embeddings = r.opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let scaling_v = rope_params.or_else(|| r.get("rope_scaling"));
        let rope_scaling = match scaling_v {
            None => RopeScaling::Default,
            Some(sv) => {
                let key = if rope_params.is_some() {
                    "rope_parameters"
                } else {
                    "rope_scaling"
                };
                let s = ConfigReader { file, v: sv };
                let kind = s
                    .opt_str("rope_type")?
                    .or(s.opt_str("type")?)
                    .unwrap_or("default");
                let orig = s
                    .opt_usize("original_max_position_embeddings")?
                    .or(r.opt_usize("original_max_position_embeddings")?);
                match kind {
                    "default" => RopeScaling::Default,
                    "llama3" => RopeScaling::Llama3 {
                        factor: s.opt_f64("factor")?.ok_or_else(|| {
                            r.err(&format!("{key}.factor"), "a number for llama3 rope")
                        })?,
                        low_freq_factor: s.opt_f64("low_freq_factor")?.unwrap_or(1.0),
                        high_freq_factor: s.opt_f64("high_freq_factor")?.unwrap_or(4.0),
                        original_max_position_embeddings: orig.ok_or_else(|| {
                            r.err(
                                &format!("{key}.original_max_position_embeddings"),
                                "an integer for llama3 rope",
                            )
                        })?,
                    },
                    "longrope" | "su" => {
                        let orig = orig.unwrap_or(max_position_embeddings);
                        // transformers derives the factor from the context ratio when the
                        // config keeps an original length (Phi-3), else from `factor`.
                        let factor = if orig != max_position_embeddings {
                            max_position_embeddings as f64 / orig as f64
                        } else {
                            s.opt_f64("factor")?.unwrap_or(1.0)
                        };
                        let attention_factor = match s.opt_f64("attention_factor")? {
                            Some(a) => a,
                            None if factor <= 1.0 => 1.0,
                            None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
                        };
                        let short_factor = s.f64_list("short_factor")?;
                        let long_factor = s.f64_list("long_factor")?;
                        let rot = (head_dim as f64 * partial_rotary_factor) as usize;
                        for (name, f) in [
                            ("short_factor", &short_factor),
                            ("long_factor", &long_factor),
                        ] {
                            if f.len() != rot / 2 {
                                return Err(r.err(
                                    &format!("{key}.{name}"),
                                    &format!(
                                        "{} numbers (rotary dim / 2), got {}",
                                        rot / 2,
                                        f.len()
                                    ),
                                ));
                            }
                        }
                        RopeScaling::LongRope {
                            short_factor,
                            long_factor,
                            original_max_position_embeddings: orig,
                            attention_factor,
                        }
                    }
                    other => {
                        return Err(r.err(
                            &format!("{key}.rope_type"),
                            &format!("default, llama3 or longrope (got {other:?})"),
                        ))
                    }
                }
            }
        };
        let norm_eps = r.opt_f64(eps_key)?.unwrap_or(eps_default);
        let hidden_act = r.opt_str("hidden_act")?.unwrap_or(act_default).to_string();
        let cfg = ModelConfig {
            arch,
            vocab_size: r.usize("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?,
            num_hidden_layers: r.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            norm_eps,
            rope_theta,
            partial_rotary_factor,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: r.opt_bool("attention_bias")?.unwrap_or(false),
            mlp_bias: r.opt_bool("mlp_bias")?.unwrap_or(false),
            hidden_act,
            bos_token_id: r.ids("bos_token_id")?.first().copied(),
            eos_token_ids: r.ids("eos_token_id")?,
            pad_token_id: r.ids("pad_token_id")?.first().copied(),
            dtype: r
                .opt_str("dtype")?
                .or(r.opt_str("torch_dtype")?)
                .map(str::to_string),
            sliding_window: r.opt_usize("sliding_window")?,
            raw: r.v.clone(),
        };
        Ok(cfg)
    }

    /// The id padding uses: pad_token_id, else the first EOS (as LLaMA-Factory sets the
    /// pad token), else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id
            .or(self.eos_token_ids.first().copied())
            .unwrap_or(0)
    }

    /// Dimensions of each head that RoPE rotates (Phi-2 rotates only a prefix).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }
}
