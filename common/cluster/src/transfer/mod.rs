//! KV shipping between nodes, by concern:
//! - what both ends must agree on: the model [`fingerprint`] and the [`TransferBackend`];
//! - how one layer's blocks travel as a checksummed chunk ([`chunk`]);
//! - the decode side's reservations, which accept only the transfers they expect ([`reservation`]),
//!   and the `KvTransfer` service that feeds them ([`service`]), its `Push` stream framed on the
//!   wire without copying KV bytes ([`framing`]);
//! - the prefill side's push driver ([`push`]) over a [`push::ChunkSink`] that each transport
//!   implements: gRPC chunks carrying the bytes ([`grpc`]), or NCCL between GPUs ([`nccl`]).
//!
//! No transport imports another: both build on [`push`] and [`reservation`].

pub mod chunk;
#[cfg(test)]
mod end_to_end;
pub mod framing;
pub mod grpc;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod push;
pub mod reservation;
pub mod service;
#[cfg(feature = "cuda")]
pub mod staging;

pub use chunk::{
    chunk_blocks, chunk_from_bytes, chunk_of, decode_chunk_into, encode_chunk, verify_checksum,
    verify_chunk, write_checked_chunk,
};
pub use reservation::{KvReceiver, TransferStats, TransferTicket};
pub use service::KvTransferService;

use pd_proto::v1::{self as pb, ModelFingerprint};

use crate::kv::KvCacheSpec;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// How KV bytes travel from a prefill node to a decode node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferBackend {
    /// In the chunks of a `KvTransfer.Push` stream: every node speaks it.
    Grpc,
    /// GPU to GPU over an NCCL link; the Push stream only announces each chunk.
    Nccl,
}

impl TransferBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferBackend::Grpc => "grpc",
            TransferBackend::Nccl => "nccl",
        }
    }

    pub fn to_wire(self) -> pb::KvTransferBackend {
        match self {
            TransferBackend::Grpc => pb::KvTransferBackend::Grpc,
            TransferBackend::Nccl => pb::KvTransferBackend::Nccl,
        }
    }

    /// The backend a message names; unset means gRPC. A value this build does not know is
    /// refused rather than guessed.
    pub fn from_wire(value: i32) -> Result<Self> {
        match pb::KvTransferBackend::try_from(value) {
            Ok(pb::KvTransferBackend::Unspecified | pb::KvTransferBackend::Grpc) => {
                Ok(TransferBackend::Grpc)
            }
            Ok(pb::KvTransferBackend::Nccl) => Ok(TransferBackend::Nccl),
            Err(_) => Err(Error::invalid(format!(
                "unknown KV transfer backend {value}"
            ))),
        }
    }
}

impl std::fmt::Display for TransferBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fingerprint of a model served with a given cache layout.
pub fn fingerprint(model: &ModelConfig, spec: &KvCacheSpec) -> ModelFingerprint {
    ModelFingerprint {
        model_id: model.name.clone(),
        kv_dtype: spec.dtype.as_str().to_string(),
        num_layers: spec.num_layers as u32,
        num_kv_heads: spec.num_kv_heads as u32,
        head_dim: spec.head_dim as u32,
        block_size: spec.block_size as u32,
    }
}

/// Fails, naming the first field that differs, unless `theirs` equals `ours`: KV from another
/// model or layout would silently corrupt the cache.
pub fn check_fingerprint(ours: &ModelFingerprint, theirs: &ModelFingerprint) -> Result<()> {
    let fields: [(&str, String, String); 6] = [
        ("model_id", ours.model_id.clone(), theirs.model_id.clone()),
        ("kv_dtype", ours.kv_dtype.clone(), theirs.kv_dtype.clone()),
        (
            "num_layers",
            ours.num_layers.to_string(),
            theirs.num_layers.to_string(),
        ),
        (
            "num_kv_heads",
            ours.num_kv_heads.to_string(),
            theirs.num_kv_heads.to_string(),
        ),
        (
            "head_dim",
            ours.head_dim.to_string(),
            theirs.head_dim.to_string(),
        ),
        (
            "block_size",
            ours.block_size.to_string(),
            theirs.block_size.to_string(),
        ),
    ];
    match fields.into_iter().find(|(_, a, b)| a != b) {
        Some((field, a, b)) => Err(Error::FingerprintMismatch {
            field,
            ours: a,
            theirs: b,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn backends_round_trip_and_unknown_values_are_refused() {
        for b in [TransferBackend::Grpc, TransferBackend::Nccl] {
            assert_eq!(TransferBackend::from_wire(b.to_wire() as i32).unwrap(), b);
        }
        assert_eq!(
            TransferBackend::from_wire(0).unwrap(),
            TransferBackend::Grpc
        );
        assert!(TransferBackend::from_wire(77).is_err());
    }

    fn spec() -> KvCacheSpec {
        KvCacheSpec {
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            num_blocks: 100,
            dtype: DType::F16,
        }
    }

    #[test]
    fn equal_fingerprints_pass_and_any_difference_is_named() {
        let model = ModelConfig::preset("smollm2-135m").unwrap();
        let ours = fingerprint(&model, &spec());
        assert_eq!(ours.kv_dtype, "f16");
        check_fingerprint(&ours, &ours.clone()).unwrap();
        let mut other = KvCacheSpec {
            block_size: 32,
            ..spec()
        };
        let err = check_fingerprint(&ours, &fingerprint(&model, &other)).unwrap_err();
        assert!(err.to_string().contains("block_size"), "{err}");
        other = KvCacheSpec {
            dtype: DType::BF16,
            ..spec()
        };
        let err = check_fingerprint(&ours, &fingerprint(&model, &other)).unwrap_err();
        assert!(err.to_string().contains("kv_dtype"), "{err}");
        let tiny = ModelConfig::preset("tiny").unwrap();
        let err = check_fingerprint(&ours, &fingerprint(&tiny, &spec())).unwrap_err();
        assert!(err.to_string().contains("model_id"), "{err}");
        // The number of blocks is local to each cache and not part of the fingerprint.
        let bigger = KvCacheSpec {
            num_blocks: 5000,
            ..spec()
        };
        check_fingerprint(&ours, &fingerprint(&model, &bigger)).unwrap();
    }
}
