//! ggml's reference quantizers for the 256-value "K" super-blocks (`quantize_row_q{4,5,6}_K_ref`
//! in ggml-quants.c, what `llama-quantize` runs when no importance matrix is given): Q4_K and
//! Q5_K fit a scale and a minimum to each 32 values by a weighted least-squares search, Q6_K a
//! signed scale to each 16; the sub-block scales are then coded in 6 or 8 bits against one f16
//! scale per super-block. Every sum runs in the order ggml's scalar C runs it (ggml-base is built
//! without FMA contraction), so the bytes equal llama.cpp's, which tests/quant_encode.rs checks.

const QK: usize = 256;
/// ggml's GROUP_MAX_EPS: a group whose largest magnitude is below this is all zero.
const GROUP_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, as ggml's `nearest_int` (the 1.5·2²³ addition trick) —
/// including its wrap for magnitudes past 2²², which real weights never reach.
fn nearest(v: f32) -> i32 {
    let t = (v + 12_582_912.0).to_bits();
    (t & 0x007f_ffff) as i32 - 0x0040_0000
}

fn f16_round(v: f32) -> (f32, [u8; 2]) {
    let h = half::f16::from_f32(v);
    (h.to_f32(), h.to_le_bytes())
}

/// A scale and a minimum for 32 values: codes 0..=nmax, weighted squared error minimised over
/// `steps + 1` trial scales around nmax / (max − min). Returns (scale, −min).
fn fit_scale_min(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    steps: i32,
    codes: &mut [u8],
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let top = nmax as f32;
    let mut iscale = top / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..n {
        let l = nearest(iscale * (x[i] - min)).clamp(0, nmax);
        codes[i] = l as u8;
        let d = scale * l as f32 + min - x[i];
        best += w[i] * (d * d);
    }
    let mut trial = [0u8; 32];
    for is in 0..=steps {
        iscale = (rmin + rdelta * is as f32 + top) / (max - min);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest(iscale * (x[i] - min)).clamp(0, nmax);
            trial[i] = l as u8;
            let lf = l as f32;
            sl += w[i] * lf;
            sl2 += w[i] * lf * lf;
            sxl += w[i] * lf * x[i];
        }
        let det = sum_w * sl2 - sl * sl;
        if det > 0.0 {
            let mut this_scale = (sum_w * sxl - sum_x * sl) / det;
            let mut this_min = (sl2 * sum_x - sl * sxl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sxl / sl2;
            }
            let mut err = 0f32;
            for i in 0..n {
                let d = this_scale * trial[i] as f32 + this_min - x[i];
                err += w[i] * (d * d);
            }
            if err < best {
                codes[..n].copy_from_slice(&trial[..n]);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K (`bits` 4) or Q5_K (`bits` 5): one 256-value super-block.
fn q45_k(x: &[f32], bits: u32, out: &mut Vec<u8>) {
    let nmax = (1i32 << bits) - 1;
    let (rmin, steps) = if bits == 4 { (-1.0, 20) } else { (-0.5, 15) };
    let mut codes = [0u8; QK];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av = (sum_x2 / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|l| av + xs[l].abs());
        let (s, m) = fit_scale_min(
            xs,
            &w,
            nmax,
            rmin,
            0.1,
            steps,
            &mut codes[32 * j..32 * j + 32],
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    let mut six = [(0u8, 0u8); 8];
    for j in 0..8 {
        // C stores nearest_int's result in a uint8_t before clamping: keep the wrap.
        let ls = (nearest(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest(inv_min * mins[j]) as u8).min(63);
        six[j] = (ls, lm);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let (d, d_bytes) = f16_round(max_scale / 63.0);
    let (dmin, dmin_bytes) = f16_round(max_min / 63.0);
    for (j, &(sc, m)) in six.iter().enumerate() {
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            codes[i] = nearest((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    out.extend(d_bytes);
    out.extend(dmin_bytes);
    out.extend(packed);
    if bits == 5 {
        // Fifth bits: value j + 64·g of the low half in bit 2g of byte j, the high half's in 2g + 1.
        let mut qh = [0u8; 32];
        for g in 0..4 {
            for j in 0..32 {
                qh[j] |= (codes[64 * g + j] >> 4) << (2 * g);
                qh[j] |= (codes[64 * g + 32 + j] >> 4) << (2 * g + 1);
            }
        }
        out.extend(qh);
    }
    for g in 0..4 {
        for j in 0..32 {
            out.push((codes[64 * g + j] & 0xf) | ((codes[64 * g + 32 + j] & 0xf) << 4));
        }
    }
}

/// A signed scale for 16 values, codes −32..=31 (stored + 32), weights x²: the best of 19
/// trial scales around −32 / (the value of largest magnitude).
fn fit_signed(x: &[f32], codes: &mut [u8]) -> f32 {
    const NMAX: i32 = 32;
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_EPS {
        codes.fill(0);
        return 0.0;
    }
    let code = |iscale: f32, v: f32| nearest(iscale * v).clamp(-NMAX, NMAX - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = code(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(NMAX as f32) / max;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (code(iscale, v) + NMAX) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(NMAX as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = (code(iscale, v) + NMAX) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K: one 256-value super-block.
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut codes = [0u8; QK];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for (b, s) in scales.iter_mut().enumerate() {
        *s = fit_signed(&x[16 * b..16 * b + 16], &mut codes[16 * b..16 * b + 16]);
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = *s;
        }
    }
    if max_abs < GROUP_EPS {
        out.extend([0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let (d, d_bytes) = f16_round(1.0 / iscale);
    let sc: [i8; 16] = std::array::from_fn(|b| nearest(iscale * scales[b]).min(127) as i8);
    for (b, &s) in sc.iter().enumerate() {
        let db = d * s as f32;
        if db == 0.0 {
            continue;
        }
        for (c, &v) in codes[16 * b..16 * b + 16].iter_mut().zip(&x[16 * b..]) {
            *c = (nearest(v / db).clamp(-32, 31) + 32) as u8;
        }
    }
    // Per 128 values: low nibbles of values l and l + 64 share a byte (l + 32 with l + 96),
    // the four values l, l + 32, l + 64, l + 96 give byte l of the high bits, 2 bits each.
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        let c = &codes[128 * h..128 * h + 128];
        for l in 0..32 {
            ql[64 * h + l] = (c[l] & 0xf) | ((c[l + 64] & 0xf) << 4);
            ql[64 * h + l + 32] = (c[l + 32] & 0xf) | ((c[l + 96] & 0xf) << 4);
            qh[32 * h + l] = (c[l] >> 4)
                | ((c[l + 32] >> 4) << 2)
                | ((c[l + 64] >> 4) << 4)
                | ((c[l + 96] >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|s| s as u8));
    out.extend(d_bytes);
}

/// One super-block of Q4_K (bits 4), Q5_K (5) or Q6_K (6).
pub(super) fn super_block(x: &[f32], bits: u32, out: &mut Vec<u8>) {
    debug_assert_eq!(x.len(), QK);
    match bits {
        6 => q6_k(x, out),
        _ => q45_k(x, bits, out),
    }
}
