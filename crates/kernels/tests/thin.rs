//! The rank-r products of LoRA's factor gradients (`thin`) against plain sums in token order:
//! each output is the same chain of fused multiply-adds, so the values must match exactly, on
//! shapes with whole register blocks, ragged edges and more tokens than one pass.

use phi_kernels::bf16::{from_bf16, to_bf16};
use phi_kernels::thin::{block_path, thin_t_wide, wide_rows_t_thin, wide_t_thin, Wide};
use phi_testkit::values as vals;

/// wideᵀ·thin [w × r], each sum a mul_add chain over t = 0..T.
fn reference(thin: &[f32], r: usize, wide: &[f32], w: usize) -> Vec<f32> {
    let t_len = thin.len() / r;
    let mut out = vec![0f32; w * r];
    for j in 0..w {
        for i in 0..r {
            let mut s = 0f32;
            for t in 0..t_len {
                s = thin[t * r + i].mul_add(wide[t * w + j], s);
            }
            out[j * r + i] = s;
        }
    }
    out
}

#[test]
fn thin_products_equal_sums_in_token_order() {
    if block_path() != "avx512" {
        eprintln!("thin: the AVX-512 register block was not run on this machine (no AVX-512F)");
    }
    // (tokens, r, w): whole 8 × 32 blocks, ragged r and w, one and several token passes.
    for (t, r, w) in [
        (64, 16, 64),
        (300, 16, 96),
        (257, 5, 70),
        (513, 9, 33),
        (3, 1, 1),
    ] {
        let (thin, wide) = (vals(t * r, 1), vals(t * w, 2));
        let want = reference(&thin, r, &wide, w);
        let got = wide_t_thin(&thin, r, &wide, w);
        assert!(want.iter().all(|v| v.is_finite() && *v != 0.0) || t < 8);
        assert_eq!(got, want, "wide_t_thin, T {t}, r {r}, w {w}");
        let got_t = thin_t_wide(&thin, r, &wide, w);
        for j in 0..w {
            for i in 0..r {
                assert_eq!(got_t[i * w + j], want[j * r + i], "thin_t_wide ({i}, {j})");
            }
        }
    }
}

/// An input kept in bf16 rows (padded past its width, as the bf16 kernels pack it) gives the
/// sums of its widened values, bit for bit.
#[test]
fn bf16_rows_give_the_sums_of_their_values() {
    for (t, r, w, stride) in [(64, 16, 64, 64), (300, 16, 96, 128), (257, 5, 70, 96)] {
        let thin = vals(t * r, 3);
        let wide = vals(t * stride, 4);
        let rows: Vec<u16> = wide.iter().map(|&x| to_bf16(x)).collect();
        // The same values in f32, the padding dropped.
        let widened: Vec<f32> = (0..t * w)
            .map(|i| from_bf16(rows[(i / w) * stride + i % w]))
            .collect();
        let want = reference(&thin, r, &widened, w);
        assert!(want.iter().all(|v| v.is_finite() && *v != 0.0));
        let got = wide_rows_t_thin(&thin, r, Wide::Bf16(&rows), w, stride);
        assert_eq!(got, want, "bf16 rows, T {t}, r {r}, w {w}, stride {stride}");
    }
}
