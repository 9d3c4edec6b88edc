//! `pd-bench serve`: a load generator for any OpenAI-compatible server (ours, vLLM, SGLang,
//! llama-server, ...), with the flags and result keys of `vllm bench serve` so that results
//! compare directly. Requests arrive as a Poisson process (or a gamma process with
//! `--burstiness`), or all at once; `--max-concurrency` caps how many are in flight.
//!
//! Before the run one request is sent alone: if the server is down or answers badly the
//! benchmark stops there with the server's reason instead of recording a thousand failures.

pub mod client;
pub mod dataset;
pub mod metrics;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pd_common::tokenizer::Tokenizer;
use rand::SeedableRng;
use rand_distr::Distribution;
use serde_json::{json, Map, Value};

use client::{Api, RequestOutput, RequestTemplate};
use dataset::DatasetArgs;
use metrics::{Goodput, Selection};

#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// The server, e.g. `http://127.0.0.1:8000` (else `http://--host:--port`).
    #[arg(long)]
    pub base_url: Option<String>,

    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// `/v1/completions` or `/v1/chat/completions`.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,

    /// `openai` (completions) or `openai-chat` (default: what --endpoint names).
    #[arg(long)]
    pub backend: Option<String>,

    /// The model named in each request (default: the first one the server's `/v1/models` lists).
    #[arg(long)]
    pub model: Option<String>,

    /// The tokenizer that builds prompts and counts tokens: a GGUF file, a `tokenizer.json`, or
    /// a folder holding one (default: the model pd-cluster serves).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    #[command(flatten)]
    pub dataset: DatasetArgs,

    /// Requests in the run.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,

    /// Requests per second, arriving as a Poisson process (`inf`: all at once).
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,

    /// Gamma shape of the gaps between arrivals: 1 is Poisson, below 1 burstier, above 1
    /// more regular; the mean rate stays --request-rate.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,

    /// Most requests in flight at once (default: no cap).
    #[arg(long)]
    pub max_concurrency: Option<usize>,

    /// SLOs that make a request "good": `ttft:MS`, `tpot:MS`, `e2el:MS`.
    #[arg(long, num_args = 1.., value_name = "KEY:MS")]
    pub goodput: Vec<String>,

    /// Metrics whose percentiles are reported: of ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,

    /// Percentiles reported, comma-separated.
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,

    /// Writes the result as JSON.
    #[arg(long)]
    pub save_result: bool,

    /// Folder of the result file (default: the current one).
    #[arg(long)]
    pub result_dir: Option<PathBuf>,

    /// Name of the result file (default: `{label}-{rate}qps[-concurrency{N}]-{model}-{date}.json`).
    #[arg(long)]
    pub result_filename: Option<String>,

    /// Seed of the dataset and of the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Asks the server to generate every requested token (`ignore_eos`).
    #[arg(long)]
    pub ignore_eos: bool,

    /// Sampling temperature sent with every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// A JSON object merged into every request's body (e.g. `{"top_k": 1}`).
    #[arg(long)]
    pub extra_body: Option<String>,

    /// Seconds a request may take before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,

    /// Seconds to keep retrying the first request while the server starts (0: one try).
    #[arg(long, default_value_t = 0.0)]
    pub ready_check_timeout_sec: f64,

    /// No progress bar.
    #[arg(long)]
    pub disable_tqdm: bool,

    /// Names the run in its result (default: the backend).
    #[arg(long)]
    pub label: Option<String>,

    /// `KEY=VALUE` pairs stored in the result.
    #[arg(long, num_args = 1..)]
    pub metadata: Vec<String>,
}

impl ServeArgs {
    /// Parses `pd-bench serve` flags (without the program name).
    pub fn from_flags<I, S>(flags: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("pd-bench serve"))
            .chain(flags.into_iter().map(Into::into));
        Ok(Cli::try_parse_from(argv)?.serve)
    }

    fn base_url(&self) -> String {
        match &self.base_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}:{}", self.host, self.port),
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run_async(&args))?;
    let selection = Selection::parse(&args.percentile_metrics, &args.metric_percentiles)?;
    metrics::print_table(&result, &selection);
    if args.save_result {
        let path = save(&args, &result)?;
        eprintln!("result written to {}", path.display());
    }
    Ok(())
}

/// Loads `--tokenizer` (or the default model's).
pub fn load_tokenizer(path: Option<&std::path::Path>) -> anyhow::Result<Arc<Tokenizer>> {
    let path = path
        .map(PathBuf::from)
        .unwrap_or_else(pd_common::model::default_model_path);
    let json = if path.is_dir() {
        Some(path.join("tokenizer.json"))
    } else if path.extension().is_some_and(|e| e == "json") {
        Some(path.clone())
    } else {
        None
    };
    let tokenizer = match json {
        Some(j) => Some(Arc::new(Tokenizer::from_tokenizer_json(&j)?)),
        None => {
            pd_common::model::load_text(&pd_common::model::ModelSource::Gguf(path.clone()))
                .with_context(|| format!("reading the tokenizer of {}", path.display()))?
                .tokenizer
        }
    };
    tokenizer.ok_or_else(|| anyhow::anyhow!("{} has no tokenizer", path.display()))
}

/// Runs the benchmark and returns its result (`run` prints it as vLLM prints it).
pub async fn run_async(args: &ServeArgs) -> anyhow::Result<Map<String, Value>> {
    let api = Api::resolve(args.backend.as_deref(), &args.endpoint)?;
    let selection = Selection::parse(&args.percentile_metrics, &args.metric_percentiles)?;
    let goodput = Goodput::parse(&args.goodput)?;
    // Bad rates are refused before the server is asked anything.
    arrival_offsets(1, args.request_rate, args.burstiness, args.seed)?;
    if args.max_concurrency == Some(0) {
        anyhow::bail!("--max-concurrency must be at least 1");
    }
    let tokenizer = load_tokenizer(args.tokenizer.as_deref())?;
    let requests = dataset::build(&args.dataset, args.num_prompts, &tokenizer, args.seed)?;
    let base = args.base_url();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()?;
    let ready_by = Instant::now() + Duration::from_secs_f64(args.ready_check_timeout_sec.max(0.0));
    let model = match &args.model {
        Some(m) => m.clone(),
        None => loop {
            match first_model(&http, &base).await {
                Ok(m) => break m,
                Err(e) if Instant::now() >= ready_by => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        },
    };
    let extra_body = match &args.extra_body {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(m)) => m,
            _ => anyhow::bail!("--extra-body must be a JSON object, got {text:?}"),
        },
    };
    let template = Arc::new(RequestTemplate {
        extra_body,
        url: format!("{base}{}", args.endpoint),
        api,
        model: model.clone(),
        temperature: args.temperature,
        ignore_eos: args.ignore_eos,
        api_key: std::env::var("OPENAI_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
        timeout: Duration::from_secs_f64(args.request_timeout),
    });
    ready_check(&http, &template, ready_by).await?;

    eprintln!(
        "Traffic request rate: {}\nBurstiness factor: {}{}\nMaximum request concurrency: {}",
        args.request_rate,
        args.burstiness,
        if args.burstiness == 1.0 {
            " (Poisson process)"
        } else {
            ""
        },
        args.max_concurrency
            .map_or("None".into(), |c| c.to_string()),
    );
    let arrivals = arrival_offsets(
        requests.len(),
        args.request_rate,
        args.burstiness,
        args.seed,
    )?;
    let progress = progress_bar(requests.len(), args.disable_tqdm);
    let limit = args
        .max_concurrency
        .map(|c| Arc::new(tokio::sync::Semaphore::new(c)));
    let start = Instant::now();
    let tasks: Vec<_> = requests
        .iter()
        .zip(&arrivals)
        .map(|(req, &offset)| {
            let (template, http, limit, progress) = (
                template.clone(),
                http.clone(),
                limit.clone(),
                progress.clone(),
            );
            let req = req.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until((start + Duration::from_secs_f64(offset)).into()).await;
                let _permit = match &limit {
                    Some(s) => Some(s.clone().acquire_owned().await),
                    None => None,
                };
                let out = template
                    .send(&http, &req.prompt, req.prompt_len, req.output_len, start)
                    .await;
                progress.inc(1);
                out
            })
        })
        .collect();
    let mut outputs: Vec<RequestOutput> = Vec::with_capacity(tasks.len());
    for t in futures::future::join_all(tasks).await {
        outputs.push(t.context("a request task panicked")?);
    }
    let duration = start.elapsed().as_secs_f64();
    progress.finish_and_clear();

    let count = |o: &RequestOutput| {
        dataset::count_tokens(&tokenizer, &o.generated_text).map_or(0, |ids| ids.len())
    };
    let mut result = metrics::summarize(&outputs, duration, &selection, goodput.as_ref(), count);
    if let Some(first) = outputs.iter().find(|o| !o.success) {
        eprintln!("first failure: {}", first.error);
    }
    let mut head = Map::new();
    head.insert(
        "date".into(),
        json!(chrono::Local::now().format("%Y%m%d-%H%M%S").to_string()),
    );
    head.insert("backend".into(), json!(api.name()));
    head.insert(
        "label".into(),
        json!(args.label.clone().unwrap_or_else(|| api.name().into())),
    );
    head.insert("base_url".into(), json!(base));
    head.insert("endpoint".into(), json!(args.endpoint));
    head.insert("model_id".into(), json!(model));
    head.insert(
        "tokenizer_id".into(),
        json!(args.tokenizer.as_ref().map_or_else(
            || pd_common::model::default_model_path().display().to_string(),
            |p| p.display().to_string(),
        )),
    );
    head.insert("dataset_name".into(), json!(args.dataset.dataset_name));
    head.insert("num_prompts".into(), json!(args.num_prompts));
    head.insert(
        "request_rate".into(),
        if args.request_rate.is_finite() {
            json!(args.request_rate)
        } else {
            json!("inf")
        },
    );
    head.insert("burstiness".into(), json!(args.burstiness));
    head.insert("max_concurrency".into(), json!(args.max_concurrency));
    if let Some(g) = &goodput {
        head.insert(
            "goodput".into(),
            json!({"ttft": g.ttft_ms, "tpot": g.tpot_ms, "e2el": g.e2el_ms}),
        );
    }
    for kv in &args.metadata {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--metadata {kv:?}: expected KEY=VALUE"))?;
        head.insert(k.to_string(), json!(v));
    }
    head.append(&mut result);
    Ok(head)
}

/// Writes `result` where --result-dir/--result-filename say, vLLM's file name by default.
pub fn save(args: &ServeArgs, result: &Map<String, Value>) -> anyhow::Result<PathBuf> {
    let name = match &args.result_filename {
        Some(n) => n.clone(),
        None => {
            let label = result["label"].as_str().unwrap_or("openai");
            let model = result["model_id"].as_str().unwrap_or("model");
            let model = model.rsplit('/').next().unwrap_or(model);
            let concurrency = args
                .max_concurrency
                .map_or(String::new(), |c| format!("-concurrency{c}"));
            format!(
                "{label}-{:?}qps{concurrency}-{model}-{}.json",
                args.request_rate,
                result["date"].as_str().unwrap_or("now")
            )
        }
    };
    let dir = args
        .result_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Seconds from the start at which each request is sent: the cumulative sum of gamma-distributed
/// gaps of mean `1/rate` (shape `burstiness`), as `vllm bench serve` draws them; all zero for an
/// infinite rate.
pub fn arrival_offsets(
    n: usize,
    rate: f64,
    burstiness: f64,
    seed: u64,
) -> anyhow::Result<Vec<f64>> {
    if rate.is_nan() || rate <= 0.0 {
        anyhow::bail!("--request-rate must be above 0 (or inf), got {rate}");
    }
    if !(burstiness > 0.0 && burstiness.is_finite()) {
        anyhow::bail!("--burstiness must be a positive number, got {burstiness}");
    }
    if rate.is_infinite() {
        return Ok(vec![0.0; n]);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_a11e);
    let gamma = rand_distr::Gamma::new(burstiness, 1.0 / (rate * burstiness))
        .map_err(|e| anyhow::anyhow!("arrivals at rate {rate}, burstiness {burstiness}: {e}"))?;
    let mut t = 0.0;
    Ok((0..n)
        .map(|_| {
            let at = t;
            t += gamma.sample(&mut rng);
            at
        })
        .collect())
}

async fn first_model(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let url = format!("{base}/v1/models");
    let v: Value = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("asking {url} for the model's name (or give --model)"))?
        .error_for_status()
        .with_context(|| format!("asking {url} for the model's name (or give --model)"))?
        .json()
        .await
        .with_context(|| format!("{url} answered something that is not a model list"))?;
    v.pointer("/data/0/id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{url} lists no model: give --model"))
}

/// One short request alone before the run: a server that is down or answers badly stops the
/// benchmark here, with its reason. Its prompt is shorter than a KV block and in no dataset,
/// so a prefix cache cannot serve the run's first prompt from it.
async fn ready_check(
    http: &reqwest::Client,
    template: &RequestTemplate,
    deadline: Instant,
) -> anyhow::Result<()> {
    eprintln!("Starting initial single prompt test run...");
    loop {
        let out = template
            .send(http, "Hello, are you there?", 6, 4, Instant::now())
            .await;
        if out.success {
            eprintln!("Initial test run completed. Starting main benchmark run...");
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "initial test run failed against {} (check the server and the benchmark's flags): {}",
                template.url,
                out.error
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn progress_bar(n: usize, disabled: bool) -> indicatif::ProgressBar {
    if disabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{percent:>3}%|{wide_bar}| {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}]",
    ) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_have_the_asked_rate_and_burstiness() {
        let n = 20_000;
        let gaps = |b: f64| {
            let at = arrival_offsets(n, 4.0, b, 1).unwrap();
            at.windows(2).map(|w| w[1] - w[0]).collect::<Vec<f64>>()
        };
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        let cv = |xs: &[f64]| {
            let m = mean(xs);
            (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64).sqrt() / m
        };
        let poisson = gaps(1.0);
        assert!((mean(&poisson) - 0.25).abs() < 0.01, "{}", mean(&poisson));
        assert!((cv(&poisson) - 1.0).abs() < 0.05, "exponential gaps: cv 1");
        let bursty = gaps(0.25);
        assert!((mean(&bursty) - 0.25).abs() < 0.02);
        assert!(
            (cv(&bursty) - 2.0).abs() < 0.15,
            "gamma(k) gaps: cv 1/sqrt(k)"
        );
        assert_eq!(
            arrival_offsets(3, f64::INFINITY, 1.0, 0).unwrap(),
            [0.0, 0.0, 0.0]
        );
        for (rate, b) in [
            (0.0, 1.0),
            (-1.0, 1.0),
            (f64::NAN, 1.0),
            (1.0, 0.0),
            (1.0, f64::INFINITY),
        ] {
            assert!(
                arrival_offsets(3, rate, b, 0).is_err(),
                "rate {rate}, burstiness {b}"
            );
        }
        assert_eq!(
            arrival_offsets(5, 2.0, 1.0, 7).unwrap(),
            arrival_offsets(5, 2.0, 1.0, 7).unwrap()
        );
    }

    #[test]
    fn flags_parse_with_vllms_names() {
        let a = ServeArgs::from_flags([
            "--base-url",
            "http://h:1/",
            "--endpoint",
            "/v1/chat/completions",
            "--request-rate",
            "inf",
            "--goodput",
            "ttft:500",
            "tpot:50",
            "--metric-percentiles",
            "50,90,99",
            "--random-input-len",
            "32",
        ])
        .unwrap();
        assert_eq!(a.base_url(), "http://h:1");
        assert!(a.request_rate.is_infinite());
        assert_eq!(a.goodput, ["ttft:500", "tpot:50"]);
        assert_eq!(a.dataset.random_input_len, 32);
        assert!(ServeArgs::from_flags(["--num-prompts", "x"]).is_err());
    }
}
