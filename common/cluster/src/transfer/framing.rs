//! `KvTransfer.Push` on the wire without copying KV bytes in user space.
//!
//! tonic's codecs copy every message into a buffer of their own, on both ends: for KV that is two
//! extra passes over every byte besides the one each way that the kernel makes. Here the stream
//! is framed by hand instead. A sender writes a chunk's K and V onto the HTTP/2 stream as the
//! [`Bytes`] they already are (slices of the exported layer), behind a few bytes of gRPC and
//! protobuf headers; the receiver decodes them as slices of the frames HTTP/2 read off the
//! socket, copying only a payload that a flow-control window happened to cut across frames.
//!
//! The bytes on the wire are ordinary gRPC carrying ordinary protobuf: any gRPC client may push
//! to our decode nodes, and our push works against any server of the same proto.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use pd_proto::v1::kv_push_message::Message as PushMessage;
use pd_proto::v1::kv_transfer_server::KvTransferServer;
use pd_proto::v1::{KvPushAck, KvPushMessage};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::codec::{Codec, Streaming};
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::Status;
use tower_service::Service;

use super::grpc::MAX_MESSAGE_BYTES;
use super::service::KvTransferService;
use crate::telemetry::REQUEST_ID_HEADER;

/// The method's path.
pub const PUSH_PATH: &str = "/pd.v1.KvTransfer/Push";

/// gRPC's message prefix: a compressed flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// Field numbers (`kv_transfer.proto`): `KvPushMessage.chunk`, `KvChunk.keys`, `KvChunk.values`.
const PUSH_CHUNK: u32 = 2;
const CHUNK_KEYS: u32 = 4;
const CHUNK_VALUES: u32 = 5;

/// Payloads smaller than this are copied into the message's header rather than sent as frames
/// of their own (NCCL announcements carry none at all).
const INLINE_BELOW: usize = 16 << 10;

/// One message of the Push stream as the buffers to send, in order: gRPC prefix and protobuf
/// headers, and a chunk's K and V as they are.
pub fn encode(message: KvPushMessage) -> Result<Vec<Bytes>, Status> {
    let mut chunk = match message.message {
        Some(PushMessage::Chunk(chunk))
            if chunk.keys.len() + chunk.values.len() >= INLINE_BELOW =>
        {
            chunk
        }
        _ => return encode_whole(&message).map(|b| vec![b]),
    };
    let keys = std::mem::take(&mut chunk.keys);
    let values = std::mem::take(&mut chunk.values);
    let field = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64);
    let chunk_len = chunk.encoded_len()
        + field(CHUNK_KEYS, keys.len())
        + keys.len()
        + field(CHUNK_VALUES, values.len())
        + values.len();
    let message_len = field(PUSH_CHUNK, chunk_len) + chunk_len;
    let mut head = BytesMut::with_capacity(PREFIX + 64);
    put_prefix(&mut head, message_len)?;
    encode_key(PUSH_CHUNK, WireType::LengthDelimited, &mut head);
    encode_varint(chunk_len as u64, &mut head);
    // The small fields, then K and V as fields of their own: protobuf takes fields in any order.
    chunk
        .encode(&mut head)
        .map_err(|e| Status::internal(format!("encoding a KV chunk: {e}")))?;
    encode_key(CHUNK_KEYS, WireType::LengthDelimited, &mut head);
    encode_varint(keys.len() as u64, &mut head);
    let mut between = BytesMut::with_capacity(8);
    encode_key(CHUNK_VALUES, WireType::LengthDelimited, &mut between);
    encode_varint(values.len() as u64, &mut between);
    Ok(vec![head.freeze(), keys, between.freeze(), values])
}

/// A message copied whole into one buffer, as any gRPC codec would.
fn encode_whole(message: &impl Message) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    put_prefix(&mut buf, len)?;
    message
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("encoding a gRPC message: {e}")))?;
    Ok(buf.freeze())
}

fn put_prefix(buf: &mut BytesMut, len: usize) -> Result<(), Status> {
    if len > MAX_MESSAGE_BYTES {
        return Err(Status::out_of_range(format!(
            "a KV push message of {len} bytes is over the limit of {MAX_MESSAGE_BYTES}"
        )));
    }
    buf.put_u8(0);
    buf.put_u32(len as u32);
    Ok(())
}

/// The request body of a push: the stream's messages as they come out of `messages`, each as the
/// buffers [`encode`] makes.
struct PushBody {
    messages: mpsc::Receiver<KvPushMessage>,
    pending: VecDeque<Bytes>,
}

impl http_body::Body for PushBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(buf) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(buf))));
            }
            match ready!(this.messages.poll_recv(cx)) {
                Some(message) => match encode(message) {
                    Ok(bufs) => this.pending.extend(bufs),
                    Err(status) => return Poll::Ready(Some(Err(status))),
                },
                None => return Poll::Ready(None),
            }
        }
    }
}

/// Calls `KvTransfer.Push` on `channel` with the messages `messages` yields until it closes, and
/// returns the receiver's acknowledgement (or the status it answered with, which may come
/// before the stream is done).
pub async fn push(
    mut channel: Channel,
    request_id: &str,
    messages: mpsc::Receiver<KvPushMessage>,
) -> Result<KvPushAck, Status> {
    let body = PushBody {
        messages,
        pending: VecDeque::new(),
    };
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(PUSH_PATH)
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Ok(value) = http::HeaderValue::from_str(request_id) {
        request = request.header(REQUEST_ID_HEADER, value);
    }
    let request = request
        .body(Body::new(body))
        .map_err(|e| Status::internal(format!("building a KV push request: {e}")))?;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(format!("KV push: {e}")))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    // A trailers-only answer: the receiver refused before acknowledging anything.
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    let status_code = response.status();
    let mut codec = tonic_prost::ProstCodec::<KvPushMessage, KvPushAck>::default();
    let mut answer = Streaming::new_response(
        codec.decoder(),
        response.into_body(),
        status_code,
        None,
        None,
    );
    let ack = answer
        .message()
        .await?
        .ok_or_else(|| Status::internal("KV push answered without an acknowledgement"))?;
    // The trailers carry the call's status.
    answer.trailers().await?;
    Ok(ack)
}

/// Buffers received and not yet decoded, read as one: a chunk's K and V come out as slices of
/// the buffer they arrived in, copied only when they straddle two.
#[derive(Default)]
struct Frames {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Frames {
    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.remaining += part.len();
            self.parts.push_back(part);
        }
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map(|b| b.as_ref()).unwrap_or(&[])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of the frames");
        self.remaining -= cnt;
        while cnt > 0 {
            let front = self.parts.front_mut().expect("counted above");
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(
            len <= self.remaining,
            "copy_to_bytes past the end of the frames"
        );
        match self.parts.front_mut() {
            Some(front) if front.len() >= len => {
                let out = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                self.remaining -= len;
                out
            }
            _ => {
                let mut out = BytesMut::with_capacity(len);
                out.put(self.take(len));
                out.freeze()
            }
        }
    }
}

/// The messages of a Push request's body, decoded as they complete.
pub struct PushMessages {
    body: Body,
    frames: Frames,
    ended: bool,
}

impl PushMessages {
    pub fn new(body: Body) -> Self {
        Self {
            body,
            frames: Frames::default(),
            ended: false,
        }
    }

    /// The next message; `None` once the stream ended between messages.
    pub async fn message(&mut self) -> Result<Option<KvPushMessage>, Status> {
        loop {
            if let Some(len) = self.complete()? {
                self.frames.advance(PREFIX);
                let message = KvPushMessage::decode((&mut self.frames).take(len)).map_err(|e| {
                    Status::invalid_argument(format!("a malformed KV push message: {e}"))
                })?;
                return Ok(Some(message));
            }
            if self.ended {
                return match self.frames.remaining() {
                    0 => Ok(None),
                    n => Err(Status::invalid_argument(format!(
                        "the KV push stream ended inside a message ({n} bytes of it)"
                    ))),
                };
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.frames.push(data);
                    }
                }
                Some(Err(status)) => return Err(status),
                None => self.ended = true,
            }
        }
    }

    /// The length of the message at the front when all of it has arrived.
    fn complete(&self) -> Result<Option<usize>, Status> {
        if self.frames.remaining() < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        let mut filled = 0;
        for part in &self.frames.parts {
            let n = (PREFIX - filled).min(part.len());
            prefix[filled..filled + n].copy_from_slice(&part[..n]);
            filled += n;
            if filled == PREFIX {
                break;
            }
        }
        match prefix[0] {
            0 => {}
            1 => {
                return Err(Status::unimplemented(
                    "compressed KV push messages are not accepted: send them uncompressed",
                ))
            }
            flag => {
                return Err(Status::invalid_argument(format!(
                    "a gRPC message prefix with flag {flag}"
                )))
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(Status::out_of_range(format!(
                "a KV push message of {len} bytes is over the limit of {MAX_MESSAGE_BYTES}"
            )));
        }
        Ok((self.frames.remaining() >= PREFIX + len).then_some(len))
    }
}

/// The answer to a Push: the acknowledgement and an OK status, or a trailers-only status.
fn answer(outcome: Result<KvPushAck, Status>) -> http::Response<Body> {
    let ack = match outcome.and_then(|ack| encode_whole(&ack)) {
        Ok(ack) => ack,
        Err(status) => return status.into_http(),
    };
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = http_body_util::Full::new(ack)
        .map_err(|never: Infallible| match never {})
        .with_trailers(async move { Some(Ok::<_, Status>(trailers)) });
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// `KvTransfer` as a decode node serves it: `Push` read by [`PushMessages`], the other methods
/// by tonic's generated server.
#[derive(Clone)]
pub struct KvTransferRoutes {
    service: KvTransferService,
    generated: KvTransferServer<KvTransferService>,
}

impl KvTransferRoutes {
    pub fn new(service: KvTransferService) -> Self {
        let generated = KvTransferServer::new(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Self { service, generated }
    }
}

impl NamedService for KvTransferRoutes {
    const NAME: &'static str = <KvTransferServer<KvTransferService> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for KvTransferRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != PUSH_PATH {
            let mut generated = self.generated.clone();
            return Box::pin(async move { generated.call(request).await });
        }
        let service = self.service.clone();
        Box::pin(async move {
            // The sender's IP labels this link's figures (its port is a fresh one per connection).
            let peer = request
                .extensions()
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|i| i.remote_addr())
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "unknown".into());
            let mut messages = PushMessages::new(request.into_body());
            Ok(answer(service.receive(&peer, &mut messages).await))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_proto::v1::{KvChunk, KvHandshake};

    fn chunk(payload: usize) -> KvPushMessage {
        KvPushMessage {
            message: Some(PushMessage::Chunk(KvChunk {
                layer: 7,
                first_block: 300,
                num_blocks: 2,
                keys: Bytes::from((0..payload).map(|i| i as u8).collect::<Vec<_>>()),
                values: Bytes::from((0..payload).map(|i| (i * 7) as u8).collect::<Vec<_>>()),
                checksum: 0xdead_beef,
            })),
        }
    }

    fn joined(bufs: &[Bytes]) -> Vec<u8> {
        bufs.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn a_chunk_is_standard_grpc_and_protobuf_with_its_payload_not_copied() {
        for payload in [0, 100, INLINE_BELOW, 300_000] {
            let message = chunk(payload);
            let bufs = encode(message.clone()).unwrap();
            if payload * 2 >= INLINE_BELOW {
                let Some(PushMessage::Chunk(c)) = &message.message else {
                    unreachable!()
                };
                assert_eq!(bufs.len(), 4);
                // The same memory, not a copy.
                assert_eq!(bufs[1].as_ptr(), c.keys.as_ptr());
                assert_eq!(bufs[3].as_ptr(), c.values.as_ptr());
            }
            let wire = joined(&bufs);
            assert_eq!(wire[0], 0);
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, wire.len() - PREFIX);
            // What prost itself would decode, and what tonic's codec would have sent.
            assert_eq!(KvPushMessage::decode(&wire[PREFIX..]).unwrap(), message);
            assert_eq!(wire[PREFIX..].len(), message.encoded_len());
        }
    }

    #[test]
    fn frames_read_across_any_cuts() {
        let messages = [
            KvPushMessage {
                message: Some(PushMessage::Handshake(KvHandshake {
                    request_id: "r".into(),
                    num_blocks: 3,
                    ..Default::default()
                })),
            },
            chunk(40_000),
            chunk(10),
            chunk(70_000),
        ];
        let wire: Vec<u8> = messages
            .iter()
            .flat_map(|m| joined(&encode(m.clone()).unwrap()))
            .collect();
        for cut in [1, 3, 5, 4096, 65_536, 1 << 20] {
            let mut frames = Frames::default();
            for part in wire.chunks(cut) {
                frames.push(Bytes::copy_from_slice(part));
            }
            for expected in &messages {
                let mut prefix = [0u8; PREFIX];
                frames.copy_to_slice(&mut prefix);
                let len = u32::from_be_bytes(prefix[1..].try_into().unwrap()) as usize;
                let got = KvPushMessage::decode((&mut frames).take(len)).unwrap();
                assert_eq!(&got, expected, "cut every {cut} bytes");
            }
            assert_eq!(frames.remaining(), 0);
        }
    }

    #[test]
    fn a_payload_inside_one_frame_is_a_slice_of_it() {
        let wire = Bytes::from(joined(&encode(chunk(50_000)).unwrap()));
        let mut frames = Frames::default();
        frames.push(wire.clone());
        frames.advance(PREFIX);
        let len = wire.len() - PREFIX;
        let got = KvPushMessage::decode((&mut frames).take(len)).unwrap();
        let Some(PushMessage::Chunk(c)) = got.message else {
            panic!("a chunk")
        };
        let range = wire.as_ptr_range();
        assert!(range.contains(&c.keys.as_ptr()) && range.contains(&c.values.as_ptr()));
    }
}
