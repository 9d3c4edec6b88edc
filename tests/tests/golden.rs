//! The engine against llama.cpp's reference outputs for the same GGUF (tests/data/README.md):
//! exact prompt token ids, greedy tokens for at least the first min(8, len) positions (printing
//! every case's full match length), and top-5 logits at positions 0..3 within 1.0.


use candle_core::Device;
use pd_common::chat_template::ChatMessage;
use pd_common::engine::{EngineConfig, EngineCore, GenerateRequest};
use pd_common::kv::{KvCache, KvCacheSpec};
use pd_common::model::ForwardBatch;
use pd_common::sampling::SamplingParams;
use pd_tests::{golden_cases, match_len, real_model, Runs};

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens: max_tokens as u32,
        ..SamplingParams::default()
    }
}

#[test]
fn prompts_tokenize_exactly_as_llama_cpp() {
    let model = real_model();
    let template = model.chat_template.as_ref().expect("the GGUF has a chat template");
    for case in golden_cases() {
        if case.template {
            let user = case
                .prompt
                .split("<|im_start|>user\n")
                .nth(1)
                .and_then(|rest| rest.split("<|im_end|>").next())
                .expect("templated prompt has a user turn");
            let rendered = template
                .render(&[ChatMessage::new("user", user)], true)
                .unwrap();
            assert_eq!(rendered, case.prompt, "{}: template rendering", case.name);
        }
        let ids = model.encode_text(&case.prompt).unwrap();
        assert_eq!(ids, case.prompt_ids, "{}: prompt token ids", case.name);
    }
}

#[test]
fn greedy_tokens_match_llama_cpp() {
    let model = real_model();
    let cases = golden_cases();
    let mut core = EngineCore::new(
        model.model.clone(),
        model.tokenizer.clone(),
        EngineConfig::default(),
    )
    .unwrap();
    // All cases in one engine: they share packed batches, which must not change any of them.
    let mut runs = Runs::new();
    for case in &cases {
        runs.add(
            &mut core,
            GenerateRequest {
                prompt_ids: case.prompt_ids.clone(),
                params: greedy(case.generated_ids.len()),
            },
        );
    }
    let results = runs.finish(&mut core);
    let mut failures = Vec::new();
    let mut total = (0, 0);
    for (case, got) in cases.iter().zip(&results) {
        let n = match_len(&got.ids, &case.generated_ids);
        let need = case.generated_ids.len().min(8);
        println!(
            "{:<20} matched {n:>2}/{:<2} tokens{}",
            case.name,
            case.generated_ids.len(),
            if n == case.generated_ids.len() { "" } else { "  (diverges after a near-tie)" }
        );
        total.0 += n;
        total.1 += case.generated_ids.len();
        if n < need {
            failures.push(format!("{}: matched {n} < {need}: {:?} vs {:?}", case.name, got.ids, case.generated_ids));
        }
        if n == case.generated_ids.len() {
            let eog = got.ids.last().is_some_and(|id| model.tokenizer.as_ref().unwrap().eog_token_ids().contains(id));
            let expected_text = &case.generated_text;
            if eog || got.ids.len() == case.generated_ids.len() {
                assert_eq!(&got.text, expected_text, "{}: text of a whole-sequence match", case.name);
            }
        }
    }
    println!("total: {}/{} golden tokens reproduced", total.0, total.1);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn top_logits_match_llama_cpp() {
    let model = real_model();
    let m = &model.model;
    let cfg = m.config();
    let spec = KvCacheSpec {
        num_layers: cfg.num_layers,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size: 16,
        num_blocks: 64,
        dtype: m.dtype(),
    };
    let cache = KvCache::new(spec, &Device::Cpu).unwrap();
    let table: Vec<u32> = (0..64).rev().collect();
    let mut worst = 0f32;
    for case in golden_cases() {
        // Teacher-forced: position i is the distribution after the prompt and the reference's
        // first i tokens.
        let mut fed = case.prompt_ids.clone();
        let mut cached = 0;
        for expected in &case.top_logits {
            let mut batch = ForwardBatch::default();
            batch.push_seq(&fed[cached..], cached, &table, true);
            let logits: Vec<f32> = m
                .forward(&batch, &cache, &mut |_| Ok(()))
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            cached = fed.len();
            let best = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
                .unwrap();
            assert_eq!(best as u32, expected.top5[0].id, "{} pos {}: top-1 id", case.name, expected.pos);
            for t in &expected.top5 {
                let diff = (logits[t.id as usize] - t.logit).abs();
                worst = worst.max(diff);
                assert!(diff < 1.0, "{} pos {} id {}: logit {} vs {}", case.name, expected.pos, t.id, logits[t.id as usize], t.logit);
            }
            fed.push(case.generated_ids[expected.pos]);
        }
    }
    println!("largest top-5 logit difference from llama.cpp: {worst:.3}");
}
