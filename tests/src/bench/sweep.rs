//! `pd-bench sweep`: `pd-bench serve` at a list of request rates (or of concurrency caps), one
//! result file per point, a `sweep.json` with every point's headline figures, and charts:
//! throughput and goodput against the load, TTFT and TPOT percentiles against the load, and
//! the latency CDF of each point. Point k draws its prompts with `--seed` + k, so that a
//! prefix cache does not serve a point from the prompts of the one before. `pd-bench compare A
//! B` puts two results side by side.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Map, Value};

use super::plot::{self, Chart, Series};
use super::serve::{self, ServeArgs};

#[derive(clap::Args, Clone, Debug)]
pub struct SweepArgs {
    /// Request rates to run, requests per second (each point otherwise as `serve`).
    #[arg(long, value_delimiter = ',', conflicts_with = "max_concurrencies")]
    pub request_rates: Vec<f64>,

    /// Concurrency caps to run (at --request-rate, by default all requests at once).
    #[arg(long, value_delimiter = ',')]
    pub max_concurrencies: Vec<usize>,

    /// Where the results and charts go.
    #[arg(long = "sweep-dir", default_value = "sweep-results")]
    pub dir: PathBuf,

    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The load axis of a sweep.
#[derive(Clone, Copy)]
enum Axis {
    Rate,
    Concurrency,
}

impl Axis {
    fn label(self) -> &'static str {
        match self {
            Self::Rate => "request rate (req/s)",
            Self::Concurrency => "max concurrency",
        }
    }
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_async(args)).map(|_| ())
}

/// Runs every point; returns the paths written.
pub async fn run_async(args: SweepArgs) -> anyhow::Result<Vec<PathBuf>> {
    let (axis, points): (Axis, Vec<f64>) = match (
        &args.request_rates[..],
        &args.max_concurrencies[..],
    ) {
        ([], []) => anyhow::bail!("give --request-rates or --max-concurrencies"),
        (rates, []) => {
            if let Some(r) = rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
                anyhow::bail!("--request-rates: {r} is not a finite rate above 0 (sweep concurrency with --max-concurrencies)");
            }
            (Axis::Rate, rates.to_vec())
        }
        (_, caps) => {
            if caps.contains(&0) {
                anyhow::bail!("--max-concurrencies: 0 is not a cap");
            }
            (Axis::Concurrency, caps.iter().map(|&c| c as f64).collect())
        }
    };
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut written = Vec::new();
    let mut results = Vec::new();
    for (index, &x) in points.iter().enumerate() {
        let mut point = args.serve.clone();
        // Each point draws prompts of its own: a server's prefix cache must not serve a point
        // from the prompts of the one before.
        point.seed = args.serve.seed + index as u64;
        let name = match axis {
            Axis::Rate => {
                point.request_rate = x;
                format!("rate-{x}.json")
            }
            Axis::Concurrency => {
                point.max_concurrency = Some(x as usize);
                format!("concurrency-{x}.json")
            }
        };
        point.result_dir = Some(args.dir.clone());
        point.result_filename = Some(name);
        eprintln!("sweep point: {} = {x}", axis.label());
        let result = serve::run_async(&point).await?;
        written.push(serve::save(&point, &result)?);
        results.push((x, result));
    }
    let summary: Vec<Value> = results
        .iter()
        .map(|(x, r)| {
            let mut head = Map::new();
            head.insert("x".into(), json!(x));
            for (k, v) in r {
                if v.is_number() || v.is_null() {
                    head.insert(k.clone(), v.clone());
                }
            }
            Value::Object(head)
        })
        .collect();
    let summary_path = args.dir.join("sweep.json");
    std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&json!({"axis": axis.label(), "points": summary}))?,
    )?;
    written.push(summary_path);
    written.extend(charts(axis, &results, &args.dir)?);
    print_points(axis, &results);
    Ok(written)
}

fn num(r: &Map<String, Value>, k: &str) -> Option<f64> {
    r.get(k).and_then(Value::as_f64)
}

fn charts(
    axis: Axis,
    results: &[(f64, Map<String, Value>)],
    dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let line = |name: &str, key: &str, scale: f64| Series {
        name: name.into(),
        points: results
            .iter()
            .filter_map(|(x, r)| num(r, key).map(|v| (*x, v * scale)))
            .collect(),
    };
    let mut files = Vec::new();
    let mut throughput = vec![line("output tokens/s", "output_throughput", 1.0)];
    // Goodput in tokens/s: the good requests' share of the output throughput.
    let goodput = Series {
        name: "goodput (output tokens/s of requests within SLO)".into(),
        points: results
            .iter()
            .filter_map(|(x, r)| {
                let share = num(r, "request_goodput")?
                    / num(r, "request_throughput")?.max(f64::MIN_POSITIVE);
                Some((*x, share * num(r, "output_throughput")?))
            })
            .collect(),
    };
    if !goodput.points.is_empty() {
        throughput.push(goodput);
    }
    files.extend(plot::write(
        &Chart {
            title: "Throughput",
            x_label: axis.label(),
            y_label: "tokens/s",
            series: throughput,
        },
        &dir.join("throughput"),
    )?);
    // Whatever percentiles the results carry.
    let percentiles: Vec<String> = results
        .first()
        .map(|(_, r)| {
            r.keys()
                .filter_map(|k| {
                    k.strip_suffix("_ttft_ms")?
                        .strip_prefix('p')
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    for (metric, title) in [
        ("ttft", "Time to first token"),
        ("tpot", "Time per output token"),
    ] {
        let mut series = vec![line("median", &format!("median_{metric}_ms"), 1.0)];
        for p in &percentiles {
            series.push(line(&format!("p{p}"), &format!("p{p}_{metric}_ms"), 1.0));
        }
        series.retain(|s| !s.points.is_empty());
        files.extend(plot::write(
            &Chart {
                title,
                x_label: axis.label(),
                y_label: "ms",
                series,
            },
            &dir.join(metric),
        )?);
    }
    for (key, title) in [("e2els", "End-to-end latency CDF"), ("ttfts", "TTFT CDF")] {
        let series = results
            .iter()
            .map(|(x, r)| {
                let ok: Vec<f64> = lists(r, key)
                    .zip(lists(r, "errors"))
                    .filter(|(_, e)| e.as_str().is_some_and(str::is_empty))
                    .filter_map(|(v, _)| v.as_f64().map(|s| s * 1e3))
                    .collect();
                Series {
                    name: format!(
                        "{} {x}",
                        match axis {
                            Axis::Rate => "rate",
                            Axis::Concurrency => "concurrency",
                        }
                    ),
                    points: plot::cdf(&ok).into_iter().collect(),
                }
            })
            .collect();
        files.extend(plot::write(
            &Chart {
                title,
                x_label: "ms",
                y_label: "fraction of requests",
                series,
            },
            &dir.join(format!("{}_cdf", key.trim_end_matches('s'))),
        )?);
    }
    Ok(files)
}

fn lists<'a>(r: &'a Map<String, Value>, key: &str) -> impl Iterator<Item = &'a Value> {
    r.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn print_points(axis: Axis, results: &[(f64, Map<String, Value>)]) {
    println!(
        "{:>10} {:>9} {:>7} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12}",
        match axis {
            Axis::Rate => "rate",
            Axis::Concurrency => "conc.",
        },
        "completed",
        "failed",
        "req/s",
        "goodput",
        "out tok/s",
        "TTFT p50 ms",
        "TPOT p50 ms",
        "ITL p50 ms"
    );
    for (x, r) in results {
        let g = |k: &str| num(r, k).map_or("-".to_string(), |v| format!("{v:.2}"));
        println!(
            "{:>10} {:>9} {:>7} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12}",
            x,
            g("completed"),
            g("failed"),
            g("request_throughput"),
            g("request_goodput"),
            g("output_throughput"),
            g("median_ttft_ms"),
            g("median_tpot_ms"),
            g("median_itl_ms"),
        );
    }
}

/// The headline keys of a result, in the order `compare` prints them; the percentile keys
/// follow in the order the first result has them.
const HEADLINE: [&str; 11] = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
];

/// Two results side by side: every number both have, and B's value over A's.
pub fn compare(a: &Path, b: &Path) -> anyhow::Result<String> {
    let read = |p: &Path| -> anyhow::Result<Map<String, Value>> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a result file", p.display()))
    };
    let (ra, rb) = (read(a)?, read(b)?);
    let name = |p: &Path, r: &Map<String, Value>| {
        r.get("label")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| p.display().to_string())
    };
    let mut keys: Vec<&str> = HEADLINE.to_vec();
    keys.extend(
        ra.keys()
            .map(String::as_str)
            .filter(|k| k.ends_with("_ms") && rb.contains_key(*k)),
    );
    let mut out = format!(
        "{:<28} {:>16} {:>16} {:>8}\n",
        "metric",
        name(a, &ra),
        name(b, &rb),
        "B/A"
    );
    let mut shown = 0;
    for k in keys {
        let (Some(x), Some(y)) = (num(&ra, k), num(&rb, k)) else {
            continue;
        };
        let ratio = if x != 0.0 {
            format!("{:.3}", y / x)
        } else {
            "-".into()
        };
        out += &format!("{k:<28} {x:>16.2} {y:>16.2} {ratio:>8}\n");
        shown += 1;
    }
    if shown == 0 {
        anyhow::bail!("{} and {} share no figures", a.display(), b.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_shows_shared_figures_with_ratios() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        std::fs::write(&a, json!({"label": "ours", "completed": 10, "output_throughput": 100.0, "mean_ttft_ms": 50.0, "ttfts": [1.0]}).to_string()).unwrap();
        std::fs::write(&b, json!({"label": "theirs", "completed": 10, "output_throughput": 150.0, "mean_ttft_ms": 25.0}).to_string()).unwrap();
        let out = compare(&a, &b).unwrap();
        assert!(out.lines().next().unwrap().contains("ours") && out.contains("theirs"));
        assert!(
            out.contains("output_throughput") && out.contains("1.500"),
            "{out}"
        );
        assert!(
            out.contains("mean_ttft_ms") && out.contains("0.500"),
            "{out}"
        );
        assert!(!out.contains("ttfts"));
        std::fs::write(&b, "{\"x\": 1}").unwrap();
        assert!(compare(&a, &b).is_err());
        std::fs::write(&b, "not json").unwrap();
        assert!(compare(&a, &b)
            .unwrap_err()
            .to_string()
            .contains("not a result file"));
    }
}
