//! Activations quantized per 32-value block for the quantized matmuls, as llama.cpp does:
//! rows split across threads when there are enough (rows are independent, so the split changes
//! nothing in the result).

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{scalar::quantize_scalar, ActQuant, Level, MIN_PAR_QUANT, QK};

/// Quantizes the `m` rows of `x` to Q8_1 / Q8_0 blocks (the quants are the same; `s` is only
/// read for Q4_1 weights, `sum` only for the others).
pub(super) fn quantize_activations(
    level: Level,
    x: &[f32],
    m: usize,
    k: usize,
    aq: &mut ActQuant,
    parallel: bool,
) {
    let nb = k / QK;
    aq.qs.resize(m * k, 0);
    aq.d.resize(m * nb, 0.0);
    aq.s.resize(m * nb, 0.0);
    aq.sum.resize(m * nb, 0);
    let quantize = |x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], sum: &mut [i32]| {
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 + FMA + F16C were detected on this CPU; the slices hold the same
            // number of blocks.
            Level::Avx2 | Level::Avx512Vnni => unsafe { x86::quantize_avx2(x, qs, d, s, sum) },
            _ => quantize_scalar(x, qs, d, s, sum),
        }
    };
    if !parallel || m == 1 || m * k < MIN_PAR_QUANT {
        quantize(x, &mut aq.qs, &mut aq.d, &mut aq.s, &mut aq.sum);
        return;
    }
    // Rows are independent, so splitting them changes nothing in the result.
    let rows = m.div_ceil(rayon::current_num_threads() * 2);
    aq.qs
        .par_chunks_mut(rows * k)
        .zip(aq.d.par_chunks_mut(rows * nb))
        .zip(aq.s.par_chunks_mut(rows * nb))
        .zip(aq.sum.par_chunks_mut(rows * nb))
        .zip(x.par_chunks(rows * k))
        .for_each(|((((qs, d), s), sum), x)| quantize(x, qs, d, s, sum));
}
