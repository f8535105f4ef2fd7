//! The seam between [`crate::Bus`] and its backends.
//!
//! `Bus` validates every operation once (subjects, queue names, payload size), sets up
//! subscription queues once, and hands the rest to its backend through [`Backend`]. A new
//! operation is one method here and one per backend; nothing else changes. Streams (a
//! later handle made from a `Bus`) reach their backend the same way.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;

use crate::bus::BusOptions;
use crate::delivery::{Inbox, SubQueue, Unsubscribe};
use crate::error::BusError;
use crate::event::Event;
use crate::message::Message;

/// What every backend shares with its `Bus`: the request inbox, the event channel, the
/// options every backend has, and the subscription keys.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) options: BusOptions,
    next_key: AtomicU64,
    /// Plain stream acks waiting to go out, packed (a bus connected to a broker).
    pub(crate) acks: crate::streams::remote::AckBatch,
}

impl Core {
    pub(crate) fn new(options: BusOptions) -> Arc<Core> {
        Arc::new(Core {
            inbox: Arc::new(Inbox::new()),
            events: broadcast::channel(EVENTS).0,
            options,
            next_key: AtomicU64::new(1),
            acks: Default::default(),
        })
    }

    /// A key for a new subscription, unique in this bus handle (a sid on the wire).
    pub(crate) fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Reports `event` to [`crate::Bus::events`] (nobody listening is fine).
    pub(crate) fn report(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

/// Events kept for a receiver of [`crate::Bus::events`] that falls behind.
const EVENTS: usize = 256;

/// One backend of the bus. Arguments are already validated by `Bus`.
pub(crate) trait Backend: Send + Sync + 'static {
    /// The largest payload the backend accepts now, and where that limit is set.
    fn max_payload(&self) -> Option<(usize, &'static str)>;

    /// Sends `message` on; returns once it is routed (embedded) or queued for the
    /// connection (remote).
    fn publish(&self, message: Message) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Whether [`Backend::try_publish`] can publish at all (its default never does).
    const TRIES_PUBLISH: bool = false;

    /// [`Backend::publish`] now, if that needs no waiting: the common case, without the
    /// futures of a publish that may wait. Hands `message` back when it would have to
    /// wait, for `publish`. The caller has spent a unit of its task's coop budget.
    // The message is handed back by value: boxing it would allocate on the path that
    // exists to save work.
    #[allow(clippy::result_large_err)]
    fn try_publish(&self, message: Message) -> Result<Result<(), BusError>, Message> {
        Err(message)
    }

    /// Starts delivering messages matching `queue`'s subject (and group) into it under
    /// `key`; returns how to remove it. The subscription may not be active on a server
    /// yet: see [`Backend::confirm`].
    fn subscribe(
        self: &Arc<Self>,
        key: u64,
        queue: SubQueue,
    ) -> impl Future<Output = Result<Arc<dyn Unsubscribe>, BusError>> + Send;

    /// Returns once every subscription made so far is active where messages are routed.
    fn confirm(&self) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Returns once everything published so far has reached where it is routed.
    fn flush(&self) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Whether messages can reach the bus right now.
    fn is_connected(&self) -> bool;

    /// Why requests waiting for replies were failed, when the connection went away.
    fn disconnect_reason(&self) -> Arc<str>;
}

/// Calls `$body` with `$b` bound to the backend of `$backends`.
macro_rules! dispatch {
    ($backends:expr, $b:ident => $body:expr) => {
        match $backends {
            $crate::bus::Backends::Embedded($b) => $body,
            $crate::bus::Backends::Remote($b) => $body,
            #[cfg(feature = "nats")]
            $crate::bus::Backends::Nats($b) => $body,
        }
    };
}
pub(crate) use dispatch;
