//! phi-generate end to end on every oracle case: greedy ids equal transformers' `generate`,
//! padded rows continue from their last real token, `--adapter` applies PEFT's LoRA, and bad
//! input fails with one line naming the file and the key.

use phi_testkit::oracle::{cases, Case, Report};
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-generate-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// (success, stdout, stderr) of phi-generate with `args`.
fn generate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi-generate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// New ids per row from `--ids --greedy`, or the error.
fn greedy_ids(model: &Path, extra: &[&str], new: usize) -> Result<Vec<Vec<i64>>, String> {
    let n = new.to_string();
    let mut args = vec![
        "--model",
        s(model),
        "--ids",
        "--greedy",
        "--max-new-tokens",
        &n,
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = generate(&args);
    if !ok {
        return Err(err);
    }
    Ok(out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect())
}

/// An int64 safetensors file of `tensors` (name, shape, values).
fn write_ids(path: &Path, tensors: &[(&str, Vec<usize>, Vec<i64>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, shape, _), b)| {
            (
                n.to_string(),
                TensorView::new(Dtype::I64, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Each row's real tokens, from the case's input_ids and attention_mask.
fn real_rows(case: &Case) -> Vec<Vec<i64>> {
    let (shape, ids) = case.input("input_ids").unwrap();
    let mask = case
        .input("attention_mask")
        .map_or(vec![1; ids.len()], |m| m.1);
    ids.chunks(shape[1])
        .zip(mask.chunks(shape[1]))
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|p| *p.1 != 0)
                .map(|p| *p.0)
                .collect()
        })
        .collect()
}

/// argmax of `key` ([B,T,V] logits) at each row's last real position, when the best beats the
/// runner-up by more than float noise.
fn oracle_next(case: &Case, key: &str) -> Vec<Option<i64>> {
    let (shape, logits) = case.f32(key);
    let (t, v) = (shape[1], shape[2]);
    real_rows(case)
        .iter()
        .enumerate()
        .map(|(b, row)| {
            let at = &logits[(b * t + row.len() - 1) * v..][..v];
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&x, &y| at[y].total_cmp(&at[x]));
            (at[order[0]] - at[order[1]] > 1e-3).then_some(order[0] as i64)
        })
        .collect()
}

#[test]
fn greedy_ids_equal_transformers_generate_on_every_case() {
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        let inputs = dir.join("inputs.safetensors");
        // generate.ids = prompt + 8 greedy tokens, attention_mask all 1, EOS never produced.
        for (key, prompt_key) in [
            ("generate.ids", "generate.prompt_ids"),
            ("generate_long.ids", "generate_long.prompt_ids"),
        ] {
            let (Some((_, want)), Some((_, prompt))) =
                (case.expected_ids(key), case.input(prompt_key))
            else {
                continue;
            };
            r.equal(
                &case.name,
                &format!("{key} starts with its prompt"),
                &want[..prompt.len()],
                &prompt,
            );
            let new = want.len() - prompt.len();
            match greedy_ids(
                &dir,
                &["--prompt-ids", s(&inputs), "--key", prompt_key],
                new,
            ) {
                Ok(got) => r.exact(&case.name, key, &got, &[want[prompt.len()..].to_vec()]),
                Err(e) => r.fail(format!("{}: {key}: phi-generate failed: {e}", case.name)),
            }
        }
    }
    r.finish();
}

#[test]
fn padded_rows_continue_from_their_last_real_token() {
    let mut r = Report::default();
    let mut padded = 0;
    for dir in cases() {
        let case = Case::open(&dir);
        let inputs = dir.join("inputs.safetensors");
        let rows = real_rows(&case);
        let t = case.input("input_ids").unwrap().0[1];
        padded += rows.iter().filter(|row| row.len() < t).count();
        let got = match greedy_ids(&dir, &["--prompt-ids", s(&inputs), "--key", "input_ids"], 4) {
            Ok(g) => g,
            Err(e) => {
                r.fail(format!("{}: phi-generate failed: {e}", case.name));
                continue;
            }
        };
        r.equal(&case.name, "one line per row", &[got.len()], &[rows.len()]);
        for (b, want) in oracle_next(&case, "logits").into_iter().enumerate() {
            if let (Some(w), Some(g)) = (want, got.get(b)) {
                r.exact(
                    &case.name,
                    &format!("row {b}: first token = argmax logits at last real position"),
                    &g[..1],
                    &[w],
                );
            }
        }
        // The same rows without padding, and left-padded under other names with --mask-key.
        let tmpd = tmp(&format!("pad-{}", case.name));
        for (b, row) in rows.iter().enumerate() {
            let f = tmpd.join(format!("row{b}.safetensors"));
            write_ids(&f, &[("input_ids", vec![1, row.len()], row.clone())]);
            match greedy_ids(&dir, &["--prompt-ids", s(&f)], 4) {
                Ok(alone) => r.exact(
                    &case.name,
                    &format!("row {b} padded vs alone"),
                    &got[b..=b],
                    &alone,
                ),
                Err(e) => r.fail(format!("{}: {e}", case.name)),
            }
        }
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for row in &rows {
            let pad = t - row.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(row.iter().copied()));
            mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, row.len())));
        }
        let f = tmpd.join("left.safetensors");
        let shape = vec![rows.len(), t];
        write_ids(&f, &[("ids", shape.clone(), ids), ("m", shape, mask)]);
        match greedy_ids(
            &dir,
            &["--prompt-ids", s(&f), "--key", "ids", "--mask-key", "m"],
            4,
        ) {
            Ok(left) => r.exact(&case.name, "left-padded vs right-padded", &left, &got),
            Err(e) => r.fail(format!("{}: {e}", case.name)),
        }
        let _ = std::fs::remove_dir_all(&tmpd);
    }
    assert!(
        padded > 0,
        "no oracle case has a padded row; the check above proved nothing"
    );
    r.finish();
}

#[test]
fn adapter_generation_follows_peft() {
    let mut r = Report::default();
    let mut changed = 0;
    for dir in cases() {
        let case = Case::open(&dir);
        let (lora, merged) = (dir.join("lora"), dir.join("lora_merged"));
        if !lora.join("adapter_config.json").exists() || !case.has("lora.logits") {
            r.fail(format!("{}: no lora/ adapter or no lora.logits", case.name));
            continue;
        }
        let inputs = dir.join("inputs.safetensors");
        let args = ["--prompt-ids", s(&inputs), "--adapter", s(&lora)];
        let got = match greedy_ids(&dir, &args, 6) {
            Ok(g) => g,
            Err(e) => {
                r.fail(format!("{}: phi-generate --adapter failed: {e}", case.name));
                continue;
            }
        };
        for (b, want) in oracle_next(&case, "lora.logits").into_iter().enumerate() {
            if let (Some(w), Some(g)) = (want, got.get(b)) {
                r.exact(
                    &case.name,
                    &format!("row {b}: first token = argmax lora.logits"),
                    &g[..1],
                    &[w],
                );
            }
        }
        // PEFT's merge_and_unload of the same adapter must continue the same way.
        if merged.join("model.safetensors").exists() {
            match greedy_ids(&merged, &["--prompt-ids", s(&inputs)], 6) {
                Ok(m) => r.exact(&case.name, "--adapter vs lora_merged", &got, &m),
                Err(e) => r.fail(format!("{}: lora_merged: {e}", case.name)),
            }
        }
        let base = greedy_ids(&dir, &["--prompt-ids", s(&inputs)], 6).unwrap();
        changed += usize::from(base != got);
    }
    r.finish();
    assert!(changed > 0, "--adapter never changed a generated token");
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = generate(args);
    assert!(!ok, "phi-generate should fail: {args:?}");
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
}

#[test]
fn bad_input_fails_with_one_line_naming_the_file_and_key() {
    let dir = cases().remove(0);
    let m = s(&dir);
    let d = tmp("bad");
    let inputs = dir.join("inputs.safetensors");
    let absent = d.join("absent.safetensors");
    fails_with(
        &["--model", m, "--prompt-ids", s(&absent)],
        &["absent.safetensors"],
    );
    let garbage = d.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    fails_with(
        &["--model", m, "--prompt-ids", s(&garbage)],
        &["garbage.safetensors"],
    );
    fails_with(
        &[
            "--model",
            m,
            "--prompt-ids",
            s(&inputs),
            "--key",
            "no_such_ids",
        ],
        &["inputs.safetensors", "no_such_ids", "missing"],
    );
    fails_with(
        &[
            "--model",
            m,
            "--prompt-ids",
            s(&inputs),
            "--mask-key",
            "no_such_mask",
        ],
        &["inputs.safetensors", "no_such_mask", "missing"],
    );
    let holes = d.join("holes.safetensors");
    write_ids(
        &holes,
        &[
            ("input_ids", vec![1, 4], vec![5, 6, 7, 8]),
            ("attention_mask", vec![1, 4], vec![1, 0, 1, 1]),
        ],
    );
    fails_with(
        &["--model", m, "--prompt-ids", s(&holes)],
        &["holes.safetensors", "attention_mask", "row 0"],
    );
    let shape = d.join("shape.safetensors");
    write_ids(
        &shape,
        &[
            ("input_ids", vec![1, 4], vec![5, 6, 7, 8]),
            ("attention_mask", vec![1, 3], vec![1, 1, 1]),
        ],
    );
    fails_with(
        &["--model", m, "--prompt-ids", s(&shape)],
        &["shape.safetensors", "attention_mask", "[1, 4]"],
    );
    let big = d.join("big.safetensors");
    write_ids(&big, &[("input_ids", vec![1, 2], vec![5, 1_000_000])]);
    fails_with(
        &["--model", m, "--prompt-ids", s(&big)],
        &["big.safetensors", "input_ids", "1000000", "vocabulary"],
    );

    let tok =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tokenizers/gpt2/tokenizer.json");
    fails_with(
        &[
            "--model",
            m,
            "--tokenizer",
            s(&tok),
            "--prompt",
            "hi",
            "--template",
            "no_such_template",
        ],
        &["--template", "no_such_template"],
    );
    let no_adapter = d.join("no-adapter");
    fails_with(
        &[
            "--model",
            m,
            "--prompt-ids",
            s(&inputs),
            "--adapter",
            s(&no_adapter),
        ],
        &["no-adapter", "adapter_config.json"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn generation_stops_at_the_models_position_limit() {
    let case = Case::open(&cases()[0]);
    let dir = &case.dir;
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let limit = cfg["max_position_embeddings"].as_u64().unwrap() as usize;
    let inputs = dir.join("inputs.safetensors");
    let prompt = case.input("generate.prompt_ids").unwrap().1;
    // LF's snake_case spelling is accepted as well as clap's.
    let (ok, out, err) = generate(&[
        "--model",
        s(dir),
        "--prompt-ids",
        s(&inputs),
        "--key",
        "generate.prompt_ids",
        "--ids",
        "--greedy",
        "--max_new_tokens",
        "100000",
    ]);
    assert!(ok, "{err}");
    let budget = limit - prompt.len();
    assert!(
        err.contains(&format!(
            "max_position_embeddings is {limit}: at most {budget} new tokens"
        )),
        "{err}"
    );
    // EOS may stop it earlier; it never runs past the limit.
    let n = out.split_whitespace().count();
    assert!(n > 0 && n <= budget, "{n} new tokens, limit {budget}");
    // The same ids as a short run, as far as that goes: the stream is the same sequence.
    let want = case.expected_ids("generate.ids").unwrap().1;
    let got: Vec<i64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let k = (want.len() - prompt.len()).min(got.len());
    assert_eq!(got[..k], want[prompt.len()..prompt.len() + k]);
}

#[test]
fn an_adapters_bos_scaling_is_applied_and_said() {
    let case = Case::open(&cases()[0]);
    let dir = &case.dir;
    let inputs = dir.join("inputs.safetensors");
    let adapter = tmp("bos-adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(dir.join("lora").join(f), adapter.join(f)).unwrap();
    }
    std::fs::write(
        adapter.join("bos_zero_config.json"),
        r#"{"use_bos_zero_training": true, "bos_scaling_factor": 0.0}"#,
    )
    .unwrap();
    let run = |bos: &str| {
        let (ok, out, err) = generate(&[
            "--model",
            s(dir),
            "--prompt-ids",
            s(&inputs),
            "--key",
            "generate.prompt_ids",
            "--adapter",
            s(&adapter),
            "--ids",
            "--greedy",
            "--max-new-tokens",
            "8",
            "--bos-scaling",
            bos,
        ]);
        assert!(ok, "{err}");
        (out, err)
    };
    let (auto, said) = run("auto");
    assert!(
        said.contains("BOS scaling 0 from") && said.contains("bos_zero_config.json"),
        "{said}"
    );
    let (zero, _) = run("0");
    let (off, quiet) = run("off");
    assert!(!quiet.contains("BOS scaling"), "{quiet}");
    assert_eq!(auto, zero, "auto applies the file's factor");
    // Unscaled, the adapter gives PEFT's unscaled continuation: the merged model's.
    let merged = greedy_ids(
        &dir.join("lora_merged"),
        &["--prompt-ids", s(&inputs), "--key", "generate.prompt_ids"],
        8,
    )
    .unwrap();
    let off_ids: Vec<i64> = off.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(off_ids, merged[0]);
    let _ = std::fs::remove_dir_all(&adapter);
}

#[test]
fn a_gguf_error_prints_once() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gguf-reference/smollm2-135m-instruct-q4_1.slice.gguf");
    let bytes = std::fs::read(&src).unwrap();
    let d = tmp("gguf-once");
    let cut = d.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = generate(&["--model", s(&cut), "--prompt", "hi"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    // Once: the wrapped GGUF error used to print two and three times over.
    assert_eq!(err.matches("cut.gguf").count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
