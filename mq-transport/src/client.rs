//! The remote backend: a client of a courier broker over TCP.
//!
//! One connection per [`crate::Bus`] handle (and its clones). A supervisor task owns the
//! connection's read loop; when the connection ends it reconnects with backoff,
//! subscribes again to everything still subscribed, then sends the publishes buffered
//! while disconnected, in order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rpc_core::client::Backoff;
use rpc_core::connection::{self, FrameReader, FrameSender};
use rpc_core::frame::{Connect, Frame, GoAway, Publish, Subscribe};
use rpc_core::transport::{Connector, TcpConnector};
use rpc_core::{ConnectionConfig, ProtocolError, RpcError, Utf8Bytes};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::delivery::{self, Inbox, SubQueue, SubState, Subscriber, Target, Unsubscribe};
use crate::error::BusError;
use crate::event::Event;
use crate::message::Message;
use crate::subject;

/// Options of a connection to a courier broker.
///
/// ```
/// use std::time::Duration;
/// use mq_transport::ConnectOptions;
///
/// let mut options = ConnectOptions::default();
/// options.name = "billing".into();
/// options.token = Some("s3cret".into());
/// options.request_timeout = Duration::from_secs(2);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// A name for the broker's logs. Default `"courier"`.
    pub name: String,
    /// The shared token, when the broker requires one. Default none.
    pub token: Option<String>,
    /// Messages queued per subscription before new ones are dropped (and counted).
    /// Default 65,536.
    pub subscription_capacity: usize,
    /// The timeout of [`crate::Bus::request`]. Default 5 s.
    pub request_timeout: Duration,
    /// How long the broker has to answer a connect. Default 5 s.
    pub connect_timeout: Duration,
    /// Spacing of reconnect attempts (default: from 50 ms doubling to 5 s, forever).
    pub reconnect: Backoff,
    /// Bytes of publishes kept while disconnected, sent in order once reconnected.
    /// Beyond it a publish fails with [`BusError::ReconnectBufferFull`]. Publishes
    /// already handed to a connection that then fails are lost (at-most-once, as in
    /// NATS core). Default 8 MiB.
    pub reconnect_buffer: usize,
    /// Frame size, keepalive and queue settings of the connection.
    pub connection: ConnectionConfig,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            name: "courier".into(),
            token: None,
            subscription_capacity: 65_536,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect: Backoff::default(),
            reconnect_buffer: 8 * 1024 * 1024,
            connection: ConnectionConfig::default(),
        }
    }
}

/// The user-facing owner of a [`Remote`]: when the last `Bus` clone and the last
/// `Subscriber` are gone, the connection closes.
#[derive(Debug)]
pub(crate) struct Client {
    remote: Arc<Remote>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.remote.shutdown.cancel();
    }
}

impl Client {
    pub(crate) async fn connect(
        addr: String,
        options: ConnectOptions,
    ) -> Result<Arc<Client>, BusError> {
        let connector = TcpConnector::new(addr.clone());
        let (reader, sender, broker) = handshake(&connector, &options).await?;
        let remote = Arc::new(Remote {
            addr,
            connector,
            state: Mutex::new(State::Connected(sender.clone())),
            subs: Mutex::new(HashMap::new()),
            next_sid: AtomicU64::new(1),
            inbox: Arc::new(Inbox::new()),
            events: broadcast::channel(256).0,
            max_payload: AtomicUsize::new(broker.max_payload as usize),
            shutdown: CancellationToken::new(),
            options,
        });
        // The inbox is one more subscription, restored on reconnect like the others.
        let inbox_sid = remote.next_sid.fetch_add(1, Ordering::Relaxed);
        let inbox_filter = Utf8Bytes::from(remote.inbox.filter());
        remote.lock_subs().insert(
            inbox_sid,
            SubEntry {
                filter: inbox_filter.clone(),
                queue: None,
                target: Target::Inbox(remote.inbox.clone()),
            },
        );
        sender
            .send(Frame::Sub(Subscribe {
                sid: inbox_sid,
                subject: inbox_filter,
                queue: Utf8Bytes::default(),
            }))
            .await?;
        tokio::spawn(remote.clone().supervise(reader));
        let _ = remote.events.send(Event::Connected {
            server: remote.addr.clone(),
        });
        Ok(Arc::new(Client { remote }))
    }

    pub(crate) fn remote(&self) -> &Arc<Remote> {
        &self.remote
    }

    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        filter: Utf8Bytes,
        queue: Option<Utf8Bytes>,
    ) -> Result<Subscriber, BusError> {
        let remote = &self.remote;
        let sid = remote.next_sid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = SubQueue::new(
            filter.clone(),
            queue.clone(),
            remote.options.subscription_capacity,
            remote.events.clone(),
        );
        let state = tx.state.clone();
        remote.lock_subs().insert(
            sid,
            SubEntry {
                filter: filter.clone(),
                queue: queue.clone(),
                target: Target::Queue(tx),
            },
        );
        // From here the subscription is the client's: dropping the subscriber removes it.
        let subscriber = Subscriber::new(rx, state.clone(), sid, self.clone());
        // While disconnected, the reconnect sends it along with the others.
        if let Some(sender) = remote.connected() {
            let frame = Frame::Sub(Subscribe {
                sid,
                subject: filter.clone(),
                queue: queue.unwrap_or_default(),
            });
            // Confirmed by a round trip: the broker has it (or refused it) before the pong.
            if sender.send(frame).await.is_ok() {
                let _ = sender.round_trip().await;
            }
        }
        if let Some(reason) = state.refused() {
            return Err(BusError::SubscriptionRefused {
                subject: filter.to_string(),
                reason: reason.to_owned(),
            });
        }
        Ok(subscriber)
    }
}

impl Unsubscribe for Client {
    fn unsubscribe(&self, sid: u64, _state: &SubState) {
        let remote = &self.remote;
        if remote.lock_subs().remove(&sid).is_none() {
            return; // the broker ended it already
        }
        if let Some(sender) = remote.connected() {
            if let Err(connection::TrySendError::Full(frame)) =
                sender.try_send(Frame::Unsub { sid })
            {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { sender.send(frame).await });
                }
            }
        }
    }

    fn drain(
        self: Arc<Self>,
        sid: u64,
        _state: Arc<SubState>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            // The broker handles frames in order: once the pong to a ping sent after the
            // unsubscribe is back, nothing more can be on its way to this subscription.
            if let Some(sender) = self.remote.connected() {
                if sender.send(Frame::Unsub { sid }).await.is_ok() {
                    let _ = sender.round_trip().await;
                }
            }
            self.remote.lock_subs().remove(&sid);
        })
    }
}

#[derive(Debug)]
struct SubEntry {
    filter: Utf8Bytes,
    queue: Option<Utf8Bytes>,
    target: Target,
}

#[derive(Debug)]
enum State {
    Connected(FrameSender),
    Disconnected {
        buffer: VecDeque<Frame>,
        bytes: usize,
        reason: Arc<str>,
    },
    Closed,
}

#[derive(Debug)]
pub(crate) struct Remote {
    addr: String,
    connector: TcpConnector,
    state: Mutex<State>,
    subs: Mutex<HashMap<u64, SubEntry>>,
    next_sid: AtomicU64,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) events: broadcast::Sender<Event>,
    /// The broker's limit, from its connect frame (0: not stated).
    max_payload: AtomicUsize,
    shutdown: CancellationToken,
    pub(crate) options: ConnectOptions,
}

impl Remote {
    fn lock_subs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SubEntry>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_connected(&self) -> bool {
        matches!(&*self.lock_state(), State::Connected(_))
    }

    fn connected(&self) -> Option<FrameSender> {
        match &*self.lock_state() {
            State::Connected(sender) => Some(sender.clone()),
            _ => None,
        }
    }

    pub(crate) fn disconnect_reason(&self) -> Arc<str> {
        match &*self.lock_state() {
            State::Connected(_) => Arc::from("the connection was closed"),
            State::Disconnected { reason, .. } => reason.clone(),
            State::Closed => Arc::from("the bus was closed"),
        }
    }

    pub(crate) async fn publish(&self, message: Message) -> Result<(), BusError> {
        subject::validate_subject(&message.subject)?;
        if let Some(reply) = &message.reply {
            subject::validate_subject(reply)?;
        }
        let limit = self.max_payload.load(Ordering::Relaxed);
        if limit != 0 && message.payload.len() > limit {
            return Err(BusError::PayloadTooLarge {
                size: message.payload.len(),
                limit,
                setting: "the broker's max_payload",
            });
        }
        let frame = Frame::Pub(Publish {
            subject: message.subject,
            reply: message.reply.unwrap_or_default(),
            headers: message.headers,
            payload: message.payload,
        });
        loop {
            let sender = {
                let mut state = self.lock_state();
                match &mut *state {
                    State::Connected(sender) => sender.clone(),
                    State::Disconnected { buffer, bytes, .. } => {
                        let size = frame.encoded_len().map_err(RpcError::from)?;
                        let limit = self.options.reconnect_buffer;
                        if *bytes + size > limit {
                            return Err(BusError::ReconnectBufferFull {
                                buffered: *bytes,
                                limit,
                            });
                        }
                        *bytes += size;
                        buffer.push_back(frame);
                        return Ok(());
                    }
                    State::Closed => return Err(BusError::Closed),
                }
            };
            // Sent as a clone (reference counts, no payload copy) so that the frame can
            // go to the reconnect buffer if this connection turns out to be dead.
            match sender.send(frame.clone()).await {
                Ok(()) => return Ok(()),
                Err(RpcError::ConnectionClosed { reason }) => {
                    // The connection died under us: buffer it for the reconnect, unless
                    // the supervisor already has a new connection.
                    let mut state = self.lock_state();
                    if let State::Connected(current) = &*state {
                        if current.same_connection(&sender) {
                            *state = State::Disconnected {
                                buffer: VecDeque::new(),
                                bytes: 0,
                                reason,
                            };
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(crate) async fn flush(&self) -> Result<(), BusError> {
        match self.connected() {
            Some(sender) => Ok(sender.round_trip().await?),
            None => Err(BusError::NotConnected {
                addr: self.addr.clone(),
                reason: self.disconnect_reason(),
            }),
        }
    }

    /// Reads until the connection ends, then reconnects, until shut down.
    async fn supervise(self: Arc<Self>, mut reader: FrameReader<OwnedReadHalf>) {
        loop {
            let reason = tokio::select! {
                reason = self.read_loop(&mut reader) => reason,
                _ = self.shutdown.cancelled() => {
                    if let State::Connected(sender) = std::mem::replace(&mut *self.lock_state(), State::Closed) {
                        sender.close();
                    }
                    self.close_subscriptions();
                    return;
                }
            };
            tracing::info!(broker = %self.addr, %reason, "disconnected from the broker");
            {
                let mut state = self.lock_state();
                let reason: Arc<str> = Arc::from(reason.as_str());
                match &mut *state {
                    // A publisher may have seen the failure first and started buffering.
                    State::Disconnected { reason: r, .. } => *r = reason,
                    other => {
                        if let State::Connected(sender) = other {
                            sender.close();
                        }
                        *other = State::Disconnected {
                            buffer: VecDeque::new(),
                            bytes: 0,
                            reason,
                        };
                    }
                }
            }
            // Replies to requests in flight would come on the lost connection.
            self.inbox.fail_all();
            let _ = self.events.send(Event::Disconnected { reason });
            match self.reconnect().await {
                Some(next) => reader = next,
                None => {
                    *self.lock_state() = State::Closed;
                    self.close_subscriptions();
                    return;
                }
            }
        }
    }

    /// Ends every subscriber's stream.
    fn close_subscriptions(&self) {
        self.lock_subs().clear();
        self.inbox.fail_all();
    }

    /// Returns why the connection ended.
    async fn read_loop(&self, reader: &mut FrameReader<OwnedReadHalf>) -> String {
        let mut go_away: Option<GoAway> = None;
        loop {
            match reader.next().await {
                Some(Ok(Frame::Msg(m))) => {
                    let message = Message {
                        subject: m.subject,
                        reply: (!m.reply.is_empty()).then_some(m.reply),
                        headers: m.headers,
                        payload: m.payload,
                    };
                    let mut subs = self.lock_subs();
                    if let Some(entry) = subs.get(&m.sid) {
                        match &entry.target {
                            Target::Queue(queue) if delivery::is_refusal(&message) => {
                                queue.refuse(&message);
                                tracing::warn!(subject = %entry.filter, reason = queue.state.refused().unwrap_or(""), "the broker ended a subscription");
                                subs.remove(&m.sid);
                            }
                            target => {
                                target.deliver(message);
                            }
                        }
                    }
                }
                Some(Ok(Frame::Unsub { sid })) => {
                    self.lock_subs().remove(&sid);
                }
                Some(Ok(Frame::GoAway(g))) => {
                    tracing::info!(broker = %self.addr, code = g.code, message = %g.message, "broker is going away");
                    go_away = Some(g);
                }
                Some(Ok(other)) => {
                    let e = reader.protocol_violation(ProtocolError::UnexpectedFrame {
                        kind: other.kind(),
                        context: "a bus client accepts only msg, unsub and go-away frames",
                    });
                    return e.to_string();
                }
                Some(Err(e)) => {
                    return match go_away {
                        Some(g) => format!("broker went away: {} ({e})", g.message),
                        None => e.to_string(),
                    };
                }
                None => {
                    return match go_away {
                        Some(g) => format!("broker went away: {}", g.message),
                        None => "the broker closed the connection".into(),
                    };
                }
            }
        }
    }

    /// Connects again with backoff, restores subscriptions and sends the buffered
    /// publishes. `None` when shut down or out of attempts.
    async fn reconnect(&self) -> Option<FrameReader<OwnedReadHalf>> {
        let mut failures = 0u32;
        loop {
            if self
                .options
                .reconnect
                .max_attempts
                .is_some_and(|max| failures >= max)
            {
                tracing::error!(broker = %self.addr, attempts = failures, "giving up reconnecting");
                return None;
            }
            let delay = self.options.reconnect.delay(failures + 1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => return None,
            }
            let attempt = tokio::select! {
                r = handshake(&self.connector, &self.options) => r,
                _ = self.shutdown.cancelled() => return None,
            };
            match attempt {
                Ok((reader, sender, broker)) => {
                    self.max_payload
                        .store(broker.max_payload as usize, Ordering::Relaxed);
                    if self.restore(&sender).await.is_ok() {
                        tracing::info!(broker = %self.addr, "reconnected to the broker");
                        let _ = self.events.send(Event::Connected {
                            server: self.addr.clone(),
                        });
                        return Some(reader);
                    }
                    failures += 1;
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(broker = %self.addr, error = %e, attempt = failures, "reconnect failed");
                }
            }
        }
    }

    /// Subscribes again, then drains the reconnect buffer, then marks the connection
    /// live. Publishes made meanwhile land in the buffer and are drained in order.
    async fn restore(&self, sender: &FrameSender) -> Result<(), RpcError> {
        let subs: Vec<Frame> = self
            .lock_subs()
            .iter()
            .map(|(sid, entry)| {
                Frame::Sub(Subscribe {
                    sid: *sid,
                    subject: entry.filter.clone(),
                    queue: entry.queue.clone().unwrap_or_default(),
                })
            })
            .collect();
        for frame in subs {
            sender.send(frame).await?;
        }
        loop {
            let buffered = {
                let mut state = self.lock_state();
                match &mut *state {
                    State::Disconnected { buffer, bytes, .. } if !buffer.is_empty() => {
                        *bytes = 0;
                        std::mem::take(buffer)
                    }
                    _ => {
                        *state = State::Connected(sender.clone());
                        return Ok(());
                    }
                }
            };
            for frame in buffered {
                sender.send(frame).await?;
            }
        }
    }
}

/// Opens a connection and exchanges connect frames. A go-away instead of the broker's
/// connect (wrong token, too many connections) is the error.
async fn handshake(
    connector: &TcpConnector,
    options: &ConnectOptions,
) -> Result<(FrameReader<OwnedReadHalf>, FrameSender, Connect), BusError> {
    let addr = connector.describe();
    let fail = |reason: String| BusError::Connect {
        addr: addr.clone(),
        reason,
    };
    let (io, _peer) = tokio::time::timeout(options.connect_timeout, connector.connect())
        .await
        .map_err(|_| {
            fail(format!(
                "no connection within {:?}",
                options.connect_timeout
            ))
        })?
        .map_err(|e| fail(e.to_string()))?;
    let (mut reader, sender) = connection::start(io, &options.connection);
    sender
        .send(Frame::Connect(Connect {
            max_frame_len: options.connection.max_frame_len.min(u32::MAX as usize) as u32,
            max_payload: 0,
            name: options.name.clone().into(),
            token: options.token.clone().unwrap_or_default().into(),
        }))
        .await
        .map_err(|e| fail(e.to_string()))?;
    match tokio::time::timeout(options.connect_timeout, reader.next()).await {
        Ok(Some(Ok(Frame::Connect(broker)))) => Ok((reader, sender, broker)),
        Ok(Some(Ok(Frame::GoAway(g)))) => Err(fail(format!(
            "the broker refused the connection: {}",
            g.message
        ))),
        Ok(Some(Ok(other))) => Err(fail(format!(
            "expected the broker's connect frame, got {}",
            other.kind()
        ))),
        Ok(Some(Err(e))) => Err(fail(e.to_string())),
        Ok(None) => Err(fail("the broker closed the connection".into())),
        Err(_) => Err(fail(format!(
            "no answer to connect within {:?}",
            options.connect_timeout
        ))),
    }
}
