//! The engine as an actor: one thread owns the [`EngineCore`] and runs steps while there is work;
//! async callers talk to it over a bounded command channel and get one event stream per request.
//! A caller that drops its [`RequestStream`] cancels the request, and its KV blocks are freed at
//! the next step.

use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::core::{EngineCore, EngineStats};
use super::sequence::{GenerateRequest, SeqEvent, SeqId};
use crate::{Error, Result};

/// Commands queued beyond this make callers wait: back-pressure instead of unbounded memory.
const COMMAND_QUEUE: usize = 1024;

enum Command {
    Add {
        request: GenerateRequest,
        events: mpsc::UnboundedSender<SeqEvent>,
        reply: oneshot::Sender<Result<SeqId>>,
    },
    Abort(SeqId),
    Stats(oneshot::Sender<EngineStats>),
}

/// A cheap, cloneable handle to an engine thread. The thread ends when every handle is gone and
/// the last request has finished.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
}

/// The events of one request. Dropping it cancels the request.
pub struct RequestStream {
    pub id: SeqId,
    events: mpsc::UnboundedReceiver<SeqEvent>,
}

impl RequestStream {
    /// The next event; `None` after the final `Finished`/`Failed` event.
    pub async fn next(&mut self) -> Option<SeqEvent> {
        self.events.recv().await
    }
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn(core: EngineCore) -> Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let thread = std::thread::Builder::new()
            .name("pd-engine".into())
            .spawn(move || run(core, rx))?;
        Ok((Self { commands: tx }, thread))
    }

    /// Submits a request. Invalid requests are refused here, with the reason.
    pub async fn generate(&self, request: GenerateRequest) -> Result<RequestStream> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Add {
                request,
                events: events_tx,
                reply,
            })
            .await
            .map_err(|_| Error::EngineClosed)?;
        let id = answer.await.map_err(|_| Error::EngineClosed)??;
        Ok(RequestStream { id, events })
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
                Ok(0) => std::thread::yield_now(),
                Ok(_) => {}
                // The failed sequences have been told; the engine itself carries on.
                Err(e) => tracing::error!(error = %e, "engine step failed"),
            }
            continue;
        }
        if !open {
            return;
        }
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
            events,
            reply,
        } => {
            let _ = reply.send(core.add_request(request, events));
        }
        Command::Abort(id) => {
            core.abort(id);
        }
        Command::Stats(reply) => {
            let _ = reply.send(core.stats());
        }
    }
}
