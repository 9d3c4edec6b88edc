//! What every node binary does the same way, one concern a module: the flags they share
//! ([`args`]), the addresses it registers ([`advertise`]), how a node names itself and
//! announces readiness ([`ready`]), signals
//! ([`signals`]), the phases of its life as cancellation tokens and a task tracker
//! ([`lifecycle`]), and a worker node's serving and drain ([`worker`]).

pub mod advertise;
pub mod args;
pub mod kv_events;
pub mod lifecycle;
pub mod ready;
pub mod signals;
pub mod worker;

pub use args::{KvTransfer, ModelArgs, ModelDtype, ShutdownArgs};
pub use kv_events::{kv_event_stream, KvEventStream};
pub use lifecycle::RequestTasks;
pub use ready::{advertised, device_name, new_node_id, ReadyLine};
pub use signals::cancel_on_signals;
pub use worker::{announce, node_stats, serve_metrics, transfer_backends, Listeners, Worker};
