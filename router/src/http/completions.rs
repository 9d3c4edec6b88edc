//! `/v1/completions` and `/v1/chat/completions`: a request becomes one job per (prompt, choice),
//! every job is started before the response begins (so a refusal is still an HTTP error), then
//! the answer is either collected into one JSON body or streamed as server-sent events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, select_all, StreamExt};
use pd_common::sampling::SamplingParams;
use pd_common::telemetry::new_request_id;
use pd_common::tokenizer::Tokenizer;
use pd_common::Error;
use pd_proto::v1 as pb;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::openai::{max_tokens, ChatRequest, CommonParams, CompletionRequest, PromptInput};
use super::{parse_body, ApiError, AppState};
use crate::admission::Caller;
use crate::dispatch::{Job, JobStream};
use crate::frontend::Frontend;
use crate::outcome;

/// Most completions (prompts times `n`) one request may ask for.
const MAX_CHOICES: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A request, planned: its jobs and how to present their output.
pub(crate) struct Plan {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    /// (choice index, prompt index, job, text to put before the output: `echo`).
    pub(crate) jobs: Vec<(usize, usize, Job, String)>,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

impl Plan {
    fn new(
        kind: Kind,
        model: &str,
        jobs: Vec<(usize, usize, Job, String)>,
        common: &CommonParams,
        params: &SamplingParams,
    ) -> Self {
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        Plan {
            kind,
            id: format!("{prefix}-{}", new_request_id()),
            created: now(),
            model: model.to_string(),
            jobs,
            stream: common.stream,
            include_usage: common.include_usage(),
            logprobs: params.logprobs.is_some(),
        }
    }
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Response, ApiError> {
    let plan = async {
        let req: CompletionRequest = parse_body(body, state.max_body_bytes).await?;
        plan_completion_request(&state.frontend, &req)
    };
    let plan = plan
        .await
        .inspect_err(|e| outcome::rejected(e.rejection_reason()))?;
    execute(state, caller, plan).await
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Response, ApiError> {
    let plan = async {
        let req: ChatRequest = parse_body(body, state.max_body_bytes).await?;
        plan_chat_request(&state.frontend, &req)
    };
    let plan = plan
        .await
        .inspect_err(|e| outcome::rejected(e.rejection_reason()))?;
    execute(state, caller, plan).await
}

/// Checks a `/v1/completions` request and makes its jobs.
pub(crate) fn plan_completion_request(
    fe: &Frontend,
    req: &CompletionRequest,
) -> Result<Plan, ApiError> {
    fe.check_model(&req.common.model)?;
    req.check_unsupported()?;
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        PromptInput::Text(t) => vec![fe.encode_text(t)?],
        PromptInput::Texts(ts) => ts
            .iter()
            .map(|t| fe.encode_text(t))
            .collect::<Result<_, _>>()?,
        PromptInput::Tokens(ids) => vec![ids.clone()],
        PromptInput::TokenLists(lists) => lists.clone(),
    };
    if prompts.is_empty() {
        return Err(Error::invalid("prompt must not be empty").into());
    }
    let mut params = req.common.sampling()?;
    params.logprobs = req.logprobs()?;
    let max =
        max_tokens("max_tokens", req.max_tokens)?.or(Some(SamplingParams::default().max_tokens));
    let echo = |ids: &[u32]| -> Result<String, ApiError> {
        if !req.echo {
            return Ok(String::new());
        }
        Ok(fe.tokenizer()?.decode(ids, params.skip_special_tokens)?)
    };
    let n = req.common.n()?;
    if prompts.len() * n > MAX_CHOICES {
        return Err(Error::invalid(format!(
            "{} prompts times n={n} asks for more than {MAX_CHOICES} completions",
            prompts.len()
        ))
        .into());
    }
    let mut jobs = Vec::new();
    for (p, ids) in prompts.iter().enumerate() {
        let prefix = echo(ids)?;
        // A beam search is one job whose n beams are choices p * n .. p * n + n.
        for j in 0..choice_jobs(&params, n) {
            let job = fe.job(None, ids.clone(), choice_params(&params, j), max)?;
            jobs.push((p * n + j, p, job, prefix.clone()));
        }
    }
    Ok(Plan::new(
        Kind::Completion,
        fe.model_name(),
        jobs,
        &req.common,
        &params,
    ))
}

/// Checks a `/v1/chat/completions` request and makes its jobs.
pub(crate) fn plan_chat_request(fe: &Frontend, req: &ChatRequest) -> Result<Plan, ApiError> {
    fe.check_model(&req.common.model)?;
    req.check_unsupported()?;
    let messages = req.messages()?;
    let prompt_ids = fe.encode_chat(&messages)?;
    let mut params = req.common.sampling()?;
    params.logprobs = req.logprobs()?;
    let max = max_tokens("max_completion_tokens", req.max_completion_tokens)?
        .or(max_tokens("max_tokens", req.max_tokens)?);
    let n = req.common.n()?;
    let jobs = (0..choice_jobs(&params, n))
        .map(|j| {
            let job = fe.job(None, prompt_ids.clone(), choice_params(&params, j), max)?;
            Ok((j, 0, job, String::new()))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Plan::new(
        Kind::Chat,
        fe.model_name(),
        jobs,
        &req.common,
        &params,
    ))
}

/// How many jobs `n` choices take: one each, or one beam search for them all.
fn choice_jobs(params: &SamplingParams, n: usize) -> usize {
    match params.is_beam_search() {
        true => 1,
        false => n,
    }
}

/// Choice `j` of a request: the same parameters, its own seed (when seeded, `seed + j`).
fn choice_params(params: &SamplingParams, j: usize) -> SamplingParams {
    let mut p = params.clone();
    if let (Some(seed), true) = (p.seed, j > 0) {
        p.seed = Some(seed.wrapping_add(j as u64));
    }
    p
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Admits the plan's jobs as one request and starts them all.
async fn execute(state: AppState, caller: Caller, plan: Plan) -> Result<Response, ApiError> {
    let prompt_tokens: Vec<usize> = plan.jobs.iter().map(|j| j.2.prompt_ids.len()).collect();
    let capacity = state.pool.decode_capacity();
    let admitted = state
        .admission
        .admit(caller, &prompt_tokens, capacity)
        .inspect_err(|e| {
            for _ in &plan.jobs {
                outcome::rejected(outcome::reason_of(e));
            }
        })?;
    let mut streams = Vec::with_capacity(plan.jobs.len());
    let mut usage = UsageCount::new(plan.jobs.iter().map(|j| j.1 + 1).max().unwrap_or(0));
    let mut tickets = admitted.tickets.into_iter();
    // The decode node each prompt's first choice went to: its other choices follow it.
    let mut nodes: HashMap<usize, String> = HashMap::new();
    for (k, ((index, prompt, job, echo), ticket)) in plan.jobs.iter().zip(&mut tickets).enumerate()
    {
        usage.prompt_tokens[*prompt] = job.prompt_ids.len() as u32;
        let job = Job {
            decode_node: nodes.get(prompt).cloned(),
            ..job.clone()
        };
        // Dropping the streams started so far (on `?`) cancels them.
        match state.dispatcher.start(job, ticket).await {
            Ok(started) => {
                nodes.entry(*prompt).or_insert(started.decode_node);
                streams.push((*index, *prompt, echo.clone(), started.stream));
            }
            Err(e) => {
                // This job counted its own refusal; the ones never started are refused too.
                for _ in k + 1..plan.jobs.len() {
                    outcome::rejected(outcome::reason_of(&e));
                }
                return Err(e.into());
            }
        }
    }
    let tokenizer = state.frontend.tokenizer().ok().cloned();
    let presenter = Presenter {
        kind: plan.kind,
        id: plan.id,
        created: plan.created,
        model: plan.model,
        logprobs: plan.logprobs,
        tokenizer,
    };
    if plan.stream {
        Ok(stream_sse(presenter, streams, usage, plan.include_usage).into_response())
    } else {
        collect(presenter, streams, usage).await
    }
}

/// Formats messages as OpenAI objects.
struct Presenter {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    tokenizer: Option<std::sync::Arc<Tokenizer>>,
}

impl Presenter {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self
            .tokenizer
            .as_ref()
            .and_then(|t| t.token_bytes(id).ok())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// Logprobs of some tokens in the endpoint's format; `offset` is the text offset so far.
    fn logprobs(&self, entries: &[pb::TokenLogprobs], offset: &mut usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let (token, bytes) = self.token_text(e.token_id);
                        let top: Vec<Value> = e
                            .top
                            .iter()
                            .map(|t| {
                                let (token, bytes) = self.token_text(t.token_id);
                                json!({"token": token, "logprob": t.logprob, "bytes": bytes})
                            })
                            .collect();
                        json!({"token": token, "logprob": e.logprob, "bytes": bytes, "top_logprobs": top})
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Completion => {
                let mut tokens = Vec::new();
                let mut token_logprobs = Vec::new();
                let mut top_logprobs = Vec::new();
                let mut text_offset = Vec::new();
                for e in entries {
                    let (token, _) = self.token_text(e.token_id);
                    text_offset.push(*offset);
                    *offset += token.len();
                    tokens.push(token);
                    token_logprobs.push(e.logprob);
                    let top: serde_json::Map<String, Value> = e
                        .top
                        .iter()
                        .map(|t| (self.token_text(t.token_id).0, json!(t.logprob)))
                        .collect();
                    top_logprobs.push(Value::Object(top));
                }
                json!({
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top_logprobs,
                    "text_offset": text_offset,
                })
            }
        }
    }
}

fn finish_reason(c: &pb::Completion) -> &'static str {
    reason_name(c.finish_reason())
}

fn reason_name(reason: pb::FinishReason) -> &'static str {
    match reason {
        pb::FinishReason::Length => "length",
        pb::FinishReason::Cancelled => "abort",
        pb::FinishReason::Stop | pb::FinishReason::Unspecified => "stop",
    }
}

impl Presenter {
    /// The choices of one beam search's answer, from choice `index` on (as whole chunks when
    /// streaming).
    fn beam_choices(
        &self,
        index: usize,
        echo: &str,
        beams: &[pb::Beam],
        chunk: bool,
    ) -> Vec<Value> {
        beams
            .iter()
            .enumerate()
            .map(|(b, beam)| {
                let text = format!("{echo}{}", beam.text);
                let logprobs = self.logprobs(&beam.logprobs, &mut 0);
                let reason = reason_name(beam.finish_reason());
                match (self.kind, chunk) {
                    (Kind::Completion, _) => json!({
                        "index": index + b, "text": text, "logprobs": logprobs,
                        "finish_reason": reason,
                    }),
                    (Kind::Chat, false) => json!({
                        "index": index + b,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": reason,
                    }),
                    (Kind::Chat, true) => json!({
                        "index": index + b,
                        "delta": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": reason,
                    }),
                }
            })
            .collect()
    }
}

/// The token counts of one response. A prompt counts once however many choices it has; its
/// cached tokens are the fewest any of its choices found (what it did not have to compute).
struct UsageCount {
    prompt_tokens: Vec<u32>,
    cached_tokens: Vec<Option<u32>>,
    completion_tokens: u32,
}

impl UsageCount {
    fn new(prompts: usize) -> Self {
        Self {
            prompt_tokens: vec![0; prompts],
            cached_tokens: vec![None; prompts],
            completion_tokens: 0,
        }
    }

    /// Counts the final usage of one choice of prompt `prompt`.
    fn add(&mut self, prompt: usize, u: &pb::Usage) {
        self.completion_tokens += u.completion_tokens;
        if let Some(d) = &u.prompt_tokens_details {
            let c = &mut self.cached_tokens[prompt];
            *c = Some(c.map_or(d.cached_tokens, |c| c.min(d.cached_tokens)));
        }
    }

    fn to_json(&self) -> Value {
        let prompt_tokens: u32 = self.prompt_tokens.iter().sum();
        let cached_tokens: u32 = self.cached_tokens.iter().flatten().sum();
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        })
    }
}

async fn collect(
    p: Presenter,
    streams: Vec<(usize, usize, String, JobStream)>,
    mut usage: UsageCount,
) -> Result<Response, ApiError> {
    let mut choices = Vec::with_capacity(streams.len());
    for (index, prompt, echo, mut rx) in streams {
        let mut text = echo.clone();
        let mut entries = Vec::new();
        let mut reason = "stop";
        let mut beams = Vec::new();
        while let Some(message) = rx.recv().await {
            let m = message?;
            text.push_str(&m.text);
            entries.extend(m.logprobs);
            if let Some(c) = m.completion {
                reason = finish_reason(&c);
                if let Some(u) = &c.usage {
                    usage.add(prompt, u);
                }
                beams = c.beams;
            }
        }
        if !beams.is_empty() {
            choices.extend(p.beam_choices(index, &echo, &beams, false));
            continue;
        }
        let logprobs = p.logprobs(&entries, &mut 0);
        choices.push(match p.kind {
            Kind::Completion => json!({
                "index": index, "text": text, "logprobs": logprobs, "finish_reason": reason,
            }),
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": reason,
            }),
        });
    }
    let mut body = p.envelope(false, choices);
    body["usage"] = usage.to_json();
    Ok(Json(body).into_response())
}

/// What the SSE stream yields, per job message or at the end.
// Each item is made and consumed once as it passes through the stream: boxing the large
// variant would add an allocation per message and save nothing.
#[allow(clippy::large_enum_variant)]
enum Item {
    /// Choice index, prompt index, echoed text, the message.
    Message(usize, usize, String, Result<pb::GenerateResponse, Error>),
    End,
}

fn stream_sse(
    p: Presenter,
    streams: Vec<(usize, usize, String, JobStream)>,
    mut usage: UsageCount,
    include_usage: bool,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let ended = Arc::new(AtomicBool::new(false));
    let ended_check = ended.clone();
    let merged = select_all(streams.into_iter().map(|(index, prompt, echo, rx)| {
        let mut echo = Some(echo);
        ReceiverStream::new(rx)
            .map(move |m| Item::Message(index, prompt, echo.take().unwrap_or_default(), m))
    }))
    .chain(stream::once(async { Item::End }))
    .take_while(move |_| futures::future::ready(!ended_check.load(Ordering::Relaxed)));
    let mut offsets = std::collections::HashMap::<usize, usize>::new();
    let mut started = std::collections::HashSet::<usize>::new();
    let mut failed = false;
    let events = merged.flat_map(move |item| {
        let mut out: Vec<Event> = Vec::new();
        match item {
            Item::Message(..) if failed => {}
            Item::Message(_, _, _, Err(e)) => {
                // An error ends the response: the other choices' streams are dropped with it,
                // which cancels them.
                failed = true;
                ended.store(true, Ordering::Relaxed);
                out.push(json_event(&ApiError::from(e).body()));
                out.push(Event::default().data("[DONE]"));
            }
            Item::Message(index, prompt, echo, Ok(m))
                if m.completion.as_ref().is_some_and(|c| !c.beams.is_empty()) =>
            {
                // A beam search's answer comes whole: one chunk per beam.
                let c = m.completion.unwrap_or_default();
                if let Some(u) = &c.usage {
                    usage.add(prompt, u);
                }
                for choice in p.beam_choices(index, &echo, &c.beams, true) {
                    out.push(json_event(&p.envelope(true, vec![choice])));
                }
            }
            Item::Message(index, prompt, echo, Ok(m)) => {
                let offset = offsets.entry(index).or_default();
                let logprobs = p.logprobs(&m.logprobs, offset);
                let reason = m.completion.as_ref().map(finish_reason);
                if let Some(u) = m.completion.as_ref().and_then(|c| c.usage.as_ref()) {
                    usage.add(prompt, u);
                }
                let text = echo + &m.text;
                let choice = match p.kind {
                    Kind::Completion => json!({
                        "index": index, "text": text, "logprobs": logprobs, "finish_reason": reason,
                    }),
                    Kind::Chat => {
                        let mut delta = serde_json::Map::new();
                        if started.insert(index) {
                            delta.insert("role".into(), json!("assistant"));
                        }
                        if !text.is_empty() || delta.contains_key("role") {
                            delta.insert("content".into(), json!(text));
                        }
                        json!({
                            "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
                        })
                    }
                };
                // Messages with nothing to say (a held-back character) are not sent.
                let empty = text.is_empty() && reason.is_none() && !p.logprobs
                    && !(p.kind == Kind::Chat && choice["delta"].get("role").is_some());
                if !empty {
                    out.push(json_event(&p.envelope(true, vec![choice])));
                }
            }
            Item::End if failed => {}
            Item::End => {
                if include_usage {
                    let mut last = p.envelope(true, Vec::new());
                    last["usage"] = usage.to_json();
                    out.push(json_event(&last));
                }
                out.push(Event::default().data("[DONE]"));
            }
        }
        stream::iter(out.into_iter().map(Ok))
    });
    Sse::new(events)
}

fn json_event(value: &Value) -> Event {
    Event::default().data(value.to_string())
}
