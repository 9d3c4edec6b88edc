//! x86_64 kernels: AVX-512 VNNI (16 output rows per vector), AVX2 (8 per vector) and the AVX2
//! activation quantizer. Per output element they perform exactly the operations of
//! `scalar_tile` / `quantize_scalar` (exact integer block sums, then the same f32 fma chain),
//! so every level gives the same bits.

use std::arch::x86_64::*;

use super::{Level, TileGeom, XRows, FMT_Q4_0, FMT_Q4_1, FMT_Q8_0, MAX_ROWS, QK, TILE};

/// Computes one tile (16 output rows) for activation rows `row0..row0 + rows` into `buf`.
///
/// # Safety
/// `level` must be `Avx2` or `Avx512Vnni` and supported by this CPU; `tile` must point at
/// `g.stride` readable bytes of a tile with geometry `g`; `xr` must hold rows
/// `row0..row0 + rows` of `xr.k` quants (and their block scales); `rows` is 1, 2, 4 or 8.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    level: Level,
    fmt: u8,
    tile: *const u8,
    g: &TileGeom,
    xr: &XRows<'_>,
    row0: usize,
    rows: usize,
    buf: &mut [[f32; TILE]; MAX_ROWS],
) {
    // SAFETY: the caller upholds this function's contract (level supported, pointers and rows valid), which is what each kernel below requires.
    unsafe {
        macro_rules! by_rows {
            ($kernel:ident, $fmt:expr) => {
                match rows {
                    1 => $kernel::<{ $fmt }, 1>(tile, g, xr, row0, buf),
                    2 => $kernel::<{ $fmt }, 2>(tile, g, xr, row0, buf),
                    4 => $kernel::<{ $fmt }, 4>(tile, g, xr, row0, buf),
                    _ => $kernel::<{ $fmt }, 8>(tile, g, xr, row0, buf),
                }
            };
        }
        macro_rules! by_fmt {
            ($kernel:ident) => {
                match fmt {
                    FMT_Q4_0 => by_rows!($kernel, FMT_Q4_0),
                    FMT_Q4_1 => by_rows!($kernel, FMT_Q4_1),
                    _ => by_rows!($kernel, FMT_Q8_0),
                }
            };
        }
        match level {
            Level::Avx512Vnni => by_fmt!(tile_avx512),
            _ => by_fmt!(tile_avx2),
        }
    }
}

/// Four consecutive activation quants as one i32, to broadcast.
#[inline(always)]
unsafe fn group(p: *const i8) -> i32 {
    // SAFETY: the caller passes a pointer to at least four readable bytes.
    unsafe { std::ptr::read_unaligned(p.cast::<i32>()) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_avx512<const F: u8, const R: usize>(
    tile: *const u8,
    g: &TileGeom,
    xr: &XRows<'_>,
    row0: usize,
    buf: &mut [[f32; TILE]; MAX_ROWS],
) {
    // SAFETY: the caller guarantees AVX-512 VNNI support and that `tile` and `xr` cover the tile and rows this kernel reads (see `tile`); all loads and stores stay inside them and `buf`.
    unsafe {
        let nb = g.nb;
        let nib = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut xq = [std::ptr::null::<i8>(); R];
        for (r, p) in xq.iter_mut().enumerate() {
            *p = xr.qs.as_ptr().add((row0 + r) * xr.k);
        }
        let xd = xr.d.as_ptr().add(row0 * nb);
        let xs = xr.s.as_ptr().add(row0 * nb);
        let xsum = xr.sum.as_ptr().add(row0 * nb);
        for b in 0..nb {
            // The integer block sums start at -offset * sum(q) (q4 - 8 for Q4_0, stored q8 + 128
            // for Q8_0): exact, and equal to the signed dot product once the products are added.
            let mut isum = [_mm512_setzero_si512(); R];
            if F != FMT_Q4_1 {
                let off = if F == FMT_Q4_0 { 8 } else { 128 };
                for (r, s) in isum.iter_mut().enumerate() {
                    *s = _mm512_set1_epi32(-off * *xsum.add(r * nb + b));
                }
            }
            let wq = tile.add(b * g.qs_block);
            {
                // Prefetch the same block of the next tile (the next call's): this helps when the
                // weights stream from L3 / DRAM, as in single-row decode.
                let next = wq.wrapping_add(g.stride);
                for line in 0..g.qs_block / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * 64).cast());
                }
                _mm_prefetch::<_MM_HINT_T0>(tile.wrapping_add(g.stride + g.d_off + b * 32).cast());
                if F == FMT_Q4_1 {
                    _mm_prefetch::<_MM_HINT_T0>(
                        tile.wrapping_add(g.stride + g.m_off + b * 32).cast(),
                    );
                }
            }
            if F == FMT_Q8_0 {
                for grp in 0..8 {
                    let w = _mm512_loadu_si512(wq.add(grp * 64).cast());
                    for r in 0..R {
                        let xv = _mm512_set1_epi32(group(xq[r].add(b * QK + 4 * grp)));
                        isum[r] = _mm512_dpbusd_epi32(isum[r], w, xv);
                    }
                }
            } else {
                for grp in 0..4 {
                    let w = _mm512_loadu_si512(wq.add(grp * 64).cast());
                    let lo = _mm512_and_si512(w, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), nib);
                    for r in 0..R {
                        let p = xq[r].add(b * QK + 4 * grp);
                        isum[r] = _mm512_dpbusd_epi32(isum[r], lo, _mm512_set1_epi32(group(p)));
                        let p = p.add(QK / 2);
                        isum[r] = _mm512_dpbusd_epi32(isum[r], hi, _mm512_set1_epi32(group(p)));
                    }
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tile.add(g.d_off + b * 32).cast()));
            let mw = if F == FMT_Q4_1 {
                _mm512_cvtph_ps(_mm256_loadu_si256(tile.add(g.m_off + b * 32).cast()))
            } else {
                _mm512_setzero_ps()
            };
            for r in 0..R {
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(r * nb + b)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), scale, acc[r]);
                if F == FMT_Q4_1 {
                    acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs.add(r * nb + b)), acc[r]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(buf[r].as_mut_ptr(), *a);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const F: u8, const R: usize>(
    tile: *const u8,
    g: &TileGeom,
    xr: &XRows<'_>,
    row0: usize,
    buf: &mut [[f32; TILE]; MAX_ROWS],
) {
    // SAFETY: the caller guarantees AVX2 support and that `tile` and `xr` cover the tile and rows this kernel reads (see `tile`); all loads and stores stay inside them and `buf`.
    unsafe {
        let nb = g.nb;
        let nib = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut xq = [std::ptr::null::<i8>(); R];
        for (r, p) in xq.iter_mut().enumerate() {
            *p = xr.qs.as_ptr().add((row0 + r) * xr.k);
        }
        let xd = xr.d.as_ptr().add(row0 * nb);
        let xs = xr.s.as_ptr().add(row0 * nb);
        let xsum = xr.sum.as_ptr().add(row0 * nb);
        // The 16 rows of a tile as two halves of 8.
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let mut isum = [_mm256_setzero_si256(); R];
                if F == FMT_Q4_0 {
                    for (r, s) in isum.iter_mut().enumerate() {
                        *s = _mm256_set1_epi32(-8 * *xsum.add(r * nb + b));
                    }
                }
                let wq = tile.add(b * g.qs_block + half * 32);
                if F == FMT_Q8_0 {
                    // vpmaddubsw would saturate on q8 + 128, so undo the offset and move the
                    // weight's sign onto the activation instead.
                    for grp in 0..8 {
                        let ws =
                            _mm256_xor_si256(_mm256_loadu_si256(wq.add(grp * 64).cast()), flip);
                        let aw = _mm256_abs_epi8(ws);
                        for r in 0..R {
                            let xv = _mm256_set1_epi32(group(xq[r].add(b * QK + 4 * grp)));
                            let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, ws));
                            isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, ones));
                        }
                    }
                } else {
                    for grp in 0..4 {
                        let w = _mm256_loadu_si256(wq.add(grp * 64).cast());
                        let lo = _mm256_and_si256(w, nib);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), nib);
                        for r in 0..R {
                            let p = xq[r].add(b * QK + 4 * grp);
                            let plo = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(group(p)));
                            let phi =
                                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(group(p.add(QK / 2))));
                            // |sum| <= 2 * 2 * 15 * 127 fits in i16.
                            let p = _mm256_madd_epi16(_mm256_add_epi16(plo, phi), ones);
                            isum[r] = _mm256_add_epi32(isum[r], p);
                        }
                    }
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                    tile.add(g.d_off + b * 32 + half * 16).cast(),
                ));
                let mw = if F == FMT_Q4_1 {
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        tile.add(g.m_off + b * 32 + half * 16).cast(),
                    ))
                } else {
                    _mm256_setzero_ps()
                };
                for r in 0..R {
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.add(r * nb + b)));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), scale, acc[r]);
                    if F == FMT_Q4_1 {
                        acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs.add(r * nb + b)), acc[r]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(buf[r].as_mut_ptr().add(half * 8), *a);
            }
        }
    }
}

/// `quantize_scalar` with AVX2: the same amax, scale, products and rounding (half away from
/// zero), so the same quants and scales. Blocks go eight at a time through short dependency
/// chains (amaxes, then the eight scales in one vector, then the quants).
///
/// # Safety
/// AVX2, FMA and F16C must be supported; `qs` must hold `x.len()` quants and `d`, `s`, `sum`
/// `x.len() / 32` entries each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_avx2(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    sum: &mut [i32],
) {
    // SAFETY: the caller guarantees AVX2, FMA and F16C; the asserts above keep every block pointer inside `x` and `qs`.
    unsafe {
        let nblocks = x.len() / QK;
        assert!(qs.len() >= nblocks * QK && d.len() >= nblocks);
        assert!(s.len() >= nblocks && sum.len() >= nblocks);
        let mut b0 = 0;
        while b0 < nblocks {
            let count = (nblocks - b0).min(8);
            let mut amax = [0f32; 8];
            for (j, a) in amax[..count].iter_mut().enumerate() {
                *a = block_amax(x.as_ptr().add((b0 + j) * QK));
            }
            // d = amax / 127 and id = d != 0 ? 1 / d : 0, for eight blocks (IEEE division is
            // correctly rounded, so these are the scalar values).
            let dv = _mm256_div_ps(_mm256_loadu_ps(amax.as_ptr()), _mm256_set1_ps(127.0));
            let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(dv, _mm256_setzero_ps());
            let idv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0), dv), nonzero);
            let mut id = [0f32; 8];
            _mm256_storeu_ps(id.as_mut_ptr(), idv);
            let mut total = [0i32; 8];
            for (j, t) in total[..count].iter_mut().enumerate() {
                let b = b0 + j;
                *t = quantize_block(x.as_ptr().add(b * QK), id[j], qs.as_mut_ptr().add(b * QK));
            }
            // Through f16 and back, as ggml stores them (F16C rounds to nearest even, like `half`).
            let sv = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_loadu_si256(total.as_ptr().cast())),
                dv,
            );
            let mut out = [[0f32; 8]; 2];
            let f16_round =
                |v: __m256| _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
            _mm256_storeu_ps(out[0].as_mut_ptr(), f16_round(dv));
            _mm256_storeu_ps(out[1].as_mut_ptr(), f16_round(sv));
            d[b0..b0 + count].copy_from_slice(&out[0][..count]);
            s[b0..b0 + count].copy_from_slice(&out[1][..count]);
            sum[b0..b0 + count].copy_from_slice(&total[..count]);
            b0 += count;
        }
    }
}

/// max |x| over one block of 32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_amax(p: *const f32) -> f32 {
    // SAFETY: the caller passes a pointer to 32 readable f32s on a CPU with AVX2.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let abs = |i: usize| _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(i * 8)));
        let a = _mm256_max_ps(_mm256_max_ps(abs(0), abs(1)), _mm256_max_ps(abs(2), abs(3)));
        let m4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)))
    }
}

/// Quantizes one block of 32 with the inverse scale `id` into `q`; returns the sum of quants.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn quantize_block(p: *const f32, id: f32, q: *mut i8) -> i32 {
    // SAFETY: the caller passes 32 readable f32s at `p` and 32 writable bytes at `q`, on a CPU with AVX2.
    unsafe {
        let id = _mm256_set1_ps(id);
        let r = |i: usize| round_away(_mm256_loadu_ps(p.add(i * 8)), id);
        let (q0, q1, q2, q3) = (r(0), r(1), r(2), r(3));
        let t = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
        let t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
        let t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
        let total = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32::<1>(t2)));
        // Saturating packs give [q0 0..4, q1 0..4, q2 0..4, q3 0..4 | q0 4..8, ...] in dwords.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        _mm256_storeu_si256(q.cast(), _mm256_permutevar8x32_epi32(packed, perm));
        total
    }
}

/// `round_half_away(v * id)` on 8 lanes (clamped to the i8 range likewise).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn round_away(v: __m256, id: __m256) -> __m256i {
    let y = _mm256_mul_ps(v, id);
    let t = _mm256_cvttps_epi32(y);
    let frac = _mm256_sub_ps(y, _mm256_cvtepi32_ps(t));
    // The comparison masks are -1 where true.
    let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5)));
    let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, _mm256_set1_ps(-0.5)));
    let r = _mm256_add_epi32(_mm256_sub_epi32(t, up), down);
    // As in `round_half_away`: a no-op unless the block is degenerate.
    _mm256_min_epi32(
        _mm256_max_epi32(r, _mm256_set1_epi32(-128)),
        _mm256_set1_epi32(127),
    )
}
