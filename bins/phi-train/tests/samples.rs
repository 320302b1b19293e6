//! `generate_every`: samples.jsonl gets one line per prompt at every N-th step; with a zero
//! learning rate they equal greedy generation from the base model.

mod common;

use common::{base_args, jsonl, run, scratch, some_case, with};
use phi_model::generate::{generate, GenerateConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn samples_every_step_equal_greedy_generation_at_lr_zero() {
    let case = some_case();
    let tmp = scratch("samples");
    let data = jsonl(&case, &tmp);
    // With BOS scaling the samples see the model the loss saw: generation scales it too.
    for bos in [None, Some(0.0)] {
        let out = tmp.join(format!("out-{bos:?}"));
        let mut flags = vec![
            "--learning_rate",
            "0",
            "--max_steps",
            "2",
            "--generate_every",
            "1",
            "--sample_max_new_tokens",
            "4",
        ];
        if bos.is_some() {
            flags.extend(["--use_bos_zero_training", "--bos_scaling_factor", "0"]);
        }
        let (ok, err) = run(&with(base_args(&case, &data, &out), &flags));
        assert!(ok, "{err}");
        let got = lines(&out);
        // Two examples in the data: both are sample prompts, at steps 1 and 2.
        let steps: Vec<u64> = got.iter().map(|v| v["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 1, 2, 2]);
        let loaded =
            phi_model::load(&case.dir.display().to_string(), &phi_model::cpu_device()).unwrap();
        let cfg = GenerateConfig {
            max_new_tokens: 4,
            sampling: None,
            eos_token_ids: loaded.eos_token_ids(),
            use_cache: true,
            bos_scale: bos,
        };
        for v in &got {
            let ids = |k: &str| -> Vec<i64> {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect()
            };
            let prompt = ids("prompt");
            assert!(!prompt.is_empty());
            let mut want = generate(&loaded.model, &prompt, &cfg, |_| {});
            if want
                .last()
                .is_some_and(|l| cfg.eos_token_ids.contains(&(*l as u32)))
            {
                want.pop();
            }
            assert_eq!(ids("output"), want, "bos {bos:?}");
        }
    }
    let out = tmp.join("out-None");
    // generate_every 2 over 3 steps: only step 2; an overwritten run starts the file anew.
    let (ok, err) = run(&with(
        base_args(&case, &data, &out),
        &[
            "--max_steps",
            "3",
            "--generate_every",
            "2",
            "--sample_max_new_tokens",
            "2",
            "--overwrite_output_dir",
        ],
    ));
    assert!(ok, "{err}");
    let steps: Vec<u64> = lines(&out)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 2]);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn text_sample_prompts_need_a_tokenizer_and_ids_in_the_vocabulary() {
    let case = some_case();
    let tmp = scratch("samples-bad");
    let data = jsonl(&case, &tmp);
    let args = |out: &str, more: &[&str]| {
        with(
            base_args(&case, &data, &tmp.join(out)),
            &[
                &[
                    "--max_steps",
                    "1",
                    "--generate_every",
                    "1",
                    "--sample_prompts",
                    "Hello there",
                ],
                more,
            ]
            .concat(),
        )
    };
    let (ok, err) = run(&args("a", &[]));
    let last = err.lines().last().unwrap_or("");
    assert!(!ok && last.starts_with("error: sample_prompts"), "{err}");
    let tok: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tokenizers/phi3/tokenizer.json");
    let (ok, err) = run(&args("b", &["--tokenizer", &tok.display().to_string()]));
    assert!(!ok && err.contains("vocabulary"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}
