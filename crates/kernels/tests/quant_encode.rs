//! ggml's block quantizers against gguf-py's (tests/fixtures/quant/gguf_encode.safetensors,
//! written by gen_gguf_encode.py): the same bytes for every input row, special blocks included,
//! and the codes decode back within a step of their scale.

mod common;

use common::{bytes, f32s, fixture};
use phi_kernels::quant::{encode, QType, QuantWeight, Scales};
use safetensors::SafeTensors;

const TYPES: [QType; 5] = [
    QType::Q8_0,
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
];

#[test]
fn block_quantizers_write_gguf_pys_bytes() {
    let file = fixture("gguf_encode.safetensors");
    let st = SafeTensors::deserialize(&file).unwrap();
    let (shape, x) = f32s(&st, "x");
    let cols = shape[1];
    for ty in TYPES {
        let (_, want) = bytes(&st, ty.name());
        let row_bytes = want.len() / shape[0];
        for (r, row) in x.chunks_exact(cols).enumerate() {
            let got = encode(ty, row).unwrap();
            let want = &want[r * row_bytes..(r + 1) * row_bytes];
            let bad = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(
                got.len() == want.len() && bad.is_none(),
                "{} row {r}: byte {bad:?} of {} differs ({} bytes, want {})",
                ty.name(),
                row_bytes,
                got.len(),
                want.len()
            );
        }
    }
}

/// llama.cpp's own K-quant bytes (ggml's C reference through ctypes, gen_gguf_encode_k.py):
/// every super-block equal, special ones included.
#[test]
fn k_quantizers_write_ggmls_bytes() {
    let file = fixture("gguf_encode_k.safetensors");
    let st = SafeTensors::deserialize(&file).unwrap();
    let (shape, x) = f32s(&st, "x");
    let cols = shape[1];
    for ty in [QType::Q4K, QType::Q5K, QType::Q6K] {
        let (_, want) = bytes(&st, ty.name());
        let block = ty.block().1;
        let row_bytes = want.len() / shape[0];
        for (r, row) in x.chunks_exact(cols).enumerate() {
            let got = encode(ty, row).unwrap();
            let want = &want[r * row_bytes..(r + 1) * row_bytes];
            assert_eq!(got.len(), want.len(), "{} row {r}", ty.name());
            let bad = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(
                bad.is_none(),
                "{} row {r}: super-block {:?}, byte {:?} of {block} differs",
                ty.name(),
                bad.map(|b| b / block),
                bad.map(|b| b % block)
            );
        }
    }
}

/// Decoding what the K quantizers wrote gives the values back within a code step.
#[test]
fn k_codes_decode_close() {
    let x: Vec<f32> = phi_testkit::values(256 * 32, 9)
        .iter()
        .map(|v| 0.02 * v)
        .collect();
    // One code step over the values' range: half a step from the codes, the rest from the
    // scales' own coding.
    for (ty, rel) in [
        (QType::Q4K, 2.0 / 15.0),
        (QType::Q5K, 2.0 / 31.0),
        (QType::Q6K, 1.0 / 32.0),
    ] {
        let q = QuantWeight::new(ty, 32, 256, encode(ty, &x).unwrap(), Scales::None).unwrap();
        let back = q.dequantize();
        let err = x
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            err.is_finite() && err <= rel * amax,
            "{}: max error {err} against {amax}",
            ty.name()
        );
    }
}

#[test]
fn block_codes_decode_within_a_step() {
    let x = phi_testkit::values(32 * 64, 5);
    for ty in TYPES {
        let q = QuantWeight::new(ty, 64, 32, encode(ty, &x).unwrap(), Scales::None).unwrap();
        let back = q.dequantize();
        for (b, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let (lo, hi) = xs
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let amax = lo.abs().max(hi.abs());
            // Half a step; a whole one for Q4_0 / Q5_0, whose codes stop one short on the
            // side opposite the largest magnitude; plus the f16 rounding of the scale (times up to 2·amax) and of the minimum.
            let step = match ty {
                QType::Q8_0 => 0.5 * amax / 127.0,
                QType::Q4_0 => amax / 8.0,
                QType::Q5_0 => amax / 16.0,
                QType::Q4_1 => 0.5 * (hi - lo) / 15.0,
                _ => 0.5 * (hi - lo) / 31.0,
            };
            let bound = step + 4.0 * amax * 2f32.powi(-11) + 1e-7;
            for (v, w) in xs.iter().zip(ys) {
                assert!(
                    (v - w).abs() <= bound,
                    "{} block {b}: {v} → {w} (bound {bound})",
                    ty.name()
                );
            }
        }
    }
}

#[test]
fn types_without_a_quantizer_are_named() {
    let err = encode(QType::Nf4, &[0.0; 256]).unwrap_err().0;
    assert!(err.starts_with("nf4") && err.contains("Q6_K"), "{err}");
    let err = encode(QType::Q8_0, &[0.0; 33]).unwrap_err().0;
    assert!(err.contains("33") && err.contains("32"), "{err}");
}
