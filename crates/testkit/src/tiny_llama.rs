//! A tiny random Llama (2 layers, hidden 32) as GGUF files, for tests of loading, training,
//! merging and generating from a GGUF base: its matrices in one of the block types, or the same
//! values widened to F32, so a quantized base can be checked against its dequantized twin.

use crate::gguf_write::{gguf_bytes, quantize, Meta};
use phi_model::gguf::{self, F32};
use phi_model::weights::{RandomSource, TensorSource};
use phi_model::ModelConfig;

pub const HIDDEN: usize = 32;
pub const HEADS: usize = 4;
pub const KV: usize = 2;
pub const INTER: usize = 64;
pub const VOCAB: usize = 40;

pub fn config() -> ModelConfig {
    ModelConfig::from_value(
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "num_hidden_layers": 2,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "intermediate_size": INTER,
            "vocab_size": VOCAB, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true
        }),
        "test",
    )
    .unwrap()
}

/// llama.cpp's convert permutation: HF rotate-half rows to interleaved pairs.
pub fn permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + j * d / 2 + i;
                let dst = h * d + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

pub fn meta() -> Vec<(&'static str, Meta)> {
    vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Meta::U32(INTER as u32)),
        ("llama.block_count", Meta::U32(2)),
        ("llama.attention.head_count", Meta::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Meta::U32(KV as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.context_length", Meta::U32(256)),
        (
            "tokenizer.ggml.tokens",
            Meta::Strs((0..VOCAB).map(|i| format!("t{i}")).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
    ]
}

/// (HF name, shape, f32 values) of every tensor written.
pub type HfTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The random model's tensors as a GGUF with `ty_for(gguf name)` for every matrix.
pub fn model_gguf(ty_for: impl Fn(&str) -> u32) -> (Vec<u8>, HfTensors) {
    let (tensors, hf) = tensors(ty_for);
    let refs: Vec<(&str, Vec<usize>, u32, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, t, b)| (n.as_str(), s.clone(), *t, b.clone()))
        .collect();
    (gguf_bytes(&meta(), &refs), hf)
}

/// A GGUF tensor to write: (name, HF shape, ggml type, bytes).
type Stored = (String, Vec<usize>, u32, Vec<u8>);

fn tensors(ty_for: impl Fn(&str) -> u32) -> (Vec<Stored>, HfTensors) {
    let rnd = RandomSource { seed: 3 };
    let mut specs: Vec<(String, String, Vec<usize>)> = vec![(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
    )];
    specs.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![HIDDEN],
    ));
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (g, h, s) in [
            ("attn_norm", "input_layernorm", vec![HIDDEN]),
            ("ffn_norm", "post_attention_layernorm", vec![HIDDEN]),
            ("attn_q", "self_attn.q_proj", vec![HIDDEN, HIDDEN]),
            (
                "attn_k",
                "self_attn.k_proj",
                vec![HIDDEN * KV / HEADS, HIDDEN],
            ),
            (
                "attn_v",
                "self_attn.v_proj",
                vec![HIDDEN * KV / HEADS, HIDDEN],
            ),
            ("attn_output", "self_attn.o_proj", vec![HIDDEN, HIDDEN]),
            ("ffn_gate", "mlp.gate_proj", vec![INTER, HIDDEN]),
            ("ffn_up", "mlp.up_proj", vec![INTER, HIDDEN]),
            ("ffn_down", "mlp.down_proj", vec![HIDDEN, INTER]),
        ] {
            specs.push((format!("blk.{l}.{g}.weight"), format!("{p}.{h}.weight"), s));
        }
    }
    let mut hf = Vec::new();
    let mut tensors = Vec::new();
    for (g, h, shape) in &specs {
        let data = rnd.load_shaped(h, shape).unwrap().data;
        let stored = if g.contains("attn_q") {
            permute(&data, shape[0], shape[1], HEADS)
        } else if g.contains("attn_k") {
            permute(&data, shape[0], shape[1], KV)
        } else {
            data.clone()
        };
        let ty = if shape.len() == 1 { F32 } else { ty_for(g) };
        tensors.push((g.clone(), shape.clone(), ty, quantize(ty, &stored)));
        hf.push((h.clone(), shape.clone(), data));
    }
    (tensors, hf)
}

/// The model of `model_gguf(ty_for)` with every matrix decoded back to f32: the weights a
/// quantized base computes with, as a plain F32 file.
pub fn widened_gguf(ty_for: impl Fn(&str) -> u32) -> Vec<u8> {
    let (tensors, _) = tensors(ty_for);
    let wide: Vec<(&str, Vec<usize>, u32, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, ty, bytes)| {
            let n = shape.iter().product();
            let data = gguf::dequantize(*ty, bytes, n).expect("a type the loader decodes");
            (name.as_str(), shape.clone(), F32, quantize(F32, &data))
        })
        .collect();
    gguf_bytes(&meta(), &wide)
}

/// The model in `ty` (every matrix) and its widened twin, written into `dir` as
/// `tiny-<ty>.gguf` and `tiny-<ty>-f32.gguf`.
pub fn write_pair(dir: &std::path::Path, ty: u32) -> (std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).expect("a temp folder");
    let q = dir.join(format!("tiny-{ty}.gguf"));
    let w = dir.join(format!("tiny-{ty}-f32.gguf"));
    std::fs::write(&q, model_gguf(|_| ty).0).expect("a temp file");
    std::fs::write(&w, widened_gguf(|_| ty)).expect("a temp file");
    (q, w)
}

/// Token ids [rows, len] below the vocabulary, as an int64 `input_ids` safetensors file.
pub fn write_ids(path: &std::path::Path, rows: usize, len: usize) -> Vec<i64> {
    let ids: Vec<i64> = (0..rows * len)
        .map(|i| ((i * 7 + 3) % VOCAB) as i64)
        .collect();
    let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![rows, len], &bytes)
            .expect("a consistent view");
    let file = safetensors::serialize([("input_ids", view)], None).expect("serializable");
    std::fs::write(path, file).expect("a temp file");
    ids
}
