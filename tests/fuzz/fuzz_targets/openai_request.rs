//! The OpenAI-style request parser and checks: the first byte picks `/v1/completions` or
//! `/v1/chat/completions`, the rest is the body. Refusals are fine; a panic is a bug.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pd_router::fuzzing::EdgeChecks;

fuzz_target!(|data: &[u8]| {
    static CHECKS: OnceLock<EdgeChecks> = OnceLock::new();
    let checks = CHECKS.get_or_init(|| EdgeChecks::new(pd_fuzz::load_model_text()));
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let _ = if which % 2 == 0 {
        checks.completion(body)
    } else {
        checks.chat(body)
    };
});
