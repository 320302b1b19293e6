//! Norm surgery on every LayerNorm (Phi-2-style) oracle case: the swapped norm computes
//! RMSNorm by hand, capture reports it, and a saved swapped model reloads to the same logits.
//! Prints how far the first forward moves from the original model (docs/recipes.md).

use burn::tensor::Tensor;
use phi_model::capture::capture;
use phi_model::export::{source_config, write_model_folder, OutDtype};
use phi_model::loss::causal_lm_loss;
use phi_model::resolve::resolve_dir;
use phi_model::surgery::{layernorm_to_rmsnorm, record_in_config, DEFAULT_EPS};
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_model::{cpu_device, Arch, CausalLm, TapRequest};
use phi_testkit::oracle::{cases_where, Case};

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("readback")
}

fn load(dir: &std::path::Path) -> (CausalLm, phi_model::ModelConfig) {
    let r = resolve_dir(dir).unwrap();
    let m = CausalLm::load(&r.config, r.source.as_ref(), &cpu_device()).unwrap();
    (m, r.config)
}

/// The oracle cases whose model has LayerNorms, found by their config (never by name).
fn layernorm_cases() -> Vec<Case> {
    cases_where("a LayerNorm model", |d| {
        resolve_dir(d).is_ok_and(|r| r.config.arch == Arch::Phi2)
    })
    .into_iter()
    .map(|d| Case::open(&d))
    .collect()
}

#[test]
fn swapped_norms_compute_rmsnorm_by_hand() {
    for case in layernorm_cases() {
        let (m, cfg) = load(&case.dir);
        let n_layers = m.num_layers();
        let (m, swapped) = layernorm_to_rmsnorm(m, DEFAULT_EPS);
        assert_eq!(
            swapped,
            n_layers + 1,
            "{}: every block norm and the final one",
            case.name
        );
        let (inp, _) = case.batch();
        let out = m.forward(&inp, &TapRequest::all(n_layers));
        let src = SafetensorsSource::open_dir(&case.dir).unwrap();
        let h = cfg.hidden_size;
        for layer in [0, n_layers - 1] {
            let x = vals(out.taps.hidden_states[layer].clone());
            let got = vals(out.taps.input_layernorm[&layer].clone());
            let w = src
                .load(&format!("model.layers.{layer}.input_layernorm.weight"))
                .unwrap()
                .data;
            for (row, g) in x.chunks(h).zip(got.chunks(h)) {
                let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
                let inv = 1.0 / (ms + DEFAULT_EPS).sqrt();
                for i in 0..h {
                    let want = row[i] as f64 * inv * w[i] as f64;
                    assert!(
                        (g[i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{} layer {layer}: {} vs {want}",
                        case.name,
                        g[i]
                    );
                }
            }
        }
        // capture's summary names the norm each slot now holds.
        let (_, summary) = capture(&m, &inp, None);
        for l in summary["layers"].as_array().unwrap() {
            assert_eq!(l["norm_type"], "rmsnorm", "{}", case.name);
        }
        assert_eq!(summary["final_norm_type"], "rmsnorm");
        let (orig, _) = load(&case.dir);
        let (_, s0) = capture(&orig, &inp, None);
        assert_eq!(s0["layers"][0]["norm_type"], "layernorm");
        assert_eq!(s0["final_norm_type"], "layernorm");
    }
}

#[test]
fn first_forward_moves_and_saved_model_reloads_identically() {
    for case in layernorm_cases() {
        let (orig, _) = load(&case.dir);
        let (inp, labels) = case.batch();
        let before = orig.forward(&inp, &TapRequest::none()).logits;
        let loss0 = vals(causal_lm_loss(before.clone(), &labels))[0];
        let (m, _) = layernorm_to_rmsnorm(orig, DEFAULT_EPS);
        let after = m.forward(&inp, &TapRequest::none()).logits;
        let loss1 = vals(causal_lm_loss(after.clone(), &labels))[0];
        let (a, b) = (vals(before), vals(after));
        let diff = phi_testkit::oracle::max_abs_diff("logits", &a, &b);
        let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        println!(
            "{}: rmsnorm surgery (eps {DEFAULT_EPS}): max |Δlogits| {diff:.4} (max |logit| {scale:.3}), loss {loss0:.5} -> {loss1:.5} ({:+.5})",
            case.name,
            loss1 - loss0
        );
        assert!(
            diff > 0.0,
            "{}: the surgery must change the function",
            case.name
        );
        assert!(loss1.is_finite());

        let dir =
            std::env::temp_dir().join(format!("phi-surgery-{}-{}", std::process::id(), case.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = source_config(Some(&case.dir), None).unwrap();
        record_in_config(&mut config, DEFAULT_EPS);
        let tensors = m.hf_tensors();
        assert!(
            !tensors.iter().any(|(n, _)| n.contains("layernorm.bias")),
            "{}: swapped norms have no bias",
            case.name
        );
        write_model_folder(&dir, &tensors, config, OutDtype::F32, 1 << 30, None).unwrap();
        let (re, cfg) = load(&dir);
        assert_eq!(cfg.rms_surgery_eps(), Some(DEFAULT_EPS));
        let c = vals(re.forward(&inp, &TapRequest::none()).logits);
        assert_eq!(b, c, "{}: reloaded logits", case.name);
        assert_eq!(re.norm_kinds().1, "rmsnorm");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn surgery_is_refused_in_config_for_rmsnorm_models() {
    let dir = cases_where("an RMSNorm model", |d| {
        resolve_dir(d).is_ok_and(|r| r.config.arch != Arch::Phi2)
    })
    .remove(0);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    v["norm_surgery"] = "rmsnorm".into();
    let err = phi_model::ModelConfig::from_value(v, "config.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm_surgery"), "{err}");
}
