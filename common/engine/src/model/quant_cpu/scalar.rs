//! The portable path: ggml's reference activation quantizer and a kernel that performs, per
//! output element, exactly the operations of the SIMD kernels.

use half::f16;

use super::{TileGeom, XRows, FMT_Q4_0, FMT_Q4_1, FMT_Q8_0, QK, TILE};

/// ggml's `roundf` (half away from zero), clamped to the i8 range. For finite inputs
/// `|v| <= 127.5`, so the clamp only tames degenerate blocks (infinities, NaN, subnormal
/// scales), where ggml's cast would be undefined; it keeps every block sum small.
#[inline(always)]
fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    let r = if frac >= 0.5 {
        t.saturating_add(1)
    } else if frac <= -0.5 {
        t.saturating_sub(1)
    } else {
        t
    };
    r.clamp(-128, 127)
}

/// The scale, `s` and quant sum of one block from its f32 `d` and integer sum, as ggml stores
/// them (f16) and reads them back.
#[inline(always)]
fn block_scales(d: f32, sum: i32) -> (f32, f32) {
    (
        f16::from_f32(d).to_f32(),
        f16::from_f32(sum as f32 * d).to_f32(),
    )
}

/// ggml's `quantize_row_q8_1` / `quantize_row_q8_0`, block by block.
pub(super) fn quantize_scalar(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    sum: &mut [i32],
) {
    let blocks = x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK));
    for (b, (xs, q)) in blocks.enumerate() {
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if db != 0.0 { 1.0 / db } else { 0.0 };
        let mut total = 0i32;
        for (q, &v) in q.iter_mut().zip(xs) {
            let r = round_half_away(v * id);
            total += r;
            *q = r as i8;
        }
        (d[b], s[b]) = block_scales(db, total);
        sum[b] = total;
    }
}

/// Portable kernel with exactly the per-element operations of the SIMD kernels.
pub(super) fn scalar_tile(
    fmt: u8,
    tile: &[u8],
    g: &TileGeom,
    xr: &XRows<'_>,
    row0: usize,
    out: &mut [[f32; TILE]],
) {
    let half_at = |off: usize, b: usize, lane: usize| {
        let at = off + b * TILE * 2 + lane * 2;
        f16::from_le_bytes([tile[at], tile[at + 1]]).to_f32()
    };
    for (r, out_row) in out.iter_mut().enumerate() {
        let row = row0 + r;
        let xq = &xr.qs[row * xr.k..(row + 1) * xr.k];
        for (lane, o) in out_row.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (b, xb) in xq.chunks_exact(QK).enumerate() {
                let xs_at = row * xr.nb + b;
                let mut isum = match fmt {
                    FMT_Q4_0 => -8 * xr.sum[xs_at],
                    FMT_Q8_0 => -128 * xr.sum[xs_at],
                    _ => 0,
                };
                for grp in 0..g.qs_block / 64 {
                    let at = b * g.qs_block + grp * 64 + lane * 4;
                    for (i, &u) in tile[at..at + 4].iter().enumerate() {
                        let j = 4 * grp + i;
                        if fmt == FMT_Q8_0 {
                            isum += u as i32 * xb[j] as i32;
                        } else {
                            isum += (u & 0x0F) as i32 * xb[j] as i32;
                            isum += (u >> 4) as i32 * xb[j + QK / 2] as i32;
                        }
                    }
                }
                let dw = half_at(g.d_off, b, lane);
                acc = (isum as f32).mul_add(dw * xr.d[xs_at], acc);
                if fmt == FMT_Q4_1 {
                    acc = half_at(g.m_off, b, lane).mul_add(xr.s[xs_at], acc);
                }
            }
            *o = acc;
        }
    }
}
