//! What a hostile run found, each reproduced: bad labels, two runs on one folder, learning
//! rates that blow the weights up, stale temp files, misleading messages, settings that
//! contradict a resumed checkpoint, and evaluation or prediction without training.

mod common;

use common::*;
use std::path::Path;

/// One pre-tokenized record per line, as given.
fn records(dir: &Path, name: &str, rows: &[serde_json::Value]) -> String {
    let p = dir.join(name);
    let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, text.join("\n") + "\n").unwrap();
    p.display().to_string()
}

fn one_line(err: &str) {
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_labels_are_refused_before_training_with_file_and_line() {
    let case = some_case();
    let vocab = case.f32("logits").0[2] as i64;
    let tmp = scratch("labels");
    let ok_row = serde_json::json!({"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]});
    for (what, bad, needle) in [
        (
            "label at the vocabulary size",
            serde_json::json!({"input_ids": [5, 6, 7], "labels": [-100, 6, vocab]}),
            format!(
                "label {vocab} at position 2: expected -100 (ignored) or a token id in 0..{vocab}"
            ),
        ),
        (
            "negative label other than -100",
            serde_json::json!({"input_ids": [5, 6, 7], "labels": [-100, -1, 7]}),
            "label -1 at position 1".to_string(),
        ),
        (
            "input id outside the vocabulary",
            serde_json::json!({"input_ids": [5, vocab + 3, 7]}),
            format!(
                "input id {} at position 1 is outside the model's vocabulary",
                vocab + 3
            ),
        ),
    ] {
        let data = records(&tmp, "bad.jsonl", &[ok_row.clone(), bad]);
        // Training: refused before the first step (no log line), naming file and line 2.
        let out = tmp.join("train");
        let mut args = base_args(&case, Path::new(&data), &out);
        args.extend(["--max_steps".into(), "1".into()]);
        let (ok, err) = run(&args);
        assert!(!ok, "{what}: {err}");
        one_line(&err);
        assert!(
            err.contains(&format!("{data}: line 2")) && err.contains(&needle),
            "{what}: {err}"
        );
        assert!(!out.join("trainer_log.jsonl").exists(), "{what}");
        // Evaluation alone: the same message.
        let (ok, err) = run(&[
            "--model_name_or_path".into(),
            case.dir.display().to_string(),
            "--do_eval".into(),
            "--eval_dataset".into(),
            data.clone(),
            "--output_dir".into(),
            tmp.join("eval").display().to_string(),
        ]);
        assert!(
            !ok && err.contains(&needle) && err.contains("line 2"),
            "{what}: {err}"
        );
        one_line(&err);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_second_run_on_a_locked_output_folder_is_refused() {
    let case = some_case();
    let tmp = scratch("lock");
    let data = jsonl(&case, &tmp);
    let out = tmp.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Another run holds the folder: its lock, taken as phi-train takes it.
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(out.join(".phi-train.lock"))
        .unwrap();
    held.try_lock().unwrap();
    let mut args = base_args(&case, &data, &out);
    args.extend([
        "--max_steps".into(),
        "1".into(),
        "--overwrite_output_dir".into(),
    ]);
    let (ok, err) = run(&args);
    assert!(
        !ok && err.contains("another phi-train run") && err.contains("is using this output folder"),
        "{err}"
    );
    one_line(&err);
    assert!(!out.join("trainer_log.jsonl").exists());
    // Released: the same command runs, and the lock file does not make the folder "not empty".
    drop(held);
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    let (ok, err) = run(&args[..args.len() - 1]);
    assert!(!ok && err.contains("exists and is not empty"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn learning_rates_that_break_the_weights_save_nothing() {
    let case = some_case();
    let tmp = scratch("lr");
    let data = jsonl(&case, &tmp);
    let go = |name: &str, more: &[&str]| {
        let out = tmp.join(name);
        let mut args = base_args(&case, &data, &out);
        args.extend(more.iter().map(|s| s.to_string()));
        let (ok, err) = run(&args);
        (ok, err, out)
    };
    // Not a finite f32: refused before anything runs.
    for (lr, needle) in [
        ("1e39", "learning_rate = 1e39: expected a finite f32 >= 0"),
        ("inf", "learning_rate: expected a finite number"),
        ("-1", "learning_rate = -1: expected a finite f32 >= 0"),
    ] {
        let flag = format!("--learning_rate={lr}");
        let (ok, err, out) = go(&format!("lr{lr}"), &[&flag, "--max_steps", "1"]);
        assert!(!ok && err.contains(needle), "{lr}: {err}");
        one_line(&err);
        assert!(!out.join("adapter_model.safetensors").exists());
    }
    // A finite loss, then an update that overflows (lr·weight_decay = inf in f32): stopped
    // before any save, no adapter and no checkpoint of those weights.
    let (ok, err, out) = go(
        "overflow",
        &[
            "--learning_rate",
            "3e38",
            "--weight_decay",
            "2",
            "--max_steps",
            "2",
            "--save_steps",
            "1",
        ],
    );
    assert!(!ok, "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("step 1: the update") && last.contains("left NaN or infinite values in"),
        "{err}"
    );
    assert!(last.contains("no good checkpoint was written"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(!out.join("checkpoint-1").exists());
    // Finite but huge weights whose next loss is not finite: the checkpoint holding them is
    // named as the one that gave the loss, not as the last good one.
    let (ok, err, out) = go(
        "huge",
        &[
            "--learning_rate",
            "1e33",
            "--optim",
            "sgd",
            "--max_steps",
            "5",
            "--save_steps",
            "1",
        ],
    );
    assert!(!ok, "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("step 2: loss is")
            && last.contains("no good checkpoint was written")
            && last.contains("checkpoint-1 holds the weights that gave it"),
        "{err}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
    // Nothing written is lost: the named checkpoint stays for inspection.
    assert!(out.join("checkpoint-1/adapter_model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn stale_temp_files_are_removed_and_messages_point_the_right_way() {
    let case = some_case();
    let tmp = scratch("stale");
    let data = jsonl(&case, &tmp);
    let out = tmp.join("out");
    // What a run killed before its first checkpoint leaves: a log, half a checkpoint, temps.
    std::fs::create_dir_all(out.join(".checkpoint-1.tmp4242")).unwrap();
    std::fs::write(out.join(".checkpoint-1.tmp4242/big"), vec![0u8; 4096]).unwrap();
    std::fs::write(out.join(".trainer_state.json.tmp4242"), "{").unwrap();
    std::fs::write(out.join("trainer_log.jsonl"), "{\"current_steps\": 1}\n").unwrap();
    std::fs::write(out.join("notes.tmp"), "mine").unwrap();
    let mut args = base_args(&case, &data, &out);
    args.extend(["--max_steps".into(), "1".into()]);
    let (ok, err) = run(&args);
    assert!(!ok, "{err}");
    assert!(
        err.contains("exists and is not empty; holds no checkpoint to resume from"),
        "{err}"
    );
    assert!(!err.contains("resume_from_checkpoint latest"), "{err}");
    one_line(&err);
    args.push("--overwrite_output_dir".into());
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains(".tmp4242")),
        "stale temps left: {names:?}"
    );
    assert!(names.contains(&"notes.tmp".to_string()), "{names:?}");
    // Now a checkpoint exists, and the message offers to resume from it.
    let (ok, err) = run(&args[..args.len() - 1]);
    assert!(
        !ok && err.contains("--resume_from_checkpoint latest"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn paths_that_do_not_exist_are_named_as_such() {
    let case = some_case();
    let tmp = scratch("paths");
    let data = jsonl(&case, &tmp);
    let out = tmp.join("out");
    // A dataset file that is not there.
    let missing = tmp.join("nope.jsonl").display().to_string();
    let mut args = base_args(&case, Path::new(&missing), &out);
    args.extend(["--max_steps".into(), "1".into()]);
    let (ok, err) = run(&args);
    assert!(
        !ok && err.contains(&missing) && err.contains("no such file"),
        "{err}"
    );
    one_line(&err);
    // A model path that is not there: not tried as a hub id unless it has owner/name form,
    // and then the message says both.
    for (spec, needle) in [
        (
            "no-such-model-dir",
            "no such file or folder (and not a hub id",
        ),
        (
            "models/no-such-model",
            "no such file or folder; as a Hugging Face hub id",
        ),
    ] {
        let mut args = base_args(&case, &data, &out);
        let i = args
            .iter()
            .position(|a| a == "--model_name_or_path")
            .unwrap();
        args[i + 1] = spec.into();
        let (ok, err) = run_env(&args, &[("HF_HUB_OFFLINE", "1")]);
        assert!(!ok && err.contains(needle), "{spec}: {err}");
        one_line(&err);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_wrapped_error_prints_once() {
    let case = some_case();
    let tmp = scratch("once");
    let data = jsonl(&case, &tmp);
    let model = tmp.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        case.dir.join("model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(model.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    let mut args = base_args(&case, &data, &tmp.join("out"));
    let i = args
        .iter()
        .position(|a| a == "--model_name_or_path")
        .unwrap();
    args[i + 1] = model.display().to_string();
    let (ok, err) = run(&args);
    assert!(!ok, "{err}");
    one_line(&err);
    let file = model.join("config.json").display().to_string();
    assert_eq!(err.matches(&file).count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn resuming_with_contradicting_settings_is_refused() {
    let case = some_case();
    let tmp = scratch("resume-contra");
    let data = jsonl(&case, &tmp);
    let out = tmp.join("out");
    let first = with(
        base_args(&case, &data, &out),
        &["--max_steps", "1", "--lora_rank", "4"],
    );
    let (ok, err) = run(&first);
    assert!(ok, "{err}");
    for (flags, needle) in [
        (
            &["--lora_rank", "8"][..],
            "lora_rank is 8 here but 4 in the checkpoint",
        ),
        (
            &["--lora_rank", "4", "--use_rslora"][..],
            "use_rslora is true here",
        ),
        (
            &["--lora_rank", "4", "--lora_target", "q_proj"][..],
            "lora_target",
        ),
    ] {
        let mut args = with(
            base_args(&case, &data, &out),
            &["--max_steps", "2", "--resume_from_checkpoint", "latest"],
        );
        args.extend(flags.iter().map(|s| s.to_string()));
        let (ok, err) = run(&args);
        assert!(!ok && err.contains(needle), "{flags:?}: {err}");
        one_line(&err);
    }
    let again = with(
        base_args(&case, &data, &out),
        &[
            "--max_steps",
            "2",
            "--resume_from_checkpoint",
            "latest",
            "--lora_rank",
            "4",
        ],
    );
    let (ok, err) = run(&again);
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn evaluation_and_prediction_need_no_training_flags() {
    let case = some_case();
    let tmp = scratch("no-train");
    let data = jsonl(&case, &tmp);
    // As LF: do_train defaults to false, so --do_eval alone evaluates; no --dataset needed.
    let out = tmp.join("eval");
    let (ok, err) = run(&[
        "--model_name_or_path".into(),
        case.dir.display().to_string(),
        "--do_eval".into(),
        "--eval_dataset".into(),
        data.display().to_string(),
        "--per_device_eval_batch_size".into(),
        "2".into(),
        "--output_dir".into(),
        out.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap();
    let got = res["eval_loss"].as_f64().unwrap() as f32;
    let want = case.f32("loss").1[0];
    assert!((got - want).abs() <= 1e-5, "{got} vs {want}");
    assert!(!out.join("trainer_log.jsonl").exists());
    // Nothing asked: one line that says how to train.
    let (ok, err) = run(&[
        "--model_name_or_path".into(),
        case.dir.display().to_string(),
        "--dataset".into(),
        data.display().to_string(),
        "--output_dir".into(),
        tmp.join("none").display().to_string(),
    ]);
    assert!(!ok && err.contains("pass --do_train"), "{err}");
    one_line(&err);
    let _ = std::fs::remove_dir_all(&tmp);
}
