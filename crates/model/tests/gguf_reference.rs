//! GGUF reader vs llama.cpp's own Python reader (PyPI `gguf`): every tensor of the fixture GGUFs
//! in tests/fixtures/gguf-reference, dequantized by `GgufFile::tensor_f32`, against what
//! `gguf.GGUFReader` + `gguf.quants.dequantize` return (expected.safetensors), and every
//! metadata key against what GGUFReader reads (manifest.json). See the README there.
//!
//! Comparisons are bitwise (f32 bit patterns, so 0.0 vs -0.0 counts): F32/F16/BF16 are exact
//! conversions, and Q8_0 / Q4_0 / Q4_1 compute the same single f32 operations in both readers
//! (q·d, (q−8)·d, q·d + m, all with f16 scales widened exactly to f32), so no numeric tolerance
//! is justified: even the sign of zero must agree (this test found Q4_0 computed as
//! (q−8)·d + 0.0, which turned llama.cpp's −0.0 into +0.0). Any NaN or infinity in either
//! operand fails.
//!
//! expected.safetensors is in GGUF's on-disk layout (ggml dims reversed, row-major, attn_q /
//! attn_k rows in llama.cpp's permuted order). `tensor_f32` returns q / k un-permuted to the HF
//! layout, so the test re-applies llama.cpp's convert permutation (`LlamaModel.permute` in
//! convert_hf_to_gguf.py) to the reader's output before comparing.

use phi_model::gguf::{GgufFile, GgufLayout, GgufValue};
use phi_model::Arch;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf-reference")
}

fn manifest() -> Value {
    let p = dir().join("manifest.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (fixture missing?)", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn expected_bytes() -> Vec<u8> {
    let p = dir().join("expected.safetensors");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e} (fixture missing?)", p.display()))
}

/// The manifest's files, after checking that the folder holds exactly those GGUFs, at the
/// recorded sizes, and that there is at least one.
fn fixture_files(m: &Value) -> Vec<(String, Value)> {
    let mut on_disk: Vec<String> = std::fs::read_dir(dir())
        .unwrap_or_else(|e| panic!("{}: {e}", dir().display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    on_disk.sort();
    assert!(
        !on_disk.is_empty(),
        "no .gguf fixtures in {} (run generate.py there, see its README.md)",
        dir().display()
    );
    let files = m["files"].as_object().expect("manifest.json: files");
    let mut listed: Vec<String> = files.keys().cloned().collect();
    listed.sort();
    assert_eq!(on_disk, listed, "GGUF files on disk vs manifest.json");
    files
        .iter()
        .map(|(name, f)| {
            let len = std::fs::metadata(dir().join(name)).unwrap().len();
            assert_eq!(
                Some(len),
                f["bytes"].as_u64(),
                "{name}: size differs from manifest.json (regenerated without updating it?)"
            );
            (name.clone(), f.clone())
        })
        .collect()
}

/// The HF name our reader serves a GGUF tensor under.
/// The fixtures are llama.cpp `llama` files.
fn layout() -> GgufLayout {
    Arch::Llama.gguf().expect("Llama reads GGUF")
}

fn hf_name(gguf: &str) -> String {
    phi_model::gguf::hf_name(gguf, &layout()).unwrap_or_else(|| panic!("{gguf}: unexpected name"))
}

/// llama.cpp's convert permutation (HF rotate-half rows → GGUF interleaved pairs), exactly
/// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`:
/// GGUF row h·d + 2i + j takes HF row h·d + j·d/2 + i.
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols);
    assert!(
        heads > 0 && rows.is_multiple_of(2 * heads),
        "{rows} rows, {heads} heads"
    );
    let d = rows / heads;
    let mut out = vec![f32::NAN; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let dst = h * d + 2 * i + j;
                let src = h * d + j * (d / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Bitwise comparison; Err describing the mismatches (count, how many only in the sign of
/// zero, max |diff|, first few) or any non-finite value in either operand.
fn compare_bits(got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} values, expected {}", got.len(), want.len()));
    }
    let mut bad = 0usize;
    let mut zero_sign = 0usize;
    let mut max_diff = 0.0f64;
    let mut first = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !g.is_finite() || !w.is_finite() {
            return Err(format!("non-finite value at {i}: ours {g}, gguf-py {w}"));
        }
        if g.to_bits() == w.to_bits() {
            continue;
        }
        if g == 0.0 && w == 0.0 {
            zero_sign += 1;
        }
        bad += 1;
        let diff = (g as f64 - w as f64).abs();
        if diff > max_diff {
            max_diff = diff;
        }
        if first.len() < 5 {
            first.push(format!("[{i}] ours {g:e} vs {w:e}"));
        }
    }
    if bad == 0 {
        Ok(())
    } else {
        Err(format!(
            "{bad} of {} values differ ({zero_sign} of them only in the sign of zero), \
             max |diff| {max_diff:e}; {}",
            got.len(),
            first.join(", ")
        ))
    }
}

fn meta_u64(file: &Value, key: &str) -> Option<u64> {
    file["metadata"]
        .as_array()?
        .iter()
        .find(|r| r["key"] == key)
        .and_then(|r| r["value"].as_u64())
}

#[test]
fn tensors_match_gguf_py() {
    let m = manifest();
    let files = fixture_files(&m);
    let bytes = expected_bytes();
    let st = SafeTensors::deserialize(&bytes).expect("expected.safetensors");
    let mut n_expected_used = 0usize;
    let mut failures = Vec::new();
    let mut compared = Vec::new();
    for (name, f) in &files {
        let g = GgufFile::open(&dir().join(name)).unwrap_or_else(|e| panic!("{e}"));
        let tensors = f["tensors"].as_array().expect("tensors");
        assert!(!tensors.is_empty(), "{name}: no tensors in manifest.json");
        assert_eq!(
            g.tensor_infos().len(),
            tensors.len(),
            "{name}: tensor count, ours vs manifest.json"
        );
        assert_eq!(
            g.hf_tensor_names(&layout()).len(),
            tensors.len(),
            "{name}: every fixture tensor has an HF name"
        );
        for t in tensors {
            let tname = t["name"].as_str().unwrap();
            let label = format!("{name}::{tname} ({})", t["type"].as_str().unwrap());
            let info = g
                .tensor_infos()
                .get(tname)
                .unwrap_or_else(|| panic!("{label}: not in our tensor_infos"));
            let ne: Vec<usize> = t["ne"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(info.dims, ne, "{label}: dims (ggml order)");
            assert_eq!(
                info.ggml_type as u64,
                t["type_id"].as_u64().unwrap(),
                "{label}: ggml type"
            );

            let view = st
                .tensor(t["expected"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{label}: expected.safetensors: {e}"));
            assert_eq!(view.dtype(), Dtype::F32, "{label}: expected dtype");
            let want: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            n_expected_used += 1;

            let (shape, got) = g
                .tensor_f32(&hf_name(tname), &layout())
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(
                shape,
                view.shape(),
                "{label}: shape (HF order = ggml dims reversed)"
            );
            let heads_key = if tname.ends_with("attn_q.weight") {
                Some("llama.attention.head_count")
            } else if tname.ends_with("attn_k.weight") {
                Some("llama.attention.head_count_kv")
            } else {
                None
            };
            let got = match heads_key {
                Some(k) => {
                    let heads = meta_u64(f, k).unwrap_or_else(|| panic!("{name}: {k}")) as usize;
                    llama_cpp_permute(&got, shape[0], shape[1], heads)
                }
                None => got,
            };
            match compare_bits(&got, &want) {
                Ok(()) => compared.push(format!("{label}: {} values bitwise equal", got.len())),
                Err(e) => failures.push(format!("{label}: {e}")),
            }
        }
    }
    let n_in_file = st.names().len();
    assert_eq!(
        n_expected_used, n_in_file,
        "expected.safetensors holds tensors no fixture GGUF lists"
    );
    eprintln!("{}", compared.join("\n"));
    assert!(
        failures.is_empty(),
        "ours vs gguf-py:\n{}",
        failures.join("\n")
    );
}

/// Every metadata key as GGUFReader reads it (manifest.json), nothing more or less; f32 values
/// compared by bit pattern after widening to f64.
#[test]
fn metadata_matches_gguf_py() {
    let m = manifest();
    for (name, f) in fixture_files(&m) {
        let g = GgufFile::open(&dir().join(&name)).unwrap_or_else(|e| panic!("{e}"));
        let records = f["metadata"].as_array().expect("metadata");
        let mut keys: Vec<&str> = records.iter().map(|r| r["key"].as_str().unwrap()).collect();
        keys.sort();
        let ours: Vec<&str> = g.metadata().keys().map(String::as_str).collect();
        assert_eq!(ours, keys, "{name}: metadata keys");
        for r in records {
            let key = r["key"].as_str().unwrap();
            let ty = r["type"].as_str().unwrap();
            let v = &g.metadata()[key];
            let ok = match ty {
                "UINT8" | "UINT16" | "UINT32" | "UINT64" => {
                    *v == GgufValue::U64(r["value"].as_u64().unwrap())
                }
                "INT8" | "INT16" | "INT32" | "INT64" => {
                    *v == GgufValue::I64(r["value"].as_i64().unwrap())
                }
                "FLOAT32" => {
                    let want = f32::from_bits(r["f32_bits"].as_u64().unwrap() as u32) as f64;
                    matches!(v, GgufValue::F64(x) if x.to_bits() == want.to_bits())
                }
                "FLOAT64" => {
                    let want = f64::from_bits(r["f64_bits"].as_u64().unwrap());
                    matches!(v, GgufValue::F64(x) if x.to_bits() == want.to_bits())
                }
                "BOOL" => *v == GgufValue::Bool(r["value"].as_bool().unwrap()),
                "STRING" => v.as_str() == r["value"].as_str(),
                "ARRAY[STRING]" => {
                    let want: Vec<GgufValue> = r["value"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| GgufValue::Str(s.as_str().unwrap().to_string()))
                        .collect();
                    *v == GgufValue::Array(want)
                }
                other => panic!("{name}: {key}: manifest type {other} not handled by this test"),
            };
            assert!(
                ok,
                "{name}: {key} ({ty}): ours {v:?}, gguf-py {}",
                r["value"]
            );
        }
    }
}

/// The SmolLM2 slice keeps the real model's llama.* metadata: its HF config.
#[test]
fn smollm2_slice_hf_config() {
    let m = manifest();
    let (name, f) = fixture_files(&m)
        .into_iter()
        .find(|(n, _)| n.starts_with("smollm2-"))
        .expect("the SmolLM2 slice fixture");
    let g = GgufFile::open(&dir().join(&name)).unwrap_or_else(|e| panic!("{e}"));
    let c = g.hf_config(&layout()).unwrap_or_else(|e| panic!("{e}"));
    let u = |k: &str| meta_u64(&f, k).unwrap_or_else(|| panic!("{name}: {k}"));
    assert_eq!(c["hidden_size"], u("llama.embedding_length"));
    assert_eq!(c["intermediate_size"], u("llama.feed_forward_length"));
    assert_eq!(c["num_hidden_layers"], u("llama.block_count"));
    assert_eq!(c["num_attention_heads"], u("llama.attention.head_count"));
    assert_eq!(c["num_key_value_heads"], u("llama.attention.head_count_kv"));
    assert_eq!(c["max_position_embeddings"], u("llama.context_length"));
    assert_eq!(c["vocab_size"], u("llama.vocab_size"));
    assert_eq!(c["bos_token_id"], u("tokenizer.ggml.bos_token_id"));
    assert_eq!(c["eos_token_id"], u("tokenizer.ggml.eos_token_id"));
    assert_eq!(c["pad_token_id"], u("tokenizer.ggml.padding_token_id"));
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(
        c["rms_norm_eps"].as_f64().map(f64::to_bits),
        Some((1e-5f32 as f64).to_bits()),
        "rms_norm_eps is the stored f32 widened"
    );
    assert_eq!(c["tie_word_embeddings"], true);
}

/// The test's permutation is llama.cpp's: on a 2-head, d = 4 example, HF rows
/// [h0: 0 1 | 2 3, h1: 4 5 | 6 7] become interleaved [0 2 1 3, 4 6 5 7].
#[test]
fn permute_helper_is_llama_cpp_s() {
    let w: Vec<f32> = (0..8).map(|r| r as f32).collect();
    assert_eq!(
        llama_cpp_permute(&w, 8, 1, 2),
        vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    );
}
