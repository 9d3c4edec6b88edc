//! The cluster-level benchmarks of `pd-bench` (`transfer`, `cluster`, `prefix-cache`), speculative
//! decoding against plain decoding (`speculative`), the load
//! generator for any OpenAI-compatible server (`serve`, `sweep`, `compare`) and the simulator
//! (`profile`, `simulate`, `plan`); the engine and kernel ones live in the binary itself.

pub mod cluster;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "nccl")]
pub mod gpu_transfer;
pub mod plot;
pub mod prefix;
pub mod serve;
pub mod sim;
pub mod speculative;
pub mod sweep;
pub mod transfer;

/// Runs `request` alone through `core` until nothing is left; the seconds it took. A request
/// the engine failed is an error, not a fast time.
pub fn time_request(
    core: &mut pd_common::engine::EngineCore,
    request: pd_common::engine::GenerateRequest,
) -> anyhow::Result<f64> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(request, tx)?;
    let started = std::time::Instant::now();
    while core.has_work() {
        core.step()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    while let Ok(event) = rx.try_recv() {
        if let pd_common::engine::SeqEvent::Failed(e) = event {
            return Err(e.into());
        }
    }
    Ok(seconds)
}

/// The machine's 1/5/15-minute load averages: figures taken on a busy machine mean little.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Where a benchmark appends its results (`--json`), one JSON object a line; nowhere if no
/// path was given.
pub struct JsonLines(Option<std::fs::File>);

impl JsonLines {
    pub fn open(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let file = match path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        };
        Ok(Self(file))
    }

    pub fn write(&mut self, value: &serde_json::Value) -> anyhow::Result<()> {
        if let Some(f) = &mut self.0 {
            use std::io::Write;
            writeln!(f, "{value}")?;
        }
        Ok(())
    }
}

/// The median of some measurements.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
