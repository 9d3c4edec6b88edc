//! Beam search in the engine: width 1 is greedy; width k returns k distinct beams in score
//! order, the very beams a straightforward beam search written here finds (recomputing every
//! beam from scratch each step); a small cache that forces preemption and fork failures does
//! not change them; a search dropped or cancelled midway, after its beams forked, leaves no
//! block allocated.

use pd_common::chat_template::ChatMessage;
use pd_common::engine::{
    beam_score, BeamOutput, EngineConfig, EngineCore, GenerateRequest, SeqEvent,
};
use pd_common::sampling::{FinishReason, SamplingParams};
use pd_tests::{golden_cases, real_engine, real_model, RunResult, Runs};
use tokio::sync::mpsc;

fn beams(width: u32, max_tokens: u32, length_penalty: f32) -> SamplingParams {
    SamplingParams {
        beam_width: width,
        max_tokens,
        length_penalty,
        ..SamplingParams::default()
    }
}

fn request(prompt_ids: &[u32], params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt_ids.to_vec(),
        params,
        ..Default::default()
    }
}

fn run_all(core: &mut EngineCore, requests: Vec<GenerateRequest>) -> Vec<RunResult> {
    let mut runs = Runs::new();
    for r in requests {
        runs.add(core, r);
    }
    let out = runs.finish(core);
    assert_all_free(core);
    out
}

fn assert_all_free(core: &EngineCore) {
    let stats = core.stats();
    assert_eq!(stats.free_blocks, stats.total_blocks, "a KV block leaked");
    assert_eq!(
        (stats.running, stats.waiting),
        (0, 0),
        "a sequence was left"
    );
}

fn chat(text: &str) -> Vec<u32> {
    real_model()
        .encode_chat(&[ChatMessage::new("user", text)])
        .unwrap()
}

/// Beam search as transformers' `BeamSearchScorer` does it, as plainly as it can be written:
/// every step recomputes every beam from scratch (a one-token greedy request for prompt + beam,
/// asking for its top 2k log-probabilities) and ranks all extensions by their sum; in rank order
/// an end token finishes a beam if it ranks in the first k, and the first k others live on; it
/// stops at `max_tokens` or once k beams finished and the best live one could not beat the
/// worst of them; the answer is the k best of all by score.
fn reference_beam_search(
    prompt: &[u32],
    width: usize,
    max_tokens: u32,
    length_penalty: f32,
) -> Vec<(Vec<u32>, f64, bool)> {
    let eog = real_model()
        .tokenizer
        .as_ref()
        .unwrap()
        .eog_token_ids()
        .to_vec();
    let score = |t: &[u32], c: f64| beam_score(c, t.len(), length_penalty);
    let mut core = real_engine(EngineConfig::default());
    let mut live: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
    let mut done: Vec<(Vec<u32>, f64, bool)> = Vec::new();
    for _ in 0..max_tokens {
        let next = SamplingParams {
            temperature: 0.0,
            max_tokens: 1,
            logprobs: Some(2 * width as u32),
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let requests = live
            .iter()
            .map(|(tokens, _)| request(&[prompt, tokens].concat(), next.clone()))
            .collect();
        let outs = run_all(&mut core, requests);
        let mut extended = Vec::new();
        for ((tokens, cum), out) in live.iter().zip(outs) {
            for &(id, logprob) in &out.top_logprobs[0] {
                extended.push(([&tokens[..], &[id]].concat(), cum + f64::from(logprob)));
            }
        }
        extended.sort_by(|a, b| b.1.total_cmp(&a.1));
        live = Vec::new();
        for (rank, (t, c)) in extended.into_iter().enumerate() {
            if live.len() == width {
                break;
            }
            if !eog.contains(t.last().unwrap()) {
                live.push((t, c));
            } else if rank < width {
                done.push((t, c, true));
            }
        }
        let mut finished: Vec<f64> = done.iter().map(|(t, c, _)| score(t, *c)).collect();
        finished.sort_by(|a, b| b.total_cmp(a));
        let settled = finished.len() >= width
            && live
                .first()
                .is_some_and(|(t, c)| finished[width - 1] >= score(t, *c));
        if live.is_empty() || settled {
            break;
        }
    }
    done.extend(live.into_iter().map(|(t, c)| (t, c, false)));
    done.sort_by(|a, b| score(&b.0, b.1).total_cmp(&score(&a.0, a.1)));
    done.truncate(width);
    done
}

fn assert_ranked(beams: &[BeamOutput], width: usize) {
    assert_eq!(beams.len(), width, "{beams:?}");
    for pair in beams.windows(2) {
        assert!(
            pair[0].score >= pair[1].score,
            "not in score order: {beams:?}"
        );
    }
    let mut ids: Vec<&Vec<u32>> = beams.iter().map(|b| &b.token_ids).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), width, "beams repeat: {beams:?}");
}

#[test]
fn width_one_is_greedy_for_every_golden_prompt() {
    let prompts: Vec<Vec<u32>> = golden_cases().into_iter().map(|c| c.prompt_ids).collect();
    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens: 24,
        ..SamplingParams::default()
    };
    let mut core = real_engine(EngineConfig::default());
    let want = run_all(
        &mut core,
        prompts.iter().map(|p| request(p, greedy.clone())).collect(),
    );
    let mut core = real_engine(EngineConfig::default());
    let got = run_all(
        &mut core,
        prompts
            .iter()
            .map(|p| request(p, beams(1, 24, 1.0)))
            .collect(),
    );
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g.beams.len(), 1, "prompt {i}");
        let b = &g.beams[0];
        assert_eq!(b.token_ids, w.ids, "prompt {i}");
        assert_eq!(b.text, w.text, "prompt {i}");
        assert_eq!(b.reason, w.reason, "prompt {i}");
        assert_eq!((&g.text, g.reason), (&w.text, w.reason), "prompt {i}");
        let cum: f64 = w.logprobs.iter().map(|&l| f64::from(l)).sum();
        assert!(
            (f64::from(b.cumulative_logprob) - cum).abs() < 1e-3,
            "prompt {i}"
        );
        // A beam search streams nothing: the answer is in the completion.
        assert!(g.ids.is_empty(), "prompt {i}");
    }
}

#[test]
fn beams_are_those_a_plain_reference_finds() {
    let cases = [
        (chat("What is the capital of France?"), 3, 12, 1.0),
        (golden_cases()[1].prompt_ids.clone(), 4, 10, 0.5),
    ];
    for (prompt, width, max_tokens, penalty) in cases {
        let want = reference_beam_search(&prompt, width, max_tokens, penalty);
        let mut core = real_engine(EngineConfig::default());
        let got = run_all(
            &mut core,
            vec![request(&prompt, beams(width as u32, max_tokens, penalty))],
        );
        let got = &got[0];
        assert_ranked(&got.beams, width);
        for (i, (b, (ids, cum, ends))) in got.beams.iter().zip(&want).enumerate() {
            assert_eq!(&b.token_ids, ids, "beam {i} of width {width}");
            assert!(
                (f64::from(b.cumulative_logprob) - cum).abs() < 1e-3,
                "beam {i}"
            );
            let reason = if *ends {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            assert_eq!(b.reason, reason, "beam {i}");
            let score = beam_score(*cum, ids.len(), penalty);
            assert!((f64::from(b.score) - score).abs() < 1e-4, "beam {i}");
            let shown = if *ends {
                &ids[..ids.len() - 1]
            } else {
                &ids[..]
            };
            let text = real_model()
                .tokenizer
                .as_ref()
                .unwrap()
                .decode(shown, true)
                .unwrap();
            assert_eq!(b.text, text, "beam {i}");
        }
        assert_eq!(got.text, got.beams[0].text);
    }
}

#[test]
fn a_small_cache_preempts_and_forks_without_changing_a_beam() {
    let prompts = [
        chat("Name three colours."),
        chat("What is the capital of France?"),
        golden_cases()[2].prompt_ids.clone(),
    ];
    let params = SamplingParams {
        ignore_eos: true,
        ..beams(4, 24, 1.0)
    };
    let requests = || prompts.iter().map(|p| request(p, params.clone())).collect();
    let mut roomy = real_engine(EngineConfig::default());
    let want = run_all(&mut roomy, requests());
    // Each search holds its prompt's blocks and, per beam, up to two more at its peak.
    let mut tight = real_engine(EngineConfig {
        num_blocks: 14,
        ..EngineConfig::default()
    });
    let got = run_all(&mut tight, requests());
    assert!(tight.stats().preemptions > 0, "nothing was preempted");
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_ranked(&g.beams, 4);
        assert_eq!(g.beams, w.beams, "prompt {i}");
    }
}

#[test]
fn a_search_dropped_or_cancelled_midway_frees_every_block() {
    let prompt = chat("Tell me a story about a dragon.");
    for cancel in [false, true] {
        let mut core = real_engine(EngineConfig::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let id = core
            .add_request(request(&prompt, beams(4, 40, 1.0)), tx)
            .unwrap();
        for _ in 0..6 {
            core.step().unwrap();
        }
        // The beams forked: four sequences share the prompt's blocks.
        assert_eq!(core.stats().running, 4);
        let rx = if cancel {
            assert!(core.abort(id));
            Some(rx)
        } else {
            drop(rx);
            None
        };
        core.step().unwrap();
        assert!(!core.has_work());
        assert_all_free(&core);
        if let Some(mut rx) = rx {
            match rx.try_recv() {
                Ok(SeqEvent::Finished(c)) => assert_eq!(c.reason, FinishReason::Cancelled),
                other => panic!("expected a cancelled completion, got {other:?}"),
            }
        }
    }
}

#[test]
fn bad_beam_requests_are_refused_with_the_field_named() {
    let core = real_engine(EngineConfig::default());
    let prompt = chat("Hi");
    let refused = |params: SamplingParams, resume: Vec<u32>| {
        core.validate(&GenerateRequest {
            prompt_ids: prompt.clone(),
            params,
            resume_ids: resume,
        })
        .unwrap_err()
        .to_string()
    };
    let with_stop = SamplingParams {
        stop: vec!["x".into()],
        ..beams(2, 8, 1.0)
    };
    assert!(refused(with_stop, vec![]).contains("stop strings"));
    assert!(refused(beams(17, 8, 1.0), vec![]).contains("at most 16"));
    assert!(refused(beams(2, 8, f32::NAN), vec![]).contains("length_penalty"));
    assert!(refused(beams(2, 8, 1.0), vec![42]).contains("cannot resume"));
}
