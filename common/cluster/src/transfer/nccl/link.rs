//! One end of an NCCL link: a thread that owns the communicator and a CUDA stream of its own,
//! and takes commands in order.
//! - `Send`: queues a chunk's K and V on the link's stream behind the event the engine recorded
//!   when it wrote them (not behind later layers); `Flush` waits for all queued sends.
//! - `Recv`: receives K and V into a staging buffer, then, through the reservation's [`Gate`]
//!   (under its lock and only while it is open), scatters them into the cache blocks.
//!
//! Point-to-point operations on a communicator match in issue order, so a link carries one
//! transfer at a time (the sender holds it for the whole transfer). Any failure breaks the link:
//! its communicator is aborted and the next transfer opens a new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::safe::{Id, NcclType};
use candle_core::{DType, Device, Storage};
use tokio::sync::oneshot;

use super::comm::Comm;
use super::NcclConfig;
use crate::engine::{ExportedKv, KvData};
use crate::kv::{BlockId, KvCache};
use crate::{Error, Result};

/// What the receiving thread writes into the cache under: `while_open` runs the write under
/// the reservation's lock, and only while the reservation is open.
pub trait Gate: Send + Sync {
    fn while_open(&self, write: &mut dyn FnMut() -> Result<()>) -> Result<()>;
}

enum Command {
    /// Queues a chunk's send; `done` answers once it is queued (its data stays held until sent).
    Send {
        kv: ExportedKv,
        done: oneshot::Sender<Result<()>>,
    },
    /// Answers once every queued send has completed.
    Flush { done: oneshot::Sender<Result<()>> },
    Recv {
        cache: KvCache,
        layer: usize,
        blocks: Vec<BlockId>,
        gate: Arc<dyn Gate>,
        done: oneshot::Sender<Result<usize>>,
    },
}

/// One end of a link.
pub struct NcclLink {
    id: String,
    commands: Mutex<std_mpsc::Sender<Command>>,
    broken: Arc<AtomicBool>,
    /// Held by a sender for a whole transfer.
    busy: Arc<tokio::sync::Mutex<()>>,
}

impl NcclLink {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Opens one end: a thread that joins the communicator as `rank` and then serves commands.
    /// Resolves once the communicator is up.
    pub async fn open(
        id: String,
        unique_id: [i8; 128],
        rank: usize,
        device: &Device,
        config: &NcclConfig,
    ) -> Result<Arc<Self>> {
        let cuda = device
            .as_cuda_device()
            .map_err(|_| Error::invalid("NCCL transfers need a CUDA device"))?;
        let engine_stream = cuda.cuda_stream();
        let stream = engine_stream.context().new_stream().map_err(driver)?;
        let (tx, rx) = std_mpsc::channel();
        let broken = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = oneshot::channel();
        let thread = LinkThread {
            stream,
            engine_stream,
            rank,
            unique: Id::uninit(unique_id.map(|c| c as _)),
            op_timeout: config.op_timeout(),
            broken: broken.clone(),
        };
        std::thread::Builder::new()
            .name(format!("nccl-{id}"))
            .spawn(move || thread.serve(ready_tx, rx))
            .map_err(|e| Error::Internal(format!("cannot start the NCCL thread: {e}")))?;
        let connect_timeout = config.connect_timeout();
        let joined = tokio::time::timeout(connect_timeout, ready).await;
        match joined {
            Ok(Ok(Ok(()))) => Ok(Arc::new(Self {
                id,
                commands: Mutex::new(tx),
                broken,
                busy: Arc::default(),
            })),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Internal("the NCCL thread ended".into())),
            Err(_) => {
                broken.store(true, Ordering::SeqCst);
                Err(Error::DeadlineExceeded(format!(
                    "the NCCL link {id} was not joined within {connect_timeout:?}"
                )))
            }
        }
    }

    /// Holds the link for one transfer.
    pub async fn hold(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.busy.clone().lock_owned().await
    }

    /// Queues one exported chunk's K and V (`[blocks, block_size, kv_heads, head_dim]` on this
    /// GPU) for sending; [`flush`](Self::flush) waits for all of them.
    pub async fn send(&self, kv: ExportedKv) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.command(Command::Send { kv, done })?;
        self.outcome(rx).await
    }

    /// Waits until every queued send has completed.
    pub async fn flush(&self) -> Result<()> {
        let (done, rx) = oneshot::channel();
        self.command(Command::Flush { done })?;
        self.outcome(rx).await
    }

    /// Receives one chunk into `blocks` of `layer`, written only while `gate` is open.
    pub async fn recv(
        &self,
        cache: KvCache,
        layer: usize,
        blocks: Vec<BlockId>,
        gate: Arc<dyn Gate>,
    ) -> Result<usize> {
        let (done, rx) = oneshot::channel();
        self.command(Command::Recv {
            cache,
            layer,
            blocks,
            gate,
            done,
        })?;
        self.outcome(rx).await
    }

    /// Breaks the link: its thread aborts the communicator once idle.
    pub fn close(&self) {
        self.broken.store(true, Ordering::SeqCst);
        // A dropped sender ends the thread's loop.
        *self.commands.lock().unwrap_or_else(|p| p.into_inner()) = std_mpsc::channel().0;
    }

    fn command(&self, c: Command) -> Result<()> {
        if self.is_broken() {
            return Err(Error::Unavailable(format!(
                "the NCCL link {} is broken",
                self.id
            )));
        }
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(c)
            .map_err(|_| Error::Unavailable(format!("the NCCL link {} is closed", self.id)))
    }

    async fn outcome<T>(&self, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        let r = rx.await.unwrap_or_else(|_| {
            Err(Error::Unavailable(format!(
                "the NCCL link {} ended",
                self.id
            )))
        });
        if r.is_err() {
            self.close();
        }
        r
    }
}

/// The links a node holds, by id (decode side) or by peer address (prefill side).
#[derive(Default)]
pub struct Links {
    links: Mutex<HashMap<String, Arc<NcclLink>>>,
}

impl Links {
    pub fn get(&self, key: &str) -> Option<Arc<NcclLink>> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        match links.get(key) {
            Some(l) if l.is_broken() => {
                links.remove(key);
                None
            }
            other => other.cloned(),
        }
    }

    /// The link `key` names, or the error a handshake naming a missing one gets.
    pub fn get_or_refuse(&self, key: &str) -> Result<Arc<NcclLink>> {
        self.get(key).ok_or_else(|| {
            Error::NotFound(format!("no NCCL link {key:?} (never joined, or broken)"))
        })
    }

    pub fn insert(&self, key: String, link: Arc<NcclLink>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = links.insert(key, link) {
            old.close();
        }
    }
}

fn driver(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
    Error::Internal(format!("CUDA: {e}"))
}

/// What a link's thread owns.
struct LinkThread {
    stream: Arc<CudaStream>,
    engine_stream: Arc<CudaStream>,
    rank: usize,
    unique: Id,
    /// How long one chunk's send or receive may take before the link is declared dead.
    op_timeout: Duration,
    broken: Arc<AtomicBool>,
}

impl LinkThread {
    /// Joins the communicator, then runs commands until the link breaks.
    fn serve(self, ready: oneshot::Sender<Result<()>>, commands: std_mpsc::Receiver<Command>) {
        let broken = self.broken.clone();
        if let Err(e) = self.stream.context().bind_to_thread() {
            let _ = ready.send(Err(driver(e)));
            return;
        }
        let comm = match Comm::join(self.rank, &self.unique) {
            Ok(c) => c,
            Err(e) => {
                broken.store(true, Ordering::SeqCst);
                let _ = ready.send(Err(e));
                return;
            }
        };
        if ready.send(Ok(())).is_err() {
            broken.store(true, Ordering::SeqCst);
            return;
        }
        let peer = 1 - self.rank as i32;
        // Sends queued on the stream, held until it has passed them.
        let mut in_flight: Vec<ExportedKv> = Vec::new();
        while let Ok(command) = commands.recv() {
            let failed = match command {
                Command::Send { kv, done } => {
                    let r = send(&comm, &self.stream, &self.engine_stream, &kv, peer);
                    in_flight.push(kv);
                    let failed = r.is_err();
                    let _ = done.send(r);
                    failed
                }
                Command::Flush { done } => {
                    let r = wait(&self.stream, self.op_timeout);
                    in_flight.clear();
                    let failed = r.is_err();
                    let _ = done.send(r);
                    failed
                }
                Command::Recv {
                    cache,
                    layer,
                    blocks,
                    gate,
                    done,
                } => {
                    let target = Target {
                        cache: &cache,
                        layer,
                        blocks: &blocks,
                        gate: gate.as_ref(),
                    };
                    let r = recv(&comm, &self.stream, &target, peer, self.op_timeout);
                    let failed = r.is_err();
                    let _ = done.send(r);
                    failed
                }
            };
            if failed || broken.load(Ordering::SeqCst) {
                break;
            }
        }
        broken.store(true, Ordering::SeqCst);
        // Dropping the communicator aborts it, cancelling anything still pending; only then may
        // the data of queued sends go.
        drop(comm);
        let _ = self.stream.synchronize();
        drop(in_flight);
    }
}

/// Waits for everything queued on `stream`, polling so that a dead peer cannot hang us.
fn wait(stream: &CudaStream, timeout: Duration) -> Result<()> {
    let event = stream.record_event(None).map_err(driver)?;
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        if event.try_is_complete().map_err(driver)? {
            return Ok(());
        }
        let now = Instant::now();
        if now > deadline {
            return Err(Error::DeadlineExceeded(format!(
                "an NCCL transfer did not complete within {timeout:?}"
            )));
        }
        // A chunk takes microseconds to a few milliseconds: spin (yielding) at first, so that
        // completion is seen at once, then sleep.
        if now < started + Duration::from_millis(2) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

fn send(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    engine_stream: &Arc<CudaStream>,
    kv: &ExportedKv,
    peer: i32,
) -> Result<()> {
    // The tensors were written by the engine's stream: ours waits for that on the GPU (for the
    // event recorded right after them, when there is one, so not for later layers).
    let KvData::Device {
        keys,
        values,
        ready,
    } = &kv.data
    else {
        return Err(Error::invalid("NCCL sends GPU tensors only"));
    };
    match ready {
        Some(event) => stream.wait(event).map_err(driver)?,
        None => {
            let event = engine_stream.record_event(None).map_err(driver)?;
            stream.wait(&event).map_err(driver)?;
        }
    }
    for t in [keys, values] {
        // Sent from its own memory, which the caller holds until the send is done.
        if !t.is_contiguous() {
            return Err(Error::invalid("NCCL sends contiguous tensors only"));
        }
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            return Err(Error::invalid("NCCL sends GPU tensors only"));
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            return Err(Error::invalid("NCCL sends contiguous tensors only"));
        };
        match t.dtype() {
            DType::BF16 => send_slice(comm, stream, s.as_cuda_slice::<half::bf16>()?, a, b, peer)?,
            DType::F16 => send_slice(comm, stream, s.as_cuda_slice::<half::f16>()?, a, b, peer)?,
            DType::F32 => send_slice(comm, stream, s.as_cuda_slice::<f32>()?, a, b, peer)?,
            other => return Err(Error::invalid(format!("no NCCL transfer for {other:?}"))),
        }
    }
    Ok(())
}

fn send_slice<T: NcclType + DeviceRepr>(
    comm: &Comm,
    stream: &CudaStream,
    s: &CudaSlice<T>,
    a: usize,
    b: usize,
    peer: i32,
) -> Result<()> {
    let view = s.slice(a..b);
    let (ptr, _) = view.device_ptr(stream);
    comm.p2p::<T>(false, ptr, b - a, peer, stream)
}

/// Where one received chunk goes.
struct Target<'a> {
    cache: &'a KvCache,
    layer: usize,
    blocks: &'a [BlockId],
    gate: &'a dyn Gate,
}

fn recv(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    target: &Target<'_>,
    peer: i32,
    timeout: Duration,
) -> Result<usize> {
    match target.cache.spec().dtype {
        DType::BF16 => recv_typed::<half::bf16>(comm, stream, target, peer, timeout),
        DType::F16 => recv_typed::<half::f16>(comm, stream, target, peer, timeout),
        DType::F32 => recv_typed::<f32>(comm, stream, target, peer, timeout),
        other => Err(Error::invalid(format!("no NCCL transfer for {other:?}"))),
    }
}

fn recv_typed<T: NcclType + DeviceRepr + candle_core::cuda_backend::CudaDType>(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    target: &Target<'_>,
    peer: i32,
    timeout: Duration,
) -> Result<usize> {
    let spec = target.cache.spec();
    let block_elems = spec.block_size * spec.token_elems();
    let n = target.blocks.len() * block_elems;
    // SAFETY: the staging buffers are written in full by the two receives below before anything
    // reads them (the scatter runs after `wait`), so their uninitialised contents are never seen.
    let keys = unsafe { stream.alloc::<T>(n) }.map_err(driver)?;
    // SAFETY: as for `keys`.
    let values = unsafe { stream.alloc::<T>(n) }.map_err(driver)?;
    for buf in [&keys, &values] {
        let (ptr, _) = buf.device_ptr(stream);
        comm.p2p::<T>(true, ptr, n, peer, stream)?;
    }
    wait(stream, timeout)?;
    // The data is here; it goes into the cache only while the reservation is still open, and is
    // written before the gate is released.
    let ids = stream.clone_htod(target.blocks).map_err(driver)?;
    let (kc, vc) = target.cache.layer(target.layer)?;
    target.gate.while_open(&mut || {
        for (dst, src) in [(kc, &keys), (vc, &values)] {
            let (storage, layout) = dst.storage_and_layout();
            let Storage::Cuda(c) = &*storage else {
                return Err(Error::invalid("NCCL receives into a GPU cache only"));
            };
            let base = c.as_cuda_slice::<T>()?;
            let (cache_ptr, _) = base.device_ptr(stream);
            let cache_ptr = cache_ptr + (layout.start_offset() * std::mem::size_of::<T>()) as u64;
            let (buf_ptr, _) = src.device_ptr(stream);
            crate::kv::cuda::scatter_blocks_raw(
                &c.device,
                stream,
                cache_ptr,
                buf_ptr,
                &ids,
                target.blocks.len(),
                block_elems * std::mem::size_of::<T>(),
            )?;
        }
        wait(stream, timeout)
    })?;
    Ok(2 * n * std::mem::size_of::<T>())
}
