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

/// LF's reference rows: tests/fixtures/oracle-data, or a folder of the same layout named by
/// `PHI_ORACLE_DATA_DIR`.
fn oracle_dir() -> PathBuf {
    match std::env::var("PHI_ORACLE_DATA_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo().join("tests/fixtures/oracle-data"),
    }
}

/// The phi-train flags that reproduce an oracle file's setting.
fn setting_flags(setting: &str) -> Result<Vec<String>, String> {
    match setting {
        "sft" => Ok(vec![]),
        "train_on_prompt" | "mask_history" => Ok(vec![format!("--{setting}")]),
        s => match s.strip_prefix("cutoff").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(vec!["--cutoff_len".into(), n.to_string()]),
            _ => Err(format!(
                "unknown setting {s:?} (known: sft, train_on_prompt, mask_history, cutoff<N>)"
            )),
        },
    }
}

/// LF's phi row as phi-tune encodes it: without the `▁` `\n` (29871, 13) LF leaves after each
/// `<|end|>` (32007); docs/data.md, "One deliberate difference".
fn drop_lf_newlines(ids: &[i64], labels: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let (mut i2, mut l2) = (Vec::new(), Vec::new());
    let mut k = 0;
    while k < ids.len() {
        i2.push(ids[k]);
        l2.push(labels[k]);
        if ids[k] == 32007 && ids[k + 1..].starts_with(&[29871, 13]) {
            k += 2;
        }
        k += 1;
    }
    (i2, l2)
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Every `<template>__<tokenizer>__<setting>.jsonl` of the oracle folder: its identity and
/// alpaca_en_demo rows are the first records of LF's own data/ files, so `--preview_data`
/// over data/ with the same flags must print them. (Its sharegpt rows are picked records with
/// system turns added, which no registry entry reproduces.)
#[test]
fn preview_json_equals_llama_factory_rows() {
    let dir = oracle_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "jsonl")
                && p.file_stem().unwrap().to_string_lossy().split("__").count() == 3
        })
        .collect();
    files.sort();
    let (mut compared, mut used_files, mut phi_cut) = (0, 0, 0);
    for f in &files {
        let name = f.display();
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let parts: Vec<&str> = stem.split("__").collect();
        let (template, tok, setting) = (parts[0], parts[1], parts[2]);
        let flags = setting_flags(setting).unwrap_or_else(|e| panic!("{name}: {e}"));
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|r: &serde_json::Value| {
                r["dataset"] == "identity" || r["dataset"] == "alpaca_en_demo"
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mut datasets: Vec<&str> = Vec::new();
        for r in &rows {
            let d = r["dataset"].as_str().unwrap();
            if !datasets.contains(&d) {
                datasets.push(d);
            }
        }
        let per = 1 + rows
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .max()
            .unwrap() as usize;
        let (per_s, total) = (per.to_string(), (per * datasets.len()).to_string());
        let joined = datasets.join(",");
        let tok_dir = format!("assets/tokenizers/{tok}");
        let mut args = vec![
            "--preview_data",
            &total,
            "--json",
            "--tokenizer",
            &tok_dir,
            "--template",
            template,
            "--dataset",
            &joined,
            "--dataset_dir",
            "data",
            "--max_samples",
            &per_s,
            "--identity_name",
            "Phi-Tune",
            "--identity_author",
            "the phi-tune team",
        ];
        args.extend(flags.iter().map(String::as_str));
        let (ok, out, err) = train(&args);
        assert!(ok, "{name}: {err}");
        let got: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), per * datasets.len(), "{name}");
        let cutoff = match flags.as_slice() {
            [k, n] if k == "--cutoff_len" => n.parse().unwrap(),
            _ => 2048,
        };
        for r in &rows {
            let d = r["dataset"].as_str().unwrap();
            let at = datasets.iter().position(|&x| x == d).unwrap() * per
                + r["index"].as_u64().unwrap() as usize;
            let (mut ids, mut labels) = (ints(&r["input_ids"]), ints(&r["labels"]));
            if template == "phi" {
                if ids.len() >= cutoff {
                    // LF's budget counted the two ids we drop; lf_oracle.rs derives these rows.
                    phi_cut += 1;
                    continue;
                }
                (ids, labels) = drop_lf_newlines(&ids, &labels);
            }
            assert_eq!(
                (ints(&got[at]["input_ids"]), ints(&got[at]["labels"])),
                (ids, labels),
                "{name}: {d} #{}",
                r["index"]
            );
            compared += 1;
        }
        used_files += 1;
    }
    assert!(
        used_files > 0 && compared > 0,
        "no identity / alpaca_en_demo rows in {}",
        dir.display()
    );
    eprintln!("{compared} rows of {used_files} files equal LF's ({phi_cut} cut phi rows left to lf_oracle.rs)");
}

#[test]
fn preview_text_shows_what_llama_factory_prints() {
    let (ok, out, err) = smol(&["--preview_data", "1", "--dataset", "identity"]);
    assert!(ok, "{err}");
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
        "{\"instruction\":\"q\",\"output\":\"a\"}\n{\"instruction\":\"q\"}\n{\"instruction\": \n",
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
    // Skipped records (the missing field and the malformed line) are reported once, and the
    // rest still encodes.
    let (ok, out, err) = smol(&[
        "--preview_data",
        "5",
        "--json",
        "--dataset",
        bad.to_str().unwrap(),
        "--skip_bad_records",
    ]);
    assert!(
        ok && out.lines().count() == 1
            && err.lines().filter(|l| l.starts_with("skipped")).count() == 1
            && err.contains("skipped 2 bad record(s) (--skip_bad_records); first: ")
            && err.contains("bad.jsonl: line 2: missing field \"output\""),
        "{err}"
    );
}
