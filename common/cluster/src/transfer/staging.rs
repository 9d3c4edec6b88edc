//! KV over gRPC on a GPU: copies between the cache and pinned host memory on CUDA streams of
//! their own, never on the engine's.
//!
//! - Sending ([`Staging::to_host`]): the copy of an exported layer waits on the GPU for the
//!   event the engine recorded right after that layer's blocks were gathered, not for the layers
//!   queued after it, so each layer leaves while the next ones are computed. The bytes land in a
//!   pinned buffer that the chunk then carries as [`Bytes`] without another copy.
//! - Receiving ([`Staging::write`]): a verified chunk's bytes go into pinned memory, to the GPU
//!   and into the cache blocks on the staging stream, so a decode node's receives do not queue
//!   behind its decode steps (nor stall them with synchronous copies from pageable memory).
//!
//! Pinned buffers are pooled: allocating page-locked memory costs far more than the copy.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::cuda_backend::cudarc::driver::{
    result, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use candle_core::{DType, Device, Storage, Tensor};

use crate::engine::{ExportedKv, KvData};
use crate::kv::{BlockId, KvCache};
use crate::{Error, Result};

/// Runs the scatter into the cache it is given under the reservation's lock, while it is open.
pub type Gate<'a> = dyn FnMut(&mut dyn FnMut() -> Result<()>) -> Result<()> + 'a;

/// Pinned memory kept for reuse; buffers beyond it are freed when their chunk is done.
const POOL_BYTES: usize = 1 << 30;

fn driver(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
    Error::Internal(format!("CUDA: {e}"))
}

/// Streams and pinned buffers for one GPU's gRPC transfers: one stream for sending and one
/// for receiving, so that neither waits for the other's copies.
pub struct Staging {
    send: Arc<CudaStream>,
    recv: Arc<CudaStream>,
    pool: Arc<Pool>,
    /// Serialises receives: they share their stream and wait for it.
    receiving: Mutex<()>,
}

impl Staging {
    /// The staging of the GPU `device`, shared by every transfer of this process that
    /// involves that GPU (so its pinned buffers are reused across transfers).
    pub fn of_device(device: &Device) -> Result<Arc<Self>> {
        static ALL: Mutex<Vec<(candle_core::DeviceLocation, Arc<Staging>)>> =
            Mutex::new(Vec::new());
        let at = device.location();
        let mut all = ALL.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = all.iter().find(|(l, _)| *l == at) {
            return Ok(s.clone());
        }
        let staging = Self::new(device)?;
        all.push((at, staging.clone()));
        Ok(staging)
    }

    /// The staging of the GPU an export is on.
    pub fn of(kv: &ExportedKv) -> Result<Arc<Self>> {
        match &kv.data {
            KvData::Device { keys, .. } => Self::of_device(keys.device()),
            KvData::Host { .. } => Err(Error::invalid("KV staging is for GPU exports")),
        }
    }

    /// Staging for the GPU `device`.
    fn new(device: &Device) -> Result<Arc<Self>> {
        let cuda = device
            .as_cuda_device()
            .map_err(|_| Error::invalid("KV staging needs a CUDA device"))?;
        let engine_stream = cuda.cuda_stream();
        let context = engine_stream.context();
        context.bind_to_thread().map_err(driver)?;
        // The highest priority the device has: a receive's scatter kernel then takes the next
        // free SM instead of queueing behind every block of the engine's kernels (a prefill's
        // GEMMs fill the GPU for milliseconds at a time).
        let (_, highest) = result::stream::get_priority_range().map_err(driver)?;
        let send = context.new_stream_with_priority(highest).map_err(driver)?;
        let recv = context.new_stream_with_priority(highest).map_err(driver)?;
        Ok(Arc::new(Self {
            send,
            recv,
            pool: Arc::default(),
            receiving: Mutex::new(()),
        }))
    }

    /// The K and V bytes of one exported layer, copied to pinned host memory on the staging
    /// stream once the engine's event for that layer has fired.
    pub async fn to_host(self: &Arc<Self>, kv: &ExportedKv) -> Result<(Bytes, Bytes)> {
        let this = self.clone();
        let KvData::Device {
            keys,
            values,
            ready,
        } = &kv.data
        else {
            return Err(Error::invalid("KV staging copies GPU exports only"));
        };
        let (keys, values, ready) = (keys.clone(), values.clone(), ready.clone());
        // Queueing is quick; waiting for the copy blocks, so both run off the async workers.
        tokio::task::spawn_blocking(move || this.to_host_blocking(&keys, &values, ready))
            .await
            .map_err(|e| Error::Internal(format!("KV staging task: {e}")))?
    }

    fn to_host_blocking(
        &self,
        keys: &Tensor,
        values: &Tensor,
        ready: Option<Arc<CudaEvent>>,
    ) -> Result<(Bytes, Bytes)> {
        self.send.context().bind_to_thread().map_err(driver)?;
        match ready {
            Some(event) => self.send.wait(&event).map_err(driver)?,
            None => {
                // No event: wait for everything queued so far on the stream of the tensor's own
                // device (which need not be the one this staging was first made for).
                let stream = keys
                    .device()
                    .as_cuda_device()
                    .map_err(|_| Error::invalid("KV staging copies GPU tensors only"))?
                    .cuda_stream();
                let event = stream.record_event(None).map_err(driver)?;
                self.send.wait(&event).map_err(driver)?;
            }
        }
        let mut out = Vec::with_capacity(2);
        for t in [keys, values] {
            let (ptr, len, _) = device_bytes(t, &self.send)?;
            let mut buf = self.pool.take(&self.send, len)?;
            // SAFETY: `buf` holds at least `len` bytes of pinned memory that nothing else
            // uses until the copy is done (we wait for it below); the tensor `t` stays alive
            // for as long (the caller holds it).
            unsafe {
                result::memcpy_dtoh_async(
                    &mut buf.as_mut_slice()?[..len],
                    ptr,
                    self.send.cu_stream(),
                )
            }
            .map_err(driver)?;
            out.push(buf);
        }
        wait(&self.send)?;
        let values = out.pop().expect("two buffers");
        let keys = out.pop().expect("two buffers");
        Ok((Bytes::from_owner(keys), Bytes::from_owner(values)))
    }

    /// Writes K and V bytes (already verified) into `blocks` of `layer` of a GPU `cache`:
    /// host → pinned → device staging → the blocks, on the staging stream. `gate` runs the
    /// scatter into the cache (under the reservation's lock, while it is open).
    pub fn write(
        &self,
        cache: &KvCache,
        layer: usize,
        blocks: &[BlockId],
        keys: &[u8],
        values: &[u8],
        gate: &mut Gate<'_>,
    ) -> Result<()> {
        let _one = self.receiving.lock().unwrap_or_else(|p| p.into_inner());
        self.recv.context().bind_to_thread().map_err(driver)?;
        let block_bytes = cache.block_bytes();
        let n = blocks.len() * block_bytes;
        if keys.len() != n || values.len() != n {
            return Err(Error::invalid(
                "KV bytes do not match the blocks they go to",
            ));
        }
        // SAFETY: written in full by the host-to-device copies below before the scatter reads
        // it (both on the staging stream, in order).
        let staged: CudaSlice<u8> = unsafe { self.recv.alloc::<u8>(2 * n) }.map_err(driver)?;
        let mut pinned = self.pool.take(&self.recv, 2 * n)?;
        {
            let host = pinned.as_mut_slice()?;
            host[..n].copy_from_slice(keys);
            host[n..2 * n].copy_from_slice(values);
        }
        let (base, _sync) = staged.device_ptr(&self.recv);
        // SAFETY: `pinned` holds the 2n bytes copied above and stays alive until `wait` below;
        // `staged` has room for 2n bytes.
        unsafe {
            result::memcpy_htod_async(
                base,
                &pinned.as_mut_slice()?[..2 * n],
                self.recv.cu_stream(),
            )
        }
        .map_err(driver)?;
        let ids = self.recv.clone_htod(blocks).map_err(driver)?;
        let (kc, vc) = cache.layer(layer)?;
        let stream = &self.recv;
        gate(&mut || {
            for (dst, src) in [(kc, base), (vc, base + n as u64)] {
                let (cache_ptr, _, device) = device_bytes(dst, stream)?;
                crate::kv::cuda::scatter_blocks_raw(
                    &device,
                    stream,
                    cache_ptr,
                    src,
                    &ids,
                    blocks.len(),
                    block_bytes,
                )?;
            }
            // Written before the reservation's lock is released.
            wait(stream)
        })?;
        drop(pinned);
        Ok(())
    }
}

/// The device address and byte length of a contiguous GPU tensor's elements, and its device.
fn device_bytes(
    t: &Tensor,
    stream: &Arc<CudaStream>,
) -> Result<(u64, usize, candle_core::CudaDevice)> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(Error::invalid("KV staging copies GPU tensors only"));
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Err(Error::invalid("KV staging copies contiguous tensors only"));
    };
    let size = t.dtype().size_in_bytes();
    let base = match t.dtype() {
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(stream).0,
        DType::F16 => s.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        other => return Err(Error::invalid(format!("no KV staging for {other:?}"))),
    };
    Ok((base + (a * size) as u64, (b - a) * size, s.device.clone()))
}

/// Waits for everything queued on `stream` (a chunk's copies: microseconds to milliseconds),
/// spinning briefly and then sleeping, with a bound so a wedged device cannot hang a transfer.
fn wait(stream: &CudaStream) -> Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let event = stream.record_event(None).map_err(driver)?;
    let started = Instant::now();
    loop {
        if event.try_is_complete().map_err(driver)? {
            return Ok(());
        }
        let waited = started.elapsed();
        if waited > TIMEOUT {
            return Err(Error::DeadlineExceeded(format!(
                "a KV staging copy did not complete within {TIMEOUT:?}"
            )));
        }
        if waited < Duration::from_micros(500) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Pinned host buffers for reuse.
#[derive(Default)]
struct Pool {
    free: Mutex<Vec<PinnedHostSlice<u8>>>,
}

impl Pool {
    /// A buffer of at least `len` bytes: the smallest free one that fits, or a new one.
    fn take(self: &Arc<Self>, stream: &Arc<CudaStream>, len: usize) -> Result<Pinned> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        let buf = match reused {
            Some(b) => b,
            None => {
                // Rounded up to a MiB so that chunks of nearby sizes share buffers. Not
                // write-combined: the CPU reads these (checksums, encoding).
                let size = len.max(1).next_multiple_of(1 << 20);
                // SAFETY: the memory is written (by a copy) before it is read.
                unsafe { stream.context().alloc_pinned_with_flags::<u8>(size, 0) }
                    .map_err(driver)?
            }
        };
        Ok(Pinned {
            buf: Some(buf),
            len,
            pool: Arc::downgrade(self),
        })
    }

    fn put(&self, buf: PinnedHostSlice<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = free.iter().map(|b| b.len()).sum();
        if held + buf.len() <= POOL_BYTES {
            free.push(buf);
        }
    }
}

/// A pooled pinned buffer, of which the first `len` bytes are in use; back to the pool when
/// dropped (for a chunk: when its bytes have been encoded).
struct Pinned {
    buf: Option<PinnedHostSlice<u8>>,
    len: usize,
    pool: Weak<Pool>,
}

impl Pinned {
    fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        self.buf
            .as_mut()
            .expect("held until dropped")
            .as_mut_slice()
            .map_err(driver)
    }
}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        let buf = self.buf.as_ref().expect("held until dropped");
        // The copy into it completed before the buffer was handed out as bytes.
        match buf.as_slice() {
            Ok(s) => &s[..self.len],
            Err(_) => &[],
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let (Some(buf), Some(pool)) = (self.buf.take(), self.pool.upgrade()) {
            pool.put(buf);
        }
    }
}
