//! When generation ends: by token (the model's end-of-generation ids, the request's stop token
//! ids), by stop string, or by length. Stop strings are matched on the streamed text, so
//! [`StopChecker`] holds back the tail that could still grow into a stop string and releases
//! everything else at once; the client never sees text that a later token would retract.

use serde::{Deserialize, Serialize};

use super::params::SamplingParams;

/// Why a sequence finished, spelled as OpenAI clients expect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached (or the context is full).
    Length,
    /// The client went away or the request was aborted.
    Cancelled,
    /// A prefill-only request whose KV went to another node: its job ended with its first
    /// token, which that node now continues from.
    Exported,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Exported => "exported",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether token `id` ends the sequence: the model's end-of-generation ids do unless the request
/// set `ignore_eos`; the request's own `stop_token_ids` always do.
pub fn check_stop_token(id: u32, params: &SamplingParams, eog_ids: &[u32]) -> bool {
    params.stop_token_ids.contains(&id) || (!params.ignore_eos && eog_ids.contains(&id))
}

/// What one [`StopChecker::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text safe to send now. After a match it ends right before the stop string.
    pub text: String,
    /// A stop string matched: the sequence is finished and `text` is its last text.
    pub stopped: bool,
    /// Index, in the list given to [`StopChecker::new`], of the stop string that matched.
    pub stop_index: Option<usize>,
}

/// Finds stop strings in text that arrives piece by piece.
///
/// Text that cannot be the start of a stop string is released immediately; only a suffix that is a
/// proper prefix of some stop string is held back, so the delay is bounded by the longest stop
/// string. The earliest match wins: the output is the text up to the first place where a complete
/// stop string has been seen, and never includes the stop string (OpenAI semantics).
#[derive(Debug, Clone, Default)]
pub struct StopChecker {
    /// The non-empty stop strings with their index in the request's list.
    stops: Vec<(usize, String)>,
    /// Text received but not yet released; it never contains a complete stop string.
    held: String,
    stopped: bool,
    /// Longest stop string in bytes, which bounds how much must be held back.
    max_len: usize,
}

impl StopChecker {
    /// Empty stop strings are ignored: they would match before any text (validation rejects them).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        let stops: Vec<(usize, String)> = stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.as_ref().is_empty())
            .map(|(i, s)| (i, s.as_ref().to_string()))
            .collect();
        let max_len = stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        Self {
            stops,
            held: String::new(),
            stopped: false,
            max_len,
        }
    }

    /// A checker for the request's `stop` strings.
    pub fn from_params(params: &SamplingParams) -> Self {
        Self::new(&params.stop)
    }

    /// Whether a stop string has matched; further pushes then release nothing.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next piece of decoded text.
    pub fn push(&mut self, piece: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                stopped: true,
                ..StopOutcome::default()
            };
        }
        if self.stops.is_empty() {
            return StopOutcome {
                text: piece.to_string(),
                ..StopOutcome::default()
            };
        }
        self.held.push_str(piece);

        // Released text never contains the start of a match, so every match starts in `held`.
        let first = self
            .stops
            .iter()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, *i)))
            .min();
        if let Some((at, index)) = first {
            let mut text = std::mem::take(&mut self.held);
            text.truncate(at);
            self.stopped = true;
            return StopOutcome {
                text,
                stopped: true,
                stop_index: Some(index),
            };
        }

        let keep_from = self.partial_match_start();
        let tail = self.held.split_off(keep_from);
        StopOutcome {
            text: std::mem::replace(&mut self.held, tail),
            ..StopOutcome::default()
        }
    }

    /// Ends the text: whatever was held back as a possible partial match is released. After a
    /// stop string matched there is nothing left to release.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            self.held.clear();
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    /// Start of the longest suffix of `held` that is a proper prefix of a stop string, or
    /// `held.len()` when there is none. Only char boundaries are tried, so the split is always
    /// valid UTF-8 (a stop string's first byte can never match a continuation byte anyway).
    fn partial_match_start(&self) -> usize {
        let len = self.held.len();
        let earliest = len.saturating_sub(self.max_len.saturating_sub(1));
        let bytes = self.held.as_bytes();
        (earliest..len)
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = bytes.get(i..).unwrap_or_default();
                self.stops
                    .iter()
                    .any(|(_, s)| s.len() > tail.len() && s.as_bytes().starts_with(tail))
            })
            .unwrap_or(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pushes every piece; returns the emitted text, whether and which stop matched, and the
    /// text released by `finish`.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>, String) {
        let mut checker = StopChecker::new(stops);
        let mut out = String::new();
        let mut matched = None;
        for piece in pieces {
            let o = checker.push(piece);
            assert_eq!(o.stopped, o.stop_index.is_some());
            out.push_str(&o.text);
            if o.stopped {
                matched = o.stop_index;
                break;
            }
        }
        (out, matched, checker.finish())
    }

    #[test]
    fn stop_string_split_across_pieces() {
        let mut checker = StopChecker::new(&["o W"]);
        let a = checker.push("Hel");
        assert_eq!((a.text.as_str(), a.stopped), ("Hel", false));
        let b = checker.push("lo Wo");
        assert_eq!((b.text.as_str(), b.stopped), ("l", true));
        assert_eq!(b.stop_index, Some(0));
        assert!(checker.is_stopped());
        assert_eq!(
            checker.push("rld"),
            StopOutcome {
                stopped: true,
                ..Default::default()
            }
        );
        assert_eq!(checker.finish(), "");
    }

    #[test]
    fn partial_match_is_held_back_then_released() {
        let mut checker = StopChecker::new(&["END"]);
        assert_eq!(checker.push("abc E").text, "abc ");
        assert_eq!(checker.push("N").text, "");
        // "ENx" cannot grow into "END" any more.
        assert_eq!(checker.push("x").text, "ENx");
        assert_eq!(checker.push("yE").text, "y");
        assert_eq!(checker.finish(), "E");
    }

    #[test]
    fn multi_byte_stop_string() {
        let (out, matched, rest) = run(&["世界"], &["你好", "世", "界和平"]);
        assert_eq!(
            (out.as_str(), matched, rest.as_str()),
            ("你好", Some(0), "")
        );
        let mut checker = StopChecker::new(&["世界"]);
        assert_eq!(checker.push("é世").text, "é");
        assert_eq!(checker.push("世").text, "世");
        assert_eq!(checker.finish(), "世");
    }

    #[test]
    fn no_stop_releases_everything() {
        let (out, matched, rest) = run(&["zzz"], &["Hello", ", ", "world"]);
        assert_eq!(format!("{out}{rest}"), "Hello, world");
        assert_eq!((matched, rest.as_str()), (None, ""));
        let (out, matched, rest) = run(&[], &["a", "b"]);
        assert_eq!((out.as_str(), matched, rest.as_str()), ("ab", None, ""));
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let (out, matched, _) = run(&["world", "lo"], &["hello world"]);
        assert_eq!((out.as_str(), matched), ("hel", Some(1)));
        let (out, matched, _) = run(&["", "b"], &["abc"]);
        // Indices refer to the request's list even when an empty entry was skipped.
        assert_eq!((out.as_str(), matched), ("a", Some(1)));
    }

    #[test]
    fn stop_tokens_and_finish_reasons() {
        let mut p = SamplingParams {
            stop_token_ids: vec![7],
            ..SamplingParams::default()
        };
        assert!(check_stop_token(2, &p, &[2]));
        assert!(check_stop_token(7, &p, &[2]));
        assert!(!check_stop_token(3, &p, &[2]));
        p.ignore_eos = true;
        assert!(!check_stop_token(2, &p, &[2]));
        assert!(check_stop_token(7, &p, &[2]));

        assert_eq!(FinishReason::Stop.as_str(), "stop");
        assert_eq!(FinishReason::Length.to_string(), "length");
        assert_eq!(
            serde_json::to_string(&FinishReason::Cancelled).unwrap(),
            "\"cancelled\""
        );
        let r: FinishReason = serde_json::from_str("\"length\"").unwrap();
        assert_eq!(r, FinishReason::Length);
    }

    fn piece() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "é", "世", "界", " "]),
            0..4,
        )
        .prop_map(|v| v.concat())
    }

    fn stop_string() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "é", "世", "界"]), 1..4)
            .prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn streamed_output_equals_truncated_concatenation(
            pieces in prop::collection::vec(piece(), 0..12),
            stop in stop_string(),
        ) {
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let (out, matched, rest) = run(&[stop.as_str()], &refs);
            let all = pieces.concat();
            match all.find(&stop) {
                Some(at) => {
                    prop_assert_eq!(matched, Some(0));
                    prop_assert_eq!(out.as_str(), &all[..at]);
                    prop_assert_eq!(rest.as_str(), "");
                }
                None => {
                    prop_assert_eq!(matched, None);
                    prop_assert_eq!(format!("{out}{rest}"), all);
                }
            }
        }
    }
}
