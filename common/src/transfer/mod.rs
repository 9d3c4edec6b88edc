//! KV shipping between nodes: what both ends must agree on (the [`fingerprint`]) and how one
//! layer's blocks travel as a checksummed chunk ([`chunk`]). The transports (gRPC streams, NCCL)
//! build on these.

pub mod chunk;
pub mod grpc;
#[cfg(feature = "nccl")]
pub mod nccl;

pub use chunk::{chunk_blocks, chunk_from_tensors, decode_chunk_into, encode_chunk};

use pd_proto::v1::ModelFingerprint;

use crate::kv::KvCacheSpec;
use crate::model::ModelConfig;
use crate::{Error, Result};

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
