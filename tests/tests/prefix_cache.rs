//! The prefix cache in one engine: prompts that begin alike compute the shared blocks once, greedy
//! output is exactly what it is with the cache off, the stats count what was found, and cached
//! blocks give way when the room is needed, every block back in the free count at the end.

use pd_common::engine::{EngineConfig, EngineCore, GenerateRequest};
use pd_common::sampling::SamplingParams;
use pd_tests::{golden_cases, match_len, real_engine, RunResult, Runs};

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
        assert_eq!(w.cached_tokens, 0, "prompt {i} with the cache off");
        // Every full block it shares with an earlier prompt, short of the block holding its
        // last token: 16 tokens a block.
        let shared = prompts[..i]
            .iter()
            .map(|p| match_len(p, &prompts[i]))
            .max()
            .unwrap_or(0);
        let blocks = (shared / 16).min((prompts[i].len() - 1) / 16);
        assert_eq!(g.cached_tokens, blocks * 16, "prompt {i}");
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
    assert_eq!(again[0].cached_tokens as u64, found);
    assert_all_free(&core);
}

#[test]
fn one_prompt_sent_four_times_at_once_is_computed_once() {
    // As n = 4 choices arrive: the first computes the prompt, the others wait for its blocks
    // and compute only the block holding their last token; each is the output it has alone.
    let p = prompt("long_600");
    let seeded = |seed: u64| GenerateRequest {
        prompt_ids: p.clone(),
        params: SamplingParams {
            temperature: 0.8,
            seed: Some(seed),
            max_tokens: 12,
            ..SamplingParams::default()
        },
        ..Default::default()
    };
    let alone: Vec<RunResult> = (0..4)
        .map(|j| {
            let mut core = engine(false, 0);
            let mut runs = Runs::new();
            runs.add(&mut core, seeded(7 + j));
            runs.finish(&mut core).remove(0)
        })
        .collect();
    let mut core = engine(true, 0);
    let mut runs = Runs::new();
    for j in 0..4 {
        runs.add(&mut core, seeded(7 + j));
    }
    let got = runs.finish(&mut core);
    let full = ((p.len() - 1) / 16 * 16) as u64;
    let s = core.stats();
    assert_eq!(s.prefix_cache_hits, 3 * full, "{s:?}");
    for (j, (g, w)) in got.iter().zip(&alone).enumerate() {
        assert_eq!((&g.ids, &g.text), (&w.ids, &w.text), "sample {j}");
        assert_eq!(g.cached_tokens as u64, if j == 0 { 0 } else { full });
    }
    assert_ne!(got[0].ids, got[1].ids, "the seeds made no difference");
    assert_all_free(&core);
}

#[test]
fn a_prompt_waits_for_another_only_when_most_of_its_blocks_are_being_computed() {
    // Ten-block prompts beside a first one being computed: sharing one block (a system
    // prompt's worth) they start at once; sharing eight they wait and take them from the cache.
    let p = prompt("long_600");
    let first = p[..161].to_vec();
    let one_shared = [&p[..16], &p[300..445]].concat();
    let most_shared = [&p[..128], &p[300..333]].concat();
    let want = one_by_one(
        &mut engine(false, 0),
        &[first.clone(), one_shared.clone(), most_shared.clone()],
    );
    let mut core = engine(true, 0);
    let mut runs = Runs::new();
    for p in [&first, &one_shared, &most_shared] {
        runs.add(&mut core, request(p.clone()));
    }
    core.step().unwrap();
    let s = core.stats();
    assert_eq!((s.running, s.waiting), (2, 1), "{s:?}");
    let got = runs.finish(&mut core);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.ids, w.ids, "prompt {i}");
    }
    assert_eq!(
        got.iter().map(|g| g.cached_tokens).collect::<Vec<_>>(),
        [0, 0, 128]
    );
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

#[test]
fn the_cached_token_count_drops_after_an_eviction_and_output_stays() {
    // 80 blocks. A prompt run twice finds all its full blocks; a prompt sharing none of them
    // then takes room that only evicting some of them gives; the first prompt finds fewer.
    let first = prompts()[1].clone();
    let mut other = prompt("long_600");
    other.reverse();
    let want = one_by_one(&mut engine(false, 80), std::slice::from_ref(&first));
    let mut core = engine(true, 80);
    let full = (first.len() - 1) / 16 * 16;
    let runs = one_by_one(
        &mut core,
        &[first.clone(), first.clone(), other, first.clone()],
    );
    assert_eq!(runs[1].cached_tokens, full);
    assert!(
        runs[3].cached_tokens < full,
        "{} cached tokens after an eviction, of {full}",
        runs[3].cached_tokens
    );
    for r in [&runs[1], &runs[3]] {
        assert_eq!(r.ids, want[0].ids);
        assert_eq!(r.text, want[0].text);
    }
    assert_all_free(&core);
}
