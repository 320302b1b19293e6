//! The fused attention (`rotary_attention` in training: head split, RoPE and causal attention
//! in one op) against the same composed from Burn's slices, RoPE ops and attention module:
//! outputs and the gradients of the projections, for a fused qkv and for q, k, v apart, with
//! GQA, partial rotary, per-row positions, and padding and packing masks.

use burn::tensor::{Bool, Tensor, TensorData};
use phi_kernels::bf16::Path;
use phi_kernels::rotary::Rotary;
use phi_model::nn::{apply_rotary, attend, rotary_attention, split_heads, LayerCtx, Projected};
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

/// Values in [-1, 1) from a seed of the test's own: tests run at once, and reseeding the
/// device's shared generator in one let another's draws interleave with it (a gradient then
/// compared against one made with other upstream values).
fn filled<const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &burn::tensor::Device,
) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(phi_testkit::values(n, seed), shape), device)
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = phi_testkit::oracle::max_scaled_diff(what, a, b);
    assert!(worst <= 2e-5, "{what}: worst error {worst}");
}

/// Tables for `rows` rows of t positions (any values: RoPE is linear in them, so random
/// tables test the rotation's form as well as real angles would), and the mask that
/// `keys` ([B, t] segment ids, 0 = padding; None: plain causal) gives, as the model builds it.
fn ctx(rows: usize, t: usize, rot: usize, b: usize, keys: Option<&[i64]>) -> LayerCtx {
    let n = rows * t * rot;
    let cos: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let sin: Vec<f32> = (0..n)
        .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
        .collect();
    let shape = [rows, 1, t, rot];
    let hidden = keys.map(|keys| {
        let mut m = vec![false; b * t * t];
        for r in 0..b {
            let keys = &keys[r * t..(r + 1) * t];
            for q in 0..t {
                for k in 0..t {
                    let other = keys[q] != 0 && keys[k] != keys[q];
                    m[(r * t + q) * t + k] = k > q || keys[k] == 0 || other;
                }
            }
        }
        m
    });
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
        mask: hidden
            .clone()
            .map(|m| Tensor::<4, Bool>::from_data(TensorData::new(m, [b, 1, t, t]), &dev())),
        hidden: hidden.map(Arc::new),
        bias: None,
        bf16: None,
    }
}

/// The composed path: slices, head split, RoPE and Burn's attention (with an explicit
/// causal mask where `ctx` has none).
fn composed(p: Projected, heads: usize, kv: usize, ctx: &LayerCtx) -> Tensor<3> {
    let (q, k, v) = match p {
        Projected::Split(q, k, v) => (q, k, v),
        Projected::Fused(x) => {
            let [b, t, n] = x.dims();
            let d = n / (heads + 2 * kv);
            let (qd, kd) = (heads * d, kv * d);
            (
                x.clone().slice([0..b, 0..t, 0..qd]),
                x.clone().slice([0..b, 0..t, qd..qd + kd]),
                x.slice([0..b, 0..t, qd + kd..n]),
            )
        }
    };
    let [b, t, _] = q.dims();
    let causal: Vec<bool> = (0..b * t * t).map(|i| i % t > i / t % t).collect();
    let with_mask = LayerCtx {
        cos: ctx.cos.clone(),
        sin: ctx.sin.clone(),
        rope: ctx.rope.clone(),
        mask: Some(ctx.mask.clone().unwrap_or_else(|| {
            Tensor::<4, Bool>::from_data(TensorData::new(causal, [b, 1, t, t]), &dev())
        })),
        hidden: None,
        bias: None,
        bf16: None,
    };
    let q = apply_rotary(split_heads(q, heads), &ctx.cos, &ctx.sin);
    let k = apply_rotary(split_heads(k, kv), &ctx.cos, &ctx.sin);
    attend(q, k, split_heads(v, kv), &with_mask, None)
}

/// (output, gradient of each input) for one path.
fn run(
    inputs: &[Tensor<3>],
    fused_qkv: bool,
    (heads, kv): (usize, usize),
    ctx: &LayerCtx,
    (fused, checkpointing): (bool, bool),
) -> (Vec<f32>, Vec<Vec<f32>>) {
    // Under gradient checkpointing the fused op keeps each row's logsumexp, not P, and
    // recomputes P (masked again) in the backward.
    let device = match checkpointing {
        true => dev().gradient_checkpointing(),
        false => dev(),
    };
    let inputs: Vec<Tensor<3>> = inputs
        .iter()
        .map(|t| Tensor::from_data(t.to_data(), &device).require_grad())
        .collect();
    let p = match fused_qkv {
        true => Projected::Fused(inputs[0].clone()),
        false => Projected::Split(inputs[0].clone(), inputs[1].clone(), inputs[2].clone()),
    };
    let y = match fused {
        true => rotary_attention(p, heads, kv, ctx, None),
        false => composed(p, heads, kv, ctx),
    };
    let up = filled(y.dims(), 5, &dev());
    let g = (y.clone() * Tensor::from_data(up.into_data(), &device))
        .sum()
        .backward();
    let grads = inputs.iter().map(|t| vals(t.grad(&g).unwrap())).collect();
    (vals(y), grads)
}

#[test]
fn fused_rotary_attention_matches_the_composed_path() {
    let (b, t, d) = (2, 7, 8);
    // Row 0 right-padded, row 1 two packed examples then padding.
    let keys: Vec<i64> = [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2, 0]].concat();
    // (heads, kv heads, rotary dims, table rows, fused qkv, mask)
    for (heads, kv, rot, rows, fused_qkv, mask) in [
        (4, 2, d, 1, true, false),
        (4, 2, d, 1, false, false),
        (3, 3, d / 2, b, true, false),
        (4, 1, d / 2, b, false, false),
        (4, 2, d, 1, true, true),
        (4, 1, d / 2, b, false, true),
    ] {
        let what =
            format!("heads {heads}/{kv}, rot {rot}, rows {rows}, fused {fused_qkv}, mask {mask}");
        let rand = |w: usize, seed: u64| filled([b, t, w], seed, &dev()).detach();
        let inputs = match fused_qkv {
            true => vec![rand((heads + 2 * kv) * d, 11)],
            false => vec![rand(heads * d, 11), rand(kv * d, 12), rand(kv * d, 13)],
        };
        let ctx = ctx(rows, t, rot, b, mask.then_some(&keys[..]));
        let composed = run(&inputs, fused_qkv, (heads, kv), &ctx, (false, false));
        for checkpointing in [false, true] {
            let fused = run(&inputs, fused_qkv, (heads, kv), &ctx, (true, checkpointing));
            let what = format!("{what}, checkpointing {checkpointing}");
            close(&fused.0, &composed.0, &format!("{what}: output"));
            for (i, (f, c)) in fused.1.iter().zip(&composed.1).enumerate() {
                close(f, c, &format!("{what}: gradient of input {i}"));
                let moved = f.iter().any(|v| *v != 0.0);
                assert!(moved, "{what}: input {i} has a zero gradient");
            }
        }
    }
}

/// The fused op runs in row blocks of 64 query rows: 150 positions make three of a GQA head
/// (64, 64, 22 rows), whose products stop at each block's last visible key. On f32 products
/// it matches the composed path as closely as at 7 positions, with masks and checkpointing
/// (kept and recomputed P). Under `--bf16` its products run on the bf16 kernels: on every
/// path this CPU has, the output and gradients stay within bf16 rounding of the f32 composed
/// path, and differ from the f32 fused op's (so the bf16 products did run).
#[test]
fn fused_rotary_attention_in_row_blocks_on_f32_and_bf16_products() {
    let (b, t, d, heads, kv) = (2, 150, 16, 4, 2);
    let keys: Vec<i64> = (0..b * t)
        .map(|i| i64::from(i % t < t - 3 * (i / t)))
        .collect();
    // Values in [-2, 2): scores spread enough for peaked rows.
    let inputs = vec![(filled([b, t, (heads + 2 * kv) * d], 17, &dev()) * 2.0).detach()];
    let paths = bf16_paths("bf16 attention");
    let combos = [(false, false), (false, true), (true, false), (true, true)];
    for (mask, checkpointing) in combos {
        let what = format!("mask {mask}, checkpointing {checkpointing}");
        let mut ctx = ctx(1, t, d, b, mask.then_some(&keys[..]));
        let want = run(&inputs, true, (heads, kv), &ctx, (false, false));
        let f32_fused = run(&inputs, true, (heads, kv), &ctx, (true, checkpointing));
        close(&f32_fused.0, &want.0, &format!("f32, {what}: output"));
        close(
            &f32_fused.1[0],
            &want.1[0],
            &format!("f32, {what}: gradient"),
        );
        for &path in &paths {
            let what = format!("{}, {what}", path.name());
            ctx.bf16 = Some(path);
            let got = run(&inputs, true, (heads, kv), &ctx, (true, checkpointing));
            let pairs = [
                (&got.0, &want.0, &f32_fused.0),
                (&got.1[0], &want.1[0], &f32_fused.1[0]),
            ];
            for ((g, w, f), part) in pairs.into_iter().zip(["output", "gradient"]) {
                let worst = phi_testkit::oracle::max_scaled_diff(&what, g, w);
                assert!(worst <= 3e-2, "{what}: {part} off f32 by {worst}");
                let moved = phi_testkit::oracle::max_scaled_diff(&what, g, f);
                assert!(moved > 1e-5, "{what}: {part} equals the f32 op's ({moved})");
            }
        }
    }
}

/// The bf16 kernel paths this CPU has; each it lacks is reported as not run for `what`.
fn bf16_paths(what: &str) -> Vec<Path> {
    let (have, lack): (Vec<Path>, Vec<Path>) = Path::ALL.into_iter().partition(|p| p.available());
    for path in lack {
        eprintln!("{what} on {}: NOT RUN (this CPU lacks it)", path.name());
    }
    have
}

/// x rounded to bf16, as the bf16 products read their operands.
fn rounded(x: &[f32]) -> Vec<f32> {
    use phi_kernels::bf16::{from_bf16, to_bf16};
    x.iter().map(|&v| from_bf16(to_bf16(v))).collect()
}

/// The bf16 forward emulated on the host: q and k after RoPE (the composed path's), q, k and
/// v rounded to bf16, scores and softmax in f64, P rounded to bf16, P·V in f64.
/// `hidden` [b, t, t] (true = hidden; None: causal). Output [b, t, heads·d].
fn emulated_bf16_forward(
    x: &Tensor<3>,
    (heads, kv, d): (usize, usize, usize),
    ctx: &LayerCtx,
    hidden: Option<&[bool]>,
) -> Vec<f32> {
    let [b, t, _] = x.dims();
    let (qd, kd) = (heads * d, kv * d);
    let part = |from: usize, n: usize| x.clone().slice([0..b, 0..t, from..from + n]);
    let q = rounded(&vals(apply_rotary(
        split_heads(part(0, qd), heads),
        &ctx.cos,
        &ctx.sin,
    )));
    let k = rounded(&vals(apply_rotary(
        split_heads(part(qd, kd), kv),
        &ctx.cos,
        &ctx.sin,
    )));
    let v = rounded(&vals(split_heads(part(qd + kd, kd), kv)));
    let at = |heads: usize, r: usize, h: usize, i: usize| ((r * heads + h) * t + i) * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; b * t * qd];
    for (r, h, i) in
        (0..b).flat_map(|r| (0..heads).flat_map(move |h| (0..t).map(move |i| (r, h, i))))
    {
        let g = h / (heads / kv);
        let seen = |j: usize| hidden.map_or(j <= i, |m| !m[(r * t + i) * t + j]);
        let qi = &q[at(heads, r, h, i)..][..d];
        let scores: Vec<f64> = (0..t)
            .map(|j| {
                let kj = &k[at(kv, r, g, j)..][..d];
                let s: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                if seen(j) {
                    s * scale
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            continue;
        }
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let p = rounded(&e.iter().map(|e| (e / sum) as f32).collect::<Vec<_>>());
        for c in 0..d {
            let o: f64 = (0..t)
                .map(|j| p[j] as f64 * v[at(kv, r, g, j) + c] as f64)
                .sum();
            out[(r * t + i) * qd + h * d + c] = o as f32;
        }
    }
    out
}

/// Under `--bf16` the forward rounds q, k and v after RoPE, and P after the softmax, and sums
/// their products in f32: on every bf16 path this CPU has, its output is the host emulation
/// of that rounding's to within f32 sums (a P 1 % off is eight times this bound), plain and
/// with a packing mask, at 150 positions (three row blocks a head).
#[test]
fn bf16_attention_forward_matches_an_emulation_of_its_rounding() {
    let (b, t, d, heads, kv) = (2, 150, 16, 4, 2);
    let keys: Vec<i64> = (0..b * t)
        .map(|i| i64::from(i % t < t - 3 * (i / t)) * (1 + i64::from(i % t >= 90)))
        .collect();
    let x = (filled([b, t, (heads + 2 * kv) * d], 23, &dev()) * 2.0).detach();
    let paths = bf16_paths("bf16 attention forward");
    for mask in [false, true] {
        let mut ctx = ctx(1, t, d, b, mask.then_some(&keys[..]));
        let hidden = ctx.hidden.clone();
        let want =
            emulated_bf16_forward(&x, (heads, kv, d), &ctx, hidden.as_deref().map(|m| &m[..]));
        for &path in &paths {
            ctx.bf16 = Some(path);
            let got = vals(rotary_attention(
                Projected::Fused(x.clone()),
                heads,
                kv,
                &ctx,
                None,
            ));
            let what = format!("{}, mask {mask}", path.name());
            let worst = phi_testkit::oracle::max_scaled_diff(&what, &got, &want);
            assert!(worst <= 1e-3, "{what}: output off the emulation by {worst}");
        }
    }
}
