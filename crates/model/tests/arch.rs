//! What each architecture file says of itself agrees with the model it loads, and Qwen2's
//! sliding-window settings read as transformers reads them.

use phi_model::arch::{Arch, LinearSpec};
use phi_model::ModelConfig;
use phi_testkit::oracle::cases;
use serde_json::{json, Value};

#[test]
fn layer_specs_and_fused_parts_match_the_loaded_layers() {
    let mut seen = Vec::new();
    for dir in cases() {
        let loaded = phi_model::load(dir.to_str().unwrap(), &phi_model::cpu_device()).unwrap();
        let cfg = &loaded.config;
        seen.push(cfg.arch);
        let specs = cfg.arch.layer_linears(cfg);
        for (i, layer) in loaded.model.model.layers.iter().enumerate() {
            let got: Vec<LinearSpec> = layer
                .block()
                .linears()
                .iter()
                .map(|(name, l)| LinearSpec {
                    name,
                    d_in: l.d_in(),
                    d_out: l.d_out(),
                    bias: l.bias.is_some(),
                })
                .collect();
            assert_eq!(got, specs, "{}: layer {i}", dir.display());
        }
        for f in cfg.arch.fused(cfg) {
            let spec = specs.iter().find(|s| s.name == f.module);
            let rows: usize = f.parts.iter().map(|(_, n)| n).sum();
            assert_eq!(spec.map(|s| s.d_out), Some(rows), "{}", f.module);
        }
        // transformers names the final norm as the architecture says, and nothing else.
        let names: Vec<String> = loaded.model.params().into_iter().map(|p| p.name).collect();
        let norm = format!("model.{}.weight", cfg.arch.final_norm());
        assert!(names.contains(&norm), "{}: no {norm}", dir.display());
    }
    assert!(seen.len() >= 2, "checked only {seen:?}");
}

fn qwen2(patch: Value) -> Result<ModelConfig, String> {
    let mut c = json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "vocab_size": 10, "sliding_window": 32, "max_window_layers": 28
    });
    for (k, v) in patch.as_object().unwrap() {
        c[k] = v.clone();
    }
    ModelConfig::from_value(c, "cfg.json").map_err(|e| e.to_string())
}

#[test]
fn qwen2_slides_only_with_use_sliding_window_and_in_every_layer_or_none() {
    let window = |p| qwen2(p).map(|c| c.sliding_window);
    // Hub configs carry a window with the switch off: no window.
    assert_eq!(window(json!({})), Ok(None));
    assert_eq!(window(json!({"use_sliding_window": false})), Ok(None));
    // Switched on: layers from max_window_layers on slide.
    let on = |p: Value| {
        let mut p = p;
        p["use_sliding_window"] = json!(true);
        window(p)
    };
    assert_eq!(on(json!({})), Ok(None), "28 full layers of 4: none slides");
    assert_eq!(on(json!({"max_window_layers": 0})), Ok(Some(32)));
    let types = |t: &str| json!({"layer_types": [t, t, t, t]});
    assert_eq!(on(types("sliding_attention")), Ok(Some(32)));
    assert_eq!(on(types("full_attention")), Ok(None));
    for mixed in [
        json!({"max_window_layers": 2}),
        json!({"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}),
    ] {
        let e = on(mixed.clone()).unwrap_err();
        assert!(
            e.starts_with("cfg.json: key ") && e.contains("in all 4 layers or in none"),
            "{mixed}: {e}"
        );
    }
    let e = on(json!({"layer_types": ["full_attention"]})).unwrap_err();
    assert!(
        e.contains("key layer_types") && e.contains("4 entries"),
        "{e}"
    );
}

#[test]
fn configs_of_both_transformers_styles_agree_on_the_window() {
    for dir in cases() {
        let legacy = dir.join("config_legacy.json");
        if legacy.exists() {
            let a = ModelConfig::from_file(&dir.join("config.json")).unwrap();
            let b = ModelConfig::from_file(&legacy).unwrap();
            assert_eq!(a.sliding_window, b.sliding_window, "{}", dir.display());
        }
    }
}

#[test]
fn unknown_classes_list_every_registered_one() {
    let e = ModelConfig::from_value(json!({"architectures": ["GPT2LMHeadModel"]}), "c.json")
        .unwrap_err()
        .to_string();
    for a in Arch::ALL {
        for class in a.classes() {
            assert!(e.contains(class), "{e}");
        }
    }
}
