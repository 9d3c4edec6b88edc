//! Loading the project's CUDA kernels (`kernels/*.cu`, compiled to PTX by the build script) and
//! the helpers their launches share. The launches live with what they compute: paged attention
//! in `model::attention::cuda`, the KV cache's scatter and gather in `kv::cuda`, token sampling in `sampling::device`,
//! the MLP's activation in `model::mlp`.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout};

const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const KV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kv_cache.ptx"));
const SAMPLING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
const ACTIVATION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/activation.ptx"));

#[derive(Clone, Copy)]
pub(crate) enum Module {
    Attention,
    Kv,
    Sampling,
    Activation,
}

/// A kernel of ours, ready to launch on the device's stream.
pub(crate) struct Kernel {
    stream: Arc<CudaStream>,
    pub(crate) func: CudaFunction,
}

impl Kernel {
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

pub(crate) fn function(
    dev: &CudaDevice,
    module: Module,
    name: &str,
) -> candle_core::Result<Kernel> {
    let (module_name, ptx) = match module {
        Module::Attention => ("pd_paged_attention", ATTENTION_PTX),
        Module::Kv => ("pd_kv_cache", KV_PTX),
        Module::Sampling => ("pd_sampling", SAMPLING_PTX),
        Module::Activation => ("pd_activation", ACTIVATION_PTX),
    };
    let func = dev
        .get_or_load_custom_func(name, module_name, ptx)?
        .into_cuda_function();
    Ok(Kernel {
        stream: dev.cuda_stream(),
        func,
    })
}

/// The element type of a storage.
pub(crate) fn dtype_of(s: &CudaStorage) -> DType {
    s.dtype()
}

/// The kernels' name for an element type.
pub(crate) fn dtype_tag(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("no CUDA kernel for {other:?}"),
    })
}

/// The contiguous part of a storage that a layout describes.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("the CUDA kernels need contiguous tensors")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

pub(crate) fn upload<T: DeviceRepr + 'static>(
    dev: &CudaDevice,
    values: &[T],
) -> candle_core::Result<CudaSlice<T>> {
    dev.clone_htod(values)
}
