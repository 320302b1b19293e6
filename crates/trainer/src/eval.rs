//! `--do_eval` and `--do_predict`: the model (base, base + adapter, or what the run just
//! trained) on `eval_dataset`, encoded exactly as training data is. Eval loss is HF's: the
//! mean over every label token of the set; perplexity is its exponential.

use crate::args::TrainArgs;
use crate::checkpoint::write_json;
use crate::data::{self, Examples};
use crate::error::TrainError;
use crate::run::evaluate;
use phi_data::encode::Encoded;
use phi_model::{CausalLm, ModelConfig};
use phi_regularizers::BosScale;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A model ready for inference, with what encoding and generation need from its folder.
pub struct EvalModel {
    pub model: CausalLm,
    pub config: ModelConfig,
    pub eos: Vec<u32>,
    pub model_dir: Option<PathBuf>,
}

/// `norm_surgery` applied to a freshly loaded model (see phi_model::surgery).
pub fn apply_surgery(model: CausalLm, a: &TrainArgs) -> Result<CausalLm, TrainError> {
    match a.norm_surgery.as_str() {
        "none" => Ok(model),
        "rmsnorm" => {
            if !(a.norm_surgery_eps.is_finite() && a.norm_surgery_eps >= 0.0) {
                return Err(TrainError::arg(
                    "norm_surgery_eps",
                    a.norm_surgery_eps,
                    "a non-negative number",
                ));
            }
            let (m, n) = phi_model::surgery::layernorm_to_rmsnorm(model, a.norm_surgery_eps);
            if n == 0 {
                return Err(TrainError::arg(
                    "norm_surgery",
                    "rmsnorm",
                    "a model with LayerNorms (Phi-2); this one has RMSNorms only",
                ));
            }
            eprintln!(
                "norm surgery: {n} LayerNorms replaced by RMSNorms (weights kept, biases dropped, eps {})",
                a.norm_surgery_eps
            );
            Ok(m)
        }
        other => Err(TrainError::arg("norm_surgery", other, "none or rmsnorm")),
    }
}

/// After training: the run's own output (the adapter on the base, or the saved full weights,
/// whose config.json records any norm surgery). Otherwise the base, surgery, adapter.
pub fn load_model(a: &TrainArgs, trained: bool) -> Result<EvalModel, TrainError> {
    let spec = a.model_spec()?;
    let out = a.output_dir.clone();
    let lora = a.finetuning_type == "lora";
    // A full / freeze run saved its own config.json (surgery recorded there); otherwise the
    // base is loaded and the surgery applied again.
    let saved_full = trained && !lora;
    let spec = match (&out, saved_full) {
        (Some(o), true) => o.display().to_string(),
        _ => spec,
    };
    let device = phi_model::device_from_name(&a.device)?;
    let loaded = phi_model::load(&spec, &device)?;
    let eos = loaded.eos_token_ids();
    let model_dir = loaded.files_dir();
    let mut model = loaded.model;
    if !saved_full {
        model = apply_surgery(model, a)?;
    }
    let adapter = match (&out, trained && lora) {
        (Some(o), true) => Some(o.clone()),
        _ => a.adapter_name_or_path.as_ref().map(PathBuf::from),
    };
    if let Some(d) = adapter {
        model = phi_adapters::peft::load(model, &d)?.0;
    }
    Ok(EvalModel {
        model,
        config: loaded.config,
        eos,
        model_dir,
    })
}

/// The evaluation examples: `eval_dataset`; else, when training, the run's validation split;
/// else `dataset` (an evaluation-only run names its data either way).
pub fn load_examples(a: &TrainArgs, m: &EvalModel) -> Result<Examples, TrainError> {
    let tok = data::tokenizer_path(a, m.model_dir.as_deref());
    let pad = m
        .config
        .pad_token_id
        .or(m.config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let mut ea = a.clone();
    ea.packing = false;
    let use_val = a.eval_dataset.is_empty() && a.do_train;
    if !a.eval_dataset.is_empty() {
        ea.dataset = a.eval_dataset.clone();
        ea.val_size = 0.0;
    } else if !use_val {
        ea.val_size = 0.0;
    }
    if ea.dataset.is_empty() {
        return Err(TrainError::arg(
            "eval_dataset",
            "(none)",
            "registry names or .json/.jsonl paths to evaluate on",
        ));
    }
    let mut ex = data::load(&ea, tok.as_deref(), pad, m.config.vocab_size)?;
    if use_val {
        if ex.val.is_empty() {
            return Err(TrainError::arg(
                "eval_dataset",
                "(none)",
                "a dataset to evaluate on (or val_size > 0 when training)",
            ));
        }
        ex.train = std::mem::take(&mut ex.val);
    }
    Ok(ex)
}

/// Label tokens the loss averages over (labels are shifted: position 0 never counts).
pub fn label_tokens(examples: &[Encoded]) -> usize {
    examples
        .iter()
        .map(|e| {
            e.labels
                .iter()
                .skip(1)
                .filter(|&&l| l != phi_model::loss::IGNORE_INDEX)
                .count()
        })
        .sum()
}

/// `do_eval`: eval loss and perplexity into `eval_results.json` (and `all_results.json`),
/// printed as HF's metrics table. Returns the metrics.
pub fn run_eval(a: &TrainArgs, m: &EvalModel, ex: &Examples) -> Result<Value, TrainError> {
    let out = output_dir(a)?;
    let bos = if a.use_bos_zero_training {
        Some(BosScale::new(a.bos_scaling_factor)?)
    } else {
        None
    };
    let batch = a.per_device_eval_batch_size.max(1);
    let t0 = Instant::now();
    let loss = evaluate(&m.model, &ex.train, batch, ex, bos.as_ref())
        .ok_or_else(|| TrainError::Msg("eval_dataset: no examples to evaluate".into()))?;
    let runtime = t0.elapsed().as_secs_f64();
    let n = ex.train.len();
    let metrics = json!({
        "eval_loss": loss,
        "perplexity": loss.exp(),
        "eval_samples": n,
        "eval_tokens": label_tokens(&ex.train),
        "eval_runtime": runtime,
        "eval_samples_per_second": n as f64 / runtime.max(1e-9),
        "eval_steps_per_second": n.div_ceil(batch) as f64 / runtime.max(1e-9),
    });
    save_metrics(&out, "eval", &metrics)?;
    print_table("eval", &metrics);
    Ok(metrics)
}

pub fn output_dir(a: &TrainArgs) -> Result<PathBuf, TrainError> {
    let out = a
        .output_dir
        .clone()
        .ok_or_else(|| TrainError::arg("output_dir", "(none)", "a folder for the results"))?;
    std::fs::create_dir_all(&out).map_err(|e| TrainError::file(&out, e))?;
    Ok(out)
}

/// `<split>_results.json`, merged into `all_results.json` as HF's `save_metrics` does.
pub fn save_metrics(out: &Path, split: &str, metrics: &Value) -> Result<(), TrainError> {
    write_json(&out.join(format!("{split}_results.json")), metrics)?;
    let all_path = out.join("all_results.json");
    let mut all: Map<String, Value> = std::fs::read_to_string(&all_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Value::Object(m) = metrics {
        all.extend(m.clone());
    }
    write_json(&all_path, &Value::Object(all))
}

/// HF's `log_metrics` table on stdout.
pub fn print_table(split: &str, metrics: &Value) {
    println!("***** {split} metrics *****");
    if let Value::Object(m) = metrics {
        let width = m.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in m {
            let text = match v.as_f64() {
                Some(x) if v.is_f64() => format!("{x:.4}"),
                _ => v.to_string(),
            };
            println!("  {k:<width$} = {text:>10}");
        }
    }
}
