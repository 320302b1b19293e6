//! What a run writes besides checkpoints: its output folder (locked, checked, cleared of an
//! earlier run), the run files written before the first step, HF's trainer state, results
//! and metrics files with HF's table, and which checkpoint to go back to after a failure.

use crate::args::TrainArgs;
use crate::checkpoint::{self, write_json};
use crate::data::Plan;
use crate::error::TrainError;
use crate::log::Logger;
use crate::step::Regs;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The output folder, locked for this run: a second run on the same folder is refused
/// before it touches anything (two runs would delete each other's checkpoints and mix their
/// logs). The lock lives as long as the returned file.
pub fn check_output_dir(a: &TrainArgs) -> Result<(PathBuf, std::fs::File), TrainError> {
    let out = a
        .output_dir
        .clone()
        .ok_or_else(|| TrainError::arg("output_dir", "(none)", "a folder for the run's outputs"))?;
    let lock = checkpoint::lock(&out)?;
    let non_empty =
        phi_model::io::holds_other_than(&out, &[checkpoint::LOCK_FILE]).unwrap_or(false);
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

/// Which checkpoint to go back to when the weights after `bad` optimizer steps are unusable
/// (they gave a non-finite loss, or hold non-finite values): the newest one saved before
/// that step, never the one holding those weights.
pub fn last_good(out: &Path, bad: usize) -> String {
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

pub fn trainer_state(a: &TrainArgs, plan: &Plan, step: usize, total: usize, log: &Logger) -> Value {
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
pub fn write_run_files(a: &TrainArgs, out: &Path, regs: &Regs) -> Result<(), TrainError> {
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
