//! `--do_eval` and `--do_predict`: the model (base, base + adapter, or what the run just
//! trained) on `eval_dataset`, encoded exactly as training data is. Eval loss is HF's: the
//! mean over every label token of the set; perplexity is its exponential.

use crate::args::{FinetuningType, TrainArgs};
use crate::data::{self, DataArgs, Examples};
use crate::error::TrainError;
use crate::outputs::{output_dir, print_table, save_metrics};
use crate::step::{evaluate, Regs};
use phi_data::encode::Encoded;
use phi_model::{CausalLm, ModelConfig};
use phi_regularizers::BosScale;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

/// A model ready for inference, with what encoding and generation need from its folder.
pub struct EvalModel {
    pub model: CausalLm,
    pub config: ModelConfig,
    pub eos: Vec<u32>,
    pub model_dir: Option<PathBuf>,
    /// The run's input edits (BOS scaling), applied by evaluation and prediction alike.
    pub regs: Regs,
}

/// After training: the run's own output (the adapter on the base, or the saved full weights,
/// whose config.json records any norm surgery). Otherwise the base, surgery, adapter.
pub fn load_model(a: &TrainArgs, trained: bool) -> Result<EvalModel, TrainError> {
    let spec = a.model_spec()?;
    let out = a.output_dir.clone();
    let lora = a.finetuning_type == FinetuningType::Lora;
    // A full / freeze run saved its own config.json (surgery recorded there); otherwise the
    // base is loaded and the surgery applied again.
    let saved_full = trained && !lora;
    let spec = match (&out, saved_full) {
        (Some(o), true) => o.display().to_string(),
        _ => spec,
    };
    let device = phi_model::device_from_name(&a.device)?;
    let opts = match saved_full {
        // A saved full / freeze run is f32 safetensors already.
        true => phi_model::LoadOptions::default(),
        false => crate::setup::load_options(a)?,
    };
    let loaded = phi_model::load_with(&spec, &device, opts)?;
    let eos = loaded.eos_token_ids();
    let model_dir = loaded.files_dir();
    let mut model = loaded.model;
    if !saved_full {
        model = crate::setup::apply_surgery(model, a)?;
    }
    let adapter = match (&out, trained && lora) {
        (Some(o), true) => Some(o.clone()),
        _ => a.adapter_name_or_path.as_ref().map(PathBuf::from),
    };
    if let Some(d) = adapter {
        model = phi_adapters::peft::load(model, &d)?.0;
    }
    let bos = if a.use_bos_zero_training {
        Some(BosScale::new(a.bos_scaling_factor)?)
    } else {
        None
    };
    Ok(EvalModel {
        model,
        config: loaded.config,
        eos,
        model_dir,
        regs: Regs { norm: None, bos },
    })
}

/// The evaluation examples: `eval_dataset`; else, when training, the run's validation split;
/// else `dataset` (an evaluation-only run names its data either way).
pub fn load_examples(a: &TrainArgs, m: &EvalModel) -> Result<Examples, TrainError> {
    let tok = data::tokenizer_path(a, m.model_dir.as_deref());
    let pad = m.config.pad_id();
    let mut d = DataArgs::of(a);
    d.packing = false;
    let use_val = a.eval_dataset.is_empty() && a.do_train;
    if !a.eval_dataset.is_empty() {
        d.dataset = a.eval_dataset.clone();
        d.val_size = 0.0;
    } else if !use_val {
        d.val_size = 0.0;
    }
    if d.dataset.is_empty() {
        return Err(TrainError::arg(
            "eval_dataset",
            "(none)",
            "registry names or .json/.jsonl paths to evaluate on",
        ));
    }
    let mut ex = data::load(&d, tok.as_deref(), pad, m.config.vocab_size)?;
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
    let batch = a.per_device_eval_batch_size.max(1);
    let t0 = Instant::now();
    let loss = evaluate(&m.model, &ex.train, batch, ex, &m.regs)
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
