//! A KV push as a decode node receives it: records of `KvPushMessage`s (the first a handshake)
//! against a reservation of three blocks in a small cache. A handshake with transfer id 0 names
//! the reservation (the real id is random); everything else the input decides. Every refusal
//! is fine; a panic, or bytes landing outside the reservation, is a bug.

#![no_main]

use std::sync::OnceLock;

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use pd_common::kv::{KvCache, KvCacheSpec};
use pd_common::transfer::KvReceiver;
use pd_proto::v1 as pb;
use prost::Message;

fn receiver() -> &'static std::sync::Arc<KvReceiver> {
    static RECEIVER: OnceLock<std::sync::Arc<KvReceiver>> = OnceLock::new();
    RECEIVER.get_or_init(|| {
        let spec = KvCacheSpec {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 2,
            num_blocks: 8,
            dtype: DType::F16,
        };
        let cache = KvCache::new(spec, &Device::Cpu).expect("a small cache");
        KvReceiver::new(cache, pd_fuzz_seeds_fingerprint())
    })
}

fn pd_fuzz_seeds_fingerprint() -> pb::ModelFingerprint {
    pb::ModelFingerprint {
        model_id: "fuzz".into(),
        kv_dtype: "f16".into(),
        num_layers: 2,
        num_kv_heads: 1,
        head_dim: 4,
        block_size: 2,
    }
}

fuzz_target!(|data: &[u8]| {
    let receiver = receiver();
    let ticket = receiver.expect(vec![5, 1, 6]);
    let mut open = None;
    for record in pd_fuzz::records(data) {
        let Ok(message) = pb::KvPushMessage::decode(record) else {
            return;
        };
        match message.message {
            Some(pb::kv_push_message::Message::Handshake(mut h)) => {
                if h.transfer_id == 0 {
                    h.transfer_id = ticket.id();
                }
                match receiver.open(&h) {
                    Ok(t) => open = Some(t),
                    Err(_) => return,
                }
            }
            Some(pb::kv_push_message::Message::Chunk(chunk)) => {
                let Some(t) = &open else { return };
                if t.write(&chunk).is_err() {
                    return;
                }
            }
            None => return,
        }
    }
    let _ = ticket.finish();
    // Blocks outside the reservation were never written.
    let cache = receiver.cache();
    for layer in 0..2 {
        for block in [0, 2, 3, 4, 7] {
            let (k, v) = cache.read_block_bytes(layer, &[block]).expect("readable");
            assert!(k.iter().chain(v.iter()).all(|&b| b == 0), "block {block} written");
        }
    }
});
