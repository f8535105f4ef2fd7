//! The embedded bus: routing inside the process, no sockets.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mq_store::Store;

use crate::backend::{Backend, Core};
use crate::bus::BusOptions;
use crate::delivery::{Offer, SubQueue, SubState, Target, Unsubscribe};
use crate::error::BusError;
use crate::message::{Message, NO_RESPONDERS};
use crate::sublist::{Offered, Sublist};

/// Settings of an embedded bus.
///
/// ```
/// use std::time::Duration;
/// use mq_transport::{Bus, EmbeddedConfig};
///
/// let mut config = EmbeddedConfig::default();
/// config.bus.subscription_capacity = 1024;
/// config.slow_consumer_grace = Duration::from_millis(500);
/// let bus = Bus::embedded_with(config);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmbeddedConfig {
    /// The largest payload a publish may carry. Default 1 MiB, as the broker's.
    pub max_payload: usize,
    /// How long a publish waits for room in a subscription queue that is full
    /// ([`BusOptions::subscription_capacity`] messages), as the broker holds a publisher
    /// for a subscriber connection that is behind: a subscriber that reads catches up
    /// and loses nothing. Still full after the grace, the subscriber is a slow consumer:
    /// that message and every later one that finds its queue full are dropped at once,
    /// counted ([`crate::Subscriber::dropped`]) and reported
    /// ([`crate::Event::SlowConsumer`]), until it has room again. Zero drops at once.
    /// Default 2 s, as the broker's.
    pub slow_consumer_grace: Duration,
    /// Where durable streams ([`crate::Streams`]) keep their data. Default
    /// [`Storage::Memory`].
    pub storage: Storage,
    /// Settings every backend has.
    pub bus: BusOptions,
}

/// Where an embedded bus keeps its durable streams.
///
/// ```
/// use mq_transport::{Bus, EmbeddedConfig, Storage};
/// let dir = std::env::temp_dir().join(format!("courier-doc-storage-{}", std::process::id()));
/// let mut config = EmbeddedConfig::default();
/// config.storage = Storage::Directory(dir.clone());
/// let bus = Bus::embedded_with(config);
/// assert!(bus.streams().is_ok());
/// # drop(bus); std::fs::remove_dir_all(dir).unwrap();
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Storage {
    /// In memory: streams last as long as the bus. The default.
    #[default]
    Memory,
    /// In this directory (created if missing): streams survive restarts, and each
    /// stream's `fsync` setting says what survives a power loss.
    Directory(PathBuf),
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            max_payload: 1024 * 1024,
            slow_consumer_grace: Duration::from_secs(2),
            storage: Storage::Memory,
            bus: BusOptions::default(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Embedded {
    subs: Sublist<Target>,
    config: EmbeddedConfig,
    /// The durable streams, or why their storage could not be opened.
    pub(crate) store: Result<Store, mq_store::StoreError>,
}

impl Embedded {
    pub(crate) fn new(config: EmbeddedConfig, core: Arc<Core>) -> Arc<Embedded> {
        let subs = Sublist::new();
        subs.insert(
            &core.inbox.filter(),
            None,
            0,
            Target::Inbox(core.inbox.clone()),
        )
        .expect("an inbox filter is valid");
        let store = match &config.storage {
            Storage::Memory => Ok(Store::memory()),
            Storage::Directory(dir) => open_store(dir),
        };
        if let Err(e) = &store {
            tracing::error!("durable streams are unavailable: {e}");
        }
        let embedded = Arc::new(Embedded {
            subs,
            config,
            store,
        });
        if let Ok(store) = &embedded.store {
            // dead letters reach the bus's subscribers too (a stream capturing their
            // subject has stored them already)
            let bus = Arc::downgrade(&embedded);
            store.observe_dead_letters(Arc::new(move |subject, headers, payload| {
                let (Some(bus), Ok(runtime)) =
                    (bus.upgrade(), tokio::runtime::Handle::try_current())
                else {
                    return;
                };
                let mut message = Message::new(subject.to_owned(), payload.clone());
                for (name, value) in headers {
                    message
                        .headers
                        .append(name.to_string(), bytes::Bytes::copy_from_slice(value));
                }
                runtime.spawn(async move { bus.deliver(message).await });
            }));
        }
        embedded
    }

    /// Stores a plain publish in the stream that captures its subject, if any: a
    /// stream records what is published to its subjects, however it was published.
    /// Returns false for a duplicate (a `Msg-Id` the stream has seen within its
    /// window), which is then not delivered either.
    fn capture(&self, message: &Message) -> bool {
        let Ok(store) = &self.store else { return true };
        if store.is_empty() {
            return true;
        }
        let Some(stream) = store.stream_for(&message.subject) else {
            return true;
        };
        let headers = store_headers(&message.headers);
        match stream.store(&message.subject, &headers, &message.payload) {
            Ok(ack) => !ack.duplicate,
            Err(e) => {
                // at-most-once, as every plain publish: delivered, but not stored
                tracing::warn!(subject = %message.subject, "a published message was not stored: {e}");
                true
            }
        }
    }

    /// Delivers a message to the subscribers, waiting (within the grace) for full
    /// queues, without capturing it in a stream.
    pub(crate) async fn deliver(&self, message: Message) {
        let mut full = Vec::new(); // allocates only when a queue is full
        self.route(&message, &mut full);
        for queue in full {
            queue
                .deliver_within(message.clone(), self.config.slow_consumer_grace)
                .await;
        }
    }

    /// Delivers to every target with room; collects the subscription queues that are
    /// full, to wait for.
    fn route(&self, message: &Message, full: &mut Vec<SubQueue>) {
        let found = self.subs.matches(&message.subject);
        if found.is_empty() {
            if let Some(reply) = &message.reply {
                let description = format!("no responders for `{}`", message.subject);
                let status = Message::status_message(reply.clone(), NO_RESPONDERS, description);
                self.route(&status, full);
            }
            return;
        }
        let mut waiting = Vec::new(); // allocates only when a queue is full
        found.offer(
            |target| match target {
                Target::Inbox(inbox) => {
                    if inbox.deliver(message.clone()) {
                        Offered::Taken
                    } else {
                        Offered::Refused
                    }
                }
                Target::Queue(queue) => match queue.offer(message.clone()) {
                    Offer::Taken => Offered::Taken,
                    Offer::Full => Offered::Full,
                    Offer::Behind => Offered::Behind,
                    Offer::Gone => Offered::Refused,
                },
            },
            &mut waiting,
        );
        full.extend(waiting.into_iter().filter_map(|target| match target {
            Target::Queue(queue) => Some(queue.clone()),
            Target::Inbox(_) => None,
        }));
    }
}

impl Backend for Embedded {
    fn max_payload(&self) -> Option<(usize, &'static str)> {
        Some((self.config.max_payload, "EmbeddedConfig::max_payload"))
    }

    async fn publish(&self, message: Message) -> Result<(), BusError> {
        if self.capture(&message) {
            self.deliver(message).await;
        }
        Ok(())
    }

    async fn subscribe(
        self: &Arc<Self>,
        key: u64,
        queue: SubQueue,
    ) -> Result<Arc<dyn Unsubscribe>, BusError> {
        let (filter, group) = (queue.state.subject.clone(), queue.state.queue.clone());
        self.subs
            .insert(&filter, group.as_deref(), key, Target::Queue(queue))?;
        Ok(self.clone())
    }

    async fn confirm(&self) -> Result<(), BusError> {
        Ok(()) // routing is synchronous: a subscription is active once inserted
    }

    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn disconnect_reason(&self) -> Arc<str> {
        Arc::from("the bus was closed")
    }
}

/// How long a new bus waits for an earlier one's store on the same directory to close:
/// a task of a dropped bus may still hold it for a moment.
const STORE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the store in `dir`, waiting up to [`STORE_LOCK_WAIT`] while another store
/// holds it (blocking the caller's thread meanwhile).
pub(crate) fn open_store(dir: &std::path::Path) -> Result<Store, mq_store::StoreError> {
    let deadline = std::time::Instant::now() + STORE_LOCK_WAIT;
    loop {
        match Store::open(dir) {
            Err(mq_store::StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// A message's headers as the store takes them.
pub(crate) fn store_headers(headers: &rpc_core::Metadata) -> Vec<(&str, &[u8])> {
    headers.iter().map(|(k, v)| (k.as_str(), &v[..])).collect()
}

impl Unsubscribe for Embedded {
    fn unsubscribe(&self, key: u64, state: &SubState) {
        self.subs
            .remove(&state.subject, state.queue.as_deref(), key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bus;

    #[tokio::test(start_paused = true)]
    async fn a_publisher_waits_for_a_full_subscriber_that_reads_and_drops_for_one_that_does_not() {
        let mut config = EmbeddedConfig::default();
        config.bus.subscription_capacity = 4;
        let bus = Bus::embedded_with(config);
        let mut reader = bus.subscribe("s").await.unwrap();
        let stuck = bus.subscribe("s").await.unwrap();
        let publisher = tokio::spawn({
            let bus = bus.clone();
            async move {
                for i in 0..100u32 {
                    bus.publish("s", i.to_string()).await.unwrap();
                }
            }
        });
        for i in 0..100u32 {
            let m = reader.next().await.unwrap();
            assert_eq!(m.payload, i.to_string());
        }
        publisher.await.unwrap();
        assert_eq!(reader.dropped(), 0);
        assert_eq!(stuck.dropped(), 96, "one grace, then at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_group_member_does_not_hold_the_groups_share() {
        const N: u64 = 1_000;
        let mut config = EmbeddedConfig::default();
        config.bus.subscription_capacity = 2;
        let bus = Bus::embedded_with(config);
        let stuck = bus.queue_subscribe("jobs", "workers").await.unwrap();
        let mut worker = bus.queue_subscribe("jobs", "workers").await.unwrap();
        let publisher = tokio::spawn({
            let bus = bus.clone();
            async move {
                for i in 0..N {
                    bus.publish("jobs", i.to_string()).await.unwrap();
                }
            }
        });
        let mut got = 0u64;
        while got + 2 + stuck.dropped() < N {
            worker.next().await.unwrap();
            got += 1;
        }
        publisher.await.unwrap();
        // The stuck member holds its 2 and is waited for at most once (both full at the
        // start); from then on the member with room gets every message.
        assert!(stuck.dropped() <= 1, "{} dropped", stuck.dropped());
        assert_eq!(got + 2 + stuck.dropped(), N);
    }

    #[tokio::test]
    async fn a_zero_grace_drops_at_once() {
        let mut config = EmbeddedConfig::default();
        config.bus.subscription_capacity = 1;
        config.slow_consumer_grace = Duration::ZERO;
        let bus = Bus::embedded_with(config);
        let sub = bus.subscribe("s").await.unwrap();
        bus.publish("s", "1").await.unwrap();
        bus.publish("s", "2").await.unwrap();
        assert_eq!(sub.dropped(), 1);
    }
}
