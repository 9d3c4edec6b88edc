//! Tests of the tokenizer against the SmolLM2 GGUF in `.cache/models` and the golden greedy
//! generations in `tests/data` (ids, round trips, incremental decoding, special tokens, and
//! reading the same vocabulary back from a `tokenizer.json`).

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;

use super::*;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    generated_text: String,
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let content = crate::test_data::model_gguf();
        Tokenizer::from_gguf(&content).expect("tokenizer from GGUF")
    })
}

fn cases() -> Vec<Case> {
    let cases: Vec<Case> = crate::test_data::golden_lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("golden case"))
        .collect();
    assert_eq!(cases.len(), 10, "expected the 10 golden cases");
    cases
}

/// The generated ids without the final end-of-generation token.
fn generated_body<'a>(tok: &Tokenizer, case: &'a Case) -> &'a [u32] {
    match case.generated_ids.split_last() {
        Some((last, rest)) if tok.is_eog(*last) => rest,
        _ => &case.generated_ids,
    }
}

#[test]
fn tokenizer_metadata() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.model_type(), "gpt2");
    assert_eq!(tok.pre_type(), "smollm");
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert!(!tok.add_bos());
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.id_to_token(49152), None);
    assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2));
    assert!(!tok.is_special(38634));
    assert!(!tok.is_special(u32::MAX));
}

#[test]
fn tokenizer_eog_ids() {
    let tok = tokenizer();
    let eog = tok.eog_token_ids();
    assert!(eog.contains(&0), "eog {eog:?} lacks <|endoftext|>");
    assert!(eog.contains(&2), "eog {eog:?} lacks <|im_end|>");
    assert!(!eog.contains(&1), "eog {eog:?} has <|im_start|>");
    assert!(tok.is_eog(0) && tok.is_eog(2) && !tok.is_eog(1));
}

#[test]
fn tokenizer_golden_prompt_ids() {
    let tok = tokenizer();
    let mut failures = Vec::new();
    for case in cases() {
        let ids = tok.encode(&case.prompt, true).unwrap();
        if ids != case.prompt_ids {
            let first_diff = ids
                .iter()
                .zip(&case.prompt_ids)
                .position(|(a, b)| a != b)
                .unwrap_or(ids.len().min(case.prompt_ids.len()));
            failures.push(format!(
                "{}: {} ids vs {} expected, first difference at {first_diff}: ours {:?} golden {:?}",
                case.name,
                ids.len(),
                case.prompt_ids.len(),
                &ids[first_diff..(first_diff + 5).min(ids.len())],
                &case.prompt_ids[first_diff..(first_diff + 5).min(case.prompt_ids.len())],
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "tokenization mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn tokenizer_golden_roundtrip_prompt() {
    let tok = tokenizer();
    for case in cases() {
        assert_eq!(
            tok.decode(&case.prompt_ids, false).unwrap(),
            case.prompt,
            "{}",
            case.name
        );
    }
}

#[test]
fn tokenizer_golden_decode_generated() {
    let tok = tokenizer();
    for case in cases() {
        let body = generated_body(tok, &case);
        assert_eq!(
            tok.decode(body, false).unwrap(),
            case.generated_text,
            "{}",
            case.name
        );
        assert_eq!(
            tok.decode(&case.generated_ids, true).unwrap(),
            case.generated_text,
            "{} (skip_special)",
            case.name
        );
    }
}

#[test]
fn tokenizer_incremental_decoder_golden() {
    let tok = tokenizer();
    for case in cases() {
        let body = generated_body(tok, &case);
        let mut dec = IncrementalDecoder::new(true);
        let mut text = String::new();
        let mut held_back = 0;
        for &id in body {
            let piece = dec.push(tok, id).unwrap();
            if dec.has_pending() {
                held_back += 1;
            }
            text.push_str(&piece);
        }
        assert!(
            !dec.has_pending(),
            "{}: text ends inside a character",
            case.name
        );
        text.push_str(&dec.flush(tok).unwrap());
        assert_eq!(text, case.generated_text, "{}", case.name);
        if case.name == "zh_instruction" {
            assert!(
                held_back > 0,
                "zh_instruction should split a character across tokens"
            );
        }
        // And with the final EOG token pushed, skipped as special.
        let mut dec = IncrementalDecoder::new(true);
        let mut text = String::new();
        for &id in &case.generated_ids {
            text.push_str(&dec.push(tok, id).unwrap());
        }
        text.push_str(&dec.flush(tok).unwrap());
        assert_eq!(text, case.generated_text, "{} (with eog)", case.name);
    }
}

#[test]
fn tokenizer_incremental_decoder_matches_decode() {
    let tok = tokenizer();
    let samples = [
        "Hello, world! 12345",
        "长城是中国古代的军事防御工程。",
        "emoji: 😀👍🏽 and ünïcödé",
        "<|im_start|>user\nhi<|im_end|>",
    ];
    for s in samples {
        let ids = tok.encode(s, true).unwrap();
        for skip in [false, true] {
            let mut dec = IncrementalDecoder::new(skip);
            let mut text = String::new();
            for &id in &ids {
                text.push_str(&dec.push(tok, id).unwrap());
            }
            text.push_str(&dec.flush(tok).unwrap());
            assert_eq!(text, tok.decode(&ids, skip).unwrap(), "{s:?} skip={skip}");
        }
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }
    // Invalid and truncated UTF-8: the same replacement characters either way.
    let e4 = tok.token_to_id("ä").expect("byte token 0xE4"); // byte 0xE4 in the byte alphabet
    let a = tok.token_to_id("a").unwrap();
    for ids in [vec![e4, a], vec![a, e4], vec![e4, e4, a, e4]] {
        let mut dec = IncrementalDecoder::new(false);
        let mut text = String::new();
        for &id in &ids {
            text.push_str(&dec.push(tok, id).unwrap());
        }
        text.push_str(&dec.flush(tok).unwrap());
        assert_eq!(text, tok.decode(&ids, false).unwrap(), "{ids:?}");
    }
}

#[test]
fn tokenizer_out_of_range_id_is_an_error() {
    let tok = tokenizer();
    let n = tok.vocab_size() as u32;
    for bad in [n, n + 1, u32::MAX] {
        assert!(matches!(
            tok.decode(&[1, bad], false),
            Err(Error::InvalidRequest(_))
        ));
        let mut dec = IncrementalDecoder::new(false);
        assert!(matches!(dec.push(tok, bad), Err(Error::InvalidRequest(_))));
        assert!(tok.token_bytes(bad).is_err());
    }
}

#[test]
fn tokenizer_digits_split_individually() {
    let tok = tokenizer();
    let ids = tok.encode("12345", true).unwrap();
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert_eq!(tok.decode(&ids, false).unwrap(), "12345");
    let ids = tok.encode("in 2024", true).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "in 2024");
    assert_eq!(ids.len(), 1 + 1 + 4, "{ids:?}"); // "in", " ", 4 digits
}

#[test]
fn tokenizer_parse_special() {
    let tok = tokenizer();
    let text = "<|im_start|>user\nhi<|im_end|>";
    let with = tok.encode(text, true).unwrap();
    assert_eq!(with.first(), Some(&1));
    assert!(with.contains(&2));
    let without = tok.encode(text, false).unwrap();
    assert!(
        !without.contains(&1) && !without.contains(&2),
        "{without:?}"
    );
    assert_eq!(tok.decode(&without, false).unwrap(), text);
    assert_eq!(tok.decode(&with, true).unwrap(), "user\nhi");
    assert_eq!(tok.encode("", true).unwrap(), Vec::<u32>::new());
    assert_eq!(tok.encode("Paris", true).unwrap(), vec![38634]);
}

#[test]
fn tokenizer_rejects_unsupported_models() {
    let mut content = gguf_file::Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata: HashMap::new(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    content.metadata.insert(
        "tokenizer.ggml.model".into(),
        gguf_file::Value::String("llama".into()),
    );
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(
        matches!(err, Error::Tokenizer(ref m) if m.contains("SentencePiece")),
        "{err}"
    );
}

/// The same vocabulary written as a Hugging Face tokenizer.json (+ tokenizer_config.json),
/// read back through `from_tokenizer_json`, tokenizes the golden prompts the same way.
#[test]
fn tokenizer_from_tokenizer_json() {
    let tok = tokenizer();
    let dir = std::env::temp_dir().join(format!("pd-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("tokenizer.json");
    tok.hf.save(&json_path, false).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "add_bos_token": false,
        "chat_template": "{% for m in messages %}{{ m.role }}:{{ m.content }}{{ eos_token }}{% endfor %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let from_json = Tokenizer::from_tokenizer_json(&json_path).unwrap();
    assert_eq!(from_json.vocab_size(), tok.vocab_size());
    assert_eq!(from_json.bos_token_id(), Some(1));
    assert_eq!(from_json.eos_token_id(), Some(2));
    assert!(!from_json.add_bos());
    assert!(from_json.eog_token_ids().contains(&0) && from_json.eog_token_ids().contains(&2));
    for case in cases() {
        assert_eq!(
            from_json.encode(&case.prompt, true).unwrap(),
            case.prompt_ids,
            "{}",
            case.name
        );
        assert_eq!(
            from_json.decode(&case.generated_ids, true).unwrap(),
            case.generated_text,
            "{}",
            case.name
        );
    }
    let template = crate::chat_template::ChatTemplate::from_tokenizer_config(
        &dir.join("tokenizer_config.json"),
        &from_json,
    )
    .unwrap()
    .expect("a chat template");
    let msgs = [crate::chat_template::ChatMessage::new("user", "hi")];
    assert_eq!(template.render(&msgs, false).unwrap(), "user:hi<|im_end|>");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tokenizer_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<IncrementalDecoder>();
}
