//! Helpers shared by the phi-merge tests.

#![allow(dead_code)]

use burn::tensor::Tensor;
use phi_model::resolve::resolve_dir;
use phi_model::{cpu_device, CausalLm, Inputs, TapRequest};
use phi_testkit::oracle::{cases, Case};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-merge-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn merge(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi-merge"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// phi-merge of `case`'s base with `adapter` into `out`, plus `extra` flags.
pub fn merge_into(case: &Case, adapter: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "--model",
        s(&case.dir),
        "--adapter",
        s(adapter),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    merge(&args)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn logits(dir: &Path, case: &Case) -> Vec<f32> {
    let res = resolve_dir(dir).unwrap_or_else(|e| panic!("{e}"));
    let model = CausalLm::load(&res.config, res.source.as_ref(), &cpu_device()).unwrap();
    logits_of(&model, case)
}

/// `model`'s logits on the case's inputs.
pub fn logits_of(model: &CausalLm, case: &Case) -> Vec<f32> {
    let (shape, ids) = case.input("input_ids").unwrap();
    let mut inp = Inputs::new(shape[0], shape[1], ids);
    if let Some((_, m)) = case.input("attention_mask") {
        inp = inp.with_mask(m);
    }
    let l: Tensor<3> = model.forward(&inp, &TapRequest::none()).logits;
    l.try_into_vec_as::<f32>().unwrap()
}

/// Every case: the oracle's layout gives each one a lora/ adapter, so a case without one
/// is a broken fixture, not one to pass over.
pub fn lora_cases() -> Vec<Case> {
    cases()
        .into_iter()
        .inspect(|d| {
            assert!(
                d.join("lora/adapter_config.json").exists(),
                "{}: no lora/adapter_config.json",
                d.display()
            )
        })
        .map(|d| Case::open(&d))
        .collect()
}
