//! The cluster simulator and planner.
//!
//! `pd-bench profile` measures what one engine costs on this machine (or reads a GPU profile
//! out of a GPU results file); `pd-bench simulate` runs the discrete-event model of [`des`] on
//! the workload `pd-bench serve` would send (same flags, same dataset, same arrival times) and
//! writes the same result keys; `--validate` also runs each point for real on a local cluster
//! and prints measured and predicted figures side by side. `pd-bench plan` searches P:D
//! layouts for the one that serves a workload within its SLOs on the fewest devices.

pub mod des;
pub mod measure;
pub mod plan;
pub mod profile;

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::serve::{self, dataset, metrics, ServeArgs};
use des::{Layout, SimRequest};
use profile::Profile;

#[derive(clap::Args, Clone, Debug)]
pub struct SimulateArgs {
    /// The device profile (`pd-bench profile`).
    #[arg(long)]
    pub profile: PathBuf,

    /// Layouts to simulate, each `aggregated`, `PpDd` (e.g. `1p1d`, `2p2d`) or `0pNd`.
    #[arg(long, value_delimiter = ',', default_value = "aggregated,1p1d,2p2d")]
    pub layouts: Vec<String>,

    /// Request rates to simulate (default: --request-rate alone).
    #[arg(long, value_delimiter = ',')]
    pub request_rates: Vec<f64>,

    /// Nodes sharing one host's compute (a `shared_host` profile); 0: all on one host, as a
    /// local cluster is.
    #[arg(long, default_value_t = 0)]
    pub nodes_per_host: usize,

    /// KV backend between prefill and decode nodes (a key of the profile's `transfer`).
    #[arg(long, default_value = "grpc")]
    pub kv_transfer: String,

    /// Also run every point on a real local cluster of processes and print both.
    #[arg(long)]
    pub validate: bool,

    /// Appends one JSON line per point (predicted and, with --validate, measured).
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// The workload, as `pd-bench serve` takes it (the server flags are ignored).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `aggregated`, `1p1d`, `2p4d`, ...
pub fn parse_layout(s: &str, nodes_per_host: usize) -> anyhow::Result<Layout> {
    if s == "aggregated" {
        return Ok(Layout {
            prefill: 0,
            decode: 1,
            nodes_per_host,
        });
    }
    let bad = || anyhow::anyhow!("layout {s:?}: expected `aggregated` or `<P>p<D>d` such as 1p1d");
    let (p, d) = s
        .strip_suffix('d')
        .and_then(|r| r.split_once('p'))
        .ok_or_else(bad)?;
    let layout = Layout {
        prefill: p.parse().map_err(|_| bad())?,
        decode: d.parse().map_err(|_| bad())?,
        nodes_per_host,
    };
    anyhow::ensure!(layout.decode > 0, "layout {s:?} has no decode node");
    Ok(layout)
}

pub fn layout_name(l: &Layout) -> String {
    if l.prefill == 0 && l.decode == 1 {
        "aggregated".into()
    } else {
        format!("{}p{}d", l.prefill, l.decode)
    }
}

/// The (prompt, output) lengths of the workload `args` defines, built as `serve` builds it.
pub fn lengths(args: &ServeArgs) -> anyhow::Result<Vec<(usize, usize)>> {
    let tokenizer = serve::load_tokenizer(args.tokenizer.as_deref())?;
    let requests = dataset::build(&args.dataset, args.num_prompts, &tokenizer, args.seed)?;
    Ok(requests
        .iter()
        .map(|r| (r.prompt_len, r.output_len))
        .collect())
}

/// Those requests arriving at `rate` as `serve` sends them (same gaps for the same seed).
pub fn at_rate(
    lengths: &[(usize, usize)],
    rate: f64,
    args: &ServeArgs,
) -> anyhow::Result<Vec<SimRequest>> {
    let arrivals = serve::arrival_offsets(lengths.len(), rate, args.burstiness, args.seed)?;
    Ok(lengths
        .iter()
        .zip(arrivals)
        .map(|(&(prompt_len, output_len), send_at)| SimRequest {
            send_at,
            prompt_len,
            output_len,
        })
        .collect())
}

/// One simulated point: the result under `vllm bench serve`'s keys.
pub fn predict(
    profile: &Profile,
    layout: Layout,
    backend: &str,
    requests: &[SimRequest],
    args: &ServeArgs,
) -> anyhow::Result<Map<String, Value>> {
    let link = if layout.prefill > 0 {
        Some(profile.link(backend)?)
    } else {
        None
    };
    let outputs = des::simulate(profile, layout, link, requests, args.max_concurrency)?;
    let duration = outputs
        .iter()
        .map(|o| o.start_time + o.latency)
        .fold(0.0, f64::max);
    let selection = metrics::Selection::parse(&args.percentile_metrics, &args.metric_percentiles)?;
    let goodput = metrics::Goodput::parse(&args.goodput)?;
    Ok(metrics::summarize(
        &outputs,
        duration,
        &selection,
        goodput.as_ref(),
        |_| 0,
    ))
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_async(args))
}

/// The figures compared between measured and predicted.
const COMPARED: [&str; 5] = [
    "output_throughput",
    "median_ttft_ms",
    "p90_ttft_ms",
    "median_tpot_ms",
    "p90_tpot_ms",
];

async fn run_async(mut args: SimulateArgs) -> anyhow::Result<()> {
    let profile = Profile::read(&args.profile)?;
    // The comparison needs p50 and p90 of TTFT and TPOT whatever was asked.
    args.serve.percentile_metrics = "ttft,tpot,itl,e2el".into();
    args.serve.metric_percentiles = "50,90,99".into();
    let rates = if args.request_rates.is_empty() {
        vec![args.serve.request_rate]
    } else {
        args.request_rates.clone()
    };
    let mut json_out = super::JsonLines::open(args.json.as_deref())?;
    println!(
        "profile {} on {}; {} requests of the {} dataset{}",
        profile.model,
        profile.device,
        args.serve.num_prompts,
        args.serve.dataset.dataset_name,
        if args.validate {
            format!(
                " (measured on this machine, load average {})",
                super::load_average()
            )
        } else {
            String::new()
        }
    );
    let header = format!(
        "{:<11} {:>6} {:>10} | {:>10} {:>10} {:>10} {:>10} {:>10}",
        "layout", "rate", "", "out tok/s", "TTFT p50", "TTFT p90", "TPOT p50", "TPOT p90"
    );
    println!("{header}");
    let mut worst: f64 = 0.0;
    let lengths = lengths(&args.serve)?;
    for name in &args.layouts {
        let layout = parse_layout(name, args.nodes_per_host)?;
        for &rate in &rates {
            let requests = at_rate(&lengths, rate, &args.serve)?;
            let predicted = predict(&profile, layout, &args.kv_transfer, &requests, &args.serve)?;
            print_row(name, rate, "predicted", &predicted);
            let mut line =
                json!({"layout": name, "request_rate": rate, "predicted": pick(&predicted)});
            if args.validate {
                let measured = measure(layout, &args, rate).await?;
                print_row(name, rate, "measured", &measured);
                let errors: Map<String, Value> = COMPARED
                    .iter()
                    .filter_map(|k| {
                        let (m, p) = (measured.get(*k)?.as_f64()?, predicted.get(*k)?.as_f64()?);
                        Some((k.to_string(), json!((p - m) / m)))
                    })
                    .collect();
                let row: Vec<String> = COMPARED
                    .iter()
                    .map(|k| {
                        errors
                            .get(*k)
                            .and_then(Value::as_f64)
                            .map_or("-".into(), |e| format!("{:+.0}%", 100.0 * e))
                    })
                    .collect();
                println!(
                    "{:<11} {:>6} {:>10} | {:>10} {:>10} {:>10} {:>10} {:>10}",
                    "", "", "error", row[0], row[1], row[2], row[3], row[4]
                );
                worst = errors
                    .values()
                    .filter_map(Value::as_f64)
                    .map(f64::abs)
                    .fold(worst, f64::max);
                line["measured"] = pick(&measured);
                line["relative_error"] = Value::Object(errors);
            }
            json_out.write(&line)?;
        }
    }
    if args.validate {
        println!(
            "largest relative error: {:.1}% (load average {})",
            100.0 * worst,
            super::load_average()
        );
    }
    Ok(())
}

fn pick(r: &Map<String, Value>) -> Value {
    Value::Object(
        COMPARED
            .iter()
            .chain(&["completed", "failed", "duration", "request_throughput"])
            .filter_map(|k| Some((k.to_string(), r.get(*k)?.clone())))
            .collect(),
    )
}

fn print_row(layout: &str, rate: f64, what: &str, r: &Map<String, Value>) {
    let g = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    println!(
        "{:<11} {:>6} {:>10} | {:>10.1} {:>9.0}ms {:>9.0}ms {:>9.1}ms {:>9.1}ms",
        layout,
        rate,
        what,
        g("output_throughput"),
        g("median_ttft_ms"),
        g("p90_ttft_ms"),
        g("median_tpot_ms"),
        g("p90_tpot_ms"),
    );
}

/// Runs the point on a real local cluster (router, etcd and node processes) through
/// `pd-bench serve`.
async fn measure(
    layout: Layout,
    args: &SimulateArgs,
    rate: f64,
) -> anyhow::Result<Map<String, Value>> {
    use crate::cluster::{Cluster, ClusterSpec};
    let spec = ClusterSpec {
        prefill: layout.prefill,
        decode: layout.decode,
        decode_args: if layout.prefill == 0 {
            vec!["--aggregated".into()]
        } else {
            vec![]
        },
        ..ClusterSpec::default()
    };
    let cluster = Cluster::start(spec).await?;
    let mut serve = args.serve.clone();
    serve.base_url = Some(cluster.http_url());
    serve.request_rate = rate;
    serve.disable_tqdm = true;
    let result = serve::run_async(&serve).await;
    cluster.shutdown().await?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse() {
        assert_eq!(
            parse_layout("aggregated", 0).unwrap(),
            Layout {
                prefill: 0,
                decode: 1,
                nodes_per_host: 0
            }
        );
        assert_eq!(
            parse_layout("2p3d", 1).unwrap(),
            Layout {
                prefill: 2,
                decode: 3,
                nodes_per_host: 1
            }
        );
        assert_eq!(layout_name(&parse_layout("2p3d", 0).unwrap()), "2p3d");
        for bad in ["1p0d", "p1d", "2x2", "1p1"] {
            assert!(parse_layout(bad, 0).is_err(), "{bad}");
        }
    }
}
