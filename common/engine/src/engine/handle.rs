//! The engine as an actor: one thread owns the [`EngineCore`] and runs steps while there is work;
//! async callers talk to it over a bounded command channel and get one event stream per request.
//! A caller that drops its [`RequestStream`] cancels the request, and its KV blocks are freed at
//! the next step.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::core::{EngineCore, EngineStats};
use super::sequence::{GenerateRequest, Placement, SeqEvent, SeqId};
use crate::kv::{KvCache, KvEventLog};
use crate::sampling::SampledToken;
use crate::{Error, Result};

/// Commands queued beyond this make callers wait: back-pressure instead of unbounded memory.
const COMMAND_QUEUE: usize = 1024;

enum Command {
    Add {
        request: GenerateRequest,
        placement: Placement,
        events: mpsc::UnboundedSender<SeqEvent>,
        reply: oneshot::Sender<Result<SeqId>>,
    },
    Activate {
        id: SeqId,
        first: SampledToken,
        reply: oneshot::Sender<Result<()>>,
    },
    PrefillLocally {
        id: SeqId,
        reply: oneshot::Sender<Result<()>>,
    },
    Abort(SeqId),
    AbortAll,
    Stats(oneshot::Sender<EngineStats>),
}

/// A cheap, cloneable handle to an engine thread. The thread ends when every handle is gone and
/// the last request has finished.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    cache: KvCache,
    kv_events: Arc<KvEventLog>,
    max_model_len: usize,
    vocab_size: usize,
}

/// The events of one request. Dropping it cancels the request and frees its blocks.
pub struct RequestStream {
    pub id: SeqId,
    events: mpsc::UnboundedReceiver<SeqEvent>,
    commands: mpsc::Sender<Command>,
    done: bool,
}

impl RequestStream {
    /// The next event; `None` after the final `Finished`/`Failed` event.
    pub async fn next(&mut self) -> Option<SeqEvent> {
        let event = self.events.recv().await;
        if matches!(
            event,
            None | Some(SeqEvent::Finished(_)) | Some(SeqEvent::Failed(_))
        ) {
            self.done = true;
        }
        event
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            // Wakes an idle engine at once; when the queue is full, the engine still finds the
            // closed stream at its next step.
            let _ = self.commands.try_send(Command::Abort(self.id));
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn(core: EngineCore) -> Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let cache = core.cache().clone();
        let kv_events = core.kv_events().clone();
        let max_model_len = core.max_model_len();
        let vocab_size = core.vocab_size();
        let thread = std::thread::Builder::new()
            .name("pd-engine".into())
            .spawn(move || run(core, rx))?;
        Ok((
            Self {
                commands: tx,
                cache,
                kv_events,
                max_model_len,
                vocab_size,
            },
            thread,
        ))
    }

    /// The engine's KV cache: a receiver writes arriving KV into blocks reserved through
    /// [`Placement::Remote`], which nothing else touches until [`Self::activate`].
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Token ids run from 0 to this (exclusive).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// What the engine's prefix cache stores and evicts.
    pub fn kv_events(&self) -> &Arc<KvEventLog> {
        &self.kv_events
    }

    /// Submits a request to run here from start to end. Invalid requests are refused here,
    /// with the reason.
    pub async fn generate(&self, request: GenerateRequest) -> Result<RequestStream> {
        self.submit(request, Placement::Local).await
    }

    /// Submits a request whose KV is computed as `placement` says.
    pub async fn submit(
        &self,
        request: GenerateRequest,
        placement: Placement,
    ) -> Result<RequestStream> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Add {
                request,
                placement,
                events: events_tx,
                reply,
            })
            .await
            .map_err(|_| Error::EngineClosed)?;
        let id = answer.await.map_err(|_| Error::EngineClosed)??;
        Ok(RequestStream {
            id,
            events,
            commands: self.commands.clone(),
            done: false,
        })
    }

    /// The remote KV of sequence `id` is in its blocks; `first` is the token sampled after it.
    pub async fn activate(&self, id: SeqId, first: SampledToken) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Activate { id, first, reply }).await?;
        answer.await.map_err(|_| Error::EngineClosed)?
    }

    /// Sequence `id` gives up on remote KV and computes its prompt here.
    pub async fn prefill_locally(&self, id: SeqId) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::PrefillLocally { id, reply }).await?;
        answer.await.map_err(|_| Error::EngineClosed)?
    }

    /// Ends every request now with `Unavailable`, so that callers can move them elsewhere.
    pub async fn abort_all(&self) -> Result<()> {
        self.send(Command::AbortAll).await
    }

    async fn send(&self, cmd: Command) -> Result<()> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| Error::EngineClosed)
    }

    pub async fn abort(&self, id: SeqId) -> Result<()> {
        self.commands
            .send(Command::Abort(id))
            .await
            .map_err(|_| Error::EngineClosed)
    }

    pub async fn stats(&self) -> Result<EngineStats> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Stats(reply))
            .await
            .map_err(|_| Error::EngineClosed)?;
        answer.await.map_err(|_| Error::EngineClosed)
    }
}

fn run(mut core: EngineCore, mut commands: mpsc::Receiver<Command>) {
    let mut open = true;
    loop {
        // Take everything that arrived during the last step, so new requests join the next one.
        while open {
            match commands.try_recv() {
                Ok(cmd) => handle(&mut core, cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if core.has_work() {
            match core.step() {
                // Nothing could run (every block is held): only a command can change that.
                Ok(0) if !open => return,
                Ok(0) => match commands.blocking_recv() {
                    Some(cmd) => handle(&mut core, cmd),
                    None => open = false,
                },
                Ok(_) => {}
                // The failed sequences have been told; the engine itself carries on.
                Err(e) => tracing::error!(error = %e, "engine step failed"),
            }
            continue;
        }
        if !open {
            return;
        }
        // A stream dropped while the command queue was full is only noticed here.
        core.drop_abandoned();
        match commands.blocking_recv() {
            Some(cmd) => handle(&mut core, cmd),
            None => return,
        }
    }
}

fn handle(core: &mut EngineCore, cmd: Command) {
    match cmd {
        Command::Add {
            request,
            placement,
            events,
            reply,
        } => {
            let _ = reply.send(core.submit(request, placement, events));
        }
        Command::Activate { id, first, reply } => {
            let _ = reply.send(core.activate(id, first));
        }
        Command::PrefillLocally { id, reply } => {
            let _ = reply.send(core.prefill_locally(id));
        }
        Command::Abort(id) => {
            core.abort(id);
        }
        Command::AbortAll => core.abort_all(),
        Command::Stats(reply) => {
            let _ = reply.send(core.stats());
        }
    }
}
