//! GGUF export against llama.cpp's own converter (tests/fixtures/gguf-export: the converter's
//! output for tiny checkpoints whose weights `gen_reference.py` draws from
//! `phi_testkit::values`, so `phi_testkit::gguf_reference` rebuilds the same checkpoints):
//! every key in the same order with the same type and value, every tensor with the same name,
//! type, shape and bytes, and then the whole file byte for byte.

use phi_data::gguf_vocab::tokenizer_keys;
use phi_model::gguf_export::{write_model, OutType};
use phi_model::{cpu_device, load};
use phi_testkit::gguf_reference::{checkpoint, compare, reference_name};
use std::path::Path;

/// Our file for `case` in `outtype` against the converter's dump `reference`; `whole`
/// compares the tokenizer keys and the file's bytes too.
fn check(
    case: &str,
    dir: &Path,
    outtype: &str,
    reference: &str,
    whole: bool,
) -> Result<(), String> {
    let loaded = load(dir.to_str().unwrap(), &cpu_device()).map_err(|e| e.to_string())?;
    let cfg = &loaded.config;
    let layout = cfg.arch.gguf().ok_or("no GGUF layout")?;
    let keys =
        tokenizer_keys(dir, layout.name, &cfg.raw, cfg.vocab_size).map_err(|e| e.to_string())?;
    let out = dir.join(format!("ours-{outtype}.gguf"));
    let name = reference_name(reference);
    write_model(
        &out,
        &loaded.model,
        cfg,
        &name,
        keys,
        OutType::parse(outtype).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    compare(&std::fs::read(&out).unwrap(), reference, whole, &[])
        .map_err(|e| format!("{case} {outtype}: {e}"))
}

#[test]
fn llama_and_phi2_files_equal_llama_cpps_converter() {
    let mut failures = Vec::new();
    for case in ["tiny-smollm2", "tiny-llama31", "tiny-llama2", "tiny-phi2"] {
        let dir = checkpoint(case);
        for outtype in ["f32", "f16", "bf16", "q8_0"] {
            let reference = format!("{case}-{outtype}");
            if let Err(e) = check(case, &dir, outtype, &reference, true) {
                failures.push(e);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The converter refuses Phi-3 without tokenizer.model; its references were made with only
/// the vocabulary step swapped (fixtures README), so the model's keys and tensors are checked.
#[test]
fn phi3_tensors_and_model_keys_equal_llama_cpps_converter() {
    let mut failures = Vec::new();
    for case in ["tiny-phi3", "tiny-phi3-longrope"] {
        let dir = checkpoint(case);
        for outtype in ["f32", "q8_0"] {
            let reference = format!("{case}-PATCHEDVOCAB-{outtype}");
            if let Err(e) = check(case, &dir, outtype, &reference, false) {
                failures.push(e);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The llama-quantize types against `llama_model_quantize` run on the converter's f32 file
/// (gen_quantize_reference.py): the same keys, tensor types (the K mixes' per-layer choices,
/// fallbacks where rows are not whole blocks), bytes and whole file. The "wide-" cases have
/// rows of whole 256-value blocks, so the K types apply; the tiny ones fall back.
#[test]
fn quantized_files_equal_llama_quantize() {
    let jobs: [(&str, &str, &[&str]); 4] = [
        (
            "wide-smollm2",
            "wide-smollm2-f32",
            &["q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q4_0"],
        ),
        (
            "wide-phi3",
            "wide-phi3-PATCHEDVOCAB-f32",
            &["q4_k_m", "q5_k_s", "q6_k"],
        ),
        (
            "tiny-smollm2",
            "tiny-smollm2-f32",
            &["q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m"],
        ),
        ("tiny-phi2", "tiny-phi2-f32", &["q4_k_m", "q5_k_m", "q6_k"]),
    ];
    let mut failures = Vec::new();
    for (case, source, types) in jobs {
        let dir = checkpoint(case);
        let whole = !source.contains("PATCHEDVOCAB");
        for outtype in types {
            let reference = format!("{source}-quantized-{outtype}");
            if let Err(e) = check(case, &dir, outtype, &reference, whole) {
                failures.push(e);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
