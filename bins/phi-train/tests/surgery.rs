//! `norm_surgery = "rmsnorm"` through phi-train on every LayerNorm (Phi-2-style) oracle case:
//! one norm-only step and one LoRA step train, the full save records the swap in config.json
//! and reloads with RMSNorms, and evaluation after training reads the run's own output.

mod common;

use common::{base_args, jsonl, run, scratch, tensors, with};
use phi_model::{Arch, ModelConfig};
use phi_testkit::oracle::{cases_where, Case};
use serde_json::Value;

fn layernorm_cases() -> Vec<Case> {
    cases_where("a LayerNorm model", |d| {
        ModelConfig::from_file(&d.join("config.json")).is_ok_and(|c| c.arch == Arch::Phi2)
    })
    .into_iter()
    .map(|d| Case::open(&d))
    .collect()
}

fn json(p: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn norm_only_step_saves_and_reloads_rmsnorms() {
    for case in layernorm_cases() {
        let tmp = scratch(&format!("surgery-norm-{}", case.name));
        let data = jsonl(&case, &tmp);
        let out = tmp.join("out");
        let d = data.display().to_string();
        let args = with(
            base_args(&case, &data, &out),
            &[
                "--finetuning_type",
                "freeze",
                "--rmsnorm_only_training",
                "--norm_surgery",
                "rmsnorm",
                "--max_steps",
                "1",
                "--do_eval",
                "--eval_dataset",
                &d,
                "--per_device_eval_batch_size",
                "2",
            ],
        );
        let (ok, err) = run(&args);
        assert!(ok, "{}: {err}", case.name);
        let cfg = json(&out.join("config.json"));
        assert_eq!(cfg["norm_surgery"], "rmsnorm", "{}", case.name);
        assert_eq!(cfg["rms_norm_eps"], 1e-8);
        let saved = tensors(&out.join("model.safetensors"));
        assert!(!saved.iter().any(|(n, _)| n.ends_with("layernorm.bias")));
        // Norm weights moved, nothing else did.
        let base = tensors(&case.dir.join("model.safetensors"));
        for (name, v) in &saved {
            let b = &base.iter().find(|(n, _)| n == name).unwrap().1;
            assert_eq!(
                name.contains("layernorm") && v != b,
                v != b,
                "{}: {name}",
                case.name
            );
        }
        let loaded = phi_model::load(&out.display().to_string(), &phi_model::cpu_device()).unwrap();
        let (kinds, last) = loaded.model.norm_kinds();
        assert!(kinds.iter().all(|k| *k == "rmsnorm") && last == "rmsnorm");
        let ev = json(&out.join("eval_results.json"));
        assert!(ev["eval_loss"].as_f64().unwrap().is_finite());
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

#[test]
fn lora_step_on_swapped_model_and_eval_reapplies_the_surgery() {
    for case in layernorm_cases() {
        let tmp = scratch(&format!("surgery-lora-{}", case.name));
        let data = jsonl(&case, &tmp);
        let out = tmp.join("out");
        let d = data.display().to_string();
        let (ok, err) = run(&with(
            base_args(&case, &data, &out),
            &[
                "--finetuning_type",
                "lora",
                "--norm_surgery",
                "rmsnorm",
                "--max_steps",
                "1",
                "--logging_steps",
                "1",
            ],
        ));
        assert!(ok, "{}: {err}", case.name);
        assert!(out.join("adapter_model.safetensors").exists());
        let log = common::log_lines(&out);
        let loss = log[0]["loss"].as_f64().unwrap();
        // Evaluating base + surgery (no adapter) on the batch gives the step's first loss.
        let ev = tmp.join("ev");
        let args: Vec<String> = [
            "--model_name_or_path",
            &case.dir.display().to_string(),
            "--do_train",
            "false",
            "--do_eval",
            "--norm_surgery",
            "rmsnorm",
            "--eval_dataset",
            &d,
            "--per_device_eval_batch_size",
            "2",
            "--output_dir",
            &ev.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (ok, err) = run(&args);
        assert!(ok, "{}: {err}", case.name);
        let e0 = json(&ev.join("eval_results.json"))["eval_loss"]
            .as_f64()
            .unwrap();
        // A fresh LoRA adds zero (B = 0), so the first step's loss is the swapped base's.
        assert!((e0 - loss).abs() < 1e-5, "{}: {e0} vs {loss}", case.name);
        let want = case.f32("loss").1[0] as f64;
        assert!(
            (e0 - want).abs() > 1e-4,
            "{}: surgery changed nothing",
            case.name
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

#[test]
fn surgery_on_an_rmsnorm_model_is_refused() {
    let dir = cases_where("an RMSNorm model", |d| {
        ModelConfig::from_file(&d.join("config.json")).is_ok_and(|c| c.arch != Arch::Phi2)
    })
    .remove(0);
    let case = Case::open(&dir);
    let tmp = scratch("surgery-bad");
    let data = jsonl(&case, &tmp);
    let (ok, err) = run(&with(
        base_args(&case, &data, &tmp.join("o")),
        &["--norm_surgery", "rmsnorm", "--max_steps", "1"],
    ));
    assert!(
        !ok && err.contains("norm_surgery") && err.lines().count() == 1,
        "{err}"
    );
    let (ok, err) = run(&with(
        base_args(&case, &data, &tmp.join("o2")),
        &["--norm_surgery", "bogus", "--max_steps", "1"],
    ));
    assert!(!ok && err.contains("none or rmsnorm"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}
