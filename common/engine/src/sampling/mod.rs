//! Sampling: the per-request parameters and their validation ([`params`]), the penalties
//! ([`penalties`]), the stateless, seed-reproducible token sampler ([`sampler`]) and the stop
//! conditions, by token and by string ([`stop`]); a step's rows at once, on the device where the
//! logits are when it can ([`batch`]).

pub mod batch;
#[cfg(feature = "cuda")]
mod device;
mod filters;
mod kernels;
pub mod params;
pub mod penalties;
pub mod sampler;
pub mod stop;

pub use batch::{sample_rows, RowRequest};
pub use params::{SamplingParams, MAX_BEAM_WIDTH, MAX_LOGPROBS, MAX_STOP_STRINGS, PENALTY_LIMIT};
pub use penalties::{apply_penalties, penalties_are_neutral};
pub use sampler::{
    model_top_logprobs, sample, splitmix64, uniform_for_position, SampleContext, SampledToken,
};
pub use stop::{check_stop_token, FinishReason, StopChecker, StopOutcome};
