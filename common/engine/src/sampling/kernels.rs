//! The full-vocabulary passes of the sampler (max, softmax denominator, the draw), written so the
//! compiler can vectorise them: every sampled token touches 50k-150k logits, and with batches of
//! sequences that is most of the sampler's time.
//!
//! `exp` is computed here with fixed IEEE operations instead of the platform's libm, so the
//! weights, and therefore the drawn token, are bit-identical on every node that runs this build:
//! libm implementations differ in the last bit between systems.

/// Independent accumulators per pass: wide enough for two AVX registers, with a fixed order of
/// additions, so the sums are reproducible and do not depend on what the compiler vectorised.
const LANES: usize = 8;
/// Tokens per block of the softmax denominator; the draw walks blocks, then one block.
pub(super) const BLOCK: usize = 1024;

/// `exp(x)` for `x <= 0` (Cephes' `expf` with Cody-Waite reduction), within about 1 ulp (relative
/// error under 1e-7).
///
/// Arguments below -87 (weight under 1.6e-38 of the top token's) give 0, and `exp(0)` is exactly
/// 1, which min-p relies on for the top token. -inf gives 0. It is monotone non-decreasing
/// (checked over every f32 in [-87, 0]; the test below checks where it would break, at the
/// reduction's boundaries): the filters rely on weights ordering tokens as their logits do.
#[inline(always)]
pub(super) fn exp_nonpos(x: f32) -> f32 {
    const LOW: f32 = -87.0;
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the mantissa's low bits.
    const MAGIC: f32 = 12_582_912.0;
    // ln 2 split in two: C1 = 355/512 has few bits, so `n * C1` is exact.
    const C1: f32 = 355.0 / 512.0;
    const C2: f32 = -2.121_944_4e-4;
    let xc = if x < LOW { LOW } else { x };
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // n is in [-126, 0], so 2^n is a normal float built straight from its exponent bits.
    let n_int = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x < LOW {
        0.0
    } else {
        e * scale
    }
}

/// The largest value, and whether any value is NaN or +inf (which no distribution can hold).
pub(super) fn max_and_check(xs: &[f32]) -> (f32, bool) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut bad = [false; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for ((m, bad), &x) in m.iter_mut().zip(bad.iter_mut()).zip(c) {
            *bad |= x.is_nan() | (x == f32::INFINITY);
            *m = if x > *m { x } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    let mut any_bad = false;
    for (&m, &b) in m.iter().zip(&bad) {
        max = if m > max { m } else { max };
        any_bad |= b;
    }
    for &x in rest {
        any_bad |= x.is_nan() | (x == f32::INFINITY);
        max = if x > max { x } else { max };
    }
    (max, any_bad)
}

/// Like [`max_and_check`], with the lowest index holding the max (the greedy token: ties go to
/// the lower id, as in llama.cpp). Each lane keeps the first index of its own max, so the
/// lowest index among the lanes that reach the overall max is the first one in the slice.
/// `xs` must be shorter than 2^32 (token ids are u32).
pub(super) fn argmax_and_check(xs: &[f32]) -> (f32, usize, bool) {
    let mut m = [f32::NEG_INFINITY; LANES];
    // u32 lanes, as wide as the f32 ones, keep this loop vectorised; ids are u32 anyway.
    let mut at = [0u32; LANES];
    let mut bad = [false; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for (c, base) in chunks.zip((0u32..).step_by(LANES)) {
        let lanes = m.iter_mut().zip(at.iter_mut()).zip(bad.iter_mut());
        for (((m, at), bad), (j, &x)) in lanes.zip((0u32..).zip(c)) {
            *bad |= x.is_nan() | (x == f32::INFINITY);
            let gt = x > *m;
            *m = if gt { x } else { *m };
            *at = if gt { base + j } else { *at };
        }
    }
    let (mut max, mut best, mut any_bad) = (f32::NEG_INFINITY, 0, false);
    for ((&m, &at), &b) in m.iter().zip(&at).zip(&bad) {
        any_bad |= b;
        if m > max || (m == max && (at as usize) < best) {
            (max, best) = (m, at as usize);
        }
    }
    let tail_start = xs.len() - rest.len();
    for (i, &x) in (tail_start..).zip(rest) {
        any_bad |= x.is_nan() | (x == f32::INFINITY);
        if x > max {
            (max, best) = (x, i);
        }
    }
    (max, best, any_bad)
}

/// The softmax weight of logit `l` at inverse temperature `inv_t`: `exp((l - max) * inv_t)`.
#[inline(always)]
pub(super) fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    exp_nonpos(scaled(l, max, inv_t))
}

/// The scaled logit `(l - max) * inv_t`, at most 0. A product rather than a division by the
/// temperature: division is several times slower in these loops, and both are deterministic
/// functions of the input, which is all reproducibility needs.
#[inline(always)]
pub(super) fn scaled(l: f32, max: f32, inv_t: f32) -> f32 {
    (l - max) * inv_t
}

/// `1 / temperature`, kept finite so that `0 * inv_t` stays 0 for the top token even when the
/// temperature is too small for its inverse to be represented.
pub(super) fn inverse_temperature(t: f32) -> f32 {
    let inv = 1.0 / t;
    if inv.is_finite() {
        inv
    } else {
        f32::MAX
    }
}

/// Calls `f(first_id, logits, weights)` for each [`BLOCK`] of `logits`, in order.
///
/// The weights go through a stack buffer on purpose: the compiler vectorises the loop that only
/// computes them (several times faster than libm's `expf`), but not a loop that also sums or
/// filters them.
pub(super) fn for_each_weight_block(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    mut f: impl FnMut(usize, &[f32], &[f32]),
) {
    let mut buf = [0f32; BLOCK];
    for (b, block) in logits.chunks(BLOCK).enumerate() {
        let n = block.len();
        let w = &mut buf[..n];
        for (w, &l) in w.iter_mut().zip(block) {
            *w = weight(l, max, inv_t);
        }
        f(b * BLOCK, block, w);
    }
}

/// The weights of `ls`, in a loop the compiler vectorises.
pub(super) fn weights(ls: &[f32], max: f32, inv_t: f32) -> Vec<f32> {
    let mut ws = vec![0f32; ls.len()];
    for (w, &l) in ws.iter_mut().zip(ls) {
        *w = weight(l, max, inv_t);
    }
    ws
}

/// Sum in f64 with independent lanes (vectorisable) and a fixed order of additions.
pub(super) fn lane_sum(ws: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = ws.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a += f64::from(w);
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for &w in rest {
        sum += f64::from(w);
    }
    sum
}

/// Sum of the weights that are at least `tau`.
pub(super) fn mass_at_least(ws: &[f32], tau: f32) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = ws.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a += f64::from(if w >= tau { w } else { 0.0 });
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for &w in rest {
        if w >= tau {
            sum += f64::from(w);
        }
    }
    sum
}

/// Sum of the weights of each [`BLOCK`]-sized block of `logits`, in f64 so a 150k-term
/// denominator keeps its precision.
pub(super) fn block_sums(logits: &[f32], max: f32, inv_t: f32) -> Vec<f64> {
    let mut sums = Vec::with_capacity(logits.len().div_ceil(BLOCK));
    for_each_weight_block(logits, max, inv_t, |_, _, w| sums.push(lane_sum(w)));
    sums
}

/// Index of the token that `target` (in `[0, sum of blocks)`) lands on when the weights are laid
/// end to end in id order. `None` only when every weight is zero.
pub(super) fn draw(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    blocks: &[f64],
    target: f64,
) -> Option<usize> {
    let mut acc = 0.0f64;
    let mut last_nonzero_block = None;
    for (b, &sum) in blocks.iter().enumerate() {
        if sum > 0.0 {
            last_nonzero_block = Some(b);
            if acc + sum > target {
                return draw_in_block(logits, max, inv_t, b, target - acc);
            }
        }
        acc += sum;
    }
    // Rounding put `target` past the last block: its last possible token is the right pick.
    draw_in_block(logits, max, inv_t, last_nonzero_block?, f64::INFINITY)
}

/// The walk inside block `b`; a target the in-block sums cannot reach (rounding differs from the
/// lane-wise block sum) picks the block's last token of non-zero weight.
fn draw_in_block(logits: &[f32], max: f32, inv_t: f32, b: usize, target: f64) -> Option<usize> {
    let start = b * BLOCK;
    let block = logits.get(start..logits.len().min(start + BLOCK))?;
    let mut acc = 0.0f64;
    let mut last = None;
    for (i, &l) in block.iter().enumerate() {
        let w = weight(l, max, inv_t);
        if w > 0.0 {
            acc += f64::from(w);
            last = Some(start + i);
            if acc > target {
                return last;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_exact_at_the_ends() {
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-100.0), 0.0);
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpos(x));
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
    }

    #[test]
    fn exp_is_monotone_across_the_reduction_boundaries() {
        for n in 0..=126 {
            let edge = -(n as f32 + 0.5) * std::f32::consts::LN_2;
            let mut x = f32::from_bits(edge.to_bits() + 2000).max(-87.0);
            let mut prev = exp_nonpos(x);
            for _ in 0..4000 {
                // For negative floats, a smaller bit pattern is a larger value.
                x = f32::from_bits(x.to_bits() - 1);
                if x.is_nan() || x >= 0.0 {
                    break;
                }
                let y = exp_nonpos(x);
                assert!(y >= prev, "exp({x}) = {y} < {prev}");
                prev = y;
            }
        }
    }

    #[test]
    fn max_and_check_finds_the_max_and_bad_values_anywhere() {
        let mut xs: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin()).collect();
        let want = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max_and_check(&xs), (want, false));
        for at in [0, 20, 36] {
            for bad in [f32::NAN, f32::INFINITY] {
                let saved = xs[at];
                xs[at] = bad;
                assert!(max_and_check(&xs).1, "{bad} at {at}");
                xs[at] = saved;
            }
        }
        assert_eq!(
            max_and_check(&[f32::NEG_INFINITY; 3]),
            (f32::NEG_INFINITY, false)
        );
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima_across_lanes_and_tail() {
        for len in [1, 7, 8, 9, 64, 1000] {
            for first in 0..len.min(20) {
                let mut xs = vec![0.5f32; len];
                for at in (first..len).step_by(3) {
                    xs[at] = 2.0;
                }
                assert_eq!(argmax_and_check(&xs), (2.0, first, false), "len {len}");
            }
        }
        assert!(argmax_and_check(&[1.0, f32::NAN, 3.0]).2);
        assert!(argmax_and_check(&[1.0; 20].map(|x: f32| x * f32::INFINITY)).2);
        assert_eq!(
            argmax_and_check(&[f32::NEG_INFINITY; 9]).0,
            f32::NEG_INFINITY
        );
    }

    #[test]
    fn draw_lands_on_the_token_under_the_target() {
        // Weights 1 at ids 1500 and 2500, all else zero: mass [0, 1) is id 1500, [1, 2) id 2500.
        let mut logits = vec![f32::NEG_INFINITY; 3000];
        logits[1500] = 0.0;
        logits[2500] = 0.0;
        let blocks = block_sums(&logits, 0.0, 1.0);
        assert_eq!(blocks, vec![0.0, 1.0, 1.0]);
        assert_eq!(draw(&logits, 0.0, 1.0, &blocks, 0.0), Some(1500));
        assert_eq!(draw(&logits, 0.0, 1.0, &blocks, 0.999), Some(1500));
        assert_eq!(draw(&logits, 0.0, 1.0, &blocks, 1.0), Some(2500));
        assert_eq!(draw(&logits, 0.0, 1.0, &blocks, 5.0), Some(2500));
        let none = vec![f32::NEG_INFINITY; 10];
        assert_eq!(
            draw(&none, 0.0, 1.0, &block_sums(&none, 0.0, 1.0), 0.0),
            None
        );
    }
}
