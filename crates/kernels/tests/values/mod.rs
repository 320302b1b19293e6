//! Test inputs shared by the kernel tests that need plain values rather than fixtures.

/// Deterministic values in [-1, 1) with no simple pattern across rows or columns.
pub fn vals(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
        .collect()
}
