//! The embedded bus: routing inside the process, no sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rpc_core::Utf8Bytes;
use tokio::sync::broadcast;

use crate::delivery::{Inbox, SubQueue, SubState, Subscriber, Target, Unsubscribe};
use crate::error::BusError;
use crate::event::Event;
use crate::message::{Message, NO_RESPONDERS};
use crate::subject;
use crate::sublist::Sublist;

/// Settings of an embedded bus.
///
/// ```
/// use mq_transport::{Bus, EmbeddedConfig};
///
/// let mut config = EmbeddedConfig::default();
/// config.subscription_capacity = 1024;
/// let bus = Bus::embedded_with(config);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmbeddedConfig {
    /// The largest payload a publish may carry. Default 1 MiB, as the broker's.
    pub max_payload: usize,
    /// Messages queued per subscription before new ones are dropped (and counted).
    /// Default 65,536.
    pub subscription_capacity: usize,
    /// The timeout of [`crate::Bus::request`]. Default 5 s.
    pub request_timeout: Duration,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            max_payload: 1024 * 1024,
            subscription_capacity: 65_536,
            request_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Embedded {
    subs: Sublist<Target>,
    next_key: AtomicU64,
    pub(crate) config: EmbeddedConfig,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) events: broadcast::Sender<Event>,
}

impl Embedded {
    pub(crate) fn new(config: EmbeddedConfig) -> Arc<Embedded> {
        let inbox = Arc::new(Inbox::new());
        let subs = Sublist::new();
        subs.insert(&inbox.filter(), None, 0, Target::Inbox(inbox.clone()))
            .expect("an inbox filter is valid");
        Arc::new(Embedded {
            subs,
            next_key: AtomicU64::new(1),
            config,
            inbox,
            events: broadcast::channel(256).0,
        })
    }

    pub(crate) fn publish(&self, message: Message) -> Result<(), BusError> {
        subject::validate_subject(&message.subject)?;
        if let Some(reply) = &message.reply {
            subject::validate_subject(reply)?;
        }
        if message.payload.len() > self.config.max_payload {
            return Err(BusError::PayloadTooLarge {
                size: message.payload.len(),
                limit: self.config.max_payload,
                setting: "EmbeddedConfig::max_payload",
            });
        }
        self.route(message);
        Ok(())
    }

    fn route(&self, message: Message) {
        let found = self.subs.matches(&message.subject);
        if found.is_empty() {
            if let Some(reply) = message.reply {
                let description = format!("no responders for `{}`", message.subject);
                self.route(Message::status_message(reply, NO_RESPONDERS, description));
            }
            return;
        }
        found.deliver(|target| target.deliver(message.clone()));
    }

    pub(crate) fn subscribe(
        self: &Arc<Self>,
        filter: Utf8Bytes,
        queue: Option<Utf8Bytes>,
    ) -> Result<Subscriber, BusError> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = SubQueue::new(
            filter.clone(),
            queue.clone(),
            self.config.subscription_capacity,
            self.events.clone(),
        );
        let state = tx.state.clone();
        self.subs
            .insert(&filter, queue.as_deref(), key, Target::Queue(tx))?;
        Ok(Subscriber::new(rx, state, key, self.clone()))
    }
}

impl Unsubscribe for Embedded {
    fn unsubscribe(&self, key: u64, state: &SubState) {
        self.subs
            .remove(&state.subject, state.queue.as_deref(), key);
    }
}
