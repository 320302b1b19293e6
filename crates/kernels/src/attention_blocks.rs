//! Causal attention in row blocks, as flash attention tiles it: one [B, kv] item at a time
//! and, within it, a block of 64 query rows at a time. A block's scores, probabilities and
//! their gradients ([64, keys it sees] each, at most 512 KB at 2048 keys) stay in L2 between
//! its products and its softmax, and each product stops at the block's last visible key
//! (close to half of attention's products at 2048 tokens). The products run on the bf16
//! kernels (`--bf16`) or on f32 `gemm`, which reads k and v in place through strides. P is
//! kept block by block for the backward, or recomputed there from each row's logsumexp
//! (under gradient checkpointing, and always on bf16). dK and dV sum the blocks' parts in
//! block order.

use super::attention::{Masked, HIDDEN};
use super::bf16::{self, PackedB, Path};
use super::kernels::{self, Causal};
use rayon::prelude::*;
use std::borrow::Cow;

/// The items' sizes: `items` = B·kv, each q [rows = g·T, d], k and v [s, d].
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub items: usize,
    pub rows: usize,
    pub s: usize,
    pub d: usize,
}

/// What every item shares; `bf16`: the bf16 kernel path, else f32 products.
#[derive(Clone, Copy)]
pub(crate) struct Setup<'a> {
    pub dims: Dims,
    pub scale: f32,
    pub causal: Causal,
    pub mask: Option<Masked<'a>>,
    pub bf16: Option<Path>,
}

/// What the backward has of the probabilities: each row's logsumexp (P recomputed), or
/// every block's P, item by item in block order.
#[derive(Debug, Clone)]
pub(crate) enum Probs {
    Lse(Vec<f32>),
    Kept(Vec<Vec<f32>>),
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

/// An item's k or v [s, d] as the products read it: in place (f32), or packed for the bf16
/// kernels as Xᵀ (`t`, B [d, s] of A·Xᵀ) and as X (`r`, B [s, d] of A·X), each where used.
struct Side<'a> {
    x: &'a [f32],
    t: Option<PackedB>,
    r: Option<PackedB>,
}

/// What an item's blocks share: its index (for the mask), q, k and v.
struct Item<'a> {
    i: usize,
    q: &'a [f32],
    k: Side<'a>,
    v: Side<'a>,
}

/// f32 threading inside one product: none where blocks or items already fill the threads.
type Par = gemm::Parallelism;

impl Setup<'_> {
    /// An item's row blocks. GQA stacks the group's heads as blocks of t rows, each from
    /// position 0 again.
    fn blocks(&self) -> Vec<Block> {
        let Dims { rows, s, .. } = self.dims;
        let t = self.causal.t;
        assert!(
            rows.is_multiple_of(t),
            "query rows are not whole heads of t"
        );
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

    /// Item i's [s, d] of k or v, packed as `t` / `r` ask where the products are bf16.
    fn side<'a>(&self, x: &'a [f32], i: usize, (t, r): (bool, bool)) -> Side<'a> {
        let Dims { s, d, .. } = self.dims;
        let x = item(x, i, s * d);
        let pack = |want: bool, f: fn(&[f32], usize, usize) -> PackedB, k, n| {
            (want && self.bf16.is_some()).then(|| f(x, k, n))
        };
        Side {
            x,
            t: pack(t, PackedB::from_cols, d, s),
            r: pack(r, PackedB::from_rows, s, d),
        }
    }

    /// Sets the padding or packing mask's hidden entries of a block's [n, vis] scores.
    fn fill(&self, it: &Item, b: Block, x: &mut [f32], value: f32) {
        if let Some(m) = self.mask {
            let first = it.i * self.dims.rows + b.r0;
            let mask = (m.hidden, m.per_batch);
            kernels::fill_masked(x, (b.vis, self.dims.s), self.causal.t, mask, first, value);
        }
    }

    /// A [n, vis] product of the block's rows of `a` ([rows, d]) and Xᵀ's first vis columns.
    fn corner(&self, a: &[f32], b: Block, x: &Side, par: Par) -> Vec<f32> {
        let d = self.dims.d;
        let a = &a[b.r0 * d..][..b.n * d];
        let mut c = Vec::<f32>::with_capacity(b.n * b.vis);
        match self.bf16 {
            Some(path) => {
                let xt = x.t.as_ref().expect("Xᵀ packed for the bf16 products");
                // SAFETY: the product writes all n·vis values.
                unsafe {
                    bf16::gemm_corner(path, (a, d, b.n, d), xt, (b.vis, c.as_mut_ptr(), b.vis))
                };
            }
            None => {
                let xt = (&x.x[..b.vis * d], 1, d as isize);
                f32_gemm(
                    (b.n, b.vis, d),
                    c.spare_capacity_mut(),
                    false,
                    (a, d as isize, 1),
                    xt,
                    par,
                );
            }
        }
        // SAFETY: both products wrote all n·vis values.
        unsafe { c.set_len(b.n * b.vis) };
        c
    }

    /// p [n, vis] (zero past each row's visible keys) times X's first vis rows, into out.
    fn times(&self, p: &[f32], b: Block, x: &Side, out: &mut [f32], par: Par) {
        let d = self.dims.d;
        assert_eq!(out.len(), b.n * d);
        match self.bf16 {
            Some(path) => {
                let xr = x.r.as_ref().expect("X packed for the bf16 products");
                // SAFETY: out holds n rows of d floats, all written by the product.
                unsafe {
                    bf16::gemm_corner(path, (p, b.vis, b.n, b.vis), xr, (d, out.as_mut_ptr(), d))
                };
            }
            None => {
                let xr = (&x.x[..b.vis * d], d as isize, 1);
                let p = (p, b.vis as isize, 1);
                f32_gemm((b.n, d, b.vis), as_uninit(out), false, p, xr, par);
            }
        }
    }

    /// acc[..vis·d] += pᵀ·y for p [n, vis] and y [n, d].
    fn add_t(&self, acc: &mut [f32], p: &[f32], y: &[f32], b: Block, par: Par) {
        let d = self.dims.d;
        let acc = &mut acc[..b.vis * d];
        match self.bf16 {
            Some(path) => {
                let part = bf16::product_t(path, p, b.n, b.vis, &PackedB::from_rows(y, b.n, d));
                acc.iter_mut().zip(&part).for_each(|(a, v)| *a += v);
            }
            None => {
                let pt = (p, 1, b.vis as isize);
                f32_gemm(
                    (b.vis, d, b.n),
                    as_uninit(acc),
                    true,
                    pt,
                    (y, d as isize, 1),
                    par,
                );
            }
        }
    }

    /// The bf16 forward of a block: out = P·V, P written as the product's bf16 rows straight
    /// from the softmax's numerators (no f32 P, no packing pass). Returns the rows' logsumexps.
    fn attend_bf16(&self, path: Path, it: &Item, b: Block, out: &mut [f32]) -> Vec<f32> {
        let d = self.dims.d;
        assert_eq!(out.len(), b.n * d);
        let mut scores = self.corner(it.q, b, &it.k, Par::None);
        self.fill(it, b, &mut scores, HIDDEN);
        let causal = Some(self.causal_of(b));
        let (inv, lse) = kernels::softmax_numerators(&mut scores, b.vis, self.scale, causal);
        self.fill(it, b, &mut scores, 0.0);
        let p = bf16::rows_scaled(&scores, b.vis, &inv);
        let xr = it.v.r.as_ref().expect("V packed for the bf16 products");
        let a = (p.data(), p.stride(), b.n);
        // SAFETY: out holds n rows of d floats, all written by the product.
        unsafe { bf16::gemm_corner_packed(path, a, xr, (d, out.as_mut_ptr(), d)) };
        lse
    }

    /// The block's P [n, vis], masked entries 0, and its rows' logsumexps (none when
    /// recomputed from `lse`).
    fn probs(&self, it: &Item, b: Block, lse: Option<&[f32]>, par: Par) -> (Vec<f32>, Vec<f32>) {
        let mut scores = self.corner(it.q, b, &it.k, par);
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

fn as_uninit(x: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and what is written through it is an f32.
    unsafe { &mut *(x as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// dst [m, n] (row-major, rows n apart) = A·B, plus dst where `acc` (then dst holds values);
/// A [m, k] and B [k, n] given as (values, row stride, column stride).
fn f32_gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [std::mem::MaybeUninit<f32>],
    acc: bool,
    (a, ars, acs): (&[f32], isize, isize),
    (b, brs, bcs): (&[f32], isize, isize),
    par: Par,
) {
    // Every product here has at least one row, column and term (a block sees its first key).
    assert!(m > 0 && n > 0 && k > 0 && dst.len() >= m * n);
    let last = |rows: usize, cols: usize, rs: isize, cs: isize| {
        (rows - 1) * rs as usize + (cols - 1) * cs as usize
    };
    assert!(last(m, k, ars, acs) < a.len() && last(k, n, brs, bcs) < b.len());
    // SAFETY: the asserts above keep every element gemm reads within a and b, and every one
    // it writes within dst; it reads dst only where `acc` says dst holds values.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            acc,
            a.as_ptr(),
            acs,
            ars,
            b.as_ptr(),
            bcs,
            brs,
            if acc { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Split `x` into the blocks' parts of `each(block)` values, in block order.
fn split<'a, T>(
    mut x: &'a mut [T],
    blocks: &[Block],
    each: impl Fn(Block) -> usize,
) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(blocks.len());
    for &b in blocks {
        let (part, rest) = std::mem::take(&mut x).split_at_mut(each(b));
        parts.push(part);
        x = rest;
    }
    parts
}

/// O [items, rows, d] and what the backward needs of P (every block's P where `keep` and the
/// products are f32), for q [items, rows, d] and k, v [items, s, d].
pub(crate) fn forward(q: &[f32], k: &[f32], v: &[f32], st: Setup, keep: bool) -> (Vec<f32>, Probs) {
    let Dims { items, rows, d, .. } = st.dims;
    let keep = keep && st.bf16.is_none();
    let mut o = vec![0f32; items * rows * d];
    let mut lse = vec![0f32; items * rows];
    let blocks = st.blocks();
    let kept: Vec<Vec<Vec<f32>>> = o
        .par_chunks_mut(rows * d)
        .zip(lse.par_chunks_mut(rows))
        .enumerate()
        .map(|(i, (o, lse))| {
            let it = Item {
                i,
                q: item(q, i, rows * d),
                k: st.side(k, i, (true, false)),
                v: st.side(v, i, (false, true)),
            };
            let o = split(o, &blocks, |b| b.n * d);
            let lse = split(lse, &blocks, |b| b.n);
            let parts: Vec<_> = blocks.iter().zip(o).zip(lse).collect();
            parts
                .into_par_iter()
                .map(|((&b, ob), lb)| {
                    if let Some(path) = st.bf16 {
                        let l = st.attend_bf16(path, &it, b, ob);
                        lb.copy_from_slice(&l);
                        return Vec::new();
                    }
                    let (p, l) = st.probs(&it, b, None, Par::None);
                    st.times(&p, b, &it.v, ob, Par::None);
                    lb.copy_from_slice(&l);
                    if keep {
                        p
                    } else {
                        Vec::new()
                    }
                })
                .collect()
        })
        .collect();
    let probs = match keep {
        true => Probs::Kept(kept.into_iter().flatten().collect()),
        false => Probs::Lse(lse),
    };
    (o, probs)
}

/// dq, dk, dv for dO [items, rows, d].
pub(crate) fn backward(
    [q, k, v]: [&[f32]; 3],
    probs: &Probs,
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
    // With fewer items than threads, each f32 product threads inside (the bf16 ones always
    // split their columns across threads).
    let par = match items < rayon::current_num_threads() {
        true => Par::Rayon(0),
        false => Par::None,
    };
    dq.par_chunks_mut(rows * d)
        .zip(dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d)))
        .enumerate()
        .for_each(|(i, (dq, (dk, dv)))| {
            let it = Item {
                i,
                q: item(q, i, rows * d),
                k: st.side(k, i, (true, true)),
                v: st.side(v, i, (true, false)),
            };
            let doi = item(d_o, i, rows * d);
            // dV += Pᵀ·dO, dP = dO·Vᵀ, dS from the softmax, dK += dSᵀ·Q, dQ = dS·K, a block
            // at a time, so dK and dV add in block order.
            for (j, (&b, dqb)) in blocks
                .iter()
                .zip(split(dq, &blocks, |b| b.n * d))
                .enumerate()
            {
                let p = match probs {
                    Probs::Lse(lse) => {
                        Cow::Owned(st.probs(&it, b, Some(item(lse, i, rows)), par).0)
                    }
                    Probs::Kept(ps) => Cow::Borrowed(&ps[i * blocks.len() + j][..]),
                };
                let span = b.r0 * d..(b.r0 + b.n) * d;
                let (dob, qb) = (&doi[span.clone()], &it.q[span]);
                st.add_t(dv, &p, dob, b, par);
                let dp = st.corner(doi, b, &it.v, par);
                let ds = kernels::softmax_backward(&p, &dp, b.vis, st.scale, Some(st.causal_of(b)));
                drop((p, dp));
                st.add_t(dk, &ds, qb, b, par);
                st.times(&ds, b, &it.k, dqb, par);
            }
        });
    [dq, dk, dv]
}
