//! Block formats, decoded 32 values at a time: GGUF's (llama.cpp's `ggml-quants.c`, with the
//! operation order of the `gguf` Python package's `dequantize`, which the fixtures hold us to)
//! and bitsandbytes' 4-bit codes (see `bnb`). Every format's blocks are whole multiples of 32
//! values, so a chunk never straddles two blocks.

/// f16 bits at `b[0..2]` (little-endian) as f32, exactly (subnormals included).
#[inline(always)]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q8_0: [d: f16][32 × i8]; y = d·q.
pub(crate) fn q8_0(blk: &[u8], out: &mut [f32; 32]) {
    let d = f16_at(blk);
    for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
        *o = d * q as i8 as f32;
    }
}

/// Q4_0: [d: f16][16 bytes]; byte j holds element j (low nibble) and j + 16 (high);
/// y = d·(q − 8).
pub(crate) fn q4_0(blk: &[u8], out: &mut [f32; 32]) {
    let d = f16_at(blk);
    let qs = &blk[2..18];
    for j in 0..16 {
        out[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
        out[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: [d: f16][m: f16][16 bytes]; y = d·q + m.
pub(crate) fn q4_1(blk: &[u8], out: &mut [f32; 32]) {
    let (d, m) = (f16_at(blk), f16_at(&blk[2..]));
    let qs = &blk[4..20];
    for j in 0..16 {
        out[j] = d * (qs[j] & 0x0F) as f32 + m;
        out[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// Q5_0: [d: f16][qh: u32][16 bytes]; bit j of qh is element j's fifth bit, bit j + 16
/// element j + 16's; y = d·(q − 16).
pub(crate) fn q5_0(blk: &[u8], out: &mut [f32; 32]) {
    let d = f16_at(blk);
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let qs = &blk[6..22];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        out[j] = d * (lo as i32 - 16) as f32;
        out[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

/// Q5_1: [d: f16][m: f16][qh: u32][16 bytes]; y = d·q + m.
pub(crate) fn q5_1(blk: &[u8], out: &mut [f32; 32]) {
    let (d, m) = (f16_at(blk), f16_at(&blk[2..]));
    let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
    let qs = &blk[8..24];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        out[j] = d * lo as f32 + m;
        out[j + 16] = d * hi as f32 + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from K-quants' 12 packed bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K, chunk `c` (0..8) of a 256-value block: [d: f16][dmin: f16][12 scale bytes]
/// [128 bytes]; chunk 2i takes bytes 32i..32i+32's low nibbles, chunk 2i + 1 their high ones;
/// y = (d·sc)·q − (dmin·m).
pub(crate) fn q4_k(blk: &[u8], c: usize, out: &mut [f32; 32]) {
    let (d, dmin) = (f16_at(blk), f16_at(&blk[2..]));
    let (sc, m) = scale_min_k4(c, &blk[4..16]);
    let (dl, ml) = (d * sc as f32, dmin * m as f32);
    let qs = &blk[16 + 32 * (c / 2)..16 + 32 * (c / 2) + 32];
    let shift = 4 * (c % 2);
    for (o, &q) in out.iter_mut().zip(qs) {
        *o = dl * ((q >> shift) & 0x0F) as f32 - ml;
    }
}

/// Q5_K, chunk `c`: [d][dmin][12 scale bytes][qh: 32 bytes][qs: 128 bytes]; as Q4_K with
/// bit c of qh[l] as the fifth bit of element l.
pub(crate) fn q5_k(blk: &[u8], c: usize, out: &mut [f32; 32]) {
    let (d, dmin) = (f16_at(blk), f16_at(&blk[2..]));
    let (sc, m) = scale_min_k4(c, &blk[4..16]);
    let (dl, ml) = (d * sc as f32, dmin * m as f32);
    let qh = &blk[16..48];
    let qs = &blk[48 + 32 * (c / 2)..48 + 32 * (c / 2) + 32];
    let shift = 4 * (c % 2);
    for l in 0..32 {
        let q = ((qs[l] >> shift) & 0x0F) | (((qh[l] >> c) & 1) << 4);
        out[l] = dl * q as f32 - ml;
    }
}

/// Q6_K, chunk `c`: [ql: 128 bytes][qh: 64 bytes][16 × i8 scales][d: f16]. Half h = c / 4 of
/// the block reads ql[64h..], qh[32h..] and scales[8h..]; its quarter part = c % 4 takes
/// ql[l + 32·(part % 2)]'s low (part < 2) or high nibble and bits 2·part.. of qh[l];
/// y = d·scale·(q − 32), one scale per 16 values.
pub(crate) fn q6_k(blk: &[u8], c: usize, out: &mut [f32; 32]) {
    let d = f16_at(&blk[208..]);
    let (h, part) = (c / 4, c % 4);
    let ql = &blk[64 * h + 32 * (part % 2)..];
    let qh = &blk[128 + 32 * h..];
    let sc = &blk[192 + 8 * h..];
    let shift = 4 * (part / 2);
    for l in 0..32 {
        let lo = (ql[l] >> shift) & 0x0F;
        let hi = (qh[l] >> (2 * part)) & 3;
        let q = (lo | (hi << 4)) as i32 - 32;
        let s = sc[l / 16 + 2 * part] as i8 as f32;
        out[l] = d * s * q as f32;
    }
}
