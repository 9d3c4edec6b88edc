//! The cluster-level benchmarks of `pd-bench` (`transfer`, `cluster`, `prefix-cache`); the engine and kernel
//! ones live in the binary itself.

pub mod cluster;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "nccl")]
pub mod gpu_transfer;
pub mod prefix;
pub mod transfer;

/// The machine's 1/5/15-minute load averages: figures taken on a busy machine mean little.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The median of some measurements.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
