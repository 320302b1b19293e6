//! `phi-train --preview_data` end to end: LF's data folder and identity recipe give
//! LLaMA-Factory's own ids and labels; bad input is one line naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi-train"))
        .current_dir(repo())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// phi-train with SmolLM2's tokenizer and template, plus `args`.
fn smol(args: &[&str]) -> (bool, String, String) {
    let mut all = vec![
        "--tokenizer",
        "assets/tokenizers/smollm2",
        "--template",
        "smollm2",
    ];
    all.extend_from_slice(args);
    train(&all)
}

#[test]
fn preview_json_equals_llama_factory_rows() {
    let (ok, out, err) = smol(&[
        "--preview_data",
        "12",
        "--json",
        "--dataset",
        "identity",
        "--dataset_dir",
        "data",
        "--max_samples",
        "12",
        "--identity_name",
        "Phi-Tune",
        "--identity_author",
        "the phi-tune team",
    ]);
    assert!(ok, "{err}");
    let want: Vec<serde_json::Value> = std::fs::read_to_string(
        repo().join("tests/fixtures/oracle-data/smollm2__smollm2__sft.jsonl"),
    )
    .unwrap()
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .filter(|r: &serde_json::Value| r["dataset"] == "identity")
    .collect();
    let got: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 12);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            (&g["input_ids"], &g["labels"]),
            (&w["input_ids"], &w["labels"]),
            "identity #{}",
            w["index"]
        );
    }
    // The text form shows what LF prints: ids, decoded inputs, label ids, decoded labels.
    let (ok, out, _) = smol(&["--preview_data", "1", "--dataset", "identity"]);
    assert!(ok);
    for head in [
        "input_ids:\n[",
        "inputs:\n<|im_start|>system\n",
        "label_ids:\n[-100,",
        "labels:\nHello! I am {{name}}",
    ] {
        assert!(out.contains(head), "missing {head:?} in\n{out}");
    }
}

#[test]
fn bad_dataset_is_one_line_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("phi-train-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\":\"q\",\"output\":\"a\"}\n{\"instruction\":\"q\"}\n",
    )
    .unwrap();
    let (ok, _, err) = smol(&["--preview_data", "1", "--dataset", bad.to_str().unwrap()]);
    assert!(
        !ok && err.lines().count() == 1
            && err.contains("bad.jsonl: line 2: missing field \"output\""),
        "{err}"
    );
    let (ok, _, err) = train(&[
        "--preview_data",
        "1",
        "--tokenizer",
        "assets/tokenizers/smollm2",
        "--template",
        "nope",
        "--dataset",
        "identity",
    ]);
    assert!(!ok && err.contains("unknown template \"nope\""), "{err}");
    // Skipped records are reported once and the rest still encodes.
    let (ok, out, err) = smol(&[
        "--preview_data",
        "5",
        "--json",
        "--dataset",
        bad.to_str().unwrap(),
        "--skip_bad_records",
    ]);
    assert!(
        ok && out.lines().count() == 1 && err.contains("skipped 1 bad record"),
        "{err}"
    );
}
