//! glibc malloc settings for tensor workloads. By default glibc serves every block over a
//! dynamic threshold with its own mmap and unmaps it on free, so each op's fresh output costs
//! the kernel a page fault and a page clear per 4 KiB: 13 % of a training step under `perf`.
//! Serving every block from the heap (no mmap at all: the mmap threshold cannot go above
//! 32 MiB, and a 131 MB embedding gradient is made every step) and never trimming it lets
//! freed tensors be reused: SmolLM2-shape LoRA step 5.46 → 4.65 s, Phi-3-small-shape full
//! step 7.8 → 5.7 s, for 5–7 % more peak memory (docs/benchmarks.md).
//! One arena for all threads: these settings govern the main arena only, and since the
//! binaries' work runs on a pool thread (`on_pool`), its tensors would otherwise come from a
//! per-thread arena that maps and trims its own heaps (page faults again: an f32 LoRA step
//! 5 % slower).

/// Call once at the start of `main`, before large allocations. No-op off glibc.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before threads allocate.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// The process's peak resident memory (Linux VmHWM) in MB; None where /proc has no such line.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Hands the heap's free pages back to the system (`malloc_trim`): `tune` keeps freed memory
/// for reuse, so a large one-off release (the f32 base after `pack_bf16`) would otherwise stay
/// resident. No-op off glibc.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Restarts the peak `peak_rss_mb` reports from the current resident size (Linux
/// `/proc/self/clear_refs` 5), so a peak can be taken over one phase (the steps after loading);
/// false where the system does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
