//! f32 slice kernels behind the fused ops. Each has a plain body that LLVM vectorises; the
//! `simd!` wrapper compiles it again for AVX-512 / AVX2+FMA and picks one at run time, since
//! the workspace builds for baseline x86-64 (SSE2) so the binary runs anywhere.
//!
//! The exponential is a branch-free polynomial (Cephes' expf: range reduction by ln 2, degree-6
//! polynomial, exponent bits built by integer adds) because `f32::exp` is a libm call per
//! element and was most of the cost of sigmoid, softmax and cross-entropy. Clamps are written
//! as compare-selects so a NaN input stays NaN (the trainer stops on non-finite losses).

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements per parallel task: big enough that rayon's overhead is noise.
const CHUNK: usize = 1 << 14;

macro_rules! simd {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                match *LEVEL {
                    // SAFETY: the level was detected on this CPU.
                    2 => return unsafe { v512($($arg),*) },
                    1 => return unsafe { v256($($arg),*) },
                    _ => {}
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd;

#[cfg(target_arch = "x86_64")]
pub(crate) static LEVEL: std::sync::LazyLock<u8> = std::sync::LazyLock::new(|| {
    use std::arch::is_x86_feature_detected as has;
    if has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma") {
        2
    } else if has!("avx2") && has!("fma") {
        1
    } else {
        0
    }
});

const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer in the low bits
const LO: f32 = -87.33;
const HI: f32 = 88.37;

/// e^x to about 1 ulp on [-87.33, 88.37], saturating outside; NaN in, NaN out.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = if x < LO { LO } else { x };
    let x = if x > HI { HI } else { x };
    let k = x * std::f32::consts::LOG2_E + MAGIC;
    let n = k - MAGIC;
    // ln 2 split in two so n·ln2 is exact enough (Cephes' C1, C2).
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // The low bits of k hold n (+ a multiple of 2⁹ that the shift drops): 2ⁿ's bits.
    e * f32::from_bits(k.to_bits().wrapping_add(127) << 23)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

simd! {
    fn swiglu_fwd_block(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    }
}

simd! {
    fn swiglu_bwd_block(g: &[f32], u: &[f32], grad: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(grad) {
            let s = sigmoid(g);
            *du = d * g * s;
            *dg = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// Where silu(gate) and up sit: two tensors of `n` elements, or one [rows, 2·width] tensor
/// with gate in the first half of each row (Phi-3's `gate_up_proj` output).
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    Pair,
    Packed { width: usize },
}

/// silu(gate)·up. `gu` holds gate then up (Pair: concatenated views; Packed: the rows).
pub fn swiglu_forward(gate: &[f32], up: &[f32], layout: Layout, out: &mut [f32]) {
    match layout {
        Layout::Pair => out
            .par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| swiglu_fwd_block(g, u, o)),
        Layout::Packed { width } => {
            let rows = (CHUNK / width).max(1);
            out.par_chunks_mut(rows * width)
                .zip(gate.par_chunks(rows * 2 * width))
                .for_each(|(o, gu)| {
                    for (o, gu) in o.chunks_mut(width).zip(gu.chunks(2 * width)) {
                        swiglu_fwd_block(&gu[..width], &gu[width..], o);
                    }
                })
        }
    }
}

/// Gradients of silu(gate)·up: (d gate, d up) for Pair; one packed d(gate_up) for Packed
/// (returned as the first buffer, the second empty).
pub fn swiglu_backward(
    gate: &[f32],
    up: &[f32],
    grad: &[f32],
    layout: Layout,
) -> (Vec<f32>, Vec<f32>) {
    match layout {
        Layout::Pair => {
            let mut dg = zeroed(gate.len());
            let mut du = zeroed(up.len());
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
                .zip(grad.par_chunks(CHUNK))
                .for_each(|(((dg, du), (g, u)), d)| swiglu_bwd_block(g, u, d, dg, du));
            (dg, du)
        }
        Layout::Packed { width } => {
            let mut dgu = zeroed(gate.len());
            let rows = (CHUNK / width).max(1);
            dgu.par_chunks_mut(rows * 2 * width)
                .zip(gate.par_chunks(rows * 2 * width))
                .zip(grad.par_chunks(rows * width))
                .for_each(|((dgu, gu), d)| {
                    for ((dgu, gu), d) in dgu
                        .chunks_mut(2 * width)
                        .zip(gu.chunks(2 * width))
                        .zip(d.chunks(width))
                    {
                        let (dg, du) = dgu.split_at_mut(width);
                        swiglu_bwd_block(&gu[..width], &gu[width..], d, dg, du);
                    }
                });
            (dgu, Vec::new())
        }
    }
}

/// Causal structure of a [rows, s] score matrix: row r is query position (r mod t) of a block
/// of t queries (GQA stacks the query heads of one kv head as blocks), at absolute position
/// offset + (r mod t); it sees keys 0..=that position.
#[derive(Clone, Copy, Debug)]
pub struct Causal {
    pub t: usize,
    pub offset: usize,
}

impl Causal {
    pub(crate) fn visible(&self, row: usize, s: usize) -> usize {
        (self.offset + row % self.t + 1).min(s)
    }
}

simd! {
    fn max_of(x: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut it = x.chunks_exact(16);
        for c in it.by_ref() {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = if v > *l { v } else { *l };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in lanes.iter().chain(it.remainder()) {
            m = if v > m { v } else { m };
        }
        m
    }
}

simd! {
    /// out = e^(scale·(x − max)) and the sum of out.
    fn exp_shifted(x: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f32 {
        let mut lanes = [0.0f32; 16];
        let mut oc = out.chunks_exact_mut(16);
        let mut xc = x.chunks_exact(16);
        for (o, c) in oc.by_ref().zip(xc.by_ref()) {
            for ((o, &v), l) in o.iter_mut().zip(c).zip(lanes.iter_mut()) {
                *o = exp((v - max) * scale);
                *l += *o;
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for (o, &v) in oc.into_remainder().iter_mut().zip(xc.remainder()) {
            *o = exp((v - max) * scale);
            sum += *o;
        }
        sum
    }
}

simd! {
    /// x = e^(scale·(x − max)) in place, and the sum.
    fn exp_shifted_in_place(x: &mut [f32], max: f32, scale: f32) -> f32 {
        let mut lanes = [0.0f32; 16];
        let mut xc = x.chunks_exact_mut(16);
        for c in xc.by_ref() {
            for (v, l) in c.iter_mut().zip(lanes.iter_mut()) {
                *v = exp((*v - max) * scale);
                *l += *v;
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for v in xc.into_remainder() {
            *v = exp((*v - max) * scale);
            sum += *v;
        }
        sum
    }
}

/// The softmax's numerators in place over [rows, s] scores: a row's visible values become
/// e^(scale·(x − max)), its masked ones 0. Returns each row's 1 / Σ and logsumexp, so the
/// caller scales as it writes the probabilities where they go (attention's bf16 rows).
pub(crate) fn softmax_numerators(
    x: &mut [f32],
    s: usize,
    scale: f32,
    causal: Option<Causal>,
) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / s.max(1);
    let (mut inv, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
    let per = rows_per_task(s);
    x.par_chunks_mut(per * s)
        .zip(inv.par_chunks_mut(per).zip(lse.par_chunks_mut(per)))
        .enumerate()
        .for_each(|(task, (x, (inv, lse)))| {
            let rows = x.chunks_mut(s).zip(inv.iter_mut().zip(lse));
            for (i, (x, (inv, lse))) in rows.enumerate() {
                let n = causal.map_or(s, |c| c.visible(task * per + i, s));
                let m = max_of(&x[..n]);
                let sum = exp_shifted_in_place(&mut x[..n], m, scale);
                x[n..].fill(0.0);
                *inv = 1.0 / sum;
                *lse = m * scale + sum.ln();
            }
        });
    (inv, lse)
}

simd! {
    fn scale_in_place(x: &mut [f32], k: f32) {
        for v in x {
            *v *= k;
        }
    }
}

simd! {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0.0f32; 16];
        let mut ac = a.chunks_exact(16);
        let mut bc = b.chunks_exact(16);
        for (x, y) in ac.by_ref().zip(bc.by_ref()) {
            for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
                *l += x * y;
            }
        }
        let mut s: f32 = lanes.iter().sum();
        for (&x, &y) in ac.remainder().iter().zip(bc.remainder()) {
            s += x * y;
        }
        s
    }
}

simd! {
    /// dx = k·p·(g − c)
    fn softmax_grad_row(p: &[f32], g: &[f32], c: f32, k: f32, dx: &mut [MaybeUninit<f32>]) {
        for ((d, &p), &g) in dx.iter_mut().zip(p).zip(g) {
            d.write(k * p * (g - c));
        }
    }
}

/// x ·= k in place.
pub fn scale_all(x: &mut [f32], k: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| scale_in_place(c, k));
}

/// n zeros, written in parallel. `vec![0.0; n]` gets freed heap memory back and zeroes it on
/// the calling thread: in a backward pass that is the main thread, with the other cores idle
/// meanwhile (a tenth of a phi3-small `--bf16` step's serial time in `perf`).
pub fn zeroed(n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(4 * CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: all n elements were written above.
    unsafe { v.set_len(n) };
    v
}

fn rows_per_task(s: usize) -> usize {
    (CHUNK / s.max(1)).max(1)
}

/// Row softmax of scale·x over [rows, s], masked entries (causal) set to 0.
pub fn softmax_forward(x: &[f32], s: usize, scale: f32, causal: Option<Causal>, out: &mut [f32]) {
    softmax_forward_lse(x, s, scale, causal, out);
}

/// As `softmax_forward`, returning each row's log Σ e^(scale·x) for a later recompute.
pub fn softmax_forward_lse(
    x: &[f32],
    s: usize,
    scale: f32,
    causal: Option<Causal>,
    out: &mut [f32],
) -> Vec<f32> {
    let per = rows_per_task(s);
    let mut lse = vec![0.0; x.len() / s.max(1)];
    out.par_chunks_mut(per * s)
        .zip(x.par_chunks(per * s))
        .zip(lse.par_chunks_mut(per))
        .enumerate()
        .for_each(|(task, ((o, x), lse))| {
            for (i, ((o, x), lse)) in o.chunks_mut(s).zip(x.chunks(s)).zip(lse).enumerate() {
                let n = causal.map_or(s, |c| c.visible(task * per + i, s));
                let m = max_of(&x[..n]);
                let sum = exp_shifted(&x[..n], m, scale, &mut o[..n]);
                scale_in_place(&mut o[..n], 1.0 / sum);
                o[n..].fill(0.0);
                *lse = m * scale + sum.ln();
            }
        });
    lse
}

/// Sets the entries of `width`-wide score rows that `masked` ([B, t, s], true = hidden; a
/// row's first `width` keys) hides to `value`. x's first row is score row `first`, which is
/// batch first / per_batch's query first mod t (GQA stacks query heads as blocks of t rows).
/// Attention with a padding or packing mask runs its softmax between two of these: a large
/// negative score before (finite, so a row with nothing visible stays finite), then 0 after
/// (exact zeros, and such a row all zero, as Burn's attention gives).
pub fn fill_masked(
    x: &mut [f32],
    (width, s): (usize, usize),
    t: usize,
    (masked, per_batch): (&[bool], usize),
    first: usize,
    value: f32,
) {
    for (i, x) in x.chunks_mut(width).enumerate() {
        let r = first + i;
        let m = &masked[((r / per_batch) * t + r % t) * s..][..width];
        for (v, &hidden) in x.iter_mut().zip(m) {
            if hidden {
                *v = value;
            }
        }
    }
}

simd! {
    /// out = e^(x − lse) rounded to bf16 (`exp_minus` at scale 1 and the rounding in one pass).
    pub(crate) fn exp_minus_rounded(x: &[f32], lse: f32, out: &mut [MaybeUninit<u16>]) {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(crate::bf16::round_bits(exp(v - lse)));
        }
    }
}

simd! {
    pub(crate) fn exp_minus(x: &mut [f32], scale: f32, lse: f32) {
        for v in x {
            *v = exp(*v * scale - lse);
        }
    }
}

/// Scores → probabilities in place from the forward's logsumexp (attention's recompute).
pub fn softmax_recompute(x: &mut [f32], s: usize, scale: f32, causal: Option<Causal>, lse: &[f32]) {
    let per = rows_per_task(s);
    x.par_chunks_mut(per * s)
        .zip(lse.par_chunks(per))
        .enumerate()
        .for_each(|(task, (x, lse))| {
            for (i, (x, &l)) in x.chunks_mut(s).zip(lse).enumerate() {
                let n = causal.map_or(s, |c| c.visible(task * per + i, s));
                exp_minus(&mut x[..n], scale, l);
                x[n..].fill(0.0);
            }
        });
}

/// dx = scale·p·(g − Σ g·p) per row; masked entries 0 (written, not zeroed first: a pass
/// over [rows, s] less).
pub fn softmax_backward(
    p: &[f32],
    g: &[f32],
    s: usize,
    scale: f32,
    causal: Option<Causal>,
) -> Vec<f32> {
    let mut dx = Vec::with_capacity(p.len());
    let per = rows_per_task(s);
    dx.spare_capacity_mut()[..p.len()]
        .par_chunks_mut(per * s)
        .zip(p.par_chunks(per * s).zip(g.par_chunks(per * s)))
        .enumerate()
        .for_each(|(task, (dx, (p, g)))| {
            for (i, ((dx, p), g)) in dx
                .chunks_mut(s)
                .zip(p.chunks(s))
                .zip(g.chunks(s))
                .enumerate()
            {
                let n = causal.map_or(s, |c| c.visible(task * per + i, s));
                let c = dot(&p[..n], &g[..n]);
                softmax_grad_row(&p[..n], &g[..n], c, scale, &mut dx[..n]);
                dx[n..].fill(MaybeUninit::new(0.0));
            }
        });
    // SAFETY: every row's n visible values and its masked tail were written above.
    unsafe { dx.set_len(p.len()) };
    dx
}

simd! {
    fn sum_exp(x: &[f32], max: f32) -> f32 {
        let mut lanes = [0.0f32; 16];
        let mut xc = x.chunks_exact(16);
        for c in xc.by_ref() {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += exp(v - max);
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for &v in xc.remainder() {
            sum += exp(v - max);
        }
        sum
    }
}

simd! {
    /// dx = k·e^(x − lse), written into a fresh (unfilled) row.
    fn ce_grad_row(x: &[f32], lse: f32, k: f32, dx: &mut [MaybeUninit<f32>]) {
        for (d, &v) in dx.iter_mut().zip(x) {
            d.write(k * exp(v - lse));
        }
    }
}

/// Per-row cross-entropy over [rows, v] logits: (loss_r = lse_r − x[r, target_r], lse_r);
/// a negative target is an ignored row (loss 0).
pub fn cross_entropy_forward(x: &[f32], v: usize, targets: &[i64]) -> (Vec<f32>, Vec<f32>) {
    let (loss, lse): (Vec<f32>, Vec<f32>) = x
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if t < 0 {
                return (0.0, 0.0);
            }
            let m = max_of(row);
            let lse = m + sum_exp(row, m).ln();
            (lse - row[t as usize], lse)
        })
        .unzip();
    (loss, lse)
}

/// d loss_sum / d x = g·(softmax(x) − onehot(target)) on counted rows, 0 on ignored ones.
pub fn cross_entropy_backward(
    x: &[f32],
    v: usize,
    targets: &[i64],
    lse: &[f32],
    g: f32,
) -> Vec<f32> {
    // Every row is written whole below (the logits' gradient is a step's largest tensor:
    // zeroing it first was a pass of its own).
    let mut dx: Vec<f32> = Vec::with_capacity(x.len());
    dx.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .zip(targets.par_iter().zip(lse.par_iter()))
        .for_each(|((dx, row), (&t, &lse))| {
            if t >= 0 {
                ce_grad_row(row, lse, g, dx);
                let at = &mut dx[t as usize];
                // SAFETY: ce_grad_row wrote the whole row just above.
                *at = MaybeUninit::new(unsafe { at.assume_init() } - g);
            } else {
                dx.fill(MaybeUninit::new(0.0));
            }
        });
    // SAFETY: each of the rows (x.len() / v of them, v values each) was written above.
    unsafe { dx.set_len(x.len()) };
    dx
}

simd! {
    fn low_rank_rows(y: &mut [f32], g: &[f32], m: &[f32], r: usize, cols: usize) {
        for (y, g) in y.chunks_mut(cols).zip(g.chunks(r)) {
            for (k, &gk) in g.iter().enumerate() {
                for (y, &mk) in y.iter_mut().zip(&m[k * cols..(k + 1) * cols]) {
                    *y += gk * mk;
                }
            }
        }
    }
}

/// y[n, :] += Σₖ g[n, k]·m[k, :] for y [N, cols], g [N, r], m [r, cols]: the rank-r update
/// of a LoRA path, which as a GEMM has inner size r and runs far below the GEMM rate.
pub fn add_low_rank(y: &mut [f32], g: &[f32], m: &[f32], r: usize, cols: usize) {
    let rows = rows_per_task(cols);
    y.par_chunks_mut(rows * cols)
        .zip(g.par_chunks(rows * r))
        .for_each(|(y, g)| low_rank_rows(y, g, m, r, cols));
}

/// One `torch.optim.AdamW` update (decoupled decay, bias correction) in the order torch's
/// for-each implementation applies it, in place on p, m and v. The scalars are torch's Python
/// floats: computed in f64 (`AdamW::new`) and rounded to f32 once, as torch passes them to its
/// f32 kernels. `1 - β2` formed in f32 from a rounded β2 is 1.3e-5 off and made every update
/// 6.4e-6 too large (found by tests/fixtures/optim).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    /// 1 - lr·weight_decay.
    pub keep: f32,
    /// lr / (1 - β1^t).
    pub step: f32,
    /// 1 - β1.
    pub c1: f32,
    pub beta2: f32,
    /// 1 - β2.
    pub c2: f32,
    pub eps: f32,
    /// sqrt(1 - β2^t).
    pub bc2_sqrt: f32,
    /// Gradient clipping's coefficient, applied to g first (torch scales the gradients in
    /// place before the step; 1 leaves them as they are).
    pub g_scale: f32,
}

impl AdamW {
    /// The update's scalars for step `t` (1-based).
    pub fn new(lr: f64, weight_decay: f64, beta1: f64, beta2: f64, eps: f64, t: i32) -> AdamW {
        AdamW {
            keep: (1.0 - lr * weight_decay) as f32,
            step: (lr / (1.0 - beta1.powi(t))) as f32,
            c1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            c2: (1.0 - beta2) as f32,
            eps: eps as f32,
            bc2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
            g_scale: 1.0,
        }
    }
}

simd! {
    /// The update of a block; whether every updated p is finite.
    fn adamw_block(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: AdamW) -> bool {
        let mut bad = 0u32;
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * h.g_scale;
            *p *= h.keep;
            *m += (g - *m) * h.c1;
            *v = *v * h.beta2 + g * g * h.c2;
            let denom = v.sqrt() / h.bc2_sqrt + h.eps;
            *p -= *m / denom * h.step;
            bad |= u32::from(p.to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
        bad == 0
    }
}

/// One update in place; whether every updated parameter is finite (checked in the same pass:
/// a separate check read the parameters again, serially, 12 % of a full fine-tuning step).
pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: AdamW) -> bool {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .map(|(((p, m), v), g)| adamw_block(p, m, v, g, h))
        .reduce(|| true, |a, b| a && b)
}

simd! {
    pub fn sum_squares(x: &[f32]) -> f64 {
        let mut acc = 0.0f64;
        for c in x.chunks(1 << 12) {
            acc += dot(c, c) as f64;
        }
        acc
    }
}

/// No NaN and no infinity in `x` (squares would overflow for finite values above 1.8e19, so
/// a sum of squares cannot tell).
pub fn all_finite(x: &[f32]) -> bool {
    x.par_chunks(CHUNK).all(finite_block)
}

simd! {
    /// Branch-free, so it vectorises (an early exit per element does not).
    fn finite_block(x: &[f32]) -> bool {
        let mut bad = 0u32;
        for v in x {
            bad |= u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
        bad == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-1000.0), (LO as f64).exp() as f32);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_respect_the_causal_mask() {
        let (t, s) = (3, 5); // two blocks of 3 queries, offset 2
        let x: Vec<f32> = (0..2 * t * s)
            .map(|i| (i as f32 * 0.37).sin() * 4.0)
            .collect();
        let mut p = vec![9.0; x.len()];
        let c = Causal { t, offset: 2 };
        softmax_forward(&x, s, 0.5, Some(c), &mut p);
        for r in 0..2 * t {
            let n = 2 + r % t + 1;
            let row = &p[r * s..(r + 1) * s];
            let want: Vec<f64> = {
                let xs = &x[r * s..r * s + n];
                let m = xs.iter().cloned().fold(f32::MIN, f32::max) as f64;
                let e: Vec<f64> = xs.iter().map(|&v| ((v as f64 - m) * 0.5).exp()).collect();
                let z: f64 = e.iter().sum();
                e.iter().map(|e| e / z).collect()
            };
            for j in 0..s {
                let w = if j < n { want[j] } else { 0.0 };
                assert!(
                    (row[j] as f64 - w).abs() < 1e-6,
                    "row {r} col {j}: {} vs {w}",
                    row[j]
                );
            }
        }
    }
}
