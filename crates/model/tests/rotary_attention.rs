//! The fused attention (`rotary_attention` without a mask: head split, RoPE and causal
//! attention in one op) against the composed path that an explicit causal mask takes (Burn's
//! slices, RoPE ops and attention module): outputs and the gradients of the projections, for
//! a fused qkv and for q, k, v apart, with GQA, partial rotary and per-row positions.

use burn::tensor::{Bool, Distribution, Tensor, TensorData};
use phi_kernels::rotary::Rotary;
use phi_model::nn::{rotary_attention, LayerCtx, Projected};
use std::sync::Arc;

fn dev() -> burn::tensor::Device {
    burn::tensor::Device::flex().autodiff()
}

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = phi_testkit::oracle::max_scaled_diff(what, a, b);
    assert!(worst <= 2e-5, "{what}: worst error {worst}");
}

/// Tables for `rows` rows of t positions (any values: RoPE is linear in them, so random
/// tables test the rotation's form as well as real angles would).
fn ctx(rows: usize, t: usize, rot: usize, b: usize, masked: bool) -> LayerCtx {
    let n = rows * t * rot;
    let cos: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let sin: Vec<f32> = (0..n)
        .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
        .collect();
    let shape = [rows, 1, t, rot];
    // The composed path runs wherever a mask is given; this one is plain causal.
    let causal: Vec<bool> = (0..b * t * t).map(|i| i % t > i / t % t).collect();
    LayerCtx {
        cos: Tensor::from_data(TensorData::new(cos.clone(), shape), &dev()),
        sin: Tensor::from_data(TensorData::new(sin.clone(), shape), &dev()),
        rope: Arc::new(Rotary {
            cos,
            sin,
            rows,
            t,
            rot,
        }),
        mask: masked
            .then(|| Tensor::<4, Bool>::from_data(TensorData::new(causal, [b, 1, t, t]), &dev())),
    }
}

/// (output, gradient of each input) for one path.
fn run(
    inputs: &[Tensor<3>],
    fused_qkv: bool,
    heads: usize,
    kv: usize,
    ctx: &LayerCtx,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let inputs: Vec<Tensor<3>> = inputs.iter().map(|t| t.clone().require_grad()).collect();
    let p = match fused_qkv {
        true => Projected::Fused(inputs[0].clone()),
        false => Projected::Split(inputs[0].clone(), inputs[1].clone(), inputs[2].clone()),
    };
    let y = rotary_attention(p, heads, kv, ctx, None);
    dev().seed(5);
    let up = Tensor::<3>::random(y.shape(), Distribution::Normal(0.0, 1.0), &dev()).detach();
    let g = (y.clone() * up).sum().backward();
    let grads = inputs.iter().map(|t| vals(t.grad(&g).unwrap())).collect();
    (vals(y), grads)
}

#[test]
fn fused_rotary_attention_matches_the_composed_path() {
    let (b, t, d) = (2, 7, 8);
    // (heads, kv heads, rotary dims, table rows, fused qkv)
    for (heads, kv, rot, rows, fused_qkv) in [
        (4, 2, d, 1, true),
        (4, 2, d, 1, false),
        (3, 3, d / 2, b, true),
        (4, 1, d / 2, b, false),
    ] {
        let what = format!("heads {heads}/{kv}, rot {rot}, rows {rows}, fused {fused_qkv}");
        dev().seed(11);
        let rand = |w: usize| {
            Tensor::<3>::random([b, t, w], Distribution::Normal(0.0, 1.0), &dev()).detach()
        };
        let inputs = match fused_qkv {
            true => vec![rand((heads + 2 * kv) * d)],
            false => vec![rand(heads * d), rand(kv * d), rand(kv * d)],
        };
        let fused = run(&inputs, fused_qkv, heads, kv, &ctx(rows, t, rot, b, false));
        let composed = run(&inputs, fused_qkv, heads, kv, &ctx(rows, t, rot, b, true));
        close(&fused.0, &composed.0, &format!("{what}: output"));
        for (i, (f, c)) in fused.1.iter().zip(&composed.1).enumerate() {
            close(f, c, &format!("{what}: gradient of input {i}"));
            assert!(
                f.iter().any(|v| *v != 0.0),
                "{what}: input {i} has a zero gradient"
            );
        }
    }
}
