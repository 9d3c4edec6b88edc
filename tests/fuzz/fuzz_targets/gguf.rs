//! A model file from anywhere: the GGUF reader, then the model configuration, tokenizer and
//! chat template built from its metadata. Refusals are fine; a panic, or memory taken in
//! proportion to a length the file claims rather than its size, is a bug.

#![no_main]

use candle_core::quantized::gguf_file;
use libfuzzer_sys::fuzz_target;
use pd_common::chat_template::ChatTemplate;
use pd_common::model::ModelConfig;
use pd_common::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(content) = gguf_file::Content::read(&mut std::io::Cursor::new(data)) else {
        return;
    };
    let _ = ModelConfig::from_gguf(&content);
    if let Ok(tokenizer) = Tokenizer::from_gguf(&content) {
        let _ = ChatTemplate::from_gguf(&content, &tokenizer);
        let _ = tokenizer.encode("Hello, world!", true);
    }
});
