//! Mutual TLS inside the cluster, against real processes: with a CA made for the cluster, the
//! router, prefill and decode nodes and etcd speak TLS to each other and a disaggregated request
//! gives the single engine's output; a plaintext client, and a client whose certificate another
//! CA signed, are refused by a node (its KV push, its stats) and by etcd (registration).

mod common;

use common::*;
use pd_common::membership::{MembershipConfig, Registration};
use pd_common::rpc::RpcConfig;
use pd_proto::v1 as pb;
use pd_tests::cluster::{binary, Cluster, ClusterSpec, ClusterTls, Role};
use pd_tests::golden_cases;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_of_the_clusters_ca_get_in() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(ClusterSpec {
        tls: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("a TLS cluster starts");
    let prompt = golden_cases()[0].prompt_ids.clone();
    let params = greedy(8);
    let mut client = grpc_client(&cluster).await;
    let got = grpc_generate(&mut client, &prompt, &params)
        .await
        .expect("served over mutual TLS inside");
    assert_eq!(got.ids, reference(&prompt, &params).ids);
    // The KV came from the prefill node over TLS, not from a local prefill.
    let prefill = cluster.first_node(Role::Prefill).unwrap();
    let decode = cluster.first_node(Role::Decode).unwrap();
    let sent = metric_sum(&prefill.metrics_url(), "pd_kv_link_bytes_total", &[]).await;
    assert!(sent > 0.0, "no KV crossed the TLS link");

    // A certificate of the cluster's CA is let in.
    let stats = |rpc: RpcConfig, address: String| async move {
        let mut node = pb::node_client::NodeClient::new(rpc.channel(&address).unwrap());
        node.stats(pb::StatsRequest {}).await
    };
    stats(cluster.rpc(), decode.grpc.clone())
        .await
        .expect("the cluster's own certificate");

    // A KV push with the cluster's certificate reaches the service (which refuses a transfer it
    // does not expect); the ones below must not even get that far.
    let push = |rpc: RpcConfig| {
        let channel = rpc.channel(&decode.grpc).unwrap();
        async move {
            let handshake = pb::KvPushMessage {
                message: Some(pb::kv_push_message::Message::Handshake(pb::KvHandshake {
                    request_id: "stranger".into(),
                    transfer_id: 1,
                    num_blocks: 1,
                    ..Default::default()
                })),
            };
            pb::kv_transfer_client::KvTransferClient::new(channel)
                .push(tokio_stream::iter(vec![handshake]))
                .await
        }
    };
    let reached = push(cluster.rpc())
        .await
        .expect_err("an unexpected transfer");
    assert_eq!(reached.code(), tonic::Code::InvalidArgument, "{reached:?}");

    // Plaintext, and a certificate another CA signed, are not.
    let dir = tempfile::tempdir().unwrap();
    let stranger = ClusterTls::generate(dir.path(), "stranger").unwrap();
    let stranger_rpc = RpcConfig {
        tls_ca: cluster.rpc().tls_ca,
        ..stranger.rpc()
    };
    for (who, rpc) in [
        ("plaintext", RpcConfig::default()),
        ("another CA's certificate", stranger_rpc.clone()),
    ] {
        for node in [&decode, &prefill] {
            // Refused in the handshake: how the client words it depends on where it broke.
            let answer = stats(rpc.clone(), node.grpc.clone()).await;
            assert!(answer.is_err(), "{who} got stats from {}", node.id);
        }
        let refused = push(rpc).await.expect_err("no transfer is expected");
        assert_ne!(
            refused.code(),
            reached.code(),
            "{who}: the KV push reached the service: {refused:?}"
        );
    }

    // etcd takes registrations only from the cluster's certificates.
    let membership = |cert: &ClusterTls| MembershipConfig {
        etcd_endpoints: vec![cluster.etcd_url()],
        cluster: cluster.cluster_name().to_string(),
        etcd_ca: cluster.rpc().tls_ca,
        etcd_cert: Some(cert.cert.clone()),
        etcd_key: Some(cert.key.clone()),
        ..MembershipConfig::default()
    };
    let info = pb::NodeInfo {
        node_id: "intruder".into(),
        role: pb::NodeRole::Decode as i32,
        address: "127.0.0.1:1".into(),
        ..Default::default()
    };
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        Registration::register(&membership(&stranger), &info),
    )
    .await
    .expect("registration answers");
    assert!(refused.is_err(), "another CA's node registered");
    let plain = MembershipConfig {
        etcd_endpoints: vec![cluster.etcd_url().replace("https://", "http://")],
        cluster: cluster.cluster_name().to_string(),
        ..MembershipConfig::default()
    };
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        Registration::register(&plain, &info),
    )
    .await
    .expect("registration answers");
    assert!(refused.is_err(), "a plaintext node registered");
    assert_eq!(cluster.health().await.unwrap().nodes.decode, 1);

    // The image's health probe speaks the node's TLS when it has the node's variables.
    let probe = |tls: bool| {
        let mut command = std::process::Command::new(binary("pd-probe").unwrap());
        command.args(["ready", "--role", "decode", "--address", &decode.grpc]);
        command.env_remove("PD_TLS_CA");
        if tls {
            let rpc = cluster.rpc();
            command
                .env("PD_TLS_CA", rpc.tls_ca.unwrap())
                .env("PD_TLS_CERT", rpc.tls_cert.unwrap())
                .env("PD_TLS_KEY", rpc.tls_key.unwrap());
        }
        command.output().expect("pd-probe runs").status.success()
    };
    assert!(probe(true), "pd-probe with the cluster's certificate");
    assert!(!probe(false), "pd-probe in plaintext against a TLS node");

    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

/// A raw HTTP/1.1 exchange over TLS to `address`, trusting `ca`, with a client certificate
/// when given; the whole answer as text.
async fn https(
    address: &str,
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
    request: &str,
) -> std::io::Result<String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        None => config.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            config.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn post(path: &str, body: &serde_json::Value) -> String {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_apis_serve_tls_and_ask_for_client_certificates() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster starts");
    // A second router for the same cluster, its client APIs behind TLS with client
    // certificates (vLLM's --ssl-* flags).
    let dir = tempfile::tempdir().unwrap();
    let edge = ClusterTls::generate(dir.path(), "edge").unwrap();
    let (client_cert, client_key) = edge.issue("client").unwrap();
    let path = |p: &std::path::PathBuf| p.display().to_string();
    let mut router = tokio::process::Command::new(binary("pd-router").unwrap())
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .args(["--etcd-endpoints", &cluster.etcd_url()])
        .args(["--cluster", cluster.cluster_name()])
        .args(["--ssl-certfile", &path(&edge.cert)])
        .args(["--ssl-keyfile", &path(&edge.key)])
        .args(["--ssl-ca-certs", &path(&edge.ca)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pd-router starts");
    let stdout = router.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let ready = tokio::time::timeout(std::time::Duration::from_secs(120), lines.next_line())
        .await
        .expect("a ready line in time")
        .unwrap()
        .expect("a ready line");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let (http, grpc) = (
        ready["http"].as_str().unwrap().to_string(),
        ready["grpc"].as_str().unwrap().to_string(),
    );
    let client = Some((client_cert.as_path(), client_key.as_path()));
    // Ready once it knows the decode node.
    let health = "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (address, ca) = (&http, &edge.ca);
    eventually(std::time::Duration::from_secs(30), move || async move {
        let answer = https(address, ca, client, health).await.unwrap();
        match answer.starts_with("HTTP/1.1 200") {
            true => Ok(()),
            false => Err(answer),
        }
    })
    .await;

    let prompt = golden_cases()[0].prompt_ids.clone();
    let params = greedy(6);
    let expected = reference(&prompt, &params);
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 6, "temperature": 0});
    let answer = https(&http, &edge.ca, client, &post("/v1/completions", &body))
        .await
        .expect("an HTTPS answer");
    let (head, json) = answer.split_once("\r\n\r\n").expect("a body");
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    let json: serde_json::Value = serde_json::from_str(json).expect("JSON");
    assert_eq!(json["choices"][0]["text"], expected.text.as_str());
    // Without a client certificate, or in plaintext, there is no HTTP answer.
    let without = https(&http, &edge.ca, None, &post("/v1/completions", &body)).await;
    assert!(
        !matches!(&without, Ok(a) if a.starts_with("HTTP/")),
        "{without:?}"
    );
    let plain = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(&http).await?;
        tcp.write_all(health.as_bytes()).await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    }
    .await;
    assert!(
        !matches!(&plain, Ok(a) if a.starts_with("HTTP/")),
        "{plain:?}"
    );

    // gRPC over TLS, with and without a client certificate.
    let channel = |identity: bool| {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                std::fs::read(&edge.ca).unwrap(),
            ))
            .domain_name("localhost");
        if identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                std::fs::read(&client_cert).unwrap(),
                std::fs::read(&client_key).unwrap(),
            ));
        }
        tonic::transport::Endpoint::from_shared(format!("https://{grpc}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_lazy()
    };
    let mut client = pb::generation_client::GenerationClient::new(channel(true));
    let got = grpc_generate(&mut client, &prompt, &params)
        .await
        .expect("served over TLS");
    assert_eq!(got.ids, expected.ids);
    let mut stranger = pb::generation_client::GenerationClient::new(channel(false));
    assert!(grpc_generate(&mut stranger, &prompt, &params)
        .await
        .is_err());

    router.kill().await.unwrap();
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}
