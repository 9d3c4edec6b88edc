//! Sampling parameters on the wire (`pd.v1.SamplingParams`): unset fields take the defaults of
//! [`SamplingParams`], and the conversion back sets every field so that a node never applies
//! defaults of its own to a request another node already completed.

use pd_proto::v1 as pb;

use super::SamplingParams;

impl From<&pb::SamplingParams> for SamplingParams {
    fn from(p: &pb::SamplingParams) -> Self {
        let d = SamplingParams::default();
        SamplingParams {
            temperature: p.temperature.unwrap_or(d.temperature),
            top_k: p.top_k.unwrap_or(d.top_k),
            top_p: p.top_p.unwrap_or(d.top_p),
            min_p: p.min_p.unwrap_or(d.min_p),
            repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: p.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: p.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: p.seed,
            max_tokens: p.max_tokens.unwrap_or(d.max_tokens),
            stop_token_ids: p.stop_token_ids.clone(),
            stop: p.stop.clone(),
            logprobs: p.logprobs,
            ignore_eos: p.ignore_eos,
            skip_special_tokens: p.skip_special_tokens.unwrap_or(d.skip_special_tokens),
        }
    }
}

impl From<&SamplingParams> for pb::SamplingParams {
    fn from(p: &SamplingParams) -> Self {
        pb::SamplingParams {
            temperature: Some(p.temperature),
            top_k: Some(p.top_k),
            top_p: Some(p.top_p),
            min_p: Some(p.min_p),
            repetition_penalty: Some(p.repetition_penalty),
            presence_penalty: Some(p.presence_penalty),
            frequency_penalty: Some(p.frequency_penalty),
            seed: p.seed,
            max_tokens: Some(p.max_tokens),
            stop_token_ids: p.stop_token_ids.clone(),
            stop: p.stop.clone(),
            logprobs: p.logprobs,
            ignore_eos: p.ignore_eos,
            skip_special_tokens: Some(p.skip_special_tokens),
        }
    }
}

impl From<super::FinishReason> for pb::FinishReason {
    fn from(r: super::FinishReason) -> Self {
        match r {
            super::FinishReason::Stop => pb::FinishReason::Stop,
            super::FinishReason::Length => pb::FinishReason::Length,
            super::FinishReason::Cancelled => pb::FinishReason::Cancelled,
        }
    }
}

impl From<&super::SampledToken> for pb::TokenLogprobs {
    fn from(t: &super::SampledToken) -> Self {
        pb::TokenLogprobs {
            token_id: t.id,
            logprob: t.logprob,
            top: t
                .top_logprobs
                .iter()
                .map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                .collect(),
        }
    }
}

impl From<&pb::TokenLogprobs> for super::SampledToken {
    fn from(t: &pb::TokenLogprobs) -> Self {
        super::SampledToken {
            id: t.token_id,
            logprob: t.logprob,
            top_logprobs: t.top.iter().map(|e| (e.token_id, e.logprob)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_take_defaults_and_set_ones_survive_a_round_trip() {
        assert_eq!(
            SamplingParams::from(&pb::SamplingParams::default()),
            SamplingParams::default()
        );
        let p = SamplingParams {
            temperature: 0.0,
            top_k: 5,
            top_p: 0.5,
            seed: Some(7),
            max_tokens: 3,
            stop: vec!["x".into()],
            logprobs: Some(2),
            ..SamplingParams::default()
        };
        assert_eq!(SamplingParams::from(&pb::SamplingParams::from(&p)), p);
    }
}
