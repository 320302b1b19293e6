//! phi-merge's GGUF outputs: the adapter file equals llama.cpp's converter's byte for byte
//! (rsLoRA: all but the alpha that makes llama.cpp apply rsLoRA's scale); the merged model's
//! file, read back, gives the merged folder's logits on every oracle case (f32; f16 within its
//! rounding; q8_0's tensors within its step of the merged ones); the adapter file,
//! applied by our loader, gives the PEFT adapter's; the Modelfile; refusals.

mod common;

use common::{logits_of, lora_cases, merge, s, tmp};
use phi_model::cpu_device;
use phi_testkit::gguf_reference::{adapter, checkpoint, compare, reference_name};
use phi_testkit::oracle::{max_scaled_diff, Case, Report};
use std::path::Path;

/// Logits of `spec` (a folder or .gguf) with `adapter` (a PEFT folder or LoRA .gguf) on.
fn logits(spec: &Path, adapter: Option<&Path>, case: &Case) -> Vec<f32> {
    let loaded = phi_model::load(s(spec), &cpu_device()).unwrap_or_else(|e| panic!("{e}"));
    let model = match adapter {
        Some(a) => {
            phi_adapters::peft::load_any(loaded.model, a, &loaded.config)
                .unwrap_or_else(|e| panic!("{e}"))
                .0
        }
        None => loaded.model,
    };
    logits_of(&model, case)
}

#[test]
fn adapter_files_equal_llama_cpps_converter() {
    let mut failures = Vec::new();
    for (lora, base, skip) in [
        ("tiny-smollm2-lora", "tiny-smollm2", &[][..]),
        (
            // The converter also names general.finetune / basename after the folder.
            "tiny-smollm2-lora-rs",
            "tiny-smollm2",
            &["adapter.lora.alpha", "general.finetune", "general.basename"][..],
        ),
        ("tiny-phi3-lora", "tiny-phi3", &[][..]),
    ] {
        let (dir, ad) = (checkpoint(base), adapter(lora));
        for outtype in ["f32", "f16", "q8_0"] {
            let reference = format!("{lora}-{outtype}");
            let out = dir.join(format!("{lora}-{outtype}.gguf"));
            let name = reference_name(&reference);
            let (ok, err) = merge(&[
                "--model",
                s(&dir),
                "--adapter",
                s(&ad),
                "--adapter-gguf",
                s(&out),
                "--adapter-outtype",
                outtype,
                "--gguf-name",
                &name,
                "--overwrite",
            ]);
            if !ok {
                failures.push(format!("{reference}: phi-merge failed: {err}"));
                continue;
            }
            if let Err(e) = compare(&std::fs::read(&out).unwrap(), &reference, true, skip) {
                failures.push(e);
            }
        }
        if lora.ends_with("-rs") {
            // rsLoRA's scale α/√r as llama.cpp's α'/r: α' = 8·√4.
            let file =
                phi_model::gguf::GgufFile::open(&dir.join(format!("{lora}-f32.gguf"))).unwrap();
            let alpha = file.metadata()["adapter.lora.alpha"].as_f64();
            if alpha != Some(16.0) {
                failures.push(format!("{lora}: adapter.lora.alpha {alpha:?}, want 16"));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&ad);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A real tokenizer for a case's architecture (its ids cut to the case's vocabulary).
fn tokenizer_for(case: &Case) -> std::path::PathBuf {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.dir.join("config.json")).unwrap())
            .unwrap();
    let t = match cfg["model_type"].as_str() {
        Some("phi3") => "phi3",
        _ => "gpt2",
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/tokenizers")
        .join(t)
}

#[test]
fn gguf_files_give_the_merged_folders_and_the_adapters_logits() {
    let mut r = Report::default();
    for case in lora_cases() {
        let out = tmp(&format!("gguf-{}", case.name));
        let tok = tokenizer_for(&case);
        let class = phi_model::load(s(&case.dir), &cpu_device())
            .unwrap()
            .config
            .arch;
        if class.gguf().is_none() {
            // llama.cpp reads it, this writer does not yet: refused in one line, nothing written.
            let g = out.join("m.gguf");
            let lora = case.dir.join("lora");
            let (ok, err) = merge(&[
                "--model",
                s(&case.dir),
                "--adapter",
                s(&lora),
                "--gguf",
                s(&g),
                "--tokenizer",
                s(&tok),
            ]);
            let said = !ok && err.contains("not supported") && err.contains(class.hf_class());
            r.equal(
                &case.name,
                "GGUF export refused by name",
                &[said, g.exists()],
                &[true, false],
            );
            eprintln!(
                "{}: GGUF export of {} NOT RUN (no GGUF layout)",
                case.name,
                class.hf_class()
            );
            continue;
        }
        let (f32_file, f16_file, ad_file) = (
            out.join("m-f32.gguf"),
            out.join("m-f16.gguf"),
            out.join("a.gguf"),
        );
        let folder = out.join("merged");
        let lora = case.dir.join("lora");
        let (ok, err) = merge(&[
            "--model",
            s(&case.dir),
            "--adapter",
            s(&lora),
            "--out",
            s(&folder),
            "--gguf",
            s(&f32_file),
            "--outtype",
            "f32",
            "--tokenizer",
            s(&tok),
            "--adapter-gguf",
            s(&ad_file),
        ]);
        if !ok {
            r.fail(format!("{}: phi-merge failed: {err}", case.name));
            continue;
        }
        let (ok, err) = merge(&[
            "--model",
            s(&case.dir),
            "--adapter",
            s(&lora),
            "--gguf",
            s(&f16_file),
            "--outtype",
            "f16",
            "--tokenizer",
            s(&tok),
            "--overwrite",
        ]);
        if !ok {
            r.fail(format!("{}: phi-merge f16 failed: {err}", case.name));
            continue;
        }
        let want = logits(&folder, None, &case);
        r.close(
            &case.name,
            "f32 GGUF logits",
            &logits(&f32_file, None, &case),
            &want,
            1e-5,
        );
        // f16 weights (norms and biases stay f32): the logits move by the rounding only.
        let f16 = logits(&f16_file, None, &case);
        let moved = max_scaled_diff("f16", &f16, &want);
        r.equal(
            &case.name,
            "f16 GGUF logits within 1e-2",
            &[moved <= 1e-2],
            &[true],
        );
        let q8 = out.join("m-q8_0.gguf");
        let (ok, err) = merge(&[
            "--model",
            s(&case.dir),
            "--adapter",
            s(&lora),
            "--gguf",
            s(&q8),
            "--outtype",
            "q8_0",
            "--tokenizer",
            s(&tok),
            "--overwrite",
        ]);
        match ok {
            true => r.equal(
                &case.name,
                "q8_0 tensors within a step",
                &[q8_0_misfit(&folder, &q8)],
                &[None],
            ),
            false => r.fail(format!("{}: phi-merge q8_0 failed: {err}", case.name)),
        }
        let peft = logits(&case.dir, Some(&lora), &case);
        r.close(
            &case.name,
            "adapter GGUF vs PEFT adapter",
            &logits(&case.dir, Some(&ad_file), &case),
            &peft,
            1e-5,
        );
        let _ = std::fs::remove_dir_all(&out);
    }
    r.finish();
}

/// The first tensor of the Q8_0 file that is not the merged folder's within Q8_0's step
/// (each block's amax / 127 at most, plus the f16 scale's rounding; 1-D tensors exact).
fn q8_0_misfit(folder: &Path, file: &Path) -> Option<String> {
    use phi_model::weights::{SafetensorsSource, TensorSource};
    let merged = SafetensorsSource::open_dir(folder).unwrap();
    let g = phi_model::gguf::GgufFile::open(file).unwrap();
    let layout = phi_model::Arch::gguf_layout(&g).unwrap();
    for name in merged.names() {
        let want = merged.load(&name).unwrap();
        let (_, got) = g.tensor_f32(&name, &layout).unwrap();
        let row = *want.shape.last().unwrap();
        for (b, (w, q)) in want
            .data
            .chunks(32.min(row))
            .zip(got.chunks(32.min(row)))
            .enumerate()
        {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = match want.shape.len() {
                1 => 0.0,
                _ => amax / 127.0 * 0.5 + amax * 2f32.powi(-10),
            };
            if w.iter().zip(q).any(|(a, b)| (a - b).abs() > bound) {
                return Some(format!("{name} block {b}"));
            }
        }
    }
    None
}

#[test]
fn a_modelfile_names_the_file_and_the_chat_format() {
    let dir = checkpoint("tiny-smollm2");
    let ad = adapter("tiny-smollm2-lora");
    let out = dir.join("export");
    let g = out.join("tiny.gguf");
    let (ok, err) = merge(&[
        "--model",
        s(&dir),
        "--adapter",
        s(&ad),
        "--gguf",
        s(&g),
        "--outtype",
        "q8_0",
    ]);
    assert!(ok, "{err}");
    let m = std::fs::read_to_string(out.join("Modelfile")).unwrap();
    for want in [
        "FROM ./tiny.gguf\n",
        "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>",
        "PARAMETER stop \"<|im_end|>\"\n",
    ] {
        assert!(m.contains(want), "Modelfile lacks {want:?}:\n{m}");
    }
    assert!(!m.contains("ADAPTER"), "{m}");
    // The adapter alone: FROM the base, ADAPTER the file.
    let a = out.join("only/adapter.gguf");
    let (ok, err) = merge(&[
        "--model",
        s(&dir),
        "--adapter",
        s(&ad),
        "--adapter-gguf",
        s(&a),
    ]);
    assert!(ok, "{err}");
    let m = std::fs::read_to_string(out.join("only/Modelfile")).unwrap();
    assert!(
        m.contains("ADAPTER ./adapter.gguf\n")
            && m.contains(&format!(
                "FROM {}",
                std::fs::canonicalize(&dir).unwrap().display()
            )),
        "{m}"
    );
    // Nothing is overwritten unless asked.
    let (ok, err) = merge(&["--model", s(&dir), "--adapter", s(&ad), "--gguf", s(&g)]);
    assert!(
        !ok && err.contains("tiny.gguf") && err.contains("--overwrite") && err.lines().count() == 1,
        "{err}"
    );
    // A Modelfile already there is refused before the GGUF is written, not after.
    let g2 = out.join("second.gguf");
    let (ok, err) = merge(&["--model", s(&dir), "--adapter", s(&ad), "--gguf", s(&g2)]);
    assert!(
        !ok && err.contains("Modelfile") && err.contains("--overwrite") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!g2.exists(), "the GGUF was written before the refusal");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&ad);
}

#[test]
fn a_gguf_without_a_tokenizer_is_refused_in_one_line() {
    let case = &lora_cases()[0];
    let out = tmp("gguf-notok");
    let g = out.join("m.gguf");
    let (ok, err) = merge(&[
        "--model",
        s(&case.dir),
        "--adapter",
        s(&case.dir.join("lora")),
        "--gguf",
        s(&g),
    ]);
    assert!(
        !ok && err.contains("--tokenizer")
            && err.contains("tokenizer.json")
            && err.lines().count() == 1,
        "{err}"
    );
    assert!(!g.exists(), "nothing written");
    let (ok, err) = merge(&[
        "--model",
        s(&case.dir),
        "--adapter",
        s(&case.dir.join("lora")),
        "--gguf",
        s(&g),
        "--outtype",
        "q3_k",
    ]);
    assert!(
        !ok && err.contains("q3_k") && err.contains("q8_0") && err.contains("q4_k_m"),
        "{err}"
    );
}
