//! A linear weight in the form its products read: bf16 panels for the matrix units (`--bf16`),
//! or a quantized block format (issue 17) decoded next to the products, on the bf16 kernels
//! or in f32. The model keeps its frozen base weights only in this form; the forward (y = x·W)
//! and the input gradient (dx = dy·Wᵀ) are its two products, the weight has no gradient.

use crate::bf16::{self, PackedA, PackedB, Path};
use crate::quant::gemm::{self as qgemm, Side};
use crate::quant::QuantWeight;
use std::sync::Arc;

#[derive(Debug)]
pub enum Store {
    /// bf16 panels of W [d_in, d_out] as B (`bf16::PackedB`).
    Bf16(PackedB),
    /// Blocks of W [d_out, d_in] (HF's layout), shared by copies of the model that run
    /// them on different paths.
    Quant(Arc<QuantWeight>),
}

#[derive(Debug)]
pub struct PackedWeight {
    pub store: Store,
    /// The bf16 kernel path its products run on; None: f32 (quantized weights only).
    pub path: Option<Path>,
}

impl PackedWeight {
    /// W stored [d_in, d_out] row-major (Burn's linear layout), in bf16.
    pub fn in_out(w: &[f32], d_in: usize, d_out: usize, path: Path) -> PackedWeight {
        PackedWeight {
            store: Store::Bf16(PackedB::from_rows(w, d_in, d_out)),
            path: Some(path),
        }
    }

    /// W stored [d_out, d_in] row-major (HF's layout; the tied head's embedding table), in
    /// bf16.
    pub fn out_in(w: &[f32], d_out: usize, d_in: usize, path: Path) -> PackedWeight {
        PackedWeight {
            store: Store::Bf16(PackedB::from_cols(w, d_in, d_out)),
            path: Some(path),
        }
    }

    /// A quantized weight, its products on `path` (None: f32).
    pub fn quantized(q: QuantWeight, path: Option<Path>) -> PackedWeight {
        PackedWeight {
            store: Store::Quant(Arc::new(q)),
            path,
        }
    }

    /// The same quantized blocks with products on `path`; None for a bf16 weight.
    pub fn on_path(&self, path: Option<Path>) -> Option<PackedWeight> {
        match &self.store {
            Store::Quant(q) => Some(PackedWeight {
                store: Store::Quant(q.clone()),
                path,
            }),
            Store::Bf16(_) => None,
        }
    }

    pub fn d_in(&self) -> usize {
        match &self.store {
            Store::Bf16(b) => b.k,
            Store::Quant(q) => q.d_in,
        }
    }

    pub fn d_out(&self) -> usize {
        match &self.store {
            Store::Bf16(b) => b.n,
            Store::Quant(q) => q.d_out,
        }
    }

    pub fn quant(&self) -> Option<&QuantWeight> {
        match &self.store {
            Store::Quant(q) => Some(q),
            Store::Bf16(_) => None,
        }
    }

    /// Bytes the weight holds.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Bf16(b) => 2 * b.data.len(),
            Store::Quant(q) => q.bytes(),
        }
    }

    /// W back in f32, [d_in, d_out] row-major (each value as stored: its bf16 rounding, or
    /// its decoded value).
    pub fn unpack(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let (k, n) = (self.d_in(), self.d_out());
        let mut w = vec![0f32; k * n];
        match &self.store {
            Store::Bf16(b) => w.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = bf16::from_bf16(b.get(r, j));
                }
            }),
            Store::Quant(q) => {
                let hf = q.dequantize();
                w.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| {
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = hf[j * k + r];
                    }
                })
            }
        }
        w
    }

    /// x·W for row-major x [m, d_in]: [m, d_out].
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        match (&self.store, self.path) {
            (Store::Bf16(b), Some(path)) => bf16::product(path, x, m, b),
            (Store::Quant(q), None) => qgemm::product_f32(q, Side::Forward, x, m),
            (_, _) => self.forward_packed(&PackedA::rows(x, m, self.d_in()), None),
        }
    }

    /// dy·Wᵀ for row-major dy [m, d_out]: [m, d_in].
    pub fn input_grad(&self, dy: &[f32], m: usize) -> Vec<f32> {
        match (&self.store, self.path) {
            (Store::Quant(q), None) => qgemm::product_f32(q, Side::InputGrad, dy, m),
            (_, _) => self.input_grad_packed(&PackedA::rows(dy, m, self.d_out()), None),
        }
    }

    /// x·W (+ A2·B2) with x already in bf16 rows, on the bf16 kernels (`path` is set).
    pub fn forward_packed(&self, x: &PackedA, extra: Option<(&PackedA, &PackedB)>) -> Vec<f32> {
        let path = self.bf16_path();
        match &self.store {
            Store::Bf16(b) => bf16::product_packed(path, x, b, extra),
            Store::Quant(q) => qgemm::product_bf16(path, q, Side::Forward, x, extra),
        }
    }

    /// dy·Wᵀ (+ A2·B2) with dy already in bf16 rows, on the bf16 kernels. A bf16 weight's
    /// panels are transposed for the call (a pass over W; a second packing kept for the
    /// backward would double the frozen base's memory).
    pub fn input_grad_packed(&self, dy: &PackedA, extra: Option<(&PackedA, &PackedB)>) -> Vec<f32> {
        let path = self.bf16_path();
        match &self.store {
            Store::Bf16(b) => bf16::product_packed(path, dy, &b.transposed(), extra),
            Store::Quant(q) => qgemm::product_bf16(path, q, Side::InputGrad, dy, extra),
        }
    }

    fn bf16_path(&self) -> Path {
        self.path.expect("a packed product needs a bf16 path")
    }
}
