//! Where an engine step's time goes. Each step is cut into phases, timed on the engine thread
//! and recorded in the `pd_engine_step_phase_seconds{phase}` histogram (a node exports it on
//! `/metrics`; `pd-bench cluster` prints the mean of each phase per step):
//!
//! - `schedule`: dropping abandoned requests, admitting, preempting, choosing the step's work;
//! - `draft`: the draft model's passes (speculative decoding's `draft_model` method only);
//! - `pack`: building the batch (token ids, positions, block tables) on the host;
//! - `forward`: the forward pass, until the device has finished it (on a GPU this waits for
//!   the stream: the phase is the device's time plus what the host needed to launch it);
//! - `sample`: choosing the next tokens (on the device where it can) and bringing them back;
//! - `emit`: appending tokens, detokenizing, stop checks, streaming, finishing sequences.

use std::time::Instant;

use crate::telemetry::names;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Schedule,
    Draft,
    Pack,
    Forward,
    Sample,
    Emit,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Schedule,
        Phase::Draft,
        Phase::Pack,
        Phase::Forward,
        Phase::Sample,
        Phase::Emit,
    ];

    /// The `phase` label.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Schedule => "schedule",
            Phase::Draft => "draft",
            Phase::Pack => "pack",
            Phase::Forward => "forward",
            Phase::Sample => "sample",
            Phase::Emit => "emit",
        }
    }
}

/// A stopwatch over one step: each lap ends a phase and records its time.
pub(super) struct PhaseClock {
    last: Instant,
}

impl PhaseClock {
    pub(super) fn starting_at(start: Instant) -> Self {
        Self { last: start }
    }

    /// Ends `phase` now; returns its length in seconds.
    pub(super) fn lap(&mut self, phase: Phase) -> f64 {
        self.lap_at(phase, Instant::now())
    }

    fn lap_at(&mut self, phase: Phase, now: Instant) -> f64 {
        let secs = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        metrics::histogram!(names::STEP_PHASE_SECONDS, "phase" => phase.name()).record(secs);
        secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct() {
        let mut names: Vec<_> = Phase::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Phase::ALL.len());
    }

    #[test]
    fn laps_measure_from_the_previous_lap() {
        let start = Instant::now();
        let ms = std::time::Duration::from_millis;
        let mut clock = PhaseClock::starting_at(start);
        assert_eq!(clock.lap_at(Phase::Schedule, start + ms(3)), 0.003);
        assert_eq!(clock.lap_at(Phase::Pack, start + ms(5)), 0.002);
        // A clock that went backwards gives an empty phase, not a negative one.
        assert_eq!(clock.lap_at(Phase::Forward, start + ms(4)), 0.0);
    }
}
