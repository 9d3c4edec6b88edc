//! `pd-bench serve` measured against a reference server whose timing is known exactly: it
//! answers each streamed request with its first token `TTFT` after the request arrived and the
//! next ones `ITL` apart (on an absolute schedule, so sleeps do not add up). The benchmark's
//! TTFT, TPOT, ITL and throughput must come out within a few percent of that truth, goodput
//! must flip as the SLO crosses the TTFT, failures must count as failures, and a server that is
//! down must give an error at once. Then the same benchmark runs against a real 1P1D cluster.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use pd_tests::bench::serve::{run_async, ServeArgs};
use serde_json::{json, Map, Value};

const TTFT: Duration = Duration::from_millis(150);
const ITL: Duration = Duration::from_millis(25);
const TOKENS: usize = 12;

/// How the reference server misbehaves on every `every`-th request (counting from 0).
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// HTTP 500 with an OpenAI-style error body.
    Status500 {
        every: usize,
    },
    /// A stream cut after three tokens, without a finish reason or `[DONE]`.
    CutStream {
        every: usize,
    },
}

struct Reference {
    fault: Fault,
    served: AtomicUsize,
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": "reference-model", "object": "model"}]}))
}

async fn generate(
    State(s): State<Arc<Reference>>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    Json(body): Json<Value>,
) -> axum::response::Response {
    let arrived = tokio::time::Instant::now();
    let n = s.served.fetch_add(1, Ordering::SeqCst);
    let chat = uri.path().ends_with("/chat/completions");
    let asked = body
        .get(if chat {
            "max_completion_tokens"
        } else {
            "max_tokens"
        })
        .and_then(Value::as_u64)
        .unwrap_or(TOKENS as u64) as usize;
    let tokens = asked.min(TOKENS);
    let mut cut_after = usize::MAX;
    match s.fault {
        Fault::Status500 { every } if n % every == every - 1 => {
            let err = json!({"error": {"message": "reference failure", "type": "server_error", "code": 500}});
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, Json(err)).into_response();
        }
        Fault::CutStream { every } if n % every == every - 1 => cut_after = 3,
        _ => {}
    }
    let usage = body.pointer("/stream_options/include_usage") == Some(&json!(true));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    tokio::spawn(async move {
        for i in 0..tokens {
            tokio::time::sleep_until(arrived + TTFT + ITL * i as u32).await;
            if i == cut_after {
                return; // the connection closes mid-stream
            }
            let last = i + 1 == tokens;
            let finish = if last { json!("length") } else { Value::Null };
            let choice = if chat {
                json!({"index": 0, "delta": {"content": format!(" t{i}")}, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": format!(" t{i}"), "finish_reason": finish})
            };
            let chunk = json!({"id": "x", "choices": [choice]});
            if tx.send(Ok(format!("data: {chunk}\n\n"))).await.is_err() {
                return;
            }
        }
        if usage {
            let u = json!({"id": "x", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}});
            let _ = tx.send(Ok(format!("data: {u}\n\n"))).await;
        }
        let _ = tx.send(Ok("data: [DONE]\n\n".into())).await;
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([("content-type", "text/event-stream")], body).into_response()
}

/// Starts the reference server on a free port.
async fn reference(fault: Fault) -> (SocketAddr, Arc<Reference>) {
    let state = Arc::new(Reference {
        fault,
        served: AtomicUsize::new(0),
    });
    let app = axum::Router::new()
        .route("/v1/models", axum::routing::get(models))
        .route("/v1/completions", axum::routing::post(generate))
        .route("/v1/chat/completions", axum::routing::post(generate))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, state)
}

async fn bench(addr: SocketAddr, extra: &[&str]) -> anyhow::Result<Map<String, Value>> {
    let base = format!("http://{addr}");
    let mut flags = vec![
        "--base-url",
        &base,
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        "--random-output-len",
        "12",
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
    ];
    flags.extend_from_slice(extra);
    let args = ServeArgs::from_flags(flags)?;
    // A hang is a failure of its own: the benchmark must end.
    tokio::time::timeout(Duration::from_secs(120), run_async(&args)).await?
}

fn f(r: &Map<String, Value>, k: &str) -> f64 {
    r.get(k)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number {k} in the result"))
}

fn within(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want,
        "{what}: measured {got:.3}, truth {want:.3} (more than {:.0}% apart)",
        rel * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_match_a_server_of_known_timing() {
    let (addr, _) = reference(Fault::None).await;
    let r = bench(addr, &["--num-prompts", "24", "--max-concurrency", "8"])
        .await
        .unwrap();
    let (ttft, itl) = (TTFT.as_secs_f64() * 1e3, ITL.as_secs_f64() * 1e3);
    assert_eq!(r["completed"], json!(24));
    assert_eq!(r["failed"], json!(0));
    assert_eq!(r["total_output_tokens"], json!(24 * TOKENS));
    for key in ["mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms"] {
        within(f(&r, key), ttft, 0.05, key);
    }
    for key in [
        "mean_tpot_ms",
        "median_tpot_ms",
        "mean_itl_ms",
        "median_itl_ms",
    ] {
        within(f(&r, key), itl, 0.05, key);
    }
    // The tail is where a late wake-up on a loaded machine shows (the server's schedule is
    // absolute, so one late token makes its gap longer and the next one shorter): 10 %, 2.5 ms.
    within(f(&r, "p90_itl_ms"), itl, 0.10, "p90_itl_ms");
    let e2el = ttft + itl * (TOKENS - 1) as f64;
    within(f(&r, "mean_e2el_ms"), e2el, 0.05, "mean_e2el_ms");
    // Three waves of 8 requests, each TTFT + 11 ITL long.
    let duration = 3.0 * e2el / 1e3;
    within(f(&r, "duration"), duration, 0.05, "duration");
    within(
        f(&r, "output_throughput"),
        (24 * TOKENS) as f64 / duration,
        0.05,
        "output_throughput",
    );
    within(
        f(&r, "request_throughput"),
        24.0 / duration,
        0.05,
        "request_throughput",
    );
    assert!(r["request_goodput"].is_null());
    let itls = r["itls"].as_array().unwrap();
    assert_eq!(itls.len(), 24);
    assert!(itls
        .iter()
        .all(|l| l.as_array().unwrap().len() == TOKENS - 1));
    assert_eq!(
        r["generated_texts"][0],
        json!(" t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11")
    );
    assert_eq!(r["model_id"], json!("reference-model"), "asked /v1/models");

    // The chat endpoint is timed the same way.
    let r = bench(
        addr,
        &["--num-prompts", "8", "--endpoint", "/v1/chat/completions"],
    )
    .await
    .unwrap();
    assert_eq!(r["backend"], json!("openai-chat"));
    assert_eq!(r["completed"], json!(8));
    within(f(&r, "mean_ttft_ms"), ttft, 0.05, "chat mean_ttft_ms");
    within(f(&r, "mean_tpot_ms"), itl, 0.05, "chat mean_tpot_ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodput_flips_as_the_slo_crosses_the_ttft() {
    let (addr, _) = reference(Fault::None).await;
    let run = |slo: &'static str| async move {
        bench(addr, &["--num-prompts", "8", "--goodput", slo, "tpot:40"])
            .await
            .unwrap()
    };
    let below = run("ttft:120").await;
    assert_eq!(f(&below, "request_goodput"), 0.0);
    let above = run("ttft:190").await;
    assert_eq!(
        f(&above, "request_goodput"),
        f(&above, "request_throughput")
    );
    assert!(f(&above, "request_goodput") > 0.0);
    // A TPOT SLO below the true ITL fails every request too.
    let r = bench(
        addr,
        &["--num-prompts", "8", "--goodput", "ttft:190", "tpot:20"],
    )
    .await
    .unwrap();
    assert_eq!(f(&r, "request_goodput"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_count_as_failed_never_as_fast() {
    for fault in [Fault::Status500 { every: 3 }, Fault::CutStream { every: 3 }] {
        let (addr, server) = reference(fault).await;
        let r = bench(addr, &["--num-prompts", "12", "--max-concurrency", "4"])
            .await
            .unwrap();
        // Served: the initial test request (number 0), then the 12; numbers 2, 5, 8, 11 fail.
        assert_eq!(server.served.load(Ordering::SeqCst), 13);
        assert_eq!(r["failed"], json!(4), "{:?}", r["errors"]);
        assert_eq!(r["completed"], json!(8));
        assert_eq!(r["total_output_tokens"], json!(8 * TOKENS));
        let errors: Vec<&str> = r["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .filter(|e| !e.is_empty())
            .collect();
        assert_eq!(errors.len(), 4);
        let want = match fault {
            Fault::Status500 { .. } => "HTTP 500",
            _ => "before [DONE]",
        };
        assert!(errors.iter().all(|e| e.contains(want)), "{errors:?}");
        // The latencies are those of the good requests only.
        within(
            f(&r, "mean_ttft_ms"),
            TTFT.as_secs_f64() * 1e3,
            0.05,
            "mean_ttft_ms",
        );
        within(
            f(&r, "mean_tpot_ms"),
            ITL.as_secs_f64() * 1e3,
            0.05,
            "mean_tpot_ms",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_or_broken_is_an_error_not_a_hang() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let started = Instant::now();
    let err = bench(closed, &["--num-prompts", "4", "--model", "m"])
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("initial test run failed"), "{msg}");
    assert!(msg.contains("onnect"), "the reason is given: {msg}");
    assert!(started.elapsed() < Duration::from_secs(60));

    // Without --model, the model list is asked for first, and its failure named.
    let err = bench(closed, &["--num-prompts", "4"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("/v1/models"), "{err:#}");

    // A server that fails every request stops the benchmark at its first one.
    let (addr, server) = reference(Fault::Status500 { every: 1 }).await;
    let err = bench(addr, &["--num-prompts", "4"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("reference failure"), "{err:#}");
    assert_eq!(server.served.load(Ordering::SeqCst), 1);

    // A server that accepts and never answers: --request-timeout ends it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let err = bench(
        addr,
        &[
            "--num-prompts",
            "4",
            "--model",
            "m",
            "--request-timeout",
            "1",
        ],
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("--request-timeout"), "{err:#}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_against_a_disaggregated_cluster() {
    let cluster = pd_tests::cluster::Cluster::start(pd_tests::cluster::ClusterSpec::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = cluster.http_url();
    let dir_s = dir.path().display().to_string();
    let args = ServeArgs::from_flags([
        "--base-url",
        &url,
        "--dataset-name",
        "random",
        "--random-input-len",
        "48",
        "--random-output-len",
        "6",
        "--num-prompts",
        "8",
        "--request-rate",
        "8",
        "--ignore-eos",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        &dir_s,
        "--goodput",
        "ttft:60000",
    ])
    .unwrap();
    let r = run_async(&args).await.unwrap();
    assert_eq!(r["completed"], json!(8), "{:?}", r["errors"]);
    assert_eq!(r["failed"], json!(0));
    assert_eq!(
        r["output_lens"],
        json!(vec![6; 8]),
        "usage counts, ignore_eos honoured"
    );
    assert_eq!(f(&r, "request_goodput"), f(&r, "request_throughput"));
    assert!(f(&r, "mean_ttft_ms") > 0.0 && f(&r, "mean_tpot_ms") > 0.0);
    let inputs = r["input_lens"].as_array().unwrap();
    assert!(inputs
        .iter()
        .all(|n| (44..=52).contains(&n.as_u64().unwrap())));
    // --save-result writes vLLM's file name, with the same keys.
    let path = pd_tests::bench::serve::save(&args, &r).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("openai-8.0qps-"), "{name}");
    let saved: Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(saved.keys().eq(r.keys()));
    for k in [
        "completed",
        "output_lens",
        "input_lens",
        "generated_texts",
        "model_id",
    ] {
        assert_eq!(saved[k], r[k], "{k}");
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_writes_a_result_per_point_and_its_charts() {
    let (addr, _) = reference(Fault::None).await;
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{addr}");
    let sweep_dir = dir.path().display().to_string();
    let args = {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            sweep: pd_tests::bench::sweep::SweepArgs,
        }
        Cli::parse_from([
            "sweep",
            "--max-concurrencies",
            "1,4",
            "--sweep-dir",
            &sweep_dir,
            "--base-url",
            &base,
            "--random-input-len",
            "16",
            "--num-prompts",
            "8",
            "--disable-tqdm",
            "--goodput",
            "ttft:190",
            "--metric-percentiles",
            "50,90,99",
        ])
        .sweep
    };
    let written = pd_tests::bench::sweep::run_async(args).await.unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for want in [
        "concurrency-1.json",
        "concurrency-4.json",
        "sweep.json",
        "throughput.svg",
        "throughput.png",
        "ttft.svg",
        "ttft.png",
        "tpot.svg",
        "tpot.png",
        "e2el_cdf.svg",
        "e2el_cdf.png",
        "ttft_cdf.svg",
        "ttft_cdf.png",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
        assert!(dir.path().join(want).metadata().unwrap().len() > 0);
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("sweep.json")).unwrap())
            .unwrap();
    let points = summary["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    // Four at a time finish about four times as many requests per second as one at a time.
    let (one, four) = (
        f(points[0].as_object().unwrap(), "request_throughput"),
        f(points[1].as_object().unwrap(), "request_throughput"),
    );
    within(
        four / one,
        4.0,
        0.1,
        "throughput ratio of concurrency 4 to 1",
    );
    let svg = std::fs::read_to_string(dir.path().join("throughput.svg")).unwrap();
    assert!(svg.contains("goodput"), "the goodput line is drawn");
    // compare puts the two points side by side.
    let out = pd_tests::bench::sweep::compare(
        &dir.path().join("concurrency-1.json"),
        &dir.path().join("concurrency-4.json"),
    )
    .unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with("request_throughput"))
        .unwrap();
    let ratio: f64 = line.split_whitespace().last().unwrap().parse().unwrap();
    within(ratio, 4.0, 0.1, "compare's ratio");
}
