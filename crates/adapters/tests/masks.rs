//! Freeze masks, target resolution, initialisation and counts on random models of each
//! architecture: properties that must hold whatever the model's size.

use burn::tensor::Tensor;
use phi_adapters::freeze::{trainable_names, Counts, LayerSel, Selection};
use phi_adapters::{lora, targets, LoraConfig, Targets};
use phi_model::weights::RandomSource;
use phi_model::{cpu_device, CausalLm, Inputs, ModelConfig, TapRequest};
use serde_json::json;
use std::collections::BTreeSet;

fn model(arch: &str, tied: bool) -> CausalLm {
    let cfg = ModelConfig::from_value(
        json!({
            "architectures": [arch], "hidden_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
            "vocab_size": 50, "rope_theta": 10000.0, "tie_word_embeddings": tied,
            "partial_rotary_factor": 0.5
        }),
        "test",
    )
    .unwrap();
    CausalLm::load(&cfg, &RandomSource { seed: 3 }, &cpu_device()).unwrap()
}

const ARCHS: [&str; 3] = ["LlamaForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM"];

fn set(v: Vec<String>) -> BTreeSet<String> {
    v.into_iter().collect()
}

#[test]
fn layer_selection_parses_lf_counts_lists_and_ranges() {
    assert_eq!(LayerSel::parse("2").unwrap(), LayerSel::Last(2));
    assert_eq!(LayerSel::parse("-3").unwrap(), LayerSel::First(3));
    assert_eq!(
        LayerSel::parse("2,4,10-12").unwrap(),
        LayerSel::List([2, 4, 10, 11, 12].into())
    );
    assert_eq!(LayerSel::parse("all").unwrap(), LayerSel::All);
    for bad in ["0", "", "3-1", "a", "1,,x"] {
        let e = LayerSel::parse(bad).unwrap_err().to_string();
        assert!(e.contains("freeze_trainable_layers"), "{bad}: {e}");
    }
    assert_eq!(
        LayerSel::Last(2).layers(6).unwrap(),
        [4, 5].into_iter().collect()
    );
    assert_eq!(
        LayerSel::First(2).layers(6).unwrap(),
        [0, 1].into_iter().collect()
    );
    assert!(LayerSel::Last(7).layers(6).is_err());
    assert!(LayerSel::parse("1,6").unwrap().layers(6).is_err());
}

#[test]
fn norm_only_selects_every_norm_and_nothing_else() {
    for arch in ARCHS {
        let m = model(arch, false);
        let names = trainable_names(&m, &Selection::NormOnly).unwrap();
        let norms: Vec<String> = m.norm_params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(set(names.clone()), set(norms), "{arch}");
        // 4 layers: Llama/Phi-3 two RMSNorms each + final; Phi-2 one LayerNorm (w, b) + final (w, b).
        let want = if arch == "PhiForCausalLM" { 10 } else { 9 };
        assert_eq!(names.len(), want, "{arch}");
    }
}

#[test]
fn freeze_follows_llama_factory_and_explicit_lists() {
    let m = model("LlamaForCausalLM", false);
    let last2 = trainable_names(
        &m,
        &Selection::Freeze {
            layers: LayerSel::Last(2),
            modules: vec![],
            extra: vec![],
        },
    )
    .unwrap();
    assert!(last2
        .iter()
        .all(|n| n.starts_with("model.layers.2.") || n.starts_with("model.layers.3.")));
    // 7 linears + 2 norms per Llama layer.
    assert_eq!(last2.len(), 2 * 9);

    let mlp_first = trainable_names(
        &m,
        &Selection::Freeze {
            layers: LayerSel::First(1),
            modules: vec!["mlp".into(), "post_attention_layernorm".into()],
            extra: vec!["embed_tokens".into(), "lm_head".into(), "norm".into()],
        },
    )
    .unwrap();
    assert_eq!(
        set(mlp_first),
        set(vec![
            "model.layers.0.mlp.gate_proj.weight".into(),
            "model.layers.0.mlp.up_proj.weight".into(),
            "model.layers.0.mlp.down_proj.weight".into(),
            "model.layers.0.post_attention_layernorm.weight".into(),
            "model.embed_tokens.weight".into(),
            "lm_head.weight".into(),
            "model.norm.weight".into(),
        ])
    );

    let listed = trainable_names(
        &m,
        &Selection::Freeze {
            layers: LayerSel::parse("1,3").unwrap(),
            modules: vec!["all".into()],
            extra: vec![],
        },
    )
    .unwrap();
    let layers: BTreeSet<usize> = listed
        .iter()
        .map(|n| targets::layer_index(n).unwrap())
        .collect();
    assert_eq!(layers, [1, 3].into_iter().collect());

    let e = trainable_names(
        &m,
        &Selection::Freeze {
            layers: LayerSel::All,
            modules: vec!["attn".into()],
            extra: vec![],
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("freeze_trainable_modules") && e.contains("self_attn"),
        "{e}"
    );
    let tied = model("LlamaForCausalLM", true);
    let e = trainable_names(
        &tied,
        &Selection::Freeze {
            layers: LayerSel::All,
            modules: vec![],
            extra: vec!["lm_head".into()],
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tie"), "{e}");
}

#[test]
fn all_linear_excludes_the_head_and_names_match_by_suffix() {
    for arch in ARCHS {
        let m = model(arch, false);
        let cfg = LoraConfig::default();
        let t = targets::resolve(&m, &cfg).unwrap();
        assert!(!t.iter().any(|p| p == "lm_head"), "{arch}");
        assert_eq!(t.len(), m.linears().len() - 1, "{arch}");
    }
    let m = model("Phi3ForCausalLM", false);
    let cfg = LoraConfig {
        targets: Targets::parse("qkv_proj"),
        layers_to_transform: Some(vec![1]),
        ..Default::default()
    };
    assert_eq!(
        targets::resolve(&m, &cfg).unwrap(),
        vec!["model.layers.1.self_attn.qkv_proj".to_string()]
    );
    let cfg = LoraConfig {
        targets: Targets::parse(r"re:.*\.(o_proj|down_proj)"),
        ..Default::default()
    };
    assert_eq!(targets::resolve(&m, &cfg).unwrap().len(), 8);
}

/// PEFT's `inject_adapter` raises only when no module matched at all, so one target list can
/// serve several architectures; the error then names every target and the model's modules.
#[test]
fn unmatched_target_names_fail_only_when_nothing_matches() {
    let phi3 = model("Phi3ForCausalLM", false);
    let llama = model("LlamaForCausalLM", false);
    let cfg = LoraConfig {
        targets: Targets::parse("q_proj,qkv_proj,no_such_proj"),
        ..Default::default()
    };
    let got = targets::resolve(&phi3, &cfg).unwrap();
    let want: Vec<String> = (0..4)
        .map(|i| format!("model.layers.{i}.self_attn.qkv_proj"))
        .collect();
    assert_eq!(got, want);
    let got = targets::resolve(&llama, &cfg).unwrap();
    let want: Vec<String> = (0..4)
        .map(|i| format!("model.layers.{i}.self_attn.q_proj"))
        .collect();
    assert_eq!(got, want);

    let cfg = LoraConfig {
        targets: Targets::parse("q_proj,no_such_proj"),
        ..Default::default()
    };
    let e = targets::resolve(&phi3, &cfg).unwrap_err().to_string();
    for part in [
        "target_modules",
        "q_proj",
        "no_such_proj",
        "qkv_proj",
        "gate_up_proj",
    ] {
        assert!(e.contains(part), "{part} missing from: {e}");
    }
    assert_eq!(e.lines().count(), 1, "{e}");
    // Matching names outside layers_to_transform count as no match.
    let cfg = LoraConfig {
        targets: Targets::parse("qkv_proj"),
        layers_to_transform: Some(vec![9]),
        ..Default::default()
    };
    let e = targets::resolve(&phi3, &cfg).unwrap_err().to_string();
    assert!(
        e.contains("layers_to_transform") && e.contains("[9]"),
        "{e}"
    );
    let cfg = LoraConfig {
        targets: Targets::parse(r"re:.*\.nothing"),
        ..Default::default()
    };
    let e = targets::resolve(&phi3, &cfg).unwrap_err().to_string();
    assert!(e.contains(r"re:.*\.nothing"), "{e}");
}

#[test]
fn fresh_adapter_is_a_no_op_with_peft_init_and_counts() {
    for arch in ARCHS {
        let mut m = model(arch, true);
        let inp = Inputs::new(1, 5, vec![1, 7, 3, 9, 2]);
        let before: Tensor<3> = m.forward(&inp, &TapRequest::none()).logits;
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            seed: 1,
            ..Default::default()
        };
        let paths = lora::attach(&mut m, &cfg).unwrap();
        let after: Tensor<3> = m.forward(&inp, &TapRequest::none()).logits;
        let d = (before - after).abs().max().into_scalar::<f32>();
        assert_eq!(d, 0.0, "{arch}: B = 0 must leave the logits unchanged");
        for (p, lin) in m.linears() {
            let Some(l) = &lin.lora else { continue };
            let a: Vec<f32> = l.a.val().try_into_vec_as().unwrap();
            let bound = 1.0 / (lin.d_in() as f32).sqrt();
            assert!(a.iter().all(|v| v.abs() <= bound), "{arch} {p}");
            // U(±b) has std b/√3: a loose check that the whole range is used.
            let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
            assert!(
                (std - bound / 3f32.sqrt()).abs() < 0.25 * bound,
                "{arch} {p}: {std}"
            );
            assert_eq!(l.scale, 2.0);
        }
        let names = trainable_names(
            &m,
            &Selection::Lora {
                modules_to_save: vec![],
            },
        )
        .unwrap();
        let counts = Counts::of(&m, &names);
        let lora_numel: usize = m
            .linears()
            .iter()
            .filter_map(|(_, l)| l.lora.as_ref().map(|_| 4 * (l.d_in() + l.d_out())))
            .sum();
        assert_eq!(counts.trainable, lora_numel, "{arch}");
        assert_eq!(names.len(), 2 * paths.len());
        let line = counts.to_string();
        assert!(line.starts_with("trainable params: ") && line.contains(" || all params: "));
        assert!(line.ends_with(&format!(
            "{:.4}",
            100.0 * counts.trainable as f64 / counts.all as f64
        )));
    }
    let c = Counts {
        trainable: 4194304,
        all: 3825274880,
    };
    assert_eq!(
        c.to_string(),
        "trainable params: 4,194,304 || all params: 3,825,274,880 || trainable%: 0.1096"
    );
}

#[test]
fn rslora_scale_and_patterns() {
    let cfg = LoraConfig {
        r: 16,
        alpha: 32.0,
        use_rslora: true,
        rank_pattern: [("down_proj".to_string(), 4)].into(),
        ..Default::default()
    };
    assert_eq!(cfg.scale_for("model.layers.0.mlp.up_proj"), 8.0);
    assert_eq!(cfg.rank_for("model.layers.0.mlp.down_proj"), 4);
    assert_eq!(cfg.scale_for("model.layers.0.mlp.down_proj"), 16.0);
    let plain = LoraConfig {
        use_rslora: false,
        ..cfg
    };
    assert_eq!(plain.scale_for("model.layers.0.mlp.up_proj"), 2.0);
}

#[test]
fn dropout_acts_only_when_training_on_an_autodiff_device() {
    let device = cpu_device().autodiff();
    let cfg = ModelConfig::from_value(
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
               "vocab_size": 50, "rope_theta": 10000.0}),
        "test",
    )
    .unwrap();
    let mut m = CausalLm::load(&cfg, &RandomSource { seed: 3 }, &device).unwrap();
    lora::attach(
        &mut m,
        &LoraConfig {
            r: 4,
            dropout: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    // Make B non-zero so the side path shows.
    for p in lora::adapted(&m) {
        let l = m.linear_mut(&p).unwrap().lora.as_mut().unwrap();
        l.b = burn::module::Param::from_tensor(l.b.val().ones_like());
    }
    let inp = Inputs::new(1, 6, vec![1, 2, 3, 4, 5, 6]);
    let run = |m: &CausalLm| -> Vec<f32> {
        m.forward(&inp, &TapRequest::none())
            .logits
            .try_into_vec_as()
            .unwrap()
    };
    let (a, b) = (run(&m), run(&m));
    assert_ne!(
        a, b,
        "dropout 0.5 in training must change the output between calls"
    );
    let eval = burn::module::Module::valid(&m);
    let (c, d) = (run(&eval), run(&eval));
    assert_eq!(c, d, "no dropout in eval");
}
