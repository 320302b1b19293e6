//! The fused ops (Flex, with and without autodiff) against the same ops composed from Burn's:
//! outputs and input gradients, on shapes with odd sizes, GQA blocks, a KV-cache offset and
//! ignored cross-entropy rows.

use burn::tensor::{Distribution, Tensor, TensorData};
use phi_kernels::bf16::Path;
use phi_kernels::packed::PackedWeight;
use phi_kernels::{self as fused, reference};
use std::sync::Arc;

fn dev() -> burn::tensor::Device {
    burn::tensor::Device::flex()
}

fn rand<const D: usize>(shape: [usize; D], scale: f64) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, scale), &dev().autodiff())
}

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = phi_testkit::oracle::max_scaled_diff(what, a, b);
    assert!(worst <= tol, "{what}: worst error {worst} > {tol}");
}

/// A fixed upstream gradient: the same for every path compared, whatever other tests draw
/// from the device's shared generator meanwhile (reseeding it before a draw raced with them).
fn upstream<const D: usize>(
    shape: burn::tensor::Shape,
    device: &burn::tensor::Device,
) -> Tensor<D> {
    let n = shape.num_elements();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1009) as f32 / 504.5) - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Output and gradient of `op` at `x` for the fused and the reference version, compared
/// under a random upstream gradient (so a wrong sign or transposition cannot cancel out).
fn check<const D: usize>(
    what: &str,
    x: Tensor<D>,
    fused: impl Fn(Tensor<D>) -> Tensor<D>,
    reference: impl Fn(Tensor<D>) -> Tensor<D>,
    tol: f32,
) {
    let mut outs = Vec::new();
    // One upstream gradient for both, drawn once: tests run in parallel threads and share the
    // device's generator, so reseeding before each draw did not guarantee equal draws.
    let mut upstream: Option<TensorData> = None;
    for f in [&fused as &dyn Fn(Tensor<D>) -> Tensor<D>, &reference] {
        let x = x.clone().detach().require_grad();
        let y = f(x.clone());
        let data = upstream.get_or_insert_with(|| {
            Tensor::<D>::random(y.shape(), Distribution::Normal(0.0, 1.0), &dev()).into_data()
        });
        let w = Tensor::from_data(data.clone(), &y.device());
        let g = (y.clone() * w).sum().backward();
        outs.push((vals(y), vals(x.grad(&g).unwrap())));
    }
    close(&outs[0].0, &outs[1].0, tol, &format!("{what} output"));
    close(&outs[0].1, &outs[1].1, tol, &format!("{what} gradient"));
    assert!(outs[0].1.iter().any(|v| *v != 0.0), "{what}: zero gradient");
}

#[test]
fn swiglu_pair_and_packed_match_silu_times_up() {
    dev().seed(7);
    let x = rand([2, 5, 2 * 37], 3.0);
    check(
        "packed",
        x.clone(),
        fused::swiglu_packed,
        reference::swiglu_packed,
        1e-5,
    );
    let split = |f: fn(Tensor<3>, Tensor<3>) -> Tensor<3>| {
        move |x: Tensor<3>| f(x.clone().narrow(2, 0, 37), x.narrow(2, 37, 37))
    };
    check(
        "pair",
        x,
        split(fused::swiglu),
        split(reference::swiglu),
        1e-5,
    );
}

/// With `bf16_saved` the output is the f32 one and the gradient is the f32 formula at gate
/// and up rounded to bf16 (what the backward keeps).
#[test]
fn swiglu_saving_bf16_differentiates_at_the_rounded_inputs() {
    dev().seed(17);
    let x = rand([2, 5, 2 * 37], 3.0);
    let round = |x: Tensor<3>| {
        let v: Vec<f32> = vals(x.clone())
            .iter()
            .map(|&v| phi_kernels::bf16::from_bf16(phi_kernels::bf16::to_bf16(v)))
            .collect();
        Tensor::from_data(TensorData::new(v, x.shape()), &x.device())
    };
    let rounded = round(x.clone());
    assert!(
        vals(rounded.clone()) != vals(x.clone()),
        "rounding changed nothing"
    );
    let split = |x: Tensor<3>| (x.clone().narrow(2, 0, 37), x.narrow(2, 37, 37));
    let pair = |x: Tensor<3>, bf16: bool| {
        let (g, u) = split(x);
        fused::swiglu_saving(g, u, bf16)
    };
    for (what, op) in [
        (
            "packed",
            &(|x, b| fused::swiglu_packed_saving(x, b)) as &dyn Fn(Tensor<3>, bool) -> Tensor<3>,
        ),
        ("pair", &pair),
    ] {
        let grad = |x: Tensor<3>, bf16: bool| {
            let x = x.require_grad();
            let y = op(x.clone(), bf16);
            let g = (y.clone() * upstream::<3>(y.shape(), &y.device()))
                .sum()
                .backward();
            (vals(y), vals(x.grad(&g).unwrap()))
        };
        let (y, g) = grad(x.clone(), true);
        let (y32, g32) = grad(x.clone(), false);
        let (_, g_at_rounded) = grad(rounded.clone(), false);
        assert_eq!(y, y32, "{what}: the output is the f32 one");
        close(
            &g,
            &g_at_rounded,
            1e-6,
            &format!("{what}: gradient at the rounded inputs"),
        );
        assert!(
            g != g32,
            "{what}: the gradient did not read the rounded inputs"
        );
    }
}

#[test]
fn causal_softmax_matches_masked_softmax_with_gqa_blocks_and_offset() {
    dev().seed(8);
    // 2 batches, 3 kv heads, 2 query heads per kv head stacked as blocks of t = 7 rows,
    // 10 keys (3 cached): row r sees keys 0..=3 + r mod 7.
    let x = rand([2, 3, 14, 10], 2.0);
    let f = |x| fused::causal_softmax(x, 0.3, 7, 3);
    let r = |x| reference::causal_softmax(x, 0.3, 7, 3);
    check("causal softmax", x, f, r, 1e-5);
}

#[test]
fn cross_entropy_matches_log_softmax_gather_with_ignored_rows() {
    dev().seed(9);
    let targets = vec![3, -1, 0, 130, 77, -1, 5];
    let x = rand([7, 131], 4.0);
    let t = targets.clone();
    let f = move |x: Tensor<2>| fused::cross_entropy_sum(x, t.clone()).unsqueeze::<2>();
    let r = move |x: Tensor<2>| reference::cross_entropy_sum(x, targets.clone()).unsqueeze::<2>();
    check("cross-entropy", x, f, r, 1e-5);
}

#[test]
fn fused_ops_run_without_autodiff_too() {
    let x = Tensor::<2>::random([4, 64], Distribution::Normal(0.0, 2.0), &dev());
    let a = vals(fused::swiglu_packed(x.clone()));
    let b = vals(reference::swiglu_packed(x.clone()));
    close(&a, &b, 1e-5, "inference swiglu");
    let a = vals(fused::cross_entropy_sum(x.clone(), vec![1, 2, -1, 63]));
    let b = vals(reference::cross_entropy_sum(x, vec![1, 2, -1, 63]));
    close(&a, &b, 1e-5, "inference cross-entropy");
}

#[test]
fn lora_linear_matches_base_plus_low_rank_path_in_every_gradient() {
    dev().seed(10);
    let (x, w, a, b) = (
        rand([2, 5, 24], 1.0),
        rand([24, 40], 0.3),
        rand([24, 4], 0.3),
        rand([4, 40], 0.3),
    );
    // A fixed dropout-like mask on the adapter's input: 0 or 1/keep, as Burn's Dropout makes.
    let mask: Vec<f32> = (0..2 * 5 * 24)
        .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
        .collect();
    let mask = Tensor::<3>::from_data(TensorData::new(mask, [2, 5, 24]), &dev().autodiff());
    // The frozen base in bf16 (--bf16) with dropout: the packed weight's own linear plus the
    // composed f32 adapter, but for the rank-r term, which the op sums in bf16 (rounded
    // operands: ~2⁻⁸ of that term). Without dropout: `bf16_lora_linear_is_..._rounded_operands`.
    let packed = Arc::new(PackedWeight::in_out(&vals(w.clone()), 24, 40, Path::Scalar));
    for (bf16, dropout) in [(false, false), (false, true), (true, true)] {
        let mut results = Vec::new();
        for fused_path in [true, false] {
            let leaf = |t: &Tensor<2>| t.clone().detach().require_grad();
            let (x, w, a, b) = (
                x.clone().detach().require_grad(),
                leaf(&w),
                leaf(&a),
                leaf(&b),
            );
            let xd = dropout.then(|| x.clone() * mask.clone());
            let y = match (fused_path, bf16) {
                (true, false) => {
                    fused::lora_linear(x.clone(), xd, w.clone(), a.clone(), b.clone(), 1.7)
                }
                (true, true) => {
                    fused::frozen_lora_linear(x.clone(), xd, &packed, a.clone(), b.clone(), 1.7)
                }
                (false, _) => {
                    let xd = xd.unwrap_or_else(|| x.clone());
                    let lora = xd
                        .matmul(a.clone().unsqueeze())
                        .matmul(b.clone().unsqueeze());
                    let base = match bf16 {
                        true => fused::frozen_linear(x.clone(), &packed),
                        false => x.clone().matmul(w.clone().unsqueeze()),
                    };
                    base + lora * 1.7
                }
            };
            let g = (y.clone() * upstream(y.shape(), &y.device()))
                .sum()
                .backward();
            // The packed base has no weight gradient: w is not in its graph.
            let params = if bf16 { vec![a, b] } else { vec![w, a, b] };
            let grads: Vec<Vec<f32>> = params.iter().map(|p| vals(p.grad(&g).unwrap())).collect();
            results.push((vals(y), vals(x.grad(&g).unwrap()), grads));
        }
        let (f, r) = (&results[0], &results[1]);
        let tag = format!(
            "{}{}",
            if bf16 { " (bf16 base)" } else { "" },
            if dropout { " (dropout)" } else { "" }
        );
        // The output and db (through s·xd·a) carry the rounded rank-r term; dx and da not.
        let tol = if bf16 { 3e-2 } else { 1e-5 };
        close(&f.0, &r.0, tol, &format!("lora output{tag}"));
        close(&f.1, &r.1, 1e-5, &format!("lora d x{tag}"));
        let names: &[(&str, f32)] = if bf16 {
            &[("d a", 1e-5), ("d b", tol)]
        } else {
            &[("d w", 1e-5), ("d a", 1e-5), ("d b", 1e-5)]
        };
        for (i, (name, tol)) in names.iter().enumerate() {
            close(&f.2[i], &r.2[i], *tol, &format!("lora {name}{tag}"));
        }
    }
}

/// The fused op runs in blocks of 64 query rows, each product stopping at the block's last
/// visible key: 150 queries at offset 40 make three blocks a stacked head (64, 64, 22 rows).
#[test]
fn causal_attention_matches_composed_with_and_without_checkpointing() {
    // (batches, kv heads, stacked query heads, queries, offset, d)
    // One item (fewer than threads) threads inside each f32 product of the backward.
    for (b, kv, g, t, offset, d) in [
        (2, 2, 3, 5, 2, 8),
        (1, 2, 2, 150, 40, 8),
        (1, 1, 2, 150, 0, 16),
    ] {
        dev().seed(11);
        let keys = t + offset;
        let (q, k, v) = (
            rand([b, kv, g * t, d], 1.0),
            rand([b, kv, keys, d], 1.0),
            rand([b, kv, keys, d], 1.0),
        );
        let mut results = Vec::new();
        for (fused_path, checkpointing) in [(true, false), (true, true), (false, false)] {
            let mut device = dev().autodiff();
            if checkpointing {
                device = device.gradient_checkpointing();
            }
            let leaf = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &device).require_grad();
            let (q, k, v) = (leaf(&q), leaf(&k), leaf(&v));
            let o = if fused_path {
                fused::causal_attention(q.clone(), k.clone(), v.clone(), 0.35, t, offset)
            } else {
                let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
                reference::causal_softmax(scores, 0.35, t, offset).matmul(v.clone())
            };
            let g = (o.clone() * upstream(o.shape(), &device)).sum().backward();
            let grads: Vec<Vec<f32>> = [q, k, v]
                .iter()
                .map(|t| vals(t.grad(&g).unwrap()))
                .collect();
            results.push((vals(o), grads));
        }
        let r = &results[2];
        for (f, what) in results[..2].iter().zip(["kept P", "recomputed P"]) {
            let what = format!("{what}, {t} queries at offset {offset}");
            close(&f.0, &r.0, 1e-5, &format!("attention output ({what})"));
            for (i, name) in ["d q", "d k", "d v"].iter().enumerate() {
                let what = format!("attention {name} ({what})");
                close(&f.1[i], &r.1[i], 1e-5, &what);
            }
        }
    }
}

/// RMSNorm fused against composed, in x's gradient and in w's (a norm weight trains in
/// norm-only fine-tuning), on a width off the 16-lane sums' blocks.
#[test]
fn rms_norm_matches_composed_in_both_gradients() {
    dev().seed(11);
    let w = rand([45], 1.0);
    let x = rand([3, 7, 45], 2.0);
    let norm_of = |f: fn(Tensor<3>, Tensor<1>, f64) -> Tensor<3>| {
        let w = w.clone();
        move |x: Tensor<3>| f(x, w.clone(), 1e-5)
    };
    check(
        "rms_norm",
        x.clone(),
        norm_of(fused::rms_norm),
        norm_of(reference::rms_norm),
        1e-5,
    );
    let mut dws = Vec::new();
    for f in [fused::rms_norm::<3>, reference::rms_norm::<3>] {
        let w = w.clone().detach().require_grad();
        let g = (f(x.clone().detach(), w.clone(), 1e-5) * x.clone().detach())
            .sum()
            .backward();
        dws.push(vals(w.grad(&g).unwrap()));
    }
    close(&dws[0], &dws[1], 1e-5, "rms_norm weight gradient");
    assert!(dws[0].iter().any(|v| *v != 0.0), "zero weight gradient");
}

/// Row-major [m×k]·[k×n] on the host, summed in f64.
fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|x| a[i * k + x] as f64 * b[x * n + j] as f64)
                .sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

/// [rows×cols] → [cols×rows].
fn tr(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| a[(i % rows) * cols + i / rows])
        .collect()
}

fn rounded(v: &[f32]) -> Vec<f32> {
    use phi_kernels::bf16::{from_bf16, to_bf16};
    v.iter().map(|&x| from_bf16(to_bf16(x))).collect()
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// The LoRA op on a bf16 base without dropout runs its token-wide products on the bf16
/// kernels: each is the f32 product of bf16-rounded operands, the rank-r term summed into the
/// base's: y = x·W + (s·x·A)·B, dx = dy·Wᵀ + gs·Aᵀ with gs = s·dy·Bᵀ; the factors' gradients
/// dA = xᵀ·gs and dB = hsᵀ·dy (hs = s·x·A) are f32 sums, of x as the forward rounded it (the
/// backward keeps only that, as autocast does) and of the unrounded dy.
#[test]
fn bf16_lora_linear_is_the_f32_product_of_rounded_operands() {
    let (n, d_in, d_out, r, s) = (10, 24, 40, 4, 1.7f32);
    dev().seed(13);
    let (x, w, a, b, up) = (
        vals(rand([n, d_in], 1.0)),
        vals(rand([d_in, d_out], 0.3)),
        vals(rand([d_in, r], 0.3)),
        vals(rand([r, d_out], 0.3)),
        vals(rand([n, d_out], 1.0)),
    );
    let rr = rounded;
    let scaled = |v: Vec<f32>| v.into_iter().map(|x| x * s).collect::<Vec<f32>>();
    let hs = scaled(mm(&rr(&x), &rr(&a), n, d_in, r));
    let y = add(
        &mm(&rr(&x), &rr(&w), n, d_in, d_out),
        &mm(&rr(&hs), &rr(&b), n, r, d_out),
    );
    let gs = scaled(mm(&rr(&up), &rr(&tr(&b, r, d_out)), n, d_out, r));
    let dx = add(
        &mm(&rr(&up), &rr(&tr(&w, d_in, d_out)), n, d_out, d_in),
        &mm(&rr(&gs), &rr(&tr(&a, d_in, r)), n, r, d_in),
    );
    let da = mm(&tr(&rr(&x), n, d_in), &gs, d_in, n, r);
    let db = mm(&tr(&hs, n, r), &up, r, n, d_out);

    let leaf = |v: &[f32], shape: [usize; 2]| {
        Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), &dev().autodiff()).require_grad()
    };
    let packed = Arc::new(PackedWeight::in_out(&w, d_in, d_out, Path::Scalar));
    let (xt, at, bt) = (
        leaf(&x, [n, d_in]),
        leaf(&a, [d_in, r]),
        leaf(&b, [r, d_out]),
    );
    let yt = fused::frozen_lora_linear(xt.clone(), None, &packed, at.clone(), bt.clone(), 1.7);
    let upt = Tensor::<2>::from_data(TensorData::new(up, [n, d_out]), &dev().autodiff());
    let g = (yt.clone() * upt).sum().backward();
    close(&vals(yt), &y, 1e-5, "bf16 lora output");
    close(&vals(xt.grad(&g).unwrap()), &dx, 1e-5, "bf16 lora d x");
    close(&vals(at.grad(&g).unwrap()), &da, 1e-5, "bf16 lora d a");
    close(&vals(bt.grad(&g).unwrap()), &db, 1e-5, "bf16 lora d b");
}

/// A trainable weight on the bf16 kernels (`--bf16` full fine-tuning): output, input gradient
/// and weight gradient equal f32 products of the bf16-rounded operands (x, W and the upstream
/// gradient, as the kernels round them), for a weight stored [in, out] and [out, in].
#[test]
fn bf16_train_linear_is_the_f32_product_of_rounded_operands() {
    use phi_kernels::bf16::{from_bf16, to_bf16};
    let round =
        |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| from_bf16(to_bf16(x))).collect() };
    let host = |v: Vec<f32>, shape: [usize; 2]| {
        Tensor::<2>::from_data(TensorData::new(v, shape), &dev().autodiff())
    };
    let (n, d_in, d_out) = (37, 45, 50);
    dev().seed(12);
    let x = vals(rand([n, d_in], 1.0));
    let w = vals(rand([d_in, d_out], 0.3));
    let up = vals(rand([n, d_out], 1.0));
    let (xr, wr, ur) = (round(x.clone()), round(w.clone()), round(up.clone()));
    // The reference: f32 products of the rounded values.
    let (x0, w0) = (host(xr, [n, d_in]), host(wr, [d_in, d_out]));
    let y0 = x0.clone().matmul(w0.clone());
    let dx0 = host(ur.clone(), [n, d_out]).matmul(w0.clone().transpose());
    let dw0 = x0.transpose().matmul(host(ur, [n, d_out]));
    for out_in in [false, true] {
        let xt = host(x.clone(), [n, d_in]).require_grad();
        let wt = match out_in {
            false => host(w.clone(), [d_in, d_out]),
            true => host(
                vals(host(w.clone(), [d_in, d_out]).transpose()),
                [d_out, d_in],
            ),
        }
        .require_grad();
        let y = fused::bf16_train_linear(xt.clone(), wt.clone(), out_in, Path::Scalar);
        let g = (y.clone() * host(up.clone(), [n, d_out])).sum().backward();
        let tag = if out_in { " ([out, in])" } else { "" };
        close(&vals(y), &vals(y0.clone()), 1e-5, &format!("output{tag}"));
        close(
            &vals(xt.grad(&g).unwrap()),
            &vals(dx0.clone()),
            1e-5,
            &format!("dx{tag}"),
        );
        let dw = vals(wt.grad(&g).unwrap());
        let dw = match out_in {
            false => dw,
            true => vals(host(dw, [d_out, d_in]).transpose()),
        };
        close(&dw, &vals(dw0.clone()), 1e-5, &format!("dW{tag}"));
    }
}

/// The f32 linear op (a trainable weight without bf16): output, dx = dy·Wᵀ and dW = xᵀ·dy
/// against f64 sums on the host, on odd sizes and on one big enough for the threaded GEMM.
#[test]
fn f32_linear_matches_host_products_in_both_gradients() {
    for (n, d_in, d_out) in [(21, 45, 50), (300, 200, 210)] {
        dev().seed(14);
        let x = vals(rand([n, d_in], 1.0));
        let w = vals(rand([d_in, d_out], 0.3));
        let up: Vec<f32> = (0..n * d_out)
            .map(|i| ((i * 7919 % 1009) as f32 / 504.5) - 1.0)
            .collect();
        let leaf = |v: &[f32], shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), &dev().autodiff())
                .require_grad()
        };
        let (xt, wt) = (leaf(&x, [n, d_in]), leaf(&w, [d_in, d_out]));
        let y = fused::linear(xt.clone().reshape([1, n, d_in]), wt.clone());
        let upt = Tensor::<3>::from_data(
            TensorData::new(up.clone(), [1, n, d_out]),
            &dev().autodiff(),
        );
        let g = (y.clone() * upt).sum().backward();
        let what = format!("{n}×{d_in}×{d_out}");
        close(
            &vals(y),
            &mm(&x, &w, n, d_in, d_out),
            1e-5,
            &format!("{what}: output"),
        );
        let dx = mm(&up, &tr(&w, d_in, d_out), n, d_out, d_in);
        close(
            &vals(xt.grad(&g).unwrap()),
            &dx,
            1e-5,
            &format!("{what}: dx"),
        );
        let dw = mm(&tr(&x, n, d_in), &up, d_in, n, d_out);
        close(
            &vals(wt.grad(&g).unwrap()),
            &dw,
            1e-4,
            &format!("{what}: dW"),
        );
    }
}
