//! phi-capture's other inputs: `--text` and `--dataset` tokenize with a real tokenizer and pad
//! as a forward of the same ids does, and `--adapter` reproduces PEFT's `lora.logits`.

mod common;

use burn::tensor::Tensor;
use common::{capture, check_summary, read_summary, s, tmp};
use phi_data::Tok;
use phi_model::resolve::resolve_dir;
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_model::{cpu_device, CausalLm, Inputs, TapRequest};
use phi_testkit::oracle::{cases, Case, Report};
use std::path::{Path, PathBuf};

fn tokenizers() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tokenizers");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path().join("tokenizer.json"))
        .filter(|p| p.exists())
        .collect();
    v.sort();
    v
}

/// Text whose ids (the tokenizer's own specials included) all fall below `vocab`, grown from
/// the tokenizer's single-token pieces until it has `n` tokens; None when the vocabulary is
/// too small for that. The oracle models have tiny vocabularies, so plain prose would not fit.
fn text_within(tok: &Tok, vocab: usize, n: usize) -> Option<(String, Vec<i64>)> {
    let fits = |t: &str| -> Option<Vec<i64>> {
        let ids = tok.encode(t, true).ok()?;
        ids.iter()
            .all(|&i| (i as usize) < vocab)
            .then(|| ids.iter().map(|&i| i64::from(i)).collect())
    };
    let mut text = String::new();
    let mut ids = Vec::new();
    // Highest ids first: merged pieces, so the text exercises the merges too.
    for id in (0..vocab as u32).rev() {
        let piece = tok.decode(&[id], true);
        if piece.trim().is_empty()
            || piece.contains('\u{FFFD}')
            || piece.chars().any(char::is_control)
        {
            continue;
        }
        let longer = format!("{text}{piece}");
        if let Some(got) = fits(&longer).filter(|g| g.len() > ids.len()) {
            (text, ids) = (longer, got);
            if ids.len() >= n {
                return Some((text, ids));
            }
        }
    }
    None
}

/// The first tokenizer under assets/tokenizers that can write `n`-token texts for `vocab`.
fn fitting(vocab: usize, n: usize) -> Option<(PathBuf, Tok)> {
    tokenizers().into_iter().find_map(|p| {
        let t = Tok::load(&p).ok()?;
        text_within(&t, vocab, n).map(|_| (p, t))
    })
}

fn model(dir: &Path) -> CausalLm {
    let res = resolve_dir(dir).unwrap();
    CausalLm::load(&res.config, res.source.as_ref(), &cpu_device()).unwrap()
}

fn forward_logits(m: &CausalLm, ids: &[i64]) -> Vec<f32> {
    let l: Tensor<3> = m
        .forward(
            &Inputs::new(1, ids.len(), ids.to_vec()),
            &TapRequest::none(),
        )
        .logits;
    l.try_into_vec_as::<f32>().unwrap()
}

fn captured(out: &Path) -> SafetensorsSource {
    SafetensorsSource::open_files(&[out.join("capture.safetensors")]).unwrap()
}

/// Checks the summary of `out` against its own tensors under `mask`.
fn summary_matches_tensors(r: &mut Report, name: &str, out: &Path, mask: &[i64]) {
    let got = captured(out);
    let get = |k: &str| {
        got.contains(k)
            .then(|| got.load(k).map(|t| (t.shape, t.data)).unwrap())
    };
    check_summary(r, name, &read_summary(out), get, mask, 1e-4);
}

#[test]
fn text_and_dataset_capture_the_tokenized_rows() {
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        let vocab = case.f32("logits").0[2];
        let Some((tok_path, tok)) = fitting(vocab, 12) else {
            r.fail(format!(
                "{}: --text/--dataset not checked: no tokenizer under assets/tokenizers writes a 12-token text within this case's {vocab}-token vocabulary",
                case.name
            ));
            continue;
        };
        let name = format!("{} ({})", case.name, tok_path.parent().unwrap().display());
        let m = model(&dir);
        let (text, ids) = text_within(&tok, vocab, 12).unwrap();
        eprintln!("{name}: --text {text:?} is {} tokens", ids.len());

        let out = tmp(&format!("text-{}", case.name));
        let text_arg = format!("--text={text}");
        let args = [
            "--model",
            s(&dir),
            "--tokenizer",
            s(&tok_path),
            &text_arg,
            "--out",
            s(&out),
            "--overwrite",
        ];
        let (ok, err) = capture(&args);
        assert!(ok, "{name}: --text failed: {err}");
        let l = captured(&out).load("logits").unwrap();
        r.equal(
            &name,
            "--text logits shape",
            &l.shape,
            &[1, ids.len(), vocab],
        );
        r.close(
            &name,
            "--text logits vs a forward of the tokenized ids",
            &l.data,
            &forward_logits(&m, &ids),
            1e-5,
        );
        summary_matches_tensors(&mut r, &name, &out, &vec![1; ids.len()]);

        // Three records of different lengths: right-padded into one batch, each row as alone.
        let rows: Vec<(String, Vec<i64>)> = [7, 12, 4]
            .iter()
            .map(|&n| text_within(&tok, vocab, n).unwrap())
            .collect();
        let t = rows.iter().map(|r| r.1.len()).max().unwrap();
        let jsonl = out.join("records.jsonl");
        let lines: Vec<String> = rows
            .iter()
            .map(|(x, _)| serde_json::json!({ "text": x }).to_string())
            .collect();
        std::fs::write(&jsonl, lines.join("\n")).unwrap();
        let dout = tmp(&format!("dataset-{}", case.name));
        let (ok, err) = capture(&[
            "--model",
            s(&dir),
            "--tokenizer",
            s(&tok_path),
            "--dataset",
            s(&jsonl),
            "--out",
            s(&dout),
            "--overwrite",
        ]);
        assert!(ok, "{name}: --dataset failed: {err}");
        let l = captured(&dout).load("logits").unwrap();
        r.equal(
            &name,
            "--dataset logits shape",
            &l.shape,
            &[rows.len(), t, vocab],
        );
        let mut mask = Vec::new();
        for (b, (_, ids)) in rows.iter().enumerate() {
            let got = &l.data[b * t * vocab..][..ids.len() * vocab];
            r.close(
                &name,
                &format!("--dataset row {b} vs its forward alone"),
                got,
                &forward_logits(&m, ids),
                1e-4,
            );
            mask.extend((0..t).map(|i| i64::from(i < ids.len())));
        }
        summary_matches_tensors(&mut r, &name, &dout, &mask);

        // The same texts as a JSON array and as plain lines give the same capture; --seq-len cuts.
        let json = out.join("records.json");
        let arr: Vec<serde_json::Value> = rows
            .iter()
            .map(|(x, _)| serde_json::json!({ "text": x }))
            .collect();
        std::fs::write(&json, serde_json::to_string(&arr).unwrap()).unwrap();
        let txt = out.join("records.txt");
        std::fs::write(
            &txt,
            rows.iter()
                .map(|x| x.0.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .unwrap();
        for (file, extra) in [(&json, None), (&txt, None), (&jsonl, Some("5"))] {
            let o = tmp(&format!("dataset2-{}", case.name));
            let mut args = vec![
                "--model",
                s(&dir),
                "--tokenizer",
                s(&tok_path),
                "--dataset",
                s(file),
                "--out",
                s(&o),
                "--overwrite",
            ];
            if let Some(n) = extra {
                args.extend(["--seq-len", n]);
            }
            let (ok, err) = capture(&args);
            assert!(ok, "{name}: {}: {err}", file.display());
            let got = captured(&o).load("logits").unwrap();
            let keep = extra.map_or(t, |n| n.parse().unwrap());
            let want: Vec<f32> = l
                .data
                .chunks(t * vocab)
                .flat_map(|row| row[..keep * vocab].to_vec())
                .collect();
            r.close(
                &name,
                &format!("{} (--seq-len {extra:?}) vs jsonl", file.display()),
                &got.data,
                &want,
                1e-5,
            );
            r.equal(
                &name,
                "seq_len",
                &[read_summary(&o)["seq_len"].as_u64()],
                &[Some(keep as u64)],
            );
            let _ = std::fs::remove_dir_all(&o);
        }
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(&dout);
    }
    r.finish();
}

#[test]
fn adapter_capture_equals_peft_lora_logits() {
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        for kind in ["lora", "rslora"] {
            let key = format!("{kind}.logits");
            if !dir.join(kind).join("adapter_config.json").exists() || !case.has(&key) {
                r.fail(format!("{}: no {kind}/ adapter or no {key}", case.name));
                continue;
            }
            let out = tmp(&format!("{kind}-{}", case.name));
            let inputs = dir.join("inputs.safetensors");
            let adapter = dir.join(kind);
            let (ok, err) = capture(&[
                "--model",
                s(&dir),
                "--input-ids",
                s(&inputs),
                "--adapter",
                s(&adapter),
                "--out",
                s(&out),
                "--overwrite",
            ]);
            if !ok {
                r.fail(format!("{}: --adapter {kind}: {err}", case.name));
                continue;
            }
            let got = captured(&out).load("logits").unwrap();
            r.close(
                &case.name,
                &format!("--adapter {kind} logits vs {key}"),
                &got.data,
                &case.f32(&key).1,
                1e-4,
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    r.finish();
}

#[test]
fn bad_text_dataset_and_adapter_fail_with_one_line() {
    let dir = cases().remove(0);
    let d = tmp("bad-inputs");
    let out = d.join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["--model", s(&dir), "--out", s(&out), "--overwrite"];
        args.extend_from_slice(extra);
        capture(&args)
    };
    let check = |(ok, err): (bool, String), needles: &[&str]| {
        assert!(!ok, "should fail: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        for n in needles {
            assert!(err.contains(n), "{err:?} should mention {n:?}");
        }
    };
    // The oracle folders hold no tokenizer.json.
    check(run(&["--text", "hello"]), &["--tokenizer"]);
    let tok = tokenizers().remove(0);
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").unwrap();
    check(
        run(&["--tokenizer", s(&tok), "--dataset", s(&bad)]),
        &["bad.jsonl", "line 2", "\"text\""],
    );
    let inputs = dir.join("inputs.safetensors");
    let no_adapter = d.join("no-adapter");
    check(
        run(&["--input-ids", s(&inputs), "--adapter", s(&no_adapter)]),
        &["no-adapter", "adapter_config.json"],
    );
    let _ = std::fs::remove_dir_all(&d);
}
