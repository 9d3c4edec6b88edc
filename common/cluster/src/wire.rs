//! The engine's types on the wire (`pd.v1`). The engine knows nothing of the protocol, so the
//! conversions live here as two small traits.
//!
//! Sampling parameters: unset fields take the defaults of [`SamplingParams`], and the conversion
//! to the wire sets every field, so that a node never applies defaults of its own to a request
//! another node already completed.

use pd_engine::engine::BeamOutput;
use pd_engine::sampling::{FinishReason, SampledToken, SamplingParams};
use pd_proto::v1 as pb;

/// A value as its `pd.v1` message.
pub trait ToWire {
    type Wire;
    fn to_wire(&self) -> Self::Wire;
}

/// A value from its `pd.v1` message.
pub trait FromWire<W> {
    fn from_wire(wire: &W) -> Self;
}

impl FromWire<pb::SamplingParams> for SamplingParams {
    fn from_wire(p: &pb::SamplingParams) -> Self {
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
            beam_width: p.beam_width,
            length_penalty: p.length_penalty.unwrap_or(d.length_penalty),
        }
    }
}

impl ToWire for SamplingParams {
    type Wire = pb::SamplingParams;
    fn to_wire(&self) -> pb::SamplingParams {
        pb::SamplingParams {
            temperature: Some(self.temperature),
            top_k: Some(self.top_k),
            top_p: Some(self.top_p),
            min_p: Some(self.min_p),
            repetition_penalty: Some(self.repetition_penalty),
            presence_penalty: Some(self.presence_penalty),
            frequency_penalty: Some(self.frequency_penalty),
            seed: self.seed,
            max_tokens: Some(self.max_tokens),
            stop_token_ids: self.stop_token_ids.clone(),
            stop: self.stop.clone(),
            logprobs: self.logprobs,
            ignore_eos: self.ignore_eos,
            skip_special_tokens: Some(self.skip_special_tokens),
            beam_width: self.beam_width,
            length_penalty: Some(self.length_penalty),
        }
    }
}

impl ToWire for FinishReason {
    type Wire = pb::FinishReason;
    fn to_wire(&self) -> pb::FinishReason {
        match self {
            FinishReason::Stop => pb::FinishReason::Stop,
            FinishReason::Length => pb::FinishReason::Length,
            FinishReason::Cancelled => pb::FinishReason::Cancelled,
            // A prefill's export never reaches a client; its first token goes back in a
            // PrefillResponse instead.
            FinishReason::Exported => pb::FinishReason::Unspecified,
        }
    }
}

impl ToWire for BeamOutput {
    type Wire = pb::Beam;
    fn to_wire(&self) -> pb::Beam {
        pb::Beam {
            token_ids: self.token_ids.clone(),
            text: self.text.clone(),
            cumulative_logprob: self.cumulative_logprob,
            score: self.score,
            finish_reason: self.reason.to_wire() as i32,
            logprobs: self.logprobs.iter().map(ToWire::to_wire).collect(),
        }
    }
}

impl ToWire for SampledToken {
    type Wire = pb::TokenLogprobs;
    fn to_wire(&self) -> pb::TokenLogprobs {
        pb::TokenLogprobs {
            token_id: self.id,
            logprob: self.logprob,
            top: self
                .top_logprobs
                .iter()
                .map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                .collect(),
        }
    }
}

impl FromWire<pb::TokenLogprobs> for SampledToken {
    fn from_wire(t: &pb::TokenLogprobs) -> Self {
        SampledToken {
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
            SamplingParams::from_wire(&pb::SamplingParams::default()),
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
            beam_width: 3,
            length_penalty: 0.5,
            ..SamplingParams::default()
        };
        assert_eq!(SamplingParams::from_wire(&p.to_wire()), p);
    }

    #[test]
    fn sampled_tokens_survive_a_round_trip() {
        let t = SampledToken {
            id: 42,
            logprob: -0.5,
            top_logprobs: vec![(42, -0.5), (7, -1.25)],
        };
        assert_eq!(SampledToken::from_wire(&t.to_wire()), t);
    }
}
