//! Where a binary's work runs: on one of rayon's pool threads rather than on `main`.
//!
//! Every kernel here splits its work with rayon. Called from `main`, which is outside the
//! pool, each call hands its tasks across (inject, wake a worker, sleep until a latch wakes
//! `main` again): two thread wake-ups per op, thousands of ops a training step, with both
//! workers idle while `main` runs the step's serial parts. From a pool thread the same calls
//! push tasks onto that thread's own queue, which it works on itself while the other thread
//! steals. On a 2-core Zen 4, `phi-generate`'s greedy decoding (SmolLM2 Q4_1, many small
//! ops a token) went from 21–24 to 26–28 tokens/s; a training step, whose ops are larger,
//! from ~100 000 to ~17 000 context switches in 9 steps at the same speed (docs/benchmarks.md).

/// A pool thread's stack: the 8 MiB a Linux `main` gets, since `main`'s work now runs there
/// (rayon's default is Rust's 2 MiB).
const STACK: usize = 8 << 20;

/// Runs `f` on a thread of rayon's global pool and returns what it returns; a panic in `f`
/// resumes in the caller. Call it first thing in `main`: the pool is built here, with the
/// larger stack, unless something built it before (then `f` runs on that pool as it is).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // An error means the global pool exists already; it serves as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(STACK)
        .build_global();
    rayon::scope(|_| f())
}
