//! Disaggregation inside one process, without the network: a prefill engine exports a prompt's KV
//! layer by layer (in chunks, batched with other prompts), a decode engine receives it into
//! blocks it reserved and decodes from there. Greedy output equals the single engine's; a
//! request resumed after k tokens continues exactly as it would have (seeded sampling too); and
//! every block returns to the allocator.

use pd_common::engine::{
    EngineConfig, EngineCore, ExportedKv, GenerateRequest, Placement, SeqEvent, SeqId,
};
use pd_common::sampling::{FinishReason, SampledToken, SamplingParams};
use pd_common::transfer::{chunk_of, decode_chunk_into};
use pd_tests::{golden_cases, real_engine};
use tokio::sync::{mpsc, oneshot};

/// Per-token ids and texts of one request, then how it ended.
#[derive(Debug, Default, PartialEq)]
struct Output {
    ids: Vec<u32>,
    texts: Vec<String>,
    tail: String,
    reason: Option<FinishReason>,
}

impl Output {
    fn text(&self) -> String {
        self.texts.concat() + &self.tail
    }
}

fn run_to_end(core: &mut EngineCore, events: &mut mpsc::UnboundedReceiver<SeqEvent>) -> Output {
    let mut out = Output::default();
    loop {
        while let Ok(event) = events.try_recv() {
            match event {
                SeqEvent::Token(t) => {
                    out.ids.push(t.id);
                    out.texts.push(t.text);
                }
                SeqEvent::Finished(c) => {
                    out.tail = c.text;
                    out.reason = Some(c.reason);
                    return out;
                }
                SeqEvent::Failed(e) => panic!("request failed: {e}"),
            }
        }
        assert!(core.has_work(), "engine idle before the request finished");
        core.step().unwrap();
    }
}

fn single(request: GenerateRequest) -> Output {
    let mut core = real_engine(EngineConfig::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    core.add_request(request, tx).unwrap();
    run_to_end(&mut core, &mut rx)
}

fn assert_all_free(core: &EngineCore) {
    let s = core.stats();
    assert_eq!(s.free_blocks, s.total_blocks, "{s:?}");
}

/// Exports of `requests` submitted together to `prefill` and run until it is idle: each one's
/// layers and its first token.
fn prefill_all(
    prefill: &mut EngineCore,
    requests: &[GenerateRequest],
) -> Vec<(
    mpsc::UnboundedReceiver<ExportedKv>,
    mpsc::UnboundedReceiver<SeqEvent>,
)> {
    let mut exports = Vec::new();
    for r in requests {
        let (sink, exported) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::unbounded_channel();
        prefill
            .submit(r.clone(), Placement::Export(sink), tx)
            .unwrap();
        exports.push((exported, rx));
    }
    while prefill.has_work() {
        prefill.step().unwrap();
    }
    exports
}

/// Prefills `requests` together on one engine (small token budget: chunked and batched, block
/// boundaries falling inside chunks) and decodes each on a second engine from the shipped KV,
/// checking that every block of every layer was shipped exactly once (a KV receiver refuses a
/// block that arrives twice). With `warm`, the prefill engine has computed the prompts once
/// before: its prefix cache holds them, and what it ships comes from there.
fn disaggregated(requests: &[GenerateRequest], warm: bool) -> Vec<Output> {
    let small_budget = EngineConfig {
        max_batch_tokens: 48,
        ..EngineConfig::default()
    };
    let mut prefill = real_engine(small_budget);
    if warm {
        prefill_all(&mut prefill, requests);
        assert!(prefill.stats().cached_blocks > 0);
    }
    let hits_before = prefill.stats().prefix_cache_hits;
    let mut decode = real_engine(EngineConfig::default());

    let mut pending: Vec<(
        SeqId,
        mpsc::UnboundedReceiver<SeqEvent>,
        oneshot::Receiver<Vec<u32>>,
    )> = Vec::new();
    for r in requests {
        let (reserved_tx, reserved) = oneshot::channel();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = decode
            .submit(r.clone(), Placement::Remote(reserved_tx), tx)
            .unwrap();
        pending.push((id, rx, reserved));
    }
    // Admission reserves the blocks; nothing is computed on the decode side yet.
    assert_eq!(decode.step().unwrap(), 0);
    assert_eq!(decode.stats().awaiting_kv, requests.len());

    let exports = prefill_all(&mut prefill, requests);
    assert_all_free(&prefill);
    let hits = prefill.stats().prefix_cache_hits - hits_before;
    // (Cold, a prompt may still find the chat template's opening that an earlier one cached.)
    assert!(
        !warm || hits > 0,
        "no prefix cache hits on the warm prefill engine"
    );
    let layers = prefill.model().config().num_layers;

    let mut outputs = Vec::new();
    for ((id, events, mut reserved), (mut exported, mut first)) in pending.into_iter().zip(exports)
    {
        let blocks = reserved.try_recv().expect("blocks reserved");
        let mut shipped = std::collections::HashSet::new();
        while let Ok(kv) = exported.try_recv() {
            for b in kv.first_block..kv.first_block + kv.num_blocks {
                assert!(
                    shipped.insert((kv.layer, b)),
                    "layer {} block {b} twice",
                    kv.layer
                );
            }
            let chunk = chunk_of(&kv).unwrap();
            decode_chunk_into(decode.cache(), &chunk, &blocks).unwrap();
        }
        assert_eq!(
            shipped.len(),
            layers * blocks.len(),
            "every block of every layer"
        );
        let token = match first.try_recv() {
            Ok(SeqEvent::Token(t)) => SampledToken {
                id: t.id,
                logprob: t.logprob,
                top_logprobs: t.top_logprobs,
            },
            other => panic!("expected the first token, got {other:?}"),
        };
        decode.activate(id, token).unwrap();
        outputs.push(events);
    }
    let results = outputs
        .into_iter()
        .map(|mut events| run_to_end(&mut decode, &mut events))
        .collect::<Vec<_>>();
    while decode.has_work() {
        decode.step().unwrap();
    }
    assert_all_free(&decode);
    results
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    }
}

#[test]
fn shipped_kv_decodes_to_the_single_engine_greedy_output() {
    let cases = golden_cases();
    let requests: Vec<GenerateRequest> = ["en_capital", "long_600", "zh_instruction", "one_token"]
        .iter()
        .map(|name| {
            let case = cases.iter().find(|c| &c.name == name).unwrap();
            GenerateRequest {
                prompt_ids: case.prompt_ids.clone(),
                params: greedy(24),
                ..Default::default()
            }
        })
        .collect();
    for warm in [false, true] {
        let got = disaggregated(&requests, warm);
        for (request, got) in requests.iter().zip(got) {
            let want = single(request.clone());
            assert_eq!(got.ids, want.ids, "warm prefix cache: {warm}");
            assert_eq!(got.text(), want.text());
            assert_eq!(got.reason, want.reason);
        }
    }
}

#[test]
fn a_resumed_request_continues_exactly_where_it_stopped() {
    let prompt = golden_cases()
        .into_iter()
        .find(|c| c.name == "zh_instruction")
        .unwrap()
        .prompt_ids;
    let sampled = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(1234),
        max_tokens: 20,
        presence_penalty: 0.5,
        ..SamplingParams::default()
    };
    for params in [greedy(20), sampled] {
        let full = single(GenerateRequest {
            prompt_ids: prompt.clone(),
            params: params.clone(),
            ..Default::default()
        });
        for k in [1, 6, 13] {
            let resumed = single(GenerateRequest {
                prompt_ids: prompt.clone(),
                params: params.clone(),
                resume_ids: full.ids[..k].to_vec(),
            });
            assert_eq!(resumed.ids, full.ids[k..], "resumed after {k}");
            // Text already delivered plus the resumed text is the whole text, nothing repeated.
            let before: String = full.texts[..k].concat();
            assert_eq!(before + &resumed.text(), full.text(), "resumed after {k}");
            assert_eq!(resumed.reason, full.reason);
        }
    }
}

#[test]
fn a_reservation_given_up_computes_locally_or_frees_its_blocks() {
    let prompt = golden_cases()[0].prompt_ids.clone();
    let request = GenerateRequest {
        prompt_ids: prompt,
        params: greedy(8),
        ..Default::default()
    };
    let want = single(request.clone());
    let mut core = real_engine(EngineConfig::default());

    // Prefilled locally in the reserved blocks after the remote attempt failed.
    let (reserved_tx, mut reserved) = oneshot::channel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = core
        .submit(request.clone(), Placement::Remote(reserved_tx), tx)
        .unwrap();
    core.step().unwrap();
    assert!(reserved.try_recv().is_ok());
    core.prefill_locally(id).unwrap();
    assert_eq!(run_to_end(&mut core, &mut rx).ids, want.ids);
    assert_all_free(&core);

    // Aborted while awaiting KV: the reservation is freed.
    let (reserved_tx, _reserved) = oneshot::channel();
    let (tx, _rx) = mpsc::unbounded_channel();
    let id = core
        .submit(request.clone(), Placement::Remote(reserved_tx), tx)
        .unwrap();
    core.step().unwrap();
    assert!(core.stats().free_blocks < core.stats().total_blocks);
    assert!(core.abort(id));
    assert_all_free(&core);

    // Whoever asked for the reservation went away before it was made: nothing is held.
    let (reserved_tx, reserved) = oneshot::channel();
    drop(reserved);
    let (tx, _rx) = mpsc::unbounded_channel();
    core.submit(request, Placement::Remote(reserved_tx), tx)
        .unwrap();
    core.step().unwrap();
    assert_all_free(&core);
    assert!(core
        .activate(
            id,
            SampledToken {
                id: 1,
                logprob: 0.0,
                top_logprobs: vec![]
            }
        )
        .is_err());
}
