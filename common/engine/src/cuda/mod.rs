//! Loading the project's CUDA kernels (`kernels/*.cu`, compiled to PTX by the build script) and
//! the helpers their launches share. The launches live with what they compute: paged attention
//! in `model::attention::cuda`, the KV cache's scatter and gather in `kv::cuda`, token sampling in `sampling::device`,
//! the MLP's activation in `model::mlp`, the fused residual-add + RMSNorm and RoPE + KV write in
//! `model::fused`.

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
const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

/// Which kernels the GPU path runs where two do the same work.
///
/// `Mma`, the default: paged attention on mma.sync with its accumulators in registers (decode
/// and prefill), cuBLASLt for the dense projections, and the fused residual-add + RMSNorm and
/// RoPE + KV write (`model::fused`). `Wmma` is the set it replaced (prefill attention on WMMA
/// tiles with the accumulator in shared memory, the scalar grouped decode kernel, candle's
/// matmul and its separate elementwise ops), kept so that `pd-bench gpu` can time both in one run. Both pass
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

/// Tiles of keys in flight per warp of the tensor-core decode kernel (its cp.async ring: 2, 3
/// or 4; `PD_CUDA_DECODE_STAGES`, or [`set_decode_stages`]). A deeper ring keeps more loads in
/// flight per warp; a shallower one needs less shared memory, so more CTAs fit on an SM. The
/// result does not depend on it. The default is 2: at D = 128 its 70 KB let three CTAs onto an
/// H100's SM where the 4-stage ring's 139 KB let one, and a batch-64 decode step at context 2048
/// took 0.89 of the 4-stage time (3 stages: 0.90; batch 1 and 16 within 3 %).
pub const DECODE_STAGES: [usize; 3] = [2, 3, 4];
const DEFAULT_DECODE_STAGES: usize = 2;

static DECODE_STAGES_IN_USE: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// The decode kernel's ring depth in use.
pub fn decode_stages() -> usize {
    use std::sync::atomic::Ordering;
    match DECODE_STAGES_IN_USE.load(Ordering::Relaxed) {
        0 => {
            let stages = match std::env::var("PD_CUDA_DECODE_STAGES") {
                Ok(v) => match v.parse() {
                    Ok(n) if DECODE_STAGES.contains(&n) => n,
                    _ => {
                        tracing::warn!(value = %v, "PD_CUDA_DECODE_STAGES: not 2, 3 or 4; using {DEFAULT_DECODE_STAGES}");
                        DEFAULT_DECODE_STAGES
                    }
                },
                Err(_) => DEFAULT_DECODE_STAGES,
            };
            DECODE_STAGES_IN_USE.store(stages, Ordering::Relaxed);
            stages
        }
        n => n,
    }
}

/// Chooses the decode kernel's ring depth (one of [`DECODE_STAGES`]) for the batches run from
/// now on.
pub fn set_decode_stages(stages: usize) -> Result<(), String> {
    if !DECODE_STAGES.contains(&stages) {
        return Err(format!(
            "decode stages must be one of {DECODE_STAGES:?}, not {stages}"
        ));
    }
    DECODE_STAGES_IN_USE.store(stages, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// 0: not read yet; 1: fused; 2: unfused.
static FUSED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the mma set runs the fused residual-add + RMSNorm and RoPE + KV write kernels
/// (`model::fused`; the default) or the separate ops the wmma set runs (`PD_CUDA_FUSED=0`, or
/// [`set_fused`]), so that a benchmark can tell what the fusion gains. The result is the same
/// within rounding.
pub fn fused() -> bool {
    use std::sync::atomic::Ordering;
    match FUSED.load(Ordering::Relaxed) {
        0 => {
            let on = match std::env::var("PD_CUDA_FUSED") {
                Ok(v) if v == "0" => false,
                Ok(v) if v == "1" => true,
                Ok(v) => {
                    tracing::warn!(value = %v, "PD_CUDA_FUSED: not 0 or 1; fusing");
                    true
                }
                Err(_) => true,
            };
            FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

/// Turns the fused kernels on or off for the batches run from now on.
pub fn set_fused(on: bool) {
    FUSED.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Selects kernels by a label: a kernel set's name (`mma`, `wmma`), or `mma-s2`, `mma-s3`,
/// `mma-s4` for the mma set with that decode ring depth (plain `mma` keeps the default depth),
/// and `-unfused` after an mma label for the mma set without its fused elementwise kernels.
pub fn select_kernels(label: &str) -> Result<(), String> {
    let (base, unfused) = match label.strip_suffix("-unfused") {
        Some(base) => (base, true),
        None => (label, false),
    };
    let (set, stages) = match base.split_once("-s") {
        Some((set, n)) => (
            set,
            Some(
                n.parse::<usize>()
                    .map_err(|_| format!("{label:?}: no ring depth after -s"))?,
            ),
        ),
        None => (base, None),
    };
    let set = KernelSet::named(set).ok_or_else(|| {
        format!("unknown kernel set {label:?} (mma, mma-s2, mma-s3, mma-s4, wmma, each mma one with -unfused)")
    })?;
    if (stages.is_some() || unfused) && set != KernelSet::Mma {
        return Err(format!(
            "{label:?}: only the mma set has a decode ring depth and fused kernels"
        ));
    }
    set_decode_stages(stages.unwrap_or(DEFAULT_DECODE_STAGES))?;
    set_kernel_set(set);
    set_fused(!unfused);
    Ok(())
}

#[derive(Clone, Copy)]
pub(crate) enum Module {
    Attention,
    Kv,
    Sampling,
    Activation,
    Fused,
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
        Module::Fused => ("pd_fused", FUSED_PTX),
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
