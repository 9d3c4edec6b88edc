//! The per-request sampling knobs, with the defaults and the range checks that vLLM and OpenAI
//! users expect. Validation happens once, when a request is admitted, so that the sampler and the
//! edges can trust the values and a bad request gets a message naming the field it got wrong.

use serde::{Deserialize, Deserializer, Serialize};

use crate::{Error, Result};

/// The most stop strings one request may carry; each one is searched for after every token.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string, in bytes: the stop checker holds back up to this much text.
pub const MAX_STOP_STRING_BYTES: usize = 1024;
/// The most stop token ids one request may name.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;
/// The most top-n logprobs one request may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: u32 = 20;
/// The widest beam search one request may ask for (vLLM's `n` limit for it is the same order).
pub const MAX_BEAM_WIDTH: u32 = 16;
/// Presence and frequency penalties are limited to `[-PENALTY_LIMIT, PENALTY_LIMIT]` (OpenAI).
pub const PENALTY_LIMIT: f32 = 2.0;

/// How to pick the next token and when to stop. Missing JSON fields take the [`Default`] values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 turns the filter off.
    pub top_k: u32,
    /// Nucleus sampling: keep the smallest set of tokens whose mass reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top probability, in [0, 1].
    pub min_p: f32,
    /// HF repetition penalty over prompt and generated tokens, > 0; 1 is neutral.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over generated tokens, in [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over generated tokens, in [-2, 2].
    pub frequency_penalty: f32,
    /// Seed of the request's randomness; the engine picks one when absent.
    pub seed: Option<u64>,
    /// Most tokens to generate, >= 1.
    pub max_tokens: u32,
    /// Token ids that end generation (in addition to the model's end-of-generation ids).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the matched string is not part of the output.
    #[serde(deserialize_with = "string_or_list")]
    pub stop: Vec<String>,
    /// Number of top alternatives to report with each token, 0..=20.
    pub logprobs: Option<u32>,
    /// Keep generating past the model's end-of-generation tokens.
    pub ignore_eos: bool,
    /// Leave special tokens out of the detokenized text.
    pub skip_special_tokens: bool,
    /// Beam search with this many beams (vLLM's `use_beam_search` with `n`); 0 samples instead.
    /// Beams are ranked by the model's own log-probabilities: temperature, the filters and the
    /// penalties do not apply (as in vLLM).
    pub beam_width: u32,
    /// Beam search ranks a beam by `cumulative_logprob / generated_len^length_penalty`.
    pub length_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
            skip_special_tokens: true,
            beam_width: 0,
            length_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: the sampler takes the argmax and uses no randomness.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether the request asks for beam search.
    pub fn is_beam_search(&self) -> bool {
        self.beam_width > 0
    }

    /// How many most likely `(id, logprob)` pairs a sampled token carries: the top-n logprobs
    /// asked for, and under beam search at least the `2 * width` candidates a beam extends by.
    pub fn top_candidates(&self) -> usize {
        let asked = self.logprobs.unwrap_or(0) as usize;
        match self.is_beam_search() {
            true => asked.max(2 * self.beam_width as usize),
            false => asked,
        }
    }

    /// Checks every field against its allowed range for a model with `vocab_size` tokens.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        self.validate_numbers()?;
        if self.max_tokens == 0 {
            return Err(Error::invalid("max_tokens must be >= 1, got 0"));
        }
        if let Some(&id) = self
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(Error::invalid(format!(
                "stop_token_ids contains {id}, outside the vocabulary (ids 0..{vocab_size})"
            )));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::invalid(format!(
                "stop has {} strings; at most {MAX_STOP_STRINGS} are allowed",
                self.stop.len()
            )));
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(Error::invalid(format!(
                "stop[{i}] is empty; stop strings must be non-empty"
            )));
        }
        if let Some(i) = self
            .stop
            .iter()
            .position(|s| s.len() > MAX_STOP_STRING_BYTES)
        {
            return Err(Error::invalid(format!(
                "stop[{i}] has {} bytes; at most {MAX_STOP_STRING_BYTES} are allowed",
                self.stop[i].len()
            )));
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(Error::invalid(format!(
                "stop_token_ids has {} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                self.stop_token_ids.len()
            )));
        }
        if self.beam_width > MAX_BEAM_WIDTH {
            return Err(Error::invalid(format!(
                "beam search with n={} beams; at most {MAX_BEAM_WIDTH} are allowed",
                self.beam_width
            )));
        }
        if self.is_beam_search() && !self.stop.is_empty() {
            // A beam is ranked by its tokens; cutting its text at a stop string would leave a
            // score that no longer matches what is returned.
            return Err(Error::invalid(
                "stop strings are not supported with beam search; use stop_token_ids",
            ));
        }
        Ok(())
    }

    /// The checks the sampler itself relies on; it repeats them on every call because they are
    /// cheap and a sampler fed unvalidated values must fail cleanly rather than misbehave.
    pub(crate) fn validate_numbers(&self) -> Result<()> {
        finite("temperature", self.temperature, "[0, inf)")?;
        if self.temperature < 0.0 {
            return Err(range_error("temperature", self.temperature, "[0, inf)"));
        }
        finite("top_p", self.top_p, "(0, 1]")?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(range_error("top_p", self.top_p, "(0, 1]"));
        }
        finite("min_p", self.min_p, "[0, 1]")?;
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(range_error("min_p", self.min_p, "[0, 1]"));
        }
        finite("repetition_penalty", self.repetition_penalty, "(0, inf)")?;
        if self.repetition_penalty <= 0.0 {
            return Err(range_error(
                "repetition_penalty",
                self.repetition_penalty,
                "(0, inf)",
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            finite(name, value, "[-2, 2]")?;
            if !(-PENALTY_LIMIT..=PENALTY_LIMIT).contains(&value) {
                return Err(range_error(name, value, "[-2, 2]"));
            }
        }
        finite("length_penalty", self.length_penalty, "(-inf, inf)")?;
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(Error::invalid(format!(
                    "logprobs must be in 0..={MAX_LOGPROBS}, got {n}"
                )));
            }
        }
        Ok(())
    }
}

fn finite(name: &str, value: f32, range: &str) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{name} must be a finite number in {range}, got {value}"
        )))
    }
}

fn range_error(name: &str, value: f32, range: &str) -> Error {
    Error::invalid(format!("{name} must be in {range}, got {value}"))
}

/// OpenAI accepts `"stop": "x"`, `"stop": ["x", "y"]` and `"stop": null`.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(p: &SamplingParams) -> String {
        match p.validate(1000) {
            Err(Error::InvalidRequest(msg)) => msg,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    fn with(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn defaults_are_vllm_defaults_and_valid() {
        let p = SamplingParams::default();
        assert_eq!(p.temperature, 1.0);
        assert_eq!((p.top_k, p.top_p, p.min_p), (0, 1.0, 0.0));
        assert_eq!(p.repetition_penalty, 1.0);
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.0, 0.0));
        assert_eq!((p.seed, p.max_tokens, p.logprobs), (None, 16, None));
        assert!(p.stop.is_empty() && p.stop_token_ids.is_empty());
        assert!(!p.ignore_eos && p.skip_special_tokens);
        assert!(!p.is_greedy());
        p.validate(1000).unwrap();
        assert!(with(|p| p.temperature = 0.0).is_greedy());
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (with(|p| p.temperature = -0.5), "temperature"),
            (with(|p| p.temperature = f32::NAN), "temperature"),
            (with(|p| p.temperature = f32::INFINITY), "temperature"),
            (with(|p| p.top_p = 0.0), "top_p"),
            (with(|p| p.top_p = 1.5), "top_p"),
            (with(|p| p.top_p = f32::NAN), "top_p"),
            (with(|p| p.min_p = -0.1), "min_p"),
            (with(|p| p.min_p = 1.1), "min_p"),
            (with(|p| p.min_p = f32::NAN), "min_p"),
            (with(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (with(|p| p.repetition_penalty = -1.0), "repetition_penalty"),
            (
                with(|p| p.repetition_penalty = f32::INFINITY),
                "repetition_penalty",
            ),
            (with(|p| p.presence_penalty = 2.5), "presence_penalty"),
            (with(|p| p.presence_penalty = f32::NAN), "presence_penalty"),
            (with(|p| p.frequency_penalty = -2.01), "frequency_penalty"),
            (
                with(|p| p.frequency_penalty = f32::NEG_INFINITY),
                "frequency_penalty",
            ),
            (with(|p| p.max_tokens = 0), "max_tokens"),
            (with(|p| p.stop_token_ids = vec![3, 1000]), "stop_token_ids"),
            (with(|p| p.stop = vec!["x".repeat(1025)]), "stop[0]"),
            (with(|p| p.stop_token_ids = vec![1; 1025]), "stop_token_ids"),
            (
                with(|p| p.stop = vec!["a".into(), String::new()]),
                "stop[1]",
            ),
            (with(|p| p.stop = vec!["x".into(); 17]), "stop has 17"),
            (with(|p| p.logprobs = Some(21)), "logprobs"),
        ];
        for (p, field) in cases {
            let msg = err_of(&p);
            assert!(msg.starts_with(field), "{field}: {msg}");
        }
        let msg = err_of(&with(|p| p.top_p = 0.0));
        assert!(msg.contains("(0, 1]"), "{msg}");
        let msg = err_of(&with(|p| p.presence_penalty = 3.0));
        assert!(msg.contains("[-2, 2]"), "{msg}");
    }

    #[test]
    fn edge_values_are_accepted() {
        for p in [
            with(|p| p.top_p = 1.0),
            with(|p| (p.min_p, p.presence_penalty, p.frequency_penalty) = (1.0, -2.0, 2.0)),
            with(|p| p.stop_token_ids = vec![999]),
            with(|p| p.stop = vec!["s".into(); 16]),
            with(|p| p.logprobs = Some(20)),
            with(|p| p.temperature = 0.0),
        ] {
            p.validate(1000).unwrap();
        }
    }

    #[test]
    fn json_fills_defaults_and_accepts_one_stop_string() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.5, "stop": "\n"}"#).unwrap();
        assert_eq!(p.temperature, 0.5);
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert_eq!(p.max_tokens, 16);
        let p: SamplingParams = serde_json::from_str(r#"{"stop": ["a", "b"]}"#).unwrap();
        assert_eq!(p.stop, vec!["a".to_string(), "b".to_string()]);
        let p: SamplingParams = serde_json::from_str(r#"{"stop": null}"#).unwrap();
        assert!(p.stop.is_empty());
        let round: SamplingParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(round, p);
    }
}
