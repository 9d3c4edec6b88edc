//! The device half of [`super::batch`]: `kernels/sampling.cu` over the rows the device takes,
//! one CTA a row. Only the ids and log-probabilities are copied back.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Storage, Tensor};

use super::batch::DeviceDraw;
use crate::cuda::{function, upload, view, Module};

/// Threads per row (SAMPLE_THREADS in the kernel).
const THREADS: u32 = 1024;
/// The id the kernel writes for a row the host must sample (NO_TOKEN in the kernel).
const NO_TOKEN: u32 = u32::MAX;

/// For each of `rows` of `logits` (`[n, vocab]` on a GPU), the sampled id and its log-probability,
/// or `None` where the row has NaN or +inf logits or none above -inf (the host then reports it).
pub(super) fn sample(
    logits: &Tensor,
    rows: &[usize],
    draws: &[DeviceDraw],
) -> candle_core::Result<Vec<Option<(u32, f32)>>> {
    let Device::Cuda(dev) = logits.device() else {
        candle_core::bail!("device sampling needs logits on a GPU")
    };
    if rows.len() != draws.len() {
        candle_core::bail!("{} rows but {} draws", rows.len(), draws.len());
    }
    let (n, vocab) = logits.dims2()?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let picked = if rows.len() == n {
        logits.clone()
    } else {
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        logits.index_select(&Tensor::from_vec(index, rows.len(), logits.device())?, 0)?
    };
    let picked = picked.to_dtype(DType::F32)?.contiguous()?;
    let vocab_i =
        i32::try_from(vocab).map_err(|_| candle_core::Error::Msg("vocabulary too large".into()))?;
    let inv_t = upload(dev, &draws.iter().map(|d| d.inv_t).collect::<Vec<f32>>())?;
    let u = upload(dev, &draws.iter().map(|d| d.u).collect::<Vec<f64>>())?;
    let mut ids = dev.alloc_zeros::<u32>(rows.len())?;
    let mut logprobs = dev.alloc_zeros::<f32>(rows.len())?;
    {
        let (storage, layout) = picked.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("device sampling needs logits on a GPU")
        };
        let src = view::<f32>(s, layout)?;
        let f = function(dev, Module::Sampling, "sample_rows")?;
        let cfg = LaunchConfig {
            grid_dim: (rows.len() as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = f.builder();
        b.arg(&src);
        b.arg(&vocab_i);
        b.arg(&inv_t);
        b.arg(&u);
        b.arg(&mut ids);
        b.arg(&mut logprobs);
        // SAFETY: the arguments pushed above match `sample_rows` in kernels/sampling.cu in order
        // and type; `src` holds `rows.len() * vocab` f32 values (a contiguous [rows, vocab]
        // tensor), and `inv_t`, `u`, `ids`, `logprobs` one element per row: one CTA per row
        // touches only its own row and its own element of each.
        unsafe { b.launch(cfg) }.w()?;
    }
    let ids = dev.clone_dtoh(&ids)?;
    let logprobs = dev.clone_dtoh(&logprobs)?;
    Ok(ids
        .into_iter()
        .zip(logprobs)
        .map(|(id, lp)| {
            (id != NO_TOKEN && (id as usize) < vocab && lp.is_finite()).then_some((id, lp))
        })
        .collect())
}
