//! The training loop: micro-batches → loss (normalised over the label tokens of the whole
//! accumulated batch, as HF's `num_items_in_batch`) plus regularizers → gradients →
//! clipping → optimizer step at the scheduled rate; logs, evaluation and checkpoints on
//! their steps; final adapter or weights written as PEFT / transformers read them.

use crate::args::TrainArgs;
use crate::checkpoint::{self, write_json, Snapshot};
use crate::data::{self, Examples, Plan};
use crate::error::TrainError;
use crate::log::Logger;
use crate::optim::{self, Grads, Kind, LossScaler, Optimizer};
use crate::schedule::Schedule;
use crate::setup::{self, Method, Prepared};
use burn::module::Module;
use burn::tensor::{DType, Device};
use phi_data::encode::Encoded;
use phi_data::Batch;
use phi_model::export::{source_config, write_model_folder, OutDtype};
use phi_model::loss::causal_lm_loss_sum;
use phi_model::{CausalLm, TapRequest};
use phi_regularizers::{BosScale, NormTarget};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub output_dir: PathBuf,
    pub global_step: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub train_runtime: f64,
    pub tokens: usize,
}

struct Regs {
    norm: Option<NormTarget>,
    bos: Option<BosScale>,
}

/// One micro-batch's forward and backward. Returns its gradients, its summed token loss
/// and its regularizer value.
fn micro_step(
    model: &CausalLm,
    b: &Batch,
    regs: &Regs,
    denom: f64,
    parts: f64,
    loss_scale: f64,
) -> (Grads, f64, f64) {
    let inp = crate::inputs(b);
    let mut emb = model.embed(&inp);
    if let Some(bos) = &regs.bos {
        emb = bos.apply(emb, inp.position_ids.as_deref());
    }
    let req = regs.norm.as_ref().map(NormTarget::taps).unwrap_or_default();
    let out = model.forward_embeds(emb, &inp, &req, None);
    let (sum, _) = causal_lm_loss_sum(out.logits, &b.labels);
    let sum_val = scalar(&sum);
    let mut loss = sum / denom;
    let mut reg_val = 0.0;
    if let Some(norm) = &regs.norm {
        let r = norm.loss(&out.taps, Some(&b.attention_mask)) / parts;
        reg_val = scalar(&r);
        loss = loss + r;
    }
    if loss_scale != 1.0 {
        loss = loss * loss_scale;
    }
    let grads = loss.backward();
    (optim::collect(model, &grads), sum_val, reg_val)
}

/// The autocast dtype for `--bf16` / `--fp16`, or None (f32) where the device has no
/// kernels for it (with a warning).
fn mixed_precision(a: &TrainArgs, device: &Device) -> Option<DType> {
    let (dtype, name) = match (a.bf16, a.fp16) {
        (true, _) => (DType::BF16, "bf16"),
        (_, true) => (DType::F16, "fp16"),
        _ => return None,
    };
    if !device.supports_dtype(dtype) {
        eprintln!(
            "warning: {name}: device {} has no {name} kernels; training in f32",
            a.device
        );
        return None;
    }
    // Flex has half kernels, but its bf16/f16 GEMMs are slower than its f32 one and the
    // casts cost memory (docs/benchmarks.md), so a CPU run stays in f32 unless asked.
    if a.device == "cpu" && std::env::var("PHI_CPU_HALF").map_or(true, |v| v != "1") {
        eprintln!(
            "warning: {name} on the CPU backend is slower than f32 (Flex's {name} GEMM runs at \
             0.4-0.8x its f32 rate here); training in f32. PHI_CPU_HALF=1 runs {name} anyway"
        );
        return None;
    }
    Some(dtype)
}

fn scalar(t: &burn::tensor::Tensor<1>) -> f64 {
    t.clone().inner().into_scalar::<f32>() as f64
}

/// Mean token loss over `examples` with dropout off and no graph.
pub fn evaluate(
    model: &CausalLm,
    examples: &[Encoded],
    batch: usize,
    ex: &Examples,
    regs_bos: Option<&BosScale>,
) -> Option<f64> {
    if examples.is_empty() {
        return None;
    }
    let m = model.valid();
    let (mut sum, mut count) = (0.0, 0usize);
    let idx: Vec<usize> = (0..examples.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let b = data::collate(examples, chunk, &ex.collator);
        let inp = crate::inputs(&b);
        let mut emb = m.embed(&inp);
        if let Some(bos) = regs_bos {
            emb = bos.apply(emb, inp.position_ids.as_deref());
        }
        let logits = m
            .forward_embeds(emb, &inp, &TapRequest::none(), None)
            .logits;
        let (s, c) = causal_lm_loss_sum(logits, &b.labels);
        sum += scalar(&s);
        count += c;
    }
    Some(sum / count.max(1) as f64)
}

/// The output folder, locked for this run: a second run on the same folder is refused
/// before it touches anything (two runs would delete each other's checkpoints and mix their
/// logs). The lock lives as long as the returned file.
fn check_output_dir(a: &TrainArgs) -> Result<(PathBuf, std::fs::File), TrainError> {
    let out = a
        .output_dir
        .clone()
        .ok_or_else(|| TrainError::arg("output_dir", "(none)", "a folder for the run's outputs"))?;
    let lock = checkpoint::lock(&out)?;
    let non_empty = std::fs::read_dir(&out)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name() != checkpoint::LOCK_FILE)
        })
        .unwrap_or(false);
    if non_empty && !a.overwrite_output_dir && a.resume_from_checkpoint.is_none() {
        // Resuming is only offered where there is something to resume from (a run killed
        // before its first checkpoint leaves none).
        let how = if checkpoint::list(&out).is_empty() {
            "holds no checkpoint to resume from; pass --overwrite_output_dir true or choose another output_dir"
        } else {
            "pass --overwrite_output_dir true, or --resume_from_checkpoint latest to continue"
        };
        return Err(TrainError::file(
            &out,
            format!("exists and is not empty; {how}"),
        ));
    }
    checkpoint::clear_temps(&out)?;
    if non_empty && a.resume_from_checkpoint.is_none() {
        clear_previous_run(&out)?;
    }
    Ok((out, lock))
}

/// An overwritten run starts clean: an old run's checkpoints would otherwise outlive
/// save_total_limit's rotation or be taken by `--resume_from_checkpoint latest`. Only what
/// phi-train writes is removed; other files in the folder stay.
fn clear_previous_run(out: &Path) -> Result<(), TrainError> {
    let stale = checkpoint::list(out).into_iter().map(|(_, p)| p).chain(
        [
            "trainer_log.jsonl",
            "training_loss.png",
            "training_eval_loss.png",
            "rmsnorm_reg_config.json",
            phi_regularizers::bos::CONFIG_FILE,
            crate::samples::FILE,
        ]
        .iter()
        .map(|f| out.join(f)),
    );
    for p in stale.filter(|p| p.exists()) {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| {
            TrainError::file(&p, format!("cannot remove the previous run's output: {e}"))
        })?;
    }
    Ok(())
}

fn check_args(a: &TrainArgs) -> Result<(), TrainError> {
    if !matches!(a.stage.as_str(), "sft" | "pt") {
        return Err(TrainError::arg("stage", &a.stage, "sft or pt"));
    }
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
    if !matches!(a.eval_strategy.as_str(), "no" | "steps" | "epoch") {
        return Err(TrainError::arg(
            "eval_strategy",
            &a.eval_strategy,
            "no, steps or epoch",
        ));
    }
    Ok(())
}

/// Runs the whole job described by `a`.
pub fn train(a: &TrainArgs) -> Result<Outcome, TrainError> {
    check_args(a)?;
    let method = Method::parse(&a.finetuning_type)?;
    let spec = a.model_spec()?;
    let (out, _lock) = check_output_dir(a)?;
    let result = train_in(a, method, spec, &out);
    // A failed save leaves its temp folder behind; a later run would find it too, but the
    // disk it fills is needed now.
    let _ = checkpoint::clear_temps(&out);
    result
}

fn train_in(
    a: &TrainArgs,
    method: Method,
    spec: String,
    out: &Path,
) -> Result<Outcome, TrainError> {
    let out = out.to_path_buf();
    let mut device: Device = phi_model::device_from_name(&a.device)?.autodiff();
    if a.checkpointing() {
        device = device.gradient_checkpointing();
    }
    let resume = match &a.resume_from_checkpoint {
        Some(s) => Some(checkpoint::resolve(s, &out)?),
        None => None,
    };

    let compute = mixed_precision(a, &device);
    let _autocast = phi_model::precision::autocast(compute);
    let mut scaler = (compute == Some(DType::F16)).then(LossScaler::default);
    let loaded = phi_model::load(&spec, &device)?;
    let eos = loaded.eos_token_ids();
    let cfg = loaded.config.clone();
    let model_dir = loaded.files_dir();
    let (norm, bos) = setup::regularizers(a, &cfg)?;
    let regs = Regs { norm, bos };

    let tok_path = data::tokenizer_path(a, model_dir.as_deref());
    let fallback_pad = cfg
        .pad_token_id
        .or(cfg.eos_token_ids.first().copied())
        .unwrap_or(0);
    let ex = data::load(a, tok_path.as_deref(), fallback_pad, cfg.vocab_size)?;

    let adapter_dir: Option<PathBuf> = match (&resume, method) {
        (Some(ck), Method::Lora) => Some(ck.clone()),
        _ => a.adapter_name_or_path.as_ref().map(PathBuf::from),
    };
    let Prepared {
        mut model,
        lora,
        trainable,
        counts,
    } = setup::prepare(
        crate::eval::apply_surgery(loaded.model, a)?,
        a,
        method,
        adapter_dir.as_deref(),
    )?;
    if let Some(ck) = &resume {
        setup::check_resume(a, ck, &model, lora.as_ref(), &trainable)?;
    }
    if let (Some(ck), None) = (&resume, &lora) {
        // Loading replaces the tensors, so gradients are switched on again afterwards.
        let m = checkpoint::load_trainable(model, &ck.join(checkpoint::TRAINABLE_FILE))?;
        model = phi_adapters::freeze::apply(m, &trainable);
    }
    eprintln!("{counts}");

    let plan = Plan::new(
        ex.train.len(),
        a.per_device_train_batch_size,
        a.gradient_accumulation_steps,
        a.seed,
        !a.disable_shuffling,
    );
    let total = if a.max_steps > 0 {
        a.max_steps as usize
    } else {
        ((a.num_train_epochs * plan.steps_per_epoch as f64).ceil() as usize).max(1)
    };
    let warmup = Schedule::warmup_steps(a.warmup_steps, a.warmup_ratio, total);
    let sched = Schedule::new(&a.lr_scheduler_type, warmup, total)?;
    let kind = Kind::parse(&a.optim, a.adam_beta1, a.adam_beta2, a.adam_epsilon)?;
    let mut opt = Optimizer::new(&model, kind, a.weight_decay);

    let (mut start, mut history) = (0usize, Vec::new());
    if let Some(ck) = &resume {
        opt.load(&ck.join("optimizer.safetensors"), &device.clone().inner())?;
        let st = checkpoint::read_json(&ck.join(checkpoint::STATE_FILE))?;
        start = st["global_step"].as_u64().unwrap_or(0) as usize;
        history = st["log_history"].as_array().cloned().unwrap_or_default();
        eprintln!("resuming from {} at step {start}", ck.display());
    }

    write_run_files(a, &out, &regs)?;
    let mut log = Logger::new(&out, total, start, history)?;
    // HF: eval_steps defaults to logging_steps; a val split with eval_steps set turns
    // step evaluation on even when eval_strategy was left at "no" (LF's recipes rely on it).
    let eval_every = match (a.eval_strategy.as_str(), a.eval_steps) {
        (_, _) if ex.val.is_empty() => None,
        ("epoch", _) => Some(plan.steps_per_epoch.max(1)),
        ("no", None) => None,
        (_, Some(n)) => Some(n.max(1)),
        (_, None) => Some(a.logging_steps),
    };
    eprintln!(
        "{} train / {} validation examples; {} steps ({} per epoch), batch {} × accumulation {}",
        ex.train.len(),
        ex.val.len(),
        total,
        plan.steps_per_epoch,
        a.per_device_train_batch_size,
        a.gradient_accumulation_steps
    );

    let sampler = crate::samples::Sampler::new(a, &ex, &eos, cfg.vocab_size, &out, start)?;
    let mut window = Window::default();
    let (mut first_loss, mut last_loss, mut eval_loss) = (None, None, None);
    let mut tokens = 0usize;
    for step in start..total {
        device.seed(a.seed.wrapping_add(step as u64));
        let lr = a.learning_rate * sched.factor(step);
        let batches: Vec<Batch> = plan
            .step(step)
            .iter()
            .map(|ix| data::collate(&ex.train, ix, &ex.collator))
            .collect();
        let denom = batches.iter().map(label_count).sum::<usize>().max(1) as f64;
        let parts = batches.len() as f64;
        let mut grads = Grads::new();
        let (mut sum, mut reg) = (0.0, 0.0);
        for b in &batches {
            tokens += b.attention_mask.iter().filter(|&&m| m != 0).count();
            let ls = scaler.as_ref().map_or(1.0, |s| s.scale);
            let (g, s, r) = micro_step(&model, b, &regs, denom, parts, ls);
            optim::accumulate(&mut grads, g);
            sum += s;
            reg += r;
        }
        let base = sum / denom;
        let loss = base + reg;
        if let Some(sc) = &scaler {
            optim::unscale(&mut grads, sc.scale);
        }
        let grad_norm = opt.clip(&mut grads, a.max_grad_norm);
        let mut skip = false;
        if let Some(sc) = &mut scaler {
            if loss.is_finite() && !sc.update(grad_norm.is_finite()) {
                // GradScaler: an fp16 overflow skips the update and halves the scale.
                log.say(&format!(
                    "step {}: fp16 gradient overflow, update skipped, loss scale now {}",
                    step + 1,
                    sc.scale
                ));
                skip = true;
            }
        }
        if !loss.is_finite() || !(grad_norm.is_finite() || skip) {
            log.finish();
            return Err(TrainError::Msg(format!(
                "step {}: loss is {loss} (base {base}, regularizer {reg}), gradient norm {grad_norm}; stopped, nothing written for this step; {}",
                step + 1,
                last_good(&out, step)
            )));
        }
        if !skip {
            model = opt.step(model, grads, lr);
            if let Some(name) = opt.non_finite.take() {
                log.finish();
                return Err(TrainError::Msg(format!(
                    "step {}: the update (learning rate {lr:e}) left NaN or infinite values in {name}; stopped, nothing written for this step; {}",
                    step + 1,
                    last_good(&out, step + 1)
                )));
            }
        }
        let done = step + 1;
        first_loss.get_or_insert(loss);
        last_loss = Some(loss);
        window.add(loss, base, reg, grad_norm);
        log.tick(done, loss);

        if done % a.logging_steps == 0 || done == total {
            let mut v = window.take(regs.norm.is_some());
            // HF logs the rate this step's update used (read before the scheduler steps):
            // 0 at step 1 with one warm-up step.
            v.insert("lr".into(), json!(lr));
            log.log(done, plan.epoch_after(step), v)?;
        }
        if eval_every.is_some_and(|n| done % n == 0) || (eval_every.is_some() && done == total) {
            eval_loss = evaluate(
                &model,
                &ex.val,
                a.per_device_eval_batch_size,
                &ex,
                regs.bos.as_ref(),
            );
            if let Some(e) = eval_loss {
                let mut v = Map::new();
                v.insert("eval_loss".into(), json!(e));
                log.log(done, plan.epoch_after(step), v)?;
            }
        }
        if let Some(s) = &sampler {
            s.maybe_run(&model, done, &ex)?;
        }
        // HF saves at the last step too, so a finished run can be continued further.
        if done % a.save_steps == 0 || done == total {
            let st = trainer_state(a, &plan, done, total, &log);
            let snap = Snapshot {
                model: &model,
                lora: lora.as_ref(),
                trainable: &trainable,
                optimizer: &opt,
                scheduler: json!({"lr_scheduler_type": a.lr_scheduler_type, "last_step": done, "warmup_steps": warmup, "total_steps": total, "base_lr": a.learning_rate}),
                rng: json!({"seed": a.seed, "next_step_seed": a.seed.wrapping_add(done as u64)}),
                trainer_state: st,
            };
            let p = checkpoint::save(&out, done, &snap)?;
            checkpoint::rotate(&out, a.save_total_limit)?;
            log.say(&format!("saved {}", p.display()));
        }
    }
    log.finish();

    // Final outputs.
    match &lora {
        Some(cfg) => phi_adapters::peft::save(&model, cfg, &out)?,
        None => {
            let mut config = source_config(loaded.dir.as_deref(), loaded.gguf.as_deref())?;
            if a.norm_surgery == "rmsnorm" {
                phi_model::surgery::record_in_config(&mut config, a.norm_surgery_eps);
            }
            write_model_folder(
                &out,
                &model.hf_tensors(),
                config,
                OutDtype::F32,
                5 << 30,
                model_dir.as_deref(),
            )?;
        }
    }
    let runtime = log.elapsed();
    write_json(
        &out.join(checkpoint::STATE_FILE),
        &trainer_state(a, &plan, total, total, &log),
    )?;
    let n_steps = total.saturating_sub(start).max(1) as f64;
    let mean_loss = {
        let losses: Vec<f64> = log.series("loss").into_iter().map(|x| x.1).collect();
        losses.iter().sum::<f64>() / losses.len().max(1) as f64
    };
    let results = json!({
        "epoch": plan.epoch_after(total - 1),
        "train_loss": mean_loss,
        "train_runtime": runtime,
        "train_steps_per_second": n_steps / runtime.max(1e-9),
        "train_tokens_per_second": tokens as f64 / runtime.max(1e-9),
        "eval_loss": eval_loss,
        "peak_rss_mb": peak_rss_mb(),
    });
    write_json(&out.join("train_results.json"), &results)?;
    write_json(&out.join("all_results.json"), &results)?;
    if a.plot_loss {
        crate::plot::plot_losses(&out, &log)?;
    }
    eprintln!(
        "done: {} steps in {} ({:.0} tokens/s, peak memory {}), loss {} → {}; outputs in {}",
        total - start,
        crate::log::hms(runtime),
        tokens as f64 / runtime.max(1e-9),
        peak_rss_mb().map_or("unknown".into(), |m| format!("{m:.0} MB")),
        first_loss.map_or("-".into(), |x| format!("{x:.4}")),
        last_loss.map_or("-".into(), |x| format!("{x:.4}")),
        out.display()
    );
    Ok(Outcome {
        output_dir: out,
        global_step: total,
        first_loss,
        last_loss,
        eval_loss,
        train_runtime: runtime,
        tokens,
    })
}

/// Which checkpoint to go back to when the weights after `bad` optimizer steps are unusable
/// (they gave a non-finite loss, or hold non-finite values): the newest one saved before
/// that step, never the one holding those weights.
fn last_good(out: &Path, bad: usize) -> String {
    let all = checkpoint::list(out);
    let holds_bad = all
        .iter()
        .find(|(s, _)| *s == bad)
        .map_or(String::new(), |(_, p)| {
            format!(" ({} holds the weights that gave it)", p.display())
        });
    match all.into_iter().rev().find(|(s, _)| *s < bad) {
        Some((_, p)) => format!("the last good checkpoint is {}{holds_bad}", p.display()),
        None => format!("no good checkpoint was written{holds_bad}"),
    }
}

/// The process's peak resident memory (Linux VmHWM), for the run summary.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn label_count(b: &Batch) -> usize {
    // Labels are shifted inside the loss: position 0 of each row never counts.
    (0..b.batch)
        .map(|r| {
            b.labels[r * b.seq + 1..(r + 1) * b.seq]
                .iter()
                .filter(|&&l| l != phi_model::loss::IGNORE_INDEX)
                .count()
        })
        .sum()
}

/// Losses since the last logging step (HF logs their mean).
#[derive(Default)]
struct Window {
    n: usize,
    loss: f64,
    base: f64,
    reg: f64,
    grad_norm: f64,
}

impl Window {
    fn add(&mut self, loss: f64, base: f64, reg: f64, grad_norm: f64) {
        self.n += 1;
        self.loss += loss;
        self.base += base;
        self.reg += reg;
        self.grad_norm = grad_norm;
    }
    fn take(&mut self, with_reg: bool) -> Map<String, Value> {
        let n = self.n.max(1) as f64;
        let mut m = Map::new();
        m.insert("loss".into(), json!(self.loss / n));
        if with_reg {
            m.insert("base_loss".into(), json!(self.base / n));
            m.insert("rmsnorm_reg_loss".into(), json!(self.reg / n));
            m.insert("total_loss".into(), json!(self.loss / n));
        }
        m.insert("grad_norm".into(), json!(self.grad_norm));
        *self = Window::default();
        m
    }
}

fn trainer_state(a: &TrainArgs, plan: &Plan, step: usize, total: usize, log: &Logger) -> Value {
    json!({
        "global_step": step,
        "epoch": if step == 0 { 0.0 } else { plan.epoch_after(step - 1) },
        "max_steps": total,
        "num_train_epochs": (total as f64 / plan.steps_per_epoch as f64).ceil(),
        "logging_steps": a.logging_steps,
        "save_steps": a.save_steps,
        "eval_steps": a.eval_steps,
        "train_batch_size": a.per_device_train_batch_size,
        "best_metric": null,
        "best_model_checkpoint": null,
        "is_local_process_zero": true,
        "is_world_process_zero": true,
        "log_history": log.history,
    })
}

/// The run's config as TOML and the recipe files, written before the first step.
fn write_run_files(a: &TrainArgs, out: &Path, regs: &Regs) -> Result<(), TrainError> {
    phi_model::io::write_atomic(&out.join("training_args.toml"), a.to_toml().as_bytes())?;
    if let Some(r) = &regs.norm {
        write_json(
            &out.join("rmsnorm_reg_config.json"),
            &json!({
                "use_rmsnorm_regularization": true,
                "rmsnorm_reg_layers": r.layers,
                "rmsnorm_reg_weight": r.weight,
                "rmsnorm_reg_target_norm": r.target,
                "rmsnorm_reg_include_padding": r.include_padding,
                "statistic": "per-token L2 norm of post_attention_layernorm output over the hidden dim; MSE to the target, mean over layers, times the weight",
            }),
        )?;
    }
    if let Some(b) = &regs.bos {
        write_json(
            &out.join(phi_regularizers::bos::CONFIG_FILE),
            &b.config_json(),
        )?;
    }
    Ok(())
}
