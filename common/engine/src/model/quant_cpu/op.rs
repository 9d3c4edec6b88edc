//! [`QuantMatrix::forward`] as a candle [`CustomOp1`].

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use super::QuantMatrix;
use crate::Error;

pub(super) const OP_NAME: &str = "quant-cpu-matmul";

/// `forward` as a candle custom op.
pub(super) struct QuantMatMulOp<'a>(pub(super) &'a QuantMatrix);

impl CustomOp1 for QuantMatMulOp<'_> {
    fn name(&self) -> &'static str {
        OP_NAME
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = self.0;
        let CpuStorage::F32(data) = storage else {
            use candle_core::backend::BackendStorage;
            candle_core::bail!("{OP_NAME}: expects f32 input, got {:?}", storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::RequiresContiguous { op: OP_NAME });
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&w.k) {
            candle_core::bail!(
                "{OP_NAME}: input shape {dims:?} does not end in k = {}",
                w.k
            );
        }
        let x = data
            .get(start..end)
            .ok_or_else(|| candle_core::Error::Msg(format!("{OP_NAME}: bad layout")))?;
        let m = x.len() / w.k;
        let mut out = vec![0f32; m * w.n];
        w.matmul(x, m, &mut out).map_err(|e| match e {
            Error::Candle(e) => e,
            e => candle_core::Error::Msg(e.to_string()),
        })?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.n;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        candle_core::bail!("{OP_NAME}: this kernel is CPU-only")
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        candle_core::bail!("{OP_NAME}: this kernel is CPU-only")
    }
}
