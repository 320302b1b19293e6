//! Helpers shared by phi-train's end-to-end tests: running the binary, scratch folders,
//! the oracle batch as pre-tokenized JSONL, and reading outputs back.
#![allow(dead_code)]

use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_testkit::oracle::{cases, Case};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn run(args: &[String]) -> (bool, String) {
    run_env(args, &[])
}

pub fn run_env(args: &[String], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi-train"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The oracle batch as pre-tokenized JSONL: each row cut to its attention mask.
pub fn jsonl(case: &Case, dir: &Path) -> PathBuf {
    let (shape, ids) = case.input("input_ids").unwrap();
    let t = shape[1];
    let mask = case
        .input("attention_mask")
        .map_or(vec![1; ids.len()], |m| m.1);
    let labels = case.input("labels").unwrap().1;
    let mut text = String::new();
    for r in 0..shape[0] {
        let k = mask[r * t..(r + 1) * t].iter().filter(|&&m| m != 0).count();
        let row = serde_json::json!({
            "input_ids": &ids[r * t..r * t + k],
            "labels": &labels[r * t..r * t + k],
        });
        text.push_str(&format!("{row}\n"));
    }
    let p = dir.join("batch.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

pub fn base_args(case: &Case, data: &Path, out: &Path) -> Vec<String> {
    let c = case.dir.display().to_string();
    [
        "--do_train",
        "--model_name_or_path",
        &c,
        "--dataset",
        &data.display().to_string(),
        "--learning_rate",
        "1e-2",
        "--weight_decay",
        "0.01",
        "--lr_scheduler_type",
        "constant",
        "--warmup_steps",
        "0",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_grad_norm",
        "0",
        "--disable_shuffling",
        "--output_dir",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn with(mut v: Vec<String>, more: &[&str]) -> Vec<String> {
    v.extend(more.iter().map(|s| s.to_string()));
    v
}

pub fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let src = SafetensorsSource::open_files(&[path.to_path_buf()]).unwrap();
    src.names()
        .into_iter()
        .map(|n| {
            let t = src.load(&n).unwrap();
            (n, t.data)
        })
        .collect()
}

pub fn log_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("trainer_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// One oracle case with a LoRA folder (the first found), for the property tests.
pub fn some_case() -> Case {
    let dir = cases()
        .into_iter()
        .find(|d| d.join("lora").exists())
        .expect("an oracle case with lora/");
    Case::open(&dir)
}
