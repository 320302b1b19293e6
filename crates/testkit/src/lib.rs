//! Test support, kept out of the library crates: oracle case discovery with NaN-strict
//! comparisons (`oracle`), a small GGUF writer for fixtures built in tests (`gguf_write`), and
//! reproducible test values (`values`).

pub mod gguf_reference;
pub mod gguf_write;
pub mod oracle;
pub mod tiny_llama;

/// `n` values in [-1, 1) from an xorshift stream seeded by `seed`: the same on every machine.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// The device the oracle suite runs on: `PHI_TEST_DEVICE` (cpu, vulkan, vulkan:cpu, cuda, ...),
/// cpu when unset. A device the build or the machine lacks fails the test that asks for it.
pub fn device() -> burn::tensor::Device {
    let name = test_device_name();
    let device =
        phi_model::device_from_name(&name).unwrap_or_else(|e| panic!("PHI_TEST_DEVICE: {e}"));
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| eprintln!("oracle suite on --device {name}: {device:?}"));
    device
}

/// `PHI_TEST_DEVICE`'s value, for binaries' `--device`.
pub fn test_device_name() -> String {
    std::env::var("PHI_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}
