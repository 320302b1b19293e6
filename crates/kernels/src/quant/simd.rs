//! NF4 / FP4 panels decoded with AVX-512: the 16 levels sit in one register and a lane-wise
//! permute looks 16 codes up at once. The scalar decoder (`gemm::decode_pair`) spent more time
//! than the GEMM it feeds (a 512 × 3072 × 8192 product: 29 ms against 12.6 ms packed); this one
//! gives the same words to the bit: the same f32 product level × absmax, rounded to bf16 by the
//! same integer steps as `bf16::to_bf16`.

use super::{bnb, QType, QuantWeight};
use crate::bf16::PANEL;
use std::arch::x86_64::*;

/// Whether `decode_pair` can take this weight here.
pub(super) fn applies(w: &QuantWeight) -> bool {
    matches!(w.ty, QType::Nf4 | QType::Fp4)
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// As `gemm::decode_pair` (B's panels 2p and 2p + 1 as bf16 pair words) for a 4-bit weight.
///
/// # Safety
/// `applies(w)`; `words` holds the two panels (k_pad / 2 pair rows of 16 words each), k_pad
/// covering B's rows and starting on a 64-byte boundary.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn decode_pair(
    w: &QuantWeight,
    forward: bool,
    p: usize,
    k_pad: usize,
    words: &mut [u32],
) {
    let levels = match w.ty {
        QType::Nf4 => bnb::NF4,
        _ => bnb::fp4_table(),
    };
    let t = _mm512_loadu_ps(levels.as_ptr());
    let half = k_pad / 2 * PANEL;
    assert!(words.len() >= 2 * half, "two panels of k_pad rows");
    if forward {
        for panel in 0..2 {
            let j0 = (2 * p + panel) * PANEL;
            forward_panel(w, t, j0, &mut words[panel * half..(panel + 1) * half]);
        }
    } else {
        input_grad_pair(w, t, p, k_pad, words);
    }
}

/// x rounded to bf16 in each lane's low half (`bf16::to_bf16`: nearest-even, NaN kept quiet).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn round(x: __m512) -> __m512i {
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(
        _mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)),
        lsb,
    ));
    let nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff)),
        _mm512_set1_epi32(0x7f80_0000),
    );
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
    _mm512_mask_mov_epi32(r, nan, quiet)
}

/// Pair words of 16 bytes of codes in the lanes' low bytes: each byte's high nibble (the
/// earlier value) in the low half, its low nibble in the high half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pair_words(bytes: __m512i, t: __m512, absmax: __m512) -> __m512i {
    let nib = _mm512_set1_epi32(0x0f);
    let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(bytes), nib);
    let lo = _mm512_and_si512(bytes, nib);
    let a = round(_mm512_mul_ps(_mm512_permutexvar_ps(hi, t), absmax));
    let b = round(_mm512_mul_ps(_mm512_permutexvar_ps(lo, t), absmax));
    _mm512_or_si512(a, _mm512_slli_epi32::<16>(b))
}

/// The 16 rows j0.. of W as one panel of B = Wᵀ: a pair row holds one byte of codes from each
/// row, gathered 4 bytes a lane at a time. Rows past d_out give zeros.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn forward_panel(w: &QuantWeight, t: __m512, j0: usize, out: &mut [u32]) {
    let rows = w.d_out.saturating_sub(j0).min(PANEL);
    let valid: __mmask16 = ((1u32 << rows) - 1) as __mmask16;
    let per_row = w.d_in / bnb::BLOCK;
    let rb = w.row_bytes as i32;
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(rb),
    );
    let base = w.data.as_ptr().add(j0.min(w.d_out) * w.row_bytes);
    let byte = _mm512_set1_epi32(0xff);
    let mut am = [0f32; PANEL];
    for b in 0..per_row {
        for (col, a) in am.iter_mut().enumerate().take(rows) {
            *a = w.block_absmax((j0 + col) * per_row + b);
        }
        let absmax = _mm512_loadu_ps(am.as_ptr());
        for g in 0..bnb::BLOCK / 8 {
            // SAFETY: valid lanes read 4 bytes of row j0 + lane's block b, inside the data.
            let four = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                valid,
                _mm512_add_epi32(
                    offsets,
                    _mm512_set1_epi32((bnb::BLOCK / 2 * b + 4 * g) as i32),
                ),
                base.cast(),
            );
            for s in 0..4 {
                let bytes =
                    _mm512_and_si512(_mm512_srlv_epi32(four, _mm512_set1_epi32(8 * s)), byte);
                let r = bnb::BLOCK / 2 * b + 4 * g + s as usize;
                let words = _mm512_maskz_mov_epi32(valid, pair_words(bytes, t, absmax));
                _mm512_store_si512(out.as_mut_ptr().add(r * PANEL).cast(), words);
            }
        }
    }
    for r in w.d_in / 2..out.len() / PANEL {
        _mm512_store_si512(
            out.as_mut_ptr().add(r * PANEL).cast(),
            _mm512_setzero_si512(),
        );
    }
}

/// Columns 32p.. of W as panels 2p, 2p + 1 of B = W: a pair row interleaves rows 2r and
/// 2r + 1, whose 16 bytes of codes give the 32 columns (the even ones from high nibbles).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn input_grad_pair(w: &QuantWeight, t: __m512, p: usize, k_pad: usize, words: &mut [u32]) {
    let half = k_pad / 2 * PANEL;
    let per_row = w.d_in / bnb::BLOCK;
    let (b, within) = (p / 2, p % 2);
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    // One row's 16 bytes as (even columns, odd columns) rounded, or zeros past d_out.
    let row = |k: usize| -> (__m512i, __m512i) {
        if k >= w.d_out {
            return (_mm512_setzero_si512(), _mm512_setzero_si512());
        }
        let at = k * w.row_bytes + bnb::BLOCK / 2 * b + 16 * within;
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(w.data[at..at + 16].as_ptr().cast()));
        let absmax = _mm512_set1_ps(w.block_absmax(k * per_row + b));
        let nib = _mm512_set1_epi32(0x0f);
        let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(bytes), nib);
        let lo = _mm512_and_si512(bytes, nib);
        (
            round(_mm512_mul_ps(_mm512_permutexvar_ps(hi, t), absmax)),
            round(_mm512_mul_ps(_mm512_permutexvar_ps(lo, t), absmax)),
        )
    };
    for r in 0..k_pad / 2 {
        let (e0, o0) = row(2 * r);
        let (e1, o1) = row(2 * r + 1);
        let even = _mm512_or_si512(e0, _mm512_slli_epi32::<16>(e1));
        let odd = _mm512_or_si512(o0, _mm512_slli_epi32::<16>(o1));
        let dst = words.as_mut_ptr().add(r * PANEL);
        _mm512_store_si512(dst.cast(), _mm512_permutex2var_epi32(even, first, odd));
        _mm512_store_si512(
            dst.add(half).cast(),
            _mm512_permutex2var_epi32(even, second, odd),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::{decode_pair_scalar, Side};
    use super::super::{QType, QuantWeight, Scales};
    use crate::bf16::{round_up, Bf16Buf, KSTEP, PANEL};

    /// Random codes under absmaxes that stress the rounding: NaN, ±∞, a subnormal, zero, a
    /// negative, values whose products land on bf16 ties, and ordinary ones.
    fn weight(ty: QType, d_out: usize, d_in: usize, nested: bool, seed: u64) -> QuantWeight {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let data: Vec<u8> = (0..d_out * d_in / 2).map(|_| next() as u8).collect();
        let blocks = d_out * d_in / super::bnb::BLOCK;
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            0.0,
            -0.37,
            1.0,
        ];
        let absmax: Vec<f32> = (0..blocks)
            .map(|i| match special.get(i) {
                Some(&v) => v,
                None => f32::from_bits(0x3c00_0000 + (next() & 0x00ff_ffff)),
            })
            .collect();
        let scales = if nested {
            let groups = blocks.div_ceil(super::bnb::GROUP);
            Scales::Nested {
                codes: (0..blocks).map(|_| next() as u8).collect(),
                absmax: (0..groups).map(|g| 0.01 + g as f32 * 0.003).collect(),
                map: Box::new(super::bnb::dynamic_map(true)),
                offset: 0.02,
                group: super::bnb::GROUP,
            }
        } else {
            Scales::F32(absmax)
        };
        QuantWeight::new(ty, d_out, d_in, data, scales).expect("a consistent weight")
    }

    #[test]
    fn the_vector_decoder_writes_the_scalar_decoders_words() {
        if !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("avx512bw") {
            eprintln!("AVX-512 NF4/FP4 panel decoding: NOT RUN (this CPU lacks AVX512F/BW)");
            return;
        }
        for ty in [QType::Nf4, QType::Fp4] {
            for nested in [false, true] {
                for (d_out, d_in) in [(1, 64), (37, 128), (16, 64), (70, 320)] {
                    let w = weight(ty, d_out, d_in, nested, (d_out * d_in) as u64);
                    for side in [Side::Forward, Side::InputGrad] {
                        let (k, n) = match side {
                            Side::Forward => (d_in, d_out),
                            Side::InputGrad => (d_out, d_in),
                        };
                        let k_pad = round_up(k, KSTEP);
                        for p in 0..n.div_ceil(2 * PANEL) {
                            let words = |simd: bool| {
                                let mut buf = Bf16Buf::zeroed(k_pad * 2 * PANEL);
                                // SAFETY: as in `gemm::decode_pair`.
                                let out: &mut [u32] = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        buf.as_mut_ptr().cast(),
                                        buf.len() / 2,
                                    )
                                };
                                // Both decoders must write every word: start from garbage.
                                out.fill(0xdead_beef);
                                match simd {
                                    // SAFETY: the CPU has AVX512F/BW; the buffer is aligned.
                                    true => unsafe {
                                        super::decode_pair(&w, side == Side::Forward, p, k_pad, out)
                                    },
                                    false => decode_pair_scalar(&w, side, p, k_pad, out),
                                }
                                out.to_vec()
                            };
                            let (got, want) = (words(true), words(false));
                            let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                            assert!(
                                bad.is_none(),
                                "{ty:?} nested={nested} {d_out}×{d_in} {side:?} pair {p}: word \
                                 {bad:?} is {:#x}, the scalar decoder's {:#x}",
                                got[bad.unwrap_or(0)],
                                want[bad.unwrap_or(0)]
                            );
                        }
                    }
                }
            }
        }
    }
}
