//! GGUF: metadata → config, name mapping, dequantization, q/k un-permutation, and errors.

use burn::tensor::Tensor;
use phi_model::gguf::{GgufFile, GgufValue, F16, F32, Q4_0, Q4_1, Q8_0};
use phi_model::weights::{GgufSource, RandomSource};
use phi_model::{cpu_device, Arch, CausalLm, Inputs, ModelConfig, TapRequest};
use phi_testkit::gguf_write::{gguf_bytes, Meta};
use phi_testkit::tiny_llama::{config, meta, model_gguf, HIDDEN, KV, VOCAB};
use std::path::PathBuf;

fn tmp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("phi-gguf-{}-{name}.gguf", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn logits(m: &CausalLm) -> Vec<f32> {
    let ids: Vec<i64> = (0..9).map(|i| (i * 7 + 1) % VOCAB as i64).collect();
    let t: Tensor<3> = m
        .forward(&Inputs::new(1, 9, ids), &TapRequest::none())
        .logits;
    t.try_into_vec_as::<f32>().unwrap()
}

#[test]
fn f32_gguf_loads_the_same_model_as_its_hf_weights() {
    let (bytes, _) = model_gguf(|_| F32);
    let path = tmp_file("f32", &bytes);
    let file = GgufFile::open(&path).unwrap();
    let layout = Arch::gguf_layout(&file).unwrap();
    let src = GgufSource::new(&path, file, layout);
    let cfg = ModelConfig::from_value(src.hf_config().unwrap(), "gguf").unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size),
        (HIDDEN, KV, VOCAB)
    );
    assert!(cfg.tie_word_embeddings);
    assert_eq!(
        (cfg.bos_token_id, cfg.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    let from_gguf = CausalLm::load(&cfg, &src, &cpu_device()).unwrap();
    let from_hf = CausalLm::load(&config(), &RandomSource { seed: 3 }, &cpu_device()).unwrap();
    // Bit-identical weights (q/k un-permuted) give bit-identical logits.
    assert_eq!(logits(&from_gguf), logits(&from_hf));
}

#[test]
fn quantized_tensors_dequantize_within_their_step() {
    let types = [("f16", F16), ("q8_0", Q8_0), ("q4_0", Q4_0), ("q4_1", Q4_1)];
    for (name, ty) in types {
        let (bytes, hf) = model_gguf(|_| ty);
        let path = tmp_file(name, &bytes);
        let g = GgufFile::open(&path).unwrap();
        for (n, shape, want) in &hf {
            let (s, got) = g.tensor_f32(n, &Arch::gguf_layout(&g).unwrap()).unwrap();
            assert_eq!(&s, shape, "{name} {n}");
            let amax = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // One quantization step: amax/127 (q8), 2·amax/15 (q4), f16 rounding.
            let tol = match ty {
                F16 => amax * 1e-3,
                Q8_0 => amax / 127.0,
                _ => 2.0 * amax / 15.0,
            };
            let worst = phi_testkit::oracle::max_abs_diff(n, &got, want);
            assert!(worst <= tol, "{name} {n}: error {worst} > {tol}");
            if shape.len() == 1 {
                assert_eq!(&got, want, "{name} {n}: F32 norms are exact");
            }
        }
    }
}

#[test]
fn bad_files_name_the_file_and_the_tensor() {
    let (bytes, _) = model_gguf(|_| Q8_0);
    let cut = tmp_file("cut", &bytes[..bytes.len() - 40]);
    let err = GgufFile::open(&cut).err().expect("truncated").to_string();
    assert!(
        err.contains("cut.gguf")
            && err.contains("truncated")
            && err.contains("blk.1.ffn_down.weight"),
        "{err}"
    );

    let magic = tmp_file("magic", b"GGML\x03\x00\x00\x00");
    let err = GgufFile::open(&magic).err().expect("magic").to_string();
    assert!(
        err.contains("magic.gguf") && err.contains("not a GGUF file"),
        "{err}"
    );

    // A Q3_K tensor (type 11: 110 bytes per 256 values) is listed but cannot be decoded.
    let mut m = meta();
    m.truncate(9);
    let t = vec![(
        "blk.0.attn_q.weight",
        vec![HIDDEN, 256],
        11u32,
        vec![0u8; HIDDEN * 110],
    )];
    let k = tmp_file("q3k", &gguf_bytes(&m, &t));
    let g = GgufFile::open(&k).unwrap();
    let err = g
        .tensor_f32(
            "model.layers.0.self_attn.q_proj.weight",
            &Arch::gguf_layout(&g).unwrap(),
        )
        .expect_err("q3k")
        .to_string();
    assert!(
        err.contains("q3k.gguf") && err.contains("blk.0.attn_q.weight") && err.contains("Q3_K"),
        "{err}"
    );
    // Kept in its blocks, the same one line.
    let layout = Arch::gguf_layout(&g).unwrap();
    let err = g
        .tensor_quant("model.layers.0.self_attn.q_proj.weight", &layout)
        .expect_err("q3k kept")
        .to_string();
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("Q3_K"),
        "{err}"
    );
}

/// llama.cpp's vocab-only Llama-2 GGUF (tests/fixtures/vocab-gguf): a real file's metadata,
/// arrays and strings, checked against the same vocabulary in HF's tokenizer.json format.
#[test]
fn real_vocab_gguf_metadata_parses() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let g = GgufFile::open(&root.join("tests/fixtures/vocab-gguf/ggml-vocab-llama-spm.gguf"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g.architecture(), Some("llama"));
    assert!(
        g.tensor_infos().is_empty(),
        "a vocab-only file has no tensors"
    );
    let meta = g.metadata();
    assert_eq!(
        meta.get("tokenizer.ggml.model").and_then(|v| v.as_str()),
        Some("llama")
    );
    for (key, want) in [
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.unknown_token_id", 0),
    ] {
        assert_eq!(meta.get(key).and_then(|v| v.as_u64()), Some(want), "{key}");
    }
    let array = |key: &str| match meta.get(key) {
        Some(GgufValue::Array(a)) => a.clone(),
        other => panic!("{key}: expected an array, found {other:?}"),
    };
    let tokens: Vec<String> = array("tokenizer.ggml.tokens")
        .iter()
        .map(|t| t.as_str().expect("token string").to_string())
        .collect();
    assert_eq!(tokens.len(), 32000);
    assert_eq!(array("tokenizer.ggml.scores").len(), 32000);
    assert_eq!(array("tokenizer.ggml.token_type").len(), 32000);
    // The same vocabulary, id for id, as the Llama-2 tokenizer.json under assets/.
    let tj: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("assets/tokenizers/llama2/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let mut hf = vec![String::new(); tokens.len()];
    for (tok, id) in tj["model"]["vocab"].as_object().unwrap() {
        hf[id.as_u64().unwrap() as usize] = tok.clone();
    }
    let differ: Vec<usize> = (0..tokens.len()).filter(|&i| tokens[i] != hf[i]).collect();
    assert!(
        differ.is_empty(),
        "{} ids differ, first {:?}",
        differ.len(),
        &differ[..differ.len().min(5)]
    );
    // Scores are SentencePiece log-probabilities: 0 for specials, negative and falling after.
    let scores: Vec<f64> = array("tokenizer.ggml.scores")
        .iter()
        .map(|v| v.as_f64().expect("score"))
        .collect();
    assert!(
        scores[300] < 0.0 && scores[300] > scores[31000],
        "{} {}",
        scores[300],
        scores[31000]
    );
}

/// A GGUF of an architecture no arch file reads is refused by key, naming the ones we read.
#[test]
fn unknown_gguf_architecture_is_named() {
    let mut m = meta();
    m[0].1 = Meta::Str("gpt2".into());
    let path = tmp_file("gpt2", &gguf_bytes(&m, &[]));
    let err = match phi_model::load(path.to_str().unwrap(), &cpu_device()) {
        Ok(_) => panic!("a gpt2 GGUF loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("gpt2.gguf")
            && err.contains(
                "key general.architecture: expected \"llama\" or \"phi3\" or \"phi2\", found Some(\"gpt2\")"
            ),
        "{err}"
    );
}

/// A GGUF model's quantized linears stay in their blocks by default (what phi-generate,
/// phi-capture and LoRA training load), and give the logits of the same file widened to f32
/// up to f32 summation order.
#[test]
fn quantized_linears_stay_in_their_blocks_with_the_widened_logits() {
    for (name, ty) in [("q8_0", Q8_0), ("q4_0", Q4_0), ("q4_1", Q4_1)] {
        let (bytes, _) = model_gguf(|_| ty);
        let path = tmp_file(&format!("kept-{name}"), &bytes);
        let file = GgufFile::open(&path).unwrap();
        let layout = Arch::gguf_layout(&file).unwrap();
        let src = GgufSource::new(&path, file, layout);
        let cfg = ModelConfig::from_value(src.hf_config().unwrap(), "gguf").unwrap();
        let kept = CausalLm::load(&cfg, &src, &cpu_device()).unwrap();
        let wide =
            CausalLm::load(&cfg, &phi_model::weights::Widening(&src), &cpu_device()).unwrap();
        assert_eq!(
            kept.quant_summary().weights,
            14,
            "{name}: 2 layers × 7 linears"
        );
        assert_eq!(wide.quant_summary().weights, 0, "{name}");
        let (a, b) = (logits(&kept), logits(&wide));
        let worst = phi_testkit::oracle::max_scaled_diff(name, &a, &b);
        assert!(worst <= 1e-5, "{name}: logits differ by {worst}");
    }
}
