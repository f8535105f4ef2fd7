//! The NATS backend (cargo feature `nats`): the same [`Bus`](crate::Bus) API on a NATS
//! server or cluster, through `async-nats`.
//!
//! Each subscription is an `async-nats` subscription whose messages a small task moves
//! into the same bounded queue the other backends use, so
//! [`Subscriber`](crate::Subscriber), slow-consumer accounting and [`Event`]s behave
//! alike. Requests use one inbox subscription per bus handle (`_INBOX.<id>.*`), as on
//! the other backends; NATS's own "no responders" status (503) becomes
//! [`BusError::NoResponders`].
//!
//! NATS headers are text: a header value that is not UTF-8, or that holds a CR or LF, is
//! refused with [`BusError::InvalidHeader`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use rpc_core::{Metadata, Utf8Bytes};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Core};
use crate::bus::BusOptions;
use crate::delivery::{SubQueue, SubState, Target, Unsubscribe};
use crate::error::{BusError, ConnectError};
use crate::event::Event;
use crate::lock;
use crate::message::{Message, NO_RESPONDERS, status_headers};

pub use async_nats;

/// How to reach NATS. `connect` passes through everything a NATS user sets (credentials,
/// TLS, reconnect policy, ping interval, client name, …); the rest is courier's.
///
/// ```no_run
/// use mq_transport::{Bus, NatsOptions};
/// use mq_transport::nats::async_nats;
///
/// # async fn f() -> Result<(), mq_transport::BusError> {
/// let mut options = NatsOptions::default();
/// options.connect = async_nats::ConnectOptions::with_user_and_password("app".into(), "s3cret".into())
///     .name("orders-service")
///     .max_reconnects(None); // reconnect forever
/// let bus = Bus::connect_nats_with("nats://10.0.0.1:4222,nats://10.0.0.2:4222", options).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct NatsOptions {
    /// The `async-nats` connection options. Its event callback is replaced: events arrive
    /// through [`crate::Bus::events`]. Default `ConnectOptions::default()`.
    pub connect: async_nats::ConnectOptions,
    /// Settings every backend has (subscription queues, request timeout).
    pub bus: BusOptions,
    /// Replicas of the JetStream streams this handle creates ([`crate::Streams`]):
    /// 1, or 3 (or 5) on a cluster, so that a stream outlives a server. Default 1.
    pub stream_replicas: usize,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            connect: async_nats::ConnectOptions::default(),
            bus: BusOptions::default(),
            stream_replicas: 1,
        }
    }
}

/// A connection to NATS.
#[derive(Debug)]
pub(crate) struct Nats {
    pub(crate) client: async_nats::Client,
    /// [`NatsOptions::stream_replicas`].
    pub(crate) stream_replicas: usize,
    /// The JetStream context, made on first use.
    jetstream: std::sync::OnceLock<crate::streams::jetstream::Js>,
    servers: String,
    subs: Mutex<HashMap<u64, Forwarder>>,
    core: Arc<Core>,
    inbox_task: JoinHandle<()>,
}

/// The task moving one subscription's messages into its queue.
#[derive(Debug)]
struct Forwarder {
    /// The `async-nats` subscription, shared with the task so that an unsubscribe can drop
    /// it at once: its `Drop` queues the UNSUB before anything sent after it (a flush).
    slot: Slot,
    drain: CancellationToken,
    task: JoinHandle<()>,
}

type Slot = Arc<Mutex<Option<async_nats::Subscriber>>>;

impl Nats {
    /// The streams of this connection's JetStream.
    pub(crate) fn jetstream(&self) -> crate::streams::jetstream::Js {
        self.jetstream
            .get_or_init(|| {
                crate::streams::jetstream::Js::new(self.client.clone(), self.stream_replicas)
            })
            .clone()
    }

    pub(crate) async fn connect(
        servers: &str,
        options: NatsOptions,
        core: Arc<Core>,
    ) -> Result<Arc<Nats>, BusError> {
        let addrs: Vec<String> = servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let callback_events = core.events.clone();
        let callback_servers = servers.to_owned();
        let connect = options.connect.event_callback(move |event| {
            let (events, servers) = (callback_events.clone(), callback_servers.clone());
            async move {
                let event = match event {
                    async_nats::Event::Connected => Event::Connected { server: servers },
                    async_nats::Event::Disconnected => Event::Disconnected {
                        reason: format!("disconnected from NATS ({servers})"),
                    },
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "NATS client dropped messages of a slow subscription");
                        return;
                    }
                    other => {
                        tracing::info!(event = %other, "NATS event");
                        return;
                    }
                };
                let _ = events.send(event);
            }
        });
        let client = connect
            .connect(addrs.as_slice())
            .await
            .map_err(|e| BusError::Connect {
                addr: servers.to_owned(),
                source: Box::new(ConnectError::Backend(Box::new(e))),
            })?;

        let inbox = core.inbox.clone();
        let inbox_sub = client
            .subscribe(inbox.filter())
            .await
            .map_err(|e| backend("subscribe to the request inbox", e))?;
        let target = Target::Inbox(inbox.clone());
        let inbox_task = tokio::spawn(async move {
            let mut sub = inbox_sub;
            while let Some(message) = sub.next().await {
                target.deliver(from_nats(message));
            }
        });
        client
            .flush()
            .await
            .map_err(|e| backend("flush the inbox subscription", e))?;
        core.report(Event::Connected {
            server: servers.to_owned(),
        });
        Ok(Arc::new(Nats {
            client,
            stream_replicas: options.stream_replicas.max(1),
            jetstream: std::sync::OnceLock::new(),
            servers: servers.to_owned(),
            subs: Mutex::new(HashMap::new()),
            core,
            inbox_task,
        }))
    }

    async fn send(&self, message: Message) -> Result<(), BusError> {
        let subject = message.subject.to_string();
        let result = match (message.reply, message.headers.is_empty()) {
            (None, true) => self.client.publish(subject, message.payload).await,
            (None, false) => {
                let headers = to_nats(&message.headers)?;
                self.client
                    .publish_with_headers(subject, headers, message.payload)
                    .await
            }
            (Some(reply), true) => {
                self.client
                    .publish_with_reply(subject, reply.to_string(), message.payload)
                    .await
            }
            (Some(reply), false) => {
                let headers = to_nats(&message.headers)?;
                self.client
                    .publish_with_reply_and_headers(
                        subject,
                        reply.to_string(),
                        headers,
                        message.payload,
                    )
                    .await
            }
        };
        result.map_err(|e| backend("publish", e))
    }

    async fn subscribe_to(
        self: &Arc<Self>,
        key: u64,
        queue: SubQueue,
    ) -> Result<Arc<dyn Unsubscribe>, BusError> {
        let filter = queue.state.subject.to_string();
        let sub = match &queue.state.queue {
            None => self.client.subscribe(filter).await,
            Some(group) => self.client.queue_subscribe(filter, group.to_string()).await,
        }
        .map_err(|e| backend("subscribe", e))?;
        let drain = CancellationToken::new();
        let slot = Arc::new(Mutex::new(Some(sub)));
        let task = tokio::spawn(forward(slot.clone(), queue, drain.clone()));
        self.lock_subs()
            .insert(key, Forwarder { slot, drain, task });
        Ok(self.clone())
    }

    /// A round trip to the server: everything sent before it has been processed when it
    /// returns. (`async_nats::Client::flush` only writes the socket out; it does not wait
    /// for the server.) A message to one of this handle's own inbox subjects comes back
    /// on the inbox subscription after the server has handled everything sent before it.
    ///
    /// A PING would put nothing on the account's subjects, but async-nats 0.51 has no
    /// public way to send one and await its PONG. So the round trip is a message, marked
    /// with [`PROBE_HEADER`]: courier subscribers (a `>` monitor included) drop it; other
    /// NATS clients subscribed to `_INBOX.>` or `>` see it.
    async fn round_trip(&self) -> Result<(), BusError> {
        let (subject, waiting) = self.core.inbox.register(None);
        let mut marker = async_nats::HeaderMap::new();
        marker.insert(PROBE_HEADER, "flush");
        self.client
            .publish_with_headers(subject.to_string(), marker, bytes::Bytes::new())
            .await
            .map_err(|e| backend("flush", e))?;
        self.client.flush().await.map_err(|e| backend("flush", e))?;
        let mut waiting = waiting;
        let timeout = self.core.options.request_timeout;
        match tokio::time::timeout(timeout, &mut waiting.rx).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(BusError::NotConnected {
                addr: self.servers.clone(),
                reason: Arc::from("the connection to NATS was closed during a flush"),
            }),
            Err(_) => Err(BusError::Timeout {
                subject: subject.to_string(),
                timeout,
            }),
        }
    }

    fn lock_subs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Forwarder>> {
        lock(&self.subs)
    }
}

impl Backend for Nats {
    fn max_payload(&self) -> Option<(usize, &'static str)> {
        match self.client.max_payload() {
            0 => None,
            limit => Some((limit, "the NATS server's max_payload")),
        }
    }

    async fn publish(&self, message: Message) -> Result<(), BusError> {
        self.send(message).await
    }

    async fn subscribe(
        self: &Arc<Self>,
        key: u64,
        queue: SubQueue,
    ) -> Result<Arc<dyn Unsubscribe>, BusError> {
        self.subscribe_to(key, queue).await
    }

    async fn confirm(&self) -> Result<(), BusError> {
        self.round_trip().await
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.round_trip().await
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn disconnect_reason(&self) -> Arc<str> {
        Arc::from(format!("disconnected from NATS ({})", self.servers))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.inbox_task.abort();
    }
}

impl Unsubscribe for Nats {
    fn unsubscribe(&self, key: u64, _state: &SubState) {
        // Dropping the `async-nats` subscriber unsubscribes.
        if let Some(forwarder) = self.lock_subs().remove(&key) {
            drop(lock(&forwarder.slot).take());
            forwarder.task.abort();
        }
    }

    fn drain(
        self: Arc<Self>,
        key: u64,
        _state: Arc<SubState>,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let forwarder = self.lock_subs().remove(&key);
        Box::pin(async move {
            if let Some(forwarder) = forwarder {
                forwarder.drain.cancel();
                let _ = forwarder.task.await;
            }
        })
    }
}

/// The header marking courier's own round-trip messages on NATS (see
/// [`Nats::round_trip`]); courier subscribers never receive them.
const PROBE_HEADER: &str = "Courier-Probe";

/// Whether `message` is another courier handle's round trip, not an application's.
fn is_probe(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .is_some_and(|h| h.get(PROBE_HEADER).is_some())
}

/// Moves messages from the subscription into `queue` until it ends; on `drain`, asks the
/// server to stop sending and forwards what was already on its way.
async fn forward(slot: Slot, queue: SubQueue, drain: CancellationToken) {
    let next = || {
        std::future::poll_fn(|cx| match lock(&slot).as_mut() {
            Some(sub) => sub.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        })
    };
    loop {
        tokio::select! {
            message = next() => match message {
                Some(message) if is_probe(&message) => {}
                Some(message) => {
                    queue.deliver(from_nats(message));
                }
                None => return,
            },
            _ = drain.cancelled() => break,
        }
    }
    let Some(mut sub) = lock(&slot).take() else {
        return;
    };
    if sub.drain().await.is_ok() {
        while let Some(message) = sub.next().await {
            if !is_probe(&message) {
                queue.deliver(from_nats(message));
            }
        }
    }
}

fn backend(
    operation: &'static str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> BusError {
    BusError::Backend {
        operation,
        source: Box::new(error),
    }
}

pub(crate) fn to_nats(headers: &Metadata) -> Result<async_nats::HeaderMap, BusError> {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers.iter() {
        let invalid = |reason: String| BusError::InvalidHeader {
            name: name.to_string(),
            reason,
        };
        let header_name: async_nats::HeaderName =
            name.as_str().parse().map_err(|e| invalid(format!("{e}")))?;
        let text = std::str::from_utf8(value)
            .map_err(|_| invalid("NATS header values are text; this one is not UTF-8".into()))?;
        let header_value: async_nats::HeaderValue =
            text.parse().map_err(|e| invalid(format!("{e}")))?;
        map.append(header_name, header_value);
    }
    Ok(map)
}

pub(crate) fn from_nats(message: async_nats::Message) -> Message {
    let mut headers = Metadata::new();
    if let Some(map) = &message.headers {
        for (name, values) in map.iter() {
            for value in values {
                headers.append(name.to_string(), value.to_string());
            }
        }
    }
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        let description = message
            .description
            .clone()
            .unwrap_or_else(|| format!("no responders for `{}`", message.subject));
        headers.extend(&status_headers(NO_RESPONDERS, description));
    }
    Message {
        subject: Utf8Bytes::from(message.subject.to_string()),
        reply: message.reply.map(|r| Utf8Bytes::from(r.to_string())),
        headers,
        payload: message.payload,
    }
}
