//! Disaggregation inside one process, without the network: a prefill engine exports a prompt's KV
//! layer by layer (in chunks, batched with other prompts), a decode engine receives it into
//! blocks it reserved and decodes from there. Greedy output equals the single engine's, also
//! when the decode engine's prefix cache holds part of a prompt (only the rest is shipped) or all
//! of it (nothing is); a request resumed after k tokens continues exactly as it would have
//! (seeded sampling too); and every block returns to the allocator.

use pd_common::engine::{
    EngineConfig, EngineCore, ExportedKv, GenerateRequest, Placement, Reservation, SeqEvent,
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
    /// Prompt tokens the engine's prefix cache supplied.
    cached_tokens: usize,
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
                    out.cached_tokens = c.cached_tokens;
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

/// Exports of `requests` submitted together to `prefill` and run until it is idle, each from its
/// block in `from_blocks`: each one's layers and its first token.
fn prefill_all(
    prefill: &mut EngineCore,
    requests: &[GenerateRequest],
    from_blocks: &[usize],
) -> Vec<(
    mpsc::UnboundedReceiver<ExportedKv>,
    mpsc::UnboundedReceiver<SeqEvent>,
)> {
    let mut exports = Vec::new();
    for (r, &from_block) in requests.iter().zip(from_blocks) {
        let (sink, exported) = mpsc::unbounded_channel();
        let (tx, rx) = mpsc::unbounded_channel();
        let placement = Placement::Export { sink, from_block };
        prefill.submit(r.clone(), placement, tx).unwrap();
        exports.push((exported, rx));
    }
    while prefill.has_work() {
        prefill.step().unwrap();
    }
    exports
}

/// Prefills `requests` together on one engine (small token budget: chunked and batched, block
/// boundaries falling inside chunks) and decodes each on a second engine from the shipped KV,
/// checking that every reserved block of every layer was shipped exactly once (a KV receiver
/// refuses a block that arrives twice). With `warm`, the prefill engine has computed the prompts
/// once before: its prefix cache holds them, and what it ships comes from there. The decode
/// engine first runs `decode_seen` itself: what its prefix cache then holds of a prompt is
/// neither reserved nor shipped. Returns each request's output and reservation.
fn disaggregated(
    requests: &[GenerateRequest],
    warm: bool,
    decode_seen: &[GenerateRequest],
) -> Vec<(Output, Reservation)> {
    let small_budget = EngineConfig {
        max_batch_tokens: 48,
        ..EngineConfig::default()
    };
    let mut prefill = real_engine(small_budget);
    if warm {
        prefill_all(&mut prefill, requests, &vec![0; requests.len()]);
        assert!(prefill.stats().cached_blocks > 0);
    }
    let hits_before = prefill.stats().prefix_cache_hits;
    let mut decode = real_engine(EngineConfig::default());
    for r in decode_seen {
        let (tx, mut rx) = mpsc::unbounded_channel();
        decode.add_request(r.clone(), tx).unwrap();
        run_to_end(&mut decode, &mut rx);
    }

    let mut submitted = Vec::new();
    for r in requests {
        let (reserved_tx, reserved) = oneshot::channel();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = decode
            .submit(r.clone(), Placement::Remote(reserved_tx), tx)
            .unwrap();
        submitted.push((id, rx, reserved));
    }
    // Admission decides what is fetched; only prompts the cache holds are computed here.
    let computed = decode.step().unwrap();
    let pending: Vec<_> = submitted
        .into_iter()
        .map(|(id, rx, mut reserved)| (id, rx, reserved.try_recv().expect("admitted")))
        .collect();
    let fetched: Vec<usize> = (0..requests.len())
        .filter(|&i| matches!(pending[i].2, Reservation::Fill { .. }))
        .collect();
    assert_eq!(decode.stats().awaiting_kv, fetched.len());
    assert_eq!(computed == 0, fetched.len() == requests.len());

    let to_prefill: Vec<GenerateRequest> = fetched.iter().map(|&i| requests[i].clone()).collect();
    let from_blocks: Vec<usize> = fetched
        .iter()
        .map(|&i| match &pending[i].2 {
            Reservation::Fill { first_block, .. } => *first_block,
            Reservation::Local => unreachable!(),
        })
        .collect();
    let mut exports = prefill_all(&mut prefill, &to_prefill, &from_blocks).into_iter();
    assert_all_free(&prefill);
    let hits = prefill.stats().prefix_cache_hits - hits_before;
    // (Cold, a prompt may still find the chat template's opening that an earlier one cached.)
    assert!(
        !warm || hits > 0,
        "no prefix cache hits on the warm prefill engine"
    );
    let layers = prefill.model().config().num_layers;

    let mut outputs = Vec::new();
    for (id, events, reservation) in pending {
        let Reservation::Fill { blocks, .. } = &reservation else {
            // Computed on the decode engine: its cache held the prompt.
            outputs.push((events, reservation));
            continue;
        };
        let (mut exported, mut first) = exports.next().expect("an export per fetched prompt");
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
            decode_chunk_into(decode.cache(), &chunk, blocks).unwrap();
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
        outputs.push((events, reservation));
    }
    let results = outputs
        .into_iter()
        .map(|(mut events, reservation)| (run_to_end(&mut decode, &mut events), reservation))
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
        let got = disaggregated(&requests, warm, &[]);
        for (request, (got, reservation)) in requests.iter().zip(got) {
            let want = single(request.clone());
            assert_eq!(got.ids, want.ids, "warm prefix cache: {warm}");
            assert_eq!(got.text(), want.text());
            assert_eq!(got.reason, want.reason);
            assert!(
                matches!(reservation, Reservation::Fill { first_block: 0, .. }),
                "{reservation:?}"
            );
        }
    }
}

#[test]
fn a_decode_engine_fetches_only_the_blocks_its_prefix_cache_lacks() {
    let cases = golden_cases();
    let prompt = |name: &str| {
        cases
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .prompt_ids
            .clone()
    };
    let long = prompt("long_600");
    let shared = &long[..long.len() - 8];
    let request = |tail: &str| GenerateRequest {
        prompt_ids: [shared, &prompt(tail)].concat(),
        params: greedy(16),
        ..Default::default()
    };
    // The decode engine has run the first: the second shares its beginning, the third is it.
    let seen = request("en_capital");
    let requests = [request("zh_instruction"), seen.clone()];
    for warm in [false, true] {
        let got = disaggregated(&requests, warm, std::slice::from_ref(&seen));
        let common = pd_tests::match_len(&requests[0].prompt_ids, &seen.prompt_ids);
        for (i, (request, (got, reservation))) in requests.iter().zip(got).enumerate() {
            let want = single(request.clone());
            assert_eq!(got.ids, want.ids, "request {i}, warm prefill cache: {warm}");
            assert_eq!(got.text(), want.text());
            assert_eq!(got.reason, want.reason);
            let len = request.prompt_ids.len();
            match (i, reservation) {
                (0, Reservation::Fill { first_block, .. }) => {
                    assert_eq!(first_block, common / 16);
                    assert_eq!(got.cached_tokens, common / 16 * 16);
                }
                (1, Reservation::Local) => assert_eq!(got.cached_tokens, (len - 1) / 16 * 16),
                (i, r) => panic!("request {i}: {r:?}"),
            }
        }
    }

    // The remote prefill fails: the decode engine computes the rest itself, after what its
    // cache holds (whose shared blocks it must not write).
    let mut decode = real_engine(EngineConfig::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    decode.add_request(seen.clone(), tx).unwrap();
    run_to_end(&mut decode, &mut rx);
    let (reserved_tx, mut reserved) = oneshot::channel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = decode
        .submit(requests[0].clone(), Placement::Remote(reserved_tx), tx)
        .unwrap();
    decode.step().unwrap();
    assert!(matches!(
        reserved.try_recv(),
        Ok(Reservation::Fill { first_block, .. }) if first_block > 0
    ));
    decode.prefill_locally(id).unwrap();
    let got = run_to_end(&mut decode, &mut rx);
    assert_eq!(got.ids, single(requests[0].clone()).ids);
    // `seen` again: its blocks were not overwritten.
    let (tx, mut rx) = mpsc::unbounded_channel();
    decode.add_request(seen.clone(), tx).unwrap();
    assert_eq!(run_to_end(&mut decode, &mut rx).ids, single(seen).ids);
    assert_all_free(&decode);
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
    // The prompt repeats: without a prefix cache each submission reserves blocks again.
    let mut core = real_engine(EngineConfig {
        enable_prefix_caching: false,
        ..EngineConfig::default()
    });

    // Prefilled locally in the reserved blocks after the remote attempt failed.
    let (reserved_tx, mut reserved) = oneshot::channel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = core
        .submit(request.clone(), Placement::Remote(reserved_tx), tx)
        .unwrap();
    core.step().unwrap();
    assert!(matches!(reserved.try_recv(), Ok(Reservation::Fill { .. })));
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
