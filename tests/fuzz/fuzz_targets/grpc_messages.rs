//! Protobuf decoding and the checks of every service's requests: the first byte picks the
//! message (the router's `Generate`, a decode node's `DecodeRequest`, a prefill node's
//! `PrefillRequest`, node stats and KV event requests), the rest is its encoding.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pd_common::sampling::SamplingParams;
use pd_common::transfer::TransferBackend;
use pd_common::wire::FromWire;
use pd_proto::v1 as pb;
use pd_router::fuzzing::EdgeChecks;
use prost::Message;

fn sampling(wire: Option<pb::SamplingParams>, vocab: usize) {
    let params = SamplingParams::from_wire(&wire.unwrap_or_default());
    let _ = params.validate(vocab);
}

fuzz_target!(|data: &[u8]| {
    static CHECKS: OnceLock<EdgeChecks> = OnceLock::new();
    let checks = CHECKS.get_or_init(|| EdgeChecks::new(pd_fuzz::load_model_text()));
    let vocab = pd_fuzz::model_text().config.vocab_size;
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            let _ = checks.generate(bytes);
        }
        1 => {
            if let Ok(r) = pb::DecodeRequest::decode(bytes) {
                sampling(r.sampling, vocab);
                for c in &r.prefill_candidates {
                    let _ = TransferBackend::from_wire(c.backend);
                }
            }
        }
        2 => {
            if let Ok(r) = pb::PrefillRequest::decode(bytes) {
                sampling(r.sampling, vocab);
                if let Some(d) = &r.destination {
                    let _ = TransferBackend::from_wire(d.transfer_backend);
                }
            }
        }
        3 => {
            let _ = pb::KvEventsRequest::decode(bytes);
        }
        _ => {
            let _ = pb::NodeStats::decode(bytes);
        }
    }
});
