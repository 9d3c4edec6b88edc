//! The incremental detokenizer and the stop-string checker on any token sequence: the first
//! record is a stop string (empty: none), the rest of the input is little-endian u32 token
//! ids, some outside the vocabulary. Whatever streams out, the text that went out must equal
//! a one-shot decode of the same ids up to where the stream stopped.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pd_common::sampling::{SamplingParams, StopChecker};
use pd_common::tokenizer::IncrementalDecoder;

fuzz_target!(|data: &[u8]| {
    let Some(tokenizer) = &pd_fuzz::model_text().tokenizer else {
        return;
    };
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let stop_len = (flags as usize % 8).min(rest.len());
    let (stop, ids) = rest.split_at(stop_len);
    let mut params = SamplingParams::default();
    let stop = String::from_utf8_lossy(stop).into_owned();
    if !stop.is_empty() {
        params.stop = vec![stop];
    }
    params.skip_special_tokens = flags & 0x80 != 0;
    let mut decoder = IncrementalDecoder::new(params.skip_special_tokens);
    let mut checker = StopChecker::from_params(&params);
    let mut streamed = String::new();
    let mut out = String::new();
    let mut pushed = Vec::new();
    for chunk in ids.chunks_exact(4) {
        let id = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        // Mostly within the vocabulary, as a model would produce; sometimes not.
        let id = if flags & 0x40 != 0 { id } else { id % 50_000 };
        match decoder.push(tokenizer, id) {
            Ok(piece) => {
                pushed.push(id);
                streamed.push_str(&piece);
                out.push_str(&checker.push(&piece).text);
            }
            Err(_) => return,
        }
        if checker.is_stopped() {
            // Nothing at or past the stop string went out.
            assert!(!out.contains(params.stop[0].as_str()), "{out:?}");
            return;
        }
    }
    let Ok(tail) = decoder.flush(tokenizer) else {
        return;
    };
    streamed.push_str(&tail);
    out.push_str(&checker.push(&tail).text);
    out.push_str(&checker.finish());
    // Streamed pieces are exactly the one-shot decode of the same ids.
    let whole = tokenizer
        .decode(&pushed, params.skip_special_tokens)
        .expect("ids the decoder took decode");
    assert_eq!(streamed, whole);
    if params.stop.is_empty() {
        assert_eq!(out, whole);
    } else {
        assert!(!out.contains(params.stop[0].as_str()), "{out:?}");
    }
});
