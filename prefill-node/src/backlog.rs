//! How far behind a prefill node is. The node counts the prompt tokens of the prefills it has
//! taken and not finished; each finished prefill is a sample of how fast it works through them
//! (the tokens that were ahead of it plus its own, over the time from its arrival to its first
//! token). A new prefill whose predicted wait, at the recent rate, would not end within its
//! caller's deadline is refused at once, so the decode node tries elsewhere (or computes the
//! prompt itself) instead of spending the whole deadline in this queue.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Weight of the newest sample in the average rate.
const NEWEST_WEIGHT: f64 = 0.2;

#[derive(Default)]
pub struct Backlog {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Prompt tokens of the prefills taken and not finished.
    in_flight: usize,
    /// Prompt tokens per second, once a prefill has finished.
    rate: Option<f64>,
}

/// A prefill this node took: its tokens count as in flight until it is dropped.
pub struct Taken {
    backlog: Arc<Backlog>,
    /// Its own tokens and those in flight when it was taken.
    tokens: usize,
    ahead: usize,
    arrived: Instant,
}

impl Backlog {
    /// Takes a prefill of `tokens` unless its predicted wait is over `deadline`; then the
    /// predicted wait and the tokens ahead of it. Before the first prefill has finished there
    /// is nothing to predict from, and every prefill is taken.
    pub fn take(
        self: &Arc<Self>,
        tokens: usize,
        deadline: Duration,
    ) -> Result<Taken, (Duration, usize)> {
        let mut state = self.lock();
        let ahead = state.in_flight;
        if let Some(rate) = state.rate {
            let wait = Duration::from_secs_f64((ahead + tokens) as f64 / rate);
            if wait > deadline {
                return Err((wait, ahead));
            }
        }
        state.in_flight += tokens;
        Ok(Taken {
            backlog: self.clone(),
            tokens,
            ahead,
            arrived: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Taken {
    /// Its first token was out `at`, after `computed` of its tokens were run (the rest came
    /// from the prefix cache): a sample of the node's rate.
    pub fn finished(&self, computed: usize, at: Instant) {
        let seconds = at.duration_since(self.arrived).as_secs_f64();
        let work = self.ahead + computed;
        if work == 0 || seconds <= 0.0 {
            return;
        }
        let sample = work as f64 / seconds;
        let mut state = self.backlog.lock();
        state.rate = Some(match state.rate {
            None => sample,
            Some(r) => r + NEWEST_WEIGHT * (sample - r),
        });
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.backlog.lock().in_flight -= self.tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_rate(rate: f64) -> Arc<Backlog> {
        let b = Arc::new(Backlog::default());
        b.lock().rate = Some(rate);
        b
    }

    #[test]
    fn everything_is_taken_until_a_rate_is_known() {
        let b = Arc::new(Backlog::default());
        let taken: Vec<Taken> = (0..10)
            .map(|_| b.take(10_000, Duration::from_millis(1)).ok().unwrap())
            .collect();
        assert_eq!(b.lock().in_flight, 100_000);
        drop(taken);
        assert_eq!(b.lock().in_flight, 0);
    }

    #[test]
    fn a_prefill_that_would_miss_its_deadline_is_refused() {
        let b = with_rate(1_000.0);
        let deadline = Duration::from_secs(2);
        let first = b.take(1_200, deadline).ok().unwrap();
        // 1,200 ahead + 900 = 2.1 s at 1,000 tokens/s.
        let (wait, ahead) = b.take(900, deadline).err().unwrap();
        assert_eq!(ahead, 1_200);
        assert!((wait.as_secs_f64() - 2.1).abs() < 1e-9, "{wait:?}");
        let _second = b.take(700, deadline).ok().unwrap();
        drop(first);
        let _third = b.take(900, deadline).ok().unwrap();
        assert_eq!(b.lock().in_flight, 1_600);
    }

    #[test]
    fn finished_prefills_move_the_rate() {
        let b = with_rate(1_000.0);
        let taken = b.take(500, Duration::from_secs(60)).ok().unwrap();
        // 500 tokens in a quarter of a second: 2,000/s, pulled in by a fifth of the way.
        taken.finished(500, taken.arrived + Duration::from_millis(250));
        assert!((b.lock().rate.unwrap() - 1_200.0).abs() < 1e-6);
        // Nothing computed, nothing ahead: no sample.
        drop(taken);
        let idle = b.take(0, Duration::from_secs(1)).ok().unwrap();
        idle.finished(0, idle.arrived + Duration::from_secs(1));
        assert!((b.lock().rate.unwrap() - 1_200.0).abs() < 1e-6);
    }
}
