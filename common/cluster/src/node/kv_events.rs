//! `Node.KvEvents`: what a node's prefix cache stores and evicts, streamed to routers so they
//! can send a prompt where its KV already is.
//!
//! A stream starts with a snapshot of the whole cache, unless the caller names the incarnation
//! and event number it stopped at and the engine's log still holds what follows; then it sends
//! each step's changes as they are published. A caller that falls behind what the log keeps gets
//! a fresh snapshot. The stream ends when the caller goes away or the node starts to shut down.

use std::pin::Pin;
use std::sync::Arc;

use pd_engine::kv::events::{KvEvent, KvEventLog, Since, Snapshot};
use pd_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub type KvEventStream = Pin<Box<dyn Stream<Item = Result<pb::KvEventBatch, Status>> + Send>>;

/// Events per message at most (a snapshot goes in one message, whatever its size).
const BATCH: usize = 4096;

/// Streams `log` to one caller until it goes away or `stop` is cancelled.
pub fn kv_event_stream(
    log: Arc<KvEventLog>,
    request: pb::KvEventsRequest,
    stop: CancellationToken,
) -> KvEventStream {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut changed = log.subscribe();
        let resumable = request.incarnation != 0 && request.incarnation == log.incarnation();
        let mut next = resumable.then_some(request.next_seq);
        loop {
            // Marked seen before reading: an append after this point wakes the wait below.
            changed.borrow_and_update();
            let batches = match next.map(|n| (n, log.since(n))) {
                Some((n, Since::Events(events))) => {
                    next = Some(n + events.len() as u64);
                    events
                        .chunks(BATCH)
                        .enumerate()
                        .map(|(i, chunk)| batch(&log, false, n + (i * BATCH) as u64, chunk))
                        .collect()
                }
                None | Some((_, Since::Gap)) => {
                    let Snapshot {
                        next_seq, blocks, ..
                    } = log.snapshot();
                    next = Some(next_seq);
                    let stored: Vec<KvEvent> = blocks.into_iter().map(KvEvent::Stored).collect();
                    vec![batch(&log, true, next_seq, &stored)]
                }
            };
            for b in batches {
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                r = changed.changed() => if r.is_err() { return },
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn batch(log: &KvEventLog, snapshot: bool, first_seq: u64, events: &[KvEvent]) -> pb::KvEventBatch {
    pb::KvEventBatch {
        incarnation: log.incarnation(),
        snapshot,
        first_seq,
        events: events
            .iter()
            .map(|e| match e {
                KvEvent::Stored(h) => pb::KvEvent {
                    block_hash: h.0.to_vec(),
                    removed: false,
                },
                KvEvent::Removed(h) => pb::KvEvent {
                    block_hash: h.0.to_vec(),
                    removed: true,
                },
            })
            .collect(),
        root: log.root().map(|r| r.0.to_vec()).unwrap_or_default(),
        block_size: log.block_size() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_engine::kv::BlockHash;
    use tokio_stream::StreamExt;

    fn h(i: u8) -> BlockHash {
        BlockHash([i; 32])
    }

    #[tokio::test]
    async fn a_snapshot_then_each_change_and_a_resume_skips_the_snapshot() {
        let log = Arc::new(KvEventLog::new(Some(h(0)), 16, 8));
        log.append([KvEvent::Stored(h(1))]);
        let stop = CancellationToken::new();
        let mut s = kv_event_stream(log.clone(), pb::KvEventsRequest::default(), stop.clone());
        let first = s.next().await.unwrap().unwrap();
        assert!(first.snapshot);
        assert_eq!((first.first_seq, first.events.len()), (1, 1));
        assert_eq!(first.root, vec![0; 32]);
        assert_eq!(first.block_size, 16);
        log.append([KvEvent::Removed(h(1)), KvEvent::Stored(h(2))]);
        let next = s.next().await.unwrap().unwrap();
        assert!(!next.snapshot);
        assert_eq!(next.first_seq, 1);
        assert!(next.events[0].removed && !next.events[1].removed);
        assert_eq!(next.events[1].block_hash, vec![2; 32]);
        stop.cancel();
        assert!(s.next().await.is_none(), "the stream ends with the node");

        // Resuming at event 3 of this incarnation (events 0..3 seen): just what follows, sent
        // when it happens (a resume with nothing new sends nothing).
        let request = pb::KvEventsRequest {
            incarnation: log.incarnation(),
            next_seq: 3,
        };
        let mut s = kv_event_stream(log.clone(), request, CancellationToken::new());
        log.append([KvEvent::Stored(h(3))]);
        let got = s.next().await.unwrap().unwrap();
        assert!(!got.snapshot);
        assert_eq!(got.first_seq, 3);
        assert_eq!(got.events.len(), 1);
        assert_eq!(got.events[0].block_hash, vec![3; 32]);

        // Another incarnation's position: a snapshot.
        let request = pb::KvEventsRequest {
            incarnation: log.incarnation() ^ 1,
            next_seq: 2,
        };
        let mut s = kv_event_stream(log, request, CancellationToken::new());
        let got = s.next().await.unwrap().unwrap();
        assert!(got.snapshot);
        assert_eq!(got.events.len(), 2);
    }
}
