//! Causal attention on the bf16 kernels (`--bf16`), one [B, kv] item at a time: an item's
//! scores, probabilities and their gradients ([g·T, S] each, 256 KB at T = 256) stay in L2
//! between its products and its softmax, where the f32 path runs each step over the whole
//! [B, kv, g·T, S] tensor (a dozen passes of 17 MB a layer on phi3-small). P is not kept:
//! the backward recomputes it from each row's logsumexp, as flash attention does.

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

impl Setup<'_> {
    /// P of item i from its q and k, masked entries 0 (recomputed from `lse` when given).
    fn probs(&self, i: usize, q: &[f32], k: &[f32], lse: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
        let Dims { rows, s, d, .. } = self.dims;
        let mut scores = bf16::product(self.path, q, rows, &PackedB::from_cols(k, d, s));
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
            o.copy_from_slice(&bf16::product(
                st.path,
                &p,
                rows,
                &PackedB::from_rows(vi, s, d),
            ));
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
    let path = st.path;
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
            dv.copy_from_slice(&bf16::product_t(
                path,
                &p,
                rows,
                s,
                &PackedB::from_rows(doi, rows, d),
            ));
            let dp = bf16::product(path, doi, rows, &PackedB::from_cols(vi, d, s));
            let ds = kernels::softmax_backward(&p, &dp, s, st.scale, Some(st.causal));
            drop((p, dp));
            dk.copy_from_slice(&bf16::product_t(
                path,
                &ds,
                rows,
                s,
                &PackedB::from_rows(qi, rows, d),
            ));
            dq.copy_from_slice(&bf16::product(
                path,
                &ds,
                rows,
                &PackedB::from_rows(ki, s, d),
            ));
        });
    [dq, dk, dv]
}
