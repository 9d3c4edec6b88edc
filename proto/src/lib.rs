//! pd-proto: the protocol buffers of pd-cluster (package `pd.v1`) and their generated code.

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("pd.v1");
}

#[cfg(test)]
mod tests {
    use super::v1::{ModelFingerprint, SamplingParams};
    use prost::Message;

    #[test]
    fn messages_round_trip_and_optional_zero_is_kept() {
        let fp = ModelFingerprint {
            model_id: "m".into(),
            kv_dtype: "f16".into(),
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
        };
        assert_eq!(
            ModelFingerprint::decode(fp.encode_to_vec().as_slice()).unwrap(),
            fp
        );
        // temperature = 0 (greedy) must stay distinguishable from "unset".
        let p = SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        };
        let back = SamplingParams::decode(p.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.temperature, Some(0.0));
        assert_eq!(SamplingParams::default().temperature, None);
    }

    #[test]
    fn garbage_bytes_are_a_decode_error() {
        assert!(ModelFingerprint::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }
}
