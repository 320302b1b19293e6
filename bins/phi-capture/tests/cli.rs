//! phi-capture end to end: it reproduces the oracle on every case, and bad input fails with
//! one line naming the file and the key or tensor.

mod common;

use common::{capture, check_summary, read_summary, tmp};
use phi_model::io::write_safetensors;
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_testkit::oracle::{cases, Case, Report};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[test]
fn capture_reproduces_every_oracle_case() {
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        let out = tmp(&format!("oracle-{}", case.name));
        let inputs = dir.join("inputs.safetensors");
        let (ok, err) = capture(&[
            "--model",
            dir.to_str().unwrap(),
            "--input-ids",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--overwrite",
        ]);
        if !ok {
            r.fail(format!("{}: phi-capture failed: {err}", case.name));
            continue;
        }
        let got = SafetensorsSource::open_files(&[out.join("capture.safetensors")]).unwrap();
        for prefix in [
            "logits",
            "hidden_states.",
            "input_layernorm.",
            "post_attention_layernorm.",
        ] {
            for key in case.keys(prefix) {
                if prefix == "logits" && key != "logits" {
                    continue;
                }
                match got.load(&key) {
                    Ok(t) => r.close(&case.name, &key, &t.data, &case.f32(&key).1, 1e-4),
                    Err(e) => r.fail(format!("{}: {key}: {e}", case.name)),
                }
            }
        }
        // Norm weights are saved bit-exact under their HF names.
        let base = SafetensorsSource::open_dir(&dir).unwrap();
        let norms: Vec<String> = base
            .names()
            .into_iter()
            .filter(|n| n.contains("norm"))
            .collect();
        assert!(!norms.is_empty());
        for n in norms {
            match got.load(&n) {
                Ok(t) => r.equal(&case.name, &n, &t.data, &base.load(&n).unwrap().data),
                Err(e) => r.fail(format!("{}: {n}: {e}", case.name)),
            }
        }
        // summary.json against norms of transformers' own tensors: the captured tensors
        // match those within 1e-4 per value, so the norms (over H values) within ~1e-4·√H.
        let (shape, ids) = case.input("input_ids").unwrap();
        let mask = case
            .input("attention_mask")
            .map_or(vec![1; ids.len()], |m| m.1);
        let summary = read_summary(&out);
        r.equal(
            &case.name,
            "summary.json batch, seq_len",
            &[summary["batch"].as_u64(), summary["seq_len"].as_u64()],
            &[Some(shape[0] as u64), Some(shape[1] as u64)],
        );
        let get = |k: &str| case.has(k).then(|| case.f32(k));
        check_summary(&mut r, &case.name, &summary, get, &mask, 1e-3);
        let _ = std::fs::remove_dir_all(&out);
    }
    r.finish();
}

/// A copy of the first oracle case whose weights `edit` may change.
fn broken_model(
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) -> (PathBuf, PathBuf) {
    let src = cases().remove(0);
    let dir = tmp(name);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let st = SafetensorsSource::open_dir(&src).unwrap();
    let mut map: BTreeMap<_, _> = st
        .names()
        .into_iter()
        .map(|n| {
            let t = st.load(&n).unwrap();
            (n, (t.shape, t.data))
        })
        .collect();
    edit(&mut map);
    write_safetensors(&dir.join("model.safetensors"), &map, None).unwrap();
    (dir, src.join("inputs.safetensors"))
}

fn fails_with(model: &Path, inputs: &Path, needles: &[&str]) {
    let out = tmp("out");
    let (ok, err) = capture(&[
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(!ok, "phi-capture should fail; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "expected one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
}

#[test]
fn missing_config_json_is_named() {
    let (dir, inputs) = broken_model("noconfig", |_| {});
    std::fs::remove_file(dir.join("config.json")).unwrap();
    fails_with(&dir, &inputs, &["config.json", "missing"]);
}

#[test]
fn unknown_architecture_is_named() {
    let (dir, inputs) = broken_model("arch", |_| {});
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&p, v.to_string()).unwrap();
    fails_with(
        &dir,
        &inputs,
        &["config.json", "GPT2LMHeadModel", "unsupported architecture"],
    );
}

#[test]
fn missing_tensor_is_named() {
    let (dir, inputs) = broken_model("missing", |m| {
        m.remove("model.layers.1.input_layernorm.weight");
    });
    fails_with(
        &dir,
        &inputs,
        &[
            "model.safetensors",
            "model.layers.1.input_layernorm.weight",
            "missing",
        ],
    );
}

#[test]
fn misshaped_tensor_is_named() {
    let (dir, inputs) = broken_model("shape", |m| {
        let t = m
            .get_mut("model.norm.weight")
            .map(|t| t.0 = vec![2, t.1.len() / 2]);
        if t.is_none() {
            let t = m.get_mut("model.final_layernorm.weight").unwrap();
            t.0 = vec![2, t.1.len() / 2];
        }
    });
    fails_with(
        &dir,
        &inputs,
        &["model.safetensors", "norm.weight", "expected shape"],
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let (dir, inputs) = broken_model("trunc", |_| {});
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    fails_with(&dir, &inputs, &["model.safetensors", "truncated"]);
}

#[test]
fn non_empty_output_folder_is_kept() {
    let src = cases().remove(0);
    let out = tmp("keep");
    std::fs::write(out.join("precious.txt"), "keep me").unwrap();
    let (ok, err) = capture(&[
        "--model",
        src.to_str().unwrap(),
        "--input-ids",
        src.join("inputs.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("precious.txt")).unwrap(),
        "keep me"
    );
}

/// A GGUF whose only matrix is `ty` with `bytes` of data, plus the llama metadata.
fn gguf_with(name: &str, ty: u32, bytes: Vec<u8>) -> PathBuf {
    use phi_testkit::gguf_write::{gguf_bytes, Meta};
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(256)),
        ("llama.feed_forward_length", Meta::U32(256)),
        ("llama.block_count", Meta::U32(1)),
        ("llama.attention.head_count", Meta::U32(2)),
        ("llama.vocab_size", Meta::U32(8)),
    ];
    let file = tmp(name).join("model.gguf");
    std::fs::write(
        &file,
        gguf_bytes(&meta, &[("token_embd.weight", vec![8, 256], ty, bytes)]),
    )
    .unwrap();
    file
}

#[test]
fn truncated_and_unsupported_gguf_are_named() {
    let inputs = cases().remove(0).join("inputs.safetensors");
    // Q8_0: 34 bytes per 32 values; drop the last block.
    let cut = gguf_with("gguf-cut", phi_model::gguf::Q8_0, vec![0u8; 8 * 8 * 34]);
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 34 * 2]).unwrap();
    fails_with(
        &cut,
        &inputs,
        &["model.gguf", "token_embd.weight", "truncated"],
    );
    // Q3_K (type 11): 110 bytes per 256 values, a valid file this reader cannot decode.
    let k = gguf_with("gguf-q3k", 11, vec![0u8; 8 * 110]);
    fails_with(
        &k,
        &inputs,
        &[
            "model.gguf",
            "token_embd.weight",
            "unsupported GGUF type Q3_K",
        ],
    );
}
