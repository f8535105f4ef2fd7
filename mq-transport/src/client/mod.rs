//! The remote backend: a client of a courier broker, over any [`Connector`].
//!
//! One connection per [`crate::Bus`] handle (and its clones). A supervisor task owns the
//! connection's read loop; when the connection ends it reconnects with backoff
//! ([`rpc_core::transport::reconnect`]), subscribes again to everything still subscribed,
//! then sends the publishes buffered while disconnected, in order.

mod link;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rpc_core::client::Backoff;
use rpc_core::connection::{FrameReader, FrameSender, TryUnsent, Unsent};
use rpc_core::frame::{Frame, Publish, Subscribe};
use rpc_core::transport::{Connector, Reconnected, reconnect};
use rpc_core::{ConnectionConfig, ConnectionError, ProtocolError, Utf8Bytes};
use rustc_hash::FxHashMap;
use tokio_util::sync::CancellationToken;

use self::link::{BoxRead, DynConnector, LinkDown, handshake};
use crate::backend::{Backend, Core};
use crate::bus::BusOptions;
use crate::delivery::{self, SubQueue, SubState, Target, Unsubscribe};
use crate::error::BusError;
use crate::event::Event;
use crate::lock;
use crate::message::Message;

/// Options of a connection to a courier broker.
///
/// ```
/// use std::time::Duration;
/// use mq_transport::ConnectOptions;
///
/// let mut options = ConnectOptions::default();
/// options.name = "billing".into();
/// options.token = Some("s3cret".into());
/// options.bus.request_timeout = Duration::from_secs(2);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// A name for the broker's logs. Default `"courier"`.
    pub name: String,
    /// The shared token, when the broker requires one. Default none.
    pub token: Option<String>,
    /// How long the broker has to answer a connect. Default 5 s.
    pub connect_timeout: Duration,
    /// Spacing of reconnect attempts (default: from 50 ms doubling to 5 s, forever).
    pub reconnect: Backoff,
    /// Bytes of publishes kept while disconnected, sent in order once reconnected.
    /// Beyond it a publish fails with [`BusError::ReconnectBufferFull`]. Publishes
    /// already handed to a connection that then fails are lost (at-most-once, as in
    /// NATS core). Default 8 MiB.
    pub reconnect_buffer: usize,
    /// Frame size, keepalive and queue settings of the connection. Frames sent are also
    /// held to the limit the broker states when it answers the connect.
    pub connection: ConnectionConfig,
    /// Settings every backend has (subscription queues, request timeout).
    pub bus: BusOptions,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            name: "courier".into(),
            token: None,
            connect_timeout: Duration::from_secs(5),
            reconnect: Backoff::default(),
            reconnect_buffer: 8 * 1024 * 1024,
            connection: ConnectionConfig::default(),
            bus: BusOptions::default(),
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
        connector: impl Connector,
        options: ConnectOptions,
        core: Arc<Core>,
    ) -> Result<Arc<Client>, BusError> {
        let connector: Box<dyn DynConnector> = Box::new(connector);
        let addr = connector.describe();
        let link = handshake(&*connector, &options)
            .await
            .map_err(|source| BusError::Connect {
                addr: addr.clone(),
                source: Box::new(source),
            })?;
        let remote = Arc::new(Remote {
            addr,
            connector,
            state: Mutex::new(State::Connected(Arc::new(link.sender.clone()))),
            subs: Mutex::default(),
            max_payload: AtomicUsize::new(link.broker.max_payload as usize),
            lone_request: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            options,
            core,
        });
        // The inbox is one more subscription, restored on reconnect like the others.
        let inbox_sid = remote.core.next_key();
        let inbox_filter = Utf8Bytes::from(remote.core.inbox.filter());
        remote.lock_subs().insert(
            inbox_sid,
            SubEntry {
                filter: inbox_filter.clone(),
                queue: None,
                target: Target::Inbox(remote.core.inbox.clone()),
            },
        );
        link.sender
            .send(Frame::Sub(Subscribe {
                sid: inbox_sid,
                subject: inbox_filter,
                queue: Utf8Bytes::default(),
            }))
            .await?;
        tokio::spawn(remote.clone().supervise(link.reader));
        remote.core.report(Event::Connected {
            server: remote.addr.clone(),
        });
        Ok(Arc::new(Client { remote }))
    }
}

impl Backend for Client {
    fn max_payload(&self) -> Option<(usize, &'static str)> {
        match self.remote.max_payload.load(Ordering::Relaxed) {
            0 => None, // not stated
            limit => Some((limit, "the broker's max_payload")),
        }
    }

    async fn publish(&self, message: Message) -> Result<(), BusError> {
        self.remote.publish(message).await
    }

    const TRIES_PUBLISH: bool = true;

    fn try_publish(&self, message: Message) -> Result<Result<(), BusError>, Message> {
        self.remote.try_publish(message)
    }

    async fn subscribe(
        self: &Arc<Self>,
        sid: u64,
        queue: SubQueue,
    ) -> Result<Arc<dyn Unsubscribe>, BusError> {
        let remote = &self.remote;
        let (filter, group) = (queue.state.subject.clone(), queue.state.queue.clone());
        remote.lock_subs().insert(
            sid,
            SubEntry {
                filter: filter.clone(),
                queue: group.clone(),
                target: Target::Queue(queue),
            },
        );
        // While disconnected, the reconnect sends it along with the others.
        if let Some(sender) = remote.connected() {
            let frame = Frame::Sub(Subscribe {
                sid,
                subject: filter,
                queue: group.unwrap_or_default(),
            });
            let _ = sender.send(frame).await;
        }
        Ok(self.clone())
    }

    async fn confirm(&self) -> Result<(), BusError> {
        // The broker handles a connection's frames in order: it has every subscription
        // sent before this ping (or has refused it) once the pong is back. While
        // disconnected, the reconnect restores them before anything else.
        if let Some(sender) = self.remote.connected() {
            let _ = sender.round_trip().await;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BusError> {
        match self.remote.connected() {
            Some(sender) => Ok(sender.round_trip().await?),
            None => Err(BusError::NotConnected {
                addr: self.remote.addr.clone(),
                reason: self.remote.disconnect_reason(),
            }),
        }
    }

    fn is_connected(&self) -> bool {
        matches!(&*self.remote.lock_state(), State::Connected(_))
    }

    fn disconnect_reason(&self) -> Arc<str> {
        self.remote.disconnect_reason()
    }
}

impl Unsubscribe for Client {
    fn unsubscribe(&self, sid: u64, _state: &SubState) {
        let remote = &self.remote;
        if remote.lock_subs().remove(&sid).is_none() {
            return; // the broker ended it already
        }
        if let Some(sender) = remote.connected() {
            // Never waits (this runs in `Drop`); a closed connection forgot it anyway.
            let _ = sender.send_soon(Frame::Unsub { sid });
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
            if let Some(sender) = self.remote.connected()
                && sender.send(Frame::Unsub { sid }).await.is_ok()
            {
                let _ = sender.round_trip().await;
            }
            self.remote.lock_subs().remove(&sid);
        })
    }
}

/// Publishes made while disconnected and sent once reconnected.
#[derive(Debug, Default)]
struct Replayed {
    publishes: u64,
    bytes: usize,
}

#[derive(Debug)]
struct SubEntry {
    filter: Utf8Bytes,
    queue: Option<Utf8Bytes>,
    target: Target,
}

#[derive(Debug)]
enum State {
    /// Behind an `Arc`: a publish takes the sender with one reference count, not the
    /// four of a `FrameSender` clone.
    Connected(Arc<FrameSender>),
    Disconnected {
        buffer: VecDeque<Frame>,
        bytes: usize,
        reason: Arc<str>,
    },
    Closed,
}

pub(crate) struct Remote {
    addr: String,
    connector: Box<dyn DynConnector>,
    state: Mutex<State>,
    /// By sid. Sids are this client's own sequence, so a fast unkeyed hash is safe: a
    /// broker can only look an entry up, never add one (SipHash showed in a
    /// subscriber's profile).
    subs: Mutex<FxHashMap<u64, SubEntry>>,
    /// The broker's limit, from its connect frame (0: not stated).
    max_payload: AtomicUsize,
    /// The last message read was a request read alone: it carried a reply subject, and
    /// nothing more was read or waiting in the socket as it was handed to its
    /// subscription. The first reply published after it, to an inbox, is then written
    /// by its sender if the connection is idle ([`Remote::publish_frame`]).
    lone_request: AtomicBool,
    shutdown: CancellationToken,
    options: ConnectOptions,
    core: Arc<Core>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("addr", &self.addr)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Publishes with a payload of at most this many bytes are encoded into the send queue
/// by the publisher. Measured (`courier bench bus`, `pubsub_1to1`, alternating runs):
/// 16 B went from a median of 1.77M to 2.09M msgs/s when encoded by the publisher, and
/// 1 KiB from 656k to 620k, its payload then being copied twice. Once the writer wrote
/// such frames from the queue's buffer (one copy), 1 KiB encoded by the publisher made
/// 874k against 910k (medians of 7 pairs, 4 faster): no gain, so the limit stays.
const ENCODE_PUBLISH_MAX: usize = 256;

/// Messages for one subscription handed to it together at most.
const RUN_MAX: usize = 64;

/// A message as a frame carries it: an empty reply subject on the wire is no reply
/// (the reverse of [`Remote::publish_frame`]).
fn wire_message(
    subject: Utf8Bytes,
    reply: Utf8Bytes,
    headers: rpc_core::Metadata,
    payload: bytes::Bytes,
) -> Message {
    Message {
        subject,
        reply: (!reply.is_empty()).then_some(reply),
        headers,
        payload,
    }
}
impl Remote {
    fn lock_subs(&self) -> std::sync::MutexGuard<'_, FxHashMap<u64, SubEntry>> {
        lock(&self.subs)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn connected(&self) -> Option<Arc<FrameSender>> {
        match &*self.lock_state() {
            State::Connected(sender) => Some(sender.clone()),
            _ => None,
        }
    }

    fn disconnect_reason(&self) -> Arc<str> {
        match &*self.lock_state() {
            State::Connected(_) => Arc::from("the connection was closed"),
            State::Disconnected { reason, .. } => reason.clone(),
            State::Closed => Arc::from("the bus was closed"),
        }
    }

    /// [`Remote::publish`] when the connection is up and has room now; otherwise the
    /// message is handed back, for `publish`.
    #[allow(clippy::result_large_err)]
    fn try_publish(&self, message: Message) -> Result<Result<(), BusError>, Message> {
        let state = self.lock_state();
        let State::Connected(sender) = &*state else {
            return Err(message);
        };
        // A small publish is encoded into the send queue here (the payload it shares
        // with the caller's next publishes is let go on this thread, not the writer's);
        // a larger one is queued for the writer to encode, which measured no slower (see
        // ENCODE_PUBLISH_MAX).
        let encode_here = message.payload.len() <= ENCODE_PUBLISH_MAX;
        let (frame, lone) = self.publish_frame(message);
        let tried = if encode_here {
            sender.try_send_encoded_or_give_back(frame, lone)
        } else {
            sender.try_send_or_give_back(frame, lone)
        };
        let back = match tried {
            Ok(()) => return Ok(Ok(())),
            Err(TryUnsent::Unsent(Unsent::Failed(e))) => return Ok(Err(e.into())),
            // Closed: `publish` buffers it for the reconnect.
            Err(TryUnsent::Full(back) | TryUnsent::Unsent(Unsent::Closed { frame: back, .. })) => {
                back
            }
        };
        match back {
            Frame::Pub(p) => Err(wire_message(p.subject, p.reply, p.headers, p.payload)),
            // A sender hands back the frame it was given.
            _ => unreachable!("a publish handed back as another frame"),
        }
    }

    /// `message` as the frame that publishes it, and whether it is a lone request.
    ///
    /// A request with no other in flight (one publish at a time, waiting for each
    /// answer) is written by its sender when the connection is idle: one thread
    /// hand-off less per round trip. Requests sent in a stream are queued, for the
    /// writer to gather into one write.
    ///
    /// So is the answer to a request read alone ([`Remote::note_lone_request`]): a
    /// responder's reply to the one request it was given, which its requester waits for.
    /// One reply per such request: replies that follow it go through the queue.
    fn publish_frame(&self, message: Message) -> (Frame, bool) {
        let lone = match &message.reply {
            Some(_) => self.core.inbox.in_flight() == 1,
            // the flag first: it is unset for nearly every publish
            None => {
                self.lone_request.load(Ordering::Relaxed)
                    && message.subject.starts_with(crate::delivery::INBOX_PREFIX)
                    && self.lone_request.swap(false, Ordering::Relaxed)
            }
        };
        let publish = Publish {
            subject: message.subject,
            reply: message.reply.unwrap_or_default(),
            headers: message.headers,
            payload: message.payload,
        };
        (Frame::Pub(publish), lone)
    }

    async fn publish(&self, message: Message) -> Result<(), BusError> {
        let (mut frame, lone) = self.publish_frame(message);
        loop {
            let sender = {
                let mut state = self.lock_state();
                match &mut *state {
                    State::Connected(sender) => sender.clone(),
                    State::Disconnected { buffer, bytes, .. } => {
                        let size = frame.encoded_len().map_err(ConnectionError::from)?;
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
            // A connection found dead hands the frame back, for the reconnect buffer.
            match sender.send_or_give_back(frame, lone).await {
                Ok(()) => return Ok(()),
                Err(Unsent::Closed {
                    reason,
                    frame: back,
                }) => {
                    frame = back;
                    // The connection died under us: buffer it for the reconnect, unless
                    // the supervisor already has a new connection.
                    let mut state = self.lock_state();
                    if let State::Connected(current) = &*state
                        && current.same_connection(&sender)
                    {
                        *state = State::Disconnected {
                            buffer: VecDeque::new(),
                            bytes: 0,
                            reason,
                        };
                    }
                }
                Err(Unsent::Failed(e)) => return Err(e.into()),
            }
        }
    }

    /// Reads until the connection ends, then reconnects, until shut down.
    async fn supervise(self: Arc<Self>, mut reader: FrameReader<BoxRead>) {
        loop {
            let down = tokio::select! {
                down = self.read_loop(&mut reader) => down,
                _ = self.shutdown.cancelled() => {
                    if let State::Connected(sender) = std::mem::replace(&mut *self.lock_state(), State::Closed) {
                        sender.close();
                    }
                    self.close_subscriptions();
                    return;
                }
            };
            let reason: Arc<str> = Arc::from(link::describe(&down));
            tracing::info!(broker = %self.addr, %reason, "disconnected from the broker");
            {
                let mut state = self.lock_state();
                match &mut *state {
                    // A publisher may have seen the failure first and started buffering.
                    State::Disconnected { reason: r, .. } => *r = reason.clone(),
                    other => {
                        if let State::Connected(sender) = other {
                            sender.close();
                        }
                        *other = State::Disconnected {
                            buffer: VecDeque::new(),
                            bytes: 0,
                            reason: reason.clone(),
                        };
                    }
                }
            }
            // Replies to requests in flight would come on the lost connection.
            self.core.inbox.fail_all();
            self.core.report(Event::Disconnected {
                reason: reason.to_string(),
            });
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
        self.core.inbox.fail_all();
    }

    /// Hands `run`, messages to subscription `sid` read one after the other, to it, if
    /// there is one, and leaves `run` empty. One look-up and one lock of the
    /// subscription's queue serve the whole run; a refusal from the broker (a status
    /// message, never in a run of ordinary ones in practice) ends the subscription, and
    /// what follows it in the run is dropped.
    fn deliver_run(&self, sid: u64, run: &mut Vec<Message>) {
        let mut subs = self.lock_subs();
        let Some(entry) = subs.get(&sid) else {
            run.clear();
            return;
        };
        match &entry.target {
            Target::Queue(queue) => match run.iter().position(delivery::is_refusal) {
                None => {
                    queue.deliver_all(run);
                }
                Some(at) => {
                    // What came before it is delivered; what came after it is not.
                    let refusal = run.remove(at);
                    run.truncate(at);
                    queue.deliver_all(run);
                    queue.refuse(&refusal);
                    tracing::warn!(subject = %entry.filter, reason = queue.state.refused().unwrap_or(""), "the broker ended a subscription");
                    subs.remove(&sid);
                    run.clear();
                }
            },
            Target::Inbox(inbox) => {
                for message in run.drain(..) {
                    inbox.deliver(message);
                }
            }
        }
    }

    /// Notes whether `run`, about to be handed to its subscription, is a request read
    /// alone (`drained`: nothing more is buffered or likely waiting in the socket), for
    /// [`Remote::publish_frame`]. Stored only when it changes: the flag is read by the
    /// publishing tasks, on other threads.
    fn note_lone_request(&self, run: &[Message], drained: bool) {
        let lone = drained && run.len() == 1 && run[0].reply.is_some();
        if self.lone_request.load(Ordering::Relaxed) != lone {
            self.lone_request.store(lone, Ordering::Relaxed);
        }
    }

    /// Returns why the connection ended.
    async fn read_loop(&self, reader: &mut FrameReader<BoxRead>) -> LinkDown {
        let mut go_away = None;
        // Messages read one after the other for one subscription, not handed to it yet:
        // they go together once no whole frame is left in the read buffer, another
        // subscription's message or another frame comes, or RUN_MAX of them wait.
        let mut run: Vec<Message> = Vec::new();
        let mut run_sid = 0;
        loop {
            let frame = reader.next().await;
            if !run.is_empty() && !matches!(&frame, Some(Ok(Frame::Msg(m))) if m.sid == run_sid) {
                // Before anything else that was read after them (an unsubscribe, the
                // end): nothing read is left behind.
                self.note_lone_request(&run, false);
                self.deliver_run(run_sid, &mut run);
            }
            let error = match frame {
                Some(Ok(Frame::Msg(m))) => {
                    run_sid = m.sid;
                    run.push(wire_message(m.subject, m.reply, m.headers, m.payload));
                    // Held back only while the next frame is read already: `next`
                    // then returns it without waiting for the peer.
                    //
                    // No yield after a lone message: the task it woke (a subscriber's)
                    // runs on this thread as soon as this one waits, and the wait costs
                    // no system call (tokio notes that a read which did not fill its
                    // buffer drained the socket). A yield here made tokio wake the
                    // other worker for nothing on every request a subscriber answered
                    // (`req_seq`: 4.4 context switches per request in the bench
                    // process, 3.0 without; the floor's `bus-raw` makes 3.0).
                    if !reader.has_frame() || run.len() >= RUN_MAX {
                        self.note_lone_request(&run, !reader.may_have_more());
                        self.deliver_run(run_sid, &mut run);
                    }
                    continue;
                }
                Some(Ok(Frame::Unsub { sid })) => {
                    self.lock_subs().remove(&sid);
                    continue;
                }
                Some(Ok(Frame::GoAway(g))) => {
                    tracing::info!(broker = %self.addr, code = g.code, message = %g.message, "broker is going away");
                    go_away = Some(g);
                    continue;
                }
                Some(Ok(other)) => {
                    Some(reader.protocol_violation(ProtocolError::UnexpectedFrame {
                        kind: other.kind(),
                        context: "a bus client accepts only msg, unsub and go-away frames",
                    }))
                }
                Some(Err(e)) => Some(e),
                None => None,
            };
            return LinkDown::new(go_away, error);
        }
    }

    /// Connects again with backoff, restores subscriptions and sends the buffered
    /// publishes. `None` when shut down or out of attempts.
    async fn reconnect(&self) -> Option<FrameReader<BoxRead>> {
        let outcome = reconnect(
            &self.options.reconnect,
            &self.shutdown,
            || async {
                let link = handshake(&*self.connector, &self.options).await?;
                self.max_payload
                    .store(link.broker.max_payload as usize, Ordering::Relaxed);
                let replayed = self.restore(&link.sender).await?;
                Ok::<_, crate::error::ConnectError>((link.reader, replayed))
            },
            |error, attempt, next| match next {
                Some(delay) => {
                    tracing::debug!(broker = %self.addr, %error, attempt, ?delay, "reconnect failed")
                }
                None => {
                    tracing::error!(broker = %self.addr, %error, attempts = attempt, "giving up reconnecting (Backoff::max_attempts)")
                }
            },
        )
        .await;
        match outcome {
            Reconnected::Connected((reader, replayed)) => {
                tracing::info!(broker = %self.addr, "reconnected to the broker");
                self.core.report(Event::Connected {
                    server: self.addr.clone(),
                });
                if replayed.publishes > 0 {
                    tracing::info!(broker = %self.addr, publishes = replayed.publishes, bytes = replayed.bytes, "sent the publishes made while disconnected");
                    self.core.report(Event::PublishedWhileDisconnected {
                        publishes: replayed.publishes,
                        bytes: replayed.bytes,
                    });
                }
                Some(reader)
            }
            Reconnected::Stopped | Reconnected::GaveUp(_) => None,
        }
    }

    /// Subscribes again, then drains the reconnect buffer, then marks the connection
    /// live. Publishes made meanwhile land in the buffer and are drained in order.
    async fn restore(&self, sender: &FrameSender) -> Result<Replayed, ConnectionError> {
        let mut restored = std::collections::HashSet::new();
        let mut replayed = Replayed::default();
        loop {
            // Subscriptions not sent yet on this connection, then buffered publishes; the
            // connection goes live only when neither is left, decided under the state
            // lock, so that a subscribe made meanwhile is either seen here or sees the
            // connection live and sends its own frame.
            let (subs, buffered) = {
                let mut state = self.lock_state();
                let subs: Vec<Frame> = self
                    .lock_subs()
                    .iter()
                    .filter(|(sid, _)| !restored.contains(*sid))
                    .map(|(sid, entry)| {
                        Frame::Sub(Subscribe {
                            sid: *sid,
                            subject: entry.filter.clone(),
                            queue: entry.queue.clone().unwrap_or_default(),
                        })
                    })
                    .collect();
                let buffered = match &mut *state {
                    State::Disconnected { buffer, bytes, .. } if subs.is_empty() => {
                        replayed.bytes += std::mem::take(bytes);
                        std::mem::take(buffer)
                    }
                    _ => VecDeque::new(),
                };
                if subs.is_empty() && buffered.is_empty() {
                    *state = State::Connected(Arc::new(sender.clone()));
                    return Ok(replayed);
                }
                (subs, buffered)
            };
            for frame in subs {
                if let Frame::Sub(sub) = &frame {
                    restored.insert(sub.sid);
                }
                sender.send(frame).await?;
            }
            for frame in buffered {
                sender.send(frame).await?;
                replayed.publishes += 1;
            }
        }
    }
}
