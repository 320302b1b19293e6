//! Causal attention on the bf16 kernels (`--bf16`), one [B, kv] item at a time: an item's
//! scores, probabilities and their gradients ([g·T, S] each, 256 KB at T = 256) stay in L2
//! between its products and its softmax, where the f32 path runs each step over the whole
//! [B, kv, g·T, S] tensor (a dozen passes of 17 MB a layer on phi3-small). P is not kept:
//! the backward recomputes it from each row's logsumexp, as flash attention does.
//! Each product runs in causal blocks of 64 query rows (or keys), skipping what the mask
//! zeroes: at 2048 tokens that is close to half of attention's products (docs/benchmarks.md).

use super::attention::{Masked, HIDDEN};
use super::bf16::{self, PackedB, Path};
use super::kernels::{self, Causal};
use rayon::prelude::*;

/// The items' sizes: `items` = B·kv, each q [rows = g·T, d], k and v [s, d]; `kv` items a
/// batch row.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub items: usize,
    pub kv: usize,
    pub rows: usize,
    pub s: usize,
    pub d: usize,
}

/// What every item shares.
#[derive(Clone, Copy)]
pub(crate) struct Setup<'a> {
    pub dims: Dims,
    pub scale: f32,
    pub causal: Causal,
    pub mask: Option<Masked<'a>>,
    pub path: Path,
}

/// Query rows a causal block: its products stop at the block's last visible key.
const BLOCK: usize = 64;

impl Setup<'_> {
    /// An item's row blocks under the causal mask: (first row, rows, keys its last row sees).
    /// GQA stacks the group's heads as blocks of t rows, each from position 0 again.
    fn blocks(&self) -> Vec<(usize, usize, usize)> {
        let Dims { rows, s, .. } = self.dims;
        let t = self.causal.t;
        let mut out = Vec::with_capacity(rows.div_ceil(BLOCK));
        for g0 in (0..rows).step_by(t) {
            for r0 in (g0..g0 + t).step_by(BLOCK) {
                let n = BLOCK.min(g0 + t - r0);
                out.push((r0, n, self.causal.visible(r0 + n - 1, s)));
            }
        }
        out
    }

    /// A·B [rows, s] for a [rows, k] and B [k, s] (QKᵀ, dO·Vᵀ), where only the keys each row
    /// sees are read afterwards: a block's columns past its last row's are 0, not computed.
    fn scores(&self, a: &[f32], b: &PackedB) -> Vec<f32> {
        let Dims { rows, s, .. } = self.dims;
        let k = b.k;
        let mut c = Vec::<f32>::with_capacity(rows * s);
        let out = bf16::Out(c.as_mut_ptr());
        self.blocks().into_par_iter().for_each(|(r0, n, vis)| {
            // SAFETY: blocks are disjoint rows of c; each row's first vis columns are written
            // by the product, the rest here.
            unsafe {
                let a = (&a[r0 * k..], k, n, k);
                bf16::gemm_corner(self.path, a, b, (vis, out.at(r0 * s), s));
                for r in r0..r0 + n {
                    std::ptr::write_bytes(out.at(r * s + vis), 0, s - vis);
                }
            }
        });
        // SAFETY: every element was written above.
        unsafe { c.set_len(rows * s) };
        c
    }

    /// P·B [rows, n] for P [rows, s], zero past each row's visible keys, and B [s, n] (P·V,
    /// dS·K): a block's k stops at its last row's visible keys.
    fn weighted(&self, p: &[f32], b: &PackedB) -> Vec<f32> {
        let Dims { rows, s, .. } = self.dims;
        let n = b.n;
        let mut c = Vec::<f32>::with_capacity(rows * n);
        let out = bf16::Out(c.as_mut_ptr());
        self.blocks().into_par_iter().for_each(|(r0, m, vis)| {
            // SAFETY: blocks are disjoint rows of c, each written whole by the product.
            unsafe {
                bf16::gemm_corner(
                    self.path,
                    (&p[r0 * s..], s, m, vis),
                    b,
                    (n, out.at(r0 * n), n),
                )
            }
        });
        // SAFETY: every element was written above.
        unsafe { c.set_len(rows * n) };
        c
    }

    /// Aᵀ·B [s, n] for A [rows, s] zero past each row's visible keys and B [rows, n]
    /// (Pᵀ·dO, dSᵀ·Q): a block of keys sums over the query rows that see it only. B is packed
    /// once with its rows from the last position down (a position's GQA heads together), so
    /// the rows that see a block are a prefix of it, the k a block's product takes.
    fn key_side(&self, a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
        let Dims { rows, s, .. } = self.dims;
        let t = self.causal.t;
        let heads = rows / t;
        let row = move |kk: usize| (kk % heads) * t + t - 1 - kk / heads;
        let packed = PackedB::from_row_fn(rows, n, |kk| &b[row(kk) * n..]);
        let mut c = Vec::<f32>::with_capacity(s * n);
        let out = bf16::Out(c.as_mut_ptr());
        let blocks: Vec<usize> = (0..s).step_by(BLOCK).collect();
        blocks.into_par_iter().for_each(|j0| {
            let cols = BLOCK.min(s - j0);
            let k = heads * (t - j0.saturating_sub(self.causal.offset).min(t));
            let at = out.at(j0 * n);
            // SAFETY: blocks are disjoint rows of c, each written whole (zeros where no row
            // sees the block).
            unsafe {
                if k == 0 {
                    std::ptr::write_bytes(at, 0, cols * n);
                } else {
                    let a_row = |kk| &a[row(kk) * s + j0..];
                    bf16::product_t_prefix(self.path, (a_row, cols), k, &packed, (at, n));
                }
            }
        });
        // SAFETY: every element was written above.
        unsafe { c.set_len(s * n) };
        c
    }

    /// P of item i from its q and k, masked entries 0 (recomputed from `lse` when given).
    fn probs(&self, i: usize, q: &[f32], k: &[f32], lse: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
        let Dims { rows, s, d, .. } = self.dims;
        let mut scores = self.scores(q, &PackedB::from_cols(k, d, s));
        let hidden = self.mask.map(|m| {
            let b = i / self.dims.kv;
            &m.hidden[b * self.causal.t * s..(b + 1) * self.causal.t * s]
        });
        // One batch row per item: its mask rows are the item's rows mod t.
        let fill = |x: &mut [f32], value| {
            if let Some(h) = hidden {
                kernels::fill_masked(x, s, self.causal.t, usize::MAX, h, value);
            }
        };
        let (mut p, lse) = match lse {
            Some(lse) => {
                kernels::softmax_recompute(&mut scores, s, self.scale, Some(self.causal), lse);
                (scores, Vec::new())
            }
            None => {
                fill(&mut scores, HIDDEN);
                let mut p = vec![0f32; rows * s];
                let lse =
                    kernels::softmax_forward_lse(&scores, s, self.scale, Some(self.causal), &mut p);
                (p, lse)
            }
        };
        fill(&mut p, 0.0);
        (p, lse)
    }
}

/// Item i of a tensor of items `len` values each.
fn item(x: &[f32], i: usize, len: usize) -> &[f32] {
    &x[i * len..][..len]
}

/// O [items, rows, d] and each row's logsumexp, for q [items, rows, d], k, v [items, s, d].
pub(crate) fn forward(q: &[f32], k: &[f32], v: &[f32], st: Setup) -> (Vec<f32>, Vec<f32>) {
    let Dims {
        items, rows, s, d, ..
    } = st.dims;
    let mut o = vec![0f32; items * rows * d];
    let mut lse = vec![0f32; items * rows];
    o.par_chunks_mut(rows * d)
        .zip(lse.par_chunks_mut(rows))
        .enumerate()
        .for_each(|(i, (o, lse))| {
            let (qi, ki, vi) = (item(q, i, rows * d), item(k, i, s * d), item(v, i, s * d));
            let (p, l) = st.probs(i, qi, ki, None);
            o.copy_from_slice(&st.weighted(&p, &PackedB::from_rows(vi, s, d)));
            lse.copy_from_slice(&l);
        });
    (o, lse)
}

/// dq, dk, dv for dO [items, rows, d].
pub(crate) fn backward(
    [q, k, v]: [&[f32]; 3],
    lse: &[f32],
    d_o: &[f32],
    st: Setup,
) -> [Vec<f32>; 3] {
    let Dims {
        items, rows, s, d, ..
    } = st.dims;
    let mut dq = vec![0f32; items * rows * d];
    let mut dk = vec![0f32; items * s * d];
    let mut dv = vec![0f32; items * s * d];
    dq.par_chunks_mut(rows * d)
        .zip(dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d)))
        .enumerate()
        .for_each(|(i, (dq, (dk, dv)))| {
            let (qi, ki, vi) = (item(q, i, rows * d), item(k, i, s * d), item(v, i, s * d));
            let doi = item(d_o, i, rows * d);
            let (p, _) = st.probs(i, qi, ki, Some(item(lse, i, rows)));
            // dV = Pᵀ·dO, dP = dO·Vᵀ, dS from the softmax, dK = dSᵀ·Q, dQ = dS·K.
            dv.copy_from_slice(&st.key_side(&p, doi, d));
            let dp = st.scores(doi, &PackedB::from_cols(vi, d, s));
            let ds = kernels::softmax_backward(&p, &dp, s, st.scale, Some(st.causal));
            drop((p, dp));
            dk.copy_from_slice(&st.key_side(&ds, qi, d));
            dq.copy_from_slice(&st.weighted(&ds, &PackedB::from_rows(ki, s, d)));
        });
    [dq, dk, dv]
}
