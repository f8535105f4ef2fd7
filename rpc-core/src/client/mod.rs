//! The RPC client: one connection, many calls in flight, reconnects on its own.
//!
//! ```no_run
//! use bytes::Bytes;
//! use rpc_core::client::{CallOptions, Client, ClientConfig};
//! use rpc_core::transport::TcpConnector;
//! use std::time::Duration;
//!
//! # async fn f() -> Result<(), rpc_core::RpcError> {
//! let client = Client::connect(TcpConnector::new("127.0.0.1:7000"), ClientConfig::default()).await?;
//! let options = CallOptions::default()
//!     .with_timeout(Duration::from_millis(200))
//!     .with_metadata("authorization", "Bearer t0ken");
//! let answer: Bytes = client.call("Echo.echo", Bytes::from_static(b"payload"), &options).await?;
//! # Ok(()) }
//! ```
//!
//! * **Deadlines.** Every call has one: [`ClientConfig::default_timeout`], or the call's
//!   own [`CallOptions::timeout`]. It covers waiting for a connection, queueing, the server
//!   and the answer. The time left is sent with the request and the server aborts the
//!   handler when it passes.
//! * **Cancellation.** Dropping a call's future before it resolves sends a cancel; the
//!   server aborts the handler.
//! * **Connection loss.** Every call pending on a connection fails with
//!   [`RpcError::ConnectionClosed`] as soon as the connection is seen to close (end of
//!   stream, I/O error, or no frame within the keepalive timeout), not at its deadline.
//! * **Reconnect.** A background task reconnects with [`Backoff`]. Calls made while
//!   disconnected wait for the new connection until their deadline
//!   ([`ClientConfig::wait_for_connection`] = true, the default) or fail at once with
//!   [`RpcError::NotConnected`]. Calls are never resent on their own: a call whose
//!   connection died may or may not have run, and only the caller knows whether it is
//!   safe to retry.

mod conn;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use self::conn::{Answer, Conn};
use crate::connection::{self, Appended, ConnectionConfig, TrySendError};
use crate::error::RpcError;
use crate::format::Encoded;
use crate::frame::{Frame, Request, Status};
pub use crate::transport::Backoff;
use crate::transport::{Connector, Reconnected, reconnect};
use crate::{Metadata, Utf8Bytes};

/// Client settings. Every default is stated on its field.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Settings of the connection (frame size limit, keepalive).
    pub connection: ConnectionConfig,
    /// The deadline of a call that sets none, as time from the call. Default 10 s.
    pub default_timeout: Duration,
    /// Metadata sent with every call, before the call's own. Default empty.
    pub metadata: Metadata,
    /// Spacing of reconnect attempts. Default [`Backoff::default`].
    pub reconnect: Backoff,
    /// While disconnected, calls wait for a reconnect until their deadline (`true`) or
    /// fail at once with [`RpcError::NotConnected`] (`false`). Default `true`.
    pub wait_for_connection: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connection: ConnectionConfig::default(),
            default_timeout: Duration::from_secs(10),
            metadata: Metadata::new(),
            reconnect: Backoff::default(),
            wait_for_connection: true,
        }
    }
}

/// Per-call settings.
///
/// ```
/// use std::time::Duration;
/// use rpc_core::client::CallOptions;
///
/// let options = CallOptions::default()
///     .with_timeout(Duration::from_secs(1))
///     .with_metadata("x-request-id", "42");
/// assert_eq!(options.metadata.get_str("x-request-id"), Some("42"));
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct CallOptions {
    /// This call's deadline, as time from now; `None` uses
    /// [`ClientConfig::default_timeout`].
    pub timeout: Option<Duration>,
    /// Sent after the client's metadata.
    pub metadata: Metadata,
}

impl CallOptions {
    /// The same options with a deadline of `timeout` from the call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The same options with one more metadata entry.
    pub fn with_metadata(mut self, key: impl Into<Utf8Bytes>, value: impl Into<Bytes>) -> Self {
        self.metadata.append(key, value);
        self
    }
}

#[derive(Clone, Debug)]
enum State {
    Connected(Arc<Conn>),
    /// Reconnecting; the last error, if any.
    Connecting(Option<Arc<str>>),
    /// Gave up (`Some`: why) or was closed (`None`).
    Closed(Option<Arc<str>>),
}

/// A way to carry calls other than a courier connection: for example a message bus, where
/// a call is a request to the service's subject (`courier::bus::Bus::rpc_client`).
///
/// A [`Client`] made with [`Client::with_channel`] applies its defaults (deadline,
/// metadata) and hands each call over as an [`OutgoingCall`]; generated clients work on
/// it unchanged.
pub trait Channel: Send + Sync + fmt::Debug + 'static {
    /// Sends one call and waits for its answer, at the latest until `call.deadline`.
    /// Dropping the future abandons the call; the channel tells the server where it can.
    fn call(&self, call: OutgoingCall) -> ChannelFuture;

    /// Whether calls can be sent right now.
    fn is_connected(&self) -> bool;

    /// Where calls go, for error messages.
    fn describe(&self) -> String;
}

/// The future of one call on a [`Channel`].
pub type ChannelFuture = Pin<Box<dyn Future<Output = Result<Bytes, RpcError>> + Send + 'static>>;

/// One call, as a [`Client`] hands it to a [`Channel`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OutgoingCall {
    /// `"Service.method"`.
    pub method: Utf8Bytes,
    /// The serialized arguments.
    pub payload: Bytes,
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// The deadline as it was given, relative to the call (for error messages).
    pub timeout: Duration,
    /// The client's metadata followed by the call's own.
    pub metadata: Metadata,
}

impl OutgoingCall {
    /// The caller's result for an answer with `status`: the payload when it is
    /// [`Status::OK`], otherwise the same [`RpcError`] a connection client returns.
    pub fn answer(&self, status: Status, message: &str, payload: Bytes) -> Result<Bytes, RpcError> {
        into_result(status, message, payload, &self.method, self.timeout)
    }

    /// The error for a call whose deadline passed.
    pub fn timed_out(&self) -> RpcError {
        RpcError::Timeout {
            method: self.method.to_string(),
            timeout: self.timeout,
        }
    }
}

/// A handle to one server. Cheap to clone; clones share the connection and may call
/// concurrently from any task. The connection closes when the last clone (and the last
/// call in flight) is dropped, or at [`Client::close`].
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    peer: String,
    route: Route,
}

#[derive(Debug)]
enum Route {
    /// A courier connection, reconnected by a supervisor task.
    Connection(Direct),
    /// Some other [`Channel`].
    Channel(Box<dyn Channel>),
}

#[derive(Debug)]
struct Direct {
    state: watch::Receiver<State>,
    shutdown: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Client {
    /// Connects to a server; fails when the first connection cannot be made. Later
    /// connection losses are repaired in the background.
    pub async fn connect<C: Connector>(
        connector: C,
        config: ClientConfig,
    ) -> Result<Client, RpcError> {
        let peer = connector.describe();
        let (io, addr) = connector
            .connect()
            .await
            .map_err(|source| RpcError::Connect {
                peer: peer.clone(),
                source,
            })?;
        let conn = open(io, addr, &config.connection);
        Ok(Self::spawn(
            connector,
            config,
            peer,
            State::Connected(conn.clone()),
            Some(conn),
        ))
    }

    /// A client that connects in the background; calls wait for (or fail without) the
    /// connection as [`ClientConfig::wait_for_connection`] says.
    pub fn connect_lazy<C: Connector>(connector: C, config: ClientConfig) -> Client {
        let peer = connector.describe();
        Self::spawn(connector, config, peer, State::Connecting(None), None)
    }

    fn spawn<C: Connector>(
        connector: C,
        config: ClientConfig,
        peer: String,
        initial: State,
        conn: Option<Arc<Conn>>,
    ) -> Client {
        let (tx, rx) = watch::channel(initial);
        let shutdown = CancellationToken::new();
        tokio::spawn(supervise(
            connector,
            config.clone(),
            tx,
            shutdown.clone(),
            conn,
        ));
        Client {
            inner: Arc::new(Inner {
                config,
                peer,
                route: Route::Connection(Direct {
                    state: rx,
                    _stop_on_drop: shutdown.clone().drop_guard(),
                    shutdown,
                }),
            }),
        }
    }

    /// A client whose calls travel over `channel` instead of a connection of its own.
    /// [`ClientConfig::default_timeout`] and [`ClientConfig::metadata`] apply; the
    /// connection settings do not.
    pub fn with_channel(channel: impl Channel, config: ClientConfig) -> Client {
        Client {
            inner: Arc::new(Inner {
                config,
                peer: channel.describe(),
                route: Route::Channel(Box::new(channel)),
            }),
        }
    }

    /// The client's settings.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Whether a connection is up and taking calls right now.
    pub fn is_connected(&self) -> bool {
        match &self.inner.route {
            Route::Connection(direct) => {
                matches!(&*direct.state.borrow(), State::Connected(c) if !c.is_retired())
            }
            Route::Channel(channel) => channel.is_connected(),
        }
    }

    /// Closes the connection and stops reconnecting. Calls pending fail with
    /// [`RpcError::ConnectionClosed`]; later calls with [`RpcError::ClientClosed`].
    /// A client over a [`Channel`] has no connection of its own: this does nothing.
    pub fn close(&self) {
        if let Route::Connection(direct) = &self.inner.route {
            direct.shutdown.cancel();
        }
    }

    /// Calls `method` (`"Service.method"`) with serialized arguments; returns the
    /// serialized return value. Generated clients call this; see the module docs for
    /// deadlines, cancellation and reconnects.
    ///
    /// The arguments are [`Bytes`] or an [`Encoded`]: generated clients serialize them
    /// with [`Format::encode_small`](crate::format::Format::encode_small), so that a
    /// small call's arguments are held inline and copied into the connection's send
    /// queue from there, never allocated.
    pub async fn call(
        &self,
        method: impl Into<Utf8Bytes>,
        payload: impl Into<Encoded>,
        options: &CallOptions,
    ) -> Result<Bytes, RpcError> {
        let method = method.into();
        let payload = payload.into();
        let timeout = options.timeout.unwrap_or(self.inner.config.default_timeout);
        let deadline = Instant::now() + timeout;
        let direct = match &self.inner.route {
            Route::Connection(direct) => direct,
            Route::Channel(channel) => {
                let metadata = merged(&self.inner.config.metadata, &options.metadata);
                let call = OutgoingCall {
                    method,
                    payload: payload.into_bytes(),
                    deadline,
                    timeout,
                    metadata,
                };
                return channel.call(call).await;
            }
        };
        let timed_out = || RpcError::Timeout {
            method: method.to_string(),
            timeout,
        };

        // A connection at hand (the common case) is taken without waiting, and the
        // request's timeout is the call's own: no second clock read.
        let (conn, waited) = match self.connected(direct) {
            Some(conn) => (conn, false),
            None => (self.connection(direct, deadline).await?, true),
        };
        let (id, reply, lone) = conn.register(deadline)?;
        // Until the answer or a failure arrives (either removes the call from the
        // connection's map), dropping this sends a cancel. A call answered, failed or
        // never sent is no longer in the map, and nothing is sent.
        let cancel_on_drop = CancelOnDrop::new(|| {
            if conn.unregister(id) {
                // Never blocks in `drop`: a full queue takes it from a task. A closed
                // connection cancelled the call on the server already.
                let _ = conn.sender.send_soon(Frame::Cancel { id });
            }
        });

        let metadata = merged(&self.inner.config.metadata, &options.metadata);
        let timeout_left = Some(if waited {
            deadline.saturating_duration_since(Instant::now())
        } else {
            timeout
        });
        // A call among others is encoded into the send queue by this task, from where
        // its fields lie (`try_encode_request`: nothing to free afterwards, and small
        // arguments were never allocated), and written by the writer task, which
        // gathers the queued calls into one write. The only call in flight is written
        // by this task if the connection is idle: one hand-off less on its way out. A
        // call that finds no room (or is too large to encode into the queue) goes as a
        // frame, below.
        let appended = if lone {
            None
        } else {
            match conn.sender.try_encode_request(
                id,
                timeout_left,
                &method,
                &metadata,
                payload.as_slice(),
            ) {
                Ok(appended) => Some(appended),
                Err(e) => {
                    conn.unregister(id); // never sent: nothing to cancel
                    return Err(e.into());
                }
            }
        };
        let tried = match appended {
            Some(Appended::Queued) => Ok(()),
            // Found no room just now: it waits for room, below, without a second try.
            Some(Appended::NoRoom) => Err(TrySendError::Full(request_frame(
                id,
                timeout_left,
                &method,
                metadata,
                payload,
            ))),
            // Queued whole at once when there is room (no timer needed for it).
            Some(Appended::TooLarge) => conn.sender.try_send_encoded(request_frame(
                id,
                timeout_left,
                &method,
                metadata,
                payload,
            )),
            None => conn.sender.try_send_direct(request_frame(
                id,
                timeout_left,
                &method,
                metadata,
                payload,
            )),
        };
        let sent = match tried {
            Ok(()) => Ok(()),
            Err(TrySendError::Failed(e)) => Err(e),
            Err(TrySendError::Full(frame)) => {
                match tokio::time::timeout_at(deadline, conn.sender.send(frame)).await {
                    Ok(sent) => sent,
                    Err(_) => return Err(timed_out()), // the guard cancels, in case it went out
                }
            }
        };
        if let Err(e) = sent {
            conn.unregister(id); // never sent: nothing to cancel
            return Err(e.into());
        }
        // No timer of its own: the connection's sweeper answers it at its deadline.
        let answer = reply.await;
        // Whatever ended the call (the answer, the connection's failure, the sweeper)
        // took it out of the map first: nothing is left to cancel or to forget.
        cancel_on_drop.disarm();
        match answer {
            Ok(Answer::Ok(payload)) => Ok(payload),
            Ok(Answer::Response(response)) => into_result(
                response.status,
                &response.message,
                response.payload,
                &method,
                timeout,
            ),
            Ok(Answer::Failed(e)) => Err(*e),
            Ok(Answer::TimedOut) => Err(timed_out()),
            Err(_) => Err(RpcError::ConnectionClosed {
                reason: "connection dropped the call".into(),
            }),
        }
    }

    /// The connection to call on, if there is one now.
    fn connected(&self, direct: &Direct) -> Option<Arc<Conn>> {
        match &*direct.state.borrow() {
            State::Connected(conn) if !conn.is_retired() => Some(conn.clone()),
            _ => None,
        }
    }

    /// The connection to call on, waiting for one until `deadline` if so configured.
    async fn connection(&self, direct: &Direct, deadline: Instant) -> Result<Arc<Conn>, RpcError> {
        let mut state = direct.state.clone();
        loop {
            let last_error = match &*state.borrow_and_update() {
                State::Connected(conn) if !conn.is_retired() => return Ok(conn.clone()),
                State::Connected(conn) => conn.close_reason(),
                State::Connecting(last) => last.clone(),
                State::Closed(None) => return Err(RpcError::ClientClosed),
                State::Closed(Some(reason)) => {
                    return Err(self.not_connected(format!("gave up reconnecting: {reason}")));
                }
            };
            let reason = match last_error {
                Some(e) => format!("reconnecting; last error: {e}"),
                None => "connecting".to_string(),
            };
            if !self.inner.config.wait_for_connection {
                return Err(self.not_connected(reason));
            }
            match tokio::time::timeout_at(deadline, state.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(RpcError::ClientClosed),
                Err(_) => {
                    return Err(self.not_connected(format!(
                        "{reason}; the call's deadline passed while waiting"
                    )));
                }
            }
        }
    }

    fn not_connected(&self, reason: String) -> RpcError {
        RpcError::NotConnected {
            peer: self.inner.peer.clone(),
            reason: reason.into(),
        }
    }
}

/// A call's request as a frame, for a call that is not encoded into the send queue in
/// place (`FrameSender::try_encode_request`). A function, not a closure: a closure
/// holding the call's fields was built on every call, the in-place ones too (+17
/// instructions per call in `Client::call`, callgrind).
fn request_frame(
    id: u64,
    timeout: Option<Duration>,
    method: &Utf8Bytes,
    metadata: Metadata,
    payload: Encoded,
) -> Frame {
    Frame::Request(Request {
        id,
        timeout,
        method: method.clone(),
        metadata,
        payload: payload.into_bytes(),
    })
}

/// A call's metadata: the client's defaults, then the call's own entries. Most calls
/// have neither, and skip the clone and the extend.
fn merged(defaults: &Metadata, own: &Metadata) -> Metadata {
    match (defaults.is_empty(), own.is_empty()) {
        (true, true) => Metadata::new(),
        (false, true) => defaults.clone(),
        (true, false) => own.clone(),
        (false, false) => {
            let mut metadata = defaults.clone();
            metadata.extend(own);
            metadata
        }
    }
}

fn into_result(
    status: Status,
    message: &str,
    payload: Bytes,
    method: &str,
    timeout: Duration,
) -> Result<Bytes, RpcError> {
    let message = || message.to_string();
    match status {
        Status::OK => Ok(payload),
        Status::UNKNOWN_SERVICE => Err(RpcError::UnknownService { message: message() }),
        Status::UNKNOWN_METHOD => Err(RpcError::UnknownMethod { message: message() }),
        Status::DEADLINE_EXCEEDED => Err(RpcError::Timeout {
            method: method.to_string(),
            timeout,
        }),
        status => Err(RpcError::Remote {
            status,
            message: message(),
        }),
    }
}

/// Tells the server that a call was abandoned before its answer (its future dropped, or
/// its deadline passed): runs its action on drop unless [`CancelOnDrop::disarm`]ed. Every
/// transport's client uses it (a cancel frame on a connection, a cancel message on a bus).
///
/// ```
/// use rpc_core::client::CancelOnDrop;
/// use std::cell::Cell;
///
/// let cancelled = Cell::new(false);
/// drop(CancelOnDrop::new(|| cancelled.set(true)));
/// assert!(cancelled.get());
///
/// let answered = Cell::new(false);
/// CancelOnDrop::new(|| answered.set(true)).disarm();
/// assert!(!answered.get());
/// ```
#[must_use = "dropping it at once runs the cancel"]
pub struct CancelOnDrop<F: FnOnce()> {
    action: Option<F>,
}

impl<F: FnOnce()> CancelOnDrop<F> {
    /// A guard that runs `action` when dropped.
    pub fn new(action: F) -> Self {
        CancelOnDrop {
            action: Some(action),
        }
    }

    /// The call was answered: nothing to cancel.
    pub fn disarm(mut self) {
        self.action = None;
    }
}

impl<F: FnOnce()> Drop for CancelOnDrop<F> {
    fn drop(&mut self) {
        if let Some(action) = self.action.take() {
            action();
        }
    }
}

impl<F: FnOnce()> fmt::Debug for CancelOnDrop<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelOnDrop")
            .field("armed", &self.action.is_some())
            .finish()
    }
}

fn open<T: connection::Io>(
    io: T,
    peer: crate::transport::PeerAddr,
    config: &ConnectionConfig,
) -> Arc<Conn> {
    let (reader, sender) = connection::start(io, config);
    tracing::info!(%peer, "connected");
    let conn = Arc::new(Conn::new(sender, peer));
    tokio::spawn(conn.clone().read_loop(reader));
    tokio::spawn(conn.clone().sweep_deadlines());
    conn
}

/// Keeps the client connected: waits for the current connection to retire, reconnects
/// with backoff ([`crate::transport::reconnect`]), publishes each new connection.
async fn supervise<C: Connector>(
    connector: C,
    config: ClientConfig,
    state: watch::Sender<State>,
    shutdown: CancellationToken,
    mut current: Option<Arc<Conn>>,
) {
    loop {
        if let Some(conn) = current.take() {
            tokio::select! {
                _ = conn.retired() => {}
                _ = shutdown.cancelled() => {
                    conn.fail_all("the client was closed".into());
                    conn.sender.close();
                    state.send_replace(State::Closed(None));
                    return;
                }
            }
            state.send_replace(State::Connecting(conn.close_reason()));
        }
        let outcome = reconnect(
            &config.reconnect,
            &shutdown,
            || connector.connect(),
            |error, failures, next| {
                let reason: Arc<str> =
                    format!("could not connect to {}: {error}", connector.describe()).into();
                match next {
                    Some(delay) => {
                        tracing::debug!(%reason, failures, ?delay, "reconnect failed; retrying");
                        state.send_replace(State::Connecting(Some(reason)));
                    }
                    None => {
                        tracing::warn!(%reason, failures, "giving up reconnecting (Backoff::max_attempts)");
                        state.send_replace(State::Closed(Some(reason)));
                    }
                }
            },
        )
        .await;
        match outcome {
            Reconnected::Connected((io, peer)) => {
                let conn = open(io, peer, &config.connection);
                state.send_replace(State::Connected(conn.clone()));
                current = Some(conn);
            }
            Reconnected::Stopped => {
                state.send_replace(State::Closed(None));
                return;
            }
            Reconnected::GaveUp(_) => return,
        }
    }
}
