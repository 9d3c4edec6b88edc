//! Speculative decoding, configured as vLLM's `--speculative-config`.
//!
//! A decoding sequence that finds a draft runs its last sampled token and up to
//! `num_speculative_tokens` drafted tokens through the model in one step, with logits at every
//! one of those positions. Row `i` is sampled exactly as plain decoding would sample the token
//! after the first `i` drafts (same logits, same history, same seeded draw for that output
//! position), and drafts are accepted while they equal what was sampled; the first sample that
//! differs (or the one after the last draft) is kept as well, so every step yields at least one
//! token. The KV written for rejected drafts lies past what the sequence counts as computed: it
//! is overwritten by the next step and never enters the prefix cache.
//!
//! Drafts here are deterministic (prompt lookup proposes one token per position; a draft model
//! proposes its greedy choice), so the draft distribution is a point mass `q = δ(x)` and the rejection rule of speculative sampling,
//! "accept with probability min(1, p(x)/q(x)), else draw from max(p − q, 0) renormalised",
//! is exactly "draw y from p; accept if y = x, else emit y": the output has the target
//! distribution, and with a seed it is the very output plain decoding gives, token for token.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How drafts are proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpeculativeMethod {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    /// last n tokens, in its own prompt and output.
    Ngram,
    /// A smaller model with the same vocabulary (`model`), run by the engine beside the target
    /// with a paged cache of its own, proposes its greedy continuation.
    DraftModel,
}

/// `--speculative-config`: a JSON object with vLLM's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeConfig {
    pub method: SpeculativeMethod,
    /// Most tokens drafted per sequence and step.
    pub num_speculative_tokens: usize,
    /// Longest n-gram looked up (vLLM's default: 5, or `prompt_lookup_min` when only that is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_lookup_max: Option<usize>,
    /// Shortest n-gram looked up (default: `prompt_lookup_max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_lookup_min: Option<usize>,
    /// No drafting while more sequences than this run (vLLM's key): where a step is bound by
    /// compute rather than by reading the weights, verifying drafts of a large batch costs more
    /// than it yields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_by_batch_size: Option<usize>,
    /// The draft model of the `draft_model` method: a GGUF file, a Hugging Face folder or
    /// `dummy:<shape>`, as `--model` takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Most tokens one step may draft for a sequence: the verification pass grows with it.
pub const MAX_SPECULATIVE_TOKENS: usize = 32;

impl SpeculativeConfig {
    /// `(min, max)` n-gram lengths, vLLM's defaults filled in.
    pub fn lookup_range(&self) -> (usize, usize) {
        match (self.prompt_lookup_min, self.prompt_lookup_max) {
            (None, None) => (5, 5),
            (Some(min), None) => (min, min),
            (None, Some(max)) => (max, max),
            (Some(min), Some(max)) => (min, max),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let k = self.num_speculative_tokens;
        if k == 0 || k > MAX_SPECULATIVE_TOKENS {
            return Err(Error::invalid(format!(
                "speculative config: num_speculative_tokens must be in 1..={MAX_SPECULATIVE_TOKENS}, got {k}"
            )));
        }
        match (self.method, &self.model) {
            (SpeculativeMethod::DraftModel, None) => {
                return Err(Error::invalid(
                    "speculative config: method draft_model needs `model`, the draft model",
                ))
            }
            (SpeculativeMethod::Ngram, Some(_)) => {
                return Err(Error::invalid(
                    "speculative config: `model` is for method draft_model; ngram drafts from the prompt",
                ))
            }
            _ => {}
        }
        let lookup = self.prompt_lookup_min.is_some() || self.prompt_lookup_max.is_some();
        if self.method == SpeculativeMethod::DraftModel && lookup {
            return Err(Error::invalid(
                "speculative config: prompt_lookup_min/max are for method ngram",
            ));
        }
        let (min, max) = self.lookup_range();
        if min == 0 || min > max {
            return Err(Error::invalid(format!(
                "speculative config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min} and {max}"
            )));
        }
        Ok(())
    }

    /// The tokens prompt lookup proposes to follow `tokens` (at most `limit`, possibly none).
    pub fn propose<'a>(&self, tokens: &'a [u32], limit: usize) -> &'a [u32] {
        let (min, max) = self.lookup_range();
        propose_ngram(tokens, min, max, self.num_speculative_tokens.min(limit))
    }
}

impl FromStr for SpeculativeConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(s)
            .map_err(|e| Error::invalid(format!("speculative config `{s}`: {e}")))?;
        config.validate()?;
        Ok(config)
    }
}

/// Prompt lookup: for n from `max_n` down to `min_n`, the latest earlier occurrence of the last
/// n tokens of `tokens`; what followed it (up to `k` tokens) is the draft. Empty when no n-gram
/// recurs.
pub fn propose_ngram(tokens: &[u32], min_n: usize, max_n: usize, k: usize) -> &[u32] {
    let len = tokens.len();
    if k == 0 || min_n == 0 {
        return &[];
    }
    for n in (min_n..=max_n.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Occurrences that start before the suffix itself, latest first.
        let found = (0..len - n)
            .rev()
            .find(|&start| &tokens[start..start + n] == suffix);
        if let Some(start) = found {
            let from = start + n;
            return &tokens[from..(from + k).min(len)];
        }
    }
    &[]
}

/// Per-request counts, reported with the completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeculativeCounts {
    /// Tokens drafted for this request.
    pub drafted: u32,
    /// Of those, tokens the target model agreed with (and that were emitted).
    pub accepted: u32,
}

/// Engine-wide totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecDecodeStats {
    /// Steps of a sequence that had a draft.
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
}

impl SpecDecodeStats {
    /// Accepted over drafted tokens (0 before any draft).
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted_tokens as f64 / self.draft_tokens.max(1) as f64
    }

    /// Tokens a drafted step yields on average: its accepted drafts plus the one sampled
    /// after them (vLLM's "mean acceptance length").
    pub fn mean_accepted_length(&self) -> f64 {
        1.0 + self.accepted_tokens as f64 / self.drafts.max(1) as f64
    }
}

/// The draft length after a step that drafted `drafted` tokens and had `accepted` of them
/// accepted, at most `k`: one longer after full agreement, the accepted run plus one after a
/// rejection. Verifying a token costs a share of a step (on a CPU, about half of one), so
/// drafts that tend to fail are kept short and runs of agreement, such as text being copied,
/// get the full length.
pub fn next_draft_len(drafted: usize, accepted: usize, k: usize) -> usize {
    let next = if accepted >= drafted {
        drafted + 1
    } else {
        accepted + 1
    };
    next.clamp(1, k.max(1))
}

/// How many of `drafts` the samples accept: the leading drafts equal to the sample of the row
/// before them (`sampled[i]` is the token the model chose after the first `i` drafts).
pub fn accepted_len(drafts: &[u32], sampled: &[u32]) -> usize {
    drafts
        .iter()
        .zip(sampled)
        .take_while(|(d, s)| d == s)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_json() {
        let c: SpeculativeConfig =
            r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}"#
                .parse()
                .unwrap();
        assert_eq!(c.method, SpeculativeMethod::Ngram);
        assert_eq!(c.num_speculative_tokens, 4);
        assert_eq!(c.lookup_range(), (3, 3));
        let both: SpeculativeConfig = r#"{"method":"ngram","num_speculative_tokens":2,"prompt_lookup_min":1,"prompt_lookup_max":4}"#
            .parse()
            .unwrap();
        assert_eq!(both.lookup_range(), (1, 4));
        let draft: SpeculativeConfig =
            r#"{"method":"draft_model","model":"dummy:tiny","num_speculative_tokens":3}"#
                .parse()
                .unwrap();
        assert_eq!(draft.method, SpeculativeMethod::DraftModel);
        assert_eq!(draft.model.as_deref(), Some("dummy:tiny"));
        let defaults: SpeculativeConfig =
            r#"{"method":"ngram","num_speculative_tokens":2}"#.parse().unwrap();
        assert_eq!(defaults.lookup_range(), (5, 5));
        assert_eq!(defaults.disable_by_batch_size, None);
        let off_when_busy: SpeculativeConfig =
            r#"{"method":"ngram","num_speculative_tokens":2,"disable_by_batch_size":4}"#
                .parse()
                .unwrap();
        assert_eq!(off_when_busy.disable_by_batch_size, Some(4));
    }

    #[test]
    fn bad_configs_are_precise_errors() {
        for (bad, says) in [
            (r#"{"method":"ngram"}"#, "num_speculative_tokens"),
            (r#"{"method":"ngram","num_speculative_tokens":0}"#, "1..="),
            (r#"{"method":"ngram","num_speculative_tokens":99}"#, "1..="),
            (r#"{"method":"eagle","num_speculative_tokens":2}"#, "eagle"),
            (
                r#"{"method":"ngram","num_speculative_tokens":2,"prompt_lookup_min":4,"prompt_lookup_max":2}"#,
                "prompt_lookup_min",
            ),
            (
                r#"{"method":"ngram","num_speculative_tokens":2,"lookahead":2}"#,
                "lookahead",
            ),
            ("ngram", "speculative config"),
            (
                r#"{"method":"draft_model","num_speculative_tokens":2}"#,
                "needs `model`",
            ),
            (
                r#"{"method":"ngram","num_speculative_tokens":2,"model":"d.gguf"}"#,
                "for method draft_model",
            ),
            (
                r#"{"method":"draft_model","num_speculative_tokens":2,"model":"d.gguf","prompt_lookup_max":3}"#,
                "for method ngram",
            ),
        ] {
            let err = bad.parse::<SpeculativeConfig>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn lookup_takes_the_longest_then_latest_match() {
        // "1 2 3 9 ... 1 2 3 7 ... 2 3" : the 2-gram [2, 3] last occurred before the 7.
        let t = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 2, 3];
        assert_eq!(propose_ngram(&t, 1, 3, 2), &[7, 8]);
        // A 3-gram match wins over a later 1-gram one.
        let t = [5, 6, 7, 1, 2, 7, 4, 5, 6, 7];
        assert_eq!(propose_ngram(&t, 1, 3, 3), &[1, 2, 7]);
        // The draft stops at the end of what is known.
        let t = [1, 2, 1, 2];
        assert_eq!(propose_ngram(&t, 2, 2, 5), &[1, 2]);
        // Nothing recurs, or the n-grams asked for are longer than the history.
        assert!(propose_ngram(&[1, 2, 3, 4], 1, 3, 4).is_empty());
        assert!(propose_ngram(&[1, 1], 2, 3, 4).is_empty());
        assert!(propose_ngram(&[], 1, 3, 4).is_empty());
        assert!(propose_ngram(&[1, 1, 1], 1, 1, 0).is_empty());
    }

    #[test]
    fn draft_length_follows_agreement() {
        assert_eq!(next_draft_len(4, 4, 4), 4);
        assert_eq!(next_draft_len(2, 2, 4), 3);
        assert_eq!(next_draft_len(4, 0, 4), 1);
        assert_eq!(next_draft_len(4, 2, 4), 3);
        assert_eq!(next_draft_len(1, 0, 1), 1);
    }

    #[test]
    fn acceptance_stops_at_the_first_difference() {
        assert_eq!(accepted_len(&[4, 5, 6], &[4, 5, 6, 7]), 3);
        assert_eq!(accepted_len(&[4, 5, 6], &[4, 9, 6, 7]), 1);
        assert_eq!(accepted_len(&[4, 5, 6], &[1, 5, 6, 7]), 0);
        assert_eq!(accepted_len(&[], &[1]), 0);
    }
}
