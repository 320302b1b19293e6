//! `--do_eval` without training: the oracle batch as pre-tokenized JSONL, evaluated with
//! batch size 2, gives transformers' loss (base and with the PEFT adapter) on every case.

mod common;

use common::{jsonl, run, scratch};
use phi_testkit::oracle::{cases, Case};
use serde_json::Value;
use std::path::Path;

fn eval_args(case: &Case, data: &Path, out: &Path, adapter: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "--model_name_or_path",
        &case.dir.display().to_string(),
        "--do_train",
        "false",
        "--do_eval",
        "--eval_dataset",
        &data.display().to_string(),
        "--per_device_eval_batch_size",
        "2",
        "--output_dir",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if adapter {
        v.push("--adapter_name_or_path".into());
        v.push(case.dir.join("lora").display().to_string());
    }
    v
}

fn results(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap()).unwrap()
}

#[test]
fn eval_loss_matches_the_oracle_on_every_case() {
    let all = cases();
    assert!(!all.is_empty(), "no oracle cases");
    for dir in all {
        let case = Case::open(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let tmp = scratch(&format!("eval-{name}"));
        let data = jsonl(&case, &tmp);
        let mut keys = vec![("loss", false)];
        if dir.join("lora").exists() && case.has("lora.loss") {
            keys.push(("lora.loss", true));
        }
        for (key, adapter) in keys {
            let out = tmp.join(key);
            let (ok, err) = run(&eval_args(&case, &data, &out, adapter));
            assert!(ok, "{name} {key}: {err}");
            let r = results(&out);
            let want = case.f32(key).1[0] as f64;
            let got = r["eval_loss"].as_f64().unwrap();
            assert!((got - want).abs() < 1e-5, "{name} {key}: {got} vs {want}");
            let ppl = r["perplexity"].as_f64().unwrap();
            assert!(
                (ppl - got.exp()).abs() <= 1e-9 * ppl,
                "{name}: perplexity {ppl}"
            );
            assert_eq!(r["eval_samples"], 2, "{name}");
            assert!(r["eval_tokens"].as_u64().unwrap() > 0);
            assert!(r["eval_runtime"].as_f64().is_some());
            let all: Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("all_results.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(all["eval_loss"], r["eval_loss"]);
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

#[test]
fn nothing_to_do_and_missing_eval_data_are_one_line_errors() {
    let case = common::some_case();
    let tmp = scratch("eval-bad");
    let c = case.dir.display().to_string();
    let o = tmp.join("o").display().to_string();
    let (ok, err) = run(&[
        "--model_name_or_path".into(),
        c.clone(),
        "--do_train".into(),
        "false".into(),
        "--output_dir".into(),
        o.clone(),
    ]);
    assert!(
        !ok && err.contains("nothing to do") && err.lines().count() == 1,
        "{err}"
    );
    let (ok, err) = run(&[
        "--model_name_or_path".into(),
        c,
        "--do_train".into(),
        "false".into(),
        "--do_eval".into(),
        "--output_dir".into(),
        o,
    ]);
    assert!(
        !ok && err.contains("eval_dataset") && err.lines().count() == 1,
        "{err}"
    );
    // After training it is refused before the first step.
    let data = common::jsonl(&case, &tmp);
    let out = tmp.join("t");
    let (ok, err) = run(&common::with(
        common::base_args(&case, &data, &out),
        &["--max_steps", "1", "--do_eval"],
    ));
    assert!(
        !ok && err.contains("eval_dataset") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn eval_after_lora_training_reads_the_new_adapter() {
    let case = common::some_case();
    let tmp = scratch("eval-after");
    let data = jsonl(&case, &tmp);
    let out = tmp.join("run");
    let d = data.display().to_string();
    let (ok, err) = run(&common::with(
        common::base_args(&case, &data, &out),
        &[
            "--max_steps",
            "2",
            "--do_eval",
            "--eval_dataset",
            &d,
            "--per_device_eval_batch_size",
            "2",
        ],
    ));
    assert!(ok, "{err}");
    let trained = results(&out)["eval_loss"].as_f64().unwrap();
    let again = tmp.join("again");
    let mut args = eval_args(&case, &data, &again, false);
    args.extend(["--adapter_name_or_path".into(), out.display().to_string()]);
    let (ok, err) = run(&args);
    assert!(ok, "{err}");
    assert_eq!(results(&again)["eval_loss"].as_f64().unwrap(), trained);
    let base = case.f32("loss").1[0] as f64;
    assert!(
        trained < base,
        "two steps at lr 1e-2 on the batch lower its loss: {trained} vs {base}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
