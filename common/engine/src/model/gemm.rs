//! Dense `x · Wᵀ`, the model's projections.
//!
//! With the default kernel set ([`crate::cuda::KernelSet::Mma`]) on an NVIDIA GPU, a 16-bit product
//! goes through cuBLASLt: candle's matmul calls cuBLAS's older
//! strided-batched GEMM, which reaches about 600 TFLOP/s on an H200 where cuBLASLt reaches about
//! 780. cuBLASLt's heuristic picks the algorithm for each shape once; the choice, with the shape's
//! descriptors, is kept, so a step pays one library call per GEMM. f32 products (the tiny test
//! models, compared bit for bit with the CPU) and every CPU product stay on candle's matmul.

use candle_core::Tensor;

use crate::Result;

/// `x`: `[rows, in]`, `w`: `[out, in]` → `[rows, out]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && crate::cuda::kernel_set() == crate::cuda::KernelSet::Mma
        && matches!(
            x.dtype(),
            candle_core::DType::BF16 | candle_core::DType::F16
        )
        && x.dtype() == w.dtype()
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(1)? == w.dim(1)?
    {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        return Ok(x.apply_op2_no_bwd(&w, &lt::LtLinear)?);
    }
    Ok(x.matmul(&w.t()?)?)
}

#[cfg(feature = "cuda")]
mod lt {
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::{CudaDType, DeviceId};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Shape};
    use half::{bf16, f16};

    use crate::cuda::view;

    /// cuBLASLt's recommended workspace on Hopper.
    const WORKSPACE_BYTES: usize = 32 << 20;
    /// Shapes whose plans are kept; past this (a workload of ever new token counts), a shape's
    /// plan is made for the call and dropped.
    const MAX_PLANS: usize = 8192;

    pub struct LtLinear;

    impl CustomOp2 for LtLinear {
        fn name(&self) -> &'static str {
            "cublaslt-linear"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("cublaslt-linear runs on CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            x_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            match crate::cuda::dtype_of(x) {
                DType::BF16 => run::<bf16>(x, x_l, w, w_l, sys::cudaDataType_t::CUDA_R_16BF),
                DType::F16 => run::<f16>(x, x_l, w, w_l, sys::cudaDataType_t::CUDA_R_16F),
                other => candle_core::bail!("cublaslt-linear: no product for {other:?}"),
            }
        }
    }

    fn lt_err(e: result::CublasError) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
    }

    fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
        dtype: sys::cudaDataType,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let (n, k_w) = w_l.shape().dims2()?;
        if k != k_w {
            candle_core::bail!("cublaslt-linear: [{m}, {k}] times [{n}, {k_w}]ᵀ");
        }
        let dev = x.device.clone();
        let xs = view::<T>(x, x_l)?;
        let ws = view::<T>(w, w_l)?;
        // SAFETY: the product below writes all m * n elements before anything reads them.
        let mut out = unsafe { dev.alloc::<T>(m * n)? };
        if m > 0 && n > 0 {
            let lt = Lt::of(&dev)?;
            lt.matmul(dtype, (m as u64, n as u64, k as u64), &xs, &ws, &mut out)?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, n))))
    }

    /// A product's (m, n, k, element type).
    type ShapeKey = (u64, u64, u64, i32);
    /// Every device's cuBLASLt state, made on first use.
    type Devices = Mutex<Vec<(DeviceId, Arc<Lt>)>>;

    /// One device's cuBLASLt handle, workspace and plans.
    struct Lt {
        dev: CudaDevice,
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        plans: Mutex<HashMap<ShapeKey, Arc<Plan>>>,
    }

    // SAFETY: a cuBLASLt handle may be used from any thread; calls are made on the device's one
    // stream, in the order the engine thread issues them.
    unsafe impl Send for Lt {}
    // SAFETY: as for Send; the plans are behind a mutex and never change once made.
    unsafe impl Sync for Lt {}

    /// A shape's descriptors and the algorithm cuBLASLt chose for it.
    struct Plan {
        desc: sys::cublasLtMatmulDesc_t,
        a: sys::cublasLtMatrixLayout_t,
        b: sys::cublasLtMatrixLayout_t,
        c: sys::cublasLtMatrixLayout_t,
        algo: sys::cublasLtMatmulAlgo_t,
    }

    // SAFETY: descriptors are plain host objects that cuBLASLt only reads after creation.
    unsafe impl Send for Plan {}
    // SAFETY: as for Send.
    unsafe impl Sync for Plan {}

    impl Drop for Plan {
        fn drop(&mut self) {
            // SAFETY: each descriptor was created by this plan and is destroyed once, here.
            unsafe {
                let _ = result::destroy_matrix_layout(self.a);
                let _ = result::destroy_matrix_layout(self.b);
                let _ = result::destroy_matrix_layout(self.c);
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }

    impl Lt {
        fn of(dev: &CudaDevice) -> candle_core::Result<Arc<Lt>> {
            static ALL: OnceLock<Devices> = OnceLock::new();
            let mut all = ALL
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((_, lt)) = all.iter().find(|(id, _)| *id == dev.id()) {
                return Ok(lt.clone());
            }
            let handle = result::create_handle().map_err(lt_err)?;
            // SAFETY: cuBLASLt only uses the workspace as scratch within a call.
            let workspace = unsafe { dev.alloc::<u8>(WORKSPACE_BYTES)? };
            let lt = Arc::new(Lt {
                dev: dev.clone(),
                handle,
                workspace,
                plans: Mutex::default(),
            });
            all.push((dev.id(), lt.clone()));
            Ok(lt)
        }

        /// The plan for `[m, k] · [n, k]ᵀ` in `dtype`, made on first use.
        fn plan(
            &self,
            dtype: sys::cudaDataType,
            (m, n, k): (u64, u64, u64),
        ) -> candle_core::Result<Arc<Plan>> {
            let key: ShapeKey = (m, n, k, dtype as i32);
            if let Some(p) = self
                .plans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
            {
                return Ok(p.clone());
            }
            // Column-major, as cuBLAS sees row-major data: the output's transpose [n, m] is
            // W [k, n]ᵀ times xᵀ [k, m].
            let desc = result::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(lt_err)?;
            let mut plan = Plan {
                desc,
                a: std::ptr::null_mut(),
                b: std::ptr::null_mut(),
                c: std::ptr::null_mut(),
                // SAFETY: an all-zero algorithm is a valid value of this plain C struct; it is
                // overwritten by the heuristic's choice below before any use.
                algo: unsafe { std::mem::zeroed() },
            };
            let transpose =
                candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
                    as i32;
            // SAFETY: the descriptor is live and the attribute is an i32 operation, as
            // cuBLASLt documents for TRANSA.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &transpose as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(lt_err)?;
            plan.a = result::create_matrix_layout(dtype, k, n, k as i64).map_err(lt_err)?;
            plan.b = result::create_matrix_layout(dtype, k, m, k as i64).map_err(lt_err)?;
            plan.c = result::create_matrix_layout(dtype, n, m, n as i64).map_err(lt_err)?;
            let pref = result::create_matmul_pref().map_err(lt_err)?;
            let size = WORKSPACE_BYTES;
            // SAFETY: `pref` is live; the attribute is a usize byte count. The heuristic reads
            // only the live descriptors made above. `pref` is destroyed once, after both.
            let chosen = unsafe {
                let set = result::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &size as *const usize as *const c_void,
                    std::mem::size_of::<usize>(),
                );
                let chosen = set.and_then(|()| {
                    result::get_matmul_algo_heuristic(
                        self.handle,
                        plan.desc,
                        plan.a,
                        plan.b,
                        plan.c,
                        plan.c,
                        pref,
                    )
                });
                let _ = result::destroy_matmul_pref(pref);
                chosen
            }
            .map_err(lt_err)?;
            plan.algo = chosen.algo;
            let plan = Arc::new(plan);
            let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
            if plans.len() < MAX_PLANS {
                plans.insert(key, plan.clone());
            }
            Ok(plan)
        }

        fn matmul<T>(
            &self,
            dtype: sys::cudaDataType,
            (m, n, k): (u64, u64, u64),
            x: &impl DevicePtr<T>,
            w: &impl DevicePtr<T>,
            out: &mut impl DevicePtrMut<T>,
        ) -> candle_core::Result<()> {
            let plan = self.plan(dtype, (m, n, k))?;
            let stream = self.dev.cuda_stream();
            let (alpha, beta) = (1f32, 0f32);
            let (a, _a) = w.device_ptr(&stream);
            let (b, _b) = x.device_ptr(&stream);
            let (c, _c) = out.device_ptr_mut(&stream);
            let (ws, _ws) = self.workspace.device_ptr(&stream);
            // SAFETY: the plan's layouts describe exactly these buffers (W [n, k], x [m, k] and
            // the output [m, n], contiguous, of `dtype`), the workspace holds WORKSPACE_BYTES
            // and the product runs on the stream every buffer belongs to.
            unsafe {
                result::matmul(
                    self.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    a as *const c_void,
                    plan.a,
                    b as *const c_void,
                    plan.b,
                    c as *const c_void,
                    plan.c,
                    c as *mut c_void,
                    plan.c,
                    &plan.algo,
                    ws as *mut c_void,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            }
            .map_err(lt_err)
        }
    }
}
