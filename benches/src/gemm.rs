//! `--gemm`: the machine's f32 GEMM rate through Burn's matmul on the same device, at 1024³ and
//! at the shapes one step of the chosen model runs (forward, input-gradient and
//! weight-gradient layouts, the head, attention's batched products). One JSON line per GEMM,
//! then a summary line with the best rate: the "machine's measured f32 GEMM GFLOP/s".

use crate::shapes::shape_config;
use crate::Args;
use anyhow::Result;
use burn::tensor::{Device, Distribution, Tensor};
use phi_kernels::bf16::{self, PackedB, Path};
use serde_json::json;
use std::time::Instant;

/// One product `[bt, m, k] · [bt, k, n]`; `lhs_t` / `rhs_t` build that operand transposed
/// (stored as [k, m] / [n, k]), as the backward's GEMMs see them.
struct Gemm {
    what: String,
    bt: usize,
    m: usize,
    k: usize,
    n: usize,
    lhs_t: bool,
    rhs_t: bool,
}

fn g(what: &str, m: usize, k: usize, n: usize) -> Gemm {
    Gemm {
        what: what.to_string(),
        bt: 1,
        m,
        k,
        n,
        lhs_t: false,
        rhs_t: false,
    }
}

fn operand(bt: usize, rows: usize, cols: usize, transposed: bool, dev: &Device) -> Tensor<3> {
    let dist = Distribution::Uniform(-1.0, 1.0);
    if transposed {
        Tensor::<3>::random([bt, cols, rows], dist, dev).swap_dims(1, 2)
    } else {
        Tensor::<3>::random([bt, rows, cols], dist, dev)
    }
}

/// GFLOP/s of `x`, timed over at least `min_s` seconds (and 3 products) after 2 warm-ups.
fn time(x: &Gemm, dev: &Device, min_s: f64) -> Result<(f64, usize)> {
    let a = operand(x.bt, x.m, x.k, x.lhs_t, dev);
    let b = operand(x.bt, x.k, x.n, x.rhs_t, dev);
    let sync = || {
        dev.sync()
            .map_err(|e| anyhow::anyhow!("device sync: {e:?}"))
    };
    for _ in 0..2 {
        std::hint::black_box(a.clone().matmul(b.clone()));
        sync()?;
    }
    let (t0, mut reps) = (Instant::now(), 0usize);
    while reps < 3 || t0.elapsed().as_secs_f64() < min_s {
        std::hint::black_box(a.clone().matmul(b.clone()));
        sync()?;
        reps += 1;
    }
    let flop = 2.0 * (x.bt * x.m * x.k * x.n) as f64 * reps as f64;
    Ok((flop / t0.elapsed().as_secs_f64() / 1e9, reps))
}

/// GFLOP/s of `x` on a bf16 path (A rounded to bf16 inside each product, as autocast does;
/// B packed once, as a frozen weight is), timed as `time`.
fn time_bf16(x: &Gemm, path: Path, min_s: f64) -> (f64, usize) {
    let vals = |n: usize| (0..n).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0);
    let a: Vec<f32> = vals(x.m * x.k).collect();
    let b: Vec<f32> = vals(x.k * x.n).collect();
    let packed = PackedB::from_rows(&b, x.k, x.n);
    let mut c = vec![0f32; x.m * x.n];
    for _ in 0..2 {
        bf16::gemm(path, &a, x.m, &packed, &mut c);
    }
    let (t0, mut reps) = (Instant::now(), 0usize);
    while reps < 3 || t0.elapsed().as_secs_f64() < min_s {
        bf16::gemm(path, &a, x.m, &packed, &mut c);
        std::hint::black_box(&c);
        reps += 1;
    }
    let flop = 2.0 * (x.m * x.k * x.n) as f64 * reps as f64;
    (flop / t0.elapsed().as_secs_f64() / 1e9, reps)
}

pub fn run(a: &Args) -> Result<()> {
    let cfg = shape_config(&a.shape)?;
    let dev = phi_model::device_from_name(&a.device)?;
    let (h, i, v, t) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        a.batch * a.seq,
    );
    let mut list = vec![
        g("square 1024", 1024, 1024, 1024),
        g("square 2048", 2048, 2048, 2048),
    ];
    // Each distinct projection shape of a layer once.
    for spec in cfg.arch.layer_linears(&cfg) {
        let leaf = spec.name.rsplit('.').next().unwrap_or(spec.name);
        if !list
            .iter()
            .any(|x| x.k == spec.d_in && x.n == spec.d_out && x.m == t)
        {
            list.push(g(&format!("{leaf} fwd"), t, spec.d_in, spec.d_out));
        }
    }
    // Backward of down_proj: dX = dY·Wᵀ (W stored [i, h]), dW = Xᵀ·dY (X stored [t, i]).
    let mut dx = g("down_proj dX", t, h, i);
    dx.rhs_t = true;
    list.push(dx);
    let mut dw = g("down_proj dW", i, t, h);
    dw.lhs_t = true;
    list.push(dw);
    // The head as the model computes it: (W · hᵀ)ᵀ, W [vocab, hidden].
    list.push(g("lm_head fwd (W·hT)", v, h, t));
    let heads = cfg.num_attention_heads;
    let mut qk = g("attention Q·KT", a.seq, cfg.head_dim, a.seq);
    qk.bt = a.batch * heads;
    qk.rhs_t = true;
    list.push(qk);
    let mut pv = g("attention P·V", a.seq, a.seq, cfg.head_dim);
    pv.bt = a.batch * heads;
    list.push(pv);

    let mut best: f64 = 0.0;
    for x in &list {
        let (rate, reps) = time(x, &dev, a.gemm_seconds)?;
        best = best.max(rate);
        let line = json!({
            "gemm": x.what, "batch": x.bt, "m": x.m, "k": x.k, "n": x.n,
            "lhs_transposed": x.lhs_t, "rhs_transposed": x.rhs_t,
            "reps": reps, "gflops_per_s": rate, "device": a.device,
        });
        println!("{line}");
    }
    let summary = json!({
        "gemm": "best", "shape": a.shape, "tokens": t, "gflops_per_s": best,
        "device": a.device, "impl": "burn matmul f32",
    });
    println!("{summary}");
    // Our bf16 kernels (CPU only), on the plain products; the scalar path is the tests'
    // reference, not a contender.
    if a.device != "cpu" {
        return Ok(());
    }
    for path in [Path::Amx, Path::Avx512Bf16] {
        if !path.available() {
            println!(
                "{}",
                json!({"kernel": path.name(), "run": false, "why": "this CPU lacks it"})
            );
            continue;
        }
        let mut best: f64 = 0.0;
        for x in list.iter().filter(|x| x.bt == 1 && !x.lhs_t && !x.rhs_t) {
            let (rate, reps) = time_bf16(x, path, a.gemm_seconds);
            best = best.max(rate);
            let line = json!({
                "gemm": x.what, "m": x.m, "k": x.k, "n": x.n, "reps": reps,
                "gflops_per_s": rate, "kernel": path.name(),
            });
            println!("{line}");
        }
        println!(
            "{}",
            json!({"gemm": "best", "kernel": path.name(), "gflops_per_s": best})
        );
    }
    Ok(())
}
