//! The truncation filters (top-k, top-p) and the top-n search behind reported logprobs, written
//! for 50k-150k vocabularies: they select a small head of the candidates instead of sorting all of
//! them. Candidates are integer keys whose order is total (logit, then lower id first), so results
//! do not depend on how an unstable sort or a selection happened to arrange equal elements.

use super::kernels::{lane_sum, mass_at_least, weight, weights};

/// The sign bit of an f32, and of the order-preserving form of its bits.
const SIGN: u32 = 0x8000_0000;

/// A candidate's sort key: a larger key is a more likely token, and equal logits rank the lower
/// id first, the order of greedy decoding. Filters select on these plain integers, which is
/// several times faster than comparing `(logit, id)` pairs, and it compares logits rather than
/// weights or scaled logits because rounding can merge those for distinct logits (then
/// `top_k = 1` could pick another token than greedy). `l` must not be NaN.
#[inline]
pub(super) fn key(id: u32, l: f32) -> u64 {
    // `+ 0.0` turns -0.0 into +0.0: greedy's `==` treats them as a tie, so must the key.
    let bits = (l + 0.0).to_bits();
    let ord = if bits & SIGN != 0 { !bits } else { bits | SIGN };
    (u64::from(ord) << 32) | u64::from(u32::MAX - id)
}

#[inline]
pub(super) fn key_id(k: u64) -> u32 {
    u32::MAX - k as u32
}

#[inline]
pub(super) fn key_logit(k: u64) -> f32 {
    let ord = (k >> 32) as u32;
    f32::from_bits(if ord & SIGN != 0 { ord & !SIGN } else { !ord })
}

/// The tokens that survive top-k, then top-p, then min-p, as keys in a canonical order: id order,
/// or most likely first. Both orders are fixed functions of the input, so every floating-point
/// sum over the candidates adds in a reproducible order.
///
/// Each filter keeps a most-likely prefix, and weights grow with logits, so each can name a
/// weight below which it would drop a token anyway. Only tokens above the largest such bound
/// are gathered; on 150k vocabularies that is usually a few hundred, and the selections below
/// then run on those instead of on the whole vocabulary.
pub(super) fn candidates(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
) -> Vec<u64> {
    let ws = weights(logits, max, inv_t);
    let total_all = lane_sum(&ws);
    let top_k_on = top_k > 0 && top_k < logits.len();
    let top_p_on = top_p < 1.0;
    // The smallest positive f32: weights below it are zero and can never be drawn.
    let mut floor = f32::from_bits(1);
    if top_k_on {
        floor = floor.max(top_k_bound(&ws, top_k));
    } else if top_p_on {
        floor = floor.max(top_p_bound(&ws, f64::from(top_p) * total_all));
    }
    // Min-p drops a least-likely suffix, which commutes with the other filters except when
    // top-p's mass must be taken over the whole top-k set, min-p's victims included.
    let min_p_first = !(top_k_on && top_p_on);
    if min_p_first {
        floor = floor.max(min_p);
    }

    let mut keys: Vec<u64> = Vec::new();
    for (id, (&w, &l)) in (0u32..).zip(ws.iter().zip(logits)) {
        if w >= floor {
            keys.push(key(id, l));
        }
    }
    let weight_of = |k: u64| weight(key_logit(k), max, inv_t);
    let sorted = keep_top_k(&mut keys, top_k);
    if top_p_on {
        let total = if top_k_on {
            keys.iter().map(|&k| f64::from(weight_of(k))).sum()
        } else {
            total_all
        };
        // A floor above the nucleus's edge leaves fewer candidates than the nucleus needs: then
        // the walk keeps them all, which is the nucleus cut by min-p, as wanted.
        keep_nucleus(&mut keys, top_p, total, sorted, weight_of);
    }
    if min_p > 0.0 && !min_p_first {
        // Weights are relative to the top token (weight exactly 1): this is `p >= min_p * p_max`.
        keys.retain(|&k| weight_of(k) >= min_p);
    }
    keys
}

/// A weight at or below the k-th largest: the k-th largest of an evenly spaced sample, which is
/// a subset. 0 when the vocabulary is too small for sampling to pay.
fn top_k_bound(ws: &[f32], k: usize) -> f32 {
    let m = k.saturating_mul(16).max(4096);
    if m.saturating_mul(2) > ws.len() {
        return 0.0;
    }
    let mut sample: Vec<f32> = ws.iter().step_by(ws.len() / m).copied().collect();
    if sample.len() < k {
        return 0.0;
    }
    sample.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    sample.get(k - 1).copied().unwrap_or(0.0)
}

/// A weight such that the tokens at or above it hold at least `target` of the mass, or 0.
fn top_p_bound(ws: &[f32], target: f64) -> f32 {
    [1e-3, 1e-6]
        .into_iter()
        .find(|&tau| mass_at_least(ws, tau) >= target)
        .unwrap_or(0.0)
}

fn descending(a: &u64, b: &u64) -> std::cmp::Ordering {
    b.cmp(a)
}

/// Keeps the `k` most likely candidates (0 = all). Returns whether `keys` is now sorted most
/// likely first; it is left untouched, in its original order, when the filter removes nothing.
pub(super) fn keep_top_k(keys: &mut Vec<u64>, k: usize) -> bool {
    if k == 0 || k >= keys.len() {
        return false;
    }
    keys.select_nth_unstable_by(k - 1, descending);
    keys.truncate(k);
    keys.sort_unstable_by(descending);
    true
}

/// Keeps the smallest most-likely prefix whose mass reaches `top_p` of `total`, the candidates'
/// mass (always at least one token). Leaves `keys` sorted most likely first.
///
/// Over a whole vocabulary the nucleus is usually small, so instead of sorting 150k candidates
/// this selects and sorts a growing head (256, 1024, ...) until it holds the nucleus.
pub(super) fn keep_nucleus(
    keys: &mut Vec<u64>,
    top_p: f32,
    total: f64,
    sorted: bool,
    weight: impl Fn(u64) -> f32,
) {
    let n = keys.len();
    if n == 0 {
        return;
    }
    let target = f64::from(top_p) * total;
    let mut head = if sorted { n } else { n.min(256) };
    loop {
        if !sorted {
            if head < n {
                keys.select_nth_unstable_by(head - 1, descending);
            }
            if let Some(prefix) = keys.get_mut(..head) {
                prefix.sort_unstable_by(descending);
            }
        }
        let mut acc = 0.0f64;
        for (i, &k) in keys.iter().take(head).enumerate() {
            acc += f64::from(weight(k));
            if acc >= target {
                keys.truncate(i + 1);
                return;
            }
        }
        // Only rounding can bring us here with the whole list scanned: then all of it is kept.
        if head >= n {
            return;
        }
        head = head.saturating_mul(4).min(n);
    }
}

/// The `n` best `(id, value)` pairs, best first, ties to the lower id, in one pass and O(n)
/// memory: n is at most 20, far too few to justify selecting over a copy of the vocabulary.
/// Entries at -inf (probability zero) are never listed.
pub(super) fn top_n(items: impl Iterator<Item = (u32, f32)>, n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return top;
    }
    let beats = |a: &(u32, f32), b: &(u32, f32)| a.1 > b.1 || (a.1 == b.1 && a.0 < b.0);
    // The value of the n-th entry once there are n: one comparison rejects most items.
    let mut worst = f32::NEG_INFINITY;
    for item in items {
        if item.1 < worst || item.1 == f32::NEG_INFINITY || item.1.is_nan() {
            continue;
        }
        if top.len() == n && top.last().is_some_and(|last| !beats(&item, last)) {
            continue;
        }
        let at = top.partition_point(|x| beats(x, &item));
        top.insert(at, item);
        top.truncate(n);
        if top.len() == n {
            worst = top.last().map_or(worst, |last| last.1);
        }
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys for tokens 0.. whose weight (relative probability) is `ws[id]`, at temperature 1.
    fn keys(ws: &[f32]) -> Vec<u64> {
        ws.iter()
            .enumerate()
            .map(|(i, &w)| key(i as u32, w.ln()))
            .collect()
    }

    fn weight_t1(k: u64) -> f32 {
        key_logit(k).exp()
    }

    fn ids(keys: &[u64]) -> Vec<u32> {
        keys.iter().map(|&k| key_id(k)).collect()
    }

    #[test]
    fn keys_order_by_logit_then_lower_id_and_round_trip() {
        let values = [f32::MIN, -3.5, -1e-40, -0.0, 0.0, 1e-40, 2.25, f32::MAX];
        for (i, &l) in values.iter().enumerate() {
            let k = key(i as u32 * 1000, l);
            assert_eq!(key_id(k), i as u32 * 1000);
            assert_eq!(key_logit(k), l + 0.0);
            if let Some(&next) = values.get(i + 1) {
                assert!(key(5, next) >= key(5, l), "{next} vs {l}");
            }
        }
        assert!(key(3, 1.0) > key(4, 1.0));
        assert!(key(9, 1.5) > key(0, 1.0));
        assert_eq!(key(7, -0.0), key(7, 0.0));
    }

    #[test]
    fn top_k_keeps_the_best_with_lower_ids_on_ties() {
        let mut k = keys(&[0.5, 1.0, 0.5, 0.25, 1.0]);
        assert!(keep_top_k(&mut k, 3));
        assert_eq!(ids(&k), vec![1, 4, 0]);
        let mut k = keys(&[0.5, 1.0]);
        assert!(!keep_top_k(&mut k, 0));
        assert!(!keep_top_k(&mut k, 2));
        assert_eq!(ids(&k), vec![0, 1]);
    }

    #[test]
    fn nucleus_is_the_smallest_prefix_reaching_top_p() {
        let ws = [0.125, 1.0, 0.5, 0.25, 0.125];
        // Total 2.0: 1.0 reaches 0.5 of it; 1.5 reaches 0.7; 1.75 reaches 0.8.
        for (p, want) in [(0.5, vec![1]), (0.7, vec![1, 2]), (0.8, vec![1, 2, 3])] {
            let mut k = keys(&ws);
            keep_nucleus(&mut k, p, 2.0, false, weight_t1);
            assert_eq!(ids(&k), want, "top_p {p}");
        }
    }

    #[test]
    fn nucleus_grows_its_head_past_the_first_selection() {
        // 2000 equal weights: the nucleus at 0.9 is 1800 tokens, more than the first 256-head.
        let mut k = keys(&[1.0; 2000]);
        keep_nucleus(&mut k, 0.9, 2000.0, false, weight_t1);
        assert_eq!(ids(&k), (0..1800).collect::<Vec<u32>>());
    }

    /// The filters done the obvious way: sort everything, cut, renormalise.
    fn reference(logits: &[f32], inv_t: f32, top_k: usize, top_p: f32, min_p: f32) -> Vec<u32> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut all: Vec<u64> = (0u32..)
            .zip(logits)
            .filter(|&(_, &l)| weight(l, max, inv_t) > 0.0)
            .map(|(id, &l)| key(id, l))
            .collect();
        all.sort_unstable_by(descending);
        let w = |k: u64| weight(key_logit(k), max, inv_t);
        if top_k > 0 && top_k < logits.len() {
            all.truncate(top_k);
        }
        if top_p < 1.0 {
            let total: f64 = if top_k > 0 && top_k < logits.len() {
                all.iter().map(|&k| f64::from(w(k))).sum()
            } else {
                lane_sum(&weights(logits, max, inv_t))
            };
            let mut acc = 0.0;
            if let Some(cut) = all.iter().position(|&k| {
                acc += f64::from(w(k));
                acc >= f64::from(top_p) * total
            }) {
                all.truncate(cut + 1);
            }
        }
        all.retain(|&k| w(k) >= min_p);
        let mut ids = ids(&all);
        ids.sort_unstable();
        ids
    }

    #[test]
    fn candidates_match_the_obvious_implementation() {
        let n = 20_000;
        let noise = |seed: u64, i: u64| crate::sampling::uniform_for_position(seed, i) as f32;
        for seed in 0..6u64 {
            // Peaked (a few strong tokens over a wide spread), flat, and with masked tokens.
            let logits: Vec<f32> = (0..n as u64)
                .map(|i| match seed % 3 {
                    0 => noise(seed, i) * 30.0 + if i % 997 == 5 { 25.0 } else { 0.0 },
                    1 => noise(seed, i) * 2.0,
                    _ if i % 3 == 0 => f32::NEG_INFINITY,
                    _ => noise(seed, i) * 10.0,
                })
                .collect();
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            for (t, top_k, top_p, min_p) in [
                (1.0, 40, 1.0, 0.0),
                (0.7, 1, 1.0, 0.0),
                (1.0, 600, 1.0, 0.0),
                (1.0, 0, 0.9, 0.0),
                (1.3, 0, 0.5, 0.0),
                (1.0, 0, 1.0, 0.05),
                (1.0, 50, 0.95, 0.05),
                (0.8, 300, 0.8, 0.0),
                (1.0, 0, 0.99, 0.3),
                (1.0, 5000, 1.0, 0.01),
                // Top-p's mass is over all of the top-k set, including min-p's victims.
                (1.0, 5000, 0.5, 0.3),
            ] {
                let inv_t = 1.0 / t;
                let mut got = ids(&candidates(&logits, max, inv_t, top_k, top_p, min_p));
                got.sort_unstable();
                let want = reference(&logits, inv_t, top_k, top_p, min_p);
                assert_eq!(
                    got, want,
                    "seed {seed} t {t} k {top_k} p {top_p} min_p {min_p}"
                );
            }
        }
    }

    #[test]
    fn top_n_is_sorted_with_lower_ids_first_and_skips_impossible_tokens() {
        let items = [2.0, f32::NEG_INFINITY, 3.0, 2.0, 1.0, 3.0];
        let top = top_n(items.iter().enumerate().map(|(i, &v)| (i as u32, v)), 4);
        assert_eq!(top, vec![(2, 3.0), (5, 3.0), (0, 2.0), (3, 2.0)]);
        let all = top_n([(0, 1.0), (1, f32::NEG_INFINITY)].into_iter(), 5);
        assert_eq!(all, vec![(0, 1.0)]);
        assert!(top_n([(0, 1.0)].into_iter(), 0).is_empty());
    }
}
