//! The gated MLP's activation, `silu(gate) * up`, over the stacked gate/up projection's output
//! (`[rows, 2 * width]`: gate in the first half of each row, up in the second).
//!
//! On a GPU one kernel (`kernels/activation.cu`) reads each half once and writes the result: the
//! halves are strided views of one tensor, which candle's elementwise kernels would walk with
//! strided loads in two passes (a quarter of prefill time on Llama-3-8B). It computes exactly
//! what the two candle ops compute in turn (silu rounded to the tensor's type, then the product),
//! so the CPU path, which uses those ops, is unchanged.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::{Error, Result};

/// `silu(y[:, ..w]) * y[:, w..]` for `y` of shape `[rows, 2w]`.
pub fn silu_and_mul(y: &Tensor) -> Result<Tensor> {
    let (_, cols) = y.dims2()?;
    if cols % 2 != 0 {
        return Err(Error::invalid(format!(
            "silu_and_mul needs an even number of columns, got {cols}"
        )));
    }
    let w = cols / 2;
    if y.device().is_cuda() {
        let y = y.contiguous()?;
        return Ok(y.apply_op1_no_bwd(&SiluAndMul)?);
    }
    Ok((candle_nn::ops::silu(&y.narrow(1, 0, w)?)? * y.narrow(1, w, w)?)?)
}

struct SiluAndMul;

impl CustomOp1 for SiluAndMul {
    fn name(&self) -> &'static str {
        "silu-and-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("silu-and-mul runs candle's ops on the CPU")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::DType;
        use half::{bf16, f16};
        match crate::cuda::dtype_of(s) {
            DType::BF16 => cuda::run::<bf16>(s, l),
            DType::F16 => cuda::run::<f16>(s, l),
            DType::F32 => cuda::run::<f32>(s, l),
            other => candle_core::bail!("silu-and-mul: no kernel for {other:?}"),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Shape};

    use crate::cuda::{dtype_tag, function, view, Module};

    const THREADS: u32 = 256;

    pub fn run<T>(s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)>
    where
        T: CudaDType + DeviceRepr + candle_core::WithDType,
    {
        let (rows, cols) = l.shape().dims2()?;
        let width = cols / 2;
        let dev = s.device.clone();
        let input = view::<T>(s, l)?;
        let per = 16 / std::mem::size_of::<T>();
        let vec = width % per == 0;
        let name = format!(
            "silu_and_mul_{}_{}",
            if vec { "vec" } else { "any" },
            dtype_tag(T::DTYPE)?
        );
        let f = function(&dev, Module::Activation, &name)?;
        // SAFETY: the kernel writes every one of the rows * width outputs.
        let out = unsafe { dev.alloc::<T>(rows * width)? };
        let items = if vec {
            rows * width / per
        } else {
            rows * width
        };
        let blocks = items.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (w, r) = (width as i32, rows);
        let mut b = f.builder();
        b.arg(&out);
        b.arg(&input);
        b.arg(&w);
        b.arg(&r);
        // SAFETY: the arguments match the kernel's (T* out, const T* in, int width, size_t rows);
        // `input` holds rows * 2 * width contiguous elements and `out` rows * width, which is
        // all the grid-stride loop touches; the vector kernel is chosen only when width is a
        // whole number of 16-byte vectors (the allocations are 16-byte aligned and rows start at
        // multiples of the vector length).
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((rows, width)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn the_first_half_gates_the_second() {
        let y = Tensor::new(&[[0f32, 1., 2., 3.], [-1., 2., 0.5, -4.]], &Device::Cpu).unwrap();
        let got: Vec<Vec<f32>> = silu_and_mul(&y).unwrap().to_vec2().unwrap();
        let silu = |x: f32| x / (1. + (-x).exp());
        assert_eq!(got[0], vec![silu(0.) * 2., silu(1.) * 3.]);
        assert_eq!(got[1], vec![silu(-1.) * 0.5, silu(2.) * -4.]);
        assert!(silu_and_mul(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).is_err());
    }
}
