//! Quantized weights: decoding against the reference implementations' own outputs (the `gguf`
//! package for GGUF's block types, bitsandbytes for NF4 / FP4 / int8; tests/fixtures/quant
//! holds them with the scripts that wrote them), and the products that decode next to the
//! GEMM against decode-then-GEMM. A bf16 path this CPU lacks is reported as not run by name.

use phi_kernels::bf16::{self, PackedA, PackedB, Path};
use phi_kernels::quant::gemm::{product_bf16, product_f32, Side};
use phi_kernels::quant::{bnb, QType, QuantWeight, Scales};
use phi_testkit::values;
use safetensors::{Dtype, SafeTensors};

mod common;
use common::{bytes, f32s, fixture};

/// Bit-for-bit equality (the sign of zero included), naming the first difference.
fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}[{i}]: {g:e} ({:#010x}), reference {w:e} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn gguf_blocks_decode_as_the_gguf_package_does() {
    let raw = fixture("gguf.safetensors");
    let st = SafeTensors::deserialize(&raw).unwrap();
    let types = [
        ("Q8_0", 8),
        ("Q4_0", 2),
        ("Q4_1", 3),
        ("Q5_0", 6),
        ("Q5_1", 7),
        ("Q4_K", 12),
        ("Q5_K", 13),
        ("Q6_K", 14),
    ];
    for (name, id) in types {
        let ty = QType::from_ggml(id).unwrap_or_else(|| panic!("{name} is supported"));
        assert_eq!(ty.name(), name);
        let (shape, data) = bytes(&st, &format!("{name}.raw"));
        let (dshape, want) = f32s(&st, &format!("{name}.deq"));
        let w = QuantWeight::new(ty, dshape[0], dshape[1], data, Scales::None).unwrap();
        assert_eq!(shape[0], dshape[0]);
        same_bits(name, &w.dequantize(), &want);
    }
    // Types the fixture has and we do not decode: named as unsupported, not misread.
    for id in [10, 11] {
        assert_eq!(QType::from_ggml(id), None);
    }
}

#[test]
fn truncated_blocks_are_refused() {
    let e = QuantWeight::new(QType::Q4K, 2, 256, vec![0; 143 * 2], Scales::None).unwrap_err();
    assert!(e.0.contains("Q4_K"), "{e}");
    let e = QuantWeight::new(QType::Q8_0, 2, 48, vec![0; 34 * 3], Scales::None).unwrap_err();
    assert!(e.0.contains("whole blocks of 32"), "{e}");
}

/// Weights of each family with shapes that leave partial row blocks, a partial last pair of
/// panels and (input gradient) a k that is not a multiple of 32.
fn weights() -> Vec<QuantWeight> {
    let gguf = fixture("gguf.safetensors");
    let st = SafeTensors::deserialize(&gguf).unwrap();
    let mut out = Vec::new();
    for (name, ty) in [
        ("Q4_K", QType::Q4K),
        ("Q6_K", QType::Q6K),
        ("Q4_1", QType::Q4_1),
    ] {
        // 4 rows of the fixture repeated to 37 rows × 512.
        let (_, raw) = bytes(&st, &format!("{name}.raw"));
        let row = raw.len() / 4;
        let data: Vec<u8> = (0..37)
            .flat_map(|r| raw[(r % 4) * row..][..row].to_vec())
            .collect();
        out.push(QuantWeight::new(ty, 37, 512, data, Scales::None).unwrap());
    }
    let w = values(45 * 192, 7);
    out.push(bnb::quantize4(QType::Nf4, &w, 45, 192, true).unwrap());
    out.push(bnb::quantize4(QType::Fp4, &w, 45, 192, false).unwrap());
    out.push(bnb::quantize8(&w, 45, 192).unwrap());
    out
}

/// An f32 sum of products against their f64 sum: within 2⁻²⁰ of the sum of magnitudes (the
/// terms' f32 rounding, k ≤ 512 partial sums).
fn close(what: &str, got: f32, terms: impl Iterator<Item = f64>) {
    let (s, mag) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
    let tol = mag * 1e-6 + 1e-30;
    assert!(
        (got as f64 - s).abs() <= tol,
        "{what}: {got} vs {s} (tolerance {tol:e})"
    );
}

#[test]
fn decoding_next_to_the_gemm_equals_decoding_first() {
    let mut ran = Vec::new();
    for w in weights() {
        let deq = w.dequantize();
        let (d_out, d_in) = (w.d_out, w.d_in);
        for m in [1, 70, 300] {
            let x = values(m * d_in, m as u64);
            let dy = values(m * d_out, 3 + m as u64);
            // f32: against a plain f64 sum of the decoded weight's products.
            let y = product_f32(&w, Side::Forward, &x, m);
            let dx = product_f32(&w, Side::InputGrad, &dy, m);
            for i in 0..m {
                for j in 0..d_out {
                    let t = (0..d_in).map(|k| x[i * d_in + k] as f64 * deq[j * d_in + k] as f64);
                    close(&format!("{:?} y[{i},{j}]", w.ty), y[i * d_out + j], t);
                }
                for k in 0..d_in {
                    let t = (0..d_out).map(|j| dy[i * d_out + j] as f64 * deq[j * d_in + k] as f64);
                    close(&format!("{:?} dx[{i},{k}]", w.ty), dx[i * d_in + k], t);
                }
            }
            // bf16: the same tiles as the packed decoded weight, so the same bits.
            for path in Path::ALL {
                if !path.available() {
                    continue;
                }
                ran.push(path);
                let fwd = PackedB::from_cols(&deq, d_in, d_out);
                let want = bf16::product(path, &x, m, &fwd);
                let px = PackedA::rows(&x, m, d_in);
                let got = product_bf16(path, &w, Side::Forward, &px, None);
                same_bits(
                    &format!("{:?} {} forward m={m}", w.ty, path.name()),
                    &got,
                    &want,
                );
                let bwd = PackedB::from_rows(&deq, d_out, d_in);
                let want = bf16::product(path, &dy, m, &bwd);
                let pdy = PackedA::rows(&dy, m, d_out);
                let got = product_bf16(path, &w, Side::InputGrad, &pdy, None);
                same_bits(
                    &format!("{:?} {} input grad m={m}", w.ty, path.name()),
                    &got,
                    &want,
                );
                // A LoRA side path summed into the same tiles.
                let r = 8;
                let (h, b) = (values(m * r, 11), values(r * d_out, 12));
                let (ph, pb) = (PackedA::rows(&h, m, r), PackedB::from_rows(&b, r, d_out));
                let want = bf16::product_packed(path, &px, &fwd, Some((&ph, &pb)));
                let got = product_bf16(path, &w, Side::Forward, &px, Some((&ph, &pb)));
                same_bits(
                    &format!("{:?} {} lora m={m}", w.ty, path.name()),
                    &got,
                    &want,
                );
            }
        }
    }
    for path in Path::ALL.into_iter().filter(|p| !ran.contains(p)) {
        eprintln!(
            "quantized bf16 GEMM path {}: NOT RUN (this CPU lacks it)",
            path.name()
        );
    }
}

fn bf16s(st: &SafeTensors, key: &str) -> Vec<f32> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e:?}"));
    assert_eq!(t.dtype(), Dtype::BF16, "{key}");
    let v = t
        .data()
        .chunks_exact(2)
        .map(|c| bf16::from_bf16(u16::from_le_bytes([c[0], c[1]])));
    v.collect()
}

fn to_bf16_values(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| bf16::from_bf16(bf16::to_bf16(v)))
        .collect()
}

fn scales_f32(w: &QuantWeight) -> &[f32] {
    match w.scales() {
        Scales::F32(s) => s,
        other => panic!("expected f32 scales, found {other:?}"),
    }
}

#[test]
fn four_bit_codes_and_values_equal_bitsandbytes() {
    let raw = fixture("bnb.safetensors");
    let st = SafeTensors::deserialize(&raw).unwrap();
    let (shape, w) = f32s(&st, "w");
    let (d_out, d_in) = (shape[0], shape[1]);
    for (name, ty) in [("nf4", QType::Nf4), ("fp4", QType::Fp4)] {
        let table = match ty {
            QType::Nf4 => bnb::NF4,
            _ => bnb::fp4_table(),
        };
        same_bits(
            &format!("{name}.table"),
            &table,
            &f32s(&st, &format!("{name}.table")).1,
        );
        let q = bnb::quantize4(ty, &w, d_out, d_in, false).unwrap();
        assert_eq!(
            q.data(),
            &bytes(&st, &format!("{name}.codes")).1[..],
            "{name} codes"
        );
        same_bits(
            &format!("{name}.absmax"),
            scales_f32(&q),
            &f32s(&st, &format!("{name}.absmax")).1,
        );
        same_bits(
            &format!("{name}.deq"),
            &q.dequantize(),
            &f32s(&st, &format!("{name}.deq")).1,
        );
    }
    // A bf16 weight: the same codes as its values widened; the output rounded to bf16.
    let wb = to_bf16_values(&w);
    let q = bnb::quantize4(QType::Nf4, &wb, d_out, d_in, false).unwrap();
    assert_eq!(q.data(), &bytes(&st, "nf4bf.codes").1[..], "nf4bf codes");
    same_bits("nf4bf.absmax", scales_f32(&q), &f32s(&st, "nf4bf.absmax").1);
    same_bits(
        "nf4bf.deq",
        &to_bf16_values(&q.dequantize()),
        &f32s(&st, "nf4bf.deq").1,
    );
    // Rows that are not whole blocks of 64 are refused, not blocked across rows.
    let e = bnb::quantize4(QType::Nf4, &w[..150], 3, 50, false).unwrap_err();
    assert!(e.0.contains("whole blocks of 64"), "{e}");
}

#[test]
fn double_quantized_scales_equal_bitsandbytes() {
    let raw = fixture("bnb.safetensors");
    let st = SafeTensors::deserialize(&raw).unwrap();
    let w2 = bf16s(&st, "w2");
    let q = bnb::quantize4(QType::Nf4, &w2, 260, 64, true).unwrap();
    assert_eq!(q.data(), &bytes(&st, "nf4dq.codes").1[..], "codes");
    let Scales::Nested {
        codes,
        absmax,
        map,
        offset,
        group,
    } = q.scales()
    else {
        panic!("nested scales")
    };
    assert_eq!(*group, 256);
    assert_eq!(codes, &bytes(&st, "nf4dq.absmax_q").1, "absmax codes");
    same_bits("absmax2", absmax, &f32s(&st, "nf4dq.absmax2").1);
    same_bits("offset", &[*offset], &f32s(&st, "nf4dq.offset").1);
    same_bits("code2", &map[..], &f32s(&st, "nf4dq.code2").1);
    same_bits(
        "deq",
        &to_bf16_values(&q.dequantize()),
        &bf16s(&st, "nf4dq.deq"),
    );
    // Each block's absmax as rebuilt (a zero block's comes out negative, as bitsandbytes').
    let rebuilt: Vec<f32> = (0..260)
        .map(|b| map[codes[b] as usize] * absmax[b / 256] + offset)
        .collect();
    same_bits("absmax_deq", &rebuilt, &f32s(&st, "nf4dq.absmax_deq").1);
}

#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let raw = fixture("bnb.safetensors");
    let st = SafeTensors::deserialize(&raw).unwrap();
    same_bits(
        "signed",
        &bnb::dynamic_map(true),
        &f32s(&st, "adam.qmap1").1,
    );
    same_bits(
        "unsigned",
        &bnb::dynamic_map(false),
        &f32s(&st, "adam.qmap2").1,
    );
}

#[test]
fn int8_rows_equal_bitsandbytes() {
    let raw = fixture("bnb.safetensors");
    let st = SafeTensors::deserialize(&raw).unwrap();
    let (shape, w) = f32s(&st, "w");
    let q = bnb::quantize8(&w, shape[0], shape[1]).unwrap();
    assert_eq!(q.data(), &bytes(&st, "int8.cb").1[..], "cb");
    same_bits("scb", scales_f32(&q), &f32s(&st, "int8.scb").1);
    same_bits("deq", &q.dequantize(), &f32s(&st, "int8.deq").1);
}
