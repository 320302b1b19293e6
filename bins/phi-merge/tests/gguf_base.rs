//! phi-merge on a GGUF base kept in its blocks: the adapter is merged into the dequantized
//! weights, which equals merging it into the dequantized twin (the same values widened to an
//! F32 file), and phi-merge says so.

mod common;

use common::{merge, s, tmp};
use phi_model::gguf::{Q4_1, Q8_0};
use phi_model::io::write_safetensors;
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_testkit::tiny_llama::{write_pair, HEADS, HIDDEN, INTER, KV};
use std::collections::BTreeMap;
use std::path::Path;

/// A PEFT adapter (r 4, α 8) on every linear of the tiny Llama's two layers, B non-zero.
fn write_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let kv = HIDDEN * KV / HEADS;
    let mut map = BTreeMap::new();
    for l in 0..2 {
        for (i, (m, d_in, d_out)) in [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", HIDDEN, kv),
            ("self_attn.v_proj", HIDDEN, kv),
            ("self_attn.o_proj", HIDDEN, HIDDEN),
            ("mlp.gate_proj", HIDDEN, INTER),
            ("mlp.up_proj", HIDDEN, INTER),
            ("mlp.down_proj", INTER, HIDDEN),
        ]
        .into_iter()
        .enumerate()
        {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            let seed = (10 * l + i) as u64;
            let a = phi_testkit::values(4 * d_in, 2 * seed + 1);
            let b = phi_testkit::values(d_out * 4, 2 * seed + 2);
            map.insert(format!("{p}.lora_A.weight"), (vec![4, d_in], a));
            map.insert(format!("{p}.lora_B.weight"), (vec![d_out, 4], b));
        }
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &map, None).unwrap();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "use_rslora": false, "fan_in_fan_out": false, "modules_to_save": null
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

#[test]
fn merging_into_a_quantized_gguf_base_equals_merging_into_its_dequantized_values() {
    let dir = tmp("gguf-base");
    let adapter = dir.join("adapter");
    write_adapter(&adapter);
    for (name, ty) in [("Q8_0", Q8_0), ("Q4_1", Q4_1)] {
        let (q, w) = write_pair(&dir, ty);
        let (qo, wo) = (dir.join(format!("{name}-q")), dir.join(format!("{name}-w")));
        let (ok, said) = merge(&["--model", s(&q), "--adapter", s(&adapter), "--out", s(&qo)]);
        assert!(ok, "{name}: phi-merge failed: {said}");
        assert!(
            said.contains(&format!(
                "14 linear weights stored quantized ({name}): merged into their dequantized \
                 values, written as float32"
            )),
            "{name}: phi-merge does not say how it merged: {said}"
        );
        let (ok, err) = merge(&["--model", s(&w), "--adapter", s(&adapter), "--out", s(&wo)]);
        assert!(ok, "{name}: phi-merge of the widened file failed: {err}");
        assert!(!err.contains("stored quantized"), "{name}: {err}");
        let got = SafetensorsSource::open_files(&[qo.join("model.safetensors")]).unwrap();
        let want = SafetensorsSource::open_files(&[wo.join("model.safetensors")]).unwrap();
        let (mut gk, mut wk) = (got.names(), want.names());
        gk.sort();
        wk.sort();
        assert_eq!(gk, wk, "{name}: merged key sets");
        for k in &wk {
            let (g, w) = (got.load(k).unwrap().data, want.load(k).unwrap().data);
            assert_eq!(g, w, "{name}: merged {k}");
        }
        // The adapter moved the weights: the merge is not a copy of the base.
        let base = phi_model::resolve::resolve(s(&w)).unwrap();
        let k = "model.layers.1.mlp.down_proj.weight";
        let before = base.source.load(k).unwrap().data;
        let after = got.load(k).unwrap().data;
        let moved = before
            .iter()
            .zip(&after)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(moved > 1e-3, "{name}: {k} moved by only {moved}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
