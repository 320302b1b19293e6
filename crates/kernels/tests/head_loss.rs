//! The head fused with its loss (`bf16_head_loss`) against the same head and loss unfused
//! (`bf16_linear`, then `cross_entropy_sum`): the same per-row sums, so the loss and h's
//! gradient are equal to the bit under an upstream gradient of 1, on every bf16 path this CPU
//! has (a path it lacks is reported by name as not run). Rows span several chunks; sizes sit
//! off every block edge; ignored rows lie among counted ones.

use burn::tensor::{Distribution, Tensor, TensorData};
use phi_kernels::bf16::Path;
use phi_kernels::packed::PackedWeight;
use phi_kernels::{self as fused};
use std::sync::Arc;

fn dev() -> burn::tensor::Device {
    burn::tensor::Device::flex()
}

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// (loss, dh) of `loss(h)` at `h` under upstream gradient `up`.
fn run(h: &Tensor<2>, up: f32, loss: impl Fn(Tensor<2>) -> Tensor<1>) -> (f32, Vec<f32>) {
    let h = h.clone().detach().require_grad();
    let l = loss(h.clone());
    let g = (l.clone() * up).sum().backward();
    (vals(l)[0], vals(h.grad(&g).unwrap()))
}

#[test]
fn fused_head_loss_equals_head_then_cross_entropy() {
    // 600 rows: three chunks of the fused op's 256, the last one short.
    let (n, d, v) = (600, 40, 70);
    dev().seed(5);
    let h = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &dev().autodiff());
    let w: Vec<f32> = Tensor::<2>::random([d, v], Distribution::Normal(0.0, 0.3), &dev())
        .into_data()
        .try_into_vec()
        .unwrap();
    // Every 7th row ignored; targets reach both ends of the vocabulary.
    let targets: Vec<i64> = (0..n)
        .map(|r| {
            if r % 7 == 3 {
                -1
            } else {
                ((r * 31) % v) as i64
            }
        })
        .collect();
    assert!(targets.contains(&0) && targets.contains(&(v as i64 - 1)));
    for path in Path::ALL {
        if !path.available() {
            eprintln!(
                "bf16 head loss on {}: NOT RUN (this CPU lacks it)",
                path.name()
            );
            continue;
        }
        let w = Arc::new(PackedWeight::in_out(&w, d, v, path));
        let t = targets.clone();
        let fused = |h: Tensor<2>| fused::frozen_head_loss(h, &w, t.clone());
        let unfused =
            |h: Tensor<2>| fused::cross_entropy_sum(fused::frozen_linear(h, &w), t.clone());
        let name = path.name();
        let (lf, gf) = run(&h, 1.0, fused);
        let (lu, gu) = run(&h, 1.0, unfused);
        assert!(lf.is_finite() && lf > 0.0, "{name}: loss {lf}");
        assert_eq!(lf, lu, "{name}: loss");
        assert!(gf == gu, "{name}: dh differs from the unfused op's");
        for (r, &t) in targets.iter().enumerate() {
            let row = &gf[r * d..(r + 1) * d];
            assert_eq!(t < 0, row.iter().all(|&x| x == 0.0), "{name}: row {r}");
        }
        // The upstream gradient scales dh after the product (the unfused op rounds the
        // scaled gradient instead: equal within bf16's precision).
        let (_, g3) = run(&h, 0.37, fused);
        let scaled: Vec<f32> = gf.iter().map(|&x| x * 0.37).collect();
        assert!(g3 == scaled, "{name}: dh under upstream 0.37");
        let (_, gu3) = run(&h, 0.37, unfused);
        let worst = phi_testkit::oracle::max_scaled_diff("dh 0.37", &g3, &gu3);
        assert!(worst > 0.0 && worst < 1e-2, "{name}: {worst}");
        // Without a graph (evaluation) the loss alone, the same.
        let plain = Tensor::<2>::from_data(h.clone().into_data(), &dev());
        let l = vals(fused::frozen_head_loss(plain, &w, targets.clone()))[0];
        assert_eq!(l, lf, "{name}: loss without autodiff");
    }
}

/// A batch that counts no row: loss 0 and a zero gradient, not NaN.
#[test]
fn fused_head_loss_of_no_counted_row_is_zero() {
    let (n, d, v) = (5, 8, 9);
    let h = Tensor::<2>::from_data(
        TensorData::new((0..n * d).map(|i| i as f32 / 10.0).collect(), [n, d]),
        &dev().autodiff(),
    );
    let w = Arc::new(PackedWeight::in_out(&vec![0.5; d * v], d, v, Path::best()));
    let (l, g) = run(&h, 1.0, |h| fused::frozen_head_loss(h, &w, vec![-1; n]));
    assert_eq!(l, 0.0);
    assert!(g.iter().all(|&x| x == 0.0), "{g:?}");
}
