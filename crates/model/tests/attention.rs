//! Attention masking properties on random models of configurable shape.

use burn::tensor::Tensor;
use phi_model::weights::RandomSource;
use phi_model::{cpu_device, CausalLm, Inputs, ModelConfig, TapRequest};

fn model(window: Option<usize>) -> CausalLm {
    let cfg = ModelConfig::from_value(
        serde_json::json!({
            "architectures": ["MistralForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
            "vocab_size": 50, "rope_theta": 10000.0, "sliding_window": window
        }),
        "test",
    )
    .unwrap();
    CausalLm::load(&cfg, &RandomSource { seed: 7 }, &cpu_device()).unwrap()
}

fn logits(m: &CausalLm, ids: &[i64]) -> Vec<Vec<f32>> {
    let out: Tensor<3> = m
        .forward(
            &Inputs::new(1, ids.len(), ids.to_vec()),
            &TapRequest::none(),
        )
        .logits;
    out.try_into_vec_as::<f32>()
        .unwrap()
        .chunks(50)
        .map(<[f32]>::to_vec)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    phi_testkit::oracle::max_abs_diff("logits", a, b)
}

/// With one layer and a window of w, position q sees exactly tokens q-w+1..=q; RoPE is
/// relative, so its logits equal those of that slice encoded on its own.
#[test]
fn sliding_window_limits_what_a_token_sees() {
    let w = 4;
    let ids: Vec<i64> = (0..11).map(|i| (i * 13 + 3) % 50).collect();
    let windowed = model(Some(w));
    let full = model(None);
    let all = logits(&windowed, &ids);
    let unwindowed = logits(&full, &ids);
    for q in w - 1..ids.len() {
        let slice = logits(&full, &ids[q + 1 - w..=q]);
        let d = max_diff(&all[q], slice.last().unwrap());
        assert!(d < 1e-4, "position {q}: {d}");
    }
    // Early positions are unaffected, later ones change: the window is really applied.
    assert!(max_diff(&all[w - 1], &unwindowed[w - 1]) < 1e-5);
    assert!(max_diff(&all[10], &unwindowed[10]) > 1e-3);
}

/// Right padding changes nothing for the real tokens of a row.
#[test]
fn right_padding_leaves_real_tokens_unchanged() {
    let m = model(None);
    let ids: Vec<i64> = vec![5, 9, 14, 2, 33, 41];
    let alone = logits(&m, &ids[..4]);
    let padded = Inputs::new(1, 6, vec![5, 9, 14, 2, 0, 0]).with_mask(vec![1, 1, 1, 1, 0, 0]);
    let out: Tensor<3> = m.forward(&padded, &TapRequest::none()).logits;
    let rows: Vec<Vec<f32>> = out
        .try_into_vec_as::<f32>()
        .unwrap()
        .chunks(50)
        .map(<[f32]>::to_vec)
        .collect();
    for q in 0..4 {
        assert!(max_diff(&rows[q], &alone[q]) < 1e-5, "position {q}");
    }
}
