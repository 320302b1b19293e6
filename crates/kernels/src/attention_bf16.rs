//! Causal attention on the bf16 kernels (`--bf16`), one [B, kv] item at a time and, within
//! it, a block of 64 query rows at a time, as flash attention tiles it: a block's scores,
//! probabilities and their gradients ([64, keys it sees] each, at most 512 KB at 2048 keys)
//! stay in L2 between its products and its softmax, and each product stops at the block's
//! last visible key (close to half of attention's products at 2048 tokens). The f32 path runs
//! each step over the whole [B, kv, g·T, S] tensor instead. P is not kept: the backward
//! recomputes it from each row's logsumexp. dK and dV sum the blocks' contributions in block
//! order.

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

/// Query rows a block.
const BLOCK: usize = 64;

/// A block of an item's query rows: `n` rows from `r0`, all in one GQA head (rows mod t are
/// positions), whose last row sees keys [0, vis).
#[derive(Clone, Copy)]
struct Block {
    r0: usize,
    n: usize,
    vis: usize,
}

/// What an item's blocks share: its index (for the mask), q, and Kᵀ packed once.
struct Item<'a> {
    i: usize,
    q: &'a [f32],
    /// Kᵀ as B [d, s], for Q·Kᵀ.
    kt: PackedB,
}

impl Setup<'_> {
    /// An item's row blocks. GQA stacks the group's heads as blocks of t rows, each from
    /// position 0 again.
    fn blocks(&self) -> Vec<Block> {
        let Dims { rows, s, .. } = self.dims;
        let t = self.causal.t;
        let mut out = Vec::with_capacity(rows.div_ceil(BLOCK));
        for g0 in (0..rows).step_by(t) {
            for r0 in (g0..g0 + t).step_by(BLOCK) {
                let n = BLOCK.min(g0 + t - r0);
                let vis = self.causal.visible(r0 + n - 1, s);
                out.push(Block { r0, n, vis });
            }
        }
        out
    }

    /// The block's rows as their own causal mask: row j is position r0 mod t + j.
    fn causal_of(&self, b: Block) -> Causal {
        Causal {
            t: self.causal.t,
            offset: self.causal.offset + b.r0 % self.causal.t,
        }
    }

    /// Sets the padding or packing mask's hidden entries of a block's [n, vis] scores.
    fn fill(&self, it: &Item, b: Block, x: &mut [f32], value: f32) {
        let Some(m) = self.mask else { return };
        let (t, s) = (self.causal.t, self.dims.s);
        let batch = it.i / self.dims.kv;
        for (j, x) in x.chunks_mut(b.vis).enumerate() {
            let row = &m.hidden[(batch * t + (b.r0 + j) % t) * s..][..b.vis];
            for (v, &hidden) in x.iter_mut().zip(row) {
                if hidden {
                    *v = value;
                }
            }
        }
    }

    /// A [n, vis] product of the block's rows of `a` ([rows, k]) and B's first vis columns.
    fn corner(&self, a: &[f32], b: Block, bp: &PackedB) -> Vec<f32> {
        let k = bp.k;
        let mut c = Vec::<f32>::with_capacity(b.n * b.vis);
        // SAFETY: the product writes all n·vis values.
        unsafe {
            let rows = (&a[b.r0 * k..], k, b.n, k);
            bf16::gemm_corner(self.path, rows, bp, (b.vis, c.as_mut_ptr(), b.vis));
            c.set_len(b.n * b.vis);
        }
        c
    }

    /// x [n, vis] (zero past each row's visible keys) times B's first vis rows, into out.
    fn times(&self, x: &[f32], b: Block, bp: &PackedB, out: &mut [f32]) {
        assert_eq!(out.len(), b.n * bp.n);
        // SAFETY: out holds n rows of bp.n floats, all written by the product.
        unsafe {
            let rows = (x, b.vis, b.n, b.vis);
            bf16::gemm_corner(self.path, rows, bp, (bp.n, out.as_mut_ptr(), bp.n));
        }
    }

    /// The block's P [n, vis], masked entries 0, and its rows' logsumexps (recomputed from
    /// `lse` when given).
    fn probs(&self, it: &Item, b: Block, lse: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
        let mut scores = self.corner(it.q, b, &it.kt);
        let causal = Some(self.causal_of(b));
        let (mut p, lse) = match lse {
            Some(lse) => {
                let lse = &lse[b.r0..b.r0 + b.n];
                kernels::softmax_recompute(&mut scores, b.vis, self.scale, causal, lse);
                (scores, Vec::new())
            }
            None => {
                self.fill(it, b, &mut scores, HIDDEN);
                let mut p = vec![0f32; b.n * b.vis];
                let lse = kernels::softmax_forward_lse(&scores, b.vis, self.scale, causal, &mut p);
                (p, lse)
            }
        };
        self.fill(it, b, &mut p, 0.0);
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
    let blocks = st.blocks();
    o.par_chunks_mut(rows * d)
        .zip(lse.par_chunks_mut(rows))
        .enumerate()
        .for_each(|(i, (o, lse))| {
            let it = Item {
                i,
                q: item(q, i, rows * d),
                kt: PackedB::from_cols(item(k, i, s * d), d, s),
            };
            let vp = PackedB::from_rows(item(v, i, s * d), s, d);
            // Blocks write disjoint rows of o and lse: split them off in block order.
            let mut parts = Vec::with_capacity(blocks.len());
            let (mut o, mut lse) = (&mut o[..], &mut lse[..]);
            for b in &blocks {
                let (ob, rest) = std::mem::take(&mut o).split_at_mut(b.n * d);
                let (lb, lrest) = std::mem::take(&mut lse).split_at_mut(b.n);
                parts.push((*b, ob, lb));
                (o, lse) = (rest, lrest);
            }
            parts.into_par_iter().for_each(|(b, ob, lb)| {
                let (p, l) = st.probs(&it, b, None);
                st.times(&p, b, &vp, ob);
                lb.copy_from_slice(&l);
            });
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
    let blocks = st.blocks();
    dq.par_chunks_mut(rows * d)
        .zip(dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d)))
        .enumerate()
        .for_each(|(i, (dq, (dk, dv)))| {
            let (ki, vi) = (item(k, i, s * d), item(v, i, s * d));
            let it = Item {
                i,
                q: item(q, i, rows * d),
                kt: PackedB::from_cols(ki, d, s),
            };
            let (vt, kp) = (PackedB::from_cols(vi, d, s), PackedB::from_rows(ki, s, d));
            let (doi, lse) = (item(d_o, i, rows * d), item(lse, i, rows));
            // dV += Pᵀ·dO, dP = dO·Vᵀ, dS from the softmax, dK += dSᵀ·Q, dQ = dS·K, a block
            // at a time (each product parallel inside), so dK and dV add in block order.
            for &b in &blocks {
                let (p, _) = st.probs(&it, b, Some(lse));
                let span = b.r0 * d..(b.r0 + b.n) * d;
                let (dob, qb) = (&doi[span.clone()], &it.q[span.clone()]);
                let add = |acc: &mut [f32], x: &[f32], y: &[f32]| {
                    let part =
                        bf16::product_t(st.path, x, b.n, b.vis, &PackedB::from_rows(y, b.n, d));
                    acc[..b.vis * d]
                        .iter_mut()
                        .zip(&part)
                        .for_each(|(a, v)| *a += v);
                };
                add(dv, &p, dob);
                let dp = st.corner(doi, b, &vt);
                let ds = kernels::softmax_backward(&p, &dp, b.vis, st.scale, Some(st.causal_of(b)));
                drop((p, dp));
                add(dk, &ds, qb);
                st.times(&ds, b, &kp, &mut dq[span]);
            }
        });
    [dq, dk, dv]
}
