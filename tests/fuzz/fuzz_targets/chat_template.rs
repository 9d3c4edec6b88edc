//! The model's chat template rendering hostile messages: records alternate role and content
//! (any bytes, lossily UTF-8), the first byte of the input says whether to add the generation
//! prompt. Then the rendering is tokenized, as the router does.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pd_common::chat_template::ChatMessage;

fuzz_target!(|data: &[u8]| {
    let text = pd_fuzz::model_text();
    let (Some(template), Some(tokenizer)) = (&text.chat_template, &text.tokenizer) else {
        return;
    };
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let records = pd_fuzz::records(rest);
    let messages: Vec<ChatMessage> = records
        .chunks(2)
        .map(|pair| {
            let role = String::from_utf8_lossy(pair[0]).into_owned();
            let content = pair
                .get(1)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .unwrap_or_default();
            ChatMessage::new(role, content)
        })
        .collect();
    if let Ok(rendered) = template.render(&messages, flags % 2 == 0) {
        let _ = tokenizer.encode(&rendered, true);
    }
});
