//! glibc malloc settings for tensor workloads. By default glibc serves every block over a
//! dynamic threshold with its own mmap and unmaps it on free, so each op's fresh output costs
//! the kernel a page fault and a page clear per 4 KiB: 13 % of a training step under `perf`.
//! Keeping blocks up to 32 MiB (glibc's ceiling) on the heap and not trimming it lets freed
//! tensors be reused (smollm2-135m LoRA step 5.46 → 4.65 s, docs/benchmarks.md).

/// Call once at the start of `main`, before large allocations. No-op off glibc.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
