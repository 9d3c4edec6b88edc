//! Peers and clients that break the protocol, against real processes: a decode node whose
//! prefill node answers with a reply that cannot be true (a first token outside the vocabulary,
//! a NaN logprob, more cached tokens than the prompt has), answers without shipping the KV,
//! refuses, or never answers, still gives the exact output (it computes the prompt itself within
//! the deadline); bytes that are no protobuf message get INVALID_ARGUMENT from every service; an
//! HTTP client that trickles its headers is cut off. Every node ends with all KV blocks free.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut};
use common::*;
use pd_common::wire::ToWire;
use pd_proto::v1 as pb;
use pd_tests::cluster::{Cluster, ClusterSpec, NodeSummary, Role};
use pd_tests::golden_cases;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Request, Response, Status};

/// How the fake prefill node misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Has the real prefill node do the work (KV lands), then says the first token is 999,999.
    OutOfVocabulary,
    /// The same, with a NaN logprob.
    NanLogprob,
    /// The same, claiming more cached tokens than the prompt has.
    TooManyCached,
    /// Answers with a plausible first token and ships nothing.
    NoKv,
    /// Refuses the request as invalid.
    Refuses,
    /// Never answers.
    Silent,
}

/// A prefill node that forwards to a real one and then lies, as its fault says.
struct FakePrefill {
    real: pb::prefill_client::PrefillClient<tonic::transport::Channel>,
    fault: Arc<Mutex<Fault>>,
}

#[tonic::async_trait]
impl pb::prefill_server::Prefill for FakePrefill {
    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let fault = *self.fault.lock().unwrap();
        let forward = |request: pb::PrefillRequest| {
            let mut real = self.real.clone();
            async move { Ok::<_, Status>(real.prefill(request).await?.into_inner()) }
        };
        let mut reply = match fault {
            Fault::NoKv => pb::PrefillResponse {
                first_token: Some(pb::TokenLogprobs {
                    token_id: 42,
                    logprob: -0.5,
                    top: Vec::new(),
                }),
                ..Default::default()
            },
            Fault::Refuses => return Err(Status::invalid_argument("no")),
            Fault::Silent => std::future::pending().await,
            _ => forward(request.into_inner()).await?,
        };
        let first = reply.first_token.as_mut().expect("a first token");
        match fault {
            Fault::OutOfVocabulary => first.token_id = 999_999,
            Fault::NanLogprob => first.logprob = f32::NAN,
            Fault::TooManyCached => reply.cached_tokens = 1_000_000,
            _ => {}
        }
        Ok(Response::new(reply))
    }
}

async fn serve_fake(real: &NodeSummary, fault: Arc<Mutex<Fault>>) -> SocketAddr {
    let real = pb::prefill_client::PrefillClient::connect(real.grpc_url())
        .await
        .expect("the real prefill node");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(pb::prefill_server::PrefillServer::new(FakePrefill {
            real,
            fault,
        }))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    address
}

/// Bytes as they are: to send what no protobuf encoder would.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Sends `body` as the request message of `path` on `url`; the status it was answered with.
async fn garbage(url: &str, path: &'static str, streaming: bool) -> Status {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("reachable");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    // Field 1 with wire type 7, which does not exist.
    let body = vec![0x0f, 0xff, 0xff, 0xff];
    let path = PathAndQuery::from_static(path);
    let answer = if streaming {
        match grpc.server_streaming(Request::new(body), path, Raw).await {
            Ok(mut s) => s.get_mut().message().await.map(|_| ()),
            Err(status) => Err(status),
        }
    } else {
        grpc.unary(Request::new(body), path, Raw).await.map(|_| ())
    };
    answer.expect_err("garbage refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_peers_and_clients_get_precise_errors_and_leave_nothing_behind() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(ClusterSpec {
        // Without its prefix cache the decode node asks for the same prompt every time.
        decode_args: [
            "--transfer-timeout-ms",
            "2000",
            "--prefill-answer-grace-ms",
            "500",
            "--no-enable-prefix-caching",
        ]
        .map(String::from)
        .to_vec(),
        router_args: vec!["--http-header-read-timeout-secs".into(), "1".into()],
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let node = |role| cluster.first_node(role).expect("a node of each role");
    let (prefill, decode) = (node(Role::Prefill), node(Role::Decode));
    let fault = Arc::new(Mutex::new(Fault::NoKv));
    let fake = serve_fake(&prefill, fault.clone()).await;

    let prompt = golden_cases()[1].prompt_ids.clone();
    let params = greedy(8);
    let expected = reference(&prompt, &params);
    let mut client = pb::decode_client::DecodeClient::connect(decode.grpc_url())
        .await
        .expect("decode node reachable");
    let fallbacks_before = metric_sum(
        &decode.metrics_url(),
        "pd_local_prefills_total",
        &["reason=\"prefill_failed\""],
    )
    .await;
    let faults = [
        Fault::OutOfVocabulary,
        Fault::NanLogprob,
        Fault::TooManyCached,
        Fault::NoKv,
        Fault::Refuses,
        Fault::Silent,
    ];
    for f in faults {
        *fault.lock().unwrap() = f;
        let request = pb::DecodeRequest {
            request_id: format!("hostile-{f:?}"),
            prompt_ids: prompt.clone(),
            sampling: Some(params.to_wire()),
            seed: 7,
            resume_ids: Vec::new(),
            prefill_candidates: vec![pb::PrefillCandidate {
                address: fake.to_string(),
                backend: pb::KvTransferBackend::Grpc as i32,
            }],
        };
        let run = async {
            let mut stream = client.generate(request).await?.into_inner();
            let mut ids = Vec::new();
            while let Some(m) = stream.message().await? {
                ids.extend(m.token_ids);
            }
            Ok::<_, Status>(ids)
        };
        let ids = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .unwrap_or_else(|_| panic!("{f:?}: the stream hung"))
            .unwrap_or_else(|s| panic!("{f:?}: {s:?}"));
        assert_eq!(ids, expected.ids, "{f:?}");
    }
    let fallbacks = metric_sum(
        &decode.metrics_url(),
        "pd_local_prefills_total",
        &["reason=\"prefill_failed\""],
    )
    .await;
    assert_eq!(
        fallbacks - fallbacks_before,
        faults.len() as f64,
        "each fault ended in a local prefill"
    );

    // Bytes that are no message of the service.
    let router = cluster.grpc_url();
    for (url, path, streaming) in [
        (router.as_str(), "/pd.v1.Generation/Generate", true),
        (router.as_str(), "/pd.v1.Generation/Tokenize", false),
        (&decode.grpc_url(), "/pd.v1.Decode/Generate", true),
        (&decode.grpc_url(), "/pd.v1.Node/Stats", false),
        (&prefill.grpc_url(), "/pd.v1.Prefill/Prefill", false),
    ] {
        let status = garbage(url, path, streaming).await;
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{path}: {status:?}"
        );
    }

    // A client that sends its headers a byte at a time is cut off.
    let http: SocketAddr = cluster
        .http_url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (mut from_server, mut to_server) = tokio::net::TcpStream::connect(http)
        .await
        .unwrap()
        .into_split();
    let trickle = tokio::spawn(async move {
        let head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        for byte in head.iter().cycle() {
            if to_server.write_all(&[*byte]).await.is_err() {
                return;
            }
            // The client's own pace (a byte every 200 ms), not a wait for the server.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let cut = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 256];
        // The server closes its side: reading sees the end (or a reset).
        while let Ok(n) = from_server.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    trickle.abort();
    assert!(cut.is_ok(), "the trickling client was never cut off");

    // The cluster still serves, and nothing leaked.
    let mut router_client = grpc_client(&cluster).await;
    let got = grpc_generate(&mut router_client, &prompt, &params)
        .await
        .expect("served");
    assert_eq!(got.ids, expected.ids);
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}
