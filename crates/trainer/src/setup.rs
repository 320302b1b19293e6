//! From settings to a model ready to train: base weights, adapter (new, continued or resumed),
//! which parameters train, and the regularizers checked against the architecture.

use crate::args::{FinetuningType, NormSurgery, QuantizationType, TrainArgs};
use crate::error::TrainError;
use phi_adapters::freeze::{self, Counts, LayerSel, Selection};
use phi_adapters::{lora, peft, LoraConfig, Targets};
use phi_model::quantize::QuantSpec;
use phi_model::CausalLm;
use phi_regularizers::{BosScale, NormTarget};
use std::path::Path;

fn list(s: &Option<String>) -> Vec<String> {
    s.as_deref()
        .unwrap_or("")
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

pub fn lora_config(a: &TrainArgs) -> LoraConfig {
    LoraConfig {
        r: a.lora_rank,
        alpha: a.lora_alpha.unwrap_or(2.0 * a.lora_rank as f64),
        dropout: a.lora_dropout,
        targets: Targets::parse(&a.lora_target),
        use_rslora: a.use_rslora,
        modules_to_save: list(&a.additional_target),
        base_model_name_or_path: a.model_name_or_path.clone(),
        seed: a.seed,
        ..LoraConfig::default()
    }
}

/// What decides which weights train.
pub fn selection(a: &TrainArgs) -> Result<Selection, TrainError> {
    if a.rmsnorm_only_training {
        if a.finetuning_type == FinetuningType::Lora {
            return Err(TrainError::arg(
                "rmsnorm_only_training",
                "true",
                "finetuning_type freeze or full (norm-only training trains no adapter)",
            ));
        }
        return Ok(Selection::NormOnly);
    }
    Ok(match a.finetuning_type {
        FinetuningType::Full => Selection::Full,
        FinetuningType::Lora => Selection::Lora {
            modules_to_save: list(&a.additional_target),
        },
        FinetuningType::Freeze => Selection::Freeze {
            layers: LayerSel::parse(&a.freeze_trainable_layers)?,
            modules: list(&Some(a.freeze_trainable_modules.clone())),
            extra: list(&a.freeze_extra_modules),
        },
    })
}

pub struct Prepared {
    pub model: CausalLm,
    pub lora: Option<LoraConfig>,
    pub trainable: Vec<String>,
    pub counts: Counts,
}

/// Attaches or loads the adapter and sets the trainable set. `adapter_dir` is a checkpoint
/// being resumed or `adapter_name_or_path`.
pub fn prepare(
    model: CausalLm,
    a: &TrainArgs,
    adapter_dir: Option<&Path>,
) -> Result<Prepared, TrainError> {
    let (mut model, lora) = match (a.finetuning_type, adapter_dir) {
        (FinetuningType::Lora, Some(d)) => {
            let (m, mut cfg, _) = peft::load(model, d)?;
            // The run's dropout applies to a continued adapter (PEFT keeps the file's).
            cfg.dropout = a.lora_dropout;
            (m, Some(cfg))
        }
        (FinetuningType::Lora, None) => {
            let cfg = lora_config(a);
            let mut m = model;
            lora::attach(&mut m, &cfg)?;
            (m, Some(cfg))
        }
        (_, Some(d)) if a.adapter_name_or_path.is_some() => return Err(TrainError::arg(
            "adapter_name_or_path",
            d.display(),
            "finetuning_type lora (merge the adapter with phi-merge to train it further in full)",
        )),
        (_, _) => (model, None),
    };
    if let Some(cfg) = &lora {
        set_dropout(&mut model, cfg.dropout);
    }
    let sel = selection(a)?;
    let trainable = freeze::trainable_names(&model, &sel)?;
    if trainable.is_empty() {
        return Err(TrainError::Msg(
            "nothing to train: the chosen finetuning_type / freeze settings select no parameter"
                .into(),
        ));
    }
    let counts = Counts::of(&model, &trainable);
    let model = freeze::apply(model, &trainable);
    if let Some(name) = model.trainable_quantized().first() {
        return Err(TrainError::Msg(format!(
            "{name} is held quantized and cannot train: a quantized base trains LoRA adapters \
             or norms only (finetuning_type lora, or rmsnorm_only_training)"
        )));
    }
    Ok(Prepared {
        model,
        lora,
        trainable,
        counts,
    })
}

fn set_dropout(model: &mut CausalLm, p: f64) {
    for path in lora::adapted(model) {
        if let Some(l) = model.linear_mut(&path).and_then(|l| l.lora.as_mut()) {
            l.dropout = burn::nn::DropoutConfig::new(p).init();
        }
    }
}

/// The regularizers the settings ask for, checked against the model.
pub fn regularizers(
    a: &TrainArgs,
    cfg: &phi_model::ModelConfig,
) -> Result<(Option<NormTarget>, Option<BosScale>), TrainError> {
    let reg = if a.use_rmsnorm_regularization {
        let r = NormTarget {
            layers: NormTarget::parse_layers(&a.rmsnorm_reg_layers)?,
            weight: a.rmsnorm_reg_weight,
            target: a.rmsnorm_reg_target_norm,
            include_padding: a.rmsnorm_reg_include_padding,
        };
        r.check(cfg)?;
        Some(r)
    } else {
        None
    };
    let bos = if a.use_bos_zero_training {
        Some(BosScale::new(a.bos_scaling_factor)?)
    } else {
        None
    };
    Ok((reg, bos))
}

/// On resume the checkpoint decides the adapter (or the trainable set); settings that would
/// build a different one contradict it and are refused, rather than silently ignored.
pub fn check_resume(
    a: &TrainArgs,
    ck: &Path,
    model: &CausalLm,
    lora: Option<&LoraConfig>,
    trainable: &[String],
) -> Result<(), TrainError> {
    let refuse = |key: &str, ours: String, theirs: String| {
        TrainError::Msg(format!(
            "resume_from_checkpoint {}: {key} is {ours} here but {theirs} in the checkpoint; resume with the checkpoint's settings",
            ck.display()
        ))
    };
    match lora {
        // An adapter continued from adapter_name_or_path keeps its own shape in both runs.
        Some(_) if a.adapter_name_or_path.is_some() => Ok(()),
        Some(cfg) => {
            let want = lora_config(a);
            if want.r != cfg.r {
                return Err(refuse("lora_rank", want.r.to_string(), cfg.r.to_string()));
            }
            if want.alpha != cfg.alpha {
                return Err(refuse(
                    "lora_alpha",
                    want.alpha.to_string(),
                    cfg.alpha.to_string(),
                ));
            }
            if want.use_rslora != cfg.use_rslora {
                return Err(refuse(
                    "use_rslora",
                    want.use_rslora.to_string(),
                    cfg.use_rslora.to_string(),
                ));
            }
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            let (mine, theirs) = (
                sorted(phi_adapters::targets::resolve(model, &want)?),
                sorted(lora::adapted(model)),
            );
            if mine != theirs {
                return Err(refuse(
                    "lora_target",
                    format!("{:?}", phi_adapters::targets::leaf_names(&mine)),
                    format!("{:?}", phi_adapters::targets::leaf_names(&theirs)),
                ));
            }
            let (m1, m2) = (
                sorted(want.modules_to_save.clone()),
                sorted(cfg.modules_to_save.clone()),
            );
            if m1 != m2 {
                return Err(refuse(
                    "additional_target",
                    format!("{m1:?}"),
                    format!("{m2:?}"),
                ));
            }
            Ok(())
        }
        None => {
            let file = ck.join(crate::checkpoint::TRAINABLE_FILE);
            let src = phi_model::weights::SafetensorsSource::open_files(&[file])?;
            let mut saved = phi_model::weights::TensorSource::names(&src);
            saved.sort();
            let mut mine = trainable.to_vec();
            mine.sort();
            if saved != mine {
                return Err(refuse(
                    "the trainable set (finetuning_type / freeze settings)",
                    format!("{} tensors", mine.len()),
                    format!("{} different ones", saved.len()),
                ));
            }
            Ok(())
        }
    }
}

/// `norm_surgery` applied to a freshly loaded model (see phi_model::surgery).
pub fn apply_surgery(model: CausalLm, a: &TrainArgs) -> Result<CausalLm, TrainError> {
    match a.norm_surgery {
        NormSurgery::None => Ok(model),
        NormSurgery::Rmsnorm => {
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
    }
}

/// Settings checked before anything is loaded or written.
pub fn check_args(a: &TrainArgs) -> Result<(), TrainError> {
    for (k, v) in [
        ("per_device_train_batch_size", a.per_device_train_batch_size),
        ("gradient_accumulation_steps", a.gradient_accumulation_steps),
        ("logging_steps", a.logging_steps),
        ("save_steps", a.save_steps),
    ] {
        if v == 0 {
            return Err(TrainError::arg(k, 0, "a positive integer"));
        }
    }
    a.check_numbers()?;
    if a.bf16 && a.fp16 {
        return Err(TrainError::arg(
            "fp16",
            true,
            "at most one of bf16 and fp16",
        ));
    }
    if a.layerwise() && a.use_rmsnorm_regularization {
        return Err(TrainError::arg(
            "checkpoint_layers",
            true,
            "false with use_rmsnorm_regularization (the regularizer reads every layer's taps)",
        ));
    }
    if let Some(bits) = a.quantization_bit {
        load_options(a)?;
        if a.finetuning_type == FinetuningType::Full {
            return Err(TrainError::arg(
                "quantization_bit",
                bits,
                "no quantization with finetuning_type full (a quantized base trains LoRA \
                 adapters or norms, as LLaMA-Factory's)",
            ));
        }
    }
    Ok(())
}

/// How the base is held: quantized at load under `quantization_bit`; a GGUF base's blocks
/// kept unless its linear weights may train (full or freeze tuning), which needs them in f32.
pub fn load_options(a: &TrainArgs) -> Result<phi_model::LoadOptions, TrainError> {
    let quantize = match a.quantization_bit {
        None => None,
        Some(bits) => {
            let kind = match a.quantization_type {
                QuantizationType::Nf4 => "nf4",
                QuantizationType::Fp4 => "fp4",
            };
            let spec =
                QuantSpec::from_lf(bits, kind, a.double_quantization).map_err(TrainError::Msg)?;
            Some(spec)
        }
    };
    let lora = a.finetuning_type == FinetuningType::Lora;
    let widen = quantize.is_none() && !lora && !a.rmsnorm_only_training;
    // Under --bf16 a base none of whose linears train is packed as it loads (a seed-size
    // model is never held in f32); modules_to_save keep their f32 masters.
    let frozen = (lora && a.additional_target.is_none()) || a.rmsnorm_only_training;
    let pack = crate::step::cpu_bf16(a).filter(|_| frozen && !widen);
    Ok(phi_model::LoadOptions {
        quantize,
        widen,
        pack,
    })
}
