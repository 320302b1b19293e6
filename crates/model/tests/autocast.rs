//! Autocast on configurations the oracle cases do not cover (grouped-query attention, other
//! widths): half-precision matmuls must change the numbers, and stay close to f32.

use burn::tensor::{DType, Tensor};
use phi_model::loss::causal_lm_loss;
use phi_model::precision::autocast;
use phi_model::{cpu_device, Inputs, TapRequest};
use phi_testkit::oracle::max_abs_diff;

fn config(arch: &str, heads: usize, kv: usize, hidden: usize) -> serde_json::Value {
    let (architecture, model_type) = match arch {
        "phi3" => ("Phi3ForCausalLM", "phi3"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": 2,
        "vocab_size": 96,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
}

#[test]
fn half_matmuls_move_the_loss_on_every_config() {
    for (arch, heads, kv, hidden) in [
        ("phi3", 4, 4, 64),
        ("phi3", 4, 2, 64),
        ("phi3", 8, 2, 128),
        ("phi3", 6, 1, 96),
        ("llama", 4, 2, 64),
    ] {
        let dir = std::env::temp_dir().join(format!(
            "phi-autocast-{arch}-{heads}-{kv}-{hidden}-{}",
            std::process::id()
        ));
        phi_model::export::write_random_model(
            &dir,
            config(arch, heads, kv, hidden),
            3,
            phi_model::export::OutDtype::F32,
        )
        .unwrap();
        let m = phi_model::load(&dir.display().to_string(), &cpu_device().autodiff())
            .unwrap()
            .model;
        let ids: Vec<i64> = (0..24).map(|i| (i * 7 + 3) % 96).collect();
        let inp = Inputs::new(2, 12, ids.clone());
        let run = |dt: Option<DType>| -> (Vec<f32>, f32) {
            let _g = autocast(dt);
            let l: Tensor<3> = m.forward(&inp, &TapRequest::none()).logits;
            let v = l.clone().try_into_vec_as::<f32>().unwrap();
            (v, causal_lm_loss(l, &ids).into_scalar::<f32>())
        };
        let (f32_logits, f32_loss) = run(None);
        // Bounds as the oracle test's against PEFT: bf16 5e-3, f16 1e-3 relative loss.
        for (dt, tol) in [(DType::F16, 1e-3), (DType::BF16, 5e-3)] {
            let (logits, loss) = run(Some(dt));
            let moved = max_abs_diff("logits", &logits, &f32_logits);
            let rel = ((loss - f32_loss) / f32_loss).abs();
            let what = format!("{arch} heads {heads} kv {kv} hidden {hidden} {dt:?}");
            println!("{what}: max |Δlogit| {moved:e}, loss rel {rel:e}");
            assert!(moved > 0.0 && moved.is_finite(), "{what}: logits unchanged");
            assert!(rel <= tol, "{what}: loss {loss} vs f32 {f32_loss}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
