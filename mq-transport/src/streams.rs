//! Durable streams on the bus: messages kept, acknowledged once durable, replayable.
//!
//! A [`Streams`] handle comes from a [`Bus`] ([`Bus::streams`]). A stream captures the
//! subjects it is bound to: a durable publish ([`Streams::publish`]) is answered with a
//! [`PubAck`] once the message is durable under the stream's [`Fsync`] setting, and a
//! plain [`Bus::publish`] to those subjects is stored too, without an answer. Either
//! way, plain subscribers still get the message: a stream records, it does not hide.
//!
//! This release serves streams on the embedded bus, from the storage engine
//! (`mq-store`) in memory or in the directory of [`crate::EmbeddedConfig::storage`].
//! On a broker or NATS connection, [`Bus::streams`] says that they are not available
//! there yet.
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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
pub use mq_store::{
    AckPolicy, Consumer, ConsumerConfig, ConsumerInfo, DELIVER_AT_HEADER, DeadLetter,
    DeliverPolicy, Delivery, DeliveryInfo, Discard, Fsync, KeySource, Messages, PubAck, Publish,
    Retention, StoredMessage, StreamConfig, StreamInfo, StreamState, dead_letter_headers,
};
use mq_store::{Store, StoreError};
use rpc_core::Utf8Bytes;

use crate::embedded::{Embedded, store_headers};
use crate::error::BusError;
use crate::message::Message;
use crate::subject;

/// Durable streams on a bus; see the [module documentation](self). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Streams {
    backend: StreamBackend,
}

/// Where streams are served: one variant per backend that has them.
#[derive(Clone, Debug)]
enum StreamBackend {
    Embedded { store: Store, bus: Arc<Embedded> },
}

/// The acknowledgement of a durable publish: resolves to the [`PubAck`] once the message
/// is durable, or to the error that kept it from being stored.
#[derive(Debug)]
#[must_use = "a publish is durable only once its acknowledgement arrives"]
pub struct PubAckFuture {
    inner: mq_store::AckFuture,
}

impl Future for PubAckFuture {
    type Output = Result<PubAck, BusError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner).poll(cx).map_err(BusError::Stream)
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

    fn store(&self) -> &Store {
        match &self.backend {
            StreamBackend::Embedded { store, .. } => store,
        }
    }

    /// Creates a stream. Creating one that exists with the same configuration is not
    /// an error; a different configuration, or subjects that overlap another stream's,
    /// are.
    pub async fn create(&self, config: StreamConfig) -> Result<StreamInfo, BusError> {
        Ok(self.store().create(config)?.info())
    }

    /// Changes a stream's configuration (found by its name); lowered limits apply at once.
    pub async fn update(&self, config: StreamConfig) -> Result<StreamInfo, BusError> {
        Ok(self.store().update(config).await?)
    }

    /// A stream's configuration and counts.
    pub async fn info(&self, stream: &str) -> Result<StreamInfo, BusError> {
        Ok(self.store().stream(stream)?.info())
    }

    /// Every stream, by name.
    pub async fn list(&self) -> Result<Vec<StreamInfo>, BusError> {
        Ok(self.store().list())
    }

    /// Deletes a stream and its data.
    pub async fn delete(&self, stream: &str) -> Result<(), BusError> {
        Ok(self.store().delete(stream)?)
    }

    /// Removes every message of a stream; returns how many. Sequences go on.
    pub async fn purge(&self, stream: &str) -> Result<u64, BusError> {
        Ok(self.store().stream(stream)?.purge(None).await?)
    }

    /// Removes a stream's messages on subjects matching `filter`; returns how many.
    pub async fn purge_subject(&self, stream: &str, filter: &str) -> Result<u64, BusError> {
        Ok(self.store().stream(stream)?.purge(Some(filter)).await?)
    }

    /// Publishes durably to the stream that captures `subject`. Returns once the
    /// message is queued for storage; await the returned [`PubAckFuture`] for its
    /// acknowledgement. Many may be in flight: they are written and synced together.
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
                Ok(PubAckFuture { inner })
            }
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
    /// assert_eq!(worker.info().ack_floor, 1);
    /// # Ok(()) }
    /// ```
    pub async fn create_consumer(
        &self,
        stream: &str,
        config: ConsumerConfig,
    ) -> Result<Consumer, BusError> {
        Ok(self.store().create_consumer(stream, config)?)
    }

    /// The durable consumer `name` of `stream`.
    pub async fn consumer(&self, stream: &str, name: &str) -> Result<Consumer, BusError> {
        Ok(self.store().consumer(stream, name)?)
    }

    /// Every durable consumer of `stream`, with its state.
    pub async fn consumers(&self, stream: &str) -> Result<Vec<ConsumerInfo>, BusError> {
        Ok(self.store().consumers(stream)?)
    }

    /// Deletes a durable consumer and its state.
    pub async fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), BusError> {
        Ok(self.store().delete_consumer(stream, name)?)
    }

    /// The message with sequence `seq` of a stream.
    pub async fn get(&self, stream: &str, seq: u64) -> Result<StoredMessage, BusError> {
        Ok(self.store().stream(stream)?.get(seq)?)
    }

    /// The last message on `subject` (a literal subject) of a stream.
    pub async fn last(&self, stream: &str, subject: &str) -> Result<StoredMessage, BusError> {
        Ok(self.store().stream(stream)?.last(subject)?)
    }

    /// Up to `max_msgs` messages of a stream from sequence `from` on, at most
    /// `max_bytes` of them (but at least one).
    pub async fn range(
        &self,
        stream: &str,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, BusError> {
        Ok(self
            .store()
            .stream(stream)?
            .range(from, max_msgs, max_bytes)?)
    }
}
