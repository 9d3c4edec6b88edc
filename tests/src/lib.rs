//! pd-tests: shared helpers for the end-to-end tests (the real model, the golden cases, running
//! an engine to completion) and the `pd-bench` benchmark.

pub mod bench;
pub mod cluster;
pub mod containers;

use std::path::PathBuf;
use std::sync::OnceLock;

use pd_common::engine::{
    BeamOutput, EngineConfig, EngineCore, GenerateRequest, SeqEvent, SpeculativeCounts,
};
use pd_common::model::{self, LoadedModel, ModelSource};
use pd_common::sampling::FinishReason;
use serde::Deserialize;
use tokio::sync::mpsc;

/// The fetched SmolLM2 GGUF, loaded once per test binary.
pub fn real_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = model::default_model_path();
        assert!(
            path.exists(),
            "model file {} is missing: run deploy/fetch-model.sh first",
            path.display()
        );
        model::load(&ModelSource::Gguf(path), &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("loading the model: {e}"))
    })
}

/// An engine over the real model.
pub fn real_engine(config: EngineConfig) -> EngineCore {
    let m = real_model();
    EngineCore::new(m.model.clone(), m.tokenizer.clone(), config)
        .unwrap_or_else(|e| panic!("starting the engine: {e}"))
}

/// One case of the reference outputs produced by llama.cpp (see tests/data/README.md).
#[derive(Debug, Clone, Deserialize)]
pub struct GoldenCase {
    pub name: String,
    pub template: bool,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub generated_text: String,
    pub top_logits: Vec<GoldenLogits>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GoldenLogits {
    pub pos: usize,
    pub top5: Vec<GoldenLogit>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GoldenLogit {
    pub id: u32,
    pub logit: f32,
}

pub fn golden_cases() -> Vec<GoldenCase> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/smollm2_q4_1_greedy.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("golden line: {e}")))
        .collect()
}

/// What one request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    pub ids: Vec<u32>,
    pub text: String,
    pub reason: FinishReason,
    /// Prompt tokens the prefix cache supplied.
    pub cached_tokens: usize,
    /// Each token's log-probability.
    pub logprobs: Vec<f32>,
    /// Drafted and accepted tokens, with speculative decoding on.
    pub speculative: Option<SpeculativeCounts>,
    /// Each token's top-n alternatives, when logprobs were asked for.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// A beam search's answer, best first.
    pub beams: Vec<BeamOutput>,
}

/// One request's stream and what it has delivered so far.
struct Stream {
    events: mpsc::UnboundedReceiver<SeqEvent>,
    ids: Vec<u32>,
    text: String,
    reason: Option<FinishReason>,
    cached_tokens: usize,
    logprobs: Vec<f32>,
    speculative: Option<SpeculativeCounts>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
    beams: Vec<BeamOutput>,
}

/// Streams of requests added to an engine.
pub struct Runs {
    streams: Vec<Stream>,
}

impl Runs {
    pub fn new() -> Self {
        Self {
            streams: Vec::new(),
        }
    }

    /// Adds a request; returns its index.
    pub fn add(&mut self, core: &mut EngineCore, request: GenerateRequest) -> usize {
        let (tx, rx) = mpsc::unbounded_channel();
        core.add_request(request, tx)
            .unwrap_or_else(|e| panic!("request refused: {e}"));
        self.streams.push(Stream {
            events: rx,
            ids: Vec::new(),
            text: String::new(),
            reason: None,
            cached_tokens: 0,
            logprobs: Vec::new(),
            speculative: None,
            top_logprobs: Vec::new(),
            beams: Vec::new(),
        });
        self.streams.len() - 1
    }

    /// Runs `steps` engine steps (or until idle), collecting events.
    pub fn step(&mut self, core: &mut EngineCore, steps: usize) {
        for _ in 0..steps {
            if !core.has_work() {
                break;
            }
            core.step()
                .unwrap_or_else(|e| panic!("engine step failed: {e}"));
            self.drain();
        }
    }

    pub fn finish(mut self, core: &mut EngineCore) -> Vec<RunResult> {
        while core.has_work() {
            self.step(core, 1);
        }
        self.drain();
        self.streams
            .into_iter()
            .map(|s| RunResult {
                ids: s.ids,
                text: s.text,
                cached_tokens: s.cached_tokens,
                logprobs: s.logprobs,
                speculative: s.speculative,
                top_logprobs: s.top_logprobs,
                beams: s.beams,
                reason: s
                    .reason
                    .unwrap_or_else(|| panic!("a request never finished")),
            })
            .collect()
    }

    fn drain(&mut self) {
        for Stream {
            events,
            ids,
            text,
            reason,
            cached_tokens,
            logprobs,
            speculative,
            top_logprobs,
            beams,
        } in &mut self.streams
        {
            while let Ok(event) = events.try_recv() {
                match event {
                    SeqEvent::Token(t) => {
                        ids.push(t.id);
                        logprobs.push(t.logprob);
                        top_logprobs.push(t.top_logprobs);
                        text.push_str(&t.text);
                    }
                    SeqEvent::Finished(c) => {
                        text.push_str(&c.text);
                        *reason = Some(c.reason);
                        *cached_tokens = c.cached_tokens;
                        *speculative = c.speculative;
                        *beams = c.beams;
                    }
                    SeqEvent::Failed(e) => panic!("request failed: {e}"),
                }
            }
        }
    }
}

impl Default for Runs {
    fn default() -> Self {
        Self::new()
    }
}

/// Length of the common prefix of two token lists.
pub fn match_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
