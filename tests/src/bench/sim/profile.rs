//! Device profiles: what one engine on one device costs, measured on a real engine and fitted
//! to the few shapes the simulator needs.
//!
//! - a prefill step of `n` new tokens whose prompt already had `s` tokens computed costs
//!   `a + b·n + c·((s+n)² − s²)` seconds (the matmuls grow with `n`, attention with the pairs of
//!   positions it relates);
//! - a decode step of `batch` sequences holding `ctx` tokens in all costs
//!   `a + b·batch + c·ctx` seconds (weights read once per step, KV read per token held);
//! - shipping `bytes` of KV over a backend costs `latency + bytes / bytes_per_s`.
//!
//! `pd-bench profile` ([`super::measure`]) measures the CPU engine of this machine;
//! [`Profile::from_gpu_results`] reads a GPU profile out of a `deploy/gpu/results/*.json` file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `a + b·n + c·n²`-style coefficients, seconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Fit {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Link {
    pub latency_s: f64,
    pub bytes_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    pub device: String,
    pub model: String,
    pub date: String,
    /// Prefill: see the module's text. Measured points are (prompt tokens, seconds).
    pub prefill: Fit,
    pub prefill_points: Vec<[f64; 2]>,
    /// Decode: see the module's text. Measured points are (batch, context tokens, seconds).
    pub decode: Fit,
    /// The decode step's cost without its context term at each measured batch size, (batch,
    /// seconds): small batches on a CPU do not follow one line (threads idle at batch 1), so
    /// where this is given the batch term is read off it, linearly between the points and
    /// along the last two beyond them, instead of `a + b·batch`.
    #[serde(default)]
    pub decode_base: Vec<[f64; 2]>,
    pub decode_points: Vec<[f64; 3]>,
    /// KV bytes one token occupies (all layers, K and V).
    pub kv_bytes_per_token: f64,
    /// Per backend (`grpc`, `nccl`).
    pub transfer: BTreeMap<String, Link>,
    /// True where every node of a host shares one compute resource (a CPU's cores). False
    /// where each node has a device of its own.
    pub shared_host: bool,
    /// On a shared host: how much longer a step takes while another node's engine is busy on
    /// the same host (measured: a decode step beside a process that computes without pause).
    /// With k nodes busy each runs at `1 / (1 + (k−1)·(slowdown−1))` of its speed.
    #[serde(default = "one")]
    pub shared_slowdown: f64,
    /// The engine limits the profile was taken with.
    pub max_batch_tokens: usize,
    pub max_num_seqs: usize,
}

impl Profile {
    /// Seconds of a step computing the prefill chunks `(start, len)`.
    pub fn prefill_work(&self, chunks: &[(usize, usize)]) -> f64 {
        let f = self.prefill;
        let tokens: usize = chunks.iter().map(|c| c.1).sum();
        let pairs: f64 = chunks
            .iter()
            .map(|&(s, n)| ((s + n) as f64).powi(2) - (s as f64).powi(2))
            .sum();
        f.b * tokens as f64 + f.c * pairs
    }

    /// Seconds of a decode step of `batch` sequences holding `ctx` tokens in all, less the
    /// step's fixed cost ([`Profile::step_overhead`]).
    pub fn decode_work(&self, batch: usize, ctx: usize) -> f64 {
        let base = match self.decode_base.as_slice() {
            [] | [_] => self.decode.b * batch as f64,
            points => interpolate(points, batch as f64) - self.decode.a,
        };
        base.max(0.0) + self.decode.c * ctx as f64
    }

    /// The fixed cost of a step (the larger of the two fitted intercepts: a step that mixes
    /// prefill and decode pays it once).
    pub fn step_overhead(&self, prefill: bool, decode: bool) -> f64 {
        match (prefill, decode) {
            (true, true) => self.prefill.a.max(self.decode.a),
            (true, false) => self.prefill.a,
            (false, true) => self.decode.a,
            (false, false) => 0.0,
        }
    }

    pub fn link(&self, backend: &str) -> anyhow::Result<Link> {
        self.transfer.get(backend).copied().ok_or_else(|| {
            anyhow::anyhow!(
                "the profile has no {backend:?} transfer figures (it has {:?})",
                self.transfer.keys().collect::<Vec<_>>()
            )
        })
    }

    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the profile {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a profile: {e}", path.display()))
    }

    /// A GPU profile from the results file `pd-bench gpu` writes: decode step times at one
    /// context for several batches, prefill times for several prompt lengths, the model's
    /// shape for the KV size, the engine limits of its serving runs. Its decode figures all share one context per sequence, so the
    /// batch and context terms cannot be told apart; decode on a GPU is bound by memory
    /// reads, so the whole slope is put on the context held (`b = 0`).
    pub fn from_gpu_results(results: &serde_json::Value, link: Link) -> anyhow::Result<Self> {
        let num = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| anyhow::anyhow!("the GPU results lack {k}"))
        };
        let rows = |k: &str| {
            results
                .get(k)
                .and_then(serde_json::Value::as_array)
                .ok_or_else(|| anyhow::anyhow!("the GPU results lack {k}"))
        };
        let mut decode_points = Vec::new();
        for d in rows("decode")? {
            let batch = num(d, "batch")?;
            decode_points.push([batch, batch * num(d, "context")?, num(d, "step_ms")? / 1e3]);
        }
        let mut prefill_points = Vec::new();
        for p in rows("prefill")? {
            prefill_points.push([num(p, "tokens")?, num(p, "ms")? / 1e3]);
        }
        let (a, c) = fit_line(
            &decode_points
                .iter()
                .map(|p| (p[1], p[2]))
                .collect::<Vec<_>>(),
        );
        // Two prefill lengths cannot fix three coefficients: the step's fixed cost is taken
        // from decode (a step reads every weight once whatever it computes), and only the
        // per-token and per-pair costs are fitted.
        let prefill = if prefill_points.len() >= 3 {
            fit_prefill(&prefill_points)
        } else {
            let rows: Vec<Vec<f64>> = prefill_points
                .iter()
                .map(|p| vec![p[0], p[0] * p[0]])
                .collect();
            let ys: Vec<f64> = prefill_points.iter().map(|p| p[1] - a).collect();
            let bc = least_squares(&rows, &ys);
            Fit {
                a,
                b: bc[0],
                c: bc[1],
            }
        };
        let shape = results
            .get("shape")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("llama3-8b");
        let preset = shape.split_whitespace().next().unwrap_or(shape);
        let config = pd_common::model::ModelConfig::preset(preset)?;
        let served = rows("served")?.first().cloned().unwrap_or_default();
        Ok(Self {
            device: results
                .get("device")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("GPU")
                .to_string(),
            model: shape.to_string(),
            date: results
                .get("date")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_string(),
            prefill,
            prefill_points,
            decode: Fit { a, b: 0.0, c },
            decode_base: Vec::new(),
            decode_points,
            // bf16 K and V for every layer.
            kv_bytes_per_token: (2 * 2 * config.num_layers * config.num_kv_heads * config.head_dim)
                as f64,
            transfer: BTreeMap::from([("nccl".to_string(), link)]),
            shared_host: false,
            shared_slowdown: 1.0,
            max_batch_tokens: served
                .get("max_batch_tokens")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(2048) as usize,
            max_num_seqs: served
                .get("max_num_seqs")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(64) as usize,
        })
    }
}

fn one() -> f64 {
    1.0
}

/// `y` at `x` on the polyline through `points` (sorted by x), extended along its end segments.
fn interpolate(points: &[[f64; 2]], x: f64) -> f64 {
    let seg = points
        .windows(2)
        .position(|w| x <= w[1][0])
        .unwrap_or(points.len() - 2);
    let ([x0, y0], [x1, y1]) = (points[seg], points[seg + 1]);
    if x1 == x0 {
        return y0;
    }
    y0 + (y1 - y0) * (x - x0) / (x1 - x0)
}

/// The context-free part of each measured decode step, averaged per batch size.
pub fn decode_base(points: &[[f64; 3]], fit: &Fit) -> Vec<[f64; 2]> {
    let mut by_batch: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for p in points {
        by_batch
            .entry(p[0] as u64)
            .or_default()
            .push(p[2] - fit.c * p[1]);
    }
    by_batch
        .into_iter()
        .map(|(b, v)| [b as f64, v.iter().sum::<f64>() / v.len() as f64])
        .collect()
}

/// Least squares `y = a + c·x`.
pub fn fit_line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), &(x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|&(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|&(x, y)| (x - mx) * (y - my)).sum();
    let c = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - c * mx, c)
}

/// Least squares over the columns `xs` (each row a point's regressors), by the normal
/// equations; coefficients that come out negative are dropped and the rest fitted again, since
/// a cost cannot shrink with size.
pub fn least_squares(rows: &[Vec<f64>], ys: &[f64]) -> Vec<f64> {
    let k = rows.first().map_or(0, Vec::len);
    let mut active: Vec<bool> = vec![true; k];
    loop {
        let cols: Vec<usize> = (0..k).filter(|&j| active[j]).collect();
        let m = cols.len();
        let mut a = vec![vec![0.0; m + 1]; m];
        for (row, &y) in rows.iter().zip(ys) {
            for (i, &ci) in cols.iter().enumerate() {
                for (j, &cj) in cols.iter().enumerate() {
                    a[i][j] += row[ci] * row[cj];
                }
                a[i][m] += row[ci] * y;
            }
        }
        let solved = gauss(a);
        let mut coef = vec![0.0; k];
        for (i, &ci) in cols.iter().enumerate() {
            coef[ci] = solved.get(i).copied().unwrap_or(0.0);
        }
        match (0..k).find(|&j| active[j] && coef[j] < 0.0) {
            Some(j) => active[j] = false,
            None => return coef,
        }
    }
}

/// Solves an augmented system; singular directions get 0.
fn gauss(mut a: Vec<Vec<f64>>) -> Vec<f64> {
    let m = a.len();
    for col in 0..m {
        let Some(p) = (col..m).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())) else {
            break;
        };
        a.swap(col, p);
        let pivot = a[col][col];
        if pivot.abs() < 1e-300 {
            continue;
        }
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot;
                for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    (0..m)
        .map(|i| {
            if a[i][i].abs() < 1e-300 {
                0.0
            } else {
                a[i][m] / a[i][i]
            }
        })
        .collect()
}

/// Fits the prefill cost to (tokens, seconds) of whole prompts computed from nothing.
pub fn fit_prefill(points: &[[f64; 2]]) -> Fit {
    let rows: Vec<Vec<f64>> = points
        .iter()
        .map(|p| vec![1.0, p[0], p[0] * p[0]])
        .collect();
    let ys: Vec<f64> = points.iter().map(|p| p[1]).collect();
    let c = least_squares(&rows, &ys);
    Fit {
        a: c[0],
        b: c[1],
        c: c[2],
    }
}

/// Fits the decode cost to (batch, context, seconds).
pub fn fit_decode(points: &[[f64; 3]]) -> Fit {
    let rows: Vec<Vec<f64>> = points.iter().map(|p| vec![1.0, p[0], p[1]]).collect();
    let ys: Vec<f64> = points.iter().map(|p| p[2]).collect();
    let c = least_squares(&rows, &ys);
    Fit {
        a: c[0],
        b: c[1],
        c: c[2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_recover_known_costs() {
        let pts: Vec<[f64; 2]> = [16.0, 64.0, 256.0, 1024.0]
            .iter()
            .map(|&n| [n, 0.002 + 1e-4 * n + 3e-8 * n * n])
            .collect();
        let f = fit_prefill(&pts);
        assert!(
            (f.a - 0.002).abs() < 1e-9 && (f.b - 1e-4).abs() < 1e-10 && (f.c - 3e-8).abs() < 1e-13,
            "{f:?}"
        );
        let pts: Vec<[f64; 3]> = [(1.0, 100.0), (8.0, 800.0), (8.0, 4000.0), (32.0, 2000.0)]
            .iter()
            .map(|&(b, c)| [b, c, 0.01 + 0.001 * b + 2e-6 * c])
            .collect();
        let f = fit_decode(&pts);
        assert!(
            (f.a - 0.01).abs() < 1e-9 && (f.b - 0.001).abs() < 1e-9 && (f.c - 2e-6).abs() < 1e-12,
            "{f:?}"
        );
        // A cost that would come out negative is dropped, not kept.
        let f = fit_prefill(&[[10.0, 1.0], [20.0, 2.0], [30.0, 2.9]]);
        assert!(f.a >= 0.0 && f.b >= 0.0 && f.c >= 0.0, "{f:?}");
        assert_eq!(fit_line(&[(0.0, 1.0), (2.0, 5.0)]), (1.0, 2.0));
    }

    #[test]
    fn decode_base_points_shape_the_batch_term() {
        let mut p = gpu_profile();
        p.decode = Fit {
            a: 0.010,
            b: 0.0,
            c: 0.0,
        };
        p.decode_base = vec![[1.0, 0.010], [4.0, 0.016], [8.0, 0.020]];
        let step = |b| p.decode.a + p.decode_work(b, 0);
        assert!((step(1) - 0.010).abs() < 1e-12);
        assert!((step(2) - 0.012).abs() < 1e-12, "between points");
        assert!((step(8) - 0.020).abs() < 1e-12);
        assert!((step(16) - 0.028).abs() < 1e-12, "along the last segment");
    }

    fn gpu_profile() -> Profile {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/gpu/results/2026-12-03-h200.json"
        );
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        Profile::from_gpu_results(
            &results,
            Link {
                latency_s: 0.0,
                bytes_per_s: 1e11,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_gpu_profile_is_read_from_the_results_file() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/gpu/results/2026-12-03-h200.json"
        );
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let p = Profile::from_gpu_results(
            &results,
            Link {
                latency_s: 0.0,
                bytes_per_s: 1e11,
            },
        )
        .unwrap();
        assert_eq!(p.device, "NVIDIA H200");
        assert!(!p.shared_host);
        // Llama-3-8B: 32 layers, 8 KV heads of 128, K and V in bf16.
        assert_eq!(p.kv_bytes_per_token, 131072.0);
        for pt in &p.decode_points {
            let fitted = p.decode.a + p.decode_work(pt[0] as usize, pt[1] as usize);
            assert!(
                (fitted - pt[2]).abs() / pt[2] < 0.1,
                "decode {pt:?}: fitted {fitted}"
            );
        }
        for pt in &p.prefill_points {
            let fitted = p.prefill.a + p.prefill_work(&[(0, pt[0] as usize)]);
            assert!(
                (fitted - pt[1]).abs() / pt[1] < 0.05,
                "prefill {pt:?}: fitted {fitted}"
            );
        }
    }
}
