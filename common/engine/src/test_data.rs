//! The model file and golden cases the unit tests read (both tests of the tokenizer and of the
//! chat template run against the real SmolLM2 GGUF).

use candle_core::quantized::gguf_file;

const MODEL_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
);
const GOLDEN_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/data/smollm2_q4_1_greedy.jsonl"
);

/// The model's GGUF header and metadata.
pub(crate) fn model_gguf() -> gguf_file::Content {
    let mut file = std::fs::File::open(MODEL_PATH).unwrap_or_else(|e| {
        panic!("cannot open {MODEL_PATH}: {e}; run deploy/fetch-model.sh to download the model")
    });
    gguf_file::Content::read(&mut file).expect("read GGUF")
}

/// The non-empty lines of the golden cases file, one JSON case each.
pub(crate) fn golden_lines() -> Vec<String> {
    std::fs::read_to_string(GOLDEN_PATH)
        .unwrap_or_else(|e| panic!("cannot read {GOLDEN_PATH}: {e}"))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}
