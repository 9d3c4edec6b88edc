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
    let prefill = cluster
        .nodes()
        .into_iter()
        .find(|n| n.role == Role::Prefill)
        .unwrap();
    let decode = cluster
        .nodes()
        .into_iter()
        .find(|n| n.role == Role::Decode)
        .unwrap();
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
