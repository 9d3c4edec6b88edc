//! The cluster in Docker containers: deploy/docker-compose.yml over the image that
//! deploy/docker/build.sh makes, each test on a compose project (and network) of its own, driven
//! from the host through 127.0.0.1 only. Faults come from docker itself: a decode container
//! killed or crashed under 16 streams, one stopped with SIGTERM, a prefill container cut off the
//! network or paused past the transfer deadline, etcd stopped and started (and replaced by an
//! empty one), the router crashed. Streams continue exactly as a fault-free run, or end with a
//! clear error; after every scenario each node's `Node.Stats` shows all KV blocks free.
//!
//! The TLS variant (deploy/docker-compose.tls.yml) serves the same way, and its workers refuse
//! plaintext.
//!
//! Skipped, saying why, only where no Docker engine answers; a missing image is a failure.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use pd_tests::containers::{self, ComposeCluster, ComposeSpec, Container};
use pd_tests::golden_cases;
use tokio::sync::mpsc;

/// How long a scenario's cluster may take to settle after a fault (leases lapse in 2 s).
const SETTLE: Duration = Duration::from_secs(30);
/// Tokens per stream of the 16-stream scenarios: enough for a fault to land mid-stream.
const MAX_TOKENS: u32 = 24;

/// The cluster of `spec`, or `None` (with the reason printed) where no Docker engine runs.
async fn start(spec: ComposeSpec) -> Option<ComposeCluster> {
    if let Some(reason) = containers::unavailable_reason().await {
        eprintln!("skipping the container tests: {reason}");
        return None;
    }
    Some(
        ComposeCluster::start(spec)
            .await
            .expect("the compose cluster starts"),
    )
}

/// The running sequences of every decode container that answers, busiest first.
async fn decode_load(cluster: &ComposeCluster) -> Vec<(Container, u32)> {
    let mut load = Vec::new();
    for c in cluster
        .containers("decode")
        .await
        .expect("decode containers")
    {
        if let Ok(stats) = cluster.node_stats(&c).await {
            load.push((c, stats.running_sequences));
        }
    }
    load.sort_by_key(|(_, running)| std::cmp::Reverse(*running));
    load
}

/// Runs `work` as streams, applies `fault` to the busiest decode container once every stream
/// has 3 tokens, and checks that every stream ends exactly as `want`. Returns the victim and
/// the most sequences each decode container was seen running before the fault.
async fn streams_survive<F, Fut>(
    cluster: &ComposeCluster,
    work: &[(Vec<u32>, pd_common::sampling::SamplingParams)],
    want: &[Generated],
    fault: F,
) -> (Container, Vec<(Container, u32)>)
where
    F: FnOnce(Container) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (tx, mut progress) = mpsc::unbounded_channel();
    let streams = start_streams(&cluster.grpc_url(), work, tx);
    let mut seen: Vec<(Container, u32)> = Vec::new();
    let progressed = wait_progress(&mut progress, work.len(), 3);
    tokio::pin!(progressed);
    let load = loop {
        let load = decode_load(cluster).await;
        for (c, running) in &load {
            match seen.iter_mut().find(|(s, _)| s == c) {
                Some((_, most)) => *most = (*most).max(*running),
                None => seen.push((c.clone(), *running)),
            }
        }
        tokio::select! {
            _ = &mut progressed => break load,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    let (victim, running) = load.first().cloned().expect("a decode container answers");
    assert!(running > 0, "no stream was running on a decode container");
    fault(victim.clone()).await.expect("the fault is injected");
    for (i, (stream, want)) in streams.into_iter().zip(want).enumerate() {
        let got = tokio::time::timeout(REQUEST_TIMEOUT, stream)
            .await
            .unwrap_or_else(|_| panic!("stream {i} hung"))
            .expect("task")
            .unwrap_or_else(|s| panic!("stream {i}: {s}"));
        assert_eq!(
            got.ids, want.ids,
            "stream {i}: tokens lost, repeated or changed"
        );
        assert_eq!(got.text, want.text, "stream {i}");
        assert_eq!(got.completion_tokens, want.ids.len() as u32, "stream {i}");
    }
    (victim, seen)
}

/// Sends `work` and waits until `container` runs one of its sequences: it gets traffic.
async fn gets_traffic(
    cluster: &ComposeCluster,
    container: &Container,
    work: &[(Vec<u32>, pd_common::sampling::SamplingParams)],
    want: &[Generated],
) {
    let (tx, _progress) = mpsc::unbounded_channel();
    let streams = start_streams(&cluster.grpc_url(), work, tx);
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        if let Ok(s) = cluster.node_stats(container).await {
            if s.running_sequences > 0 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline && !streams.iter().all(|s| s.is_finished()),
            "{} got none of {} requests",
            container.name,
            work.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, (stream, want)) in streams.into_iter().zip(want).enumerate() {
        let got = stream
            .await
            .expect("task")
            .unwrap_or_else(|s| panic!("stream {i}: {s}"));
        assert_eq!(got.ids, want.ids, "stream {i}");
    }
}

async fn one_request_is_served(cluster: &ComposeCluster, prompt: &[u32], want: &Generated) {
    let mut client = pd_proto::v1::generation_client::GenerationClient::connect(cluster.grpc_url())
        .await
        .expect("connecting to the router");
    let got = grpc_generate(&mut client, prompt, &greedy(8))
        .await
        .expect("served");
    assert_eq!(got.ids, want.ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_containers_crashed_or_killed_under_16_streams_lose_no_token() {
    let _serial = SERIAL.lock().await;
    let work = workload(MAX_TOKENS);
    let want = references(&work);
    let Some(cluster) = start(ComposeSpec::default()).await else {
        return;
    };

    // A crash: the node dies inside its container, the restart policy brings it back, it
    // registers again (under a new id, the old one's lease lapses) and takes requests.
    let (crashed, _) = streams_survive(&cluster, &work, &want, |c| {
        let cluster = &cluster;
        async move { cluster.crash(&c).await }
    })
    .await;
    cluster
        .wait_inspect(
            &crashed,
            "{{.State.Health.Status}}",
            containers::START_TIMEOUT,
            |s| s == "healthy",
        )
        .await
        .expect("the restarted container becomes healthy");
    cluster
        .wait_for_nodes(2, 2, SETTLE)
        .await
        .expect("it registers again");
    gets_traffic(&cluster, &crashed, &work[..4], &want[..4]).await;
    cluster
        .wait_all_blocks_free(SETTLE)
        .await
        .expect("no KV block leaked");

    // `docker kill`: docker takes it as stopped by hand, so it stays down; its streams move.
    let (killed, _) = streams_survive(&cluster, &work, &want, |c| {
        let cluster = &cluster;
        async move { cluster.kill(&c).await }
    })
    .await;
    cluster
        .wait_for_nodes(2, 1, SETTLE)
        .await
        .expect("the killed node leaves");
    assert_eq!(
        cluster.inspect(&killed, "{{.State.Status}}").await.unwrap(),
        "exited"
    );
    cluster
        .wait_all_blocks_free(SETTLE)
        .await
        .expect("no KV block leaked");
}

/// The address a node announced in its ready line (what it registers), from its log.
async fn announced(c: &Container) -> pd_common::node::ReadyLine {
    // The ready line is the node's stdout; its log goes to stderr.
    let log = containers::docker::docker(["logs", &c.id])
        .await
        .expect("docker logs");
    log.lines()
        .filter_map(|l| serde_json::from_str::<pd_common::node::ReadyLine>(l).ok())
        .find(|r| r.event == "ready")
        .unwrap_or_else(|| panic!("{} printed no ready line: {log}", c.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scaled_decode_containers_serve_and_a_stopped_one_leaves_at_once() {
    let _serial = SERIAL.lock().await;
    let work = workload(MAX_TOKENS);
    let want = references(&work);
    // `--scale decode=3`; a lease far longer than the wait below, so the stopped node must
    // leave by deregistering.
    let spec = ComposeSpec {
        prefill: 1,
        decode: 3,
        lease_ttl_secs: 30,
        ..ComposeSpec::default()
    };
    let Some(cluster) = start(spec).await else {
        return;
    };
    // Each replica registered its container's own address, for gRPC and for /metrics.
    for c in cluster.containers("decode").await.unwrap() {
        let ip = cluster
            .inspect(
                &c,
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            )
            .await
            .unwrap();
        let ready = announced(&c).await;
        assert_eq!(
            (ready.grpc.as_str(), ready.metrics.as_str()),
            (&*format!("{ip}:50071"), &*format!("{ip}:9171"))
        );
    }
    let (stopped, seen) = streams_survive(&cluster, &work, &want, |c| {
        let cluster = &cluster;
        async move {
            let stop = cluster.stop(&c, 40);
            let leaves = cluster.wait_for_nodes(1, 2, Duration::from_secs(10));
            let (stopped, left) = tokio::join!(stop, leaves);
            stopped.and(left)
        }
    })
    .await;
    assert!(
        seen.len() == 3 && seen.iter().all(|(_, running)| *running > 0),
        "all three decode replicas take streams: {seen:?}"
    );
    let code = cluster
        .inspect(&stopped, "{{.State.ExitCode}}")
        .await
        .unwrap();
    assert_eq!(
        code,
        "0",
        "the node exits cleanly on SIGTERM\n{}",
        cluster.logs("decode").await
    );
    cluster
        .wait_all_blocks_free(SETTLE)
        .await
        .expect("no KV block leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_or_paused_prefill_container_costs_a_deadline_not_a_request() {
    let _serial = SERIAL.lock().await;
    let prompt = golden_cases()[0].prompt_ids.clone();
    let want = reference(&prompt, &greedy(8));
    let spec = ComposeSpec {
        decode: 1,
        transfer_timeout_ms: 1500,
        ..ComposeSpec::default()
    };
    let Some(cluster) = start(spec).await else {
        return;
    };
    let prefills = cluster.containers("prefill").await.unwrap();
    let serve_four = || async {
        let served = futures::future::join_all(
            (0..4).map(|_| one_request_is_served(&cluster, &prompt, &want)),
        );
        tokio::time::timeout(REQUEST_TIMEOUT, served)
            .await
            .expect("requests hung");
    };

    // A partition: the node runs on but reaches nobody, and nobody reaches it.
    cluster.disconnect(&prefills[0]).await.unwrap();
    serve_four().await;
    cluster
        .wait_for_nodes(1, 1, SETTLE)
        .await
        .expect("its lease lapses");
    serve_four().await;
    cluster.connect(&prefills[0]).await.unwrap();
    cluster
        .wait_for_nodes(2, 1, SETTLE)
        .await
        .expect("it registers again");
    serve_four().await;
    cluster
        .wait_all_blocks_free(SETTLE)
        .await
        .expect("no KV block leaked");

    // Frozen past the transfer deadline: its connections stay open and nothing answers.
    cluster.pause(&prefills[1]).await.unwrap();
    serve_four().await;
    cluster
        .wait_for_nodes(1, 1, SETTLE)
        .await
        .expect("its lease lapses");
    cluster.unpause(&prefills[1]).await.unwrap();
    cluster
        .wait_for_nodes(2, 1, SETTLE)
        .await
        .expect("it registers again");
    serve_four().await;
    cluster
        .wait_all_blocks_free(SETTLE)
        .await
        .expect("no KV block leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_serves_through_etcd_stopped_started_and_replaced() {
    let _serial = SERIAL.lock().await;
    let prompt = golden_cases()[0].prompt_ids.clone();
    let want = reference(&prompt, &greedy(8));
    let spec = ComposeSpec {
        prefill: 1,
        decode: 1,
        ..ComposeSpec::default()
    };
    let Some(cluster) = start(spec).await else {
        return;
    };
    let etcd = cluster.container("etcd").await.unwrap();
    let both_seen = |h: &pd_tests::cluster::RouterHealth| {
        h.etcd_connected && h.nodes.prefill == 1 && h.nodes.decode == 1
    };

    cluster.stop(&etcd, 10).await.unwrap();
    let health = cluster
        .wait_health(SETTLE, "etcd seen as down", |h| !h.etcd_connected)
        .await
        .expect("the router notices");
    assert_eq!(health.http_status, 200, "it keeps serving on its last view");
    assert_eq!((health.nodes.prefill, health.nodes.decode), (1, 1));
    one_request_is_served(&cluster, &prompt, &want).await;
    cluster.start_container(&etcd).await.unwrap();
    cluster
        .wait_health(SETTLE, "etcd back with both nodes", both_seen)
        .await
        .unwrap();
    one_request_is_served(&cluster, &prompt, &want).await;

    // An etcd that lost its data: every node must register again.
    cluster.stop(&etcd, 10).await.unwrap();
    containers::docker::docker(["rm", &etcd.id]).await.unwrap();
    let volume = format!("{}_etcd-data", cluster.project());
    containers::docker::docker(["volume", "rm", &volume])
        .await
        .unwrap();
    cluster
        .compose(["up", "-d", "--no-deps", "etcd"])
        .await
        .unwrap();
    cluster
        .wait_health(SETTLE, "both nodes registered in the new etcd", both_seen)
        .await
        .expect("nodes re-register");
    one_request_is_served(&cluster, &prompt, &want).await;
    cluster
        .wait_all_blocks_free(SETTLE)
        .await
        .expect("no KV block leaked");
}

/// An HTTP stream through the router: `Ok(events)` if it ended with `[DONE]`, else the error.
async fn http_stream(url: String, prompt: Vec<u32>) -> Result<usize, String> {
    let body = serde_json::json!({
        "model": "", "prompt": prompt, "max_tokens": 200, "temperature": 0,
        "ignore_eos": true, "stream": true,
    });
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let mut bytes = response.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| format!("the stream broke: {e}"))?;
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = sse_events(&text);
    match events.last().map(String::as_str) {
        Some("[DONE]") => Ok(events.len()),
        _ => Err(format!(
            "the stream ended without [DONE] after {} events",
            events.len()
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_router_fails_open_streams_clearly_and_serves_once_restarted() {
    let _serial = SERIAL.lock().await;
    let prompt = golden_cases()[0].prompt_ids.clone();
    let want = reference(&prompt, &greedy(8));
    let work = workload(200);
    let spec = ComposeSpec {
        prefill: 1,
        decode: 1,
        ..ComposeSpec::default()
    };
    let Some(mut cluster) = start(spec).await else {
        return;
    };
    let (tx, mut progress) = mpsc::unbounded_channel();
    let streams = start_streams(&cluster.grpc_url(), &work[..3], tx);
    let sse = tokio::spawn(http_stream(cluster.http_url(), prompt.clone()));
    wait_progress(&mut progress, 3, 2).await;

    let router = cluster.container("router").await.unwrap();
    cluster
        .crash(&router)
        .await
        .expect("the router crashes and is restarted");
    for (i, stream) in streams.into_iter().enumerate() {
        let status = tokio::time::timeout(REQUEST_TIMEOUT, stream)
            .await
            .unwrap_or_else(|_| panic!("stream {i} hung"))
            .expect("task")
            .expect_err("the router that served it is gone");
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
            ),
            "stream {i}: {status:?}"
        );
    }
    let sse = tokio::time::timeout(REQUEST_TIMEOUT, sse)
        .await
        .expect("the SSE stream hung");
    assert!(
        sse.expect("task").is_err(),
        "an SSE stream cut off must not look complete"
    );

    cluster
        .wait_router(containers::START_TIMEOUT)
        .await
        .expect("the router is back");
    cluster
        .wait_health(SETTLE, "the restarted router seeing both nodes", |h| {
            h.http_status == 200 && h.nodes.prefill == 1 && h.nodes.decode == 1
        })
        .await
        .unwrap();
    one_request_is_served(&cluster, &prompt, &want).await;
    // The decode node let go of the cut-off streams.
    cluster
        .wait_all_blocks_free(SETTLE)
        .await
        .expect("no KV block leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_variant_serves_and_its_workers_refuse_plaintext() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = start(ComposeSpec {
        prefill: 1,
        decode: 1,
        tls: true,
        ..ComposeSpec::default()
    })
    .await
    else {
        return;
    };
    let case = &golden_cases()[0];
    let want = reference(&case.prompt_ids, &greedy(8));
    // Router to decode to prefill, the KV push and etcd: all over mutual TLS.
    one_request_is_served(&cluster, &case.prompt_ids, &want).await;
    let decode = cluster
        .container("decode")
        .await
        .expect("a decode container");
    let published = cluster
        .published(&decode, containers::DECODE_GRPC)
        .await
        .expect("the decode port");
    let plain = async {
        let mut client =
            pd_proto::v1::node_client::NodeClient::connect(format!("http://{published}")).await?;
        anyhow::Ok(client.stats(pd_proto::v1::StatsRequest {}).await?)
    };
    let plain = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .expect("a plaintext call ends");
    assert!(
        plain.is_err(),
        "a plaintext client got the decode node's stats"
    );
    // With the deployment's certificate the same call is answered: every block is free.
    cluster
        .wait_all_blocks_free(SETTLE)
        .await
        .expect("nothing leaked");
}
