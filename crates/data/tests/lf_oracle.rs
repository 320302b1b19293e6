//! Token ids and labels against LLaMA-Factory 0.9.5's own encodings: every
//! `<template>__<tokenizer>__<setting>.jsonl` in tests/fixtures/oracle-data (or
//! `PHI_ORACLE_DATA_DIR`), every row; and the jinja path against transformers'
//! apply_chat_template (hf_apply_chat_template/).

mod common;
use common::{conversation, ints, key, oracle_dir, rows, tokenizer};
use phi_data::encode::{supervised, ChatFormat, EncodeOptions, IGNORE};
use phi_data::{Conversation, Tok};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SETTINGS: &str = "sft, train_on_prompt, mask_history, cutoff<N>";

fn options(setting: &str) -> Result<EncodeOptions, String> {
    let mut o = EncodeOptions::default();
    match setting {
        "sft" => {}
        "train_on_prompt" => o.train_on_prompt = true,
        "mask_history" => o.mask_history = true,
        s => {
            o.cutoff_len = s
                .strip_prefix("cutoff")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("unknown setting {s:?} (known: {SETTINGS})"))?
        }
    }
    Ok(o)
}

/// LF re-registers Phi-3's `<|end|>` without rstrip, so its rows carry `▁` `\n` after every
/// `<|end|>`; the tokenizer's own flags (kept here) swallow that newline.
fn drop_lf_newlines(tok: &Tok, ids: &[i64], labels: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let end = tok.token_id("<|end|>").unwrap() as i64;
    let extra = [
        tok.token_id("▁").unwrap() as i64,
        tok.token_id("<0x0A>").unwrap() as i64,
    ];
    assert_eq!(extra, [29871, 13]);
    let (mut i2, mut l2) = (Vec::new(), Vec::new());
    let mut k = 0;
    while k < ids.len() {
        i2.push(ids[k]);
        l2.push(labels[k]);
        if ids[k] == end && ids[k + 1..].starts_with(&extra) {
            k += 2;
        }
        k += 1;
    }
    (i2, l2)
}

type Pair = (Vec<i64>, Vec<i64>);

/// (prompt, response) ids read back from an untruncated, prompt-masked row: LF masks every
/// prompt token and trains every response token, so the runs of -100 are the prompts.
fn pairs_from_labels(ids: &[i64], labels: &[i64]) -> Vec<Pair> {
    let mut pairs: Vec<Pair> = Vec::new();
    for (k, (&id, &l)) in ids.iter().zip(labels).enumerate() {
        let prompt = l == IGNORE;
        if prompt && (k == 0 || labels[k - 1] != IGNORE) {
            pairs.push((Vec::new(), Vec::new()));
        }
        let p = pairs.last_mut().unwrap();
        if prompt { &mut p.0 } else { &mut p.1 }.push(id);
    }
    pairs
}

/// LF's truncation (`_encode_data_example` + `infer_seqlen`) written out from the rule in
/// oracle-data/README.md, not phi_data's `supervised`, so that an expectation built with it
/// does not come from the code under test. `lf_rule_reproduces_truncated_rows` below holds it
/// to LF's own truncated rows.
fn lf_truncate(pairs: &[Pair], cutoff: usize, train_on_prompt: bool) -> Pair {
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    for (src, tgt) in pairs {
        if ids.len() >= cutoff {
            break;
        }
        let budget = cutoff - ids.len();
        let (s, t) = (src.len(), tgt.len());
        let max_t = if 2 * t < budget {
            budget
        } else if 2 * s < budget {
            budget - s
        } else {
            // Python's int(cutoff_len * (target_len / (source_len + target_len))).
            (budget as f64 * (t as f64 / (s + t) as f64)) as usize
        };
        let keep_t = max_t.min(t);
        let keep_s = (budget - keep_t).min(s);
        ids.extend(&src[..keep_s]);
        if train_on_prompt {
            labels.extend(&src[..keep_s]);
        } else {
            labels.extend(std::iter::repeat_n(IGNORE, keep_s));
        }
        ids.extend(&tgt[..keep_t]);
        labels.extend(&tgt[..keep_t]);
    }
    (ids, labels)
}

/// Every `<template>__<tokenizer>__<setting>.jsonl` in the oracle folder, split by name.
fn oracle_files(dir: &Path) -> Vec<(PathBuf, [String; 3])> {
    let mut files: Vec<(PathBuf, [String; 3])> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .filter_map(|p| {
            let stem = p.file_stem()?.to_string_lossy().to_string();
            let parts: Vec<String> = stem.split("__").map(String::from).collect();
            let parts: [String; 3] = parts.try_into().ok()?;
            Some((p, parts))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no <template>__<tokenizer>__<setting>.jsonl in {}",
        dir.display()
    );
    files
}

/// The same records' untruncated, prompt-masked rows (the `sft` file), by (dataset, index).
fn sft_rows(
    dir: &Path,
    template: &str,
    tok: &str,
) -> Result<HashMap<(String, i64), Value>, String> {
    let path = dir.join(format!("{template}__{tok}__sft.jsonl"));
    if !path.is_file() {
        return Err(format!(
            "{} is missing: truncated rows are checked against it",
            path.display()
        ));
    }
    Ok(rows(&path).into_iter().map(|r| (key(&r), r)).collect())
}

#[test]
fn lf_rule_reproduces_truncated_rows() {
    let dir = oracle_dir();
    let (mut checked, mut cut) = (0, 0);
    for (f, [template, tok, setting]) in oracle_files(&dir) {
        let name = f.display();
        let opts = options(&setting).unwrap_or_else(|e| panic!("{name}: {e}"));
        if opts.mask_history {
            continue;
        }
        let sft = sft_rows(&dir, &template, &tok).unwrap_or_else(|e| panic!("{name}: {e}"));
        for row in rows(&f) {
            let full = &sft[&key(&row)];
            let pairs = pairs_from_labels(&ints(&full["input_ids"]), &ints(&full["labels"]));
            let got = lf_truncate(&pairs, opts.cutoff_len, opts.train_on_prompt);
            let want = (ints(&row["input_ids"]), ints(&row["labels"]));
            assert!(
                got == want,
                "{name} {:?}: the README's rule differs from LF",
                key(&row)
            );
            checked += 1;
            cut += usize::from(want.0.len() < ints(&full["input_ids"]).len());
        }
    }
    assert!(cut > 0, "no truncated rows in {}", dir.display());
    eprintln!("LF's truncation rule reproduces {checked} rows ({cut} truncated)");
}

/// What our phi encoding must give for an LF phi row. Rows LF did not cut are LF's minus the
/// `▁` `\n` after each `<|end|>`. A row LF cut cannot be fixed up that way: LF's budget counted
/// those two ids, so ours keeps tokens LF cut. It is LF's untruncated row of the same record
/// (minus the two ids) cut by `lf_truncate`: LF's data and the README's rule, no phi_data code.
fn phi_expected(tok: &Tok, row: &Value, sft: &Value, opts: &EncodeOptions) -> Pair {
    let lf = (ints(&row["input_ids"]), ints(&row["labels"]));
    if lf.0.len() < opts.cutoff_len {
        return drop_lf_newlines(tok, &lf.0, &lf.1);
    }
    let (ids, labels) = drop_lf_newlines(tok, &ints(&sft["input_ids"]), &ints(&sft["labels"]));
    lf_truncate(
        &pairs_from_labels(&ids, &labels),
        opts.cutoff_len,
        opts.train_on_prompt,
    )
}

#[test]
fn llama_factory_encodings_match() {
    let dir = oracle_dir();
    let files = oracle_files(&dir);
    let mut failures = Vec::new();
    let (mut checked, mut phi_cut) = (0, 0);
    for (f, [template, tok_name, setting]) in &files {
        let name = f.display();
        let opts = match options(setting) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut tok = tokenizer(tok_name);
        let fmt = match ChatFormat::new(Some(template), &mut tok) {
            Ok(f) => f,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let sft = if template == "phi" {
            match sft_rows(&dir, template, tok_name) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    continue;
                }
            }
        } else {
            HashMap::new()
        };
        for row in rows(f) {
            let id = format!("{name} {:?}", key(&row));
            let pairs = fmt
                .encode_pairs(&tok, &conversation(&row))
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            let got = supervised(&pairs, &opts, tok.bos.as_ref().map(|b| b.id));
            let (want_ids, want_labels) = if template == "phi" {
                phi_cut += usize::from(ints(&row["input_ids"]).len() >= opts.cutoff_len);
                phi_expected(&tok, &row, &sft[&key(&row)], &opts)
            } else {
                (ints(&row["input_ids"]), ints(&row["labels"]))
            };
            let got_ids: Vec<i64> = got.input_ids.iter().map(|&x| x as i64).collect();
            checked += 1;
            if got_ids != want_ids || got.labels != want_labels {
                let first = got_ids.iter().zip(&want_ids).position(|(a, b)| a != b);
                failures.push(format!(
                    "{id}: ids {} vs {} long, first id difference at {first:?}; labels equal: {}\n  got  {:?}\n  want {:?}",
                    got_ids.len(),
                    want_ids.len(),
                    got.labels == want_labels,
                    &got_ids[..got_ids.len().min(40)],
                    &want_ids[..want_ids.len().min(40)]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures in {checked} rows:\n{}",
        failures.len(),
        failures
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{checked} rows in {} files match LLaMA-Factory ({phi_cut} phi rows cut by LF's rule)",
        files.len()
    );
}

#[test]
fn jinja_templates_match_apply_chat_template() {
    let dir = oracle_dir().join("hf_apply_chat_template");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut checked = 0;
    for f in &files {
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let (tok_name, source) = stem.split_once("__").unwrap();
        let mut tok = tokenizer(tok_name);
        if source != "tokenizer_config" {
            let tdir = common::chat_templates_dir();
            let jinja = std::fs::read_dir(&tdir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.file_name().unwrap().to_string_lossy().contains(source))
                .unwrap_or_else(|| panic!("{stem}: no chat template file naming {source}"));
            tok.chat_template = Some(std::fs::read_to_string(jinja).unwrap());
        }
        let fmt = ChatFormat::new(Some("jinja"), &mut tok).unwrap();
        // The messages are those of the LF rows for the same records.
        let lf = std::fs::read_dir(oracle_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.to_string_lossy()
                    .ends_with(&format!("__{tok_name}__sft.jsonl"))
            })
            .unwrap_or_else(|| panic!("{stem}: no LF sft rows for {tok_name}"));
        let convs: HashMap<(String, i64), Conversation> = rows(&lf)
            .iter()
            .map(|r| (key(r), conversation(r)))
            .collect();
        for row in rows(f) {
            let key = key(&row);
            let conv = &convs[&key];
            let ChatFormat::Jinja(j) = &fmt else {
                unreachable!()
            };
            let text = j.render(&tok, conv, conv.messages.len(), false).unwrap();
            assert_eq!(
                text,
                row["text"].as_str().unwrap(),
                "{stem} {key:?}: rendered text"
            );
            let pairs = fmt.encode_pairs(&tok, conv).unwrap();
            let ids: Vec<i64> = pairs
                .iter()
                .flat_map(|(p, r)| p.iter().chain(r))
                .map(|&x| x as i64)
                .collect();
            assert_eq!(ids, ints(&row["input_ids"]), "{stem} {key:?}: ids");
            // Every response is trained on and starts right after its prompt's header.
            for (p, r) in &pairs {
                assert!(
                    !p.is_empty() && !r.is_empty(),
                    "{stem} {key:?}: empty turn split"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no rows in {}", dir.display());
}
