//! [`Bus`]: the one API over every backend.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rpc_core::Utf8Bytes;
use rpc_core::transport::{Connector, TcpConnector};
use tokio::sync::broadcast;

use crate::backend::{Backend, Core, dispatch};
use crate::client::ConnectOptions;
use crate::delivery::{SubQueue, Subscriber, Unanswered, Waiting};
use crate::embedded::{Embedded, EmbeddedConfig};
use crate::error::BusError;
use crate::event::Event;
use crate::message::{Message, NO_RESPONDERS};
use crate::subject;

/// Settings every backend has, with the same defaults; each backend's configuration
/// carries them as its `bus` field.
///
/// ```
/// use std::time::Duration;
/// use mq_transport::{Bus, EmbeddedConfig};
///
/// let mut config = EmbeddedConfig::default();
/// config.bus.subscription_capacity = 1024;
/// config.bus.request_timeout = Duration::from_secs(1);
/// let bus = Bus::embedded_with(config);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusOptions {
    /// Messages queued per subscription. What happens when a queue is full depends on
    /// where it is: see [`crate::EmbeddedConfig::slow_consumer_grace`] for the embedded
    /// bus; a remote subscription drops (and counts) what does not fit. Default 65,536.
    pub subscription_capacity: usize,
    /// The timeout of [`Bus::request`]. Default 5 s.
    pub request_timeout: Duration,
}

impl Default for BusOptions {
    fn default() -> Self {
        BusOptions {
            subscription_capacity: 65_536,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A handle to a message bus: publish, subscribe, queue-subscribe, request/reply.
///
/// Cheap to clone; clones share one bus (and, for a remote bus, one connection). The
/// backend is chosen once, when the handle is made, and the code using it does not
/// change:
///
/// * [`Bus::embedded`]: in this process, no setup (the default);
/// * [`Bus::connect`]: a courier broker over TCP ([`crate::Broker`], `courier broker`).
///
/// Semantics are NATS core's: subjects with `*` and `>` wildcards, at-most-once delivery,
/// queue groups that deliver each message to one member of each group, order kept per
/// publisher and subject, bounded queues that drop (and count) for slow consumers.
///
/// ```
/// use mq_transport::Bus;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mq_transport::BusError> {
/// let bus = Bus::embedded();
///
/// // A responder in a queue group…
/// let mut service = bus.queue_subscribe("time.now", "time-service").await?;
/// let responder = bus.clone();
/// tokio::spawn(async move {
///     while let Some(request) = service.next().await {
///         if let Some(reply) = request.reply {
///             responder.publish(reply, "12:00").await.ok();
///         }
///     }
/// });
///
/// // …and a request to it.
/// let answer = bus.request("time.now", "").await?;
/// assert_eq!(&answer.payload[..], b"12:00");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Bus {
    core: Arc<Core>,
    backend: Backends,
}

/// The backends, one variant each; [`dispatch!`] calls the [`Backend`] of any of them.
#[derive(Clone, Debug)]
pub(crate) enum Backends {
    Embedded(Arc<Embedded>),
    Remote(Arc<crate::client::Client>),
    #[cfg(feature = "nats")]
    Nats(Arc<crate::nats::Nats>),
}

/// Whether `backend`'s [`Backend::try_publish`] can publish (see
/// [`Backend::TRIES_PUBLISH`]).
fn backend_tries_publish<B: Backend>(_backend: &Arc<B>) -> bool {
    B::TRIES_PUBLISH
}

impl Default for Bus {
    fn default() -> Self {
        Bus::embedded()
    }
}

impl Bus {
    /// A new bus inside this process, with default settings.
    pub fn embedded() -> Bus {
        Bus::embedded_with(EmbeddedConfig::default())
    }

    /// A new bus inside this process.
    pub fn embedded_with(config: EmbeddedConfig) -> Bus {
        let core = Core::new(config.bus.clone());
        Bus {
            backend: Backends::Embedded(Embedded::new(config, core.clone())),
            core,
        }
    }

    /// Connects to a courier broker at `addr` (`host:port`) with default options.
    ///
    /// Fails if the first connection cannot be made; after that, the client reconnects
    /// by itself (see [`ConnectOptions`]).
    pub async fn connect(addr: impl Into<String>) -> Result<Bus, BusError> {
        Bus::connect_with(addr, ConnectOptions::default()).await
    }

    /// Connects to a courier broker at `addr` (`host:port`) over TCP.
    pub async fn connect_with(
        addr: impl Into<String>,
        options: ConnectOptions,
    ) -> Result<Bus, BusError> {
        Bus::connect_via(TcpConnector::new(addr.into()), options).await
    }

    /// Connects to a courier broker through `connector`: TCP, a Unix socket, or an
    /// in-memory pair with a broker in the same process (tests on a paused clock). The
    /// client reconnects through the same connector.
    ///
    /// ```
    /// use mq_transport::{Broker, BrokerConfig, Bus, ConnectOptions};
    /// use rpc_core::transport::memory;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (listener, connector) = memory::listen();
    /// let broker = Broker::serve(listener, BrokerConfig::default())?;
    /// let bus = Bus::connect_via(connector, ConnectOptions::default()).await?;
    /// let mut sub = bus.subscribe("ping").await?;
    /// bus.publish("ping", "in memory").await?;
    /// assert_eq!(&sub.next().await.unwrap().payload[..], b"in memory");
    /// broker.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn connect_via(
        connector: impl Connector,
        options: ConnectOptions,
    ) -> Result<Bus, BusError> {
        let core = Core::new(options.bus.clone());
        let client = crate::client::Client::connect(connector, options, core.clone()).await?;
        Ok(Bus {
            backend: Backends::Remote(client),
            core,
        })
    }

    /// Connects to a NATS server or cluster (cargo feature `nats`) with default options.
    /// `servers` is one URL or a comma-separated list (`nats://a:4222,nats://b:4222`);
    /// the client fails over between them and reconnects by itself.
    #[cfg(feature = "nats")]
    pub async fn connect_nats(servers: &str) -> Result<Bus, BusError> {
        Bus::connect_nats_with(servers, crate::nats::NatsOptions::default()).await
    }

    /// Connects to a NATS server or cluster (cargo feature `nats`) with `options`, which
    /// carry the NATS connection options (credentials, TLS, reconnect policy, …).
    #[cfg(feature = "nats")]
    pub async fn connect_nats_with(
        servers: &str,
        options: crate::nats::NatsOptions,
    ) -> Result<Bus, BusError> {
        let core = Core::new(options.bus.clone());
        let nats = crate::nats::Nats::connect(servers, options, core.clone()).await?;
        Ok(Bus {
            backend: Backends::Nats(nats),
            core,
        })
    }

    /// Publishes `payload` to `subject` (no wildcards).
    // Not an `async fn`, nor is `publish_message`: each layer of async fn around a
    // publish moved the message once more (it showed in a publishing client's profile).
    pub fn publish(
        &self,
        subject: impl Into<Utf8Bytes>,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), BusError>> + Send + '_ {
        self.publish_checked(Message::new(subject, payload), true)
    }

    /// Durable streams on this bus: see [`crate::streams`].
    ///
    /// On the embedded bus they live where [`EmbeddedConfig::storage`] says (memory by
    /// default); this fails if that directory could not be opened, with the reason. On
    /// a broker connection they are the broker's ([`crate::BrokerConfig::storage`]).
    /// On NATS (feature `nats`) they are JetStream streams.
    pub fn streams(&self) -> Result<crate::Streams, BusError> {
        match &self.backend {
            Backends::Embedded(embedded) => crate::Streams::embedded(embedded),
            Backends::Remote(_) => Ok(crate::Streams::remote(self.clone())),
            #[cfg(feature = "nats")]
            Backends::Nats(nats) => Ok(crate::Streams::nats(nats.jetstream())),
        }
    }

    /// Publishes a message with its reply subject and headers.
    ///
    /// Returns once the message is routed (embedded) or queued for the connection
    /// (remote); use [`Bus::flush`] to wait until the broker has it. On the embedded bus
    /// it may wait for a subscriber whose queue is full (see
    /// [`EmbeddedConfig::slow_consumer_grace`]).
    pub fn publish_message(
        &self,
        message: Message,
    ) -> impl Future<Output = Result<(), BusError>> + Send + '_ {
        self.publish_checked(message, true)
    }

    /// Publishes `message`, checking its reply subject with `check_reply` (without it,
    /// for a message whose reply subject, if any, is known to be valid: one of this
    /// bus's inboxes).
    async fn publish_checked(&self, message: Message, check_reply: bool) -> Result<(), BusError> {
        if check_reply && let Some(reply) = &message.reply {
            subject::validate_subject(reply)?;
        }
        // plain stream acks queued before this go out before it
        if self.core.acks.is_waiting() {
            self.flush_acks().await;
        }
        subject::validate_subject(&message.subject)?;
        dispatch!(&self.backend, b => {
            if let Some((limit, setting)) = b.max_payload() {
                let size = crate::message::counted_size(&message.headers, &message.payload);
                if size > limit {
                    return Err(BusError::PayloadTooLarge { size, limit, setting });
                }
            }
            let message = if backend_tries_publish(b) {
                // Spent here, before anything is queued: a publish cancelled at this
                // await leaves nothing behind.
                tokio::task::consume_budget().await;
                match b.try_publish(message) {
                    Ok(published) => return published,
                    Err(message) => message,
                }
            } else {
                message
            };
            b.publish(message).await
        })
    }

    /// Subscribes to `subject`, which may use wildcards. Returns once the subscription is
    /// active: a message published after this returns reaches it.
    pub async fn subscribe(&self, subject: impl Into<Utf8Bytes>) -> Result<Subscriber, BusError> {
        self.subscribe_inner(subject.into(), None, true).await
    }

    /// Subscribes to `subject` as a member of queue group `queue`: each message goes to
    /// one member of the group.
    pub async fn queue_subscribe(
        &self,
        subject: impl Into<Utf8Bytes>,
        queue: impl Into<Utf8Bytes>,
    ) -> Result<Subscriber, BusError> {
        self.subscribe_inner(subject.into(), Some(queue.into()), true)
            .await
    }

    async fn subscribe_inner(
        &self,
        subject: Utf8Bytes,
        queue: Option<Utf8Bytes>,
        confirm: bool,
    ) -> Result<Subscriber, BusError> {
        subject::validate_filter(&subject)?;
        if let Some(queue) = &queue {
            subject::validate_queue(queue)?;
        }
        let key = self.core.next_key();
        let (tx, rx) = SubQueue::new(
            subject.clone(),
            queue,
            self.core.options.subscription_capacity,
            self.core.events.clone(),
        );
        let state = tx.state.clone();
        let unsubscribe = dispatch!(&self.backend, b => b.subscribe(key, tx).await)?;
        // From here dropping the subscriber removes the subscription.
        let subscriber = Subscriber::new(rx, state.clone(), key, unsubscribe);
        if confirm {
            dispatch!(&self.backend, b => b.confirm().await)?;
        }
        if let Some(reason) = state.refused() {
            return Err(BusError::SubscriptionRefused {
                subject: subject.to_string(),
                reason: reason.to_owned(),
            });
        }
        Ok(subscriber)
    }
    /// Sends a request to `subject` and waits for the first reply, up to the default
    /// request timeout. Fails at once with [`BusError::NoResponders`] when nobody is
    /// subscribed to `subject`.
    pub async fn request(
        &self,
        subject: impl Into<Utf8Bytes>,
        payload: impl Into<Bytes>,
    ) -> Result<Message, BusError> {
        let timeout = self.request_timeout();
        self.request_message(Message::new(subject, payload), timeout)
            .await
    }

    /// Sends `message` as a request (its reply subject is replaced by an inbox) and waits
    /// for the first reply, until `timeout` after the call: the time the send itself
    /// waits (for room in a full send queue) counts.
    pub async fn request_message(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let subject = message.subject.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let (_reply, waiting) = self.send_request(message, Some(deadline)).await?;
        self.await_reply(waiting, &subject, timeout).await
    }

    /// Publishes `message` with a fresh reply subject of this handle's inbox; returns the
    /// reply subject and the registration that receives the answer, which ends at
    /// `deadline` if one is given.
    pub(crate) async fn send_request(
        &self,
        mut message: Message,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(Utf8Bytes, Waiting), BusError> {
        let (reply, waiting) = self.inbox().register(deadline);
        message.reply = Some(reply.clone());
        self.publish_checked(message, false).await?;
        Ok((reply, waiting))
    }

    /// Waits for the answer to a request sent with [`Bus::send_request`], until the
    /// deadline it was sent with (`timeout` is that deadline as it was given, for the
    /// error).
    pub(crate) async fn await_reply(
        &self,
        mut waiting: Waiting,
        subject: &str,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        match waiting.reply().await {
            Ok(reply) if reply.status() == Some(NO_RESPONDERS) => Err(BusError::NoResponders {
                subject: subject.to_string(),
            }),
            Ok(reply) => Ok(reply),
            Err(Unanswered::Lost) => Err(BusError::ConnectionLost {
                subject: subject.to_string(),
                reason: self.disconnect_reason(),
            }),
            Err(Unanswered::TimedOut) => Err(BusError::Timeout {
                subject: subject.to_string(),
                timeout,
            }),
        }
    }

    /// Waits until everything published through this handle so far has reached the
    /// broker (a ping and its pong). Immediate on the embedded bus, which routes as it
    /// publishes.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.flush_acks().await;
        dispatch!(&self.backend, b => b.flush().await)
    }

    /// Sends the plain stream acks queued on this bus (packed, one message per consumer
    /// run), in the order they were queued. A failure is logged: a plain ack is not
    /// waited for, and one that is lost is delivered again after its ack wait.
    pub(crate) async fn flush_acks(&self) {
        for message in self.core.acks.take() {
            let subject = message.subject.clone();
            if let Err(e) = dispatch!(&self.backend, b => b.publish(message).await) {
                tracing::debug!(%subject, "plain acks not sent: {e}");
            }
        }
    }

    /// Queues a plain ack of `seq` for the broker, sent packed with the acks around it:
    /// before this bus's next publish, or on the next turn of the scheduler.
    pub(crate) fn queue_ack(&self, stream: &Arc<str>, consumer: &Arc<str>, seq: u64) {
        if self.core.acks.push(stream, consumer, seq) {
            let bus = self.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                bus.flush_acks().await;
            });
        }
    }

    /// Connection changes and slow-consumer drops; see [`Event`].
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.core.events.subscribe()
    }

    /// Whether messages can reach the bus right now: always for the embedded bus; for a
    /// remote bus, whether the connection is up (publishes made while it is down are
    /// buffered).
    pub fn is_connected(&self) -> bool {
        dispatch!(&self.backend, b => b.is_connected())
    }

    /// Which backend this handle uses: `"embedded"`, `"broker"` or `"nats"`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backends::Embedded(_) => "embedded",
            Backends::Remote(_) => "broker",
            #[cfg(feature = "nats")]
            Backends::Nats(_) => "nats",
        }
    }

    /// A fresh, unique subject to receive replies on.
    pub fn new_inbox(&self) -> String {
        crate::delivery::new_inbox()
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.core.options.request_timeout
    }

    pub(crate) fn subscription_capacity(&self) -> usize {
        self.core.options.subscription_capacity
    }

    /// [`Bus::subscribe`] without waiting for the broker to confirm: for a
    /// subscription this handle publishes a request for right after (a broker reads a
    /// connection's frames in order).
    pub(crate) async fn subscribe_unconfirmed(
        &self,
        subject: impl Into<Utf8Bytes>,
    ) -> Result<Subscriber, BusError> {
        self.subscribe_inner(subject.into(), None, false).await
    }

    fn inbox(&self) -> &Arc<crate::delivery::Inbox> {
        &self.core.inbox
    }

    pub(crate) fn disconnect_reason(&self) -> Arc<str> {
        dispatch!(&self.backend, b => b.disconnect_reason())
    }
}
