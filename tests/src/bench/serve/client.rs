//! One streamed request to an OpenAI-compatible server, timed as `vllm bench serve` times it:
//! the clock starts when the request is sent, the first chunk that carries text is the first
//! token (TTFT), every later one adds an inter-token gap (ITL), and the latency ends at the
//! last chunk that carried text. A request succeeds only if its stream ends properly (`[DONE]`
//! or a finish reason); a server error, a broken stream or a timeout is a failure with its
//! reason, and a failure never enters the latency figures.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

/// Which OpenAI API a benchmark calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

impl Api {
    /// `--backend` (vLLM's `openai` / `openai-chat`), else what the endpoint's path says.
    pub fn resolve(backend: Option<&str>, endpoint: &str) -> anyhow::Result<Self> {
        match backend {
            Some("openai" | "vllm") => Ok(Self::Completions),
            Some("openai-chat") => Ok(Self::Chat),
            Some(other) => anyhow::bail!("unknown --backend {other:?}: openai or openai-chat"),
            None if endpoint.ends_with("/chat/completions") => Ok(Self::Chat),
            None if endpoint.ends_with("/completions") => Ok(Self::Completions),
            None => anyhow::bail!(
                "--endpoint {endpoint:?} is neither /v1/completions nor /v1/chat/completions: \
                 give --backend openai or openai-chat"
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Completions => "openai",
            Self::Chat => "openai-chat",
        }
    }
}

/// What is sent: the same for every request of a run but the prompt and its length.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    pub url: String,
    pub api: Api,
    pub model: String,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub api_key: Option<String>,
    pub timeout: Duration,
    /// Merged into every body last (`--extra-body`).
    pub extra_body: serde_json::Map<String, Value>,
}

/// What one request saw.
#[derive(Debug, Clone, Default)]
pub struct RequestOutput {
    pub success: bool,
    pub generated_text: String,
    /// `usage.completion_tokens` when the server sent usage.
    pub output_tokens: Option<usize>,
    /// Seconds from sending to the first text.
    pub ttft: f64,
    /// Seconds between consecutive chunks with text.
    pub itl: Vec<f64>,
    /// Seconds from sending to the last chunk with text.
    pub latency: f64,
    /// Seconds from the start of the benchmark to sending.
    pub start_time: f64,
    pub prompt_len: usize,
    pub error: String,
}

impl RequestTemplate {
    pub fn body(&self, prompt: &str, max_tokens: usize) -> Value {
        let mut body = match self.api {
            Api::Completions => json!({"prompt": prompt, "max_tokens": max_tokens}),
            Api::Chat => json!({
                "messages": [{"role": "user", "content": prompt}],
                "max_completion_tokens": max_tokens,
            }),
        };
        body["model"] = json!(self.model);
        body["temperature"] = json!(self.temperature);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        for (k, v) in &self.extra_body {
            body[k] = v.clone();
        }
        body
    }

    /// Sends one request and reads its stream to the end (or the timeout).
    pub async fn send(
        &self,
        http: &reqwest::Client,
        prompt: &str,
        prompt_len: usize,
        max_tokens: usize,
        bench_start: Instant,
    ) -> RequestOutput {
        let started = Instant::now();
        let mut out = RequestOutput {
            prompt_len,
            start_time: (started - bench_start).as_secs_f64(),
            ..RequestOutput::default()
        };
        let result = tokio::time::timeout(
            self.timeout,
            self.stream(http, prompt, max_tokens, started, &mut out),
        )
        .await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!(
                "no complete answer within --request-timeout ({} s)",
                self.timeout.as_secs_f64()
            )),
        };
        match failure {
            None => out.success = true,
            Some(e) => {
                out.success = false;
                out.error = e;
            }
        }
        out
    }

    async fn stream(
        &self,
        http: &reqwest::Client,
        prompt: &str,
        max_tokens: usize,
        started: Instant,
        out: &mut RequestOutput,
    ) -> anyhow::Result<()> {
        let mut request = http.post(&self.url).json(&self.body(prompt, max_tokens));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("sending to {}: {}", self.url, error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("HTTP {status}: {}", body.trim());
        }
        let mut bytes = response.bytes_stream();
        let mut events = SseEvents::default();
        let mut last: Option<Instant> = None;
        let mut finished = false;
        while let Some(chunk) = bytes.next().await {
            let chunk =
                chunk.map_err(|e| anyhow::anyhow!("reading the stream: {}", error_chain(&e)))?;
            let now = Instant::now();
            for data in events.push(&chunk) {
                if data == "[DONE]" {
                    finished = true;
                    continue;
                }
                let v: Value = serde_json::from_str(&data)
                    .map_err(|e| anyhow::anyhow!("a chunk that is not JSON ({e}): {data}"))?;
                if let Some(err) = v.get("error") {
                    anyhow::bail!("the server sent an error: {err}");
                }
                if let Some(n) = v
                    .pointer("/usage/completion_tokens")
                    .and_then(Value::as_u64)
                {
                    out.output_tokens = Some(n as usize);
                }
                let Some(choice) = v.pointer("/choices/0") else {
                    continue;
                };
                let text = match self.api {
                    Api::Completions => choice.get("text"),
                    Api::Chat => choice.pointer("/delta/content"),
                }
                .and_then(Value::as_str)
                .unwrap_or("");
                if !text.is_empty() {
                    match last {
                        None => out.ttft = (now - started).as_secs_f64(),
                        Some(prev) => out.itl.push((now - prev).as_secs_f64()),
                    }
                    last = Some(now);
                    out.latency = (now - started).as_secs_f64();
                    out.generated_text.push_str(text);
                }
                if choice.get("finish_reason").is_some_and(|r| !r.is_null()) {
                    finished = true;
                }
            }
        }
        if !finished {
            anyhow::bail!("the stream ended before [DONE] or a finish reason");
        }
        if last.is_none() {
            anyhow::bail!("the stream carried no text");
        }
        Ok(())
    }
}

/// The causes of an error, outermost first: reqwest's own message rarely says why.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        parts.push(c.to_string());
        cause = c.source();
    }
    parts.dedup();
    parts.join(": ")
}

/// Splits a byte stream into the `data:` payloads of server-sent events.
#[derive(Default)]
struct SseEvents {
    pending: Vec<u8>,
}

impl SseEvents {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_payloads_are_cut_at_line_ends_whatever_the_chunking() {
        let stream = b"data: {\"a\":1}\r\n\r\n: comment\n\ndata:{\"b\":2}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut sse = SseEvents::default();
            let mut got = sse.push(&stream[..split]);
            got.extend(sse.push(&stream[split..]));
            assert_eq!(
                got,
                ["{\"a\":1}", "{\"b\":2}", "[DONE]"],
                "split at {split}"
            );
        }
    }

    #[test]
    fn bodies_are_vllms_with_extra_fields_last() {
        let mut t = RequestTemplate {
            url: String::new(),
            api: Api::Chat,
            model: "m".into(),
            temperature: 0.0,
            ignore_eos: true,
            api_key: None,
            timeout: Duration::from_secs(1),
            extra_body: serde_json::from_str(r#"{"top_k": 1, "temperature": 0.5}"#).unwrap(),
        };
        let b = t.body("hi", 7);
        assert_eq!(b["messages"][0]["content"], "hi");
        assert_eq!(b["max_completion_tokens"], 7);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(
            (b["top_k"].clone(), b["temperature"].clone()),
            (json!(1), json!(0.5))
        );
        t.api = Api::Completions;
        t.ignore_eos = false;
        let b = t.body("hi", 7);
        assert_eq!(
            (b["prompt"].clone(), b["max_tokens"].clone()),
            (json!("hi"), json!(7))
        );
        assert!(b.get("ignore_eos").is_none());
    }

    #[test]
    fn the_api_follows_backend_or_endpoint() {
        assert_eq!(
            Api::resolve(None, "/v1/chat/completions").unwrap(),
            Api::Chat
        );
        assert_eq!(
            Api::resolve(None, "/v1/completions").unwrap(),
            Api::Completions
        );
        assert_eq!(Api::resolve(Some("openai-chat"), "/x").unwrap(), Api::Chat);
        assert!(Api::resolve(None, "/generate").is_err());
        assert!(Api::resolve(Some("tgi"), "/v1/completions").is_err());
    }
}
