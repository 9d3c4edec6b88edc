//! Who may call the cluster and how much it takes, against real processes: API keys on both
//! client APIs (401 / UNAUTHENTICATED), a key's own limits (429 / RESOURCE_EXHAUSTED with
//! Retry-After), and overload: far more concurrent requests than the decode nodes run are
//! refused at once (503 / UNAVAILABLE with Retry-After) while the admitted ones are served
//! exactly; the outcome counters add up to the requests sent and no KV block is left behind.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use pd_proto::v1 as pb;
use pd_tests::cluster::{Cluster, ClusterSpec};
use pd_tests::golden_cases;
use serde_json::{json, Value};

/// `pd_requests_total` of the router by outcome, and refusals by reason.
async fn outcomes(cluster: &Cluster) -> (f64, f64, Vec<(&'static str, f64)>) {
    let url = format!("{}/metrics", cluster.http_url());
    let total = metric_sum(&url, "pd_requests_total", &[]).await;
    let rejected = metric_sum(&url, "pd_requests_total", &["outcome=\"rejected\""]).await;
    let mut reasons = Vec::new();
    for reason in ["unauthenticated", "rate_limited", "overloaded", "invalid"] {
        let label = format!("reason=\"{reason}\"");
        let n = metric_sum(&url, "pd_requests_rejected_total", &[&label]).await;
        reasons.push((reason, n));
    }
    (total, rejected, reasons)
}

fn reason_delta(before: &[(&str, f64)], after: &[(&str, f64)], reason: &str) -> f64 {
    let get = |v: &[(&str, f64)]| v.iter().find(|(r, _)| *r == reason).map_or(0.0, |x| x.1);
    get(after) - get(before)
}

async fn complete(cluster: &Cluster, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/completions", cluster.http_url()))
        .json(body)
        .timeout(REQUEST_TIMEOUT);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("the router answers")
}

fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().expect("ASCII");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn generate(
    client: &mut pb::generation_client::GenerationClient<tonic::transport::Channel>,
    key: Option<&str>,
    request: pb::GenerateRequest,
) -> Result<Vec<u32>, tonic::Status> {
    let mut stream = client.generate(with_key(request, key)).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await? {
        ids.extend(m.token_ids);
    }
    Ok(ids)
}

fn token_request(prompt: &[u32], max_tokens: u32, ignore_eos: bool) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: prompt.to_vec(),
        })),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A refusal under load: `Retry-After` of at least a second and an OpenAI-style body of `code`.
async fn assert_refusal(response: reqwest::Response, code: &str) {
    let after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(after >= 1);
    let error = error_body(response).await;
    assert_eq!(error["error"]["code"], code, "{error}");
}

async fn error_body(response: reqwest::Response) -> Value {
    let text = response.text().await.expect("a body");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_both_apis_and_each_key_has_its_limit() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(ClusterSpec {
        router_args: vec![
            "--api-key".into(),
            "alpha,beta".into(),
            "--api-key-max-concurrent-requests".into(),
            "1".into(),
        ],
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let before = outcomes(&cluster).await;
    let prompt = golden_cases()[0].prompt_ids.clone();
    let expected = reference(&prompt, &greedy(4));
    let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0});
    let mut generation_requests = 0;

    // HTTP: no key, a wrong key, then a valid one.
    for key in [None, Some("gamma"), Some("alph")] {
        let response = complete(&cluster, key, &body).await;
        generation_requests += 1;
        assert_eq!(response.status(), 401, "key {key:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let error = error_body(response).await;
        assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
        assert!(error["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let response = complete(&cluster, Some("alpha"), &body).await;
    generation_requests += 1;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("JSON");
    assert_eq!(answer["choices"][0]["text"], expected.text.as_str());
    let models = format!("{}/v1/models", cluster.http_url());
    let http = reqwest::Client::new();
    assert_eq!(http.get(&models).send().await.unwrap().status(), 401);
    let listed = http.get(&models).bearer_auth("beta").send().await.unwrap();
    assert_eq!(listed.status(), 200);
    // Probes and scrapers need no key.
    for path in ["/health", "/live", "/metrics"] {
        let url = format!("{}{path}", cluster.http_url());
        assert_eq!(http.get(&url).send().await.unwrap().status(), 200, "{path}");
    }

    // gRPC: the same.
    let mut client = grpc_client(&cluster).await;
    for key in [None, Some("gamma")] {
        let status = generate(&mut client, key, token_request(&prompt, 4, false))
            .await
            .expect_err("refused");
        generation_requests += 1;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        let status = client
            .list_models(with_key(pb::ListModelsRequest {}, key))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let ids = generate(&mut client, Some("beta"), token_request(&prompt, 4, false))
        .await
        .expect("served");
    generation_requests += 1;
    assert_eq!(ids, expected.ids);
    let mut health = tonic_health_client(&cluster).await;
    let serving = health
        .check(pb_health::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no key");
    assert_eq!(serving.into_inner().status, 1);

    // One request open at a time per key: alpha's second is refused, beta is not held back.
    let mut open = client
        .generate(with_key(token_request(&prompt, 400, true), Some("alpha")))
        .await
        .expect("admitted")
        .into_inner();
    open.message().await.expect("a first message");
    generation_requests += 1;
    let response = complete(&cluster, Some("alpha"), &body).await;
    generation_requests += 1;
    assert_eq!(response.status(), 429);
    assert_refusal(response, "rate_limit_exceeded").await;
    let status = generate(&mut client, Some("alpha"), token_request(&prompt, 4, false))
        .await
        .expect_err("over the key's limit");
    generation_requests += 1;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.metadata().get("retry-after").is_some());
    let response = complete(&cluster, Some("beta"), &body).await;
    generation_requests += 1;
    assert_eq!(response.status(), 200);
    // Hanging up frees the key's slot (the router notices the reset stream).
    drop(open);
    let limited = AtomicUsize::new(0);
    let (c, b, l) = (&cluster, &body, &limited);
    eventually(Duration::from_secs(20), move || async move {
        match complete(c, Some("alpha"), b).await.status().as_u16() {
            200 => Ok(()),
            429 => {
                l.fetch_add(1, Ordering::Relaxed);
                Err("alpha still at its limit after its stream was dropped".into())
            }
            other => panic!("alpha refused with {other} after its stream was dropped"),
        }
    })
    .await;
    let limited_after_hangup = limited.into_inner();
    generation_requests += 1 + limited_after_hangup;

    // Every generation request ended in exactly one outcome.
    let after = outcomes(&cluster).await;
    assert_eq!(after.0 - before.0, generation_requests as f64);
    assert_eq!(
        reason_delta(&before.2, &after.2, "unauthenticated"),
        5.0,
        "3 over HTTP, 2 over gRPC"
    );
    assert_eq!(
        reason_delta(&before.2, &after.2, "rate_limited"),
        2.0 + limited_after_hangup as f64
    );
    assert_eq!(after.1 - before.1, 7.0 + limited_after_hangup as f64);
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

mod pb_health {
    pub use tonic_health::pb::*;
}

async fn tonic_health_client(
    cluster: &Cluster,
) -> pb_health::health_client::HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(cluster.grpc_url())
        .expect("a URI")
        .connect()
        .await
        .expect("connecting to the router's gRPC API");
    pb_health::health_client::HealthClient::new(channel)
}

/// What one request of the burst got.
enum Answer {
    Served(Instant),
    Refused(Instant),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_the_admitted_are_served_exactly() {
    let _serial = SERIAL.lock().await;
    // Two sequences at once: by default four may wait for a first token behind them.
    let cluster = Cluster::start(ClusterSpec {
        decode_args: vec!["--max-num-seqs".into(), "2".into()],
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    cluster
        .wait_health(Duration::from_secs(20), "decode capacity of 2", |h| {
            h.decode_capacity == 2
        })
        .await
        .expect("the router polled the decode node");
    let before = outcomes(&cluster).await;
    let cases = golden_cases();
    let requests = 20;
    let params = greedy(16);
    let work: Vec<Vec<u32>> = (0..requests)
        .map(|i| cases[i % cases.len()].prompt_ids.clone())
        .collect();
    let expected = references(
        &work
            .iter()
            .map(|p| (p.clone(), params.clone()))
            .collect::<Vec<_>>(),
    );

    // Ten times what the cluster runs, at once: half over HTTP, half over gRPC.
    let client = grpc_client(&cluster).await;
    let burst = work.iter().enumerate().map(|(i, prompt)| {
        let (cluster, mut client) = (&cluster, client.clone());
        async move {
            if i % 2 == 0 {
                let body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0});
                let response = complete(cluster, None, &body).await;
                match response.status().as_u16() {
                    200 => {
                        let v: Value = response.json().await.expect("JSON");
                        let text = v["choices"][0]["text"].as_str().unwrap().to_string();
                        (i, Ok(text), Instant::now())
                    }
                    503 => {
                        let at = Instant::now();
                        assert_refusal(response, "overloaded").await;
                        (i, Err(()), at)
                    }
                    other => panic!("request {i}: HTTP {other}"),
                }
            } else {
                match generate(&mut client, None, token_request(prompt, 16, false)).await {
                    Ok(ids) => (i, Ok(format!("{ids:?}")), Instant::now()),
                    Err(status) => {
                        let at = Instant::now();
                        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                        assert!(status.metadata().get("retry-after").is_some());
                        (i, Err(()), at)
                    }
                }
            }
        }
    });
    let answers: Vec<(usize, Answer)> = futures::future::join_all(burst)
        .await
        .into_iter()
        .map(|(i, got, at)| match got {
            Ok(out) => {
                let want = if i % 2 == 0 {
                    expected[i].text.clone()
                } else {
                    format!("{:?}", expected[i].ids)
                };
                assert_eq!(out, want, "request {i} served differently");
                (i, Answer::Served(at))
            }
            Err(()) => (i, Answer::Refused(at)),
        })
        .collect();
    let served: Vec<Instant> = answers
        .iter()
        .filter_map(|(_, a)| match a {
            Answer::Served(at) => Some(*at),
            Answer::Refused(_) => None,
        })
        .collect();
    let refused: Vec<Instant> = answers
        .iter()
        .filter_map(|(_, a)| match a {
            Answer::Refused(at) => Some(*at),
            Answer::Served(_) => None,
        })
        .collect();
    eprintln!(
        "burst of {requests}: {} served, {} refused",
        served.len(),
        refused.len()
    );
    assert!(served.len() >= 2, "{} served", served.len());
    assert!(
        refused.len() >= requests / 2,
        "only {} of {requests} refused",
        refused.len()
    );
    // Refusals came at once: each before any admitted request had finished.
    let first_served = served.iter().min().expect("some served");
    assert!(refused.iter().all(|at| at < first_served));

    let after = outcomes(&cluster).await;
    assert_eq!(after.0 - before.0, requests as f64, "one outcome each");
    assert_eq!(after.1 - before.1, refused.len() as f64);
    assert_eq!(
        reason_delta(&before.2, &after.2, "overloaded"),
        refused.len() as f64
    );
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_node_far_behind_refuses_at_once_and_the_prompt_is_computed_elsewhere() {
    let _serial = SERIAL.lock().await;
    // A short transfer deadline, and no prefix cache to make repeated prompts cheap.
    let cluster = Cluster::start(ClusterSpec {
        decode_args: [
            "--transfer-timeout-ms",
            "1500",
            "--no-enable-prefix-caching",
        ]
        .map(String::from)
        .to_vec(),
        prefill_args: vec!["--no-enable-prefix-caching".into()],
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let prefill = cluster
        .first_node(pd_tests::cluster::Role::Prefill)
        .expect("a prefill node");
    let cases = golden_cases();
    // Prompts of about 600 tokens, each its own.
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            let mut ids = Vec::new();
            for k in 0.. {
                let case = &cases[(i + k) % cases.len()];
                ids.extend_from_slice(&case.prompt_ids);
                if ids.len() >= 600 {
                    break;
                }
            }
            ids.truncate(600);
            ids
        })
        .collect();
    let params = greedy(4);
    let expected = references(
        &prompts
            .iter()
            .map(|p| (p.clone(), params.clone()))
            .collect::<Vec<_>>(),
    );
    let mut client = grpc_client(&cluster).await;
    // One prefill alone first: the node learns how fast it works.
    let first = grpc_generate(&mut client, &prompts[0], &params)
        .await
        .expect("served");
    assert_eq!(first.ids, expected[0].ids);
    let refused_before = metric_sum(
        &prefill.metrics_url(),
        "pd_prefills_refused_total",
        &["reason=\"behind\""],
    )
    .await;
    // Then all at once: far more prompt tokens than it can do within the deadline.
    let burst = prompts.iter().map(|prompt| {
        let (mut client, params) = (client.clone(), &params);
        async move { grpc_generate(&mut client, prompt, params).await }
    });
    let results = futures::future::join_all(burst).await;
    for (i, got) in results.into_iter().enumerate() {
        let got = got.unwrap_or_else(|s| panic!("request {i}: {s:?}"));
        assert_eq!(got.ids, expected[i].ids, "request {i}");
    }
    let refused = metric_sum(
        &prefill.metrics_url(),
        "pd_prefills_refused_total",
        &["reason=\"behind\""],
    )
    .await
        - refused_before;
    eprintln!("the prefill node refused {refused} of 12 prefills as too far behind");
    assert!(refused >= 1.0, "nothing refused");
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}
