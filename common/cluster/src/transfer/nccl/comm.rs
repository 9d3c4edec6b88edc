//! A two-rank NCCL communicator, owned outright: only the five calls point-to-point KV transfer
//! needs (unique id, init, send, recv, abort), and an abort that is logged when it fails instead
//! of cudarc's panic in `Drop`.

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::safe::{Id, NcclType};
use candle_core::cuda_backend::cudarc::nccl::{result as nccl_result, sys as nccl_sys};

use crate::{Error, Result};

pub(super) fn nccl_error(e: nccl_result::NcclError) -> Error {
    Error::Internal(format!("NCCL: {e:?}"))
}

/// A fresh NCCL unique id, as the prefill end of a new link makes it.
pub fn new_unique_id() -> Result<[i8; 128]> {
    let id = Id::new().map_err(|e| Error::Internal(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(*id.internal())
}

/// A two-rank communicator. Dropping it aborts it (cancelling pending operations).
pub(super) struct Comm(nccl_sys::ncclComm_t);

impl Comm {
    /// Joins the communicator of `unique` as `rank` of 2; blocks until the other rank joins.
    pub(super) fn join(rank: usize, unique: &Id) -> Result<Self> {
        let mut comm = std::mem::MaybeUninit::uninit();
        let id = nccl_sys::ncclUniqueId {
            internal: *unique.internal(),
        };
        // SAFETY: `comm` is valid writable storage for one communicator handle, `id` is a unique
        // id made by ncclGetUniqueId on the other rank, and 2 ranks with rank 0 or 1 is a valid
        // communicator shape.
        unsafe { nccl_result::comm_init_rank(comm.as_mut_ptr(), 2, id, rank as i32) }
            .map_err(nccl_error)?;
        // SAFETY: ncclCommInitRank succeeded, so it wrote the handle.
        Ok(Self(unsafe { comm.assume_init() }))
    }

    /// Queues a send of `count` elements at device address `ptr` to `peer` on `stream` (a
    /// receive into them when `receive`).
    ///
    /// The caller keeps the memory at `ptr` alive and unaliased by other writers until the
    /// stream has passed the operation.
    pub(super) fn p2p<T: NcclType>(
        &self,
        receive: bool,
        ptr: u64,
        count: usize,
        peer: i32,
        stream: &CudaStream,
    ) -> Result<()> {
        let (comm, dtype, stream) = (self.0, T::as_nccl_type(), stream.cu_stream() as _);
        // SAFETY: `comm` is a live communicator (aborted only in Drop), `ptr` addresses `count`
        // elements of `T` on this communicator's device that the caller keeps alive until the
        // stream has run the operation, and `stream` belongs to the same context.
        unsafe {
            if receive {
                nccl_result::recv(
                    ptr as *mut std::ffi::c_void,
                    count,
                    dtype,
                    peer,
                    comm,
                    stream,
                )
            } else {
                nccl_result::send(
                    ptr as *const std::ffi::c_void,
                    count,
                    dtype,
                    peer,
                    comm,
                    stream,
                )
            }
        }
        .map(|_| ())
        .map_err(nccl_error)
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful ncclCommInitRank and is aborted only here,
        // once; aborting also cancels whatever is still pending on it.
        if let Err(e) = unsafe { nccl_result::comm_abort(self.0) } {
            tracing::warn!(error = ?e, "aborting an NCCL communicator failed");
        }
    }
}
