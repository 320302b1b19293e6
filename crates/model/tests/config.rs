//! config.json parsing: both transformers styles agree, and bad values name their key.

use phi_model::ModelConfig;
use phi_testkit::oracle::cases;
use serde_json::json;

#[test]
fn legacy_and_new_configs_parse_to_the_same_model() {
    for case in cases() {
        let legacy = case.join("config_legacy.json");
        if !legacy.exists() {
            continue;
        }
        let a = ModelConfig::from_file(&case.join("config.json")).unwrap();
        let b = ModelConfig::from_file(&legacy).unwrap();
        let key = |c: &ModelConfig| {
            format!(
                "{:?} {} {} {} {:?} {} {:?} {}",
                c.arch,
                c.rope_theta,
                c.partial_rotary_factor,
                c.head_dim,
                c.rope_scaling,
                c.norm_eps,
                c.dtype,
                c.tie_word_embeddings
            )
        };
        assert_eq!(key(&a), key(&b), "{}", case.display());
    }
}

fn err(mut patch: serde_json::Value) -> String {
    let mut base = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 10
    });
    for (k, v) in patch.as_object_mut().unwrap().iter() {
        base[k] = v.clone();
    }
    ModelConfig::from_value(base, "cfg.json")
        .expect_err("should fail")
        .to_string()
}

#[test]
fn bad_values_name_the_file_and_key() {
    let e = err(json!({"num_key_value_heads": 3}));
    assert!(
        e.starts_with("cfg.json: key num_key_value_heads:") && e.contains("divisor"),
        "{e}"
    );
    let e = err(json!({"hidden_size": "wide"}));
    assert!(
        e.contains("key hidden_size") && e.contains("integer"),
        "{e}"
    );
    let e = err(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}));
    assert!(
        e.contains("rope_scaling.rope_type") && e.contains("yarn"),
        "{e}"
    );
    let e = err(json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}));
    assert!(e.contains("rope_parameters.factor"), "{e}");
    let e = err(json!({"architectures": ["GPTNeoXForCausalLM"]}));
    assert!(
        e.contains("unsupported architecture") && e.contains("GPTNeoXForCausalLM"),
        "{e}"
    );
    let e = err(json!({"vocab_size": null}));
    assert!(e.contains("key vocab_size") && e.contains("missing"), "{e}");
}

#[test]
fn llama3_eos_lists_and_mistral_parse() {
    let c = ModelConfig::from_value(
        json!({
            "architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 128,
            "vocab_size": 10, "eos_token_id": [7, 8], "sliding_window": 4096, "torch_dtype": "bfloat16"
        }),
        "m.json",
    )
    .unwrap();
    assert_eq!(c.eos_token_ids, vec![7, 8]);
    assert_eq!(
        (c.sliding_window, c.dtype.as_deref()),
        (Some(4096), Some("bfloat16"))
    );
    assert_eq!(c.head_dim, 16);
}
