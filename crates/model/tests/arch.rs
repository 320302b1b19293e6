//! What each architecture file says of itself agrees with the model it loads.

use phi_model::arch::{Arch, LinearSpec};
use phi_model::ModelConfig;
use phi_testkit::oracle::cases;
use serde_json::json;

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
