//! Repetition, presence and frequency penalties, applied to a copy of the logits before any
//! temperature or filtering (vLLM's order). The repetition penalty follows Hugging Face (every
//! token seen in the prompt or the output, once per token id); presence and frequency follow
//! OpenAI and look at generated tokens only.

use super::params::SamplingParams;
use crate::{Error, Result};

/// Whether the penalties would leave the logits unchanged, so the sampler can skip copying them.
pub fn penalties_are_neutral(params: &SamplingParams) -> bool {
    params.repetition_penalty == 1.0
        && params.presence_penalty == 0.0
        && params.frequency_penalty == 0.0
}

/// Applies the penalties of `params` to `logits` in place.
///
/// A finite logit stays finite (saturating at the f32 range), so a strong penalty can demote a
/// token but never masks it out nor makes it infinitely likely. Token ids outside the vocabulary
/// are an error rather than silently ignored: they mean the history and the logits disagree.
pub fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    prompt_ids: &[u32],
    generated_ids: &[u32],
) -> Result<()> {
    let vocab = logits.len();
    let check = |id: u32| -> Result<usize> {
        let i = id as usize;
        if i < vocab {
            Ok(i)
        } else {
            Err(Error::invalid(format!(
                "token id {id} in the history is outside the vocabulary (ids 0..{vocab})"
            )))
        }
    };

    let rep = params.repetition_penalty;
    if rep != 1.0 {
        // A bitmap dedups the history in O(history + vocab/64) without hashing: prompts can be
        // long, and HF applies the penalty once per distinct token however often it occurs.
        let mut seen = vec![0u64; vocab.div_ceil(64)];
        for &id in prompt_ids.iter().chain(generated_ids) {
            let i = check(id)?;
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            if let Some(w) = seen.get_mut(word) {
                if *w & bit == 0 {
                    *w |= bit;
                    if let Some(l) = logits.get_mut(i) {
                        *l = saturate(*l, if *l > 0.0 { *l / rep } else { *l * rep });
                    }
                }
            }
        }
    }

    let (presence, frequency) = (params.presence_penalty, params.frequency_penalty);
    if (presence != 0.0 || frequency != 0.0) && !generated_ids.is_empty() {
        // Sorting a copy turns counting into run lengths; outputs are short, and unlike a hash map
        // the result does not depend on any hasher state.
        let mut ids = generated_ids.to_vec();
        ids.sort_unstable();
        for run in ids.chunk_by(|a, b| a == b) {
            let i = check(run[0])?;
            if let Some(l) = logits.get_mut(i) {
                let penalty = frequency * run.len() as f32 + presence;
                *l = saturate(*l, *l - penalty);
            }
        }
    }
    Ok(())
}

/// Keeps a finite logit finite; infinite and NaN inputs pass through for the sampler to judge.
fn saturate(before: f32, after: f32) -> f32 {
    if before.is_finite() && !after.is_finite() {
        if after > 0.0 {
            f32::MAX
        } else {
            f32::MIN
        }
    } else {
        after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rep: f32, presence: f32, frequency: f32) -> SamplingParams {
        SamplingParams {
            repetition_penalty: rep,
            presence_penalty: presence,
            frequency_penalty: frequency,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn neutral_detection() {
        assert!(penalties_are_neutral(&SamplingParams::default()));
        assert!(!penalties_are_neutral(&params(1.1, 0.0, 0.0)));
        assert!(!penalties_are_neutral(&params(1.0, 0.1, 0.0)));
        assert!(!penalties_are_neutral(&params(1.0, 0.0, -0.1)));
    }

    #[test]
    fn presence_and_frequency_math_is_exact() {
        let mut logits = vec![1.0, 2.0, 3.0, 4.0];
        // Token 1 twice, token 2 once; the prompt must not count for these penalties.
        apply_penalties(&mut logits, &params(1.0, 0.25, 0.5), &[3, 3, 3], &[1, 2, 1]).unwrap();
        assert_eq!(
            logits,
            vec![1.0, 2.0 - 2.0 * 0.5 - 0.25, 3.0 - 0.5 - 0.25, 4.0]
        );

        let mut logits = vec![1.0, 2.0, 3.0];
        apply_penalties(&mut logits, &params(1.0, -1.0, 0.0), &[], &[0, 0, 0]).unwrap();
        assert_eq!(logits, vec![2.0, 2.0, 3.0]);
    }

    #[test]
    fn repetition_divides_positive_and_multiplies_negative_once_per_id() {
        let mut logits = vec![2.0, 1.5, -1.0, 0.5];
        // Token 0 is seen three times, in prompt and output: still penalised once.
        apply_penalties(&mut logits, &params(2.0, 0.0, 0.0), &[0, 2, 0], &[0]).unwrap();
        assert_eq!(logits, vec![1.0, 1.5, -2.0, 0.5]);
    }

    #[test]
    fn all_three_in_vllm_order() {
        let mut logits = vec![4.0, -2.0];
        apply_penalties(&mut logits, &params(2.0, 0.5, 1.0), &[1], &[0, 0]).unwrap();
        // Token 0: 4 / 2 = 2, then - 2 * 1.0 - 0.5. Token 1: prompt only, -2 * 2.
        assert_eq!(logits, vec![-0.5, -4.0]);
    }

    #[test]
    fn out_of_vocab_history_is_an_error() {
        let mut logits = vec![0.0; 4];
        assert!(apply_penalties(&mut logits, &params(1.2, 0.0, 0.0), &[4], &[]).is_err());
        assert!(apply_penalties(&mut logits, &params(1.0, 0.0, 1.0), &[], &[9]).is_err());
    }

    #[test]
    fn strong_penalties_saturate_instead_of_overflowing() {
        let mut logits = vec![3.0e38, -3.0e38, f32::NEG_INFINITY];
        apply_penalties(&mut logits, &params(1e-3, 0.0, 0.0), &[0], &[]).unwrap();
        apply_penalties(&mut logits, &params(10.0, 0.0, 0.0), &[1, 2], &[]).unwrap();
        assert_eq!(logits, vec![f32::MAX, f32::MIN, f32::NEG_INFINITY]);
    }
}
