//! ggml's reference quantizers for the 32-value block types (`quantize_row_*_ref` in
//! ggml-quants.c, as gguf-py's `quants.py` restates them bit for bit), for writing GGUF files:
//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; the 256-value K types are in `kquant`. Blocks run along the contiguous dimension; the f16 scales are
//! rounded to nearest-even while the codes use the f32 scale, as there.

use super::{kquant, QType, QuantError};
use rayon::prelude::*;

/// `data` (whole blocks of 32) in `ty`'s bytes.
pub fn encode(ty: QType, data: &[f32]) -> Result<Vec<u8>, QuantError> {
    let (per, bytes) = ty.block();
    let supported = matches!(
        ty,
        QType::Q8_0
            | QType::Q4_0
            | QType::Q4_1
            | QType::Q5_0
            | QType::Q5_1
            | QType::Q4K
            | QType::Q5K
            | QType::Q6K
    );
    if !supported {
        return Err(QuantError(format!(
            "{}: no quantizer (writable: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)",
            ty.name()
        )));
    }
    if !data.len().is_multiple_of(per) {
        return Err(QuantError(format!(
            "{}: {} values are not whole blocks of {per}",
            ty.name(),
            data.len()
        )));
    }
    if per == 256 {
        let bits = match ty {
            QType::Q4K => 4,
            QType::Q5K => 5,
            _ => 6,
        };
        // Super-blocks are independent and their search costs a few hundred flops a value.
        let blocks: Vec<Vec<u8>> = data
            .par_chunks(per * 64)
            .map(|c| {
                let mut out = Vec::with_capacity(c.len() / per * bytes);
                for b in c.chunks_exact(per) {
                    kquant::super_block(b, bits, &mut out);
                }
                out
            })
            .collect();
        return Ok(blocks.concat());
    }
    let mut out = Vec::with_capacity(data.len() / per * bytes);
    for b in data.chunks_exact(per) {
        let b: &[f32; 32] = b.try_into().expect("blocks of 32");
        match ty {
            QType::Q8_0 => q8_0(b, &mut out),
            QType::Q4_0 => symmetric(b, 4, &mut out),
            QType::Q5_0 => symmetric(b, 5, &mut out),
            QType::Q4_1 => affine(b, 4, &mut out),
            _ => affine(b, 5, &mut out),
        }
    }
    Ok(out)
}

fn f16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// The reciprocal ggml multiplies by (0 for a zero scale).
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn q8_0(b: &[f32; 32], out: &mut Vec<u8>) {
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    out.extend(f16(d));
    // roundf: halves away from zero, as Rust's `round`.
    out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
}

/// Q4_0 / Q5_0: the value of largest magnitude (the first such, sign kept) maps to code 0.
fn symmetric(b: &[f32; 32], bits: u32, out: &mut Vec<u8>) {
    let half_range = (1u32 << (bits - 1)) as f32;
    let top = (1u32 << bits) - 1;
    let max = b
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -half_range;
    let id = inverse(d);
    let q: Vec<u8> = b
        .iter()
        .map(|v| ((v * id + (half_range + 0.5)).trunc() as u32).min(top) as u8)
        .collect();
    out.extend(f16(d));
    pack(&q, bits, out);
}

/// Q4_1 / Q5_1: codes over [min, max] with the minimum stored beside the scale.
fn affine(b: &[f32; 32], bits: u32, out: &mut Vec<u8>) {
    let top = (1u32 << bits) - 1;
    let min = b.iter().copied().fold(f32::INFINITY, f32::min);
    let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / top as f32;
    let id = inverse(d);
    let q: Vec<u8> = b
        .iter()
        .map(|v| (((v - min) * id + 0.5).trunc() as u32).min(top) as u8)
        .collect();
    out.extend(f16(d));
    out.extend(f16(min));
    pack(&q, bits, out);
}

/// Low nibbles: values 0..16 in the low half of each byte, 16..32 in the high half; a 5-bit
/// code's fifth bits go first, value j in bit j of a little-endian u32.
fn pack(q: &[u8], bits: u32, out: &mut Vec<u8>) {
    if bits == 5 {
        let qh = q
            .iter()
            .enumerate()
            .fold(0u32, |h, (j, &c)| h | (((c >> 4) as u32 & 1) << j));
        out.extend(qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}
