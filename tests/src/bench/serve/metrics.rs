//! The figures of a serving benchmark, computed as `vllm bench serve` computes them and written
//! under its key names, so that one of our results and one of theirs compare key by key.
//! The simulator writes its predictions through the same function.

use serde_json::{json, Map, Value};

use super::client::RequestOutput;

/// An SLO per metric, in milliseconds (`--goodput ttft:500 tpot:50`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Goodput {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Goodput {
    pub fn parse(items: &[String]) -> anyhow::Result<Option<Self>> {
        if items.is_empty() {
            return Ok(None);
        }
        let mut g = Self::default();
        for item in items {
            let (key, value) = item.split_once(':').ok_or_else(|| {
                anyhow::anyhow!("--goodput {item:?}: expected KEY:MS, e.g. ttft:500")
            })?;
            let ms: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    anyhow::anyhow!("--goodput {item:?}: {value:?} is not a number of milliseconds")
                })?;
            let slot = match key {
                "ttft" => &mut g.ttft_ms,
                "tpot" => &mut g.tpot_ms,
                "e2el" => &mut g.e2el_ms,
                other => {
                    anyhow::bail!("--goodput {item:?}: unknown metric {other:?} (ttft, tpot, e2el)")
                }
            };
            *slot = Some(ms);
        }
        Ok(Some(g))
    }

    /// Whether a request with these figures (seconds) meets every SLO.
    pub fn admits(&self, ttft: f64, tpot: f64, e2el: f64) -> bool {
        let ok = |slo: Option<f64>, v: f64| slo.is_none_or(|ms| v * 1e3 <= ms);
        ok(self.ttft_ms, ttft) && ok(self.tpot_ms, tpot) && ok(self.e2el_ms, e2el)
    }
}

/// `--percentile-metrics` and `--metric-percentiles`.
#[derive(Debug, Clone)]
pub struct Selection {
    pub metrics: Vec<String>,
    pub percentiles: Vec<f64>,
}

impl Selection {
    pub fn parse(metrics: &str, percentiles: &str) -> anyhow::Result<Self> {
        let metrics: Vec<String> = metrics
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        for m in &metrics {
            if !["ttft", "tpot", "itl", "e2el"].contains(&m.as_str()) {
                anyhow::bail!("--percentile-metrics: unknown metric {m:?} (ttft, tpot, itl, e2el)");
            }
        }
        let percentiles = percentiles
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=100.0).contains(p))
                    .ok_or_else(|| anyhow::anyhow!("--metric-percentiles: {p:?} is not in 0..=100"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            metrics,
            percentiles,
        })
    }
}

/// numpy's `percentile` (linear between the two nearest ranks); 0 for no values, as vLLM's
/// `np.percentile(xs or 0, p)` gives.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (v.len() - 1) as f64 * p / 100.0;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Population standard deviation (numpy's default).
fn std(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64).sqrt()
}

/// Time per output token after the first, as vLLM defines it: 0 for a single token.
pub fn tpot(o: &RequestOutput, output_tokens: usize) -> f64 {
    if output_tokens > 1 {
        (o.latency - o.ttft) / (output_tokens - 1) as f64
    } else {
        0.0
    }
}

/// How vLLM names a percentile in a key: `p99`, `p99.9`.
pub fn percentile_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

/// The result of a run, `duration` seconds long. `output_tokens` counts a request's tokens when
/// the server gave no usage (the benchmark's tokenizer on the generated text).
pub fn summarize(
    outputs: &[RequestOutput],
    duration: f64,
    selection: &Selection,
    goodput: Option<&Goodput>,
    output_tokens: impl Fn(&RequestOutput) -> usize,
) -> Map<String, Value> {
    let mut output_lens = Vec::with_capacity(outputs.len());
    let (mut ttfts, mut tpots, mut all_tpots, mut itls, mut e2els) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut completed, mut good, mut total_input) = (0usize, 0usize, 0usize);
    for o in outputs {
        if !o.success {
            output_lens.push(0);
            continue;
        }
        let n = o.output_tokens.unwrap_or_else(|| output_tokens(o));
        output_lens.push(n);
        total_input += o.prompt_len;
        let tpot = tpot(o, n);
        if n > 1 {
            tpots.push(tpot);
        }
        all_tpots.push(tpot);
        itls.extend_from_slice(&o.itl);
        ttfts.push(o.ttft);
        e2els.push(o.latency);
        completed += 1;
        if goodput.is_some_and(|g| g.admits(o.ttft, tpot, o.latency)) {
            good += 1;
        }
    }
    let total_output: usize = output_lens.iter().sum();
    let (max_tokens_per_s, max_concurrent) = peaks(outputs);
    let mut r = Map::new();
    let mut put = |k: &str, v: Value| {
        r.insert(k.to_string(), v);
    };
    put("duration", json!(duration));
    put("completed", json!(completed));
    put("failed", json!(outputs.len() - completed));
    put("total_input_tokens", json!(total_input));
    put("total_output_tokens", json!(total_output));
    put("request_throughput", json!(completed as f64 / duration));
    put(
        "request_goodput",
        match goodput {
            Some(_) => json!(good as f64 / duration),
            None => Value::Null,
        },
    );
    put("output_throughput", json!(total_output as f64 / duration));
    put(
        "total_token_throughput",
        json!((total_input + total_output) as f64 / duration),
    );
    put("max_output_tokens_per_s", json!(max_tokens_per_s));
    put("max_concurrent_requests", json!(max_concurrent));
    put(
        "input_lens",
        json!(outputs.iter().map(|o| o.prompt_len).collect::<Vec<_>>()),
    );
    put("output_lens", json!(output_lens));
    put(
        "ttfts",
        json!(outputs.iter().map(|o| o.ttft).collect::<Vec<_>>()),
    );
    put(
        "itls",
        json!(outputs.iter().map(|o| o.itl.clone()).collect::<Vec<_>>()),
    );
    put(
        "e2els",
        json!(outputs.iter().map(|o| o.latency).collect::<Vec<_>>()),
    );
    put(
        "start_times",
        json!(outputs.iter().map(|o| o.start_time).collect::<Vec<_>>()),
    );
    put(
        "generated_texts",
        json!(outputs
            .iter()
            .map(|o| o.generated_text.clone())
            .collect::<Vec<_>>()),
    );
    put(
        "errors",
        json!(outputs.iter().map(|o| o.error.clone()).collect::<Vec<_>>()),
    );
    for metric in &selection.metrics {
        let xs = match metric.as_str() {
            "ttft" => &ttfts,
            "tpot" => &tpots,
            "itl" => &itls,
            _ => &e2els,
        };
        put(&format!("mean_{metric}_ms"), json!(mean(xs) * 1e3));
        put(
            &format!("median_{metric}_ms"),
            json!(percentile(xs, 50.0) * 1e3),
        );
        put(&format!("std_{metric}_ms"), json!(std(xs) * 1e3));
        for &p in &selection.percentiles {
            put(
                &format!("p{}_{metric}_ms", percentile_word(p)),
                json!(percentile(xs, p) * 1e3),
            );
        }
    }
    r
}

/// The most output tokens in one second of the run, and the most requests in flight in one
/// second (vLLM's per-second buckets; each chunk with text counts as a token).
fn peaks(outputs: &[RequestOutput]) -> (f64, usize) {
    let ok: Vec<&RequestOutput> = outputs.iter().filter(|o| o.success).collect();
    let Some(t0) = ok.iter().map(|o| o.start_time).reduce(f64::min) else {
        return (0.0, 0);
    };
    let end = ok
        .iter()
        .map(|o| o.start_time + o.latency)
        .fold(t0, f64::max);
    let buckets = (end - t0).ceil() as usize + 1;
    let mut tokens = vec![0usize; buckets];
    let mut concurrent = vec![0usize; buckets];
    for o in ok {
        let mut t = o.start_time + o.ttft;
        let mut times = vec![t];
        for gap in &o.itl {
            t += gap;
            times.push(t);
        }
        for t in times {
            if let Some(b) = tokens.get_mut((t - t0) as usize) {
                *b += 1;
            }
        }
        let first = (o.start_time - t0) as usize;
        let last = ((o.start_time + o.latency - t0) as usize).min(buckets - 1);
        for c in &mut concurrent[first..=last] {
            *c += 1;
        }
    }
    (
        tokens.into_iter().max().unwrap_or(0) as f64,
        concurrent.into_iter().max().unwrap_or(0),
    )
}

/// vLLM's printed summary of a result.
pub fn print_table(r: &Map<String, Value>, selection: &Selection) {
    let f = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let line = |label: &str, v: String| println!("{label:<40}{v:<10}");
    println!("{:=^50}", " Serving Benchmark Result ");
    line("Successful requests:", format!("{}", f("completed")));
    line("Failed requests:", format!("{}", f("failed")));
    line("Benchmark duration (s):", format!("{:.2}", f("duration")));
    line(
        "Total input tokens:",
        format!("{}", f("total_input_tokens")),
    );
    line(
        "Total generated tokens:",
        format!("{}", f("total_output_tokens")),
    );
    line(
        "Request throughput (req/s):",
        format!("{:.2}", f("request_throughput")),
    );
    if r.get("request_goodput").is_some_and(|v| !v.is_null()) {
        line(
            "Request goodput (req/s):",
            format!("{:.2}", f("request_goodput")),
        );
    }
    line(
        "Output token throughput (tok/s):",
        format!("{:.2}", f("output_throughput")),
    );
    line(
        "Peak output token throughput (tok/s):",
        format!("{:.2}", f("max_output_tokens_per_s")),
    );
    line(
        "Peak concurrent requests:",
        format!("{}", f("max_concurrent_requests")),
    );
    line(
        "Total Token throughput (tok/s):",
        format!("{:.2}", f("total_token_throughput")),
    );
    for metric in &selection.metrics {
        let (title, short) = match metric.as_str() {
            "ttft" => ("Time to First Token", "TTFT"),
            "tpot" => ("Time per Output Token (excl. 1st token)", "TPOT"),
            "itl" => ("Inter-token Latency", "ITL"),
            _ => ("End-to-end Latency", "E2EL"),
        };
        println!("{:-^50}", title);
        line(
            &format!("Mean {short} (ms):"),
            format!("{:.2}", f(&format!("mean_{metric}_ms"))),
        );
        line(
            &format!("Median {short} (ms):"),
            format!("{:.2}", f(&format!("median_{metric}_ms"))),
        );
        for &p in &selection.percentiles {
            let w = percentile_word(p);
            line(
                &format!("P{w} {short} (ms):"),
                format!("{:.2}", f(&format!("p{w}_{metric}_ms"))),
            );
        }
    }
    println!("{}", "=".repeat(50));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(start: f64, ttft: f64, itl: Vec<f64>, tokens: usize) -> RequestOutput {
        RequestOutput {
            success: true,
            output_tokens: Some(tokens),
            latency: ttft + itl.iter().sum::<f64>(),
            ttft,
            itl,
            start_time: start,
            prompt_len: 10,
            ..RequestOutput::default()
        }
    }

    #[test]
    fn percentiles_interpolate_as_numpy_does() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&xs, 50.0), 2.5);
        assert!((percentile(&xs, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        assert_eq!(percentile_word(99.0), "99");
        assert_eq!(percentile_word(99.9), "99.9");
    }

    #[test]
    fn failures_count_as_failed_and_stay_out_of_latencies() {
        let outputs = vec![
            ok(0.0, 0.1, vec![0.02; 4], 5),
            ok(0.5, 0.3, vec![0.04; 4], 5),
            RequestOutput {
                error: "HTTP 500".into(),
                ttft: 0.001,
                prompt_len: 10,
                ..RequestOutput::default()
            },
        ];
        let sel = Selection::parse("ttft,tpot,itl,e2el", "50,99").unwrap();
        let g = Goodput::parse(&["ttft:200".into()]).unwrap();
        let r = summarize(&outputs, 2.0, &sel, g.as_ref(), |_| unreachable!());
        assert_eq!(r["completed"], json!(2));
        assert_eq!(r["failed"], json!(1));
        assert_eq!(r["total_output_tokens"], json!(10));
        assert_eq!(r["total_input_tokens"], json!(20));
        assert_eq!(r["output_lens"], json!([5, 5, 0]));
        assert_eq!(r["request_throughput"], json!(1.0));
        assert_eq!(r["request_goodput"], json!(0.5));
        assert!((r["mean_ttft_ms"].as_f64().unwrap() - 200.0).abs() < 1e-9);
        assert!((r["median_tpot_ms"].as_f64().unwrap() - 30.0).abs() < 1e-9);
        assert!((r["mean_itl_ms"].as_f64().unwrap() - 30.0).abs() < 1e-9);
        assert!((r["p50_e2el_ms"].as_f64().unwrap() - 320.0).abs() < 1e-9);
        assert_eq!(r["max_concurrent_requests"], json!(2));
        assert_eq!(r["max_output_tokens_per_s"], json!(10.0));
        assert_eq!(r["errors"][2], json!("HTTP 500"));
        // Without an SLO there is no goodput.
        let r = summarize(&outputs, 2.0, &sel, None, |_| 0);
        assert!(r["request_goodput"].is_null());
    }

    #[test]
    fn missing_usage_is_counted_by_the_tokenizer() {
        let mut o = ok(0.0, 0.1, vec![0.1, 0.1], 0);
        o.output_tokens = None;
        o.generated_text = "abc".into();
        let sel = Selection::parse("tpot", "99").unwrap();
        let r = summarize(&[o], 1.0, &sel, None, |o| o.generated_text.len());
        assert_eq!(r["total_output_tokens"], json!(3));
        assert!((r["mean_tpot_ms"].as_f64().unwrap() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn bad_slos_and_selections_are_named() {
        assert!(Goodput::parse(&["ttft".into()]).is_err());
        assert!(Goodput::parse(&["ttft:abc".into()]).is_err());
        assert!(Goodput::parse(&["itl:5".into()]).is_err());
        let g = Goodput::parse(&["ttft:5".into(), "e2el:9".into()])
            .unwrap()
            .unwrap();
        assert_eq!(
            (g.ttft_ms, g.tpot_ms, g.e2el_ms),
            (Some(5.0), None, Some(9.0))
        );
        assert!(Selection::parse("ttft,latency", "99").is_err());
        assert!(Selection::parse("ttft", "101").is_err());
    }
}
