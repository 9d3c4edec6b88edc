//! Bad input against a real cluster: every case gets a precise status (HTTP 400/413/422 with an
//! OpenAI-style body; gRPC INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND), a refused or
//! abandoned request leaves no KV block behind, a forged KV transfer is refused, and the nodes
//! keep serving afterwards.

mod common;

use common::*;
use pd_proto::v1 as pb;
use pd_tests::cluster::{Cluster, ClusterSpec, Role};
use pd_tests::golden_cases;
use serde_json::{json, Value};

async fn post(cluster: &Cluster, path: &str, body: reqwest::Body) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", cluster.http_url()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the router answers");
    let status = response.status().as_u16();
    let text = response.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, body)
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_error_and_leaks_nothing() {
    let _serial = SERIAL.lock().await;
    // In-process nodes: bad input needs no kill or freeze.
    let cluster = Cluster::start(ClusterSpec {
        in_process: true,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");

    let long: Vec<u32> = std::iter::repeat_n(28, 9000).collect();
    let cases: Vec<(&str, &str, reqwest::Body, u16)> = vec![
        (
            "malformed JSON",
            "/v1/chat/completions",
            "{\"messages\": [".into(),
            400,
        ),
        ("not JSON", "/v1/completions", "hello".into(), 400),
        ("empty body", "/v1/completions", "".into(), 400),
        (
            "wrong type",
            "/v1/chat/completions",
            chat(json!({"max_tokens": "ten"})).to_string().into(),
            422,
        ),
        (
            "missing messages",
            "/v1/chat/completions",
            json!({"model": ""}).to_string().into(),
            422,
        ),
        (
            "missing prompt",
            "/v1/completions",
            json!({"max_tokens": 3}).to_string().into(),
            422,
        ),
        (
            "max_tokens 0",
            "/v1/chat/completions",
            chat(json!({"max_tokens": 0})).to_string().into(),
            400,
        ),
        (
            "max_tokens -1",
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": -1}).to_string().into(),
            400,
        ),
        (
            "negative temperature",
            "/v1/chat/completions",
            chat(json!({"temperature": -0.5})).to_string().into(),
            400,
        ),
        (
            "top_p 0",
            "/v1/chat/completions",
            chat(json!({"top_p": 0})).to_string().into(),
            400,
        ),
        (
            "top_p 1.5",
            "/v1/completions",
            json!({"prompt": "a", "top_p": 1.5}).to_string().into(),
            400,
        ),
        (
            "prompt over the context",
            "/v1/completions",
            json!({"prompt": long, "max_tokens": 4}).to_string().into(),
            400,
        ),
        (
            "unknown model",
            "/v1/chat/completions",
            chat(json!({"model": "gpt-17"})).to_string().into(),
            400,
        ),
        (
            "empty messages",
            "/v1/chat/completions",
            json!({"messages": []}).to_string().into(),
            400,
        ),
        (
            "bad role",
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]})
                .to_string()
                .into(),
            400,
        ),
        (
            "10 MB body",
            "/v1/completions",
            vec![b' '; 10 << 20].into(),
            413,
        ),
    ];
    for (name, path, body, want) in cases {
        let (status, body) = post(&cluster, path, body).await;
        assert_eq!(status, want, "{name}: {body}");
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
        assert!(error["type"].is_string(), "{name}: {body}");
        if name == "prompt over the context" {
            assert_eq!(error["code"], "context_length_exceeded", "{body}");
        }
        if name == "unknown model" {
            assert_eq!(error["code"], "model_not_found", "{body}");
        }
    }

    // The same over gRPC.
    let mut client = grpc_client(&cluster).await;
    let prompt = golden_cases()[0].prompt_ids.clone();
    let ids = |ids: Vec<u32>| Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids }));
    let grpc_cases: Vec<(&str, pb::GenerateRequest, tonic::Code)> = vec![
        (
            "no prompt",
            pb::GenerateRequest::default(),
            tonic::Code::InvalidArgument,
        ),
        (
            "negative temperature",
            pb::GenerateRequest {
                prompt: ids(prompt.clone()),
                sampling: Some(pb::SamplingParams {
                    temperature: Some(-1.0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "max_tokens 0",
            pb::GenerateRequest {
                prompt: ids(prompt.clone()),
                sampling: Some(pb::SamplingParams {
                    max_tokens: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "token id outside the vocabulary",
            pb::GenerateRequest {
                prompt: ids(vec![1, 999_999]),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "prompt over the context",
            pb::GenerateRequest {
                prompt: ids(long.clone()),
                ..Default::default()
            },
            tonic::Code::ResourceExhausted,
        ),
        (
            "too large a message",
            pb::GenerateRequest {
                prompt: ids(vec![7; 2_000_000]),
                ..Default::default()
            },
            tonic::Code::ResourceExhausted,
        ),
        (
            "unknown model",
            pb::GenerateRequest {
                model: "gpt-17".into(),
                prompt: ids(prompt.clone()),
                ..Default::default()
            },
            tonic::Code::NotFound,
        ),
    ];
    for (name, request, want) in grpc_cases {
        let status = match client.generate(request).await {
            Ok(mut stream) => stream.get_mut().message().await.expect_err(name),
            Err(status) => status,
        };
        assert_eq!(status.code(), want, "{name}: {status:?}");
        assert!(!status.message().is_empty(), "{name}");
    }

    // A client that goes away mid-stream frees its blocks.
    let request = pb::GenerateRequest {
        prompt: ids(prompt.clone()),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(500),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client
        .generate(request)
        .await
        .expect("accepted")
        .into_inner();
    stream.message().await.expect("a first message");
    drop(stream);
    assert_all_blocks_free(&cluster).await;

    // A forged transfer straight to the decode node: wrong fingerprint, unknown transfer.
    let decode = cluster.first_node(Role::Decode).unwrap();
    let mut kv = pb::kv_transfer_client::KvTransferClient::connect(decode.grpc_url())
        .await
        .expect("decode node reachable");
    let handshake = |fingerprint: pb::ModelFingerprint| pb::KvPushMessage {
        message: Some(pb::kv_push_message::Message::Handshake(pb::KvHandshake {
            request_id: "forged".into(),
            transfer_id: 12345,
            fingerprint: Some(fingerprint),
            num_blocks: 1,
            ..Default::default()
        })),
    };
    let wrong = pb::ModelFingerprint {
        model_id: "another model".into(),
        kv_dtype: "f16".into(),
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    let status = kv
        .push(tokio_stream::iter(vec![handshake(wrong)]))
        .await
        .expect_err("fingerprint mismatch");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("fingerprint"), "{status:?}");

    // The cluster still serves, and nothing leaked.
    let got = grpc_generate(&mut client, &prompt, &greedy(4))
        .await
        .expect("served");
    assert_eq!(got.ids, reference(&prompt, &greedy(4)).ids);
    assert_all_blocks_free(&cluster).await;
    assert!(cluster.nodes().len() == 2, "no node died");
    cluster.shutdown().await.expect("clean shutdown");
}
