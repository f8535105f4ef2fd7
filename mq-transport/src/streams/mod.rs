//! Durable streams on the bus: messages kept, acknowledged once durable, replayable.
//!
//! A [`Streams`] handle comes from a [`Bus`] ([`Bus::streams`]). A stream captures the
//! subjects it is bound to: a durable publish ([`Streams::publish`]) is answered with a
//! [`PubAck`] once the message is durable under the stream's [`Fsync`] setting, and a
//! plain [`Bus::publish`] to those subjects is stored too, without an answer. Either
//! way, plain subscribers still get the message: a stream records, it does not hide.
//!
//! The same handle works on every backend:
//!
//! * the embedded bus serves streams from the storage engine (`mq-store`), in memory
//!   or in the directory of [`crate::EmbeddedConfig::storage`];
//! * a bus connected to a courier broker uses the broker's streams
//!   ([`crate::BrokerConfig::storage`], `courier broker --store DIR`) over the stream
//!   API described in [`wire`] and `docs/PROTOCOL.md`;
//! * a NATS connection (feature `nats`) uses JetStream; dead letters and delayed
//!   delivery are done by the client there, and per-key order is refused.
//!
//! `docs/GUARANTEES.md` says what each backend promises.
//!
//! ```
//! use mq_transport::{Bus, Publish, StreamConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mq_transport::BusError> {
//! let bus = Bus::embedded();
//! let streams = bus.streams()?;
//! streams.create(StreamConfig::new("ORDERS", ["orders.>"])).await?;
//!
//! // Pipelined: publish many, then await their acknowledgements.
//! let mut pending = Vec::new();
//! for i in 0..10 {
//!     pending.push(streams.publish("orders.eu", format!("order {i}")).await?);
//! }
//! for ack in pending {
//!     ack.await?;
//! }
//!
//! // A retry with the same message id is recognised, not stored twice.
//! let once = Publish { msg_id: Some("order-42".into()), ..Publish::default() };
//! let first = streams.publish_with("orders.eu", "42", once.clone()).await?.await?;
//! let retry = streams.publish_with("orders.eu", "42", once).await?.await?;
//! assert_eq!((retry.seq, retry.duplicate), (first.seq, true));
//!
//! assert_eq!(&streams.get("ORDERS", 1).await?.payload[..], b"order 0");
//! assert_eq!(streams.last("ORDERS", "orders.eu").await?.seq, 11);
//! assert_eq!(streams.info("ORDERS").await?.state.msgs, 11);
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
pub use mq_store::{
    AckPolicy, ConsumerConfig, ConsumerInfo, DELIVER_AT_HEADER, DeadLetter, DeliverPolicy,
    DeliveryInfo, Discard, ErrorKind, Fsync, KeySource, PubAck, Publish, Retention, StoredMessage,
    StreamConfig, StreamInfo, StreamState, dead_letter_headers,
};
use mq_store::{Answer, Store, StoreError};
use rpc_core::Utf8Bytes;

use crate::bus::Bus;
use crate::embedded::{Embedded, store_headers};
use crate::error::BusError;
use crate::message::Message;
use crate::subject;

#[cfg(feature = "nats")]
pub(crate) mod jetstream;
pub(crate) mod remote;
pub mod wire;

/// Durable streams on a bus; see the [module documentation](self). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Streams {
    backend: StreamBackend,
}

/// Where streams are served: one variant per backend that has them.
#[derive(Clone, Debug)]
enum StreamBackend {
    Embedded {
        store: Store,
        bus: Arc<Embedded>,
    },
    Remote(remote::Remote),
    #[cfg(feature = "nats")]
    Nats(Box<jetstream::Js>),
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The acknowledgement of a durable publish: resolves to the [`PubAck`] once the message
/// is durable, or to the error that kept it from being stored.
#[must_use = "a publish is durable only once its acknowledgement arrives"]
pub struct PubAckFuture {
    inner: AckInner,
}

enum AckInner {
    Local(mq_store::AckFuture),
    Remote(Box<remote::RemoteAck>),
    /// Any other answer, as a future (the NATS backend's).
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Boxed(BoxFuture<Result<PubAck, BusError>>),
}

impl std::fmt::Debug for PubAckFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            AckInner::Local(ack) => f.debug_tuple("PubAckFuture").field(ack).finish(),
            AckInner::Remote(_) | AckInner::Boxed(_) => f.write_str("PubAckFuture(remote)"),
        }
    }
}

impl PubAckFuture {
    fn remote(ack: remote::RemoteAck) -> Self {
        PubAckFuture {
            inner: AckInner::Remote(Box::new(ack)),
        }
    }

    #[cfg(feature = "nats")]
    fn boxed(future: impl Future<Output = Result<PubAck, BusError>> + Send + 'static) -> Self {
        PubAckFuture {
            inner: AckInner::Boxed(Box::pin(future)),
        }
    }
}

impl Future for PubAckFuture {
    type Output = Result<PubAck, BusError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            AckInner::Local(ack) => Pin::new(ack).poll(cx).map_err(BusError::Stream),
            AckInner::Remote(ack) => Pin::new(&mut **ack).poll(cx),
            AckInner::Boxed(ack) => ack.as_mut().poll(cx),
        }
    }
}

impl Streams {
    pub(crate) fn embedded(bus: &Arc<Embedded>) -> Result<Streams, BusError> {
        match &bus.store {
            Ok(store) => Ok(Streams {
                backend: StreamBackend::Embedded {
                    store: store.clone(),
                    bus: bus.clone(),
                },
            }),
            Err(e) => Err(BusError::Stream(e.clone())),
        }
    }

    #[cfg(feature = "nats")]
    pub(crate) fn nats(js: jetstream::Js) -> Streams {
        Streams {
            backend: StreamBackend::Nats(Box::new(js)),
        }
    }

    pub(crate) fn remote(bus: Bus) -> Streams {
        Streams {
            backend: StreamBackend::Remote(remote::Remote::new(bus)),
        }
    }

    /// Creates a stream. Creating one that exists with the same configuration is not
    /// an error; a different configuration, or subjects that overlap another stream's,
    /// are.
    pub async fn create(&self, config: StreamConfig) -> Result<StreamInfo, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.create(config)?.info()),
            StreamBackend::Remote(remote) => remote.create(config).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.create(config).await,
        }
    }

    /// Changes a stream's configuration (found by its name); lowered limits apply at once.
    pub async fn update(&self, config: StreamConfig) -> Result<StreamInfo, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.update(config).await?),
            StreamBackend::Remote(remote) => remote.update(config).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.update(config).await,
        }
    }

    /// A stream's configuration and counts.
    pub async fn info(&self, stream: &str) -> Result<StreamInfo, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.stream(stream)?.info()),
            StreamBackend::Remote(remote) => remote.info(stream).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.info(stream).await,
        }
    }

    /// Every stream, by name.
    pub async fn list(&self) -> Result<Vec<StreamInfo>, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.list()),
            StreamBackend::Remote(remote) => remote.list().await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.list().await,
        }
    }

    /// Deletes a stream and its data.
    pub async fn delete(&self, stream: &str) -> Result<(), BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.delete(stream)?),
            StreamBackend::Remote(remote) => remote.delete(stream).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.delete(stream).await,
        }
    }

    /// Removes every message of a stream; returns how many. Sequences go on.
    pub async fn purge(&self, stream: &str) -> Result<u64, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.stream(stream)?.purge(None).await?),
            StreamBackend::Remote(remote) => remote.purge(stream, None).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.purge(stream, None).await,
        }
    }

    /// Removes a stream's messages on subjects matching `filter`; returns how many.
    pub async fn purge_subject(&self, stream: &str, filter: &str) -> Result<u64, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => {
                Ok(store.stream(stream)?.purge(Some(filter)).await?)
            }
            StreamBackend::Remote(remote) => remote.purge(stream, Some(filter)).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.purge(stream, Some(filter)).await,
        }
    }

    /// Publishes durably to the stream that captures `subject`. Returns once the
    /// message is queued for storage (embedded) or sent (broker); await the returned
    /// [`PubAckFuture`] for its acknowledgement. Many may be in flight: they are
    /// written and synced together.
    pub async fn publish(
        &self,
        subject: impl Into<Utf8Bytes>,
        payload: impl Into<Bytes>,
    ) -> Result<PubAckFuture, BusError> {
        self.publish_message(Message::new(subject, payload), Publish::default())
            .await
    }

    /// [`Streams::publish`] with a message id and expectations.
    pub async fn publish_with(
        &self,
        subject: impl Into<Utf8Bytes>,
        payload: impl Into<Bytes>,
        options: Publish,
    ) -> Result<PubAckFuture, BusError> {
        self.publish_message(Message::new(subject, payload), options)
            .await
    }

    /// Publishes a message with headers durably. Its reply subject is not stored.
    pub async fn publish_message(
        &self,
        message: Message,
        options: Publish,
    ) -> Result<PubAckFuture, BusError> {
        subject::validate_subject(&message.subject)?;
        match &self.backend {
            StreamBackend::Embedded { store, bus } => {
                let stream = store
                    .stream_for(&message.subject)
                    .ok_or_else(|| StoreError::NoStreamForSubject(message.subject.to_string()))?;
                let inner = {
                    let headers = store_headers(&message.headers);
                    stream
                        .publish(&message.subject, &headers, &message.payload, &options)
                        .await?
                };
                if !inner.is_duplicate() {
                    bus.deliver(message).await;
                }
                Ok(PubAckFuture {
                    inner: AckInner::Local(inner),
                })
            }
            StreamBackend::Remote(remote) => remote.publish(message, &options).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.publish(message, &options).await,
        }
    }

    /// Creates a consumer on `stream`, or returns the durable one of that name if its
    /// configuration is the same. Clones of the returned handle, or handles from
    /// [`Streams::consumer`], share its work: a consumer group.
    ///
    /// ```
    /// use std::time::Duration;
    /// use mq_transport::{Bus, ConsumerConfig, StreamConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mq_transport::BusError> {
    /// let bus = Bus::embedded();
    /// let streams = bus.streams()?;
    /// streams.create(StreamConfig::new("ORDERS", ["orders.>"])).await?;
    /// streams.publish("orders.eu", "order 1").await?.await?;
    /// let worker = streams.create_consumer("ORDERS", ConsumerConfig::durable("billing")).await?;
    /// for delivery in worker.fetch(16, Duration::from_secs(1)).await? {
    ///     delivery.ack_confirmed().await?;
    /// }
    /// assert_eq!(worker.info().await?.ack_floor, 1);
    /// # Ok(()) }
    /// ```
    pub async fn create_consumer(
        &self,
        stream: &str,
        config: ConsumerConfig,
    ) -> Result<Consumer, BusError> {
        Ok(match &self.backend {
            StreamBackend::Embedded { store, .. } => {
                Consumer::local(store.create_consumer(stream, config)?)
            }
            StreamBackend::Remote(remote) => {
                Consumer::remote(remote.create_consumer(stream, config).await?)
            }
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => Consumer {
                inner: ConsumerInner::Nats(Arc::new(js.create_consumer(stream, config).await?)),
            },
        })
    }

    /// The durable consumer `name` of `stream`.
    pub async fn consumer(&self, stream: &str, name: &str) -> Result<Consumer, BusError> {
        Ok(match &self.backend {
            StreamBackend::Embedded { store, .. } => Consumer::local(store.consumer(stream, name)?),
            StreamBackend::Remote(remote) => Consumer::remote(remote.consumer(stream, name).await?),
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => Consumer {
                inner: ConsumerInner::Nats(Arc::new(js.consumer(stream, name).await?)),
            },
        })
    }

    /// Every durable consumer of `stream`, with its state.
    pub async fn consumers(&self, stream: &str) -> Result<Vec<ConsumerInfo>, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.consumers(stream)?),
            StreamBackend::Remote(remote) => remote.consumers(stream).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.consumers(stream).await,
        }
    }

    /// Deletes a durable consumer and its state.
    pub async fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.delete_consumer(stream, name)?),
            StreamBackend::Remote(remote) => remote.delete_consumer(stream, name).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.delete_consumer(stream, name).await,
        }
    }

    /// The message with sequence `seq` of a stream.
    pub async fn get(&self, stream: &str, seq: u64) -> Result<StoredMessage, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.stream(stream)?.get(seq)?),
            StreamBackend::Remote(remote) => {
                let request = wire::GetRequest {
                    seq: Some(seq),
                    ..wire::GetRequest::default()
                };
                remote.get(stream, request).await
            }
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.get(stream, seq).await,
        }
    }

    /// The last message on `subject` (a literal subject) of a stream.
    pub async fn last(&self, stream: &str, subject: &str) -> Result<StoredMessage, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => Ok(store.stream(stream)?.last(subject)?),
            StreamBackend::Remote(remote) => {
                let request = wire::GetRequest {
                    last_by_subject: Some(subject.to_owned()),
                    ..wire::GetRequest::default()
                };
                remote.get(stream, request).await
            }
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.last(stream, subject).await,
        }
    }

    /// Up to `max_msgs` messages of a stream from sequence `from` on, at most
    /// `max_bytes` of them (but at least one). From a broker, at most
    /// [`wire::MAX_BATCH`] come in one call.
    pub async fn range(
        &self,
        stream: &str,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, BusError> {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => {
                Ok(store.stream(stream)?.range(from, max_msgs, max_bytes)?)
            }
            StreamBackend::Remote(remote) => remote.range(stream, from, max_msgs, max_bytes).await,
            #[cfg(feature = "nats")]
            StreamBackend::Nats(js) => js.range(stream, from, max_msgs, max_bytes).await,
        }
    }
}

/// A handle to a consumer of a stream; clones share it, and each clone may fetch (a
/// consumer group). Made by [`Streams::create_consumer`] or [`Streams::consumer`].
#[derive(Clone, Debug)]
pub struct Consumer {
    inner: ConsumerInner,
}

#[derive(Clone, Debug)]
enum ConsumerInner {
    Local(mq_store::Consumer),
    Remote(Arc<remote::RemoteConsumer>),
    #[cfg(feature = "nats")]
    Nats(Arc<jetstream::JsConsumer>),
}

impl Consumer {
    fn local(consumer: mq_store::Consumer) -> Consumer {
        Consumer {
            inner: ConsumerInner::Local(consumer),
        }
    }

    fn remote(consumer: remote::RemoteConsumer) -> Consumer {
        Consumer {
            inner: ConsumerInner::Remote(Arc::new(consumer)),
        }
    }

    /// The consumer's name (for an ephemeral consumer, the one it was given).
    pub fn name(&self) -> &str {
        match &self.inner {
            ConsumerInner::Local(c) => c.name(),
            ConsumerInner::Remote(c) => c.name(),
            #[cfg(feature = "nats")]
            ConsumerInner::Nats(c) => c.name(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &ConsumerConfig {
        match &self.inner {
            ConsumerInner::Local(c) => c.config(),
            ConsumerInner::Remote(c) => &c.config,
            #[cfg(feature = "nats")]
            ConsumerInner::Nats(c) => &c.config,
        }
    }

    /// Waits for up to `batch` messages, returning as soon as at least one is
    /// deliverable, or with none once `max_wait` has passed. Redeliveries come first.
    /// From a broker, one fetch takes at most [`wire::MAX_BATCH`] messages and waits at
    /// most 30 s.
    pub async fn fetch(&self, batch: usize, max_wait: Duration) -> Result<Vec<Delivery>, BusError> {
        match &self.inner {
            ConsumerInner::Local(c) => Ok(c
                .fetch(batch, max_wait)
                .await?
                .into_iter()
                .map(|d| {
                    let mq_store::Delivery { message, info, .. } = d;
                    Delivery {
                        message,
                        info,
                        answer: Answerer::Local(c.clone()),
                    }
                })
                .collect()),
            ConsumerInner::Remote(c) => c.fetch(batch, max_wait).await,
            #[cfg(feature = "nats")]
            ConsumerInner::Nats(c) => c.fetch(batch, max_wait).await,
        }
    }

    /// The consumer's messages as a [`futures_core::Stream`]: it keeps a batch fetched
    /// ahead (within `max_ack_pending`) and waits as long as it takes for the next.
    /// Ends only with an error (the stream deleted, the store closed, the broker gone
    /// for longer than a request timeout).
    pub fn messages(&self) -> Messages {
        Messages {
            consumer: self.clone(),
            buffer: VecDeque::new(),
            fetching: None,
            batch: (self.config().max_ack_pending as usize / 2).clamp(1, 256),
            ended: false,
        }
    }

    /// Its state and counts.
    pub async fn info(&self) -> Result<ConsumerInfo, BusError> {
        match &self.inner {
            ConsumerInner::Local(c) => Ok(c.info()),
            ConsumerInner::Remote(c) => c.info().await,
            #[cfg(feature = "nats")]
            ConsumerInner::Nats(c) => c.info().await,
        }
    }
}

/// A message handed out by a consumer, with what it needs to answer.
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub message: StoredMessage,
    /// Where it stands.
    pub info: DeliveryInfo,
    answer: Answerer,
}

#[derive(Debug)]
enum Answerer {
    Local(mq_store::Consumer),
    Remote(remote::RemoteAnswer),
    #[cfg(feature = "nats")]
    Nats(jetstream::JsAnswer),
}

impl Delivery {
    fn remote(message: StoredMessage, info: DeliveryInfo, answer: remote::RemoteAnswer) -> Self {
        Delivery {
            message,
            info,
            answer: Answerer::Remote(answer),
        }
    }

    #[cfg(feature = "nats")]
    fn nats(message: StoredMessage, info: DeliveryInfo, answer: jetstream::JsAnswer) -> Self {
        Delivery {
            message,
            info,
            answer: Answerer::Nats(answer),
        }
    }

    async fn send(&self, answer: Answer, confirm: bool) -> Result<(), BusError> {
        match &self.answer {
            Answerer::Local(c) => Ok(c.answer(self.info.stream_seq, answer, confirm).await?),
            Answerer::Remote(r) => r.send(answer, confirm).await,
            #[cfg(feature = "nats")]
            Answerer::Nats(js) => match answer {
                Answer::Term(reason) => {
                    js.dead_letter(
                        &self.message,
                        self.info.deliveries,
                        &format!("term: {reason}"),
                    )
                    .await
                }
                Answer::Nak(_) if js.nak_is_last(self.info.deliveries) => {
                    js.dead_letter(&self.message, self.info.deliveries, "max_deliver")
                        .await
                }
                answer => js.send(answer, confirm).await,
            },
        }
    }

    /// Acknowledges the message: it is done with, and not delivered again (unless the
    /// consumer's state is lost before it is written: see [`Delivery::ack_confirmed`]).
    /// With [`AckPolicy::All`], every message delivered before it is acknowledged too.
    /// On a broker the ack is queued on the bus and sent with the acks around it, in one
    /// message: before the bus's next publish of any kind (so ahead of the next fetch),
    /// or on the scheduler's next turn. It is not waited for: an ack the broker refuses
    /// is logged there, and one lost with the connection is delivered again after the
    /// ack wait. [`Delivery::ack_confirmed`] reports either.
    pub async fn ack(&self) -> Result<(), BusError> {
        self.send(Answer::Ack, false).await
    }

    /// Acknowledges the message and returns once the acknowledgement is durable
    /// under the stream's fsync setting: for processing that must happen once.
    pub async fn ack_confirmed(&self) -> Result<(), BusError> {
        self.send(Answer::Ack, true).await
    }

    /// Refuses the message for now: it is delivered again after `delay` (at once with
    /// `None`), or becomes a dead letter if this was its last delivery.
    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), BusError> {
        self.send(Answer::Nak(delay), false).await
    }

    /// Says the message is still being worked on: its ack wait starts again.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.send(Answer::InProgress, false).await
    }

    /// Gives up on the message: it becomes a dead letter with `reason`, and is not
    /// delivered again. Returns once the dead letter is published (or has failed, to
    /// be tried again after the ack wait).
    pub async fn term(&self, reason: &str) -> Result<(), BusError> {
        self.send(Answer::Term(reason.to_owned()), false).await
    }
}

/// A consumer's messages as a [`futures_core::Stream`]; see [`Consumer::messages`].
pub struct Messages {
    consumer: Consumer,
    buffer: VecDeque<Delivery>,
    fetching: Option<BoxFuture<Result<Vec<Delivery>, BusError>>>,
    batch: usize,
    /// The consumer or its stream is gone: the stream has ended.
    ended: bool,
}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages")
            .field("consumer", &self.consumer.name())
            .field("buffered", &self.buffer.len())
            .finish()
    }
}

impl Messages {
    /// The next message, waiting as long as it takes. An error comes when a fetch
    /// fails (the next call tries again); after an error saying the consumer or its
    /// stream is gone (not found, closed), `None` comes: the stream has ended.
    pub async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        std::future::poll_fn(|cx| self.poll_next_delivery(cx)).await
    }

    fn poll_next_delivery(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Delivery, BusError>>> {
        loop {
            if let Some(d) = self.buffer.pop_front() {
                return Poll::Ready(Some(Ok(d)));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            let fetching = self.fetching.get_or_insert_with(|| {
                let consumer = self.consumer.clone();
                let batch = self.batch;
                Box::pin(async move { consumer.fetch(batch, Duration::from_secs(3600)).await })
            });
            match fetching.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => {
                    self.fetching = None;
                    match result {
                        Ok(batch) => self.buffer.extend(batch),
                        Err(e) => {
                            let gone = matches!(
                                &e,
                                BusError::Stream(s) if matches!(
                                    s.kind(),
                                    ErrorKind::StreamNotFound
                                        | ErrorKind::ConsumerNotFound
                                        | ErrorKind::Closed
                                )
                            );
                            self.ended = gone;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }
}

impl futures_core::Stream for Messages {
    type Item = Result<Delivery, BusError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_next_delivery(cx)
    }
}
