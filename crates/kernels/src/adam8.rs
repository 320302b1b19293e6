//! bitsandbytes' 8-bit AdamW (HF's `adamw_8bit` / `paged_adamw_8bit`: the same update) as its
//! CPU kernel computes it (tests/fixtures/quant/BNB_NOTES.md §6, checked against bitsandbytes
//! 0.50.2): both moments kept as 8-bit codes in blocks of 256 with an f32 absmax each (the
//! first on the signed dynamic map, the second on the unsigned one), dequantized, updated and
//! quantized again every step. Parameters under 4096 values keep f32 moments with
//! bitsandbytes' own 32-bit update (its ε sits elsewhere than torch's).

use crate::quant::bnb::{dynamic_map, Quantizer8};
use rayon::prelude::*;
use std::sync::LazyLock;

/// Values per quantization block of the moments.
pub const BLOCK: usize = 256;
/// Parameters with fewer values keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT: usize = 4096;

/// The moments' maps (signed, unsigned) and their quantizers.
static MAPS: LazyLock<([f32; 256], [f32; 256])> =
    LazyLock::new(|| (dynamic_map(true), dynamic_map(false)));
static QUANT: LazyLock<(Quantizer8, Quantizer8)> =
    LazyLock::new(|| (Quantizer8::new(&MAPS.0), Quantizer8::new(&MAPS.1)));

/// One parameter's moments.
#[derive(Debug, Clone, PartialEq)]
pub enum Moments {
    /// Codes and per-block absmax of m (signed map) and v (unsigned map).
    Q8 {
        m: Vec<u8>,
        v: Vec<u8>,
        absmax_m: Vec<f32>,
        absmax_v: Vec<f32>,
    },
    /// f32 moments (parameters under `MIN_8BIT` values).
    F32 { m: Vec<f32>, v: Vec<f32> },
}

impl Moments {
    /// Zero moments for `n` values.
    pub fn zeros(n: usize) -> Moments {
        Moments::zeros_with(n, MIN_8BIT)
    }

    /// Zero moments for `n` values, f32 under `min_8bit` values.
    pub fn zeros_with(n: usize, min_8bit: usize) -> Moments {
        if n < min_8bit {
            return Moments::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            };
        }
        let blocks = n.div_ceil(BLOCK);
        Moments::Q8 {
            m: vec![0; n],
            v: vec![0; n],
            absmax_m: vec![0.0; blocks],
            absmax_v: vec![0.0; blocks],
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Moments::Q8 { m, absmax_m, .. } => 2 * m.len() + 8 * absmax_m.len(),
            Moments::F32 { m, .. } => 8 * m.len(),
        }
    }
}

/// The step's scalars.
#[derive(Debug, Clone, Copy)]
pub struct Adam8 {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The step number, from 1.
    pub t: i32,
}

/// One update of `p` by gradient `g`; returns whether every updated value is finite.
pub fn step(p: &mut [f32], g: &[f32], moments: &mut Moments, h: Adam8) -> bool {
    assert_eq!(p.len(), g.len(), "p and g differ in length");
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let (c1, c2) = ((1.0 - h.beta1) as f32, (1.0 - h.beta2) as f32);
    let bc1 = 1.0 - h.beta1.powi(h.t);
    let bc2_sqrt = (1.0 - h.beta2.powi(h.t)).sqrt();
    let keep = (1.0 - h.lr * h.weight_decay) as f32;
    let moment = |g: f32, m: f32, v: f32| (g.mul_add(c1, m * b1), (c2 * g).mul_add(g, v * b2));
    match moments {
        Moments::F32 { m, v } => {
            let eps = (h.eps * bc2_sqrt) as f32;
            let step = (-h.lr * bc2_sqrt / bc1) as f32;
            let mut finite = true;
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                (*m, *v) = moment(g, *m, *v);
                *p *= keep;
                *p = (*m / (v.sqrt() + eps)).mul_add(step, *p);
                finite &= p.is_finite();
            }
            finite
        }
        Moments::Q8 {
            m,
            v,
            absmax_m,
            absmax_v,
        } => {
            let ((map1, map2), (q1, q2)) = (&*MAPS, &*QUANT);
            let (bc2, eps) = (bc2_sqrt as f32, h.eps as f32);
            let step = (-h.lr / bc1) as f32;
            let blocks = p
                .par_chunks_mut(BLOCK)
                .zip(g.par_chunks(BLOCK))
                .zip(m.par_chunks_mut(BLOCK).zip(v.par_chunks_mut(BLOCK)))
                .zip(absmax_m.par_iter_mut().zip(absmax_v.par_iter_mut()));
            blocks
                .map(|(((p, g), (qm, qv)), (am, av))| {
                    let mut mm = [0f32; BLOCK];
                    let mut vv = [0f32; BLOCK];
                    let mut finite = true;
                    for i in 0..p.len() {
                        let m0 = map1[qm[i] as usize] * *am;
                        let v0 = map2[qv[i] as usize] * *av;
                        (mm[i], vv[i]) = moment(g[i], m0, v0);
                        let denom = vv[i].sqrt() / bc2 + eps;
                        p[i] *= keep;
                        p[i] += (step * mm[i]) / denom;
                        finite &= p[i].is_finite();
                    }
                    let n = p.len();
                    *am = q1.block(&mm[..n], qm);
                    *av = q2.block(&vv[..n], qv);
                    finite
                })
                .reduce(|| true, |a, b| a && b)
        }
    }
}
