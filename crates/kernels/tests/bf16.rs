//! The bf16 GEMM paths against each other and against an f64 sum of the same bf16 products.
//! A path this CPU lacks is reported as not run by name; `PHI_REQUIRE_BF16=amx-bf16,...`
//! makes such a path fail instead (for machines known to have it).

use burn::tensor::bf16;
use phi_kernels::bf16::{
    from_bf16, gemm, product_packed, product_t, to_bf16, PackedA, PackedB, Path,
};
use phi_kernels::packed::PackedWeight;
use phi_testkit::values;

/// C in f64 from the bf16-rounded inputs: what every path approximates in f32.
fn exact(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let r = |x: f32| from_bf16(to_bf16(x)) as f64;
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for kk in 0..k {
            let x = r(a[i * k + kk]);
            for j in 0..n {
                c[i * n + j] += x * r(b[kk * n + j]);
            }
        }
    }
    c
}

#[test]
fn rounding_is_torchs_round_to_nearest_even() {
    for x in values(100_000, 1).into_iter().chain([
        0.0,
        -0.0,
        1.0 + f32::EPSILON,
        f32::MAX,
        f32::INFINITY,
        1e-40,
    ]) {
        assert_eq!(to_bf16(x), bf16::from_f32(x).to_bits(), "{x:e}");
    }
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
}

#[test]
fn every_path_this_cpu_has_matches_the_exact_sum() {
    let required: Vec<String> = std::env::var("PHI_REQUIRE_BF16")
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let mut ran = Vec::new();
    for path in Path::ALL {
        if !path.available() {
            assert!(
                !required.iter().any(|r| r == path.name()),
                "{}: required by PHI_REQUIRE_BF16 but this CPU lacks it",
                path.name()
            );
            eprintln!(
                "bf16 GEMM path {}: NOT RUN (this CPU lacks it)",
                path.name()
            );
            continue;
        }
        // Odd sizes: partial row blocks, panels and k steps; one row block over 18 panel
        // pairs, which the column split deals unevenly (4, 5, 4, 5 on 2 threads).
        let shapes = [
            (1, 1, 1),
            (37, 45, 50),
            (64, 576, 192),
            (70, 100, 33),
            (20, 64, 576),
        ];
        for (m, k, n) in shapes {
            let a = values(m * k, 2 + m as u64);
            let b = values(k * n, 3 + n as u64);
            let packed = PackedB::from_rows(&b, k, n);
            let mut c = vec![f32::NAN; m * n];
            gemm(path, &a, m, &packed, &mut c);
            let want = exact(&a, &b, m, k, n);
            // f32 sums of k products of size ≤ 1: each partial sum rounds by ≤ 2⁻²⁴·k.
            let check = |what: &str, c: &[f32], want: &[f64], k: usize| {
                let tol = k as f64 * 6e-8 + 1e-7;
                for (i, (g, w)) in c.iter().zip(want).enumerate() {
                    let d = (*g as f64 - w).abs();
                    assert!(
                        d <= tol,
                        "{} {what} {m}×{k}×{n}: C[{i}] = {g}, exact {w} (|diff| {d:e} > {tol:e})",
                        path.name()
                    );
                }
            };
            check("gemm", &c, &want, k);
            // Aᵀ·B from A stored transposed ([k×m]), the transpose taken while rounding.
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            check("product_t", &product_t(path, &at, k, m, &packed), &want, k);
            // A·B + A2·B2 in one pass (a LoRA linear's base and rank-r term), r off 32.
            for r in [5, 16] {
                let (a2, b2) = (values(m * r, 7 + r as u64), values(r * n, 8 + r as u64));
                let extra = (PackedA::rows(&a2, m, r), PackedB::from_rows(&b2, r, n));
                let pa = PackedA::rows(&a, m, k);
                let c = product_packed(path, &pa, &packed, Some((&extra.0, &extra.1)));
                let low = exact(&a2, &b2, m, r, n);
                let want: Vec<f64> = want.iter().zip(&low).map(|(x, y)| x + y).collect();
                check(&format!("product_packed (+ rank {r})"), &c, &want, k + r);
            }
        }
        ran.push(path.name());
    }
    eprintln!("bf16 GEMM paths run: {ran:?}");
    assert!(ran.contains(&"scalar-bf16"));
}

#[test]
fn phi_bf16_path_picks_a_path_this_cpu_runs() {
    // The only test here that reads the variable, so setting it races with nothing.
    std::env::set_var("PHI_BF16_PATH", "scalar-bf16");
    assert_eq!(Path::best(), Path::Scalar);
    // A path the CPU lacks (or a typo) is not taken: the best available one is.
    std::env::set_var("PHI_BF16_PATH", "no-such-path");
    let best = Path::best();
    std::env::remove_var("PHI_BF16_PATH");
    assert_eq!(best, Path::best());
    assert!(best.available());
}

/// The input gradient's operand is repacked from the one packing a weight keeps: it must be
/// the packing of Wᵀ, padding included, for sizes off every block edge.
#[test]
fn transposed_packing_is_the_packing_of_the_transpose() {
    for (k, n) in [(1, 1), (7, 33), (32, 32), (45, 17), (64, 96), (100, 3)] {
        let w = values(k * n, (k * 131 + n) as u64);
        let b = PackedB::from_rows(&w, k, n);
        let want = PackedB::pack(n, k, |r, c| w[c * n + r]);
        let got = b.transposed();
        assert_eq!(
            (got.k, got.n, got.k_pad, got.panels),
            (n, k, want.k_pad, want.panels)
        );
        assert!(got.data == want.data, "{k}×{n}: transposed packing differs");
        // Packing from the columns (Wᵀ's rows, here w itself read as [k, n] → B = wᵀ).
        let cols = PackedB::from_cols(&w, n, k);
        assert!(
            cols.data == want.data,
            "{k}×{n}: packing from columns differs"
        );
        let rows = PackedB::from_rows(&w, k, n);
        assert!(
            rows.data == PackedB::pack(k, n, |r, c| w[r * n + c]).data,
            "{k}×{n}: rows"
        );
        // Tile loads of rows split across cache lines run 6.5× slower: every packing's
        // panels start on a line.
        for (what, p) in [
            ("rows", &rows),
            ("cols", &cols),
            ("t", &got),
            ("pack", &want),
        ] {
            assert_eq!(
                p.data.as_ptr() as usize % 64,
                0,
                "{k}×{n}: {what} unaligned"
            );
        }
        // And the weight comes back as its bf16 rounding.
        let back = PackedWeight::in_out(&w, k, n, Path::Scalar).unpack();
        let rounded: Vec<f32> = w.iter().map(|&x| from_bf16(to_bf16(x))).collect();
        assert_eq!(back, rounded, "{k}×{n}: unpack");
    }
}
