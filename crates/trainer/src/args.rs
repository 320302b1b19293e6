//! The run's settings under LLaMA-Factory's / HF's names. One struct is the clap parser, the
//! TOML/YAML schema and the saved run config, so a flag, a file key and the written config
//! can never disagree on a name or a default.

use crate::error::TrainError;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

// Bool flags take LF's forms: `--do_train`, `--do_train true`, `--do_train=false`.
#[derive(Parser, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[command(
    name = "phi-train",
    rename_all = "snake_case",
    args_override_self = true,
    about = "Fine-tune Hugging Face causal LMs. Flags and config keys carry LLaMA-Factory's names; \
             a flag overrides the config file."
)]
#[serde(default)]
pub struct TrainArgs {
    /// TOML config (or a LLaMA-Factory YAML); flags override its keys.
    #[serde(skip)]
    pub config: Option<PathBuf>,

    // ---- model
    /// Model folder, .gguf file or hub id.
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// A PEFT adapter to continue training (LoRA) or to evaluate.
    #[arg(long)]
    pub adapter_name_or_path: Option<String>,
    /// tokenizer.json or a folder holding it (default: the model's).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// cpu, or cuda / cuda:N with the `cuda` build.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    // ---- method
    /// sft (supervised, prompt masked) or pt (plain language modelling).
    #[arg(long, default_value = "sft")]
    pub stage: Stage,
    /// Train (HF's and LF's default is false: LF's train configs set it, its eval and
    /// predict configs do not).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub do_train: bool,
    #[arg(long, default_value = "lora")]
    pub finetuning_type: FinetuningType,
    /// Module names, `all` / `all-linear`, or `re:<regex>`.
    #[arg(long, default_value = "all")]
    pub lora_target: String,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// Default: 2 × lora_rank (LF).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub use_rslora: bool,
    /// Whole modules trained beside LoRA (PEFT's modules_to_save), comma-separated.
    #[arg(long)]
    pub additional_target: Option<String>,
    /// Freeze tuning: N>0 last N layers, N<0 first |N|, `all`, or a list such as 2,4,10-12.
    #[arg(long, default_value = "2", allow_hyphen_values = true)]
    #[serde(deserialize_with = "scalar_or_list")]
    pub freeze_trainable_layers: String,
    /// Names under a layer (self_attn, mlp, input_layernorm, ...) or `all`.
    #[arg(long, default_value = "all")]
    pub freeze_trainable_modules: String,
    /// embed_tokens, norm, lm_head (comma-separated).
    #[arg(long)]
    pub freeze_extra_modules: Option<String>,
    /// Train only the RMSNorm/LayerNorm weights.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub rmsnorm_only_training: bool,

    // ---- regularizers
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub use_rmsnorm_regularization: bool,
    /// 0-based layers whose post-attention RMSNorm output is pulled toward the target norm.
    #[arg(long, default_value = "2,4")]
    #[serde(deserialize_with = "scalar_or_list")]
    pub rmsnorm_reg_layers: String,
    #[arg(long, default_value_t = 0.01)]
    pub rmsnorm_reg_weight: f64,
    #[arg(long, default_value_t = 1.0)]
    pub rmsnorm_reg_target_norm: f64,
    /// Count padding positions too (the recipe's original formula).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub rmsnorm_reg_include_padding: bool,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub use_bos_zero_training: bool,
    /// Factor on the position-0 embedding (0 zeroes it, 1 is off).
    #[arg(long, default_value_t = 0.0)]
    pub bos_scaling_factor: f64,

    // ---- data
    /// Registry names from dataset_info.json or .json/.jsonl/.txt paths, comma-separated.
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "comma_list")]
    pub dataset: Vec<String>,
    #[arg(long, default_value = "data")]
    pub dataset_dir: PathBuf,
    /// LF template name (phi, llama3, smollm2, ...) or `jinja` for the tokenizer's own.
    #[arg(long)]
    pub template: Option<String>,
    #[arg(long, default_value_t = 2048)]
    pub cutoff_len: usize,
    #[arg(long)]
    pub max_samples: Option<usize>,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub train_on_prompt: bool,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub mask_history: bool,
    /// Put BOS at position 0 when the template does not (label masked).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub add_bos: bool,
    /// Several examples per row, attention kept within each.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub packing: bool,
    /// Held-out fraction (< 1) or count (>= 1) for eval_loss.
    #[arg(long, default_value_t = 0.0)]
    pub val_size: f64,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub skip_bad_records: bool,
    /// Fills {{name}} in datasets (LF's identity.json).
    #[arg(long)]
    pub identity_name: Option<String>,
    /// Fills {{author}} in datasets.
    #[arg(long)]
    pub identity_author: Option<String>,

    // ---- training
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite_output_dir: bool,
    #[arg(long, default_value_t = 1)]
    pub per_device_train_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub per_device_eval_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// adamw_torch (also adamw / adamw_hf), adamw_8bit (also paged_adamw_8bit: moments in 8
    /// bits, as bitsandbytes) or sgd.
    #[arg(long, default_value = "adamw_torch")]
    pub optim: Optim,
    /// Global gradient-norm clip; 0 disables it (HF).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides num_train_epochs when > 0.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    #[arg(long, default_value = "linear")]
    pub lr_scheduler_type: LrSchedulerType,
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    #[arg(long, default_value_t = 500)]
    pub save_steps: usize,
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// When to evaluate the validation split (HF's); steps when val_size > 0 and eval_steps
    /// is set.
    #[arg(long, default_value = "no")]
    pub eval_strategy: EvalStrategy,
    #[arg(long)]
    pub eval_steps: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep dataset order (no shuffling).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub disable_shuffling: bool,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bf16: bool,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub fp16: bool,
    /// QLoRA: the base's decoder-layer linears quantized at load, 4 or 8 bits
    /// (bitsandbytes' formats), and kept so. A GGUF base keeps its own blocks without it.
    #[arg(long)]
    pub quantization_bit: Option<u32>,
    /// The 4-bit format.
    #[arg(long, default_value = "nf4")]
    pub quantization_type: QuantizationType,
    /// Quantize the 4-bit scales too (LLaMA-Factory's default).
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub double_quantization: bool,
    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// (Burn's balanced checkpointing): less memory, a little more time. Unset: on for
    /// LoRA (as LLaMA-Factory), off otherwise.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub gradient_checkpointing: Option<bool>,
    /// With gradient checkpointing on: transformers' per-layer kind, keeping only each
    /// decoder layer's input and recomputing the layer in the backward pass (the least
    /// memory; one more forward pass a step), rather than Burn's balanced kind (memory-bound
    /// ops only). Unset: on for a quantized base (quantization_bit, a .gguf file). Not with
    /// the norm regularizer, which reads every layer's taps.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub checkpoint_layers: Option<bool>,
    /// LLaMA-Factory's switch; wins over gradient_checkpointing.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub disable_gradient_checkpointing: bool,
    /// A checkpoint folder, or `latest` for the newest checkpoint-N in output_dir.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Write training_loss.png.
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub plot_loss: bool,

    // ---- evaluation, prediction, samples
    /// Evaluate (eval_loss, perplexity) on eval_dataset, after training or on its own.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub do_eval: bool,
    /// With predict_with_generate: generate an answer for each eval_dataset example.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub do_predict: bool,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub predict_with_generate: bool,
    /// Data for do_eval / do_predict (default: dataset, when not training).
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "comma_list")]
    pub eval_dataset: Vec<String>,
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Sample instead of greedy decoding (LF defaults to true; greedy here, reproducible).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub do_sample: bool,
    #[arg(long, default_value_t = 0.95)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.7)]
    pub top_p: f64,
    /// Generate from sample_prompts every N optimizer steps into samples.jsonl (0: never).
    #[arg(long, default_value_t = 0)]
    pub generate_every: usize,
    /// Prompts (user turns) for generate_every; default: the first 3 eval/train prompts.
    #[arg(long)]
    pub sample_prompts: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub sample_max_new_tokens: usize,

    // ---- norm surgery
    /// none, or rmsnorm: every LayerNorm becomes an RMSNorm with its weight (bias dropped).
    #[arg(long, default_value = "none")]
    pub norm_surgery: NormSurgery,
    #[arg(long, default_value_t = 1e-8)]
    pub norm_surgery_eps: f64,

    // ---- preview (no model needed)
    /// Print the first N encoded examples as LLaMA-Factory does, then exit.
    #[arg(long)]
    #[serde(skip)]
    pub preview_data: Option<usize>,
    /// With --preview_data: one JSON line per example.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
}

// The settings with a fixed set of values. clap's names are the spellings: serde reads and
// writes the same ones (a test checks), so a flag, a file key and the saved config agree.
// Where LLaMA-Factory or HF accept more (other stages, optimizers, schedules), a value we do
// not implement is refused at parsing with the list of those we do.

#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Sft,
    Pt,
}

#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum FinetuningType {
    Lora,
    Freeze,
    Full,
}

#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Optim {
    // HF's other names for the same update (PyTorch's AdamW).
    #[value(aliases = ["adamw", "adamw_hf", "adamw_torch_fused"])]
    #[serde(alias = "adamw", alias = "adamw_hf", alias = "adamw_torch_fused")]
    AdamwTorch,
    /// bitsandbytes' 8-bit AdamW (HF's names for the same update; paging is a GPU matter).
    #[value(name = "adamw_8bit", aliases = ["adamw_bnb_8bit", "paged_adamw_8bit"])]
    #[serde(
        rename = "adamw_8bit",
        alias = "adamw_bnb_8bit",
        alias = "paged_adamw_8bit"
    )]
    Adamw8bit,
    Sgd,
}

#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum QuantizationType {
    Nf4,
    Fp4,
}

#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum EvalStrategy {
    No,
    Steps,
    Epoch,
}

#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum NormSurgery {
    None,
    Rmsnorm,
}

impl Default for TrainArgs {
    fn default() -> Self {
        TrainArgs::parse_from(["phi-train"])
    }
}

/// A list written as `"a,b"` or `["a", "b"]`.
fn comma_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        Either::Many(v) => v,
    })
}

/// `2`, `"2,4"`, `[2, 4]` or `["2", "10-12"]` as the comma-separated text the parsers take:
/// LF's YAML writes layer counts as numbers.
fn scalar_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    let v = Value::deserialize(d)?;
    let out = match &v {
        Value::Array(items) => items
            .iter()
            .map(text)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        other => text(other),
    };
    out.ok_or_else(|| {
        serde::de::Error::custom(format!("expected a number, a string or a list, found {v}"))
    })
}

/// Keys LLaMA-Factory YAML files carry that change nothing here (logging backends, worker
/// counts, caches): accepted silently from YAML.
const LF_NO_OPS: &[&str] = &[
    "report_to",
    "ddp_timeout",
    "preprocessing_num_workers",
    "dataloader_num_workers",
    "overwrite_cache",
    "trust_remote_code",
    "save_only_model",
    "flash_attn",
    "run_name",
];

/// Every key the config file may hold.
pub fn known_keys() -> Vec<String> {
    match serde_json::to_value(TrainArgs::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => unreachable!("TrainArgs serializes to a map"),
    }
}

/// The known key nearest to `key`, when one is close enough to be a likely typo.
pub fn nearest(key: &str) -> Option<String> {
    known_keys()
        .into_iter()
        .map(|k| (strsim::jaro_winkler(key, &k), k))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// `value` outside the values a fixed-choice setting takes, as every bad setting reads:
/// `key = value: expected a, b or c`. None when `key` takes any value or `value` is one of its.
fn bad_choice(key: &str, value: &str) -> Option<TrainError> {
    let cmd = TrainArgs::command();
    let values = cmd
        .get_arguments()
        .find(|a| a.get_id() == key)?
        .get_possible_values();
    if values.is_empty() || values.iter().any(|v| v.matches(value, false)) {
        return None;
    }
    let names: Vec<&str> = values.iter().map(|v| v.get_name()).collect();
    let expected = match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    };
    Some(TrainError::arg(key, value, expected))
}

/// clap's refusal of a flag's value, in the one line a file value gets (clap's own message
/// spans several lines); None for other clap errors.
fn bad_flag(e: &clap::Error) -> Option<TrainError> {
    use clap::error::{ContextKind, ContextValue};
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    // clap names the flag as `--stage <STAGE>`.
    let flag = text(ContextKind::InvalidArg)?;
    let key = flag.trim_start_matches('-').split(' ').next()?;
    bad_choice(key, text(ContextKind::InvalidValue)?)
}

fn read_file(path: &Path) -> Result<(Map<String, Value>, bool), TrainError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::file(path, format!("cannot read: {e}")))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    );
    let value: Value = if yaml {
        serde_yaml::from_str(&text).map_err(|e| TrainError::file(path, e))?
    } else {
        let t: toml::Table = toml::from_str(&text).map_err(|e| {
            TrainError::file(path, e.to_string().lines().next().unwrap_or("").to_string())
        })?;
        serde_json::to_value(t).map_err(|e| TrainError::file(path, e))?
    };
    match value {
        Value::Object(m) => Ok((m, yaml)),
        Value::Null => Ok((Map::new(), yaml)),
        _ => Err(TrainError::file(path, "expected a table of key = value")),
    }
}

impl TrainArgs {
    /// `model_name_or_path`, required by every run that loads a model.
    pub fn model_spec(&self) -> Result<String, TrainError> {
        self.model_name_or_path.clone().ok_or_else(|| {
            TrainError::arg(
                "model_name_or_path",
                "(none)",
                "a model folder, .gguf file or hub id",
            )
        })
    }

    /// Whether the backward pass recomputes activations (LF's switch wins over HF's).
    pub fn checkpointing(&self) -> bool {
        let default = self.finetuning_type == FinetuningType::Lora;
        self.gradient_checkpointing.unwrap_or(default) && !self.disable_gradient_checkpointing
    }

    /// Whether checkpointing is per layer (`checkpoint_layers`).
    pub fn layerwise(&self) -> bool {
        let gguf = self
            .model_name_or_path
            .as_deref()
            .is_some_and(|m| m.ends_with(".gguf"));
        let quantized = self.quantization_bit.is_some() || gguf;
        let default = quantized && !self.use_rmsnorm_regularization;
        self.checkpointing() && self.checkpoint_layers.unwrap_or(default)
    }

    /// Parses the command line (and the config file it names), flags over file keys.
    pub fn from_cli<I, T>(argv: I) -> Result<TrainArgs, TrainError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = phi_cli::try_matches::<TrainArgs, _, _>(argv)
            .map_err(|e| bad_flag(&e).unwrap_or_else(|| e.exit()))?;
        let cli = TrainArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let mut map = Map::new();
        if let Some(path) = &cli.config {
            let (file, yaml) = read_file(path)?;
            let known = known_keys();
            for (k, v) in file {
                if known.contains(&k) {
                    map.insert(k, v);
                } else if yaml {
                    // LF YAMLs carry many keys; the run uses those it knows and says which not.
                    if !LF_NO_OPS.contains(&k.as_str()) {
                        let hint =
                            nearest(&k).map_or(String::new(), |n| format!("; did you mean {n}?"));
                        eprintln!(
                            "{}: ignoring key {k} (not used by phi-train{hint})",
                            path.display()
                        );
                    }
                } else {
                    let hint =
                        nearest(&k).map_or(String::new(), |n| format!("; did you mean {n}?"));
                    return Err(TrainError::file(path, format!("unknown key {k}{hint}")));
                }
            }
        }
        let Value::Object(cli_map) = serde_json::to_value(&cli).expect("serializable") else {
            unreachable!()
        };
        for (k, v) in cli_map {
            if matches.value_source(&k) == Some(clap::parser::ValueSource::CommandLine) {
                map.insert(k, v);
            }
        }
        let what = cli
            .config
            .as_ref()
            .map_or("phi-train".to_string(), |p| p.display().to_string());
        // Key by key first, so a bad value is reported under its own key.
        for (k, v) in &map {
            let one = Map::from_iter([(k.clone(), v.clone())]);
            if let Err(e) = serde_json::from_value::<TrainArgs>(Value::Object(one)) {
                let e = match v {
                    // JSON has no inf or NaN: a non-finite number arrives here as null.
                    Value::Null => format!("{k}: expected a finite number"),
                    Value::String(s) => {
                        bad_choice(k, s).map_or_else(|| format!("{k}: {e}"), |b| b.to_string())
                    }
                    _ => format!("{k}: {e}"),
                };
                return Err(TrainError::Msg(format!("{what}: {e}")));
            }
        }
        let mut args: TrainArgs = serde_json::from_value(Value::Object(map))
            .map_err(|e| TrainError::Msg(e.to_string()))?;
        args.config = cli.config;
        args.preview_data = cli.preview_data;
        args.json = cli.json;
        Ok(args)
    }

    /// Optimizer numbers the f32 update can use: finite in f32 (1e39 is not) and in range.
    pub fn check_numbers(&self) -> Result<(), TrainError> {
        let f32_ok = |x: f64| x.is_finite() && (x as f32).is_finite();
        for (key, x, want_ok, want) in [
            (
                "learning_rate",
                self.learning_rate,
                self.learning_rate >= 0.0,
                "a finite f32 >= 0",
            ),
            (
                "weight_decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                "a finite f32 >= 0",
            ),
            (
                "max_grad_norm",
                self.max_grad_norm,
                true,
                "a finite f32 (0 or less: no clipping)",
            ),
            (
                "adam_beta1",
                self.adam_beta1,
                (0.0..1.0).contains(&self.adam_beta1),
                "in [0, 1)",
            ),
            (
                "adam_beta2",
                self.adam_beta2,
                (0.0..1.0).contains(&self.adam_beta2),
                "in [0, 1)",
            ),
            (
                "adam_epsilon",
                self.adam_epsilon,
                self.adam_epsilon > 0.0,
                "a finite f32 > 0",
            ),
        ] {
            if !(f32_ok(x) && want_ok) {
                // 1e39, not its 40 digits.
                let shown = if x.is_finite() && x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
                    format!("{x:e}")
                } else {
                    x.to_string()
                };
                return Err(TrainError::arg(key, shown, want));
            }
        }
        Ok(())
    }

    /// The run's full config as TOML (every key, defaults included).
    pub fn to_toml(&self) -> String {
        // TOML has no null: unset options are left out.
        let Value::Object(m) = serde_json::to_value(self).expect("serializable") else {
            unreachable!()
        };
        let m: Map<String, Value> = m.into_iter().filter(|(_, v)| !v.is_null()).collect();
        toml::to_string(&m).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    /// serde reads every clap spelling (aliases included) as the same value, writes clap's
    /// name, and accepts nothing clap refuses.
    fn spellings_agree<E>()
    where
        E: ValueEnum + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let mut clap_names = Vec::new();
        for v in E::value_variants() {
            let pv = v.to_possible_value().expect("no variant is skipped");
            assert_eq!(serde_json::to_value(v).unwrap(), pv.get_name());
            for name in pv.get_name_and_aliases() {
                assert_eq!(&serde_json::from_value::<E>(name.into()).unwrap(), v);
                clap_names.push(name.to_string());
            }
        }
        // serde's refusal lists every name it reads, aliases included.
        let e = serde_json::from_value::<E>("?".into())
            .unwrap_err()
            .to_string();
        let (_, listed) = e.split_once("expected").unwrap();
        let mut serde_names: Vec<String> = listed
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect();
        serde_names.sort();
        clap_names.sort();
        assert_eq!(serde_names, clap_names);
    }

    #[test]
    fn serde_and_clap_spell_every_choice_alike() {
        spellings_agree::<Stage>();
        spellings_agree::<FinetuningType>();
        spellings_agree::<Optim>();
        spellings_agree::<LrSchedulerType>();
        spellings_agree::<EvalStrategy>();
        spellings_agree::<NormSurgery>();
    }
}
