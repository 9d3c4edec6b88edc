//! pd-generate: the single-process engine on the command line. Streams the answer to one prompt,
//! runs a file of prompts concurrently through the continuous-batching engine, or, with `--json`,
//! prints machine-readable results (`generated_ids`, `generated_text`, usage and speed).

use std::io::Write;
use std::path::PathBuf;

use std::time::Instant;

use clap::Parser;
use pd_engine::chat_template::ChatMessage;
use pd_engine::engine::{EngineConfig, EngineCore, GenerateRequest, SeqEvent};
use pd_engine::model::{self, ModelSource};
use pd_engine::sampling::SamplingParams;
use serde::Serialize;
use tokio::sync::mpsc;

/// glibc's allocator hands large freed blocks back to the kernel and faults them in again on the
/// next step, which halved decode speed after a long prefill; mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "pd-generate",
    version,
    about = "Generate text with the single-process engine"
)]
struct Args {
    /// A GGUF file, a Hugging Face folder, or `dummy:<shape>` (default: the fetched SmolLM2 GGUF).
    #[arg(long, env = "PD_MODEL")]
    model: Option<String>,

    /// A user message, rendered with the model's chat template (unless --raw).
    #[arg(long, conflicts_with_all = ["messages", "prompts_file", "prompt_ids"])]
    prompt: Option<String>,

    /// Chat messages as JSON: [{"role": "system", "content": "..."}, ...].
    #[arg(long, conflicts_with_all = ["prompts_file", "prompt_ids"])]
    messages: Option<String>,

    /// A file with one user message per line, all run concurrently.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompts_file: Option<PathBuf>,

    /// Raw prompt token ids, comma-separated (no template, no tokenizer needed).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,

    /// Use --prompt / --prompts-file text as is, without the chat template.
    #[arg(long)]
    raw: bool,

    /// A system message for chat prompts.
    #[arg(long)]
    system: Option<String>,

    /// Print one JSON object per prompt instead of streaming text.
    #[arg(long)]
    json: bool,

    /// Most tokens to generate per prompt.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,

    #[arg(long, default_value_t = 0)]
    top_k: u32,

    #[arg(long, default_value_t = 1.0)]
    top_p: f32,

    #[arg(long, default_value_t = 0.0)]
    min_p: f32,

    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,

    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,

    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,

    /// Seed for sampling (random when absent).
    #[arg(long)]
    seed: Option<u64>,

    /// A stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,

    /// Report this many top log-probabilities per token (JSON mode).
    #[arg(long)]
    logprobs: Option<u32>,

    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,

    /// Beam search with this many beams instead of sampling (vLLM's `beam_width`); the best
    /// beam is the output, and with --json all of them are listed under "beams".
    #[arg(long, default_value_t = 0)]
    beam_width: u32,

    /// Beam search ranks a beam by cumulative logprob / generated_len^length_penalty.
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,

    #[command(flatten)]
    engine: EngineConfig,
}

#[derive(Serialize, Default)]
struct Output {
    generated_ids: Vec<u32>,
    generated_text: String,
    finish_reason: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    logprobs: Vec<TokenLogprobs>,
    time_to_first_token_s: f64,
    prompt_tokens_per_s: f64,
    generation_tokens_per_s: f64,
    /// With --speculative-config: tokens drafted and accepted for this prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    speculative: Option<Speculative>,
    /// With --beam-width: every beam returned, best first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    beams: Vec<Beam>,
}

#[derive(Serialize)]
struct Beam {
    token_ids: Vec<u32>,
    text: String,
    cumulative_logprob: f32,
    score: f32,
    finish_reason: String,
}

#[derive(Serialize)]
struct Speculative {
    drafted: u32,
    accepted: u32,
}

#[derive(Serialize)]
struct TokenLogprobs {
    id: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        std::process::exit(match e.kind() {
            pd_engine::ErrorKind::InvalidArgument | pd_engine::ErrorKind::ResourceExhausted => 2,
            _ => 1,
        });
    }
}

fn run(args: Args) -> pd_engine::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PD_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let source: ModelSource = match &args.model {
        Some(m) => m.parse()?,
        None => ModelSource::Gguf(model::default_model_path()),
    };
    let loaded = model::load(&source, &candle_core::Device::Cpu)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        logprobs: args.logprobs,
        ignore_eos: args.ignore_eos,
        beam_width: args.beam_width,
        length_penalty: args.length_penalty,
        ..SamplingParams::default()
    };
    let prompts = prompts(&args, &loaded)?;
    let mut core = EngineCore::new(
        loaded.model.clone(),
        loaded.tokenizer.clone(),
        args.engine.clone(),
    )?;
    let started = Instant::now();
    let mut streams = Vec::with_capacity(prompts.len());
    for prompt_ids in prompts {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = GenerateRequest {
            prompt_ids,
            params: params.clone(),
            ..Default::default()
        };
        core.add_request(request, tx)?;
        streams.push((rx, Output::default(), false));
    }
    // Stream text live only when there is one prompt and a person reading it.
    let live = streams.len() == 1 && !args.json;
    let mut stdout = std::io::stdout();
    loop {
        let busy = core.has_work();
        if busy {
            core.step()?;
        }
        for (rx, out, done) in &mut streams {
            while let Ok(event) = rx.try_recv() {
                match event {
                    SeqEvent::Token(t) => {
                        out.generated_ids.push(t.id);
                        out.generated_text.push_str(&t.text);
                        if args.logprobs.is_some() {
                            out.logprobs.push(TokenLogprobs {
                                id: t.id,
                                logprob: t.logprob,
                                top: t.top_logprobs,
                            });
                        }
                        if live {
                            print!("{}", t.text);
                            stdout.flush()?;
                        }
                    }
                    SeqEvent::Finished(c) => {
                        if let Some(best) = c.beams.first() {
                            out.generated_ids = best.token_ids.clone();
                        }
                        out.beams = c
                            .beams
                            .iter()
                            .map(|b| Beam {
                                token_ids: b.token_ids.clone(),
                                text: b.text.clone(),
                                cumulative_logprob: b.cumulative_logprob,
                                score: b.score,
                                finish_reason: b.reason.to_string(),
                            })
                            .collect();
                        out.generated_text.push_str(&c.text);
                        if live {
                            println!("{}", c.text);
                        }
                        out.finish_reason = c.reason.to_string();
                        out.prompt_tokens = c.prompt_tokens;
                        out.completion_tokens = c.completion_tokens;
                        out.speculative = c.speculative.map(|s| Speculative {
                            drafted: s.drafted,
                            accepted: s.accepted,
                        });
                        let ttft = c.timings.time_to_first_token.as_secs_f64();
                        let prefill = c.timings.prefill.as_secs_f64();
                        let decode = c.timings.total.as_secs_f64() - ttft;
                        out.time_to_first_token_s = ttft;
                        out.prompt_tokens_per_s = rate(c.prompt_tokens, prefill);
                        out.generation_tokens_per_s =
                            rate(c.completion_tokens.saturating_sub(1), decode);
                        *done = true;
                    }
                    SeqEvent::Failed(e) => return Err(e),
                }
            }
        }
        if !busy {
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (_, out, done) in &streams {
        if !done {
            return Err(pd_engine::Error::Internal(
                "a request never finished".into(),
            ));
        }
        prompt_tokens += out.prompt_tokens;
        completion_tokens += out.completion_tokens;
        if args.json {
            println!(
                "{}",
                serde_json::to_string(out)
                    .map_err(|e| pd_engine::Error::Internal(e.to_string()))?
            );
        } else if !live {
            println!("{}\n---", out.generated_text);
        }
    }
    if streams.len() == 1 {
        let out = &streams[0].1;
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s | generated: {} tokens, {:.1} tokens/s ({})",
            out.prompt_tokens,
            out.prompt_tokens_per_s,
            out.completion_tokens,
            out.generation_tokens_per_s,
            out.finish_reason
        );
    } else {
        eprintln!(
            "{} prompts: {prompt_tokens} prompt tokens, {completion_tokens} generated tokens in {elapsed:.2} s: {:.1} generated tokens/s",
            streams.len(),
            rate(completion_tokens, elapsed)
        );
    }
    Ok(())
}

fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// The prompts to run, as token ids.
fn prompts(args: &Args, loaded: &model::LoadedModel) -> pd_engine::Result<Vec<Vec<u32>>> {
    let chat = |user: &str| -> pd_engine::Result<Vec<u32>> {
        if args.raw {
            return loaded.encode_text(user);
        }
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", user));
        loaded.encode_chat(&messages)
    };
    if let Some(ids) = &args.prompt_ids {
        return Ok(vec![ids.clone()]);
    }
    if let Some(json) = &args.messages {
        let messages: Vec<ChatMessage> = serde_json::from_str(json)
            .map_err(|e| pd_engine::Error::invalid(format!("--messages: {e}")))?;
        return Ok(vec![loaded.encode_chat(&messages)?]);
    }
    if let Some(path) = &args.prompts_file {
        let text = std::fs::read_to_string(path)?;
        return text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(chat)
            .collect();
    }
    match &args.prompt {
        Some(p) => Ok(vec![chat(p)?]),
        None => Err(pd_engine::Error::invalid(
            "give --prompt, --messages, --prompts-file or --prompt-ids",
        )),
    }
}
