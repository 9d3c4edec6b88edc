//! How far behind a prefill node is. The node counts the prompt tokens of the prefills it has
//! taken and not finished; each finished prefill is a sample of how fast it works through them
//! (the tokens that were ahead of it plus its own, over the time from its arrival to its first
//! token), and so is one that ran out of its deadline (it took at least that long: a rate at
//! most that high). A new prefill whose predicted wait, at the recent rate, would not end within
//! its caller's deadline is refused at once, so the decode node tries elsewhere (or computes the
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
    deadline: Duration,
    /// Its first token is out (and was counted as a sample).
    done: bool,
}

impl Backlog {
    /// Takes a prefill of `tokens` unless its predicted wait is over `deadline`; then the
    /// predicted wait and the tokens ahead of it. Before the first prefill has finished there
    /// is nothing to predict from, and every prefill is taken; so is one with nothing ahead of
    /// it, whatever the rate says, so that an idle node always measures itself again (a rate
    /// once too low would otherwise refuse everything for ever).
    pub fn take(
        self: &Arc<Self>,
        tokens: usize,
        deadline: Duration,
    ) -> Result<Taken, (Duration, usize)> {
        let mut state = self.lock();
        let ahead = state.in_flight;
        if let Some(rate) = state.rate.filter(|_| ahead > 0) {
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
            deadline,
            done: false,
        })
    }

    /// `work` prompt tokens were got through in `took`.
    fn sample(&self, work: usize, took: Duration) {
        let seconds = took.as_secs_f64();
        if work == 0 || seconds <= 0.0 {
            return;
        }
        let sample = work as f64 / seconds;
        let mut state = self.lock();
        state.rate = Some(match state.rate {
            None => sample,
            Some(r) => r + NEWEST_WEIGHT * (sample - r),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Taken {
    /// Its first token was out `at`, after `computed` of its tokens were run (the rest came
    /// from the prefix cache): a sample of the node's rate.
    pub fn finished(&mut self, computed: usize, at: Instant) {
        self.done = true;
        self.backlog
            .sample(self.ahead + computed, at.duration_since(self.arrived));
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        // Gone unfinished at its deadline: the node got through less than this in that time.
        // (Gone sooner, it failed or was cancelled: that says nothing of the rate.)
        let took = self.arrived.elapsed();
        if !self.done && took >= self.deadline {
            self.backlog.sample(self.ahead + self.tokens, took);
        }
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
    fn a_prefill_that_ran_out_of_time_is_a_sample_and_one_that_failed_early_is_not() {
        let b = Arc::new(Backlog::default());
        let mut early = b.take(600, Duration::from_secs(60)).ok().unwrap();
        early.arrived -= Duration::from_millis(10);
        drop(early);
        assert_eq!(b.lock().rate, None);
        let mut late = b.take(600, Duration::from_millis(1_500)).ok().unwrap();
        late.arrived -= Duration::from_secs(2);
        drop(late);
        // At most 600 tokens in 2 s or more.
        let rate = b.lock().rate.unwrap();
        assert!(rate > 250.0 && rate <= 300.0, "{rate}");
        // Now a second such prefill behind a first is refused.
        let _first = b.take(600, Duration::from_millis(1_500)).ok().unwrap();
        assert!(b.take(600, Duration::from_millis(1_500)).is_err());
    }

    #[test]
    fn finished_prefills_move_the_rate() {
        let b = with_rate(1_000.0);
        let mut taken = b.take(500, Duration::from_secs(60)).ok().unwrap();
        // 500 tokens in a quarter of a second: 2,000/s, pulled in by a fifth of the way.
        taken.finished(500, taken.arrived + Duration::from_millis(250));
        assert!((b.lock().rate.unwrap() - 1_200.0).abs() < 1e-6);
        // Nothing computed, nothing ahead: no sample.
        drop(taken);
        let mut idle = b.take(0, Duration::from_secs(1)).ok().unwrap();
        idle.finished(0, idle.arrived + Duration::from_secs(1));
        assert!((b.lock().rate.unwrap() - 1_200.0).abs() < 1e-6);
    }
}
