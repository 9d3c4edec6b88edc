//! A linear layer whose weight is kept in the form it was loaded in: GGUF-quantized blocks (our own
//! CPU kernels for the common formats, candle's for the rest) or a dense matrix.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

use super::quant_cpu::{QuantFormat, QuantMatrix};
use crate::{Error, Result};

#[derive(Debug)]
pub enum Linear {
    /// GGUF blocks with a fast CPU kernel here (llama.cpp's numerics).
    Quant(QuantMatrix),
    /// Other GGUF block formats, through candle's quantized matmul.
    Ggml {
        matmul: QMatMul,
        out_features: usize,
    },
    /// A dense `[out_features, in_features]` weight.
    Dense(Tensor),
}

impl Linear {
    /// Wraps a GGUF tensor, choosing our kernel when it knows the format and runs on this device.
    pub fn from_qtensor(weight: QTensor) -> Result<Self> {
        let out_features = weight.shape().dims().first().copied().unwrap_or(0);
        if weight.device().is_cpu() {
            if let Some(m) = QuantMatrix::from_qtensor(&weight)? {
                return Ok(Linear::Quant(m));
            }
        }
        Ok(Linear::Ggml {
            matmul: QMatMul::from_qtensor(weight)?,
            out_features,
        })
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Quant(m) => m.n(),
            Linear::Ggml { out_features, .. } => *out_features,
            Linear::Dense(w) => w.dims()[0],
        }
    }

    /// `x`: `[tokens, in_features]` → `[tokens, out_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Quant(m) => m.forward(x)?,
            Linear::Ggml { matmul, .. } => matmul.forward(x)?,
            Linear::Dense(w) => super::gemm::linear(x, w)?,
        })
    }
}

/// Several linear layers over the same input, run as one matmul when their weights stack.
#[derive(Debug)]
pub struct FusedLinear {
    parts: Vec<Linear>,
    /// When stacked: the single layer, and the output width of each original part.
    stacked: Option<(Linear, Vec<usize>)>,
}

impl FusedLinear {
    /// GGUF weights: stacked into one matrix when they share a format our kernels run.
    pub fn from_qtensors(parts: Vec<QTensor>) -> Result<Self> {
        let same_format = parts.windows(2).all(|w| w[0].dtype() == w[1].dtype());
        let first = parts
            .first()
            .ok_or_else(|| Error::Internal("no weights to fuse".into()))?;
        let format = QuantFormat::from_ggml(first.dtype()).filter(|_| same_format);
        let k = first.shape().dims().get(1).copied().unwrap_or(0);
        let same_k = parts.iter().all(|p| p.shape().dims().get(1) == Some(&k));
        match format {
            Some(format) if first.device().is_cpu() && same_k => {
                let widths: Vec<usize> = parts.iter().map(|p| p.shape().dims()[0]).collect();
                let mut data = Vec::new();
                for p in &parts {
                    data.extend_from_slice(&p.data()?);
                }
                let stacked = QuantMatrix::new(format, widths.iter().sum(), k, data)?;
                Ok(Self {
                    parts: Vec::new(),
                    stacked: Some((Linear::Quant(stacked), widths)),
                })
            }
            _ => Ok(Self {
                parts: parts
                    .into_iter()
                    .map(Linear::from_qtensor)
                    .collect::<Result<_>>()?,
                stacked: None,
            }),
        }
    }

    /// Dense `[out, in]` weights, stacked into one.
    pub fn from_dense(parts: Vec<Tensor>) -> Result<Self> {
        let widths = parts.iter().map(|p| p.dims()[0]).collect();
        Ok(Self {
            parts: Vec::new(),
            stacked: Some((Linear::Dense(Tensor::cat(&parts, 0)?), widths)),
        })
    }

    /// The parts' outputs side by side (`[rows, sum of widths]`), when the weights are stacked.
    pub fn forward_stacked(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match &self.stacked {
            Some((linear, _)) => Ok(Some(linear.forward(x)?)),
            None => Ok(None),
        }
    }

    /// One output per part, in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.stacked {
            Some((linear, _)) => self.split(&linear.forward(x)?),
            None => self.parts.iter().map(|p| p.forward(x)).collect(),
        }
    }

    /// The stacked output `y` of [`forward_stacked`](Self::forward_stacked) as one view per
    /// part, in order.
    pub fn split(&self, y: &Tensor) -> Result<Vec<Tensor>> {
        let Some((_, widths)) = &self.stacked else {
            return Err(Error::Internal("split of an unstacked projection".into()));
        };
        let mut at = 0;
        let mut outs = Vec::with_capacity(widths.len());
        for &w in widths {
            outs.push(y.narrow(1, at, w)?);
            at += w;
        }
        Ok(outs)
    }
}

pub(crate) fn shape_error(name: &str, got: &[usize], want: &[usize]) -> Error {
    Error::UnsupportedModel(format!(
        "tensor {name} has shape {got:?}, expected {want:?}"
    ))
}
