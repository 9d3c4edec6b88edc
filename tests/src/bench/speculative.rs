//! `pd-bench speculative`: decode speed of the single-process engine with prompt-lookup
//! speculation against plain decoding, on a copy-heavy workload (texts to repeat or to correct,
//! where the answer mostly copies the prompt), at several batch sizes. Both configurations run
//! the same requests in one process, one after the other; the greedy outputs must be identical.

use std::time::Instant;

use anyhow::{bail, Context};
use pd_common::chat_template::ChatMessage;
use pd_common::engine::{EngineConfig, EngineCore, GenerateRequest, SeqEvent, SpeculativeConfig};
use pd_common::model::{self, LoadedModel, ModelSource};
use pd_common::sampling::SamplingParams;

use super::{load_average, median, JsonLines};

#[derive(Debug, clap::Args)]
pub struct SpeculativeArgs {
    /// A GGUF file or a Hugging Face folder (default: the fetched SmolLM2 GGUF).
    #[arg(long, env = "PD_MODEL")]
    pub model: Option<String>,

    /// The speculative configuration measured against plain decoding.
    #[arg(
        long,
        default_value = r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}"#
    )]
    pub speculative_config: SpeculativeConfig,

    /// Numbers of sequences decoding together.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,

    /// Most tokens generated per request (each ends at the model's end-of-generation token).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,

    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,

    /// Append each row as a JSON object to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Texts the requests ask the model to repeat or to correct.
const TEXTS: [&str; 8] = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs into the forest, and the birds sing in the tall green trees.",
    "To install the package, open a terminal, change into the project folder and run the build script. When it finishes, the binaries are in the target folder.",
    "Our meeting is moved from Tuesday to Thursday at ten in the morning. Please bring the quarterly report and the list of open questions from last week.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water boils at a lower temperature there.",
    "The library opens at nine and closes at six on weekdays. On Saturdays it closes at noon, and it stays closed on Sundays and public holidays.",
    "Add two cups of flour, one cup of sugar and a pinch of salt to the bowl. Stir in the eggs and the milk, then bake the mixture for thirty minutes.",
    "The train to the airport leaves every fifteen minutes from platform four. The ride takes about twenty minutes, and tickets can be bought on board.",
    "Please remember to lock the door, switch off the lights and close the windows before you leave the office in the evening.",
];

/// The `i`-th request of the copy-heavy workload.
fn copy_request(
    loaded: &LoadedModel,
    i: usize,
    max_tokens: u32,
) -> anyhow::Result<GenerateRequest> {
    let text = TEXTS[i % TEXTS.len()];
    let ask = match i % 2 {
        0 => format!("Repeat this text exactly, word for word:\n\n{text}"),
        _ => format!("Correct any mistakes in this text and write it out in full:\n\n{text}"),
    };
    Ok(GenerateRequest {
        prompt_ids: loaded.encode_chat(&[ChatMessage::new("user", ask)])?,
        params: SamplingParams {
            temperature: 0.0,
            max_tokens,
            // The answer ends where the model ends it: past that it would generate junk, which
            // is not the workload.
            ignore_eos: false,
            ..SamplingParams::default()
        },
        ..Default::default()
    })
}

/// What one batch produced: each request's tokens, the decode rate (tokens after every
/// request's first one, over the time after the last first token) and drafting counts.
struct BatchRun {
    outputs: Vec<Vec<u32>>,
    decode_tokens_per_s: f64,
    acceptance_rate: f64,
    mean_accepted_length: f64,
    /// Mean time of a decode step (after every first token).
    step_ms: f64,
}

fn run_batch(core: &mut EngineCore, requests: Vec<GenerateRequest>) -> anyhow::Result<BatchRun> {
    let n = requests.len();
    let mut streams = Vec::new();
    for r in requests {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        core.add_request(r, tx)?;
        streams.push(rx);
    }
    let before = core.stats().spec_decode;
    let mut outputs = vec![Vec::new(); n];
    let mut decode_from: Option<(Instant, usize)> = None;
    let mut decode_steps = 0;
    while core.has_work() {
        core.step()?;
        decode_steps += usize::from(decode_from.is_some());
        for (out, rx) in outputs.iter_mut().zip(&mut streams) {
            while let Ok(event) = rx.try_recv() {
                match event {
                    SeqEvent::Token(t) => out.push(t.id),
                    SeqEvent::Finished(_) => {}
                    SeqEvent::Failed(e) => bail!("a request failed: {e}"),
                }
            }
        }
        if decode_from.is_none() && outputs.iter().all(|o| !o.is_empty()) {
            decode_from = Some((Instant::now(), outputs.iter().map(Vec::len).sum()));
        }
    }
    let (from, counted) = decode_from.context("no request produced a token")?;
    let tokens = outputs.iter().map(Vec::len).sum::<usize>() - counted;
    let stats = core.stats().spec_decode;
    let delta = pd_common::engine::SpecDecodeStats {
        drafts: stats.drafts - before.drafts,
        draft_tokens: stats.draft_tokens - before.draft_tokens,
        accepted_tokens: stats.accepted_tokens - before.accepted_tokens,
    };
    let seconds = from.elapsed().as_secs_f64();
    Ok(BatchRun {
        outputs,
        step_ms: seconds * 1e3 / decode_steps.max(1) as f64,
        decode_tokens_per_s: tokens as f64 / seconds,
        acceptance_rate: delta.acceptance_rate(),
        mean_accepted_length: delta.mean_accepted_length(),
    })
}

pub fn run(args: SpeculativeArgs) -> anyhow::Result<()> {
    let source: ModelSource = match &args.model {
        Some(m) => m.parse()?,
        None => ModelSource::Gguf(model::default_model_path()),
    };
    let loaded = model::load(&source, &candle_core::Device::Cpu)?;
    if loaded.chat_template.is_none() {
        bail!("the copy-heavy workload needs a model with a chat template");
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "pd-bench speculative: model {source}, {threads} CPU threads, {} new tokens per request",
        args.max_tokens
    );
    println!(
        "speculative config: {}",
        serde_json::to_string(&args.speculative_config)?
    );
    println!("load average before: {}", load_average());
    let mut json = JsonLines::open(args.json.as_deref())?;
    let core = |speculative: Option<SpeculativeConfig>| -> anyhow::Result<EngineCore> {
        // Every repeat runs the same prompts: the prefix cache would time lookups, not decoding.
        let config = EngineConfig {
            enable_prefix_caching: false,
            speculative_config: speculative,
            ..EngineConfig::default()
        };
        Ok(EngineCore::new(
            loaded.model.clone(),
            loaded.tokenizer.clone(),
            config,
        )?)
    };
    println!(
        "\n| batch | plain decode tokens/s | ngram decode tokens/s | speedup | acceptance rate | mean accepted length | plain step ms | ngram step ms | outputs identical | load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &batch in &args.batch {
        let requests = || {
            (0..batch)
                .map(|i| copy_request(&loaded, i, args.max_tokens))
                .collect::<anyhow::Result<Vec<_>>>()
        };
        let (mut plain, mut spec) = (Vec::new(), Vec::new());
        let (mut rate, mut length) = (0.0, 0.0);
        let (mut plain_step, mut spec_step) = (Vec::new(), Vec::new());
        let mut identical = true;
        // The first round warms up and is not counted.
        for round in 0..args.repeats + 1 {
            let p = run_batch(&mut core(None)?, requests()?)?;
            let s = run_batch(
                &mut core(Some(args.speculative_config.clone()))?,
                requests()?,
            )?;
            identical &= p.outputs == s.outputs;
            if round > 0 {
                plain.push(p.decode_tokens_per_s);
                spec.push(s.decode_tokens_per_s);
                (rate, length) = (s.acceptance_rate, s.mean_accepted_length);
                plain_step.push(p.step_ms);
                spec_step.push(s.step_ms);
            }
        }
        let (plain, spec) = (median(plain), median(spec));
        let (plain_step, spec_step) = (median(plain_step), median(spec_step));
        let load = load_average();
        println!(
            "| {batch} | {plain:.1} | {spec:.1} | {:.2} | {rate:.2} | {length:.2} | {plain_step:.1} | {spec_step:.1} | {} | {load} |",
            spec / plain,
            if identical { "yes" } else { "NO" }
        );
        json.write(&serde_json::json!({
            "bench": "speculative",
            "batch": batch,
            "max_tokens": args.max_tokens,
            "speculative_config": args.speculative_config,
            "plain_decode_tokens_per_s": plain,
            "speculative_decode_tokens_per_s": spec,
            "speedup": spec / plain,
            "acceptance_rate": rate,
            "mean_accepted_length": length,
            "plain_step_ms": plain_step,
            "speculative_step_ms": spec_step,
            "outputs_identical": identical,
            "load_average": load,
        }))?;
        if !identical {
            bail!("speculative greedy output differs from plain greedy output at batch {batch}");
        }
    }
    Ok(())
}
