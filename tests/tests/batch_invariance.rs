//! A prompt's greedy output is the same alone and packed with 15 other prompts of different
//! lengths that are mid-prefill or mid-decode, with prompts chunked under a small token budget.

use pd_common::engine::{EngineConfig, EngineCore, GenerateRequest};
use pd_common::sampling::SamplingParams;
use pd_tests::{golden_cases, real_engine, Runs};

fn request(prompt_ids: Vec<u32>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_ids,
        params: SamplingParams {
            temperature: 0.0,
            max_tokens,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        ..Default::default()
    }
}

fn engine(max_batch_tokens: usize) -> EngineCore {
    real_engine(EngineConfig {
        max_batch_tokens,
        ..EngineConfig::default()
    })
}

#[test]
fn greedy_output_is_identical_alone_and_packed_with_15_others() {
    let cases = golden_cases();
    // 16 prompts of different lengths: the golden prompts and suffixes of them.
    let mut prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
    for c in cases.iter().take(6) {
        let ids = &c.prompt_ids;
        prompts.push(ids[ids.len() / 3..].to_vec());
    }
    assert_eq!(prompts.len(), 16);
    let max_tokens = |i: usize| 12 + (i as u32 * 5) % 17;

    // Alone: each prompt in an engine of its own, whole prompt in one step.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut core = engine(4096);
            let mut runs = Runs::new();
            runs.add(&mut core, request(p.clone(), max_tokens(i)));
            runs.finish(&mut core).remove(0).ids
        })
        .collect();

    // Packed: a 96-token budget chunks the long prompts; requests arrive while others are
    // mid-prefill and mid-decode.
    let mut core = engine(96);
    let mut runs = Runs::new();
    let mut order = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        order.push(runs.add(&mut core, request(p.clone(), max_tokens(i))));
        runs.step(&mut core, 1 + i % 3);
    }
    let packed = runs.finish(&mut core);
    for (i, idx) in order.into_iter().enumerate() {
        assert_eq!(packed[idx].ids, alone[i], "prompt {i} differs when packed");
    }
}

#[test]
fn preemption_by_recompute_keeps_greedy_output() {
    // A cache too small for all sequences at once forces preemption and recompute.
    let prompts: Vec<Vec<u32>> = golden_cases()
        .iter()
        .filter(|c| c.prompt_ids.len() < 120)
        .map(|c| c.prompt_ids.clone())
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut core = engine(4096);
            let mut runs = Runs::new();
            runs.add(&mut core, request(p.clone(), 40));
            runs.finish(&mut core).remove(0).ids
        })
        .collect();
    let mut core = real_engine(EngineConfig {
        num_blocks: 24,
        ..EngineConfig::default()
    });
    let mut runs = Runs::new();
    for p in &prompts {
        runs.add(&mut core, request(p.clone(), 40));
    }
    let packed = runs.finish(&mut core);
    for (i, got) in packed.iter().enumerate() {
        assert_eq!(got.ids, alone[i], "prompt {i} differs after preemption");
    }
    let stats = core.stats();
    assert!(
        stats.preemptions > 0,
        "the small cache must have forced preemption"
    );
    assert_eq!(stats.free_blocks, 24, "every block is free again");
}
