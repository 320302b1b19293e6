//! `on_pool`, which every binary's `main` runs its work through: the work runs on a thread of
//! rayon's pool with a `main`-sized stack, kernels called from there split as from outside
//! and give the same values, and what the work returns or panics with reaches the caller.
//! Each test calls `on_pool` before any other use of rayon, so whichever runs first builds
//! the pool with the larger stack.

use phi_kernels::pool::on_pool;
use phi_kernels::thin::wide_t_thin;
use phi_testkit::values as vals;

#[test]
fn work_runs_on_a_pool_thread_and_kernels_there_match_outside() {
    let (t, r, w) = (300, 16, 200);
    let (thin, wide) = (vals(t * r, 1), vals(t * w, 2));
    let (thread, threads, inside) = on_pool(|| {
        (
            rayon::current_thread_index(),
            rayon::current_num_threads(),
            wide_t_thin(&thin, r, &wide, w),
        )
    });
    assert!(thread.is_some(), "the work ran outside the pool");
    assert!(thread.unwrap() < threads);
    let outside = wide_t_thin(&thin, r, &wide, w);
    assert_eq!(inside, outside);
    assert!(inside.iter().any(|v| *v != 0.0) && inside.iter().all(|v| v.is_finite()));
}

/// Frames of 64 KiB, 64 deep: 4 MiB of stack, twice what rayon's threads get by default.
fn deep(n: usize) -> u64 {
    let frame = std::hint::black_box([n as u8; 64 << 10]);
    if n == 0 {
        return frame[1] as u64;
    }
    deep(n - 1) + frame[7] as u64
}

#[test]
fn the_pool_threads_have_a_main_sized_stack() {
    assert_eq!(on_pool(|| deep(64)), (1..=64).sum::<u64>());
}

#[test]
fn a_panic_in_the_work_reaches_the_caller() {
    let caught = std::panic::catch_unwind(|| on_pool(|| -> u32 { panic!("planted in the work") }));
    let payload = caught.expect_err("the panic was lost");
    let msg = payload.downcast_ref::<&str>().copied().unwrap_or_default();
    assert_eq!(msg, "planted in the work");
}
