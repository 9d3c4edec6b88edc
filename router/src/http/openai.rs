//! Request bodies of the OpenAI-compatible API and their conversion to sampling parameters.
//!
//! Numbers arrive as JSON numbers of any size: they are range-checked here so that a client
//! gets "max_tokens must be at least 1" (400) rather than a type error for `-1`. A body that is
//! not JSON is a 400; JSON of the wrong shape (a missing field, a string for a number) is a 422.

use pd_common::chat_template::ChatMessage;
use pd_common::sampling::SamplingParams;
use pd_common::{Error, Result};
use serde::Deserialize;

/// One prompt or several, as text or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints share, including the extensions vLLM users know (top_k, min_p, ...).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    #[serde(default)]
    pub model: String,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopInput>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    pub skip_special_tokens: Option<bool>,
    /// vLLM's beam search: `n` is the width.
    #[serde(default)]
    pub use_beam_search: bool,
    pub length_penalty: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    pub max_tokens: Option<i64>,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<serde_json::Value>,
    pub response_format: Option<serde_json::Value>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// Most choices one request may ask for.
const MAX_N: i64 = 16;

impl CommonParams {
    /// Sampling parameters (without max_tokens, which each endpoint decides).
    pub fn sampling(&self) -> Result<SamplingParams> {
        let d = SamplingParams::default();
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        };
        Ok(SamplingParams {
            temperature: float("temperature", self.temperature, d.temperature)?,
            top_p: float("top_p", self.top_p, d.top_p)?,
            top_k: match self.top_k {
                None | Some(-1) => 0,
                Some(k) => int_in("top_k", k, 0, u32::MAX as i64)? as u32,
            },
            min_p: float("min_p", self.min_p, d.min_p)?,
            repetition_penalty: float(
                "repetition_penalty",
                self.repetition_penalty,
                d.repetition_penalty,
            )?,
            presence_penalty: float("presence_penalty", self.presence_penalty, 0.0)?,
            frequency_penalty: float("frequency_penalty", self.frequency_penalty, 0.0)?,
            // Negative seeds are accepted as their two's-complement bits, as other servers do.
            seed: self.seed.map(|s| s as u64),
            stop,
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            skip_special_tokens: self.skip_special_tokens.unwrap_or(d.skip_special_tokens),
            beam_width: match self.use_beam_search {
                true => self.n()? as u32,
                false => 0,
            },
            length_penalty: float("length_penalty", self.length_penalty, d.length_penalty)?,
            ..d
        })
    }

    pub fn n(&self) -> Result<usize> {
        Ok(int_in("n", self.n.unwrap_or(1), 1, MAX_N)? as usize)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// `max_tokens` when given: at least 1.
pub fn max_tokens(name: &str, value: Option<i64>) -> Result<Option<u32>> {
    value
        .map(|v| int_in(name, v, 1, u32::MAX as i64).map(|v| v as u32))
        .transpose()
}

impl ChatRequest {
    pub fn messages(&self) -> Result<Vec<ChatMessage>> {
        if self.messages.is_empty() {
            return Err(Error::invalid("messages must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
                    return Err(Error::invalid(format!(
                        "messages[{i}].role `{}` is not one of system, user, assistant",
                        m.role
                    )));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(MessageContent::Text(t)) => t.clone(),
                    Some(MessageContent::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                _ => {
                                    return Err(Error::invalid(format!(
                                        "messages[{i}].content[{j}]: only text parts are supported, got `{}`",
                                        p.kind
                                    )))
                                }
                            }
                        }
                        text
                    }
                };
                let role = if m.role == "developer" { "system" } else { &m.role };
                Ok(ChatMessage {
                    role: role.to_string(),
                    content,
                })
            })
            .collect()
    }

    /// Refuses features this server does not have rather than ignoring them silently.
    pub fn check_unsupported(&self) -> Result<()> {
        if matches!(&self.tools, Some(v) if !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(Error::invalid("tools are not supported"));
        }
        if let Some(format) = &self.response_format {
            let kind = format.get("type").and_then(|t| t.as_str());
            if !format.is_null() && kind != Some("text") {
                return Err(Error::invalid(
                    "response_format: only {\"type\": \"text\"} is supported",
                ));
            }
        }
        Ok(())
    }

    /// Top alternatives per token: `None` without `logprobs: true`.
    pub fn logprobs(&self) -> Result<Option<u32>> {
        let top = self
            .top_logprobs
            .map(|n| int_in("top_logprobs", n, 0, 20))
            .transpose()?;
        match (self.logprobs.unwrap_or(false), top) {
            (true, top) => Ok(Some(top.unwrap_or(0) as u32)),
            (false, Some(n)) if n > 0 => {
                Err(Error::invalid("top_logprobs requires logprobs to be true"))
            }
            (false, _) => Ok(None),
        }
    }
}

impl CompletionRequest {
    pub fn check_unsupported(&self) -> Result<()> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(Error::invalid("suffix is not supported"));
        }
        if let Some(b) = self.best_of {
            if b != self.common.n.unwrap_or(1) {
                return Err(Error::invalid("best_of other than n is not supported"));
            }
        }
        Ok(())
    }

    pub fn logprobs(&self) -> Result<Option<u32>> {
        self.logprobs
            .map(|n| int_in("logprobs", n, 0, 20).map(|n| n as u32))
            .transpose()
    }
}

fn float(name: &str, value: Option<f64>, default: f32) -> Result<f32> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() => Ok(v as f32),
        Some(v) => Err(Error::invalid(format!(
            "{name} must be a finite number, got {v}"
        ))),
    }
}

fn int_in(name: &str, value: i64, min: i64, max: i64) -> Result<i64> {
    if value < min || value > max {
        let bound = if value < min {
            format!("at least {min}")
        } else {
            format!("at most {max}")
        };
        return Err(Error::invalid(format!(
            "{name} must be {bound}, got {value}"
        )));
    }
    Ok(value)
}
