//! The training recipe, read top to bottom as torchtune's single-device recipe: `setup`
//! (device, model, adapter, data, optimizer, schedule, resume), `train_step` for each
//! optimizer step (micro-batches → loss normalised over the label tokens of the whole
//! accumulated batch, plus regularizers → gradients → clipping → update at the scheduled
//! rate; then logs, evaluation, samples and checkpoints on their steps), and `finish`
//! (the adapter or weights as PEFT / transformers read them, trainer state, results).

use crate::args::{EvalStrategy, FinetuningType, NormSurgery, TrainArgs};
use crate::checkpoint::{self, write_json, Snapshot};
use crate::data::{self, Examples, Plan};
use crate::error::TrainError;
use crate::log::{Logger, Window};
use crate::optim::{self, Grads, Kind, LossScaler, Optimizer};
use crate::outputs::{check_output_dir, last_good, trainer_state, write_run_files};
use crate::samples::Sampler;
use crate::schedule::Schedule;
use crate::setup::{self, Prepared};
use crate::step::{self, Regs};
use burn::tensor::{DType, Device};
use phi_adapters::LoraConfig;
use phi_data::Batch;
use phi_model::export::{source_config, write_model_folder, OutDtype};
use phi_model::CausalLm;
use serde_json::{json, Map};
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

/// Runs the whole job described by `a`.
pub fn train(a: &TrainArgs) -> Result<Outcome, TrainError> {
    setup::check_args(a)?;
    let spec = a.model_spec()?;
    let (out, _lock) = check_output_dir(a)?;
    let result = Run::setup(a, &spec, &out).and_then(|mut run| {
        for step in run.start..run.total {
            run = run.train_step(step)?;
        }
        run.finish()
    });
    // A failed save leaves its temp folder behind; a later run would find it too, but the
    // disk it fills is needed now.
    let _ = checkpoint::clear_temps(&out);
    result
}

/// Everything one run holds from setup to finish.
struct Run<'a> {
    a: &'a TrainArgs,
    out: PathBuf,
    device: Device,
    model: CausalLm,
    lora: Option<LoraConfig>,
    trainable: Vec<String>,
    /// Where the base came from: its config.json (or GGUF metadata) and the files beside it
    /// are what a full fine-tune's export carries.
    base_dir: Option<PathBuf>,
    base_gguf: Option<PathBuf>,
    files_dir: Option<PathBuf>,
    regs: Regs,
    ex: Examples,
    plan: Plan,
    total: usize,
    start: usize,
    warmup: usize,
    sched: Schedule,
    opt: Optimizer,
    scaler: Option<LossScaler>,
    eval_every: Option<usize>,
    sampler: Option<Sampler>,
    log: Logger,
    window: Window,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    eval_loss: Option<f64>,
    tokens: usize,
    // Dropped last: autocast stays on for the run's forwards.
    _autocast: phi_model::precision::Autocast,
}

impl<'a> Run<'a> {
    fn setup(a: &'a TrainArgs, spec: &str, out: &Path) -> Result<Self, TrainError> {
        let out = out.to_path_buf();
        let mut device: Device = phi_model::device_from_name(&a.device)?.autodiff();
        // Per-layer checkpointing keeps no activations to recompute op by op.
        if a.checkpointing() && !a.layerwise() {
            device = device.gradient_checkpointing();
        }
        let resume = match &a.resume_from_checkpoint {
            Some(s) => Some(checkpoint::resolve(s, &out)?),
            None => None,
        };
        let compute = step::mixed_precision(a, &device);
        let autocast = phi_model::precision::autocast(compute);
        let scaler = (compute == Some(DType::F16)).then(LossScaler::default);

        // Model, regularizers and data.
        let loaded = phi_model::load_with(spec, &device, setup::load_options(a)?)?;
        if let Some(line) = loaded.model.quant_summary().line() {
            eprintln!("{line}");
        }
        let eos = loaded.eos_token_ids();
        let cfg = loaded.config.clone();
        let files_dir = loaded.files_dir();
        let (norm, bos) = setup::regularizers(a, &cfg)?;
        let regs = Regs { norm, bos };
        let tok_path = data::tokenizer_path(a, files_dir.as_deref());
        let ex = data::load(
            &data::DataArgs::of(a),
            tok_path.as_deref(),
            cfg.pad_id(),
            cfg.vocab_size,
        )?;

        // Adapter (new, continued or resumed) and the trainable set.
        let adapter_dir: Option<PathBuf> = match (&resume, a.finetuning_type) {
            (Some(ck), FinetuningType::Lora) => Some(ck.clone()),
            _ => a.adapter_name_or_path.as_ref().map(PathBuf::from),
        };
        let (base_dir, base_gguf) = (loaded.dir.clone(), loaded.gguf.clone());
        let Prepared {
            mut model,
            lora,
            trainable,
            counts,
        } = setup::prepare(
            setup::apply_surgery(loaded.model, a)?,
            a,
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
        if let Some(path) = step::cpu_bf16(a) {
            let n = model.pack_bf16(path);
            let t = match model.bf16_trainable() {
                0 => String::new(),
                t => format!(", {t} trainable ones rounded per call from their f32 masters"),
            };
            let held = match model.quant_summary().weights {
                0 => "held in bf16".to_string(),
                q => format!(
                    "{} held in bf16, {q} in their quantized blocks (decoded per product)",
                    n.saturating_sub(q)
                ),
            };
            eprintln!(
                "bf16: {n} frozen weights, {held}{t}, run on the CPU's {} kernels; trainable parameters stay f32",
                path.name()
            );
        }

        // Steps, schedule and optimizer (state restored on resume).
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
        let sched = Schedule::new(a.lr_scheduler_type, warmup, total);
        let kind = Kind::new(a.optim, a.adam_beta1, a.adam_beta2, a.adam_epsilon);
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
        let log = Logger::new(&out, total, start, history)?;
        // HF: eval_steps defaults to logging_steps; a val split with eval_steps set turns
        // step evaluation on even when eval_strategy was left at "no" (LF's recipes rely on it).
        let eval_every = match (a.eval_strategy, a.eval_steps) {
            (_, _) if ex.val.is_empty() => None,
            (EvalStrategy::Epoch, _) => Some(plan.steps_per_epoch.max(1)),
            (EvalStrategy::No, None) => None,
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
        let sampler = Sampler::new(a, &ex, &eos, cfg.vocab_size, regs.bos_factor(), &out, start)?;
        Ok(Run {
            a,
            out,
            device,
            model,
            lora,
            trainable,
            base_dir,
            base_gguf,
            files_dir,
            regs,
            ex,
            plan,
            total,
            start,
            warmup,
            sched,
            opt,
            scaler,
            eval_every,
            sampler,
            log,
            window: Window::default(),
            first_loss: None,
            last_loss: None,
            eval_loss: None,
            tokens: 0,
            _autocast: autocast,
        })
    }

    /// Optimizer step `step` (0-based), then what falls due after it. Takes the run by value:
    /// the optimizer consumes the model and returns the updated one.
    fn train_step(mut self, step: usize) -> Result<Self, TrainError> {
        let a = self.a;
        self.device.seed(a.seed.wrapping_add(step as u64));
        let lr = a.learning_rate * self.sched.factor(step);
        let batches: Vec<Batch> = self
            .plan
            .step(step)
            .iter()
            .map(|ix| data::collate(&self.ex.train, ix, &self.ex.collator))
            .collect();
        let denom = batches.iter().map(step::label_count).sum::<usize>().max(1) as f64;
        let parts = batches.len() as f64;
        let mut grads = Grads::new();
        let (mut sum, mut reg) = (0.0, 0.0);
        for b in &batches {
            self.tokens += b.attention_mask.iter().filter(|&&m| m != 0).count();
            let ls = self.scaler.as_ref().map_or(1.0, |s| s.scale);
            let layerwise = self.a.layerwise();
            let (g, s, r) =
                step::micro_step(&self.model, b, &self.regs, (denom, parts, ls), layerwise);
            optim::accumulate(&mut grads, g);
            sum += s;
            reg += r;
        }
        let base = sum / denom;
        let loss = base + reg;
        if let Some(sc) = &self.scaler {
            optim::unscale(&mut grads, sc.scale);
        }
        let grad_norm = self.opt.clip(&grads, a.max_grad_norm);
        let mut skip = false;
        if let Some(sc) = &mut self.scaler {
            if loss.is_finite() && !sc.update(grad_norm.is_finite()) {
                // GradScaler: an fp16 overflow skips the update and halves the scale.
                self.log.say(&format!(
                    "step {}: fp16 gradient overflow, update skipped, loss scale now {}",
                    step + 1,
                    sc.scale
                ));
                skip = true;
            }
        }
        if !loss.is_finite() || !(grad_norm.is_finite() || skip) {
            self.log.finish();
            return Err(TrainError::Msg(format!(
                "step {}: loss is {loss} (base {base}, regularizer {reg}), gradient norm {grad_norm}; stopped, nothing written for this step; {}",
                step + 1,
                last_good(&self.out, step)
            )));
        }
        if !skip {
            self.model = self.opt.step(self.model, grads, lr);
            if let Some(name) = self.opt.non_finite.take() {
                self.log.finish();
                return Err(TrainError::Msg(format!(
                    "step {}: the update (learning rate {lr:e}) left NaN or infinite values in {name}; stopped, nothing written for this step; {}",
                    step + 1,
                    last_good(&self.out, step + 1)
                )));
            }
        }
        let done = step + 1;
        self.first_loss.get_or_insert(loss);
        self.last_loss = Some(loss);
        self.window.add(loss, base, reg, grad_norm);
        self.log.tick(done, loss);
        let epoch = self.plan.epoch_after(step);
        if done.is_multiple_of(a.logging_steps) || done == self.total {
            let mut v = self.window.take(self.regs.norm.is_some());
            // HF logs the rate this step's update used (read before the scheduler steps):
            // 0 at step 1 with one warm-up step.
            v.insert("lr".into(), json!(lr));
            self.log.log(done, epoch, v)?;
        }
        if self
            .eval_every
            .is_some_and(|n| done.is_multiple_of(n) || done == self.total)
        {
            self.eval_loss = step::evaluate(
                &self.model,
                &self.ex.val,
                a.per_device_eval_batch_size,
                &self.ex,
                &self.regs,
            );
            if let Some(e) = self.eval_loss {
                let v = Map::from_iter([("eval_loss".to_string(), json!(e))]);
                self.log.log(done, epoch, v)?;
            }
        }
        if let Some(s) = &self.sampler {
            s.maybe_run(&self.model, done, &self.ex)?;
        }
        // HF saves at the last step too, so a finished run can be continued further.
        if done.is_multiple_of(a.save_steps) || done == self.total {
            self.save_checkpoint(done)?;
        }
        Ok(self)
    }

    fn save_checkpoint(&self, done: usize) -> Result<(), TrainError> {
        let a = self.a;
        let snap = Snapshot {
            model: &self.model,
            lora: self.lora.as_ref(),
            trainable: &self.trainable,
            optimizer: &self.opt,
            scheduler: json!({"lr_scheduler_type": a.lr_scheduler_type, "last_step": done, "warmup_steps": self.warmup, "total_steps": self.total, "base_lr": a.learning_rate}),
            rng: json!({"seed": a.seed, "next_step_seed": a.seed.wrapping_add(done as u64)}),
            trainer_state: trainer_state(a, &self.plan, done, self.total, &self.log),
        };
        let p = checkpoint::save(&self.out, done, &snap)?;
        checkpoint::rotate(&self.out, a.save_total_limit)?;
        self.log.say(&format!("saved {}", p.display()));
        Ok(())
    }

    /// The adapter (PEFT) or the weights (transformers) in the output folder, the final
    /// trainer state, results and plots.
    fn finish(self) -> Result<Outcome, TrainError> {
        let (a, out, total) = (self.a, &self.out, self.total);
        self.log.finish();
        match &self.lora {
            Some(cfg) => phi_adapters::peft::save(&self.model, cfg, out)?,
            None => {
                let mut config =
                    source_config(self.base_dir.as_deref(), self.base_gguf.as_deref())?;
                if a.norm_surgery == NormSurgery::Rmsnorm {
                    phi_model::surgery::record_in_config(&mut config, a.norm_surgery_eps);
                }
                write_model_folder(
                    out,
                    &self.model.hf_tensors(),
                    config,
                    OutDtype::F32,
                    5 << 30,
                    self.files_dir.as_deref(),
                )?;
            }
        }
        let runtime = self.log.elapsed();
        write_json(
            &out.join(checkpoint::STATE_FILE),
            &trainer_state(a, &self.plan, total, total, &self.log),
        )?;
        let n_steps = total.saturating_sub(self.start).max(1) as f64;
        let losses: Vec<f64> = self.log.series("loss").into_iter().map(|x| x.1).collect();
        let mean_loss = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        let peak = phi_model::alloc::peak_rss_mb();
        let results = json!({
            "epoch": self.plan.epoch_after(total - 1),
            "train_loss": mean_loss,
            "train_runtime": runtime,
            "train_steps_per_second": n_steps / runtime.max(1e-9),
            "train_tokens_per_second": self.tokens as f64 / runtime.max(1e-9),
            "eval_loss": self.eval_loss,
            "peak_rss_mb": peak,
        });
        write_json(&out.join("train_results.json"), &results)?;
        write_json(&out.join("all_results.json"), &results)?;
        if a.plot_loss {
            crate::plot::plot_losses(out, &self.log)?;
        }
        eprintln!(
            "done: {} steps in {} ({:.0} tokens/s, peak memory {}), loss {} → {}; outputs in {}",
            total - self.start,
            crate::log::hms(runtime),
            self.tokens as f64 / runtime.max(1e-9),
            peak.map_or("unknown".into(), |m| format!("{m:.0} MB")),
            self.first_loss.map_or("-".into(), |x| format!("{x:.4}")),
            self.last_loss.map_or("-".into(), |x| format!("{x:.4}")),
            out.display()
        );
        Ok(Outcome {
            output_dir: self.out.clone(),
            global_step: total,
            first_loss: self.first_loss,
            last_loss: self.last_loss,
            eval_loss: self.eval_loss,
            train_runtime: runtime,
            tokens: self.tokens,
        })
    }
}
