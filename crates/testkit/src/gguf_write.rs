//! Small GGUF files built in tests, through the library's writer (`phi_model::gguf_write`)
//! and block quantizers (`phi_kernels::quant::encode`).

use phi_kernels::quant::{encode, QType};
use phi_model::gguf::{F16, F32};
use phi_model::gguf_write::{write_to, TensorPlan};

pub use phi_model::gguf_write::MetaValue as Meta;

/// Row-major `data` in ggml type `ty` (F32, F16, or a block type with a quantizer).
pub fn quantize(ty: u32, data: &[f32]) -> Vec<u8> {
    match ty {
        F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        F16 => data
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => {
            let q = QType::from_ggml(ty).unwrap_or_else(|| panic!("ggml type {ty}"));
            encode(q, data).unwrap_or_else(|e| panic!("{e}"))
        }
    }
}

/// A GGUF v3 file. `tensors`: (gguf name, HF-order shape, ggml type, raw bytes).
pub fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[(&str, Vec<usize>, u32, Vec<u8>)]) -> Vec<u8> {
    let meta: Vec<(String, Meta)> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let plans: Vec<TensorPlan> = tensors
        .iter()
        .map(|(name, shape, ty, bytes)| TensorPlan {
            name: name.to_string(),
            shape: shape.clone(),
            ggml_type: *ty,
            bytes: bytes.len(),
        })
        .collect();
    write_to(
        Vec::new(),
        &meta,
        &plans,
        |i| Ok(tensors[i].3.clone()),
        "test file",
    )
    .expect("an in-memory file")
}
