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

/// Which kernels the GPU path runs where two do the same work.
///
/// `Mma`, the default: paged attention on mma.sync with its accumulators in registers (decode
/// and prefill) and cuBLASLt for the dense projections. `Wmma` is the set it replaced (prefill
/// attention on WMMA tiles with the accumulator in shared memory, the scalar grouped decode
/// kernel, candle's matmul), kept so that `pd-bench gpu` can time both in one run. Both pass
/// the same device tests. Chosen per process: `PD_CUDA_KERNELS=wmma`, or [`set_kernel_set`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSet {
    Mma,
    Wmma,
}

impl KernelSet {
    /// The set called `name` (`mma` or `wmma`).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "mma" => Some(Self::Mma),
            "wmma" => Some(Self::Wmma),
            _ => None,
        }
    }
}

static KERNEL_SET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The kernel set in use (from `PD_CUDA_KERNELS` until [`set_kernel_set`] is called).
pub fn kernel_set() -> KernelSet {
    use std::sync::atomic::Ordering;
    match KERNEL_SET.load(Ordering::Relaxed) {
        1 => KernelSet::Mma,
        2 => KernelSet::Wmma,
        _ => {
            let set = match std::env::var("PD_CUDA_KERNELS") {
                Ok(name) => KernelSet::named(&name).unwrap_or_else(|| {
                    tracing::warn!(%name, "PD_CUDA_KERNELS: no such kernel set (mma, wmma); using mma");
                    KernelSet::Mma
                }),
                Err(_) => KernelSet::Mma,
            };
            set_kernel_set(set);
            set
        }
    }
}

/// Chooses the kernel set for the batches run from now on.
pub fn set_kernel_set(set: KernelSet) {
    let v = match set {
        KernelSet::Mma => 1,
        KernelSet::Wmma => 2,
    };
    KERNEL_SET.store(v, std::sync::atomic::Ordering::Relaxed);
}

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
