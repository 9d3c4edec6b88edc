//! A discrete-event model of a cluster: the router, prefill nodes, KV transfer and decode nodes
//! with continuous batching, timed by a device [`Profile`].
//!
//! - The router sends a request to the decode node with the fewest sequences (running and
//!   waiting) and, disaggregated, to the prefill node with the fewest prompt tokens queued.
//! - A prefill node runs steps of at most `max_batch_tokens` prompt tokens, first come first
//!   served, a long prompt in chunks; the step that finishes a prompt samples its first token.
//! - Its KV then crosses the link (`latency + bytes / rate`) and the first token reaches the
//!   client with it; the sequence joins the decode node's next step.
//! - A decode node steps while it has sequences, at most `max_num_seqs` of them, each step one
//!   token for each. An aggregated node (no prefill nodes) also fills what is left of the step's
//!   token budget with prompt chunks, as the engine's scheduler does.
//! - Nodes placed on one host whose profile says `shared_host` share its compute: with k of
//!   them busy, each runs at 1/k of its speed (processor sharing). Otherwise each node has its
//!   own device.
//!
//! The output is one [`RequestOutput`] per request, as the load generator records them, so the
//! same function turns predictions and measurements into the same result keys.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use super::profile::{Link, Profile};
use crate::bench::serve::client::RequestOutput;

/// A cluster's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    /// 0: aggregated (decode nodes prefill their own prompts).
    pub prefill: usize,
    pub decode: usize,
    /// Nodes per host sharing its compute (with a `shared_host` profile); 0: all on one host.
    pub nodes_per_host: usize,
}

/// One request of the workload: when the client sends it, its prompt and output lengths.
#[derive(Debug, Clone, Copy)]
pub struct SimRequest {
    pub send_at: f64,
    pub prompt_len: usize,
    pub output_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EventKind {
    /// The client has the request (it may wait for a --max-concurrency slot).
    Arrival(usize),
    /// The client sends it.
    Send(usize),
    KvArrived(usize),
}

/// A step in progress on a node: the solo seconds of work left, and what it computes.
struct Step {
    remaining: f64,
    /// Prefill chunks: (request, start, len).
    chunks: Vec<(usize, usize, usize)>,
    /// Requests decoding in this step.
    decoding: Vec<usize>,
}

#[derive(Default)]
struct Node {
    /// Prompts waiting for prefill, with the tokens of each already computed.
    prefill_queue: VecDeque<(usize, usize)>,
    queued_tokens: usize,
    /// Sequences admitted to decode and those waiting for a slot.
    running: Vec<usize>,
    waiting: VecDeque<usize>,
    step: Option<Step>,
    host: usize,
    /// Decode node: sequences the router has sent here that have not finished (the router's
    /// measure of its load).
    assigned: usize,
}

struct Seq {
    prompt_len: usize,
    output_len: usize,
    /// Tokens delivered to the client so far (with their times).
    token_times: Vec<f64>,
    decode_node: usize,
    sent_at: f64,
}

/// Predicts what each request of `requests` sees on `layout`; `link` is the KV backend used
/// between prefill and decode nodes; at most `max_concurrency` requests are in flight (the
/// others wait at the client, as the load generator's do).
pub fn simulate(
    profile: &Profile,
    layout: Layout,
    link: Option<Link>,
    requests: &[SimRequest],
    max_concurrency: Option<usize>,
) -> anyhow::Result<Vec<RequestOutput>> {
    anyhow::ensure!(layout.decode > 0, "a cluster needs a decode node");
    let link = match (layout.prefill, link) {
        (0, _) => None,
        (_, Some(l)) => Some(l),
        (_, None) => anyhow::bail!("a disaggregated layout needs a KV link"),
    };
    let n_nodes = layout.prefill + layout.decode;
    let per_host = if layout.nodes_per_host == 0 {
        n_nodes
    } else {
        layout.nodes_per_host
    };
    // Prefill nodes first, then decode nodes; hosts filled in that order.
    let mut nodes: Vec<Node> = (0..n_nodes)
        .map(|i| Node {
            host: if profile.shared_host { i / per_host } else { i },
            ..Node::default()
        })
        .collect();
    let decode_ids: Vec<usize> = (layout.prefill..n_nodes).collect();
    let mut seqs: Vec<Seq> = requests
        .iter()
        .map(|r| Seq {
            prompt_len: r.prompt_len.max(1),
            output_len: r.output_len.max(1),
            token_times: Vec::new(),
            decode_node: usize::MAX,
            sent_at: r.send_at,
        })
        .collect();
    let mut events: BinaryHeap<Reverse<(OrdF64, EventKind)>> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| Reverse((OrdF64(r.send_at), EventKind::Arrival(i))))
        .collect();
    let budget = profile.max_batch_tokens.max(1);
    let max_seqs = profile.max_num_seqs.max(1);
    let cap = max_concurrency.unwrap_or(usize::MAX).max(1);
    let (mut in_flight, mut pending) = (0usize, VecDeque::new());
    let mut finished: Vec<usize> = Vec::new();
    let mut now = 0.0f64;
    loop {
        // Requests that finished free their client slots.
        for _ in finished.drain(..) {
            in_flight -= 1;
            if let Some(j) = pending.pop_front() {
                in_flight += 1;
                events.push(Reverse((OrdF64(now), EventKind::Send(j))));
            }
        }
        // Idle nodes with work start a step.
        for node in nodes.iter_mut() {
            if node.step.is_none() {
                node.step = plan_step(node, profile, budget, max_seqs, &seqs);
            }
        }
        let rates = rates(&nodes, profile.shared_slowdown);
        let next_step = nodes
            .iter()
            .zip(&rates)
            .filter_map(|(n, &r)| n.step.as_ref().map(|s| now + s.remaining / r))
            .fold(f64::INFINITY, f64::min);
        let next_event = events.peek().map_or(f64::INFINITY, |Reverse((t, _))| t.0);
        let t = next_step.min(next_event);
        if !t.is_finite() {
            if finished.is_empty() {
                break;
            }
            continue;
        }
        for (node, &r) in nodes.iter_mut().zip(&rates) {
            if let Some(s) = &mut node.step {
                s.remaining -= (t - now) * r;
            }
        }
        now = t;
        if next_event <= next_step {
            // Every event of this instant before any node plans its next step.
            while let Some(&Reverse((at, kind))) = events.peek() {
                if at.0 > now {
                    break;
                }
                events.pop();
                match kind {
                    EventKind::Arrival(i) => {
                        if in_flight < cap {
                            in_flight += 1;
                            events.push(Reverse((OrdF64(now), EventKind::Send(i))));
                        } else {
                            pending.push_back(i);
                        }
                    }
                    EventKind::Send(i) => {
                        seqs[i].sent_at = now;
                        let d = *decode_ids
                            .iter()
                            .min_by_key(|&&d| nodes[d].assigned)
                            .expect("a decode node");
                        seqs[i].decode_node = d;
                        nodes[d].assigned += 1;
                        let p = if layout.prefill == 0 {
                            d
                        } else {
                            (0..layout.prefill)
                                .min_by_key(|&p| nodes[p].queued_tokens)
                                .expect("a prefill node")
                        };
                        nodes[p].prefill_queue.push_back((i, 0));
                        nodes[p].queued_tokens += seqs[i].prompt_len;
                    }
                    EventKind::KvArrived(i) => {
                        seqs[i].token_times.push(now);
                        let d = seqs[i].decode_node;
                        if seqs[i].output_len > 1 {
                            nodes[d].waiting.push_back(i);
                        } else {
                            nodes[d].assigned -= 1;
                            finished.push(i);
                        }
                    }
                }
            }
            continue;
        }
        // Steps that end now.
        for node in nodes.iter_mut() {
            // A nanosecond of solo work left is rounding, not work.
            let done = node.step.as_ref().is_some_and(|s| s.remaining <= 1e-9);
            if !done {
                continue;
            }
            let Some(step) = node.step.take() else {
                continue;
            };
            for &i in &step.decoding {
                seqs[i].token_times.push(now);
            }
            let before = node.running.len();
            node.running.retain(|&i| {
                let more = seqs[i].token_times.len() < seqs[i].output_len;
                if !more {
                    finished.push(i);
                }
                more
            });
            node.assigned -= before - node.running.len();
            for &(i, start, len) in &step.chunks {
                if start + len < seqs[i].prompt_len {
                    continue; // more chunks to come; already requeued at the front
                }
                node.queued_tokens -= seqs[i].prompt_len.min(node.queued_tokens);
                match link {
                    // Aggregated: the first token is out, and decoding starts next step.
                    None => {
                        seqs[i].token_times.push(now);
                        if seqs[i].output_len > 1 {
                            node.waiting.push_back(i);
                        } else {
                            node.assigned -= 1;
                            finished.push(i);
                        }
                    }
                    Some(l) => {
                        let bytes = profile.kv_bytes_per_token * seqs[i].prompt_len as f64;
                        let at = now + l.latency_s + bytes / l.bytes_per_s;
                        events.push(Reverse((OrdF64(at), EventKind::KvArrived(i))));
                    }
                }
            }
        }
    }
    Ok(requests
        .iter()
        .zip(&seqs)
        .map(|(r, s)| {
            let times = &s.token_times;
            let sent = s.sent_at;
            let first = times.first().copied().unwrap_or(sent);
            let last = times.last().copied().unwrap_or(sent);
            RequestOutput {
                success: times.len() == s.output_len,
                output_tokens: Some(times.len()),
                ttft: first - sent,
                itl: times.windows(2).map(|w| w[1] - w[0]).collect(),
                latency: last - sent,
                start_time: sent,
                prompt_len: r.prompt_len,
                error: if times.len() == s.output_len {
                    String::new()
                } else {
                    format!("simulated {} of {} tokens", times.len(), s.output_len)
                },
                ..RequestOutput::default()
            }
        })
        .collect())
}

/// The next step of a node, or None if it has nothing to do: the running sequences (topped up
/// from the waiting ones) decode, and prompt chunks fill the rest of the token budget.
fn plan_step(
    node: &mut Node,
    profile: &Profile,
    budget: usize,
    max_seqs: usize,
    seqs: &[Seq],
) -> Option<Step> {
    while node.running.len() < max_seqs {
        match node.waiting.pop_front() {
            Some(i) => node.running.push(i),
            None => break,
        }
    }
    let decoding = node.running.clone();
    let mut left = budget.saturating_sub(decoding.len());
    let mut chunks = Vec::new();
    while left > 0 {
        let Some((i, done)) = node.prefill_queue.pop_front() else {
            break;
        };
        let len = (seqs[i].prompt_len - done).min(left);
        chunks.push((i, done, len));
        left -= len;
        if done + len < seqs[i].prompt_len {
            node.prefill_queue.push_front((i, done + len));
            break;
        }
    }
    if decoding.is_empty() && chunks.is_empty() {
        return None;
    }
    let ctx: usize = decoding
        .iter()
        .map(|&i| seqs[i].prompt_len + seqs[i].token_times.len())
        .sum();
    let spans: Vec<(usize, usize)> = chunks.iter().map(|&(_, s, n)| (s, n)).collect();
    let remaining = profile.step_overhead(!chunks.is_empty(), !decoding.is_empty())
        + profile.prefill_work(&spans)
        + if decoding.is_empty() {
            0.0
        } else {
            profile.decode_work(decoding.len(), ctx)
        };
    Some(Step {
        remaining: remaining.max(1e-9),
        chunks,
        decoding,
    })
}

/// Each node's speed: 1 alone on its host; with k busy nodes sharing it, each step takes
/// `1 + (k−1)·(slowdown−1)` times as long.
fn rates(nodes: &[Node], slowdown: f64) -> Vec<f64> {
    let hosts = nodes.iter().map(|n| n.host).max().map_or(0, |h| h + 1);
    let mut busy = vec![0usize; hosts];
    for n in nodes.iter().filter(|n| n.step.is_some()) {
        busy[n.host] += 1;
    }
    nodes
        .iter()
        .map(|n| 1.0 / (1.0 + (busy[n.host].max(1) - 1) as f64 * (slowdown - 1.0)))
        .collect()
}

/// f64 with a total order, for the event queue.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF64(f64);

impl Eq for OrdF64 {}

impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::profile::Fit;
    use super::*;

    fn profile(shared: bool) -> Profile {
        Profile {
            device: "test".into(),
            model: "test".into(),
            date: String::new(),
            prefill: Fit {
                a: 0.0,
                b: 0.001,
                c: 0.0,
            },
            prefill_points: vec![],
            decode: Fit {
                a: 0.010,
                b: 0.0,
                c: 0.0,
            },
            decode_base: vec![],
            decode_points: vec![],
            kv_bytes_per_token: 1000.0,
            transfer: Default::default(),
            shared_host: shared,
            shared_slowdown: 2.0,
            max_batch_tokens: 512,
            max_num_seqs: 64,
        }
    }

    fn req(at: f64, p: usize, o: usize) -> SimRequest {
        SimRequest {
            send_at: at,
            prompt_len: p,
            output_len: o,
        }
    }

    #[test]
    fn one_request_costs_its_prefill_transfer_and_steps() {
        let link = Link {
            latency_s: 0.001,
            bytes_per_s: 1e6,
        };
        let layout = Layout {
            prefill: 1,
            decode: 1,
            nodes_per_host: 1,
        };
        let out = simulate(
            &profile(false),
            layout,
            Some(link),
            &[req(1.0, 100, 5)],
            None,
        )
        .unwrap();
        let o = &out[0];
        assert!(o.success);
        // 100 tokens at 1 ms, then 1 ms + 100 kB at 1 MB/s.
        assert!((o.ttft - (0.1 + 0.001 + 0.1)).abs() < 1e-9, "{}", o.ttft);
        assert_eq!(o.itl.len(), 4);
        assert!(
            o.itl.iter().all(|g| (g - 0.010).abs() < 1e-9),
            "{:?}",
            o.itl
        );
    }

    #[test]
    fn aggregated_steps_mix_prefill_and_decode() {
        let layout = Layout {
            prefill: 0,
            decode: 1,
            nodes_per_host: 1,
        };
        let out = simulate(
            &profile(false),
            layout,
            None,
            &[req(0.0, 100, 3), req(0.0, 100, 3)],
            None,
        )
        .unwrap();
        // Both prompts in the first step (200 tokens, 0.2 s), then two decode steps.
        for o in &out {
            assert!((o.ttft - 0.2).abs() < 1e-9, "{}", o.ttft);
            assert!((o.latency - 0.22).abs() < 1e-9, "{}", o.latency);
        }
        // A long prompt is chunked by the token budget: 600 tokens in two steps.
        let out = simulate(&profile(false), layout, None, &[req(0.0, 600, 1)], None).unwrap();
        assert!((out[0].ttft - 0.6).abs() < 1e-9);
    }

    #[test]
    fn nodes_sharing_a_host_slow_each_other() {
        let link = Link {
            latency_s: 0.0,
            bytes_per_s: f64::INFINITY,
        };
        let reqs = [req(0.0, 100, 1), req(0.0, 100, 1)];
        let own = Layout {
            prefill: 2,
            decode: 1,
            nodes_per_host: 1,
        };
        let out = simulate(&profile(true), own, Some(link), &reqs, None).unwrap();
        assert!(
            out.iter().all(|o| (o.ttft - 0.1).abs() < 1e-9),
            "each on its own host"
        );
        let shared = Layout {
            prefill: 2,
            decode: 1,
            nodes_per_host: 0,
        };
        let out = simulate(&profile(true), shared, Some(link), &reqs, None).unwrap();
        assert!(
            out.iter().all(|o| (o.ttft - 0.2).abs() < 1e-9),
            "two busy nodes on one host: half speed"
        );
    }

    #[test]
    fn decode_batches_are_capped_by_max_num_seqs() {
        let mut p = profile(false);
        p.max_num_seqs = 2;
        let layout = Layout {
            prefill: 0,
            decode: 1,
            nodes_per_host: 1,
        };
        let reqs: Vec<SimRequest> = (0..4).map(|_| req(0.0, 10, 3)).collect();
        let out = simulate(&p, layout, None, &reqs, None).unwrap();
        assert!(out.iter().all(|o| o.success));
        let mut ends: Vec<f64> = out.iter().map(|o| o.latency).collect();
        ends.sort_by(f64::total_cmp);
        assert!(
            ends[3] > ends[0] + 0.015,
            "the last two waited for slots: {ends:?}"
        );
    }

    #[test]
    fn max_concurrency_holds_requests_at_the_client() {
        let layout = Layout {
            prefill: 0,
            decode: 1,
            nodes_per_host: 1,
        };
        let reqs: Vec<SimRequest> = (0..4).map(|_| req(0.0, 10, 2)).collect();
        let out = simulate(&profile(false), layout, None, &reqs, Some(1)).unwrap();
        // One at a time: 10 ms prefill + 10 ms decode each, sent as the previous one ends.
        let mut starts: Vec<f64> = out.iter().map(|o| o.start_time).collect();
        starts.sort_by(f64::total_cmp);
        for (k, s) in starts.iter().enumerate() {
            assert!((s - 0.02 * k as f64).abs() < 1e-9, "{starts:?}");
        }
        assert!(
            out.iter().all(|o| (o.ttft - 0.01).abs() < 1e-9),
            "timed from sending"
        );
    }
}
