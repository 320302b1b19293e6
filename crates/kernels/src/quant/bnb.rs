//! bitsandbytes' weight formats as QLoRA (PEFT, LLaMA-Factory's `--quantization_bit`) applies
//! them at load, on the CPU backend's algorithms (bitsandbytes 0.50; tests/fixtures/quant
//! holds its outputs): NF4 / FP4 in blocks of 64 of the flattened weight with an absmax
//! scale, the absmaxes optionally quantized again in groups of 256 (double quantization);
//! and 8-bit rows with one absmax scale each.

use super::{QType, QuantError, QuantWeight, Scales};
use rayon::prelude::*;

/// Values per 4-bit block.
pub const BLOCK: usize = 64;
/// Absmaxes per group under double quantization.
pub const GROUP: usize = 256;

/// NF4's 16 levels (QLoRA's normal quantiles, as bitsandbytes lists them).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4's levels by code (sign bit, 2 exponent bits, 1 mantissa bit), divided by their
/// largest magnitude as bitsandbytes does (its code 8, "−0", is +0.0 there).
pub fn fp4_table() -> [f32; 16] {
    let raw: [f32; 16] = [
        0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
        -3.0,
    ];
    raw.map(|v| v / 12.0)
}

fn table(ty: QType) -> [f32; 16] {
    match ty {
        QType::Nf4 => NF4,
        _ => fp4_table(),
    }
}

/// 32 values from 16 packed bytes (element 2i in byte i's high nibble, 2i + 1 in its low).
#[inline(always)]
pub(crate) fn decode4(ty: QType, bytes: &[u8], absmax: f32, out: &mut [f32; 32]) {
    let t = table(ty);
    for (i, &b) in bytes.iter().enumerate() {
        out[2 * i] = t[(b >> 4) as usize] * absmax;
        out[2 * i + 1] = t[(b & 0x0F) as usize] * absmax;
    }
}

/// 1/127 as bitsandbytes' int8 dequantization multiplies by it (7.874015718698502e-3 in f32).
const INV127: f32 = f32::from_bits(0x3c01_0204);

/// 32 int8 values of a row with absmax `scale`: (q·scale)·(1/127).
#[inline(always)]
pub(crate) fn decode8(bytes: &[u8], scale: f32, out: &mut [f32; 32]) {
    for (o, &q) in out.iter_mut().zip(bytes) {
        *o = (q as i8 as f32 * scale) * INV127;
    }
}

/// The code of a scaled value in [-1, 1]: the level whose interval of midpoints holds it, a
/// value on a midpoint taking the lower level (`torch.bucketize`).
fn code4(levels: &[(f32, u8)], mids: &[f32], s: f32) -> u8 {
    let i = mids.iter().take_while(|&&m| m < s).count();
    levels[i].1
}

/// The levels sorted with their codes, and the midpoints between neighbours.
fn sorted_levels(ty: QType) -> (Vec<(f32, u8)>, Vec<f32>) {
    let t = table(ty);
    let mut levels: Vec<(f32, u8)> = t.iter().enumerate().map(|(i, &v)| (v, i as u8)).collect();
    levels.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mids = levels.windows(2).map(|w| (w[0].0 + w[1].0) / 2.0).collect();
    (levels, mids)
}

/// Quantizes a [d_out, d_in] f32 weight (its values as loaded: bf16 or f16 weights widened
/// exactly) to NF4 or FP4, `nested` quantizing the absmaxes too.
pub fn quantize4(
    ty: QType,
    w: &[f32],
    d_out: usize,
    d_in: usize,
    nested: bool,
) -> Result<QuantWeight, QuantError> {
    assert!(matches!(ty, QType::Nf4 | QType::Fp4));
    if !d_in.is_multiple_of(BLOCK) {
        return Err(QuantError(format!(
            "{}: rows of {d_in} values are not whole blocks of {BLOCK}",
            ty.name()
        )));
    }
    let (levels, mids) = sorted_levels(ty);
    let mut data = vec![0u8; w.len() / 2];
    let mut absmax = vec![0f32; w.len() / BLOCK];
    data.par_chunks_mut(BLOCK / 2)
        .zip(absmax.par_iter_mut())
        .zip(w.par_chunks(BLOCK))
        .for_each(|((out, am), x)| {
            let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            *am = m;
            let inv = 1.0 / m.max(1e-38);
            let code = |v: f32| code4(&levels, &mids, (v * inv).clamp(-1.0, 1.0));
            for (o, pair) in out.iter_mut().zip(x.chunks_exact(2)) {
                *o = (code(pair[0]) << 4) | code(pair[1]);
            }
        });
    let scales = if nested {
        nest(&absmax)
    } else {
        Scales::F32(absmax)
    };
    QuantWeight::new(ty, d_out, d_in, data, scales)
}

/// Double quantization of the absmaxes: their mean taken out, then 8-bit codes of the signed
/// dynamic map in groups of 256, each with its own absmax. The mean is summed in f64 and
/// rounded (torch's f32 cascade sum can differ in the last bit on large layers, and its order
/// there depends on the thread count: no single reference exists).
fn nest(absmax: &[f32]) -> Scales {
    let mean = absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len().max(1) as f64;
    let offset = mean as f32;
    let map = dynamic_map(true);
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let (codes, group_max) = quantize_blockwise(&centred, &map, GROUP);
    Scales::Nested {
        codes,
        absmax: group_max,
        map: Box::new(map),
        offset,
        group: GROUP,
    }
}

/// bitsandbytes' 8-bit blockwise quantization on the CPU: each block's values over its absmax,
/// then a code from a 65536-entry table over [-1, 1] (not the nearest code: the table's
/// resolution is 2/65535; the optimizer states and the nested scales depend on it). Returns
/// (codes, absmax per block).
pub fn quantize_blockwise(x: &[f32], map: &[f32; 256], block: usize) -> (Vec<u8>, Vec<f32>) {
    let q = Quantizer8::new(map);
    let mut codes = vec![0u8; x.len()];
    let absmax = x
        .chunks(block)
        .zip(codes.chunks_mut(block))
        .map(|(xs, out)| q.block(xs, out))
        .collect();
    (codes, absmax)
}

/// A map with its code table, for quantizing many blocks.
pub struct Quantizer8 {
    lut: Vec<u8>,
}

impl Quantizer8 {
    /// The code of each of 65536 evenly spaced values in [-1, 1]: how many midpoints of the
    /// sorted map lie below it.
    pub fn new(map: &[f32; 256]) -> Quantizer8 {
        let mids: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        let lut = (0..65536u32)
            .map(|i| {
                let v = (i as f32 + i as f32) / 65535.0 - 1.0;
                mids.partition_point(|&m| m < v) as u8
            })
            .collect();
        Quantizer8 { lut }
    }

    /// One block's codes into `out`; returns its absmax (codes 0 for an all-zero block).
    pub fn block(&self, xs: &[f32], out: &mut [u8]) -> f32 {
        let am = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        if am == 0.0 {
            out.fill(0);
            return am;
        }
        let inv = 1.0 / am;
        for (o, &v) in out.iter_mut().zip(xs) {
            let t = ((v * inv).clamp(-1.0, 1.0) + 1.0) * 0.5;
            let idx = t.mul_add(65535.0, 0.5) as usize;
            *o = self.lut[idx & 0xFFFF];
        }
        am
    }
}

/// bitsandbytes' dynamic map (`create_dynamic_map(signed, max_exponent_bits=7)`), ascending:
/// for each decade 10^(i−6), the midpoints of an even split of [0.1, 1] into 2^i (signed) or
/// 2^(i+1) parts, with both signs where signed; then 0 and 1, zero-padded to 256.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut v: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let m = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let step = (1.0f32 - 0.1) / (m - 1) as f32;
        let b: Vec<f32> = (0..m)
            .map(|k| match k < m / 2 {
                true => step.mul_add(k as f32, 0.1),
                false => (-step).mul_add((m - 1 - k) as f32, 1.0),
            })
            .collect();
        let scale = 10f64.powi(i - 6) as f32;
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        v.extend(means.iter().map(|m| scale * m));
        if signed {
            v.extend(means.iter().map(|m| -scale * m));
        }
    }
    v.push(0.0);
    v.push(1.0);
    v.resize(256, 0.0);
    v.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&v);
    out
}

/// LLM.int8's weight storage, as bitsandbytes makes it from a weight cast to f16 first: each
/// row's values as round-half-even(h·((1/absmax)·127)) with its absmax (an all-zero row: codes
/// 0, absmax 0).
pub fn quantize8(w: &[f32], d_out: usize, d_in: usize) -> Result<QuantWeight, QuantError> {
    let mut data = vec![0u8; w.len()];
    let mut scales = vec![0f32; d_out];
    data.par_chunks_mut(d_in.max(1))
        .zip(scales.par_iter_mut())
        .zip(w.par_chunks(d_in.max(1)))
        .for_each(|((out, s), x)| {
            let h: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            let m = h.iter().fold(0f32, |m, v| m.max(v.abs()));
            *s = m;
            let k = (1.0 / m) * 127.0;
            for (o, &v) in out.iter_mut().zip(&h) {
                let q = (v * k).round_ties_even();
                // 0·∞ (an all-zero row) is NaN, which bitsandbytes stores as 0.
                *o = if q.is_nan() { 0 } else { q as i8 as u8 };
            }
        });
    QuantWeight::new(QType::Int8, d_out, d_in, data, Scales::F32(scales))
}
