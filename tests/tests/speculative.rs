//! Speculative decoding (prompt lookup, and a draft model): greedy output is plain greedy
//! output, token for token, alone, packed, under preemption and with stop strings; seeded sampling gives the very output
//! plain sampling gives; sampling with other seeds has plain sampling's distribution (a chi-square test);
//! no block is left allocated.

use std::collections::HashMap;

use pd_common::chat_template::ChatMessage;
use pd_common::engine::{EngineConfig, EngineCore, GenerateRequest, SpeculativeConfig};
use pd_common::sampling::SamplingParams;
use pd_tests::{golden_cases, real_engine, real_model, RunResult, Runs};

fn ngram(k: usize) -> SpeculativeConfig {
    format!(
        r#"{{"method": "ngram", "num_speculative_tokens": {k}, "prompt_lookup_min": 1, "prompt_lookup_max": 3}}"#
    )
    .parse()
    .unwrap()
}

fn engine(speculative: Option<SpeculativeConfig>, config: EngineConfig) -> EngineCore {
    real_engine(EngineConfig {
        speculative_config: speculative,
        ..config
    })
}

/// A prompt whose answer copies text from it: what prompt lookup is for.
fn copy_prompt() -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the \
                fox runs into the forest, and the birds sing in the tall green trees.";
    real_model()
        .encode_chat(&[ChatMessage::new(
            "user",
            format!("Repeat this text exactly, word for word:\n\n{text}"),
        )])
        .unwrap()
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn run_all(core: &mut EngineCore, requests: Vec<GenerateRequest>) -> Vec<RunResult> {
    let mut runs = Runs::new();
    for r in requests {
        runs.add(core, r);
    }
    let out = runs.finish(core);
    let stats = core.stats();
    assert_eq!(stats.free_blocks, stats.total_blocks, "a KV block leaked");
    out
}

fn request(prompt_ids: Vec<u32>, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt_ids,
        params,
        ..Default::default()
    }
}

fn prompts() -> Vec<Vec<u32>> {
    let mut prompts: Vec<Vec<u32>> = golden_cases().into_iter().map(|c| c.prompt_ids).collect();
    prompts.push(copy_prompt());
    prompts
}

/// Each prompt's plain greedy output, every prompt in an engine of its own.
fn plain_alone(prompts: &[Vec<u32>], max_tokens: u32) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| {
            let mut core = engine(None, EngineConfig::default());
            run_all(&mut core, vec![request(p.clone(), greedy(max_tokens))])
                .remove(0)
                .ids
        })
        .collect()
}

/// Every prompt through `core` at once, greedy.
fn greedy_all(core: &mut EngineCore, prompts: &[Vec<u32>], max_tokens: u32) -> Vec<RunResult> {
    let requests = prompts
        .iter()
        .map(|p| request(p.clone(), greedy(max_tokens)))
        .collect();
    run_all(core, requests)
}

#[test]
fn greedy_output_is_plain_greedy_for_every_golden_prompt_alone_and_packed() {
    let prompts = prompts();
    let plain = plain_alone(&prompts, 48);
    let mut accepted = 0;
    for (i, p) in prompts.iter().enumerate() {
        let mut core = engine(Some(ngram(4)), EngineConfig::default());
        let out = run_all(&mut core, vec![request(p.clone(), greedy(48))]).remove(0);
        assert_eq!(out.ids, plain[i], "prompt {i}: speculative greedy differs");
        let counts = out.speculative.expect("counts come with speculation on");
        assert!(counts.accepted <= counts.drafted);
        accepted += counts.accepted;
    }
    assert!(accepted > 0, "no draft was ever accepted");

    // All at once under a small step budget: drafts of some sequences share steps with prompt
    // chunks and the plain decode tokens of others.
    let mut core = engine(
        Some(ngram(5)),
        EngineConfig {
            max_batch_tokens: 64,
            ..EngineConfig::default()
        },
    );
    let packed = greedy_all(&mut core, &prompts, 48);
    for (i, out) in packed.iter().enumerate() {
        assert_eq!(out.ids, plain[i], "prompt {i}: speculative packed differs");
    }
    let stats = core.stats().spec_decode;
    assert!(
        stats.draft_tokens > 0 && stats.accepted_tokens > 0,
        "{stats:?}"
    );
    assert!(stats.accepted_tokens <= stats.draft_tokens);
    assert!(stats.mean_accepted_length() > 1.0);
}

#[test]
fn copying_accepts_most_drafts() {
    let mut core = engine(Some(ngram(4)), EngineConfig::default());
    let out = run_all(&mut core, vec![request(copy_prompt(), greedy(40))]).remove(0);
    let counts = out.speculative.unwrap();
    let stats = core.stats().spec_decode;
    println!(
        "copy prompt: drafted {} accepted {} (rate {:.2}, mean accepted length {:.2}) in {} drafted steps",
        counts.drafted,
        counts.accepted,
        stats.acceptance_rate(),
        stats.mean_accepted_length(),
        stats.drafts
    );
    // Fewer steps than tokens: that is the point.
    assert!(stats.mean_accepted_length() > 1.5, "{stats:?}");
    assert_eq!(out.ids.len(), 40);
}

#[test]
fn preemption_and_small_caches_keep_the_output_exact() {
    let prompts: Vec<Vec<u32>> = prompts().into_iter().filter(|p| p.len() < 120).collect();
    let plain = plain_alone(&prompts, 40);
    let mut core = engine(
        Some(ngram(6)),
        EngineConfig {
            num_blocks: 24,
            ..EngineConfig::default()
        },
    );
    let out = greedy_all(&mut core, &prompts, 40);
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o.ids, plain[i], "prompt {i} differs after preemption");
    }
    let stats = core.stats();
    assert!(
        stats.preemptions > 0,
        "the small cache must have forced preemption"
    );
    assert!(stats.spec_decode.accepted_tokens > 0);
}

#[test]
fn stop_strings_stop_tokens_and_max_tokens_are_exact() {
    let prompt = copy_prompt();
    let plain_text = {
        let mut core = engine(None, EngineConfig::default());
        run_all(&mut core, vec![request(prompt.clone(), greedy(40))]).remove(0)
    };
    // A stop string from the middle of the answer, a stop token from it, and max_tokens that
    // ends inside a run of accepted drafts.
    let words: Vec<&str> = plain_text.text.split_whitespace().collect();
    let stop = words[words.len() / 2].to_string();
    let stop_id = plain_text.ids[plain_text.ids.len() * 2 / 3];
    for params in [
        SamplingParams {
            stop: vec![stop.clone()],
            ..greedy(40)
        },
        SamplingParams {
            stop_token_ids: vec![stop_id],
            ..greedy(40)
        },
        greedy(13),
        greedy(1),
    ] {
        let mut plain = engine(None, EngineConfig::default());
        let want = run_all(&mut plain, vec![request(prompt.clone(), params.clone())]).remove(0);
        let mut spec = engine(Some(ngram(5)), EngineConfig::default());
        let got = run_all(&mut spec, vec![request(prompt.clone(), params.clone())]).remove(0);
        assert_eq!(got.ids, want.ids, "{params:?}");
        assert_eq!(got.text, want.text, "{params:?}");
        assert_eq!(got.reason, want.reason, "{params:?}");
        assert!(got.ids.len() <= params.max_tokens as usize);
    }
}

fn sampled(temperature: f32, seed: Option<u64>) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p: 0.95,
        seed,
        max_tokens: 12,
        ignore_eos: true,
        logprobs: Some(0),
        ..SamplingParams::default()
    }
}

#[test]
fn seeded_sampling_gives_plain_sampling_output_and_logprobs() {
    let prompt = copy_prompt();
    let requests = |n: u64| {
        (0..n)
            .map(|seed| request(prompt.clone(), sampled(0.7, Some(seed))))
            .collect::<Vec<_>>()
    };
    let mut plain = engine(None, EngineConfig::default());
    let want = run_all(&mut plain, requests(12));
    let mut spec = engine(Some(ngram(4)), EngineConfig::default());
    let got = run_all(&mut spec, requests(12));
    for (seed, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.ids, w.ids, "seed {seed}");
        assert_eq!(g.logprobs, w.logprobs, "seed {seed}");
    }
    assert!(spec.stats().spec_decode.accepted_tokens > 0);
}

/// Chi-square statistic of two samples' counts over the same categories, and its degrees of
/// freedom. Categories seen fewer than 10 times in both together are pooled.
fn chi_square(a: &HashMap<u32, u32>, b: &HashMap<u32, u32>) -> (f64, usize) {
    let (na, nb) = (
        a.values().sum::<u32>() as f64,
        b.values().sum::<u32>() as f64,
    );
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut rare = (0.0, 0.0);
    let keys: std::collections::BTreeSet<u32> = a.keys().chain(b.keys()).copied().collect();
    for k in keys {
        let (x, y) = (
            *a.get(&k).unwrap_or(&0) as f64,
            *b.get(&k).unwrap_or(&0) as f64,
        );
        if x + y < 10.0 {
            rare.0 += x;
            rare.1 += y;
        } else {
            cells.push((x, y));
        }
    }
    if rare.0 + rare.1 > 0.0 {
        cells.push(rare);
    }
    let total = na + nb;
    let stat = cells
        .iter()
        .map(|&(x, y)| {
            let e_a = (x + y) * na / total;
            let e_b = (x + y) * nb / total;
            (x - e_a).powi(2) / e_a + (y - e_b).powi(2) / e_b
        })
        .sum();
    (stat, cells.len().saturating_sub(1))
}

/// Upper 0.1 % point of the chi-square distribution (Wilson–Hilferty approximation).
fn chi_square_critical(df: usize) -> f64 {
    let k = df.max(1) as f64;
    let z = 3.090; // the normal's upper 0.1 % point
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

#[test]
fn sampling_has_the_plain_distribution() {
    // Different seeds on the two sides: the samples are independent, so only a difference in
    // distribution (not in seeds) can make them disagree.
    let prompt = copy_prompt();
    let n = 240u64;
    let run = |spec: Option<SpeculativeConfig>, seeds: std::ops::Range<u64>| {
        let mut core = engine(spec, EngineConfig::default());
        let out = run_all(
            &mut core,
            seeds
                .map(|s| request(prompt.clone(), sampled(1.0, Some(s))))
                .collect(),
        );
        (out, core.stats().spec_decode)
    };
    let (plain, _) = run(None, 0..n);
    let (spec, stats) = run(Some(ngram(4)), 10_000..10_000 + n);
    assert!(stats.accepted_tokens > 0, "{stats:?}");
    // Positions drafts reach: the third and the last output token.
    for pos in [2usize, 11] {
        let count = |runs: &[RunResult]| {
            let mut c = HashMap::new();
            for r in runs {
                *c.entry(r.ids[pos]).or_insert(0u32) += 1;
            }
            c
        };
        let (stat, df) = chi_square(&count(&plain), &count(&spec));
        let critical = chi_square_critical(df);
        println!("position {pos}: chi-square {stat:.1} on {df} df (0.1 % critical {critical:.1})");
        assert!(
            df >= 1,
            "position {pos}: every sample the same token, the test says nothing"
        );
        assert!(
            stat < critical,
            "position {pos}: the speculative distribution differs (chi-square {stat:.1} on {df} df)"
        );
    }
}

#[test]
fn the_statistical_test_can_fail() {
    // Two clearly different distributions over three tokens: the statistic must exceed the
    // critical value, or the test above could never fail.
    let a: HashMap<u32, u32> = [(1, 120), (2, 80), (3, 40)].into();
    let b: HashMap<u32, u32> = [(1, 80), (2, 80), (3, 80)].into();
    let (stat, df) = chi_square(&a, &b);
    assert!(stat > chi_square_critical(df), "{stat} on {df}");
    let (same, df) = chi_square(&a, &a);
    assert!(same < chi_square_critical(df));
}

#[test]
fn disable_by_batch_size_stops_drafting_for_larger_batches() {
    let config = |most: usize| -> SpeculativeConfig {
        format!(
            r#"{{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3, "disable_by_batch_size": {most}}}"#
        )
        .parse()
        .unwrap()
    };
    let two = || {
        vec![
            request(copy_prompt(), greedy(24)),
            request(copy_prompt()[4..].to_vec(), greedy(24)),
        ]
    };
    let mut plain = engine(None, EngineConfig::default());
    let want = run_all(&mut plain, two());
    // Two sequences run together from start to end: more than one, so no drafts at all.
    let mut off = engine(Some(config(1)), EngineConfig::default());
    let got = run_all(&mut off, two());
    assert_eq!(off.stats().spec_decode.draft_tokens, 0);
    let mut on = engine(Some(config(2)), EngineConfig::default());
    let got_on = run_all(&mut on, two());
    assert!(on.stats().spec_decode.draft_tokens > 0);
    for ((a, b), w) in got.iter().zip(&got_on).zip(&want) {
        assert_eq!(a.ids, w.ids);
        assert_eq!(b.ids, w.ids);
    }
}

/// The draft model method with `model` (as `--model` takes it) as the draft.
fn draft_model(model: &str, k: usize) -> SpeculativeConfig {
    serde_json::json!({"method": "draft_model", "model": model, "num_speculative_tokens": k})
        .to_string()
        .parse()
        .unwrap()
}

fn own_gguf() -> String {
    pd_common::model::default_model_path()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_draft_model_gives_plain_greedy_output_whatever_it_drafts() {
    let prompts = prompts();
    let plain = plain_alone(&prompts, 32);
    // The target as its own draft: every prompt at once under a small step budget, and nearly
    // every draft accepted (the draft cache is right, or the drafts would be wrong).
    let mut core = engine(
        Some(draft_model(&own_gguf(), 4)),
        EngineConfig {
            max_batch_tokens: 64,
            ..EngineConfig::default()
        },
    );
    let packed = greedy_all(&mut core, &prompts, 32);
    for (i, out) in packed.iter().enumerate() {
        assert_eq!(out.ids, plain[i], "prompt {i}: drafted by itself, packed");
        assert!(out.speculative.unwrap().drafted > 0, "prompt {i}");
    }
    let stats = core.stats().spec_decode;
    println!(
        "own draft: rate {:.3}, mean accepted length {:.2}",
        stats.acceptance_rate(),
        stats.mean_accepted_length()
    );
    assert!(stats.acceptance_rate() > 0.9, "{stats:?}");

    // A random tiny draft with the same vocabulary, in a cache small enough to preempt: its
    // drafts are nearly all rejected, and nothing of them shows in the output.
    let short: Vec<usize> = (0..prompts.len())
        .filter(|&i| prompts[i].len() < 120)
        .collect();
    let short_prompts: Vec<Vec<u32>> = short.iter().map(|&i| prompts[i].clone()).collect();
    let mut core = engine(
        Some(draft_model("dummy:tiny-smollm2-vocab:5", 3)),
        EngineConfig {
            num_blocks: 24,
            ..EngineConfig::default()
        },
    );
    let out = greedy_all(&mut core, &short_prompts, 32);
    for (o, &i) in out.iter().zip(&short) {
        assert_eq!(o.ids, plain[i], "prompt {i}: random draft, preempted");
    }
    let stats = core.stats();
    assert!(stats.preemptions > 0, "the small cache must have preempted");
    assert!(stats.spec_decode.draft_tokens > 0);
    assert!(stats.spec_decode.acceptance_rate() < 0.5, "{stats:?}");
}

#[test]
fn a_draft_model_keeps_seeded_sampling_exact_and_refuses_another_vocabulary() {
    let prompt = copy_prompt();
    let requests = || {
        (0..6)
            .map(|seed| request(prompt.clone(), sampled(0.7, Some(seed))))
            .collect::<Vec<_>>()
    };
    let want = run_all(&mut engine(None, EngineConfig::default()), requests());
    let mut spec = engine(Some(draft_model(&own_gguf(), 3)), EngineConfig::default());
    let got = run_all(&mut spec, requests());
    for (seed, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.ids, w.ids, "seed {seed}");
        assert_eq!(g.logprobs, w.logprobs, "seed {seed}");
    }
    assert!(spec.stats().spec_decode.accepted_tokens > 0);

    let err = EngineCore::new(
        real_model().model.clone(),
        None,
        EngineConfig {
            speculative_config: Some(draft_model("dummy:tiny", 2)),
            ..EngineConfig::default()
        },
    )
    .err()
    .expect("a draft with another vocabulary is refused")
    .to_string();
    assert!(err.contains("vocabulary of 512 tokens"), "{err}");
}
