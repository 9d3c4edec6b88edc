//! The transfer path end to end on loopback: push driver, `KvTransfer` service, reservations.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use pd_proto::v1::kv_push_message::Message as PushMessage;
use pd_proto::v1::{KvHandshake, KvPushMessage, ModelFingerprint, NcclConnectRequest};
use tokio::sync::mpsc;

use super::grpc::{client, GrpcSink};

/// A channel to the receiver at `address`.
fn channel(address: &str) -> tonic::transport::Channel {
    RpcConfig::default().channel(address).unwrap()
}
use super::push::{push, ChunkSink};
use super::{KvReceiver, KvTransferService, TransferBackend, TransferTicket};
use crate::engine::ExportedKv;
use crate::kv::{KvCache, KvCacheSpec};
use crate::rpc::RpcConfig;

/// Sends the handshake as the test made it, whatever backend it names: what a peer of another
/// build, or a hostile one, may send.
struct AsIs;

impl ChunkSink for AsIs {
    fn backend(&self) -> TransferBackend {
        TransferBackend::Grpc
    }
    fn prepare(&self, _handshake: &mut KvHandshake) {}
    async fn chunks(&mut self, kv: ExportedKv) -> crate::Result<Vec<pd_proto::v1::KvChunk>> {
        Ok(vec![super::chunk_of(&kv)?])
    }
    async fn flush(&mut self) -> crate::Result<()> {
        Ok(())
    }
    fn failed(&mut self) {}
}

fn spec() -> KvCacheSpec {
    KvCacheSpec {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 8,
        block_size: 4,
        num_blocks: 8,
        dtype: DType::F16,
    }
}

fn exported(layer: usize, blocks: usize) -> ExportedKv {
    let k = Tensor::randn(0f32, 1., (blocks, 4, 2, 8), &Device::Cpu).unwrap();
    let k = k.to_dtype(DType::F16).unwrap();
    ExportedKv::from_tensors(layer, 0, &k, &k).unwrap()
}

async fn serve(receiver: &Arc<KvReceiver>) -> String {
    serve_framed_by(receiver, Ends::Ours).await
}

/// Which code frames the `Push` stream at each end: ours ([`super::framing`]) at both, or
/// tonic's codec at one of them (as any other gRPC peer would).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ends {
    Ours,
    TonicServer,
    TonicClient,
}

async fn serve_framed_by(receiver: &Arc<KvReceiver>, ends: Ends) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let service = KvTransferService::new(receiver.clone());
    let router = match ends {
        Ends::TonicServer => RpcConfig::default().server().unwrap().add_service(
            pd_proto::v1::kv_transfer_server::KvTransferServer::new(service)
                .max_decoding_message_size(super::grpc::MAX_MESSAGE_BYTES),
        ),
        _ => RpcConfig::default()
            .server()
            .unwrap()
            .add_service(service.into_server()),
    };
    tokio::spawn(router.serve_with_incoming(RpcConfig::incoming(listener)));
    address
}

fn handshake(receiver: &KvReceiver, ticket: &TransferTicket, blocks: u32) -> KvHandshake {
    KvHandshake {
        request_id: "t".into(),
        transfer_id: ticket.id(),
        fingerprint: Some(receiver.fingerprint().clone()),
        num_blocks: blocks,
        ..Default::default()
    }
}

fn fingerprint() -> ModelFingerprint {
    ModelFingerprint {
        model_id: "m".into(),
        kv_dtype: "f16".into(),
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 8,
        block_size: 4,
    }
}

#[tokio::test]
async fn a_whole_transfer_completes_its_ticket_and_a_partial_one_does_not() {
    let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
    let receiver = KvReceiver::new(cache, fingerprint());
    let address = serve(&receiver).await;

    let ticket = receiver.expect(vec![3, 5]);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(exported(0, 2)).unwrap();
    tx.send(exported(1, 2)).unwrap();
    drop(tx);
    let hs = handshake(&receiver, &ticket, 2);
    let ack = push(channel(&address), &address, "t", hs, rx, GrpcSink::new())
        .await
        .unwrap();
    assert_eq!(ack.chunks, 2);
    assert!(ticket.is_complete());
    assert_eq!(ticket.finish().unwrap().chunks, 2);
    assert_eq!(receiver.pending(), 0);

    let ticket = receiver.expect(vec![1, 2]);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(exported(0, 2)).unwrap();
    drop(tx);
    let hs = handshake(&receiver, &ticket, 2);
    push(channel(&address), &address, "t", hs, rx, GrpcSink::new())
        .await
        .unwrap();
    assert!(!ticket.is_complete());
    assert!(ticket.finish().unwrap_err().to_string().contains("missing"));
}

#[tokio::test]
async fn closed_unknown_and_mismatched_transfers_are_refused() {
    let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
    let receiver = KvReceiver::new(cache, fingerprint());
    let address = serve(&receiver).await;

    // A ticket dropped (given up) refuses the sender: NOT_FOUND at the handshake.
    let ticket = receiver.expect(vec![0]);
    let hs = handshake(&receiver, &ticket, 1);
    drop(ticket);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(exported(0, 1)).unwrap();
    drop(tx);
    let err = push(channel(&address), &address, "t", hs, rx, GrpcSink::new())
        .await
        .unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);

    // Another model's KV: refused, naming the field.
    let ticket = receiver.expect(vec![0]);
    let mut hs = handshake(&receiver, &ticket, 1);
    if let Some(f) = hs.fingerprint.as_mut() {
        f.head_dim = 128;
    }
    let (_tx, rx) = mpsc::unbounded_channel();
    let err = push(channel(&address), &address, "t", hs, rx, GrpcSink::new())
        .await
        .unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("head_dim"), "{status:?}");
    assert!(!ticket.is_complete());
}

#[tokio::test]
async fn unknown_backends_are_refused_and_nccl_needs_an_nccl_build() {
    let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
    let receiver = KvReceiver::new(cache, fingerprint());
    let address = serve(&receiver).await;

    let ticket = receiver.expect(vec![0]);
    let mut hs = handshake(&receiver, &ticket, 1);
    hs.backend = 42;
    let (_tx, rx) = mpsc::unbounded_channel();
    let err = push(channel(&address), &address, "t", hs, rx, AsIs)
        .await
        .unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // An NCCL handshake naming a link this node never joined.
    let mut hs = handshake(&receiver, &ticket, 1);
    hs.set_backend(TransferBackend::Nccl.to_wire());
    hs.nccl_link = "no-such-link".into();
    let (_tx, rx) = mpsc::unbounded_channel();
    let err = push(channel(&address), &address, "t", hs, rx, AsIs)
        .await
        .unwrap_err();
    let code = tonic::Status::from(err).code();
    let expected = if cfg!(feature = "nccl") {
        tonic::Code::NotFound
    } else {
        tonic::Code::Unimplemented
    };
    assert_eq!(code, expected);
    assert!(!ticket.is_complete());

    // Joining a link: refused outright without NCCL, and for a malformed id with it.
    let err = client(channel(&address))
        .nccl_connect(NcclConnectRequest {
            unique_id: vec![0; 7],
            link_id: "l".into(),
            fingerprint: Some(fingerprint()),
        })
        .await
        .unwrap_err();
    let expected = if cfg!(feature = "nccl") {
        tonic::Code::InvalidArgument
    } else {
        tonic::Code::Unimplemented
    };
    assert_eq!(err.code(), expected, "{err:?}");
}

#[tokio::test]
async fn a_large_export_travels_as_several_messages_and_lands_bit_for_bit() {
    for ends in [Ends::Ours, Ends::TonicServer, Ends::TonicClient] {
        large_export(ends).await;
    }
}

async fn large_export(ends: Ends) {
    // 200 blocks of 32 KiB (K) per layer: more than a message holds.
    let spec = KvCacheSpec {
        num_layers: 2,
        num_kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        num_blocks: 210,
        dtype: DType::BF16,
    };
    let fp = ModelFingerprint {
        kv_dtype: "bf16".into(),
        num_kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        ..fingerprint()
    };
    let source = KvCache::new(spec.clone(), &Device::Cpu).unwrap();
    let blocks: Vec<u32> = (0..200).collect();
    for layer in 0..2 {
        let k = Tensor::randn(0f32, 1., (200, 16, 8, 128), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let v = (&k * -2.0).unwrap();
        source.write_blocks(layer, &blocks, &k, &v).unwrap();
    }
    let receiver = KvReceiver::new(KvCache::new(spec, &Device::Cpu).unwrap(), fp);
    let address = serve_framed_by(&receiver, ends).await;
    // Into the receiver's blocks 10..210, in reverse order.
    let reservation: Vec<u32> = (10..210).rev().collect();
    let ticket = receiver.expect(reservation.clone());
    let run = source.block_run(&blocks).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    for layer in 0..2 {
        tx.send(ExportedKv::read(&source, layer, 0, &run).unwrap())
            .unwrap();
    }
    drop(tx);
    let mut hs = handshake(&receiver, &ticket, 200);
    let ack = match ends {
        Ends::TonicClient => {
            let mut sink = GrpcSink::new();
            sink.prepare(&mut hs);
            let mut messages = vec![KvPushMessage {
                message: Some(PushMessage::Handshake(hs)),
            }];
            let mut rx = rx;
            while let Some(kv) = rx.recv().await {
                for chunk in sink.chunks(kv).await.unwrap() {
                    messages.push(KvPushMessage {
                        message: Some(PushMessage::Chunk(chunk)),
                    });
                }
            }
            client(channel(&address))
                .push(tokio_stream::iter(messages))
                .await
                .unwrap()
                .into_inner()
        }
        _ => push(channel(&address), &address, "t", hs, rx, GrpcSink::new())
            .await
            .unwrap(),
    };
    // 200 blocks of 32 KiB of K and as much of V: 13 messages of up to 1 MiB per layer.
    assert_eq!(ack.chunks, 2 * 13, "{ends:?}: {ack:?}");
    assert_eq!(ack.bytes, 2 * 2 * 200 * (32 << 10));
    ticket.finish().unwrap();
    for layer in 0..2 {
        let sent = source.read_block_bytes(layer, &blocks).unwrap();
        let got = receiver
            .cache()
            .read_block_bytes(layer, &reservation)
            .unwrap();
        assert!(sent == got, "{ends:?}: layer {layer} differs");
    }
}

#[tokio::test]
async fn a_chunk_sent_twice_is_refused() {
    let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
    let receiver = KvReceiver::new(cache, fingerprint());
    let address = serve(&receiver).await;
    let ticket = receiver.expect(vec![3, 5]);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(exported(0, 2)).unwrap();
    tx.send(exported(0, 2)).unwrap();
    drop(tx);
    let hs = handshake(&receiver, &ticket, 2);
    let err = push(channel(&address), &address, "t", hs, rx, AsIs)
        .await
        .unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("twice"), "{status:?}");
    assert!(!ticket.is_complete());
}

#[test]
fn of_the_same_chunk_written_at_once_exactly_one_lands() {
    let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
    let receiver = KvReceiver::new(cache, fingerprint());
    let ticket = receiver.expect(vec![3, 5]);
    let transfer = receiver.open(&handshake(&receiver, &ticket, 2)).unwrap();
    let chunk = super::chunk_of(&exported(1, 2)).unwrap();
    let landed = std::thread::scope(|s| {
        let writers: Vec<_> = (0..8)
            .map(|_| s.spawn(|| transfer.write(&chunk).is_ok()))
            .collect();
        writers
            .into_iter()
            .map(|w| w.join())
            .filter(|landed| matches!(landed, Ok(true)))
            .count()
    });
    assert_eq!(landed, 1);
    // Layer 0 never came.
    assert!(ticket.finish().unwrap_err().to_string().contains("missing"));
}
