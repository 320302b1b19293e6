//! Every recipe in examples/ runs end to end for two steps on a small random model of its
//! architecture, with the real tokenizer and dataset it names, and leaves the outputs its
//! recipe promises. A recipe without an entry here fails the test, so none goes untested.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The stand-in architecture (vocab as the real model's) and tokenizer of each recipe.
fn stand_in(recipe: &str) -> Option<(Value, &'static str)> {
    let phi3 = json!({
        "architectures": ["Phi3ForCausalLM"], "hidden_size": 32, "num_hidden_layers": 6,
        "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
        "vocab_size": 32064, "tie_word_embeddings": false, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000
    });
    let llama = |vocab: usize, bos: u32, eos: u32| {
        json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
            "vocab_size": vocab, "tie_word_embeddings": true, "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
            "bos_token_id": bos, "eos_token_id": eos
        })
    };
    Some(match recipe {
        "phi3_rmsnorm_regularization" | "phi3_bos_zero_lora" => (phi3, "phi3"),
        "llama3_lora" => (llama(128256, 128000, 128009), "llama3_1"),
        "quickstart" => (llama(49152, 1, 2), "smollm2"),
        "phi2_lora" => (
            json!({
                "architectures": ["PhiForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 51200,
                "partial_rotary_factor": 0.4, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5,
                "rope_theta": 10000.0, "max_position_embeddings": 2048,
                "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": false
            }),
            "gpt2",
        ),
        _ => return None,
    })
}

#[test]
fn every_example_recipe_trains() {
    let tmp = scratch("recipes");
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    recipes.sort();
    assert!(recipes.len() >= 5, "{recipes:?}");
    for recipe in recipes {
        let name = recipe.file_stem().unwrap().to_str().unwrap().to_string();
        let (config, tok) =
            stand_in(&name).unwrap_or_else(|| panic!("{name}: no stand-in model in this test"));
        let model = tmp.join(format!("{name}-model"));
        phi_model::export::write_random_model(&model, config, 7, phi_model::export::OutDtype::F32)
            .unwrap();
        let out = tmp.join(&name);
        let p = |x: &Path| x.display().to_string();
        let args: Vec<String> = [
            p(&recipe),
            "--model_name_or_path".into(),
            p(&model),
            "--tokenizer".into(),
            p(&root().join("assets/tokenizers").join(tok)),
            "--dataset_dir".into(),
            p(&root().join("data")),
            "--output_dir".into(),
            p(&out),
            "--max_samples".into(),
            "12".into(),
            "--cutoff_len".into(),
            "96".into(),
            "--max_steps".into(),
            "2".into(),
            "--logging_steps".into(),
            "1".into(),
        ]
        .to_vec();
        let (ok, err) = run(&args);
        assert!(ok, "{name}: {err}");
        let settings: toml::Table =
            toml::from_str(&std::fs::read_to_string(&recipe).unwrap()).unwrap();
        let on = |k: &str| settings.get(k).and_then(|v| v.as_bool()) == Some(true);
        let lines = log_lines(&out);
        let losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
        assert_eq!(losses.len(), 2, "{name}: {lines:?}");
        assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{name}");
        let lora = settings["finetuning_type"].as_str() == Some("lora");
        let weights = if lora {
            "adapter_model.safetensors"
        } else {
            "model.safetensors"
        };
        for f in [
            weights,
            "training_args.toml",
            "training_loss.png",
            "checkpoint-2/trainer_state.json",
        ] {
            assert!(out.join(f).exists(), "{name}: no {f}");
        }
        if on("use_rmsnorm_regularization") {
            assert!(out.join("rmsnorm_reg_config.json").exists(), "{name}");
            assert!(lines[0]["rmsnorm_reg_loss"].as_f64().is_some(), "{name}");
        }
        if on("use_bos_zero_training") {
            assert!(out.join("bos_zero_config.json").exists(), "{name}");
        }
        if settings.get("val_size").is_some() {
            assert!(
                lines.iter().any(|l| l["eval_loss"].as_f64().is_some()),
                "{name}: no eval_loss"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
