//! bf16 GEMM with f32 accumulation on the CPU's bf16 matrix units (issue 16): AMX tiles where
//! the CPU has them, else AVX512-BF16's `vdpbf16ps`, else a scalar path that widens to f32
//! (the reference the tests hold the others to). The path is picked at run time.
//!
//! C[m×n] (f32) = A[m×k] · B[k×n], with A given as f32 rows (rounded to bf16 here, as
//! autocast rounds a matmul's inputs) and B packed once per call by [`PackedB`] into the
//! layout both unit kinds read: panels of 16 columns, each holding k/2 rows of 16 (k, k+1)
//! bf16 pairs (Intel's "VNNI" layout). k is padded to a multiple of 32 with zeros.

mod amx;
mod avx512;
mod buf;

pub use buf::Bf16Buf;

use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;

/// A kernel path. Each one computes the same sums of bf16 products in f32; they differ in
/// summation order only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Amx,
    Avx512Bf16,
    Scalar,
}

impl Path {
    /// Every path, best first.
    pub const ALL: [Path; 3] = [Path::Amx, Path::Avx512Bf16, Path::Scalar];

    /// The name benchmarks and reports use (`"amx-bf16"`).
    pub fn name(self) -> &'static str {
        match self {
            Path::Amx => "amx-bf16",
            Path::Avx512Bf16 => "avx512-bf16",
            Path::Scalar => "scalar-bf16",
        }
    }

    /// Whether this CPU (and OS) runs the path.
    pub fn available(self) -> bool {
        match self {
            Path::Amx => amx::available(),
            Path::Avx512Bf16 => avx512::available(),
            Path::Scalar => true,
        }
    }

    /// The fastest path this machine runs, or the one `PHI_BF16_PATH` names (`avx512-bf16`
    /// on an AMX machine measures a CPU without AMX) where this machine runs it.
    pub fn best() -> Path {
        let wanted = std::env::var("PHI_BF16_PATH").ok();
        let named = Path::ALL
            .into_iter()
            .find(|p| wanted.as_deref() == Some(p.name()) && p.available());
        let fastest = Path::ALL.into_iter().find(|p| p.available());
        named.or(fastest).unwrap_or(Path::Scalar)
    }
}

/// Round to nearest even, as torch's f32 → bf16 cast (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Columns per panel, and k values per tile step.
pub const PANEL: usize = 16;
pub const KSTEP: usize = 32;

pub(crate) fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// (k_pad, panels, values a panel) of B [k×n]'s packing.
fn layout(k: usize, n: usize) -> (usize, usize, usize) {
    let k_pad = round_up(k.max(1), KSTEP);
    let panels = round_up(n.max(1), 2 * PANEL) / PANEL;
    (k_pad, panels, k_pad * PANEL)
}

/// B [k×n] in panels of 16 columns, k/2 rows of (k, k+1) pairs each, zero-padded to an even
/// number of whole panels (the kernels take two at a time) and a multiple of 32 in k.
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    pub k_pad: usize,
    pub panels: usize,
    pub data: Bf16Buf,
}

impl PackedB {
    /// `b(kk, j)` gives B's element at row kk, column j (so any layout or transpose packs).
    pub fn pack(k: usize, n: usize, b: impl Fn(usize, usize) -> f32 + Sync) -> PackedB {
        let (k_pad, panels, per_panel) = layout(k, n);
        let mut data = Bf16Buf::zeroed(panels * per_panel);
        data.par_chunks_mut(per_panel)
            .enumerate()
            .for_each(|(p, out)| {
                for r in 0..k / 2 + k % 2 {
                    for c in 0..PANEL {
                        let j = p * PANEL + c;
                        if j >= n {
                            break;
                        }
                        let at = r * 2 * PANEL + 2 * c;
                        out[at] = to_bf16(b(2 * r, j));
                        if 2 * r + 1 < k {
                            out[at + 1] = to_bf16(b(2 * r + 1, j));
                        }
                    }
                }
            });
        PackedB {
            k,
            n,
            k_pad,
            panels,
            data,
        }
    }

    /// B given row-major [k×n]. Each panel's pair row is two 16-float runs of B's rows,
    /// rounded as rows and interleaved (`pack` takes an element at a time: 1.6 ns a value for a
    /// 1024 × 2816 operand, which packing per call cannot afford).
    pub fn from_rows(b: &[f32], k: usize, n: usize) -> PackedB {
        assert_eq!(b.len(), k * n, "B is not k×n");
        let (k_pad, panels, per_panel) = layout(k, n);
        let fill = |data: &mut [MaybeUninit<u16>]| {
            data.par_chunks_mut(per_panel)
                .enumerate()
                .for_each(|(p, out)| {
                    let (j0, cols) = (p * PANEL, n.saturating_sub(p * PANEL).min(PANEL));
                    let mut pair = [[MaybeUninit::new(0u16); PANEL]; 2];
                    for (r, o) in out.chunks_exact_mut(2 * PANEL).enumerate() {
                        for (t, row) in pair.iter_mut().enumerate() {
                            let kk = 2 * r + t;
                            if kk < k && cols > 0 {
                                round_into(&b[kk * n + j0..kk * n + j0 + cols], &mut row[..cols]);
                            }
                            let from = if kk < k { cols } else { 0 };
                            row[from..].fill(MaybeUninit::new(0));
                        }
                        for c in 0..PANEL {
                            o[2 * c] = pair[0][c];
                            o[2 * c + 1] = pair[1][c];
                        }
                    }
                })
        };
        // SAFETY: `fill` writes every panel's k_pad / 2 pair rows of 32 values.
        let data = unsafe { Bf16Buf::filled_by(panels * per_panel, fill) };
        PackedB {
            k,
            n,
            k_pad,
            panels,
            data,
        }
    }

    /// B given as Bᵀ row-major [n×k] (B's columns contiguous: a weight stored [out, in], a
    /// LoRA factor read transposed). A pair row's (k, k+1) values sit side by side in a
    /// column, so each column is rounded whole and its 32-bit pairs dealt to the panel's rows.
    pub fn from_cols(bt: &[f32], k: usize, n: usize) -> PackedB {
        assert_eq!(bt.len(), k * n, "Bᵀ is not n×k");
        let (k_pad, panels, per_panel) = layout(k, n);
        let mut data = Bf16Buf::zeroed(panels * per_panel);
        data.par_chunks_mut(per_panel)
            .enumerate()
            .for_each(|(p, out)| {
                let mut col = vec![MaybeUninit::new(0u16); k_pad];
                for c in 0..PANEL.min(n.saturating_sub(p * PANEL)) {
                    let j = p * PANEL + c;
                    round_into(&bt[j * k..(j + 1) * k], &mut col[..k]);
                    for (r, pair) in col[..k].chunks(2).enumerate() {
                        // SAFETY: the first k values were written by `round_into` above.
                        let at = r * 2 * PANEL + 2 * c;
                        out[at] = unsafe { pair[0].assume_init() };
                        if let Some(v) = pair.get(1) {
                            out[at + 1] = unsafe { v.assume_init() };
                        }
                    }
                }
            });
        PackedB {
            k,
            n,
            k_pad,
            panels,
            data,
        }
    }

    pub(crate) fn panel(&self, p: usize) -> &[u16] {
        let len = self.k_pad * PANEL;
        &self.data[p * len..(p + 1) * len]
    }

    /// All panels, as the kernels read them.
    pub(crate) fn view(&self) -> Panels<'_> {
        Panels {
            data: &self.data,
            k_pad: self.k_pad,
            panels: self.panels,
        }
    }

    /// `count` panels from panel p, as panels 0.. .
    pub(crate) fn panel_range(&self, p: usize, count: usize) -> Panels<'_> {
        let len = self.k_pad * PANEL;
        Panels {
            data: &self.data[p * len..(p + count) * len],
            k_pad: self.k_pad,
            panels: count,
        }
    }
}

/// Packed panels as the kernels read them: all of a [`PackedB`], or a pair of its panels, or a
/// pair decoded just now from a quantized weight (`quant`).
#[derive(Clone, Copy)]
pub(crate) struct Panels<'a> {
    pub data: &'a [u16],
    pub k_pad: usize,
    pub panels: usize,
}

impl<'a> Panels<'a> {
    pub(crate) fn panel(&self, p: usize) -> &'a [u16] {
        let len = self.k_pad * PANEL;
        &self.data[p * len..(p + 1) * len]
    }
}

impl std::fmt::Debug for PackedA {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedA({}×{})", self.m, self.k)
    }
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({}×{})", self.k, self.n)
    }
}

impl PackedB {
    /// B's element at row r, column j (as packed: bf16 bits).
    pub fn get(&self, r: usize, j: usize) -> u16 {
        self.panel(j / PANEL)[(r / 2) * 2 * PANEL + 2 * (j % PANEL) + r % 2]
    }

    /// The packing of Bᵀ [n×k] from this one of B [k×n], already in bf16: 16×16 blocks move
    /// whole (a block's 8 pair rows of one panel become 8 pair rows of another panel).
    pub fn transposed(&self) -> PackedB {
        let (k, n) = (self.n, self.k);
        let (k_pad, panels, per_panel) = layout(k, n);
        // Output panel q holds B's rows 16q..16q+16: pair rows 8q..8q+8 of every input
        // panel p, which become Bᵀ's pair rows 8p..8p+8 of panel q. In 32-bit words (one
        // bf16 pair each), input word (row rl, column c) holds B(16q+2rl+t, 16p+c) for
        // t = 0, 1; output word (row c2, column 2rl+t) holds the halves t of input words
        // (rl, 2c2) and (rl, 2c2+1). A task takes 8 output panels, so it reads 4 KiB in a
        // row from each input panel.
        const GROUP: usize = 8;
        let blocks = self.panels;
        assert_eq!(
            blocks * PANEL,
            k_pad,
            "input panels are the output's pair rows / 8"
        );
        let fill = |data: &mut [MaybeUninit<u16>]| {
            data.par_chunks_mut(GROUP * per_panel)
                .enumerate()
                .for_each(|(g, out)| {
                    for p in 0..blocks {
                        let src = self.panel(p);
                        for (qq, dst) in out.chunks_mut(per_panel).enumerate() {
                            let q = g * GROUP + qq;
                            let src = &src[8 * q * 2 * PANEL..(8 * q + 8) * 2 * PANEL];
                            transpose_block(
                                src,
                                &mut dst[p * 8 * 2 * PANEL..(p + 1) * 8 * 2 * PANEL],
                            );
                        }
                    }
                })
        };
        // Every element is written (whole 16×16 blocks cover both paddings: each output panel
        // is `blocks` runs of 8 pair rows, blocks · 16 = k_pad), so the buffer starts unfilled.
        // SAFETY: as just said, `fill` sets all panels · per_panel values.
        let data = unsafe { Bf16Buf::filled_by(panels * per_panel, fill) };
        PackedB {
            k,
            n,
            k_pad,
            panels,
            data,
        }
    }
}

/// One 16×16 block of [`PackedB::transposed`]: 8 pair rows of 16 words in, 8 out.
#[inline(always)]
fn transpose_block(src: &[u16], dst: &mut [MaybeUninit<u16>]) {
    let word =
        |rl: usize, c: usize| src[rl * 32 + 2 * c] as u32 | (src[rl * 32 + 2 * c + 1] as u32) << 16;
    for c2 in 0..8 {
        for rl in 0..8 {
            let (a, b) = (word(rl, 2 * c2), word(rl, 2 * c2 + 1));
            let at = c2 * 32 + 4 * rl;
            dst[at].write(a as u16);
            dst[at + 1].write(b as u16);
            dst[at + 2].write((a >> 16) as u16);
            dst[at + 3].write((b >> 16) as u16);
        }
    }
}

/// `to_bf16` without a branch, so that loops of it vectorise.
#[inline(always)]
pub(crate) fn round_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if nan {
        ((b >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

/// `to_bf16` over a row (times k where there is one: the scaling rides the same pass).
#[inline(always)]
fn round_row(src: &[f32], k: Option<f32>, dst: &mut [MaybeUninit<u16>]) {
    match k {
        None => dst.iter_mut().zip(src).for_each(|(o, &x)| {
            o.write(round_bits(x));
        }),
        Some(k) => dst.iter_mut().zip(src).for_each(|(o, &x)| {
            o.write(round_bits(x * k));
        }),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn round_row_avx512(src: &[f32], k: Option<f32>, dst: &mut [MaybeUninit<u16>]) {
    round_row(src, k, dst)
}

/// `round_row` with the CPU's widest vectors.
fn round_scaled(src: &[f32], k: Option<f32>, dst: &mut [MaybeUninit<u16>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU has AVX512F and AVX512BW (checked).
        unsafe { round_row_avx512(src, k, dst) };
        return;
    }
    round_row(src, k, dst)
}

fn round_into(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
    round_scaled(src, None, dst)
}

/// Row i of x [m×s] times k[i], rounded to bf16: A's rows as the kernels read them, scaled as
/// they are written (attention's P from its numerators).
pub(crate) fn rows_scaled(x: &[f32], s: usize, k: &[f32]) -> PackedA {
    assert_eq!(x.len(), k.len() * s, "x is not rows of s");
    let fill = |i: usize, o: &mut [MaybeUninit<u16>]| round_scaled(&x[i * s..][..s], Some(k[i]), o);
    // SAFETY: `round_scaled` writes a value for each of the row's s inputs.
    unsafe { PackedA::rows_with(k.len(), s, fill) }
}

/// m rows of k values that `fill(i, row)` writes, each zero-padded to `k_pad`, in parallel.
///
/// # Safety
/// `fill` writes every one of its row's k values.
unsafe fn padded_rows(
    (m, k, k_pad): (usize, usize, usize),
    fill: impl Fn(usize, &mut [MaybeUninit<u16>]) + Sync,
) -> Bf16Buf {
    let rows = |out: &mut [MaybeUninit<u16>]| {
        out.par_chunks_mut(k_pad).enumerate().for_each(|(i, o)| {
            let (o, pad) = o.split_at_mut(k);
            fill(i, o);
            pad.fill(MaybeUninit::new(0));
        })
    };
    // SAFETY: each of the m rows is written whole: k values by `fill` (the caller's), then
    // the padding.
    unsafe { Bf16Buf::filled_by(m * k_pad, rows) }
}

/// Rows of A rounded to bf16 and zero-padded to `k_pad` columns.
/// Every value rounded to bf16 (as `to_bf16`), in parallel.
pub fn round_all(a: &[f32]) -> Bf16Buf {
    const CHUNK: usize = 1 << 14;
    let fill = |out: &mut [MaybeUninit<u16>]| {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .for_each(|(o, r)| round_into(r, o))
    };
    // SAFETY: the chunks of `out` and `a` pair up whole, so every value is written.
    unsafe { Bf16Buf::filled_by(a.len(), fill) }
}

/// bf16 values as f32 (exact).
pub fn widen_all(v: &[u16]) -> Vec<f32> {
    v.par_iter().map(|&x| from_bf16(x)).collect()
}

fn pack_a(a: &[f32], m: usize, k: usize, k_pad: usize) -> Bf16Buf {
    pack_a_ld(a, k, m, k, k_pad)
}

/// `pack_a` for rows `lda` floats apart, of which the first k are taken.
fn pack_a_ld(a: &[f32], lda: usize, m: usize, k: usize, k_pad: usize) -> Bf16Buf {
    let fill = |i: usize, o: &mut [MaybeUninit<u16>]| round_into(&a[i * lda..i * lda + k], o);
    // SAFETY: `round_into` writes a value for each of the row's k inputs.
    unsafe { padded_rows((m, k, k_pad), fill) }
}

/// Aᵀ's rows (A row-major [k×m]) rounded to bf16 and zero-padded to `k_pad` columns. A task
/// takes 16 rows of Aᵀ; 16×16 tiles of A are rounded a row (16 contiguous floats) at a time
/// and written transposed as 16 contiguous values a row of Aᵀ.
fn pack_a_t(a: &[f32], k: usize, m: usize, k_pad: usize) -> Bf16Buf {
    // SAFETY: `pack_a_t_into` writes each of the m rows: its k values (tile by tile), then
    // its padding.
    unsafe { Bf16Buf::filled_by(m * k_pad, |out| pack_a_t_into(a, k, m, k_pad, out)) }
}

fn pack_a_t_into(a: &[f32], k: usize, m: usize, k_pad: usize, out: &mut [MaybeUninit<u16>]) {
    const T: usize = 16;
    out.par_chunks_mut(T * k_pad)
        .enumerate()
        .for_each(|(blk, o)| {
            let (i0, rows) = (blk * T, o.len() / k_pad);
            let mut tile = [[MaybeUninit::new(0u16); T]; T];
            for r0 in (0..k).step_by(T) {
                let n = (k - r0).min(T);
                for (r, t) in tile.iter_mut().enumerate().take(n) {
                    round_into(&a[(r0 + r) * m + i0..][..rows], &mut t[..rows]);
                }
                for i in 0..rows {
                    let dst = &mut o[i * k_pad + r0..i * k_pad + r0 + n];
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = tile[r][i];
                    }
                }
            }
            for i in 0..rows {
                o[i * k_pad + k..(i + 1) * k_pad].fill(MaybeUninit::new(0));
            }
        });
}

/// Rows per task. The AMX kernel runs 32 at a time under one pair of B panels, so a task of
/// 256 rows uses each pair (k·64 bytes, in L2) 8 times before the next.
const ROWS: usize = 256;

/// One task of [`gemm`]: C rows [0, rows) at `c` (row stride `ld`) = A's rows (bf16, `kp`
/// columns) · B, plus `extra`'s product where there is one, in the columns of `panels`
/// (whole pairs of panels) below `n` (C's columns from panel 0's first on).
pub(crate) struct Block<'a> {
    pub a: &'a [u16],
    pub rows: usize,
    pub kp: usize,
    pub b: Panels<'a>,
    pub extra: Option<Term<'a>>,
    pub panels: Range<usize>,
    pub c: *mut f32,
    pub n: usize,
    pub ld: usize,
}

/// A second product summed into a block's: the same rows of another A (`kp` columns) times
/// another B of the same width (a LoRA path's rank-r term, `s·(x·A)·B`).
pub(crate) struct Term<'a> {
    pub a: &'a [u16],
    pub kp: usize,
    pub b: Panels<'a>,
}

impl<'a> Block<'a> {
    /// Each product's (A rows, kp, B).
    fn terms(&self) -> Vec<(&'a [u16], usize, Panels<'a>)> {
        let extra = self.extra.as_ref().map(|e| (e.a, e.kp, e.b));
        std::iter::once((self.a, self.kp, self.b))
            .chain(extra)
            .collect()
    }
}

/// C, shared by tasks that write disjoint (row range, panel range) blocks of it.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub *mut f32);
// SAFETY: tasks write disjoint elements only (see `gemm`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Element `i`'s address (a method, so closures capture the Send wrapper, not the pointer).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// C = A·B for row-major A [m×k] (f32, rounded to bf16) and packed B; C row-major [m×n].
/// Tasks are blocks of up to 256 rows times a range of panel pairs, split in columns too when
/// m alone would leave threads idle (m = 256 tokens is one row block).
pub fn gemm(path: Path, a: &[f32], m: usize, b: &PackedB, c: &mut [f32]) {
    assert_eq!(c.len(), m * b.n, "C is not m×n");
    // SAFETY: c holds m·n floats.
    unsafe { gemm_into(path, a, m, b, c.as_mut_ptr()) }
}

/// `gemm` into a new [m×n] buffer. Every path stores each element of C (none accumulates
/// into it), so the buffer starts unfilled: no pass to zero it first.
pub fn product(path: Path, a: &[f32], m: usize, b: &PackedB) -> Vec<f32> {
    let mut c = Vec::with_capacity(m * b.n);
    // SAFETY: the capacity is m·n floats, all of which `gemm_into` writes.
    unsafe {
        gemm_into(path, a, m, b, c.as_mut_ptr());
        c.set_len(m * b.n);
    }
    c
}

/// Aᵀ·B for row-major A [k×m] (Aᵀ is m×k): a weight's gradient xᵀ·dy, the transpose taken
/// while rounding A to bf16 rather than as an f32 copy first.
pub fn product_t(path: Path, a: &[f32], k: usize, m: usize, b: &PackedB) -> Vec<f32> {
    assert_eq!(a.len(), k * m, "A is not k×m");
    assert_eq!(b.k, k, "B's rows are not A's");
    let ap = pack_a_t(a, k, m, b.k_pad);
    let mut c = Vec::with_capacity(m * b.n);
    // SAFETY: the capacity is m·n floats, all of which `run` writes.
    unsafe {
        run(path, (&ap, b), None, m, c.as_mut_ptr());
        c.set_len(m * b.n);
    }
    c
}

/// # Safety
/// `c` points at m·n writable floats.
unsafe fn gemm_into(path: Path, a: &[f32], m: usize, b: &PackedB, c: *mut f32) {
    assert_eq!(a.len(), m * b.k, "A is not m×k");
    if m == 0 || b.n == 0 {
        return;
    }
    run(path, (&pack_a(a, m, b.k, b.k_pad), b), None, m, c)
}

/// The corner of a product that a causal mask leaves: C's rows [0, m) (`ld` floats apart),
/// columns [0, n) = A's rows (`lda` floats apart) over their first k values times B's first
/// k rows and n columns. Attention's products skip this way what the mask zeroes (columns past
/// a row block's last visible key, or P's zero columns as the k of P·V); the sums kept are the
/// same sums, term by term, as the whole product's.
///
/// # Safety
/// `c` points at m rows of `ld` floats whose first n columns are the caller's alone.
pub(crate) unsafe fn gemm_corner(
    path: Path,
    (a, lda, m, k): (&[f32], usize, usize, usize),
    b: &PackedB,
    (n, c, ld): (usize, *mut f32, usize),
) {
    assert!(k <= b.k && n <= b.n && a.len() >= (m.max(1) - 1) * lda + k);
    let kp = round_up(k.max(1), KSTEP);
    let ap = pack_a_ld(a, lda, m, k, kp);
    // SAFETY: the caller's.
    unsafe { gemm_corner_packed(path, (&ap, kp, m), b, (n, c, ld)) }
}

/// `gemm_corner` for A already in bf16 rows of kp values (a multiple of 32, zero past k).
///
/// # Safety
/// As `gemm_corner`'s.
pub(crate) unsafe fn gemm_corner_packed(
    path: Path,
    (ap, kp, m): (&[u16], usize, usize),
    b: &PackedB,
    (n, c, ld): (usize, *mut f32, usize),
) {
    assert!(kp.is_multiple_of(KSTEP) && kp <= b.k_pad && n <= b.n && ap.len() >= m * kp);
    let panels = b.panel_range(0, round_up(n.max(1), 2 * PANEL) / PANEL);
    // SAFETY: the caller's; the panels and kp are within B's.
    unsafe { run_panels_k(path, (ap, kp, panels), None, (m, n, ld), c) }
}

/// Rows of A rounded to bf16 and zero-padded to a multiple of 32 columns: one operand for
/// several products (a LoRA linear's x·W and x·A).
pub struct PackedA {
    pub m: usize,
    pub k: usize,
    data: Bf16Buf,
}

impl PackedA {
    /// A given row-major [m×k].
    pub fn rows(a: &[f32], m: usize, k: usize) -> PackedA {
        assert_eq!(a.len(), m * k, "A is not m×k");
        let k_pad = round_up(k.max(1), KSTEP);
        PackedA {
            m,
            k,
            data: pack_a(a, m, k, k_pad),
        }
    }

    /// [m×k] whose row i `fill(i, row)` writes (k values, rounded as it likes) in parallel:
    /// A made where it is computed, without an f32 copy first.
    ///
    /// # Safety
    /// `fill` writes every one of its row's k values.
    pub(crate) unsafe fn rows_with(
        m: usize,
        k: usize,
        fill: impl Fn(usize, &mut [MaybeUninit<u16>]) + Sync,
    ) -> PackedA {
        let k_pad = round_up(k.max(1), KSTEP);
        // SAFETY: the caller's.
        let data = unsafe { padded_rows((m, k, k_pad), fill) };
        PackedA { m, k, data }
    }

    /// The rows, each padded to a multiple of 32 values.
    pub(crate) fn data(&self) -> &[u16] {
        &self.data
    }

    /// Values from one row to the next (k padded to a multiple of 32).
    pub fn stride(&self) -> usize {
        round_up(self.k.max(1), KSTEP)
    }
}

/// A·B, plus A2·B2 for `extra` = (A2, B2) (A2 with A's rows, B2 as wide as B) summed into
/// the same tiles before they are stored: a LoRA linear's x·W + (s·x·A)·B in one pass over C.
pub fn product_packed(
    path: Path,
    a: &PackedA,
    b: &PackedB,
    extra: Option<(&PackedA, &PackedB)>,
) -> Vec<f32> {
    let m = a.m;
    assert_eq!(a.k, b.k, "A's columns are not B's rows");
    if let Some((a2, b2)) = extra {
        assert!(
            a2.m == m && a2.k == b2.k && b2.n == b.n,
            "the extra product's shape"
        );
    }
    let mut c = Vec::with_capacity(m * b.n);
    if m == 0 {
        return c;
    }
    let extra = extra.map(|(a2, b2)| (&a2.data[..], b2));
    // SAFETY: the capacity is m·n floats, all of which `run` writes.
    unsafe {
        run(path, (&a.data, b), extra, m, c.as_mut_ptr());
        c.set_len(m * b.n);
    }
    c
}

/// C = A·B (+ A2·B2) for A (and A2) already in bf16 rows padded as their B's k.
///
/// # Safety
/// `c` points at m·n writable floats.
unsafe fn run(
    path: Path,
    (ap, b): (&[u16], &PackedB),
    extra: Option<(&[u16], &PackedB)>,
    m: usize,
    c: *mut f32,
) {
    let extra = extra.map(|(a2, b2)| (a2, b2.view()));
    // SAFETY: the caller's.
    unsafe { run_panels(path, (ap, b.view()), extra, (m, b.n, b.n), c) }
}

/// `run` over panels given as views: C's columns [0, n) from `c` (rows `ld` floats apart)
/// are A · B's panels (and A2 · B2's, their k as theirs).
///
/// # Safety
/// `c` points at m rows of `ld` floats whose first n columns are the caller's alone.
pub(crate) unsafe fn run_panels(
    path: Path,
    (ap, b): (&[u16], Panels),
    extra: Option<(&[u16], Panels)>,
    dims: (usize, usize, usize),
    c: *mut f32,
) {
    // SAFETY: the caller's.
    unsafe { run_panels_k(path, (ap, b.k_pad, b), extra, dims, c) }
}

/// `run_panels` over B's first `kp` rows only (A's rows `kp` values apart, kp a multiple of
/// 32 up to B's k_pad): every kernel walks a term's k from its A and steps between panels by
/// B's k_pad.
///
/// # Safety
/// As `run_panels`'.
unsafe fn run_panels_k(
    path: Path,
    (ap, kp, b): (&[u16], usize, Panels),
    extra: Option<(&[u16], Panels)>,
    (m, n, ld): (usize, usize, usize),
    c: *mut f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(kp.is_multiple_of(KSTEP) && kp <= b.k_pad && ap.len() >= m * kp);
    let path = if path.available() { path } else { Path::Scalar };
    let row_blocks = m.div_ceil(ROWS);
    let pairs = b.panels / 2;
    let want = 2 * rayon::current_num_threads();
    let col_blocks = want.div_ceil(row_blocks).clamp(1, pairs.max(1));
    // Pairs dealt as evenly as they go (sizes differ by one at most): rounding each block up
    // to a whole share left the LM head's input gradient (18 pairs, 4 blocks) at 5, 5, 5, 3,
    // one thread waiting a tenth of the product for the other.
    let bounds = |cb: usize| 2 * (cb * pairs / col_blocks);
    let out = Out(c);
    (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let r0 = rb * ROWS;
        let rows = (m - r0).min(ROWS);
        let panels = bounds(cb)..bounds(cb + 1);
        let ab = &ap[r0 * kp..(r0 + rows) * kp];
        // SAFETY: C has m rows of ld floats; this task writes rows r0..r0+rows of the columns
        // under `panels` only, and no two tasks share both a row block and a panel.
        unsafe {
            let extra = extra.map(|(a2, b2)| Term {
                a: &a2[r0 * b2.k_pad..(r0 + rows) * b2.k_pad],
                kp: b2.k_pad,
                b: b2,
            });
            let task = Block {
                a: ab,
                rows,
                kp,
                b,
                extra,
                panels,
                c: out.at(r0 * ld),
                n,
                ld,
            };
            run_block(path, task)
        }
    });
}

/// One block on `path` (which this CPU runs).
///
/// # Safety
/// As [`amx::block`]'s: the block's rows and columns of C are the caller's alone.
pub(crate) unsafe fn run_block(path: Path, task: Block) {
    match path {
        Path::Amx => amx::block(task),
        Path::Avx512Bf16 => avx512::block(task),
        Path::Scalar => scalar_block(task),
    }
}

/// The reference: every product widened to f32 and summed in k order.
///
/// # Safety
/// `c` points at `rows` rows `ld` floats apart, whose columns under `panels` (below `n`) no
/// one else touches meanwhile.
unsafe fn scalar_block(t: Block) {
    let (rows, c, n, ld) = (t.rows, t.c, t.n, t.ld);
    let terms = t.terms();
    for p in t.panels.clone() {
        for i in 0..rows {
            for cc in 0..PANEL {
                let j = p * PANEL + cc;
                if j >= n {
                    break;
                }
                let mut s = 0.0f32;
                for &(a, kp, b) in &terms {
                    let (ar, panel) = (&a[i * kp..(i + 1) * kp], b.panel(p));
                    for r in 0..kp / 2 {
                        let bp = &panel[r * 2 * PANEL + 2 * cc..];
                        s += from_bf16(ar[2 * r]) * from_bf16(bp[0]);
                        s += from_bf16(ar[2 * r + 1]) * from_bf16(bp[1]);
                    }
                }
                *c.add(i * ld + j) = s;
            }
        }
    }
}
