//! phi-train's run outputs and options end to end, on the oracle cases: BOS scaling through
//! the CLI, evaluation on a validation split and the loss plots, continuing a finished run,
//! overwriting and checkpoint rotation, and LLaMA-Factory YAML configs.

mod common;

use common::*;
use phi_testkit::oracle::{cases, Case, Report};
use serde_json::Value;
use std::path::Path;

fn is_png(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 1000)
}

fn checkpoints(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    v.sort();
    v
}

#[test]
fn bos_scaling_loss_matches_the_oracle_through_the_cli() {
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        let tmp = scratch(&format!("bos-{}", case.name));
        let data = jsonl(&case, &tmp);
        for (factor, key) in [("0.1", "bos.loss"), ("0.0", "bos0.loss")] {
            if !case.has(key) {
                continue;
            }
            let out = tmp.join(key);
            let args = with(
                base_args(&case, &data, &out),
                &[
                    "--finetuning_type",
                    "freeze",
                    "--rmsnorm_only_training",
                    "--use_bos_zero_training",
                    "--bos_scaling_factor",
                    factor,
                    "--max_steps",
                    "1",
                ],
            );
            let (ok, err) = run(&args);
            assert!(ok, "{}: {err}", case.name);
            let loss = log_lines(&out)[0]["loss"].as_f64().unwrap() as f32;
            r.close(&case.name, key, &[loss], &case.f32(key).1, 1e-5);
            let cfg: Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("bos_zero_config.json")).unwrap(),
            )
            .unwrap();
            r.equal(
                &case.name,
                "bos_zero_config factor",
                &[cfg["bos_scaling_factor"].as_f64()],
                &[Some(factor.parse::<f64>().unwrap())],
            );
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r.finish();
}

#[test]
fn eval_split_logs_eval_loss_and_draws_plots() {
    // The same row twice, one held out: with learning rate 0 the step-1 training loss and
    // the eval loss are the loss of one and the same row on the base model.
    let case = some_case();
    let tmp = scratch("eval");
    let data = jsonl(&case, &tmp);
    let first = std::fs::read_to_string(&data).unwrap();
    let first = first.lines().next().unwrap();
    std::fs::write(&data, format!("{first}\n{first}\n")).unwrap();
    let out = tmp.join("steps");
    let common = with(
        base_args(&case, &data, &out),
        &[
            "--learning_rate",
            "0",
            "--per_device_train_batch_size",
            "1",
            "--val_size",
            "1",
            "--logging_steps",
            "1",
        ],
    );
    let args = with(common.clone(), &["--eval_steps", "1", "--max_steps", "2"]);
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    let lines = log_lines(&out);
    let train: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
    let eval: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["eval_loss"].as_f64())
        .collect();
    assert_eq!((train.len(), eval.len()), (2, 2), "{lines:?}");
    assert!((train[0] - eval[0]).abs() < 1e-5, "{train:?} vs {eval:?}");
    assert!(train[0] > 1.0, "{train:?}");
    assert!(is_png(&out.join("training_loss.png")));
    assert!(is_png(&out.join("training_eval_loss.png")));
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    assert!((results["eval_loss"].as_f64().unwrap() - eval[1]).abs() < 1e-12);

    // eval_strategy epoch: one evaluation per epoch (one step each here).
    let out = tmp.join("epoch");
    let args = with(
        base_args(&case, &data, &out),
        &[
            "--per_device_train_batch_size",
            "1",
            "--val_size",
            "1",
            "--eval_strategy",
            "epoch",
            "--num_train_epochs",
            "3",
        ],
    );
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    let evals = log_lines(&out)
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .count();
    assert_eq!(evals, 3);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_finished_run_continues_as_if_never_stopped() {
    // Train N steps (the last step is checkpointed), then continue to 2N: the adapter equals
    // a straight 2N-step run's, bit for bit. A constant schedule keeps the rates the same.
    let case = some_case();
    let tmp = scratch("continue");
    let data = jsonl(&case, &tmp);
    let run_to = |out: &Path, steps: &str, resume: bool| {
        let mut args = with(
            base_args(&case, &data, out),
            &[
                "--per_device_train_batch_size",
                "1",
                "--lora_dropout",
                "0.1",
                "--max_grad_norm",
                "1.0",
                "--save_steps",
                "100",
                "--max_steps",
                steps,
            ],
        );
        if resume {
            args = with(args, &["--resume_from_checkpoint", "latest"]);
        }
        let (ok, err) = run(&args);
        assert!(ok, "{err}");
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    };
    let straight = run_to(&tmp.join("straight"), "4", false);
    let split = tmp.join("split");
    let half = run_to(&split, "2", false);
    assert_eq!(checkpoints(&split), ["checkpoint-2"]);
    assert_ne!(half, straight);
    let continued = run_to(&split, "4", true);
    assert!(continued == straight, "continued run differs");
    assert_eq!(checkpoints(&split), ["checkpoint-2", "checkpoint-4"]);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn overwrite_starts_clean_and_rotation_keeps_the_newest() {
    let case = some_case();
    let tmp = scratch("overwrite");
    let data = jsonl(&case, &tmp);
    let out = tmp.join("out");
    let args = with(
        base_args(&case, &data, &out),
        &[
            "--max_steps",
            "3",
            "--save_steps",
            "1",
            "--save_total_limit",
            "2",
            "--logging_steps",
            "1",
        ],
    );
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    assert_eq!(checkpoints(&out), ["checkpoint-2", "checkpoint-3"]);
    std::fs::write(out.join("notes.txt"), "mine").unwrap();

    let again = with(
        base_args(&case, &data, &out),
        &["--max_steps", "1", "--overwrite_output_dir"],
    );
    let (ok, err) = run(&again);
    assert!(ok, "{err}");
    assert_eq!(checkpoints(&out), ["checkpoint-1"]);
    let steps: Vec<u64> = log_lines(&out)
        .iter()
        .map(|l| l["current_steps"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn llama_factory_yaml_configs_run() {
    // The shape of LF's examples/train_lora/*.yaml: numbers for layer counts, null for unset
    // keys, keys that change nothing here, and a typo that is reported with a suggestion.
    let case = some_case();
    let tmp = scratch("yaml");
    let data = jsonl(&case, &tmp);
    let out = tmp.join("out");
    let yaml = format!(
        "### model\nmodel_name_or_path: {}\ntrust_remote_code: true\n\n### method\nstage: sft\n\
         do_train: true\nfinetuning_type: freeze\nfreeze_trainable_layers: 1\n\
         freeze_trainable_modules: all\n\n### dataset\ndataset: {}\ncutoff_len: 2048\n\
         overwrite_cache: true\npreprocessing_num_workers: 16\n\n### output\noutput_dir: {}\n\
         logging_steps: 1\nsave_steps: 500\nplot_loss: true\noverwrite_output_dir: true\n\
         report_to: none\n\n### train\nper_device_train_batch_size: 2\n\
         gradient_accumulation_steps: 1\nlearning_rate: 1.0e-4\nmax_steps: 1\n\
         lr_scheduler_type: cosine\nwarmup_ratio: 0.1\nbf16: false\nresume_from_checkpoint: null\n\
         lora_rnak: 8\n",
        case.dir.display(),
        data.display(),
        out.display()
    );
    let cfg = tmp.join("llama3_freeze_sft.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let (ok, err) = run(&[cfg.display().to_string()]);
    assert!(ok, "{err}");
    assert!(
        err.contains("ignoring key lora_rnak (not used by phi-train; did you mean lora_rank?)"),
        "{err}"
    );
    assert!(!err.contains("report_to"), "{err}");
    let saved = std::fs::read_to_string(out.join("training_args.toml")).unwrap();
    let saved: toml::Table = toml::from_str(&saved).unwrap();
    assert_eq!(saved["freeze_trainable_layers"].as_str(), Some("1"));
    assert_eq!(saved["learning_rate"].as_float(), Some(1e-4));
    assert_eq!(saved["lr_scheduler_type"].as_str(), Some("cosine"));
    assert!(out.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}
