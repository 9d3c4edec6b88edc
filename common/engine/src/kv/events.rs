//! What an engine's prefix cache stores and evicts, as numbered events that a router follows to
//! know which node holds which blocks.
//!
//! The engine appends the allocator's changes after each step. Events are numbered from 0 within
//! an incarnation (a random id drawn when the log is made, so a restarted node is a new
//! incarnation). A follower that has applied every event before `n` asks for what follows
//! ([`KvEventLog::since`]); when the log no longer holds those (it keeps the last `capacity`
//! events) or the incarnation changed, the follower resyncs from a [`Snapshot`]: the whole set of
//! cached blocks as of one event number, taken under the same lock as the appends, so it is
//! exact.

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use super::prefix::BlockHash;

/// One change to the prefix cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvEvent {
    /// A computed block joined the cache under this name.
    Stored(BlockHash),
    /// The block of this name was evicted.
    Removed(BlockHash),
}

/// The cache as of event number `next_seq` (every event before it applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub incarnation: u64,
    pub next_seq: u64,
    pub blocks: Vec<BlockHash>,
}

/// What follows event number `n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Events `n..n + events.len()`: all there is so far.
    Events(Vec<KvEvent>),
    /// The log no longer holds event `n` (or `n` is from the future): resync from a snapshot.
    Gap,
}

struct Log {
    /// Number of the first event in `events`.
    first_seq: u64,
    events: VecDeque<KvEvent>,
    /// The cache's blocks after every event so far.
    held: HashSet<BlockHash>,
}

/// The prefix cache's change log of one engine; shared by the engine thread (which appends) and
/// the node's event streams (which read).
pub struct KvEventLog {
    incarnation: u64,
    /// Chain root of the block names (model and KV layout), and tokens per block: a follower
    /// names a prompt's blocks from these.
    root: Option<BlockHash>,
    block_size: usize,
    capacity: usize,
    log: Mutex<Log>,
    /// The number of the next event, after each append.
    next: watch::Sender<u64>,
}

impl KvEventLog {
    /// Events kept for followers that fall behind.
    pub const DEFAULT_CAPACITY: usize = 1 << 16;

    /// `root` is `None` when the engine has no prefix cache (the log then stays empty).
    pub fn new(root: Option<BlockHash>, block_size: usize, capacity: usize) -> Self {
        Self {
            // Never 0, so that 0 can mean "no incarnation known" on the wire.
            incarnation: rand::random::<u64>().max(1),
            root,
            block_size,
            capacity: capacity.max(1),
            log: Mutex::new(Log {
                first_seq: 0,
                events: VecDeque::new(),
                held: HashSet::new(),
            }),
            next: watch::channel(0).0,
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn root(&self) -> Option<BlockHash> {
        self.root
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Appends changes in the order they happened and wakes the followers.
    pub fn append(&self, events: impl IntoIterator<Item = KvEvent>) {
        let mut log = self.lock();
        let before = log.events.len();
        for event in events {
            match event {
                KvEvent::Stored(h) => log.held.insert(h),
                KvEvent::Removed(h) => log.held.remove(&h),
            };
            log.events.push_back(event);
        }
        if log.events.len() == before {
            return;
        }
        while log.events.len() > self.capacity {
            log.events.pop_front();
            log.first_seq += 1;
        }
        let next = log.first_seq + log.events.len() as u64;
        drop(log);
        self.next.send_replace(next);
    }

    /// The events from number `n` on.
    pub fn since(&self, n: u64) -> Since {
        let log = self.lock();
        let next = log.first_seq + log.events.len() as u64;
        if n < log.first_seq || n > next {
            return Since::Gap;
        }
        Since::Events(
            log.events
                .range((n - log.first_seq) as usize..)
                .copied()
                .collect(),
        )
    }

    /// Every cached block now, and the number of the next event.
    pub fn snapshot(&self) -> Snapshot {
        let log = self.lock();
        Snapshot {
            incarnation: self.incarnation,
            next_seq: log.first_seq + log.events.len() as u64,
            blocks: log.held.iter().copied().collect(),
        }
    }

    /// Changes whenever events are appended (to the number of the next event).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.next.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // Appends and reads leave the log whole at every point a panic could occur.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for KvEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvEventLog")
            .field("incarnation", &self.incarnation)
            .field("block_size", &self.block_size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> BlockHash {
        BlockHash([i; 32])
    }

    #[test]
    fn followers_resume_or_resync_and_snapshots_are_exact() {
        let log = KvEventLog::new(Some(h(0)), 16, 4);
        let mut next = log.subscribe();
        log.append([KvEvent::Stored(h(1)), KvEvent::Stored(h(2))]);
        assert!(next.has_changed().unwrap());
        assert_eq!(*next.borrow_and_update(), 2);
        assert_eq!(log.since(1), Since::Events(vec![KvEvent::Stored(h(2))]));
        assert_eq!(log.since(2), Since::Events(vec![]));
        assert_eq!(log.since(3), Since::Gap);
        // Nothing appended: no wake-up.
        log.append([]);
        assert!(!next.has_changed().unwrap());

        log.append([
            KvEvent::Removed(h(1)),
            KvEvent::Stored(h(3)),
            KvEvent::Stored(h(4)),
        ]);
        // Five events, four kept: event 0 is gone.
        assert_eq!(log.since(0), Since::Gap);
        assert_eq!(log.since(4), Since::Events(vec![KvEvent::Stored(h(4))]));
        let mut snap = log.snapshot();
        snap.blocks.sort_by_key(|b| b.0);
        assert_eq!(snap.next_seq, 5);
        assert_eq!(snap.blocks, vec![h(2), h(3), h(4)]);
        assert_eq!(snap.incarnation, log.incarnation());
        assert_ne!(
            KvEventLog::new(None, 16, 4).incarnation(),
            log.incarnation()
        );
    }
}
