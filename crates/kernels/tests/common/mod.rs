//! Reading tests/fixtures/quant (safetensors written by the scripts beside them).

use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

/// A fixture file's bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quant")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// An f32 tensor's shape and values.
pub fn f32s(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e:?}"));
    assert_eq!(t.dtype(), Dtype::F32, "{key}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
    (t.shape().to_vec(), v.collect())
}

/// Any tensor's shape and raw bytes.
pub fn bytes(st: &SafeTensors, key: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e:?}"));
    (t.shape().to_vec(), t.data().to_vec())
}
