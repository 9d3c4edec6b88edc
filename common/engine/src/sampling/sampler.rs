//! Picks the next token from one row of logits. The sampler is a pure function of the logits, the
//! parameters, the token history and the request's seed: the randomness for output position `i`
//! is derived from `(seed, i)` alone, so a request resumed on another node after a fault draws
//! exactly the tokens it would have drawn. Processing follows vLLM: penalties, temperature, top-k,
//! top-p, min-p, then a draw from the softmax of what is left.

use std::borrow::Cow;

use super::filters::{candidates, key_id, key_logit, top_n};
use super::kernels::{
    argmax_and_check, block_sums, draw, inverse_temperature, lane_sum, max_and_check, scaled,
    weights,
};
use super::params::SamplingParams;
use super::penalties::{apply_penalties, penalties_are_neutral};
use crate::{Error, Result};

/// What the sampler needs to know about the request besides its parameters.
#[derive(Debug, Clone, Copy)]
pub struct SampleContext<'a> {
    pub prompt_ids: &'a [u32],
    pub generated_ids: &'a [u32],
    /// The random seed of this request (the caller fills a random one when the user gave none).
    pub seed: u64,
}

/// The chosen token and its log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// Log-probability of the chosen token under the processed distribution (after penalties and
    /// temperature and the filters; for greedy, the log-softmax of the penalised logits).
    pub logprob: f32,
    /// The top-n `(id, logprob)` pairs under the same distribution when `params.logprobs` is
    /// `Some(n)`, most likely first (ties by lower id). Tokens the filters removed have
    /// probability zero and are not listed, so there may be fewer than n.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// SplitMix64's finaliser: a bijection on u64 with good avalanche, cheap enough to run per token.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_133F_11EB);
    z ^ (z >> 31)
}

/// The uniform draw in [0, 1) for output position `position` of a request seeded with `seed`.
///
/// It is computed here rather than taken from `rand`'s `StdRng`, whose algorithm `rand` reserves
/// the right to change between versions: two nodes built at different times must still agree.
pub fn uniform_for_position(seed: u64, position: u64) -> f64 {
    let bits = splitmix64(seed ^ splitmix64(position));
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Chooses the next token. Fails, never panics, on empty logits, NaN or +inf logits, logits that
/// are all -inf, out-of-range parameters and history ids outside the vocabulary.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    ctx: &SampleContext<'_>,
) -> Result<SampledToken> {
    if logits.is_empty() {
        return Err(Error::invalid("cannot sample from empty logits"));
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(Error::invalid("more logits than u32 token ids can name"));
    }
    params.validate_numbers()?;
    let logits: Cow<'_, [f32]> = if penalties_are_neutral(params) {
        Cow::Borrowed(logits)
    } else {
        let mut owned = logits.to_vec();
        apply_penalties(&mut owned, params, ctx.prompt_ids, ctx.generated_ids)?;
        Cow::Owned(owned)
    };
    let (max, best, bad) = if params.is_greedy() {
        argmax_and_check(&logits)
    } else {
        let (max, bad) = max_and_check(&logits);
        (max, 0, bad)
    };
    if bad {
        return Err(Error::invalid("logits contain NaN or +inf"));
    }
    if max == f32::NEG_INFINITY {
        return Err(Error::invalid(
            "every logit is -inf; no token can be sampled",
        ));
    }
    let n_top = params.logprobs.unwrap_or(0) as usize;

    if params.is_greedy() {
        // The logprobs are those of temperature 1, as vLLM reports them.
        let log_z = block_sums(&logits, max, 1.0).iter().sum::<f64>().ln();
        return Ok(SampledToken {
            id: best as u32,
            logprob: logprob(max, max, 1.0, log_z),
            top_logprobs: top_logprobs(ids_and_logits(&logits), n_top, max, 1.0, log_z),
        });
    }

    let inv_t = inverse_temperature(params.temperature);
    let u = uniform_for_position(ctx.seed, ctx.generated_ids.len() as u64);
    let vocab = logits.len();
    let top_k = params.top_k as usize;
    let filters_on = (top_k > 0 && top_k < vocab) || params.top_p < 1.0 || params.min_p > 0.0;

    if !filters_on {
        // The whole vocabulary is the candidate set: two passes in id order, no large allocation.
        let blocks = block_sums(&logits, max, inv_t);
        let total: f64 = blocks.iter().sum();
        let id = draw(&logits, max, inv_t, &blocks, u * total)
            .ok_or_else(|| Error::invalid("no token has a non-zero probability"))?;
        let log_z = total.ln();
        let l = logits.get(id).copied().unwrap_or(max);
        return Ok(SampledToken {
            id: id as u32,
            logprob: logprob(l, max, inv_t, log_z),
            top_logprobs: top_logprobs(ids_and_logits(&logits), n_top, max, inv_t, log_z),
        });
    }

    let keys = candidates(&logits, max, inv_t, top_k, params.top_p, params.min_p);
    let ls: Vec<f32> = keys.iter().map(|&k| key_logit(k)).collect();
    let ws = weights(&ls, max, inv_t);
    let total = lane_sum(&ws);
    let target = u * total;
    let mut acc = 0.0f64;
    let mut chosen = None;
    for (i, &w) in ws.iter().enumerate() {
        if w > 0.0 {
            acc += f64::from(w);
            chosen = Some(i);
            if acc > target {
                break;
            }
        }
    }
    // Rounding can leave `acc` a hair under `target`; the last candidate is then the right pick.
    let (id, l) = chosen
        .and_then(|i| Some((key_id(*keys.get(i)?), *ls.get(i)?)))
        .ok_or_else(|| Error::invalid("no token left to sample after filtering"))?;
    let log_z = total.ln();
    Ok(SampledToken {
        id,
        logprob: logprob(l, max, inv_t, log_z),
        top_logprobs: top_logprobs(
            keys.iter().zip(&ls).map(|(&k, &l)| (key_id(k), l)),
            n_top,
            max,
            inv_t,
            log_z,
        ),
    })
}

/// The `n` most likely tokens under the model's own distribution (the log-softmax of the raw
/// logits: no penalties, temperature or filters), best first, ties to the lower id: what beam
/// search extends a beam by. Fails as [`sample`] does on logits no distribution can hold.
pub fn model_top_logprobs(logits: &[f32], n: usize) -> Result<Vec<(u32, f32)>> {
    if u32::try_from(logits.len()).is_err() {
        return Err(Error::invalid("more logits than u32 token ids can name"));
    }
    let (max, bad) = max_and_check(logits);
    if bad {
        return Err(Error::invalid("logits contain NaN or +inf"));
    }
    if max == f32::NEG_INFINITY {
        return Err(Error::invalid("every logit is -inf (or there are none)"));
    }
    let log_z = block_sums(logits, max, 1.0).iter().sum::<f64>().ln();
    Ok(top_logprobs(ids_and_logits(logits), n, max, 1.0, log_z))
}

/// `log softmax` of logit `l` at inverse temperature `inv_t`, given the log of the denominator
/// relative to `max`.
fn logprob(l: f32, max: f32, inv_t: f32, log_z: f64) -> f32 {
    (f64::from(scaled(l, max, inv_t)) - log_z) as f32
}

fn top_logprobs(
    items: impl Iterator<Item = (u32, f32)>,
    n: usize,
    max: f32,
    inv_t: f32,
    log_z: f64,
) -> Vec<(u32, f32)> {
    top_n(items, n)
        .into_iter()
        .map(|(id, l)| (id, logprob(l, max, inv_t, log_z)))
        .collect()
}

fn ids_and_logits(logits: &[f32]) -> impl Iterator<Item = (u32, f32)> + '_ {
    logits.iter().enumerate().map(|(i, &l)| (i as u32, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(generated: &[u32], seed: u64) -> SampleContext<'_> {
        SampleContext {
            prompt_ids: &[],
            generated_ids: generated,
            seed,
        }
    }

    fn temp(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            ..SamplingParams::default()
        }
    }

    /// Draws at positions 0..n (history of that length) and counts the chosen ids.
    fn histogram(logits: &[f32], p: &SamplingParams, n: usize) -> Vec<usize> {
        let history = vec![0u32; n];
        let mut counts = vec![0; logits.len()];
        for pos in 0..n {
            let tok = sample(logits, p, &ctx(&history[..pos], 7)).unwrap();
            counts[tok.id as usize] += 1;
        }
        counts
    }

    fn pseudo_logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n as u64)
            .map(|i| uniform_for_position(seed, i) as f32 * scale)
            .collect()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_tie_break() {
        let logits = [1.0, 3.0, 0.0, 3.0, 2.0];
        let p = SamplingParams {
            logprobs: Some(2),
            ..temp(0.0)
        };
        let tok = sample(&logits, &p, &ctx(&[], 1)).unwrap();
        assert_eq!(tok.id, 1);
        let z: f32 = logits.iter().map(|l| (l - 3.0f32).exp()).sum();
        assert!((tok.logprob + z.ln()).abs() < 1e-6);
        assert_eq!(tok.top_logprobs.len(), 2);
        assert_eq!((tok.top_logprobs[0].0, tok.top_logprobs[1].0), (1, 3));
        let mut rev = logits;
        rev.reverse();
        assert_eq!(sample(&rev, &p, &ctx(&[], 1)).unwrap().id, 1);
    }

    #[test]
    fn same_seed_and_position_give_the_same_token_and_positions_differ() {
        let logits = vec![0.0f32; 100];
        let p = SamplingParams::default();
        let history: Vec<u32> = (0..300).map(|i| i % 100).collect();
        let mut seen = std::collections::BTreeSet::new();
        for pos in 0..300 {
            let a = sample(&logits, &p, &ctx(&history[..pos], 42)).unwrap();
            // Another history of the same length: a resumed request on another node.
            let other = vec![5u32; pos];
            let b = sample(&logits, &p, &ctx(&other, 42)).unwrap();
            assert_eq!(a, b);
            seen.insert(a.id);
        }
        assert!(seen.len() > 80, "only {} distinct tokens", seen.len());
        let differ = (0..100)
            .filter(|&pos| {
                let h = &history[..pos];
                sample(&logits, &p, &ctx(h, 1)).unwrap().id
                    != sample(&logits, &p, &ctx(h, 2)).unwrap().id
            })
            .count();
        assert!(differ > 80, "seeds 1 and 2 agree too often: {differ}");
    }

    #[test]
    fn draws_follow_the_softmax_and_low_temperature_concentrates() {
        let logits: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        let counts = histogram(&logits, &temp(1.0), 4000);
        for (c, want) in counts.iter().zip([0.6, 0.3, 0.1]) {
            assert!((*c as f64 / 4000.0 - want).abs() < 0.03, "{counts:?}");
        }
        let counts = histogram(&logits, &temp(0.1), 1000);
        assert!(counts[0] > 995, "{counts:?}");
        let counts = histogram(&logits, &temp(3.0), 1000);
        assert!(counts[2] > 200, "{counts:?}");
    }

    #[test]
    fn top_k_one_and_tiny_top_p_equal_greedy() {
        let mut logits = pseudo_logits(1000, 3, 10.0);
        logits[400] = 20.0;
        logits[17] = 20.0;
        let greedy = sample(&logits, &temp(0.0), &ctx(&[], 0)).unwrap().id;
        assert_eq!(greedy, 17);
        let top_k = SamplingParams {
            top_k: 1,
            ..temp(5.0)
        };
        let top_p = SamplingParams {
            top_p: 1e-6,
            ..temp(5.0)
        };
        for seed in 0..50 {
            assert_eq!(sample(&logits, &top_k, &ctx(&[], seed)).unwrap().id, greedy);
            assert_eq!(sample(&logits, &top_p, &ctx(&[], seed)).unwrap().id, greedy);
        }
    }

    #[test]
    fn top_k_top_p_and_min_p_filter() {
        let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.06, 0.04]
            .iter()
            .map(|p| p.ln())
            .collect();
        let cases = [
            (3, 1.0, 0.0, 3), // top-k keeps 3
            (0, 0.6, 0.0, 2), // 0.4 + 0.3 >= 0.6
            (0, 1.0, 0.2, 3), // 0.4 * 0.2 = 0.08 drops 0.06 and 0.04
            (4, 0.8, 0.0, 3), // renormalised over top 4: 0.75 < 0.8 <= 0.95
            (4, 1.0, 0.6, 2), // min-p after top-k: 0.24 cuts 0.2
        ];
        for (top_k, top_p, min_p, kept) in cases {
            let p = SamplingParams {
                top_k,
                top_p,
                min_p,
                logprobs: Some(5),
                ..temp(1.0)
            };
            let counts = histogram(&logits, &p, 600);
            assert!(counts[..kept].iter().all(|&c| c > 0), "{counts:?}");
            assert!(counts[kept..].iter().all(|&c| c == 0), "{counts:?}");
            let tok = sample(&logits, &p, &ctx(&[], 9)).unwrap();
            assert_eq!(tok.top_logprobs.len(), kept);
            let mass: f32 = tok.top_logprobs.iter().map(|(_, l)| l.exp()).sum();
            assert!((mass - 1.0).abs() < 1e-5, "{mass}");
        }
    }

    #[test]
    fn repetition_penalty_demotes_a_repeated_token() {
        let logits = [2.0f32, 1.5, 0.0];
        let p = temp(0.0);
        let c = SampleContext {
            prompt_ids: &[0, 2],
            generated_ids: &[],
            seed: 0,
        };
        assert_eq!(sample(&logits, &p, &c).unwrap().id, 0);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..p
        };
        assert_eq!(sample(&logits, &p, &c).unwrap().id, 1);
        // The penalised logits define the greedy logprob too: token 0 now has logit 1.0.
        let tok = sample(&logits, &p, &c).unwrap();
        let z = 1.0f32.exp() + 1.5f32.exp() + 1.0;
        assert!((tok.logprob - (1.5 - z.ln())).abs() < 1e-6);
    }

    #[test]
    fn model_top_logprobs_are_the_greedy_samples_logprobs() {
        let logits = pseudo_logits(500, 11, 4.0);
        let greedy = SamplingParams {
            temperature: 0.0,
            logprobs: Some(6),
            ..SamplingParams::default()
        };
        let t = sample(&logits, &greedy, &ctx(&[], 0)).unwrap();
        let top = model_top_logprobs(&logits, 6).unwrap();
        assert_eq!(top, t.top_logprobs);
        assert_eq!(top[0], (t.id, t.logprob));
        assert!(model_top_logprobs(&[f32::NAN, 0.0], 1).is_err());
        assert!(model_top_logprobs(&[], 1).is_err());
        assert_eq!(model_top_logprobs(&[0.0, 0.0, -1.0], 9).unwrap().len(), 3);
    }

    #[test]
    fn logprobs_sum_to_one_and_are_sorted() {
        let logits = pseudo_logits(8, 11, 4.0);
        let p = SamplingParams {
            logprobs: Some(8),
            ..temp(1.0)
        };
        for pos in 0..20 {
            let history = vec![0u32; pos];
            let tok = sample(&logits, &p, &ctx(&history, 5)).unwrap();
            assert_eq!(tok.top_logprobs.len(), 8);
            let mass: f64 = tok
                .top_logprobs
                .iter()
                .map(|(_, l)| f64::from(*l).exp())
                .sum();
            assert!((mass - 1.0).abs() < 1e-5, "{mass}");
            assert!(tok.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
            let own = tok.top_logprobs.iter().find(|(id, _)| *id == tok.id);
            assert_eq!(own.map(|x| x.1), Some(tok.logprob));
        }
        let tok = sample(
            &logits,
            &SamplingParams {
                logprobs: Some(3),
                ..p
            },
            &ctx(&[], 5),
        );
        assert_eq!(tok.unwrap().top_logprobs.len(), 3);
    }

    #[test]
    fn nucleus_search_over_a_large_vocab_matches_the_fully_sorted_path() {
        // Flat logits make the nucleus huge (growth to the whole vocab), peaked ones a few hundred.
        for (scale, top_p) in [(1.0, 0.9), (12.0, 0.5)] {
            let logits = pseudo_logits(50_000, 21, scale);
            let grown = SamplingParams { top_p, ..temp(1.0) };
            // top_k = vocab - 1 sorts every candidate first and then scans the sorted list.
            let sorted = SamplingParams {
                top_k: 49_999,
                ..grown.clone()
            };
            for pos in 0..20 {
                let h = vec![0u32; pos];
                let a = sample(&logits, &grown, &ctx(&h, 3)).unwrap();
                let b = sample(&logits, &sorted, &ctx(&h, 3)).unwrap();
                assert_eq!(a.id, b.id);
                assert!((a.logprob - b.logprob).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let p = SamplingParams::default();
        let c = ctx(&[], 0);
        assert!(sample(&[], &p, &c).is_err());
        assert!(sample(&[1.0, f32::NAN], &p, &c).is_err());
        assert!(sample(&[1.0, f32::INFINITY], &temp(0.0), &c).is_err());
        assert!(sample(&[f32::NEG_INFINITY; 4], &p, &c).is_err());
        assert!(sample(&[0.0; 4], &temp(-1.0), &c).is_err());
        let rep = SamplingParams {
            repetition_penalty: 1.5,
            ..p.clone()
        };
        assert!(sample(&[0.0; 4], &rep, &ctx(&[7], 0)).is_err());
        // Masked tokens are fine as long as one is left, and are never drawn.
        let masked = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        for seed in 0..20 {
            let tok = sample(
                &masked,
                &SamplingParams {
                    top_p: 0.5,
                    ..p.clone()
                },
                &ctx(&[], seed),
            );
            assert_eq!(tok.unwrap().id, 1);
        }
        // Extreme temperatures and logits stay finite.
        let tok = sample(&[f32::MAX, f32::MIN, 0.0], &temp(1e-30), &c).unwrap();
        assert_eq!(tok.id, 0);
        assert!(sample(&[1.0, 2.0], &temp(1e30), &c)
            .unwrap()
            .logprob
            .is_finite());
    }
}
