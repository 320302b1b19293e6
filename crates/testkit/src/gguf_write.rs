//! A minimal GGUF writer (llama metadata, F32/F16/Q8_0/Q4_0/Q4_1 tensors) for tests that
//! need small GGUF files; it quantizes the way llama.cpp's reference quantizers do.

use phi_model::gguf::{F16, F32, Q4_0, Q4_1, Q8_0};

pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn h(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// Quantizes row-major `data` to ggml type `ty`.
pub fn quantize(ty: u32, data: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        F32 => out.extend(data.iter().flat_map(|v| v.to_le_bytes())),
        F16 => out.extend(data.iter().flat_map(|v| h(*v))),
        Q8_0 => {
            for b in data.chunks(32) {
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                out.extend(b.iter().map(|v| (v * inv).round() as i8 as u8));
            }
        }
        Q4_0 => {
            for b in data.chunks(32) {
                let max = b
                    .iter()
                    .fold(0.0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
                let d = max / -8.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        Q4_1 => {
            for b in data.chunks(32) {
                let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                out.extend(h(min));
                let q = |v: f32| (((v - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        _ => {}
    }
    out
}

/// A GGUF v3 file. `tensors`: (gguf name, HF-order shape, ggml type, raw bytes).
pub fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[(&str, Vec<usize>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::Strs(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                for s in v {
                    put_str(&mut out, s);
                }
            }
        }
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for (_, _, _, bytes) in tensors {
        offsets.push(offset);
        offset += bytes.len().div_ceil(32) * 32;
    }
    for ((name, shape, ty, _), off) in tensors.iter().zip(&offsets) {
        put_str(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend((*off as u64).to_le_bytes());
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (_, _, _, bytes) in tensors {
        let start = out.len();
        out.extend(bytes);
        out.resize(start + bytes.len().div_ceil(32) * 32, 0);
    }
    out
}
