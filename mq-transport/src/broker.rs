//! [`Broker`]: courier's own message broker, over TCP.
//!
//! Each connection is one task reading frames in order: a publish is routed to its
//! subscribers before the next frame is read, which keeps order per publisher and
//! subject. A `Msg` frame is queued on the subscriber's connection with `try_send`,
//! sharing the payload buffer, and that connection's writer coalesces whatever is queued
//! into one write. A subscriber connection whose queue is at
//! [`ConnectionConfig::max_queued_bytes`] holds up the publisher that wants to add to it,
//! for at most [`BrokerConfig::slow_consumer_grace`] (back-pressure, not loss, for a
//! subscriber briefly behind). Still full after that, it is a slow consumer: cut off with
//! a `SLOW_CONSUMER` go-away and its subscriptions removed, so it holds up nobody longer.
//!
//! Memory per connection is bounded by `max_queued_bytes` (default 64 MiB) plus the
//! writer's buffer (256 KiB and one frame) plus one frame being read (at most
//! `max_frame_len`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rpc_core::connection::{self, FrameReader, FrameSender, TrySendError};
use rpc_core::frame::{Connect, Frame, GoAway, Message as MsgFrame, Publish, Subscribe};
use rpc_core::transport::PeerAddr;
use rpc_core::{ConnectionConfig, ProtocolError, RpcError, Utf8Bytes};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::message::{NO_RESPONDERS, SUBSCRIPTION_REFUSED, status_headers};
use crate::subject;
use crate::sublist::Sublist;

/// Limits and settings of a [`Broker`].
///
/// ```
/// use mq_transport::BrokerConfig;
///
/// let mut config = BrokerConfig::default();
/// config.max_payload = 64 * 1024;
/// config.token = Some("s3cret".into());
/// assert_eq!(config.max_connections, 10_000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// The largest payload a publish may carry; stated to clients when they connect, so
    /// that they refuse larger publishes themselves. A client that sends one anyway is
    /// disconnected with a go-away naming the limit. Default 1 MiB.
    pub max_payload: usize,
    /// Connections served at once; one more is refused with a go-away. Default 10,000.
    pub max_connections: usize,
    /// Subscriptions per connection; one more is refused (the subscribe call fails with
    /// the limit named). Default 65,536.
    pub max_subscriptions: usize,
    /// When set, clients must present this token on connect.
    pub token: Option<String>,
    /// How long a new connection has to send its connect frame. Default 5 s.
    pub handshake_timeout: Duration,
    /// Frame size, keepalive and queue limits of every connection. `max_queued_bytes`
    /// (default 64 MiB) is the slow-consumer threshold. `send_queue` defaults to 4 Mi
    /// frames here (the queue allocates as it fills), so that the byte limit, not a frame
    /// count, decides who is slow: 1,024 frames of small messages are only ~40 KiB.
    pub connection: ConnectionConfig,
    /// The broker's name, sent to clients. Default `"courier-broker"`.
    pub name: String,
    /// How long a publisher waits for room on a subscriber connection that is at
    /// `max_queued_bytes` before that subscriber is cut off as a slow consumer. While it
    /// waits, the broker reads nothing more from that publisher (back-pressure through
    /// TCP). Zero cuts at once. Default 2 s.
    pub slow_consumer_grace: Duration,
    /// Bytes queued for a subscriber connection past which the broker paces the
    /// publishers adding to it: after routing a message there, a publisher waits until
    /// that queue is down to half of this. Queues stay short (cache-friendly, low
    /// latency) instead of filling to `max_queued_bytes` when publishers outrun
    /// subscribers. A queue that does not get there within `slow_consumer_grace` belongs
    /// to a subscriber that is not reading: it is cut off as a slow consumer. No pacing
    /// with a zero grace. Default 1 MiB.
    pub pace_queued_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_payload: 1024 * 1024,
            max_connections: 10_000,
            max_subscriptions: 65_536,
            token: None,
            handshake_timeout: Duration::from_secs(5),
            slow_consumer_grace: Duration::from_secs(2),
            pace_queued_bytes: 1024 * 1024,
            connection: {
                let mut connection = ConnectionConfig::default();
                connection.send_queue = 4 * 1024 * 1024;
                connection
            },
            name: "courier-broker".into(),
        }
    }
}

/// Counters of a running broker; see [`Broker::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Connections open now.
    pub connections: usize,
    /// Subscriptions held now.
    pub subscriptions: usize,
    /// Publishes received.
    pub messages_in: u64,
    /// Messages queued to subscribers.
    pub messages_out: u64,
    /// Connections cut off for not keeping up.
    pub slow_consumers: u64,
    /// Bytes queued to all connections and not yet written, now.
    pub queued_bytes: usize,
}

/// A courier broker listening on TCP, running on the current tokio runtime.
///
/// ```
/// use mq_transport::{Broker, Bus};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = Broker::bind("127.0.0.1:0").await?;
/// let bus = Bus::connect(broker.local_addr().to_string()).await?;
/// let mut sub = bus.subscribe("ping").await?;
/// bus.publish("ping", "hello").await?;
/// assert_eq!(&sub.next().await.unwrap().payload[..], b"hello");
/// broker.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Broker {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Broker {
    /// Listens on `addr` with default limits.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Broker> {
        Broker::bind_with(addr, BrokerConfig::default()).await
    }

    /// Listens on `addr`.
    pub async fn bind_with(addr: impl ToSocketAddrs, config: BrokerConfig) -> io::Result<Broker> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            subs: Sublist::new(),
            config,
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            listener,
            shared.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        tracing::info!(addr = %local_addr, "broker listening");
        Ok(Broker {
            local_addr,
            shared,
            stop,
            tracker,
        })
    }

    /// Where the broker listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Current counters.
    pub fn stats(&self) -> BrokerStats {
        let connections = self.shared.lock_connections();
        BrokerStats {
            connections: connections.len(),
            subscriptions: self.shared.subs.len(),
            messages_in: self.shared.messages_in.load(Ordering::Relaxed),
            messages_out: self.shared.messages_out.load(Ordering::Relaxed),
            slow_consumers: self.shared.slow_consumers.load(Ordering::Relaxed),
            queued_bytes: connections.values().map(|c| c.sender.queued_bytes()).sum(),
        }
    }

    /// Stops: no new connections; every connection gets a `SHUTDOWN` go-away after what
    /// is already queued for it, then closes. Returns when all are closed; a connection
    /// whose peer does not read what is left within 5 s is cut off.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!(addr = %self.local_addr, "broker stopped");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug)]
struct Shared {
    subs: Sublist<Route>,
    config: BrokerConfig,
    connections: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    slow_consumers: AtomicU64,
}

impl Shared {
    fn lock_connections(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers a publish to every plain subscriber and one member of each queue group;
    /// waits (up to `slow_consumer_grace`) for room on subscriber connections that are
    /// full.
    async fn route(&self, publish: &Publish) {
        let mut later = Later::default();
        self.route_now(publish, &mut later);
        for (conn, frame) in later.full {
            conn.deliver_within(frame, self).await;
        }
        let pace = self.config.pace_queued_bytes;
        let grace = self.config.slow_consumer_grace;
        if grace.is_zero() {
            return; // no grace, no pacing: cut only at max_queued_bytes, at once
        }
        for conn in later.behind {
            if conn.slow.load(Ordering::Relaxed) {
                continue;
            }
            if !conn.sender.wait_below(pace / 2, grace).await {
                conn.cut_off(
                    format!(
                        "slow consumer: {} bytes queued for this connection did not drain \
                         below {} bytes (half of pace_queued_bytes) within {grace:?} \
                         (slow_consumer_grace); disconnecting",
                        conn.sender.queued_bytes(),
                        pace / 2,
                    ),
                    self,
                );
            }
        }
    }

    /// Queues on every connection with room; collects the frames for full ones.
    fn route_now(&self, publish: &Publish, later: &mut Later) {
        let found = self.subs.matches(&publish.subject);
        if found.is_empty() {
            if !publish.reply.is_empty() {
                self.no_responders(publish, later);
            }
            return;
        }
        let pace = self.config.pace_queued_bytes;
        let delivered = found.deliver(|route| route.deliver(publish, pace, later));
        self.messages_out.fetch_add(delivered, Ordering::Relaxed);
    }

    /// Tells a requester at once that its request reached nobody: a status message to
    /// the reply subject, routed like any publish (it has no reply subject itself).
    fn no_responders(&self, request: &Publish, later: &mut Later) {
        let description = format!("no responders for `{}`", request.subject);
        self.route_now(
            &Publish {
                subject: request.reply.clone(),
                reply: Utf8Bytes::default(),
                headers: status_headers(NO_RESPONDERS, description),
                payload: bytes::Bytes::new(),
            },
            later,
        );
    }
}

/// What routing a publish left to wait for.
#[derive(Default)]
struct Later {
    /// Frames for connections at `max_queued_bytes`.
    full: Vec<(Arc<Conn>, Frame)>,
    /// Connections past `pace_queued_bytes`.
    behind: Vec<Arc<Conn>>,
}

/// One subscription's way out: its connection and its sid there.
#[derive(Clone, Debug)]
struct Route {
    conn: Arc<Conn>,
    sid: u64,
}

impl Route {
    /// Queues the message on the subscriber's connection. `false` if it cannot take it
    /// (cut off, or closed); a full connection gets it later (`later.full`), and one past
    /// `pace` is noted to pace the publisher (`later.behind`).
    fn deliver(&self, publish: &Publish, pace: usize, later: &mut Later) -> bool {
        let conn = &self.conn;
        if conn.slow.load(Ordering::Relaxed) {
            return false;
        }
        let frame = Frame::Msg(MsgFrame {
            sid: self.sid,
            subject: publish.subject.clone(),
            reply: publish.reply.clone(),
            headers: publish.headers.clone(),
            payload: publish.payload.clone(),
        });
        match conn.sender.try_send(frame) {
            Ok(()) => {
                if conn.sender.queued_bytes() > pace {
                    later.behind.push(conn.clone());
                }
                true
            }
            Err(TrySendError::Full(frame)) => {
                later.full.push((conn.clone(), frame));
                true
            }
            Err(TrySendError::Failed(_)) => false,
        }
    }
}

impl Conn {
    /// Queues `frame` once there is room, waiting up to the grace; a connection still
    /// full after it is cut off as a slow consumer.
    async fn deliver_within(&self, frame: Frame, shared: &Shared) {
        if self.slow.load(Ordering::Relaxed) {
            return;
        }
        let grace = shared.config.slow_consumer_grace;
        if !grace.is_zero() {
            let Err(TrySendError::Full(_)) = self.sender.send_within(frame, grace).await else {
                return; // queued, or the connection is gone
            };
        }
        let limits = &shared.config.connection;
        let message = format!(
            "slow consumer: {} bytes queued for this connection reached the broker's \
             limit of {} bytes (max_queued_bytes) or of {} frames (send_queue), and did not \
             drain within {:?} (slow_consumer_grace); disconnecting",
            self.sender.queued_bytes(),
            limits.max_queued_bytes,
            limits.send_queue,
            grace,
        );
        self.cut_off(message, shared);
    }

    /// Cuts this connection off as a slow consumer, once: go-away, queue discarded.
    fn cut_off(&self, message: String, shared: &Shared) {
        if self.slow.swap(true, Ordering::Relaxed) {
            return;
        }
        shared.slow_consumers.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %self.peer, name = %self.name(), "{message}");
        self.sender.abort_with(
            GoAway::new(GoAway::SLOW_CONSUMER, message.clone()),
            &RpcError::ConnectionClosed {
                reason: message.into(),
            },
        );
    }
}

#[derive(Debug)]
struct Conn {
    peer: PeerAddr,
    name: Mutex<String>,
    sender: FrameSender,
    /// Cut off as a slow consumer: nothing more is queued for it.
    slow: AtomicBool,
}

impl Conn {
    fn name(&self) -> String {
        self.name.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(serve(
            stream,
            PeerAddr::Tcp(addr),
            shared.clone(),
            stop.clone(),
        ));
    }
}

/// Serves one connection from handshake to close.
async fn serve(stream: TcpStream, peer: PeerAddr, shared: Arc<Shared>, stop: CancellationToken) {
    let config = &shared.config;
    let (mut reader, sender) = connection::start(stream, &config.connection);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn {
        peer: peer.clone(),
        name: Mutex::new(String::new()),
        sender: sender.clone(),
        slow: AtomicBool::new(false),
    });
    {
        let mut connections = shared.lock_connections();
        if connections.len() >= config.max_connections {
            drop(connections);
            let message = format!(
                "too many connections: the broker's limit is {} (max_connections)",
                config.max_connections
            );
            tracing::warn!(%peer, "{message}");
            let reason = RpcError::ConnectionClosed {
                reason: message.clone().into(),
            };
            sender.close_with(GoAway::new(GoAway::TOO_MANY_CONNECTIONS, message), &reason);
            return;
        }
        connections.insert(id, conn.clone());
    }
    let mut session = Session {
        shared: &shared,
        conn: &conn,
        subs: HashMap::new(),
    };
    let outcome = tokio::select! {
        outcome = session.run(&mut reader) => outcome,
        _ = stop.cancelled() => {
            sender.close_with(
                GoAway::new(GoAway::SHUTDOWN, "the broker is shutting down"),
                &RpcError::ConnectionClosed { reason: "broker shutdown".into() },
            );
            Ok(())
        }
    };
    match outcome {
        Ok(()) => tracing::debug!(%peer, "connection closed"),
        Err(e) => tracing::info!(%peer, error = %e, "connection ended"),
    }
    session.remove_all();
    shared.lock_connections().remove(&id);
    sender.close();
    // A peer that stopped reading would keep the writer from finishing, and a shutdown
    // from returning: give the writer a bounded time, then cut it off.
    if tokio::time::timeout(CLOSE_TIMEOUT, sender.closed())
        .await
        .is_err()
    {
        let reason = "the peer did not read what was left to write within 5 s";
        sender.abort_with(
            GoAway::new(GoAway::SLOW_CONSUMER, reason),
            &RpcError::ConnectionClosed {
                reason: reason.into(),
            },
        );
        sender.closed().await;
    }
}

/// How long a closing connection's writer may take to write what is left.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A subscription as its connection knows it.
struct SessionSub {
    filter: Utf8Bytes,
    queue: Option<Utf8Bytes>,
    /// Its key in the broker's index, assigned by the broker (sids are the client's).
    key: u64,
}

/// One connection's protocol state.
struct Session<'a> {
    shared: &'a Shared,
    conn: &'a Arc<Conn>,
    /// sid → this connection's subscription.
    subs: HashMap<u64, SessionSub>,
}

impl Session<'_> {
    async fn run<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut FrameReader<R>,
    ) -> Result<(), RpcError> {
        self.handshake(reader).await?;
        while let Some(frame) = reader.next().await {
            match frame? {
                Frame::Pub(publish) => {
                    if let Err(e) = subject::validate_subject(&publish.subject) {
                        return Err(self.violation(GoAway::PROTOCOL_ERROR, e.to_string()));
                    }
                    if !publish.reply.is_empty() {
                        if let Err(e) = subject::validate_subject(&publish.reply) {
                            return Err(self.violation(GoAway::PROTOCOL_ERROR, e.to_string()));
                        }
                    }
                    let max = self.shared.config.max_payload;
                    if publish.payload.len() > max {
                        let message = format!(
                            "payload of {} bytes exceeds the broker's maximum payload of {max} bytes (max_payload)",
                            publish.payload.len()
                        );
                        return Err(self.violation(GoAway::LIMIT_EXCEEDED, message));
                    }
                    self.shared.messages_in.fetch_add(1, Ordering::Relaxed);
                    self.shared.route(&publish).await;
                }
                Frame::Sub(sub) => self.subscribe(sub).await?,
                Frame::Unsub { sid } => self.unsubscribe(sid),
                Frame::GoAway(g) => {
                    tracing::debug!(peer = %self.conn.peer, code = g.code, message = %g.message, "client is going away");
                }
                other => {
                    return Err(reader.protocol_violation(ProtocolError::UnexpectedFrame {
                        kind: other.kind(),
                        context: "a broker accepts pub, sub, unsub and go-away frames after connect",
                    }));
                }
            }
        }
        Ok(())
    }

    /// The first frame must be a connect, within the handshake timeout, with the token
    /// when one is required.
    async fn handshake<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut FrameReader<R>,
    ) -> Result<(), RpcError> {
        let config = &self.shared.config;
        let first = match tokio::time::timeout(config.handshake_timeout, reader.next()).await {
            Err(_) => {
                let message = format!(
                    "no connect frame within {:?} (handshake_timeout)",
                    config.handshake_timeout
                );
                return Err(self.violation(GoAway::PROTOCOL_ERROR, message));
            }
            Ok(None) => {
                return Err(RpcError::ConnectionClosed {
                    reason: "closed before connect".into(),
                });
            }
            Ok(Some(first)) => first?,
        };
        let Frame::Connect(hello) = first else {
            return Err(reader.protocol_violation(ProtocolError::UnexpectedFrame {
                kind: first.kind(),
                context: "a broker expects a connect frame first",
            }));
        };
        if let Some(token) = &config.token {
            if hello.token.as_str() != token {
                let message = if hello.token.is_empty() {
                    "authorization required: this broker needs a token"
                } else {
                    "authorization failed: wrong token"
                };
                return Err(self.violation(GoAway::AUTHORIZATION, message.into()));
            }
        }
        *self.conn.name.lock().unwrap_or_else(|e| e.into_inner()) = hello.name.to_string();
        tracing::debug!(peer = %self.conn.peer, name = %hello.name, "client connected");
        self.conn
            .sender
            .send(Frame::Connect(Connect {
                max_frame_len: config.connection.max_frame_len.min(u32::MAX as usize) as u32,
                max_payload: config.max_payload.min(u32::MAX as usize) as u32,
                name: config.name.clone().into(),
                token: Utf8Bytes::default(),
            }))
            .await
    }

    async fn subscribe(&mut self, sub: Subscribe) -> Result<(), RpcError> {
        let queue = (!sub.queue.is_empty()).then_some(sub.queue);
        // A repeated sid replaces the earlier subscription.
        self.unsubscribe(sub.sid);
        let limit = self.shared.config.max_subscriptions;
        let refusal = if self.subs.len() >= limit {
            Some(format!(
                "too many subscriptions: this connection has {}, the broker's limit is {limit} (max_subscriptions)",
                self.subs.len()
            ))
        } else {
            let route = Route {
                conn: self.conn.clone(),
                sid: sub.sid,
            };
            let key = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            match self
                .shared
                .subs
                .insert(&sub.subject, queue.as_deref(), key, route)
            {
                Ok(()) => {
                    let entry = SessionSub {
                        filter: sub.subject,
                        queue,
                        key,
                    };
                    self.subs.insert(sub.sid, entry);
                    return Ok(());
                }
                Err(e) => Some(e.to_string()),
            }
        };
        match refusal {
            None => Ok(()),
            Some(reason) => {
                tracing::info!(peer = %self.conn.peer, subject = %sub.subject, %reason, "subscription refused");
                let headers = status_headers(SUBSCRIPTION_REFUSED, reason);
                self.conn
                    .sender
                    .send(Frame::Msg(MsgFrame {
                        sid: sub.sid,
                        subject: sub.subject,
                        reply: Utf8Bytes::default(),
                        headers,
                        payload: bytes::Bytes::new(),
                    }))
                    .await?;
                self.conn.sender.send(Frame::Unsub { sid: sub.sid }).await
            }
        }
    }

    fn unsubscribe(&mut self, sid: u64) {
        if let Some(sub) = self.subs.remove(&sid) {
            self.shared
                .subs
                .remove(&sub.filter, sub.queue.as_deref(), sub.key);
        }
    }

    fn remove_all(&mut self) {
        for (_, sub) in std::mem::take(&mut self.subs) {
            self.shared
                .subs
                .remove(&sub.filter, sub.queue.as_deref(), sub.key);
        }
    }

    /// Tells the peer why with a go-away and closes the connection.
    fn violation(&self, code: u16, message: String) -> RpcError {
        tracing::warn!(peer = %self.conn.peer, %message, "closing connection");
        let error = RpcError::ConnectionClosed {
            reason: message.clone().into(),
        };
        self.conn
            .sender
            .close_with(GoAway::new(code, message), &error);
        error
    }
}
