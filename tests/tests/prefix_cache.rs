//! The prefix cache in one engine: prompts that begin alike compute the shared blocks once, greedy
//! output is exactly what it is with the cache off, the stats count what was found, and cached
//! blocks give way when the room is needed, every block back in the free count at the end.

use pd_common::engine::{EngineConfig, EngineCore, GenerateRequest};
use pd_common::sampling::SamplingParams;
use pd_tests::{golden_cases, real_engine, RunResult, Runs};

fn prompt(name: &str) -> Vec<u32> {
    golden_cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap()
        .prompt_ids
}

fn request(prompt_ids: Vec<u32>) -> GenerateRequest {
    GenerateRequest {
        prompt_ids,
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: 20,
            ..SamplingParams::default()
        },
        ..Default::default()
    }
}

/// A long shared beginning (as a system prompt is) and three different endings.
fn prompts() -> Vec<Vec<u32>> {
    let shared = prompt("long_600");
    let shared = &shared[..shared.len() - 8];
    ["en_capital", "zh_instruction", "one_token"]
        .iter()
        .map(|tail| [shared, &prompt(tail)].concat())
        .collect()
}

fn engine(caching: bool, num_blocks: usize) -> EngineCore {
    real_engine(EngineConfig {
        enable_prefix_caching: caching,
        num_blocks,
        ..EngineConfig::default()
    })
}

/// Each prompt alone, one after the other, on `core`.
fn one_by_one(core: &mut EngineCore, prompts: &[Vec<u32>]) -> Vec<RunResult> {
    prompts
        .iter()
        .map(|p| {
            let mut runs = Runs::new();
            runs.add(core, request(p.clone()));
            runs.finish(core).remove(0)
        })
        .collect()
}

fn assert_all_free(core: &EngineCore) {
    let s = core.stats();
    assert_eq!(s.free_blocks, s.total_blocks, "{s:?}");
}

#[test]
fn a_shared_prefix_is_computed_once_and_greedy_output_is_unchanged() {
    let prompts = prompts();
    let want = one_by_one(&mut engine(false, 0), &prompts);

    let mut core = engine(true, 0);
    let got = one_by_one(&mut core, &prompts);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.ids, w.ids, "prompt {i}");
        assert_eq!(g.text, w.text, "prompt {i}");
    }
    let s = core.stats();
    let asked: usize = prompts.iter().map(Vec::len).sum();
    assert_eq!(s.prefix_cache_queries, asked as u64);
    // The first prompt finds nothing; each later one finds the shared beginning's full blocks.
    let shared_blocks = (prompt("long_600").len() - 8) / 16;
    assert!(
        s.prefix_cache_hits >= 2 * (shared_blocks * 16) as u64,
        "{s:?}"
    );
    assert!(s.cached_blocks > shared_blocks, "{s:?}");
    assert_all_free(&core);

    // The same prompt again finds every full block but the one holding its last token.
    let before = core.stats().prefix_cache_hits;
    let again = one_by_one(&mut core, &prompts[..1]);
    assert_eq!(again[0].ids, want[0].ids);
    let found = core.stats().prefix_cache_hits - before;
    assert_eq!(found, ((prompts[0].len() - 1) / 16 * 16) as u64);
    assert_all_free(&core);
}

#[test]
fn prompts_sharing_a_prefix_at_once_agree_with_the_cache_off() {
    // All three admitted together (and a fourth equal to the first): blocks computed in the
    // same step are cached once, the rest stay private.
    let mut prompts = prompts();
    prompts.push(prompts[0].clone());
    let want = one_by_one(&mut engine(false, 0), &prompts);
    let mut core = engine(true, 0);
    let mut runs = Runs::new();
    for p in &prompts {
        runs.add(&mut core, request(p.clone()));
    }
    let got = runs.finish(&mut core);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.ids, w.ids, "prompt {i}");
    }
    assert_all_free(&core);
}

#[test]
fn cached_blocks_give_way_to_new_prompts_when_the_cache_is_full() {
    // 80 blocks: one prompt of ~650 tokens (41 blocks plus output) at a time, so every prompt
    // after the first evicts what the earlier ones left.
    let mut prompts = prompts();
    prompts.push(prompt("long_600"));
    prompts.push(prompts[1].clone());
    let want = one_by_one(&mut engine(false, 80), &prompts);
    let mut core = engine(true, 80);
    let got = one_by_one(&mut core, &prompts);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.ids, w.ids, "prompt {i}");
    }
    let s = core.stats();
    assert!(s.cached_blocks <= 80, "{s:?}");
    assert!(s.prefix_cache_hits > 0, "{s:?}");
    assert_all_free(&core);
}
