//! Frozen weights kept in a quantized block format (issue 17): GGUF's block types as a file
//! stores them, and bitsandbytes' 4-bit (NF4 / FP4, optionally with quantized scales) and
//! 8-bit row-wise formats as QLoRA applies them at load. The GEMMs (`gemm`) read these
//! blocks directly, decoding 32 values at a time next to the product, so the weight is never
//! held widened.
//!
//! A weight is [d_out, d_in] (HF's layout: one row per output), quantized along d_in.

pub mod bnb;
mod encode;
pub use encode::encode;
mod formats;
pub mod gemm;
mod kquant;
#[cfg(target_arch = "x86_64")]
mod simd;

use rayon::prelude::*;

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
    /// bitsandbytes' 4-bit NormalFloat, blocks of 64 values with an absmax scale.
    Nf4,
    /// bitsandbytes' 4-bit float.
    Fp4,
    /// bitsandbytes' 8-bit weights (LLM.int8's storage): one absmax scale per row.
    Int8,
}

impl QType {
    /// The GGUF types this module decodes, by ggml type id.
    pub fn from_ggml(id: u32) -> Option<QType> {
        Some(match id {
            2 => QType::Q4_0,
            3 => QType::Q4_1,
            6 => QType::Q5_0,
            7 => QType::Q5_1,
            8 => QType::Q8_0,
            12 => QType::Q4K,
            13 => QType::Q5K,
            14 => QType::Q6K,
            _ => return None,
        })
    }

    /// The name users see (GGUF's type names; bitsandbytes' quant types).
    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "Q8_0",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q5_0 => "Q5_0",
            QType::Q5_1 => "Q5_1",
            QType::Q4K => "Q4_K",
            QType::Q5K => "Q5_K",
            QType::Q6K => "Q6_K",
            QType::Nf4 => "nf4",
            QType::Fp4 => "fp4",
            QType::Int8 => "int8",
        }
    }

    /// (values, bytes) of one block in a row's data.
    pub fn block(self) -> (usize, usize) {
        match self {
            QType::Q8_0 => (32, 34),
            QType::Q4_0 => (32, 18),
            QType::Q4_1 => (32, 20),
            QType::Q5_0 => (32, 22),
            QType::Q5_1 => (32, 24),
            QType::Q4K => (256, 144),
            QType::Q5K => (256, 176),
            QType::Q6K => (256, 210),
            QType::Nf4 | QType::Fp4 => (bnb::BLOCK, bnb::BLOCK / 2),
            QType::Int8 => (32, 32),
        }
    }
}

/// Scales kept beside the blocks (bitsandbytes' formats; GGUF's blocks carry their own).
#[derive(Debug, Clone)]
pub enum Scales {
    None,
    /// One per block of the flattened weight (4-bit) or per row (int8).
    F32(Vec<f32>),
    /// Double quantization: the 4-bit absmaxes as 8-bit codes of a 256-value map, in groups
    /// of `group` with their own f32 absmax, plus the mean taken out before.
    Nested {
        codes: Vec<u8>,
        absmax: Vec<f32>,
        map: Box<[f32; 256]>,
        offset: f32,
        group: usize,
    },
}

/// A frozen [d_out, d_in] weight in a block format.
#[derive(Debug)]
pub struct QuantWeight {
    pub ty: QType,
    pub d_out: usize,
    pub d_in: usize,
    row_bytes: usize,
    data: Vec<u8>,
    scales: Scales,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct QuantError(pub String);

impl QuantWeight {
    /// Rows of `ty` blocks as stored (a GGUF tensor's data; bitsandbytes' packed codes) with
    /// their scales. d_in must be whole blocks.
    pub fn new(
        ty: QType,
        d_out: usize,
        d_in: usize,
        data: Vec<u8>,
        scales: Scales,
    ) -> Result<QuantWeight, QuantError> {
        let (per, bytes) = ty.block();
        if !d_in.is_multiple_of(per) {
            return Err(QuantError(format!(
                "{}: rows of {d_in} values are not whole blocks of {per}",
                ty.name()
            )));
        }
        let row_bytes = d_in / per * bytes;
        if data.len() != d_out * row_bytes {
            return Err(QuantError(format!(
                "{}: {} bytes for {d_out} rows of {row_bytes}",
                ty.name(),
                data.len()
            )));
        }
        let blocks = d_out * d_in / per;
        let want = match (ty, &scales) {
            (QType::Nf4 | QType::Fp4, Scales::F32(s)) => s.len() == blocks,
            (
                QType::Nf4 | QType::Fp4,
                Scales::Nested {
                    codes,
                    absmax,
                    group,
                    ..
                },
            ) => codes.len() == blocks && absmax.len() == blocks.div_ceil(*group),
            (QType::Int8, Scales::F32(s)) => s.len() == d_out,
            (QType::Nf4 | QType::Fp4 | QType::Int8, _) => false,
            (_, Scales::None) => true,
            _ => false,
        };
        if !want {
            return Err(QuantError(format!(
                "{}: scales do not fit {d_out} × {d_in}",
                ty.name()
            )));
        }
        Ok(QuantWeight {
            ty,
            d_out,
            d_in,
            row_bytes,
            data,
            scales,
        })
    }

    /// Bytes held: blocks and scales.
    pub fn bytes(&self) -> usize {
        let scales = match &self.scales {
            Scales::None => 0,
            Scales::F32(s) => 4 * s.len(),
            Scales::Nested { codes, absmax, .. } => codes.len() + 4 * absmax.len() + 1024,
        };
        self.data.len() + scales
    }

    pub fn scales(&self) -> &Scales {
        &self.scales
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Row r's values [32c, 32c + 32), decoded to f32.
    #[inline]
    pub fn decode(&self, r: usize, c: usize, out: &mut [f32; 32]) {
        let row = &self.data[r * self.row_bytes..(r + 1) * self.row_bytes];
        let (per, bytes) = self.ty.block();
        let (b, within) = (32 * c / per, (32 * c % per) / 32);
        let blk = &row[b * bytes..(b + 1) * bytes];
        match self.ty {
            QType::Q8_0 => formats::q8_0(blk, out),
            QType::Q4_0 => formats::q4_0(blk, out),
            QType::Q4_1 => formats::q4_1(blk, out),
            QType::Q5_0 => formats::q5_0(blk, out),
            QType::Q5_1 => formats::q5_1(blk, out),
            QType::Q4K => formats::q4_k(blk, within, out),
            QType::Q5K => formats::q5_k(blk, within, out),
            QType::Q6K => formats::q6_k(blk, within, out),
            QType::Nf4 | QType::Fp4 => {
                let block = r * (self.d_in / per) + b;
                let absmax = self.block_absmax(block);
                bnb::decode4(self.ty, &blk[16 * within..16 * within + 16], absmax, out)
            }
            QType::Int8 => {
                let Scales::F32(s) = &self.scales else {
                    unreachable!("checked in new")
                };
                bnb::decode8(blk, s[r], out)
            }
        }
    }

    /// A 4-bit block's absmax (through the nested map where the scales are quantized).
    fn block_absmax(&self, block: usize) -> f32 {
        match &self.scales {
            Scales::F32(s) => s[block],
            Scales::Nested {
                codes,
                absmax,
                map,
                offset,
                group,
            } => map[codes[block] as usize] * absmax[block / group] + offset,
            Scales::None => unreachable!("checked in new"),
        }
    }

    /// The whole weight in f32, [d_out, d_in] row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.d_out * self.d_in];
        w.par_chunks_mut(self.d_in.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                for (c, chunk) in row.chunks_exact_mut(32).enumerate() {
                    let out: &mut [f32; 32] = chunk.try_into().expect("32 values");
                    self.decode(r, c, out);
                }
            });
        w
    }

    /// Row r becomes the old row `src_of(r)`, blocks whole (GGUF's q/k rows come interleaved
    /// per head).
    pub fn permute_rows(&mut self, src_of: impl Fn(usize) -> usize) {
        assert!(
            matches!(self.scales, Scales::None),
            "only GGUF rows are reordered"
        );
        let mut data = vec![0u8; self.data.len()];
        let rb = self.row_bytes;
        for (r, dst) in data.chunks_exact_mut(rb).enumerate() {
            let s = src_of(r);
            dst.copy_from_slice(&self.data[s * rb..(s + 1) * rb]);
        }
        self.data = data;
    }
}
