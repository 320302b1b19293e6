//! Our GPU ops (`--features vulkan` or `cuda`: SwiGLU, RMSNorm, cross-entropy, attention's
//! backward) against the same ops composed from Burn's, both on the device `PHI_TEST_DEVICE`
//! names (CI: Mesa's lavapipe): outputs and input gradients under a fixed upstream gradient,
//! on widths no vector width or unit count divides, without autodiff, with it, and under
//! balanced checkpointing. The device must be a GPU one (Vulkan or CUDA); one the machine
//! lacks fails the test (`phi_testkit::device`), nothing skips.
//!
//! PHI_TEST_DEVICE=vulkan cargo test -p phi-kernels -p phi-model --features phi-model/vulkan
//!     --test gpu_ops

#![cfg(feature = "cube")]

use burn::tensor::{Device, Tensor, TensorData};
use phi_kernels::{self as fused, reference, KernelPath};

const SHAPE: [usize; 3] = [2, 5, 37];

fn device() -> Device {
    let name = phi_testkit::test_device_name();
    assert!(
        name.starts_with("vulkan") || name.starts_with("cuda"),
        "PHI_TEST_DEVICE={name}: these tests check the GPU kernels; name a GPU device \
         (PHI_TEST_DEVICE=vulkan, vulkan:cpu or cuda)"
    );
    phi_testkit::device()
}

/// The three ways a training step reaches the op.
fn devices() -> [(&'static str, Device); 3] {
    let d = device();
    [
        ("plain", d.clone()),
        ("autodiff", d.clone().autodiff()),
        ("checkpointed", d.autodiff().gradient_checkpointing()),
    ]
}

fn tensor<const N: usize>(shape: [usize; N], seed: u64, scale: f32, device: &Device) -> Tensor<N> {
    let n = shape.iter().product();
    // Gates out to ±4 reach both of the sigmoid's tails; logits to ±6, a peaked softmax.
    let v: Vec<f32> = phi_testkit::values(n, seed)
        .iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn vals<const N: usize>(t: Tensor<N>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// Fixed and uneven, so a wrong sign, a swapped half or a transposition cannot cancel out.
fn upstream<const N: usize>(shape: burn::tensor::Shape, device: &Device) -> Tensor<N> {
    let n = shape.num_elements();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1009) as f32 / 504.5) - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn close(got: &[f32], want: &[f32], what: &str) {
    let worst = phi_testkit::oracle::max_scaled_diff(what, got, want);
    assert!(worst <= 1e-5, "{what}: worst scaled error {worst} > 1e-5");
    assert!(got.iter().any(|v| *v != 0.0), "{what}: all zero");
}

/// The output and, on an autodiff device, each input's gradient under `upstream`.
fn run<const N: usize, const M: usize>(
    inputs: &[Tensor<N>],
    op: &dyn Fn(&[Tensor<N>]) -> Tensor<M>,
) -> Vec<Vec<f32>> {
    let tracked = inputs[0].is_autodiff();
    let inputs: Vec<_> = match tracked {
        true => inputs
            .iter()
            .map(|t| t.clone().detach().require_grad())
            .collect(),
        false => inputs.to_vec(),
    };
    let y = op(&inputs);
    let mut out = vec![vals(y.clone())];
    if tracked {
        let w = upstream::<M>(y.shape(), &y.device());
        let grads = (y * w).sum().backward();
        for x in &inputs {
            out.push(vals(x.grad(&grads).expect("a gradient for every input")));
        }
    }
    out
}

fn compare<const N: usize, const M: usize>(
    what: &str,
    inputs: &[Tensor<N>],
    fused: &dyn Fn(&[Tensor<N>]) -> Tensor<M>,
    reference: &dyn Fn(&[Tensor<N>]) -> Tensor<M>,
) {
    let (got, want) = (run(inputs, fused), run(inputs, reference));
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let key = match k {
            0 => "output".to_string(),
            k => format!("gradient of input {}", k - 1),
        };
        close(g, w, &format!("{what}: {key}"));
    }
}

#[test]
fn gpu_swiglu_pair_matches_silu_times_up() {
    for (how, d) in devices() {
        let gate = tensor(SHAPE, 1, 4.0, &d);
        let up = tensor(SHAPE, 2, 1.0, &d);
        assert_eq!(fused::kernel_path(&gate), KernelPath::Gpu, "{how}");
        let inputs = [gate, up];
        compare(
            &format!("pair, {how}"),
            &inputs,
            &|x| fused::swiglu(x[0].clone(), x[1].clone()),
            &|x| reference::swiglu(x[0].clone(), x[1].clone()),
        );
    }
}

#[test]
fn gpu_swiglu_packed_matches_silu_times_up() {
    for (how, d) in devices() {
        let gate_up = tensor([2, 5, 2 * 37], 3, 4.0, &d);
        assert_eq!(fused::kernel_path(&gate_up), KernelPath::Gpu, "{how}");
        compare(
            &format!("packed, {how}"),
            &[gate_up],
            &|x| fused::swiglu_packed(x[0].clone()),
            &|x| reference::swiglu_packed(x[0].clone()),
        );
    }
}

/// gate and up as strided views of one tensor (what Phi-3's packed projection gives a caller
/// that splits it): the kernels' contiguous copies, and gradients flowing back through both
/// slices into one input.
#[test]
fn gpu_swiglu_pair_of_views_matches() {
    for (how, d) in devices() {
        let gate_up = tensor([2, 5, 2 * 37], 4, 4.0, &d);
        let split = |x: &Tensor<3>| (x.clone().narrow(2, 0, 37), x.clone().narrow(2, 37, 37));
        let (g, u) = split(&gate_up);
        assert_eq!(fused::kernel_path(&g), KernelPath::Gpu, "{how}");
        assert_eq!(fused::kernel_path(&u), KernelPath::Gpu, "{how}");
        compare(
            &format!("pair of views, {how}"),
            &[gate_up],
            &|x| {
                let (g, u) = split(&x[0]);
                fused::swiglu(g, u)
            },
            &|x| {
                let (g, u) = split(&x[0]);
                reference::swiglu(g, u)
            },
        );
    }
}

/// The sum over rows, and the logits' gradient, against log_softmax and gather: a vocabulary
/// wider than the forward's units (several logits each, the last share short) and one
/// narrower (units with nothing to read), ignored rows, targets at both ends of the row.
#[test]
fn gpu_cross_entropy_matches_log_softmax() {
    for v in [301, 37] {
        for (how, d) in devices() {
            let logits = tensor([7, v], 5, 6.0, &d);
            assert_eq!(fused::kernel_path(&logits), KernelPath::Gpu, "{how}");
            let last = v as i64 - 1;
            let targets = vec![0, last, -1, 3, 17, -100, last - 2];
            compare(
                &format!("cross-entropy, V = {v}, {how}"),
                &[logits],
                &|x| fused::cross_entropy_sum(x[0].clone(), targets.clone()),
                &|x| reference::cross_entropy_sum(x[0].clone(), targets.clone()),
            );
        }
    }
}

/// More rows than one grid dimension holds (65535 cubes): the rows past it wrap into y.
#[test]
fn gpu_cross_entropy_covers_rows_past_one_grid_dimension() {
    let (n, v) = (70_001, 3);
    for (how, d) in devices().into_iter().take(2) {
        let logits = tensor([n, v], 6, 3.0, &d);
        let targets: Vec<i64> = (0..n as i64).map(|r| r % 4 - 1).collect();
        compare(
            &format!("cross-entropy, {n} rows, {how}"),
            &[logits],
            &|x| fused::cross_entropy_sum(x[0].clone(), targets.clone()),
            &|x| reference::cross_entropy_sum(x[0].clone(), targets.clone()),
        );
    }
}

/// The head and the cross-entropy as one op, in chunks of rows (37 rows, d = 16 and V = 101 make
/// five chunks of 8, the last short), for a head W [d, V] and a tied table [V, d]: the loss and
/// the gradients of h and W against the logits made whole and the composed cross-entropy.
#[test]
fn gpu_head_loss_matches_the_composed_head_and_loss() {
    let (n, d, v) = (37, 16, 101);
    let targets: Vec<i64> = (0..n as i64).map(|r| (r * 7 % 103) - 2).collect();
    assert!(targets.iter().any(|&t| t < 0) && targets.iter().all(|&t| t < v as i64));
    for out_in in [false, true] {
        for (how, dev) in devices() {
            let h = tensor([n, d], 15, 1.0, &dev);
            let shape = if out_in { [v, d] } else { [d, v] };
            let w = tensor(shape, 16, 0.5, &dev);
            assert_eq!(fused::kernel_path(&h), KernelPath::Gpu, "{how}");
            let t = targets.clone();
            compare(
                &format!("head loss, out_in {out_in}, {how}"),
                &[h, w],
                &|x| fused::head_loss(x[0].clone(), x[1].clone(), out_in, t.clone()),
                &|x| {
                    let w = if out_in {
                        x[1].clone().transpose()
                    } else {
                        x[1].clone()
                    };
                    reference::cross_entropy_sum(x[0].clone().matmul(w), t.clone())
                },
            );
        }
    }
}

/// GQA-stacked causal attention ([B, kv heads, g·t rows, d] against [B, kv heads, S, d], keys
/// offset by S − t as with a cache): output and q, k, v gradients against the composed softmax.
#[test]
fn gpu_causal_attention_matches_the_composed_softmax() {
    let (g, t, offset, d) = (3, 5, 2, 8);
    for (how, dev) in devices() {
        let q = tensor([2, 2, g * t, d], 7, 1.5, &dev);
        let k = tensor([2, 2, t + offset, d], 8, 1.5, &dev);
        let v = tensor([2, 2, t + offset, d], 9, 1.0, &dev);
        assert_eq!(fused::kernel_path(&q), KernelPath::Gpu, "{how}");
        let scale = 1.0 / (d as f64).sqrt();
        compare(
            &format!("causal attention, {how}"),
            &[q, k, v],
            &|x| {
                fused::causal_attention(x[0].clone(), x[1].clone(), x[2].clone(), scale, t, offset)
            },
            &|x| {
                let s = x[0].clone().matmul(x[1].clone().swap_dims(2, 3));
                reference::causal_softmax(s, scale, t, offset).matmul(x[2].clone())
            },
        );
    }
}

/// The additive-bias form the model trains with on a GPU: a right-padded row and a packed one
/// (two examples, each seeing only its own keys; padding queries keep causal sight of real
/// keys, as `build_mask` makes them), GQA-stacked, against Burn's own attention over repeated
/// k/v heads with the same mask as bools: output and q, k, v gradients.
#[test]
fn gpu_attention_with_padding_and_packing_matches_burns() {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::Bool;
    let (b, kv, g, t, d) = (2, 2, 3, 6, 8);
    let keys: [[i64; 6]; 2] = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2]];
    let hidden: Vec<bool> = (0..b * t * t)
        .map(|i| {
            let (r, q, k) = (i / (t * t), i / t % t, i % t);
            let seg = keys[r][q];
            k > q || keys[r][k] == 0 || (seg != 0 && keys[r][k] != seg)
        })
        .collect();
    for (how, dev) in devices() {
        let q = tensor([b, kv, g * t, d], 12, 1.5, &dev);
        let k = tensor([b, kv, t, d], 13, 1.5, &dev);
        let v = tensor([b, kv, t, d], 14, 1.0, &dev);
        assert_eq!(fused::kernel_path(&q), KernelPath::Gpu, "{how}");
        let scale = 1.0 / (d as f64).sqrt();
        let bias = fused::attention_bias(Some(&hidden), b, t, t, 0, &dev);
        let mask =
            Tensor::<4, Bool>::from_data(TensorData::new(hidden.clone(), [b, 1, t, t]), &dev);
        compare(
            &format!("attention with padding and packing, {how}"),
            &[q, k, v],
            &|x| fused::attention_with_bias(x[0].clone(), x[1].clone(), x[2].clone(), &bias, scale),
            &|x| {
                let heads = |x: Tensor<4>| {
                    let n = x.dims()[2];
                    x.unsqueeze_dim::<5>(2)
                        .expand([b, kv, g, n, d])
                        .reshape([b, kv * g, n, d])
                };
                let options = AttentionModuleOptions {
                    scale: Some(scale),
                    softcap: None,
                    is_causal: false,
                };
                let q = x[0].clone().reshape([b, kv * g, t, d]);
                let mask = Some(mask.clone().expand([b, kv * g, t, t]));
                attention(
                    q,
                    heads(x[1].clone()),
                    heads(x[2].clone()),
                    mask,
                    None,
                    options,
                )
                .reshape([b, kv, g * t, d])
            },
        );
    }
}

/// RMSNorm over rows wider than the 128 units (the last share short) and narrower, with a
/// leading batch dim: output, dx and dw against the composed op.
#[test]
fn gpu_rms_norm_matches_the_composed_op() {
    for width in [301, 37] {
        for (how, d) in devices() {
            let x = tensor([2, 5, width], 10, 2.0, &d);
            let w = tensor([width], 11, 1.0, &d) + 1.0;
            assert_eq!(fused::kernel_path(&x), KernelPath::Gpu, "{how}");
            let (x, w) = (x.reshape([2 * 5 * width]), w);
            compare(
                &format!("RMSNorm, width {width}, {how}"),
                &[x, w],
                &|t| fused::rms_norm(t[0].clone().reshape([2, 5, width]), t[1].clone(), 1e-5),
                &|t| reference::rms_norm(t[0].clone().reshape([2, 5, width]), t[1].clone(), 1e-5),
            );
        }
    }
}
