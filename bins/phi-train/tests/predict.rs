//! `--do_predict --predict_with_generate`: greedy answers equal transformers' generate on the
//! oracle prompt, written as LLaMA-Factory writes them, scored with LF's BLEU/ROUGE.

mod common;

use common::{run, scratch};
use phi_testkit::oracle::{cases, Case};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tokenizers/phi3/tokenizer.json")
}

/// The oracle's generate.ids as one pre-tokenized example: the prompt masked, the 8 tokens
/// transformers generated as its label.
fn example(case: &Case, dir: &Path) -> Option<(PathBuf, Vec<u32>)> {
    let prompt = case.input("generate.prompt_ids")?.1;
    let ids = case.expected_ids("generate.ids")?.1;
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &x)| if i < prompt.len() { -100 } else { x })
        .collect();
    let row = serde_json::json!({"input_ids": ids, "labels": labels});
    let p = dir.join("predict.jsonl");
    std::fs::write(&p, format!("{row}\n")).unwrap();
    Some((p, ids[prompt.len()..].iter().map(|&x| x as u32).collect()))
}

#[test]
fn greedy_predictions_match_the_oracle_and_are_scored() {
    let tok = phi_data::Tok::load(&tokenizer()).unwrap();
    let mut checked = 0;
    for dir in cases() {
        let case = Case::open(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let tmp = scratch(&format!("predict-{name}"));
        let (data, new_ids) =
            example(&case, &tmp).unwrap_or_else(|| panic!("{name}: no generate.ids"));
        let out = tmp.join("out");
        // LF's predict config (examples/extras/.../predict.yaml): do_predict without do_train,
        // which defaults to false, so it predicts and trains nothing.
        let yaml = format!(
            "### model\nmodel_name_or_path: {}\ntokenizer: {}\n\n### method\nstage: sft\n\
             do_predict: true\nfinetuning_type: lora\n\n### dataset\neval_dataset: {}\n\
             cutoff_len: 2048\noverwrite_cache: true\n\n### output\noutput_dir: {}\n\
             overwrite_output_dir: true\nreport_to: none\n\n### eval\n\
             per_device_eval_batch_size: 1\npredict_with_generate: true\nmax_new_tokens: {}\n",
            dir.display(),
            tokenizer().display(),
            data.display(),
            out.display(),
            new_ids.len()
        );
        let cfg = tmp.join("predict.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let args = vec![cfg.display().to_string()];
        let (ok, err) = run(&args);
        assert!(ok, "{name}: {err}");
        let text = std::fs::read_to_string(out.join("generated_predictions.jsonl")).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{name}");
        assert!(
            text.starts_with("{\"prompt\": "),
            "{name}: LF's key order: {text}"
        );
        let want = tok.decode(&new_ids, true);
        assert_eq!(lines[0]["predict"], want.as_str(), "{name}: predict");
        assert_eq!(lines[0]["label"], want.as_str(), "{name}: label");
        let prompt: Vec<u32> = case
            .input("generate.prompt_ids")
            .unwrap()
            .1
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(
            lines[0]["prompt"],
            tok.decode(&prompt, false).as_str(),
            "{name}: prompt"
        );
        let r: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("predict_results.json")).unwrap(),
        )
        .unwrap();
        let s = phi_trainer::metrics::similarity(&want, &want);
        for (i, k) in phi_trainer::metrics::KEYS.iter().enumerate() {
            assert_eq!(r[*k].as_f64().unwrap(), s[i], "{name}: {k}");
        }
        assert_eq!(r["predict_samples"], 1);
        assert!(
            !out.join("trainer_log.jsonl").exists(),
            "{name}: nothing trained"
        );
        checked += 1;
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(checked > 0, "no oracle case with generate.ids");
}

#[test]
fn predict_needs_generate_and_a_tokenizer() {
    let case = common::some_case();
    let tmp = scratch("predict-bad");
    let data = common::jsonl(&case, &tmp);
    let base = |more: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--model_name_or_path",
            &case.dir.display().to_string(),
            "--do_train",
            "false",
            "--do_predict",
            "--eval_dataset",
            &data.display().to_string(),
            "--output_dir",
            &tmp.join("o").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let (ok, err) = run(&base(&[]));
    assert!(!ok && err.contains("predict_with_generate"), "{err}");
    let (ok, err) = run(&base(&["--predict_with_generate"]));
    assert!(
        !ok && err.contains("tokenizer") && err.lines().count() == 1,
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
