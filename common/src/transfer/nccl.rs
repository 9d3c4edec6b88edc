//! KV over NCCL: a prefill node's GPU sends each exported layer's blocks straight to the decode
//! node's GPU.
//!
//! A link joins one prefill node (rank 0) and one decode node (rank 1) in a two-rank NCCL
//! communicator. The prefill node makes the unique id and hands it over `KvTransfer.NcclConnect`;
//! both ends then call `ncclCommInitRank`. Each end of a link has one thread that owns its
//! communicator and a CUDA stream of its own, and takes commands in order:
//! - `Send`: queues a chunk's K and V on the link's stream behind the event the engine recorded
//!   when it wrote them (not behind later layers); `Flush` waits for all queued sends.
//! - `Recv`: receives K and V into a staging buffer, then, under the transfer's lock and only
//!   while the reservation is open, scatters them into the cache blocks.
//!
//! Point-to-point operations on a communicator match in issue order, so a link carries one
//! transfer at a time (the sender holds the link for the whole transfer), and every chunk is
//! announced on the transfer's gRPC stream before its data is sent: the receiver posts its
//! receive when the announcement arrives. Any failure breaks the link (its communicator is
//! aborted); the next transfer opens a new one, and gRPC remains the fallback.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::safe::{Id, NcclType};
use candle_core::cuda_backend::cudarc::nccl::{result as nccl_result, sys as nccl_sys};
use candle_core::{DType, Device, Storage};
use tokio::sync::oneshot;

use pd_proto::v1::kv_push_message::Message as PushMessage;
use pd_proto::v1::kv_transfer_client::KvTransferClient;
use pd_proto::v1::{KvHandshake, KvPushAck, KvPushMessage, ModelFingerprint, NcclConnectRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Response;

use super::grpc::SEND_QUEUE;
use crate::engine::ExportedKv;
use crate::kv::{BlockId, KvCache};
use crate::telemetry::{names, with_request_id};
use crate::{Error, Result};

/// How long one chunk's send or receive may take before the link is declared dead.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long both ends may take to join a new link.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

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
    busy: tokio::sync::Mutex<()>,
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
    ) -> Result<Arc<Self>> {
        let cuda = device
            .as_cuda_device()
            .map_err(|_| Error::invalid("NCCL transfers need a CUDA device"))?;
        let engine_stream = cuda.cuda_stream();
        let stream = engine_stream.context().new_stream().map_err(driver)?;
        let (tx, rx) = std_mpsc::channel();
        let broken = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = oneshot::channel();
        let thread_broken = broken.clone();
        let unique = Id::uninit(unique_id.map(|c| c as _));
        std::thread::Builder::new()
            .name(format!("nccl-{id}"))
            .spawn(move || {
                serve(
                    stream,
                    engine_stream,
                    rank,
                    unique,
                    ready_tx,
                    rx,
                    thread_broken,
                )
            })
            .map_err(|e| Error::Internal(format!("cannot start the NCCL thread: {e}")))?;
        let joined = tokio::time::timeout(CONNECT_TIMEOUT, ready).await;
        match joined {
            Ok(Ok(Ok(()))) => Ok(Arc::new(Self {
                id,
                commands: Mutex::new(tx),
                broken,
                busy: tokio::sync::Mutex::new(()),
            })),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Internal("the NCCL thread ended".into())),
            Err(_) => {
                broken.store(true, Ordering::SeqCst);
                Err(Error::DeadlineExceeded(format!(
                    "the NCCL link {id} was not joined within {CONNECT_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Holds the link for one transfer.
    pub async fn hold(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.busy.lock().await
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
pub struct NcclLinks {
    links: Mutex<HashMap<String, Arc<NcclLink>>>,
}

impl NcclLinks {
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

    pub fn insert(&self, key: String, link: Arc<NcclLink>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = links.insert(key, link) {
            old.close();
        }
    }
}

/// A fresh NCCL unique id, as the prefill end of a new link makes it.
pub fn new_unique_id() -> Result<[i8; 128]> {
    let id = Id::new().map_err(|e| Error::Internal(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().map(|c| c as i8))
}

fn driver(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
    Error::Internal(format!("CUDA: {e}"))
}

fn nccl(e: candle_core::cuda_backend::cudarc::nccl::result::NcclError) -> Error {
    Error::Internal(format!("NCCL: {e:?}"))
}

/// A two-rank communicator. Dropping it aborts it (cancelling pending operations); unlike
/// cudarc's own, a failed abort is logged rather than a panic.
struct Comm(nccl_sys::ncclComm_t);

impl Comm {
    fn join(rank: usize, unique: Id) -> Result<Self> {
        let mut comm = std::mem::MaybeUninit::uninit();
        let id = nccl_sys::ncclUniqueId {
            internal: *unique.internal(),
        };
        unsafe { nccl_result::comm_init_rank(comm.as_mut_ptr(), 2, id, rank as i32) }
            .map_err(nccl)?;
        Ok(Self(unsafe { comm.assume_init() }))
    }

    /// Queues a send of `count` elements at `ptr` to `peer` on `stream` (a receive into them
    /// when `receive`).
    fn p2p<T: NcclType>(
        &self,
        receive: bool,
        ptr: u64,
        count: usize,
        peer: i32,
        stream: &CudaStream,
    ) -> Result<()> {
        let (comm, dtype, stream) = (self.0, T::as_nccl_type(), stream.cu_stream() as _);
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
        .map_err(nccl)
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if let Err(e) = unsafe { nccl_result::comm_abort(self.0) } {
            tracing::warn!(error = ?e, "aborting an NCCL communicator failed");
        }
    }
}

/// The link's thread: joins the communicator, then runs commands until the link breaks.
fn serve(
    stream: Arc<CudaStream>,
    engine_stream: Arc<CudaStream>,
    rank: usize,
    unique: Id,
    ready: oneshot::Sender<Result<()>>,
    commands: std_mpsc::Receiver<Command>,
    broken: Arc<AtomicBool>,
) {
    if let Err(e) = stream.context().bind_to_thread() {
        let _ = ready.send(Err(driver(e)));
        return;
    }
    let comm = match Comm::join(rank, unique) {
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
    let peer = 1 - rank as i32;
    // Sends queued on the stream, held until it has passed them.
    let mut in_flight: Vec<ExportedKv> = Vec::new();
    while let Ok(command) = commands.recv() {
        let failed = match command {
            Command::Send { kv, done } => {
                let r = send(&comm, &stream, &engine_stream, &kv, peer);
                in_flight.push(kv);
                let failed = r.is_err();
                let _ = done.send(r);
                failed
            }
            Command::Flush { done } => {
                let r = wait(&stream, OP_TIMEOUT);
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
                let r = recv(&comm, &stream, &cache, layer, &blocks, gate.as_ref(), peer);
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
    // Dropping the communicator aborts it, cancelling anything still pending; only then may the
    // data of queued sends go.
    drop(comm);
    let _ = stream.synchronize();
    drop(in_flight);
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
    match &kv.ready {
        Some(event) => stream.wait(event).map_err(driver)?,
        None => {
            let event = engine_stream.record_event(None).map_err(driver)?;
            stream.wait(&event).map_err(driver)?;
        }
    }
    for t in [&kv.keys, &kv.values] {
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

#[allow(clippy::too_many_arguments)]
fn recv(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    cache: &KvCache,
    layer: usize,
    blocks: &[BlockId],
    gate: &dyn Gate,
    peer: i32,
) -> Result<usize> {
    let spec = cache.spec();
    let block_elems = spec.block_size * spec.token_elems();
    let n = blocks.len() * block_elems;
    match spec.dtype {
        DType::BF16 => recv_typed::<half::bf16>(
            comm,
            stream,
            cache,
            layer,
            blocks,
            gate,
            peer,
            n,
            block_elems,
        ),
        DType::F16 => recv_typed::<half::f16>(
            comm,
            stream,
            cache,
            layer,
            blocks,
            gate,
            peer,
            n,
            block_elems,
        ),
        DType::F32 => recv_typed::<f32>(
            comm,
            stream,
            cache,
            layer,
            blocks,
            gate,
            peer,
            n,
            block_elems,
        ),
        other => Err(Error::invalid(format!("no NCCL transfer for {other:?}"))),
    }
}

#[allow(clippy::too_many_arguments)]
fn recv_typed<T: NcclType + DeviceRepr + candle_core::cuda_backend::CudaDType>(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    cache: &KvCache,
    layer: usize,
    blocks: &[BlockId],
    gate: &dyn Gate,
    peer: i32,
    n: usize,
    block_elems: usize,
) -> Result<usize> {
    let keys = unsafe { stream.alloc::<T>(n) }.map_err(driver)?;
    let values = unsafe { stream.alloc::<T>(n) }.map_err(driver)?;
    for buf in [&keys, &values] {
        let (ptr, _) = buf.device_ptr(stream);
        comm.p2p::<T>(true, ptr, n, peer, stream)?;
    }
    wait(stream, OP_TIMEOUT)?;
    // The data is here; it goes into the cache only while the reservation is still open, and is
    // written before the gate is released.
    let ids = stream.clone_htod(blocks).map_err(driver)?;
    let (kc, vc) = cache.layer(layer)?;
    gate.while_open(&mut || {
        for (dst, src) in [(kc, &keys), (vc, &values)] {
            let (storage, layout) = dst.storage_and_layout();
            let Storage::Cuda(c) = &*storage else {
                return Err(Error::invalid("NCCL receives into a GPU cache only"));
            };
            let base = c.as_cuda_slice::<T>()?;
            let (cache_ptr, _) = base.device_ptr(stream);
            let cache_ptr = cache_ptr + (layout.start_offset() * std::mem::size_of::<T>()) as u64;
            let (buf_ptr, _) = src.device_ptr(stream);
            crate::cuda::kv::scatter_blocks_raw(
                &c.device,
                stream,
                cache_ptr,
                buf_ptr,
                &ids,
                blocks.len(),
                block_elems * std::mem::size_of::<T>(),
            )?;
        }
        wait(stream, OP_TIMEOUT)
    })?;
    Ok(2 * n * std::mem::size_of::<T>())
}

/// The prefill end's NCCL links, one per decode node, opened on first use.
#[derive(Default)]
pub struct NcclSender {
    links: NcclLinks,
    /// Held while a link is being opened, so that a burst of first transfers to a decode node
    /// opens one link rather than one each (each replacing the last).
    opening: tokio::sync::Mutex<()>,
}

impl NcclSender {
    /// The link to the decode node at `address`, opening it (as rank 0) if there is none.
    async fn link(
        &self,
        client: &mut KvTransferClient<Channel>,
        address: &str,
        fingerprint: &ModelFingerprint,
        device: &candle_core::Device,
    ) -> Result<Arc<NcclLink>> {
        if let Some(link) = self.links.get(address) {
            return Ok(link);
        }
        let _opening = self.opening.lock().await;
        if let Some(link) = self.links.get(address) {
            return Ok(link);
        }
        let unique = new_unique_id()?;
        let link_id = format!("{:016x}", rand::random::<u64>());
        // Both ends must be inside ncclCommInitRank at once: ours runs while the decode node
        // answers NcclConnect (which returns once it has joined).
        let opening = tokio::spawn({
            let (link_id, device) = (link_id.clone(), device.clone());
            async move { NcclLink::open(link_id, unique, 0, &device).await }
        });
        let request = NcclConnectRequest {
            unique_id: unique.map(|b| b as u8).to_vec(),
            link_id: link_id.clone(),
            fingerprint: Some(fingerprint.clone()),
        };
        let joined = tokio::time::timeout(CONNECT_TIMEOUT, client.nccl_connect(request)).await;
        match joined {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                opening.abort();
                return Err(Error::from(status));
            }
            Err(_) => {
                opening.abort();
                return Err(Error::DeadlineExceeded(format!(
                    "NCCL link to {address} not joined"
                )));
            }
        }
        let link = opening
            .await
            .map_err(|e| Error::Internal(format!("NCCL link task: {e}")))??;
        tracing::info!(%address, link = %link_id, "NCCL link open");
        self.links.insert(address.to_string(), link.clone());
        Ok(link)
    }

    /// As [`push`], with the KV bytes going GPU to GPU over the link to `address`: each chunk is
    /// announced on the gRPC stream, then sent over NCCL.
    pub async fn push(
        &self,
        mut client: KvTransferClient<Channel>,
        address: &str,
        request_id: &str,
        mut handshake: KvHandshake,
        device: &candle_core::Device,
        mut exported: mpsc::UnboundedReceiver<ExportedKv>,
    ) -> Result<KvPushAck> {
        let started = Instant::now();
        let fingerprint = handshake
            .fingerprint
            .clone()
            .ok_or_else(|| Error::invalid("a KV handshake needs a fingerprint"))?;
        let link = self
            .link(&mut client, address, &fingerprint, device)
            .await?;
        // One transfer at a time on a link: sends and receives pair up in order.
        let _held = link.hold().await;
        handshake.backend = "nccl".into();
        handshake.nccl_link = link.id().to_string();
        let (tx, rx) = mpsc::channel::<KvPushMessage>(SEND_QUEUE);
        let sender = async {
            let open = KvPushMessage {
                message: Some(PushMessage::Handshake(handshake)),
            };
            if tx.send(open).await.is_err() {
                return Ok(0u64);
            }
            let mut bytes = 0u64;
            while let Some(kv) = exported.recv().await {
                let announce = pd_proto::v1::KvChunk {
                    layer: kv.layer as u32,
                    first_block: kv.first_block as u32,
                    num_blocks: kv.keys.dims()[0] as u32,
                    ..Default::default()
                };
                if tx
                    .send(KvPushMessage {
                        message: Some(PushMessage::Chunk(announce)),
                    })
                    .await
                    .is_err()
                {
                    return Ok(bytes);
                }
                bytes += (2 * kv.keys.elem_count() * kv.keys.dtype().size_in_bytes()) as u64;
                link.send(kv).await?;
            }
            link.flush().await?;
            drop(tx);
            Ok::<u64, Error>(bytes)
        };
        let call = client.push(with_request_id(ReceiverStream::new(rx), request_id));
        tokio::pin!(sender);
        tokio::pin!(call);
        let outcome = tokio::select! {
            answer = &mut call => answer.map(Response::into_inner).map_err(Error::from),
            sent = &mut sender => match sent {
                Ok(_) => call.await.map(Response::into_inner).map_err(Error::from),
                Err(e) => Err(e),
            },
        };
        match &outcome {
            Ok(ack) => {
                metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, "direction" => "sent")
                    .increment(ack.bytes);
                metrics::histogram!(names::KV_TRANSFER_SECONDS, "direction" => "sent")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(_) => {
                // The link's state is unknown (a send may be pending): never reuse it.
                link.close();
                metrics::counter!(names::KV_TRANSFER_FAILURES_TOTAL, "direction" => "sent")
                    .increment(1)
            }
        }
        outcome
    }
}
