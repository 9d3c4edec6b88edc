//! What a user of the engine sees: stop strings and tokens, length limits, seeded sampling,
//! logprobs, concurrent requests through the async handle, and cancellation freeing KV blocks.

use pd_common::engine::{EngineConfig, EngineCore, EngineHandle, GenerateRequest, SeqEvent};
use pd_common::sampling::{FinishReason, SamplingParams};
use pd_tests::{golden_cases, real_engine, real_model, Runs};

fn core() -> EngineCore {
    real_engine(EngineConfig::default())
}

fn capital_prompt() -> Vec<u32> {
    golden_cases()
        .into_iter()
        .find(|c| c.name == "en_capital")
        .unwrap()
        .prompt_ids
}

fn run_one(params: SamplingParams) -> pd_tests::RunResult {
    let mut core = core();
    let mut runs = Runs::new();
    runs.add(
        &mut core,
        GenerateRequest {
            prompt_ids: capital_prompt(),
            params,
            ..Default::default()
        },
    );
    runs.finish(&mut core).remove(0)
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens: 32,
        ..SamplingParams::default()
    }
}

#[test]
fn eos_ends_with_stop_and_no_special_text() {
    let r = run_one(greedy());
    assert_eq!(r.reason, FinishReason::Stop);
    assert_eq!(r.ids.last(), Some(&2), "ends on <|im_end|>");
    assert_eq!(r.text, "The capital of France is Paris.");
}

#[test]
fn stop_string_truncates_the_text_before_it() {
    let r = run_one(SamplingParams {
        stop: vec!["Paris".into()],
        ..greedy()
    });
    assert_eq!(r.reason, FinishReason::Stop);
    assert_eq!(r.text, "The capital of France is ");
    // A stop string that spans tokens: "of Fr" starts inside " of" and ends inside " France".
    let r = run_one(SamplingParams {
        stop: vec!["of Fr".into()],
        ..greedy()
    });
    assert_eq!(r.text, "The capital ");
}

#[test]
fn stop_token_ids_and_max_tokens() {
    // 4649 is " France".
    let r = run_one(SamplingParams {
        stop_token_ids: vec![4649],
        ..greedy()
    });
    assert_eq!((r.reason, r.ids.last()), (FinishReason::Stop, Some(&4649)));
    let r = run_one(SamplingParams {
        max_tokens: 3,
        ..greedy()
    });
    assert_eq!((r.reason, r.ids.len()), (FinishReason::Length, 3));
    assert_eq!(r.text, "The capital of");
    // ignore_eos runs to the limit.
    let r = run_one(SamplingParams {
        max_tokens: 12,
        ignore_eos: true,
        ..greedy()
    });
    assert_eq!((r.reason, r.ids.len()), (FinishReason::Length, 12));
}

#[test]
fn same_seed_same_sample_other_seed_other_sample() {
    let sampled = |seed| {
        run_one(SamplingParams {
            temperature: 1.3,
            top_p: 0.95,
            seed: Some(seed),
            max_tokens: 24,
            ignore_eos: true,
            ..SamplingParams::default()
        })
        .ids
    };
    let a = sampled(7);
    assert_eq!(a, sampled(7));
    assert_ne!(a, sampled(8));
}

#[test]
fn logprobs_come_with_each_token() {
    let m = real_model();
    let mut core = core();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let params = SamplingParams {
        logprobs: Some(3),
        max_tokens: 4,
        ..greedy()
    };
    core.add_request(
        GenerateRequest {
            prompt_ids: capital_prompt(),
            params,
            ..Default::default()
        },
        tx,
    )
    .unwrap();
    while core.has_work() {
        core.step().unwrap();
    }
    let mut tokens = 0;
    while let Ok(ev) = rx.try_recv() {
        if let SeqEvent::Token(t) = ev {
            tokens += 1;
            assert_eq!(t.top_logprobs.len(), 3);
            assert_eq!(
                t.top_logprobs[0].0, t.id,
                "greedy picks the most likely token"
            );
            assert!(t.logprob <= 0.0 && (t.logprob - t.top_logprobs[0].1).abs() < 1e-6);
            assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
    assert_eq!(tokens, 4);
    let _ = m;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_serves_concurrent_requests_and_cancellation_frees_blocks() {
    let (handle, _thread) = EngineHandle::spawn(core()).unwrap();
    let total = handle.stats().await.unwrap().total_blocks;
    let cases = golden_cases();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 10,
        ..SamplingParams::default()
    };
    // The same requests run to completion on a core of their own.
    let mut reference = core();
    let mut runs = Runs::new();
    for case in cases.iter().take(6) {
        runs.add(
            &mut reference,
            GenerateRequest {
                prompt_ids: case.prompt_ids.clone(),
                params: params.clone(),
                ..Default::default()
            },
        );
    }
    let expected_ids = runs.finish(&mut reference);
    let mut tasks = Vec::new();
    for (case, expected) in cases.iter().take(6).zip(expected_ids) {
        let handle = handle.clone();
        let prompt_ids = case.prompt_ids.clone();
        let expected = expected.ids;
        let params = params.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = handle
                .generate(GenerateRequest {
                    prompt_ids,
                    params,
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut ids = Vec::new();
            while let Some(ev) = stream.next().await {
                match ev {
                    SeqEvent::Token(t) => ids.push(t.id),
                    SeqEvent::Finished(_) => break,
                    SeqEvent::Failed(e) => panic!("{e}"),
                }
            }
            assert_eq!(ids, expected);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // A client that goes away mid-generation: its blocks come back.
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 500,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut stream = handle
        .generate(GenerateRequest {
            prompt_ids: capital_prompt(),
            params,
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(stream.next().await, Some(SeqEvent::Token(_))));
    }
    assert!(handle.stats().await.unwrap().free_blocks < total);
    drop(stream);
    let mut stats = handle.stats().await.unwrap();
    while stats.running + stats.waiting > 0 {
        tokio::task::yield_now().await;
        stats = handle.stats().await.unwrap();
    }
    assert_eq!(stats.free_blocks, total);

    // Invalid requests are refused by generate() itself.
    let err = handle
        .generate(GenerateRequest {
            prompt_ids: vec![],
            params: SamplingParams::default(),
            ..Default::default()
        })
        .await;
    assert!(err.is_err());
}
