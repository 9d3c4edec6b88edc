//! Sampling a step's logit rows at once. On the CPU every row goes through [`sample`]. On a GPU
//! the rows that need no penalties, no top-k / top-p / min-p and no top-n logprobs are sampled on
//! the device (greedy or a seeded draw over the whole vocabulary), and only their ids and
//! log-probabilities come back; the other rows are copied to the host and sampled there. Either
//! way a row's token depends only on its own logits, parameters, history and seed.

use candle_core::Tensor;

use super::kernels::inverse_temperature;
use super::penalties::penalties_are_neutral;
use super::sampler::{sample, uniform_for_position, SampleContext, SampledToken};
use super::SamplingParams;
use crate::{Error, Result};

/// One logit row's sampling request.
#[derive(Debug, Clone, Copy)]
pub struct RowRequest<'a> {
    pub params: &'a SamplingParams,
    pub ctx: SampleContext<'a>,
}

/// A row the device samples: its inverse temperature (0 for greedy) and its uniform draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DeviceDraw {
    pub inv_t: f32,
    pub u: f64,
}

impl DeviceDraw {
    /// How the device samples this row, or `None` when the host must.
    fn of(row: &RowRequest<'_>, vocab: usize) -> Option<Self> {
        let p = row.params;
        let filters = (p.top_k > 0 && (p.top_k as usize) < vocab) || p.top_p < 1.0 || p.min_p > 0.0;
        let eligible = p.validate_numbers().is_ok()
            && penalties_are_neutral(p)
            && p.logprobs.unwrap_or(0) == 0
            && (p.is_greedy() || !filters);
        eligible.then(|| {
            if p.is_greedy() {
                DeviceDraw { inv_t: 0.0, u: 0.0 }
            } else {
                DeviceDraw {
                    inv_t: inverse_temperature(p.temperature),
                    u: uniform_for_position(row.ctx.seed, row.ctx.generated_ids.len() as u64),
                }
            }
        })
    }
}

/// Samples row `i` of `logits` (`[rows, vocab]`, f32) for `rows[i]`. The outer error means the
/// logits could not be read (the whole step is lost); an inner one is that row's own failure
/// (NaN logits, say), exactly as [`sample`] reports it.
pub fn sample_rows(logits: &Tensor, rows: &[RowRequest<'_>]) -> Result<Vec<Result<SampledToken>>> {
    let (n, vocab) = logits.dims2()?;
    if n != rows.len() {
        return Err(Error::Internal(format!(
            "{n} logit rows for {} sampled sequences",
            rows.len()
        )));
    }
    let mut out: Vec<Option<Result<SampledToken>>> = (0..n).map(|_| None).collect();
    if logits.device().is_cuda() {
        let (on_device, draws): (Vec<usize>, Vec<DeviceDraw>) = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i, DeviceDraw::of(r, vocab)?)))
            .unzip();
        if !on_device.is_empty() {
            let picked = device_sample(logits, &on_device, &draws)?;
            for (&i, pick) in on_device.iter().zip(picked) {
                if let Some((id, logprob)) = pick {
                    out[i] = Some(Ok(SampledToken {
                        id,
                        logprob,
                        top_logprobs: Vec::new(),
                    }));
                }
            }
        }
    }
    // Everything the device did not take, including rows it found NaN or +inf in: the host
    // sampler reports those precisely.
    let host: Vec<u32> = (0..n as u32)
        .filter(|&i| out[i as usize].is_none())
        .collect();
    if !host.is_empty() {
        let on_host = if host.len() == n {
            logits.to_vec2::<f32>()?
        } else {
            let index = Tensor::from_slice(&host, host.len(), logits.device())?;
            logits.index_select(&index, 0)?.to_vec2::<f32>()?
        };
        for (&i, row) in host.iter().zip(on_host) {
            let r = &rows[i as usize];
            out[i as usize] = Some(sample(&row, r.params, &r.ctx));
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(Error::Internal("a logit row was not sampled".into()))))
        .collect())
}

#[cfg(feature = "cuda")]
fn device_sample(
    logits: &Tensor,
    rows: &[usize],
    draws: &[DeviceDraw],
) -> Result<Vec<Option<(u32, f32)>>> {
    Ok(super::device::sample(logits, rows, draws)?)
}

#[cfg(not(feature = "cuda"))]
fn device_sample(
    _logits: &Tensor,
    _rows: &[usize],
    _draws: &[DeviceDraw],
) -> Result<Vec<Option<(u32, f32)>>> {
    Err(Error::Internal(
        "a GPU tensor in a build without the cuda feature".into(),
    ))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn req<'a>(params: &'a SamplingParams, generated: &'a [u32]) -> RowRequest<'a> {
        RowRequest {
            params,
            ctx: SampleContext {
                prompt_ids: &[],
                generated_ids: generated,
                seed: 7,
            },
        }
    }

    #[test]
    fn on_the_cpu_each_row_is_what_sample_gives() -> Result<()> {
        let rows: Vec<f32> = (0..4 * 50)
            .map(|i| ((i * 37) % 101) as f32 / 10.0)
            .collect();
        let logits = Tensor::from_vec(rows.clone(), (4, 50), &Device::Cpu)?;
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let hot = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            ..SamplingParams::default()
        };
        let generated = [3u32, 4];
        let reqs = [
            req(&greedy, &[]),
            req(&hot, &generated),
            req(&hot, &[]),
            req(&greedy, &generated),
        ];
        let got = sample_rows(&logits, &reqs)?;
        for (i, (r, g)) in reqs.iter().zip(got).enumerate() {
            let want = sample(&rows[i * 50..(i + 1) * 50], r.params, &r.ctx)?;
            assert_eq!(g?, want, "row {i}");
        }
        Ok(())
    }

    #[test]
    fn a_bad_row_fails_alone() -> Result<()> {
        let mut rows = vec![0.5f32; 2 * 8];
        rows[9] = f32::NAN;
        let logits = Tensor::from_vec(rows, (2, 8), &Device::Cpu)?;
        let p = SamplingParams::default();
        let got = sample_rows(&logits, &[req(&p, &[]), req(&p, &[])])?;
        assert!(got[0].is_ok());
        assert!(got[1].is_err());
        Ok(())
    }

    #[test]
    fn rows_must_match_requests() -> Result<()> {
        let logits = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu)?;
        let p = SamplingParams::default();
        assert!(sample_rows(&logits, &[req(&p, &[])]).is_err());
        Ok(())
    }

    #[test]
    fn the_device_takes_plain_rows_only() {
        let vocab = 100;
        let plain = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(
            DeviceDraw::of(&req(&plain, &[]), vocab),
            Some(DeviceDraw { inv_t: 0.0, u: 0.0 })
        );
        let hot = SamplingParams {
            temperature: 0.5,
            ..SamplingParams::default()
        };
        let d = DeviceDraw::of(&req(&hot, &[1, 2]), vocab).expect("a plain draw");
        assert_eq!(d.inv_t, 2.0);
        assert_eq!(d.u, uniform_for_position(7, 2));
        // top_k at or over the vocabulary filters nothing.
        let wide = SamplingParams {
            top_k: 100,
            ..hot.clone()
        };
        assert!(DeviceDraw::of(&req(&wide, &[]), vocab).is_some());
        for p in [
            SamplingParams {
                top_k: 5,
                ..hot.clone()
            },
            SamplingParams {
                top_p: 0.9,
                ..hot.clone()
            },
            SamplingParams {
                min_p: 0.1,
                ..hot.clone()
            },
            SamplingParams {
                repetition_penalty: 1.1,
                ..plain.clone()
            },
            SamplingParams {
                logprobs: Some(3),
                ..plain.clone()
            },
            SamplingParams {
                temperature: -1.0,
                ..plain.clone()
            },
        ] {
            assert_eq!(DeviceDraw::of(&req(&p, &[]), vocab), None, "{p:?}");
        }
        // Only the chosen token's logprob: still the device's.
        let one = SamplingParams {
            logprobs: Some(0),
            ..plain
        };
        assert!(DeviceDraw::of(&req(&one, &[]), vocab).is_some());
    }
}
