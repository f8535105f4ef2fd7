//! The connection engine: frames over any byte stream, shared by RPC and the bus.
//!
//! [`start`] splits a stream into a [`FrameReader`] (owned by the caller's read loop, so
//! frames reach their consumer without a channel hop) and a [`FrameSender`] (a cheap,
//! cloneable handle feeding one writer task).
//!
//! * **Writer**: a task that takes every frame queued since its last write, encodes them
//!   all into one buffer and writes that buffer with one `write_all`: under load, many
//!   frames share one system call. The queue is bounded ([`ConnectionConfig::send_queue`]);
//!   a full queue makes senders wait (backpressure).
//! * **Direct writes**: a [`FrameSender::send_direct`] (a lone request) that finds the
//!   connection idle (nothing queued or being written, and no write for [`QUIET`])
//!   writes its frame itself, without waking the writer task: one thread hand-off less
//!   for a lone request. What the stream does not take at once is left to the writer
//!   task, which writes it before anything else; a direct write never waits. A burst
//!   queued right behind a direct write pauses them ([`DIRECT_PAUSE`]).
//! * **Keepalive**: the writer sends a ping every [`ConnectionConfig::keepalive_interval`];
//!   the reader answers pings and declares the peer dead when no complete frame arrived
//!   for [`ConnectionConfig::keepalive_timeout`] (checked once per interval).
//! * **Close**: a clean end of stream between frames is a close (`None`); an end of stream
//!   inside a frame, an oversized or undecodable frame is an error. On a protocol error
//!   the reader sends the peer a go-away naming the problem, then the connection closes.
//!
//! The engine knows frames, not what they mean: RPC and bus semantics live above it.

mod queue;
mod reader;
mod writer;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use futures_util::task::AtomicWaker;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

pub use self::reader::FrameReader;
use crate::codec::{FrameCodec, LENGTH_PREFIX_LEN, check_body_len, check_frame_len};
use crate::error::ConnectionError;
use crate::frame::{Delivery, Frame, GoAway, Request, Response};
use crate::sync::{CacheLine, Latch};
use crate::{Metadata, Utf8Bytes};

/// Settings of one connection, on either side.
///
/// ```
/// use std::time::Duration;
/// use rpc_core::ConnectionConfig;
///
/// let mut config = ConnectionConfig::default();
/// config.max_frame_len = 1024 * 1024;
/// config.keepalive_interval = Duration::from_secs(5);
/// config.keepalive_timeout = Duration::from_secs(15);
/// assert_eq!(config.send_queue, 1024);
/// assert_eq!(config.max_queued_bytes, 64 * 1024 * 1024);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionConfig {
    /// The largest frame body accepted on read and allowed on write, in bytes. Checked
    /// against the length prefix before anything is reserved for the frame; the error
    /// names this limit and the size seen. Default 8 MiB ([`Self::DEFAULT_MAX_FRAME_LEN`]).
    pub max_frame_len: usize,
    /// How often the writer sends a ping. Default 10 s.
    pub keepalive_interval: Duration,
    /// How long the reader waits without receiving a complete frame before it declares
    /// the peer dead and closes (bytes of a partial frame do not count, so a peer
    /// trickling a frame byte by byte is closed too). Should be a few times the peer's interval. Default 30 s.
    pub keepalive_timeout: Duration,
    /// Frames queued for the writer before senders wait. Default 1,024. Small frames
    /// that their senders encode into the queue one after another (a client's requests,
    /// the answers of a server's call tasks) take one place per 64 KiB; `max_queued_bytes`
    /// bounds them as it bounds every frame.
    pub send_queue: usize,
    /// The most bytes (frame bodies plus length prefixes, each frame counted as at least
    /// the memory it takes while queued, about 140 bytes) queued and not yet written to
    /// the stream: [`FrameSender::try_send`] reports the queue as full past it, and
    /// [`FrameSender::send`] waits for room. This is the memory bound of a connection
    /// whose peer stops reading, for every frame this side originates. Default 64 MiB.
    pub max_queued_bytes: usize,
}

impl ConnectionConfig {
    /// The default maximum frame length: 8 MiB.
    pub const DEFAULT_MAX_FRAME_LEN: usize = 8 * 1024 * 1024;
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_frame_len: Self::DEFAULT_MAX_FRAME_LEN,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(30),
            send_queue: 1024,
            max_queued_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A byte stream the engine can split into a read half and a write half.
///
/// TCP and Unix streams split without a lock; any other `AsyncRead + AsyncWrite` works
/// through [`Split`], which uses [`tokio::io::split`].
pub trait Io: Send + 'static {
    /// The read half.
    type Read: AsyncRead + Send + Unpin + 'static;
    /// The write half.
    type Write: AsyncWrite + Send + Unpin + 'static;
    /// Splits the stream.
    fn split_io(self) -> (Self::Read, Self::Write);
}

impl Io for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split_io(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

#[cfg(unix)]
impl Io for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split_io(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Io for tokio::io::DuplexStream {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split_io(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Adapts any `AsyncRead + AsyncWrite` stream (a TLS stream, a test double) to [`Io`].
#[derive(Debug)]
pub struct Split<T>(pub T);

impl<T: AsyncRead + AsyncWrite + Send + 'static> Io for Split<T> {
    type Read = tokio::io::ReadHalf<T>;
    type Write = tokio::io::WriteHalf<T>;
    fn split_io(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self.0)
    }
}

/// A round trip waiting for the pong of the ping with this nonce.
type RoundTrip = (u64, oneshot::Sender<()>);

/// State shared by the reader, the writer and every sender of one connection.
#[derive(Debug)]
struct Shared {
    /// Asks the writer to write what is queued, then shut the stream down; every send
    /// reads it, so it is a [`Latch`] (one atomic load).
    close: Latch,
    /// Asks the writer to stop at once, discarding what is queued (see
    /// [`FrameSender::abort_with`]).
    abort: Latch,
    /// The go-away the writer tries to send when aborting.
    abort_go_away: OnceLock<GoAway>,
    /// The writer has stopped: nothing more will be written. A [`Latch`]: a waiting
    /// reader checks it whenever it wakes.
    writer_done: Latch,
    /// Why the connection ended, when it ended with an error (first cause wins).
    error: OnceLock<Arc<str>>,
    /// The largest frame this side sends: [`ConnectionConfig::max_frame_len`], lowered to
    /// the peer's stated limit by [`FrameSender::limit_frame_len`].
    max_frame_len: AtomicUsize,
    /// Sends that found the queue full and wait for room in a task
    /// ([`FrameSender::send_soon`]). Closed from the start, so that `wait` means "none
    /// left".
    soon: TaskTracker,
    /// Bytes queued and not yet written to the stream (the writer subtracts a batch once
    /// its write completed).
    /// On a line of its own: every send and every write changes it.
    queued_bytes: CacheLine<AtomicUsize>,
    /// Signalled by the writer after each write, for senders waiting for room
    /// ([`FrameSender::send_within`]). On a line of its own: every write changes it.
    written: CacheLine<tokio::sync::Notify>,
    max_queued_bytes: usize,
    /// How long [`FrameSender::send_or_abort`] waits for room: `keepalive_timeout`.
    stall: Duration,
    /// Ping nonces, shared by keepalive pings and round trips so that pongs come back in
    /// nonce order.
    next_nonce: AtomicU64,
    /// Round trips waiting for the pong of the ping with their nonce (or a later one);
    /// `None` once the reader stopped.
    round_trips: Mutex<Option<Vec<RoundTrip>>>,
    /// Frames put in the queue and not yet written: a direct write waits for none. On
    /// a line of its own: every queued send and every write changes it.
    pending: CacheLine<AtomicUsize>,
    /// A direct write left bytes for the writer task.
    tail_ready: AtomicBool,
    /// The writer task, while it waits for frames: woken when `close`, `abort` or
    /// `tail_ready` is set. One atomic waker that the writer registers once per wait
    /// (two atomic operations, no lock), where polling the tokens behind the latches and
    /// a `Notify` took two locks each. `multi_conn` 16 B: the polls' symbols were 1.2%
    /// of all samples (`perf record -a`), 0.3% after; under callgrind, which runs one
    /// thread at a time and so has the writer wait far more often, the writer task went
    /// from 1,559 to 433 instructions per call.
    writer_waiting: AtomicWaker,
    /// When the stream was last written to, and when a sender last wrote directly. On a
    /// line of their own: every write changes them.
    times: CacheLine<WriteTimes>,
    /// Direct writes still to refuse after one that a burst followed (see
    /// [`FrameSender::send_direct`]).
    direct_paused: AtomicUsize,
    epoch: Instant,
}

/// See [`Shared::times`].
#[derive(Debug, Default)]
struct WriteTimes {
    /// When the stream was last written to, in nanoseconds since `epoch` (at least 1);
    /// 0 until the first write.
    last_write: AtomicU64,
    /// When the last direct write was, like `last_write`; 0 once a queued frame came
    /// after it.
    direct_at: AtomicU64,
}

impl Shared {
    /// Sets `close` (sends are refused from here on).
    fn close(&self) {
        self.close.set();
        self.writer_waiting.wake();
    }

    fn record_error(&self, error: &ConnectionError) {
        let _ = self.error.set(error.to_string().into());
    }

    fn next_nonce(&self) -> u64 {
        self.next_nonce.fetch_add(1, Ordering::Relaxed)
    }

    /// The peer answered the ping with `nonce`: it has read everything sent before it,
    /// and before every earlier ping.
    fn pong(&self, nonce: u64) {
        let mut waiting = crate::sync::lock(&self.round_trips);
        let Some(waiting) = waiting.as_mut() else {
            return;
        };
        let mut i = 0;
        while i < waiting.len() {
            if waiting[i].0 <= nonce {
                let (_, done) = waiting.swap_remove(i);
                let _ = done.send(());
            } else {
                i += 1;
            }
        }
    }

    /// The reader stopped: no pong will come, so waiting round trips fail.
    fn reader_done(&self) {
        crate::sync::lock(&self.round_trips).take();
    }

    fn unqueue(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Counts `bytes` as queued if they fit under `max_queued_bytes` now, or nothing is
    /// queued (a frame larger than the limit goes alone).
    fn try_reserve(&self, bytes: usize) -> bool {
        let max = self.max_queued_bytes;
        self.queued_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                (queued == 0 || queued.saturating_add(bytes) <= max).then_some(queued + bytes)
            })
            .is_ok()
    }

    /// Now, in nanoseconds since `epoch`: the clock of [`WriteTimes`].
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Notes a write to the stream, now.
    fn wrote(&self) {
        self.wrote_at(self.now());
    }

    /// Notes a write to the stream at `now` ([`Shared::now`]).
    fn wrote_at(&self, now: u64) {
        self.times.last_write.store(now.max(1), Ordering::Relaxed);
    }

    /// A frame is being queued: if it follows a direct write within [`QUIET`], the
    /// sender is in a burst, where a direct write at its head costs a write (and a
    /// wake-up of the peer) of its own: direct writes pause for [`DIRECT_PAUSE`]
    /// attempts. One clock read per direct write, not per queued frame.
    fn queued_after_direct(&self) {
        let at = self.times.direct_at.load(Ordering::Relaxed);
        if at == 0 {
            return;
        }
        self.times.direct_at.store(0, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_nanos() as u64;
        if now.saturating_sub(at) < QUIET.as_nanos() as u64 {
            self.direct_paused.store(DIRECT_PAUSE, Ordering::Relaxed);
        }
    }

    /// Whether the stream was written to in the [`QUIET`] before `now`
    /// ([`Shared::now`]). A stream never written to is not busy, however young the
    /// connection is.
    fn busy(&self, now: u64) -> bool {
        let last = self.times.last_write.load(Ordering::Relaxed);
        last != 0 && now.saturating_sub(last) < QUIET.as_nanos() as u64
    }

    fn closed_error(&self) -> ConnectionError {
        ConnectionError::Closed {
            reason: self
                .error
                .get()
                .cloned()
                .unwrap_or_else(|| Arc::from("the connection was closed")),
        }
    }
}

/// Starts the engine on `io`: spawns the writer task on the current runtime and returns
/// the reader and a sender.
///
/// ```
/// use rpc_core::connection::{self, ConnectionConfig};
/// use rpc_core::frame::Frame;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (a, b) = tokio::io::duplex(1024);
/// let config = ConnectionConfig::default();
/// let (_a_reader, a_sender) = connection::start(a, &config);
/// let (mut b_reader, _b_sender) = connection::start(b, &config);
///
/// a_sender.send(Frame::Cancel { id: 3 }).await.unwrap();
/// assert_eq!(b_reader.next().await.unwrap().unwrap(), Frame::Cancel { id: 3 });
/// # }
/// ```
pub fn start<T: Io>(io: T, config: &ConnectionConfig) -> (FrameReader<T::Read>, FrameSender) {
    let (read, write) = io.split_io();
    let (tx, rx) = queue::queue(config.send_queue);
    let soon = TaskTracker::new();
    soon.close();
    let shared = Arc::new(Shared {
        close: Latch::new(),
        abort: Latch::new(),
        abort_go_away: OnceLock::new(),
        writer_done: Latch::new(),
        error: OnceLock::new(),
        max_frame_len: AtomicUsize::new(config.max_frame_len),
        soon,
        queued_bytes: CacheLine(AtomicUsize::new(0)),
        max_queued_bytes: config.max_queued_bytes,
        stall: config.keepalive_timeout,
        next_nonce: AtomicU64::new(1),
        round_trips: Mutex::new(Some(Vec::new())),
        written: CacheLine::default(),
        pending: CacheLine(AtomicUsize::new(0)),
        tail_ready: AtomicBool::new(false),
        writer_waiting: AtomicWaker::new(),
        times: CacheLine::default(),
        direct_paused: AtomicUsize::new(0),
        epoch: Instant::now(),
    });
    let output = Arc::new(tokio::sync::Mutex::new(Output {
        io: write,
        tail: BytesMut::new(),
        unflushed: false,
        codec: FrameCodec::new(config.max_frame_len),
    }));
    let sender = FrameSender {
        tx,
        shared: shared.clone(),
        direct: Arc::new(DirectWriter {
            output: output.clone(),
            shared: shared.clone(),
        }),
    };
    tokio::spawn(writer::run(
        output,
        rx,
        FrameCodec::new(config.max_frame_len),
        config.keepalive_interval,
        shared.clone(),
    ));
    let codec = FrameCodec::new(config.max_frame_len);
    let reader = FrameReader::new(read, codec, sender.clone(), config, shared);
    (reader, sender)
}

/// What a frame of `wire_len` bytes (length prefix included) counts against
/// [`ConnectionConfig::max_queued_bytes`] while queued: its size on the wire, but at
/// least the memory a queued frame takes (`size_of::<Frame>()`), so that a flood of
/// tiny frames (pongs) is bounded by what it really costs.
pub(crate) fn queued_cost(wire_len: usize) -> usize {
    wire_len.max(std::mem::size_of::<Frame>())
}

/// [`queued_cost`] of `frame` (0 for a frame that cannot be encoded, which no sender
/// queues).
pub(crate) fn frame_cost(frame: &Frame) -> usize {
    frame
        .encoded_len()
        .map_or(0, |len| queued_cost(len + LENGTH_PREFIX_LEN))
}

/// Refuses a connection: starts the engine on `io` only to send `go_away` (which names
/// why, and the limit), then waits until it is written and the stream closed. Servers
/// use it for a connection over their connection limit.
pub async fn refuse<T: Io>(io: T, config: &ConnectionConfig, go_away: GoAway) {
    let (_reader, sender) = start(io, config);
    let reason = ConnectionError::Closed {
        reason: go_away.message.to_string().into(),
    };
    sender.close_with(go_away, &reason);
    sender.closed().await;
}

/// Queues frames for a connection's writer. Cheap to clone; every clone feeds the same
/// connection.
#[derive(Clone, Debug)]
pub struct FrameSender {
    tx: queue::Tx,
    shared: Arc<Shared>,
    /// Writes a frame itself, for [`FrameSender::send_direct`].
    direct: Arc<dyn Direct>,
}

/// How long after its last write a connection counts as idle, so that a send may write
/// its frame itself. Sends closer together than this (a burst, or a busy connection) go
/// through the writer task, which gathers them into one write.
pub const QUIET: Duration = Duration::from_micros(20);

/// How many direct write attempts are refused after a direct write that a burst of
/// queued frames followed (within [`QUIET`]): a sender whose lone-looking requests
/// start bursts (a window of publishes, all answered at once) stops splitting each
/// burst into a direct write and a queued rest, and tries again after this many.
pub const DIRECT_PAUSE: usize = 64;

/// The write half, shared by the writer task and by senders that write directly.
struct Output<W> {
    io: W,
    /// Bytes of a directly written frame that the stream did not take at once (or not
    /// flushed yet); the writer task writes them before anything else. Counted as queued
    /// bytes.
    tail: BytesMut,
    /// A direct write left the writer something to do: the tail, or only its flush.
    unflushed: bool,
    codec: FrameCodec,
}

impl<W> Output<W> {
    /// The tail has been written: its bytes are no longer queued. Nothing without one.
    fn tail_written(&mut self, shared: &Shared) {
        if self.unflushed {
            shared.unqueue(queued_cost(self.tail.len()));
            self.tail.clear();
            if self.tail.capacity() > TAIL_KEEP {
                self.tail = BytesMut::new();
            }
            self.unflushed = false;
        }
    }
}

/// A frame written by its sender (see [`FrameSender::send_direct`]); type-erased over the
/// stream's write half.
trait Direct: Send + Sync + std::fmt::Debug {
    /// Writes `frame` now if the connection is idle; hands it back otherwise (by value,
    /// as `try_send` does: boxing it would allocate on the path meant to be cheap).
    #[allow(clippy::result_large_err)]
    fn write_now(&self, frame: Frame) -> Result<(), Frame>;

    /// Writes `frames`, whole frames encoded and checked already, now in one write if
    /// nothing is queued or being written; `false` otherwise. With `lone` (a single
    /// frame, not a batch), only if the connection is idle, as [`Direct::write_now`].
    fn write_encoded_now(&self, frames: &[u8], lone: bool) -> bool;
}

/// The largest frame, length prefix included, that [`FrameSender::try_send_encoded`]
/// encodes into the queue; larger ones are queued whole, for the writer to encode.
pub(crate) const APPEND_FRAME_MAX: usize = 16 * 1024;

/// What [`FrameSender::try_encode_request`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Encoded into the send queue, counted as queued.
    Queued,
    /// No room now, in frames or in bytes: the caller waits for room (with the request
    /// as a frame), rather than trying again at once.
    NoRoom,
    /// Larger than [`APPEND_FRAME_MAX`]: the caller queues it as a frame, whole.
    TooLarge,
}

/// What a direct write keeps of its buffer, the output's tail, once written: a larger
/// one (a large frame's) is given back.
const TAIL_KEEP: usize = 16 * 1024;

struct DirectWriter<W> {
    output: Arc<tokio::sync::Mutex<Output<W>>>,
    shared: Arc<Shared>,
}

impl<W> std::fmt::Debug for DirectWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectWriter")
    }
}

impl<W: AsyncWrite + Send + Unpin + 'static> DirectWriter<W> {
    /// Whether a lone frame may be written directly: direct writes are not paused, the
    /// stream was not written to within [`QUIET`], and nothing is queued. If so, the
    /// time it looked ([`Shared::now`]), which the write is noted at: one clock read
    /// per direct write.
    fn idle(&self) -> Option<u64> {
        let shared = &self.shared;
        if shared.direct_paused.load(Ordering::Relaxed) > 0 {
            // (racing senders may both take one: a pause a little shorter or longer)
            let _ = shared.direct_paused.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let now = shared.now();
        (!shared.busy(now) && shared.pending.load(Ordering::Acquire) == 0).then_some(now)
    }

    /// The write half, if a direct write may go now: nothing is queued or being
    /// written, nothing is left of an earlier direct write, and the connection is not
    /// closing.
    fn output(&self) -> Option<tokio::sync::MutexGuard<'_, Output<W>>> {
        let shared = &self.shared;
        // Held while writing: the writer task writes nothing meanwhile. Never waited
        // for: a sender that finds it taken queues its frame.
        let output = self.output.try_lock().ok()?;
        // Checked under the lock: a frame queued before this one goes first, and
        // nothing is written once the connection is closing (the writer may have shut
        // the stream down, or be about to write an abort's go-away after the tail).
        if shared.close.is_set() || shared.pending.load(Ordering::Acquire) != 0 || output.unflushed
        {
            return None;
        }
        Some(output)
    }

    /// Writes what `encode` puts in the output's (empty) tail now, if a direct write
    /// may go ([`DirectWriter::output`]); `false` when it may not, or `encode` fails.
    /// What the stream does not take at once stays in the tail, for the writer task.
    fn write_encoded(
        &self,
        now: u64,
        encode: impl FnOnce(&mut FrameCodec, &mut BytesMut) -> bool,
    ) -> bool {
        let Some(mut output) = self.output() else {
            return false;
        };
        let Output {
            io, tail, codec, ..
        } = &mut *output;
        debug_assert!(tail.is_empty(), "a tail is left only with `unflushed`");
        if !encode(codec, tail) {
            tail.clear();
            return false; // the queued path reports it
        }
        let (written, flushed) = self.write_without_waiting(io, tail, now);
        if flushed {
            tail.clear();
            if tail.capacity() > TAIL_KEEP {
                *tail = BytesMut::new();
            }
        } else {
            tail.advance(written);
            self.leave_tail(&mut output);
        }
        true
    }

    /// Writes as much of `bytes` as the stream takes now, then flushes; returns how many
    /// bytes it took and whether all were flushed. Notes the write at `now`
    /// ([`Shared::now`], read just before).
    fn write_without_waiting(&self, io: &mut W, bytes: &[u8], now: u64) -> (usize, bool) {
        let shared = &self.shared;
        shared.wrote_at(now);
        shared.times.direct_at.store(now.max(1), Ordering::Relaxed);
        let mut cx = Context::from_waker(Waker::noop());
        let mut written = 0;
        while written < bytes.len() {
            match Pin::new(&mut *io).poll_write(&mut cx, &bytes[written..]) {
                Poll::Ready(Ok(n)) if n > 0 => written += n,
                // no room, or an error: the writer task writes the rest (and meets the
                // error itself, ending the connection as any failed write does)
                _ => break,
            }
        }
        let flushed = written == bytes.len()
            && matches!(Pin::new(&mut *io).poll_flush(&mut cx), Poll::Ready(Ok(())));
        (written, flushed)
    }

    /// The tail holds what a direct write could not write or flush: counted as queued,
    /// and left to the writer task, which writes it before anything else.
    fn leave_tail(&self, output: &mut Output<W>) {
        let shared = &self.shared;
        shared
            .queued_bytes
            .fetch_add(queued_cost(output.tail.len()), Ordering::Relaxed);
        output.unflushed = true;
        shared.tail_ready.store(true, Ordering::Release);
        shared.writer_waiting.wake();
    }
}

impl<W: AsyncWrite + Send + Unpin + 'static> Direct for DirectWriter<W> {
    fn write_now(&self, frame: Frame) -> Result<(), Frame> {
        let Some(now) = self.idle() else {
            return Err(frame);
        };
        if self.write_encoded(now, |codec, buf| codec.encode_checked(&frame, buf).is_ok()) {
            Ok(())
        } else {
            Err(frame)
        }
    }

    fn write_encoded_now(&self, frames: &[u8], lone: bool) -> bool {
        // A lone frame goes only to an idle connection; the time that was found at is
        // the write's.
        let looked = if lone {
            let Some(now) = self.idle() else {
                return false;
            };
            Some(now)
        } else {
            None
        };
        let Some(mut output) = self.output() else {
            return false;
        };
        let now = looked.unwrap_or_else(|| self.shared.now());
        // Written from where they are; only what the stream does not take is copied.
        let (written, flushed) = self.write_without_waiting(&mut output.io, frames, now);
        if !flushed {
            output.tail.extend_from_slice(&frames[written..]);
            self.leave_tail(&mut output);
        }
        true
    }
}

impl FrameSender {
    /// Queues `frame`, waiting while the queue is full: in frames
    /// ([`ConnectionConfig::send_queue`]) and in bytes
    /// ([`ConnectionConfig::max_queued_bytes`]; a frame larger than that limit waits for
    /// an empty queue). Every frame a side originates (answers, pongs, refusals) is held to
    /// the same memory bound as the frames a broker fans out with `try_send`.
    ///
    /// A frame over the maximum frame length is refused here with
    /// [`ConnectionError::FrameTooLarge`] and the connection stays up. After the
    /// connection closed, fails with [`ConnectionError::Closed`].
    pub async fn send(&self, frame: Frame) -> Result<(), ConnectionError> {
        Ok(self.send_or_give_back(frame, false).await?)
    }

    /// [`FrameSender::send`], except that on an idle connection (nothing queued or
    /// being written, and no write in the last [`QUIET`]) the frame is written by the
    /// caller, now, without waking the writer task. For a lone request whose caller
    /// waits for its answer next: one thread hand-off less on its way out. Requests sent
    /// in a stream should use `send`, which lets the writer gather them into one write.
    ///
    /// ```
    /// use rpc_core::connection::{self, ConnectionConfig};
    /// use rpc_core::frame::Frame;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, b) = tokio::io::duplex(1024);
    /// let config = ConnectionConfig::default();
    /// let (_a_reader, a_sender) = connection::start(a, &config);
    /// let (mut b_reader, _b_sender) = connection::start(b, &config);
    ///
    /// a_sender.send_direct(Frame::Cancel { id: 3 }).await.unwrap();
    /// assert_eq!(b_reader.next().await.unwrap().unwrap(), Frame::Cancel { id: 3 });
    /// # }
    /// ```
    pub async fn send_direct(&self, frame: Frame) -> Result<(), ConnectionError> {
        Ok(self.send_or_give_back(frame, true).await?)
    }

    /// [`FrameSender::send`], or with `direct` [`FrameSender::send_direct`], that hands
    /// the frame back when the connection is closed: a caller that keeps what a dead
    /// connection did not take (a bus client's reconnect buffer) need not clone every
    /// frame it sends. A frame the connection queued is its to write.
    ///
    /// ```
    /// use rpc_core::connection::{self, ConnectionConfig, Unsent};
    /// use rpc_core::frame::Frame;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, _b) = tokio::io::duplex(1024);
    /// let (_reader, sender) = connection::start(a, &ConnectionConfig::default());
    /// sender.close();
    /// match sender.send_or_give_back(Frame::Cancel { id: 3 }, false).await {
    ///     Err(Unsent::Closed { frame, .. }) => assert_eq!(frame, Frame::Cancel { id: 3 }),
    ///     other => panic!("{other:?}"),
    /// }
    /// # }
    /// ```
    // The frame is handed back by value, as `try_send` does.
    #[allow(clippy::result_large_err)]
    pub async fn send_or_give_back(&self, frame: Frame, direct: bool) -> Result<(), Unsent> {
        let Some((mut frame, bytes)) = self.check_or_write(frame, direct)? else {
            return Ok(());
        };
        // A sender that always finds room spends a unit of its task's budget anyway, so
        // that it still yields to the runtime's other tasks now and then. Before the
        // frame is counted or queued: a send cancelled here (a caller's timeout) leaves
        // nothing behind, and none that queued its frame is cancelled after.
        tokio::task::consume_budget().await;
        // The common case, room now: queued here, without the futures of a send that
        // waits (they showed in a publishing client's profile, moving the frame along).
        match self.try_push_checked(frame, bytes) {
            Ok(()) => return Ok(()),
            Err(TryUnsent::Unsent(unsent)) => return Err(unsent),
            Err(TryUnsent::Full(back)) => frame = back,
        }
        self.queue(frame, bytes)
            .await
            .map_err(|(e, frame)| Unsent::new(e, frame))
    }

    /// [`FrameSender::send_or_give_back`] if it can be done now, without waiting: a
    /// frame there is no room for now is handed back as well
    /// ([`TryUnsent::Full`]). For a caller whose common case should cost no future of
    /// its own, with `send_or_give_back` to wait when it must. Such a caller spends a
    /// unit of its task's coop budget ([`tokio::task::consume_budget`]) before each
    /// call, as `send_or_give_back` does, so that a sender that always finds room still
    /// yields to the runtime's other tasks now and then.
    ///
    /// ```
    /// use rpc_core::connection::{self, ConnectionConfig, TryUnsent, Unsent};
    /// use rpc_core::frame::Frame;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, _b) = tokio::io::duplex(1024);
    /// let (_reader, sender) = connection::start(a, &ConnectionConfig::default());
    /// assert!(sender.try_send_or_give_back(Frame::Cancel { id: 1 }, false).is_ok());
    /// sender.close();
    /// match sender.try_send_or_give_back(Frame::Cancel { id: 2 }, false) {
    ///     Err(TryUnsent::Unsent(Unsent::Closed { frame, .. })) => {
    ///         assert_eq!(frame, Frame::Cancel { id: 2 })
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// # }
    /// ```
    // The frame is handed back by value, as `try_send` does.
    #[allow(clippy::result_large_err)]
    pub fn try_send_or_give_back(&self, frame: Frame, direct: bool) -> Result<(), TryUnsent> {
        match self.check_or_write(frame, direct) {
            Ok(Some((frame, bytes))) => self.try_push_checked(frame, bytes),
            Ok(None) => Ok(()),
            Err(unsent) => Err(TryUnsent::Unsent(unsent)),
        }
    }

    /// The start of every send that hands its frame back: checks `frame`, and with
    /// `direct` writes it now if the connection is idle (`None`). Otherwise returns it
    /// with its queued cost, for the caller to queue.
    #[allow(clippy::result_large_err)]
    fn check_or_write(&self, frame: Frame, direct: bool) -> Result<Option<(Frame, usize)>, Unsent> {
        let bytes = match self.check(&frame) {
            Ok(bytes) => bytes,
            Err(e) => return Err(Unsent::new(e, frame)),
        };
        let frame = if direct {
            match self.direct.write_now(frame) {
                Ok(()) => return Ok(None),
                Err(frame) => frame,
            }
        } else {
            frame
        };
        self.shared.queued_after_direct();
        Ok(Some((frame, bytes)))
    }

    /// [`FrameSender::encode_into`] for an answer to call `id` with status OK and
    /// `payload`, borrowed: a small answer a server holds inline goes into the batch
    /// from where it lies, with no [`Frame`] (and no [`bytes::Bytes`]) made for it.
    pub(crate) fn encode_ok_response_into(
        &self,
        id: u64,
        payload: &[u8],
        batch: &mut EncodedFrames,
    ) -> Result<(), ConnectionError> {
        self.check_open()?;
        let len = check_body_len(Response::ok_len(payload.len()), self.max_frame_len())?;
        batch.buf.reserve(LENGTH_PREFIX_LEN + len);
        // At most `max_frame_len`, which is at most `u32::MAX`.
        batch.buf.put_u32(len as u32);
        Response::encode_ok(id, payload, &mut batch.buf);
        batch.frames += 1;
        Ok(())
    }

    /// Encodes `frame` at the end of `batch`, checked as a send checks it (a frame over
    /// the maximum frame length, or a closed connection, is refused and `batch` left as
    /// it was). For a sender that gathers a batch itself, a server's answers to the
    /// requests of one read: each frame is encoded as it is made, and what it holds can
    /// be freed at once rather than after the batch is written.
    pub(crate) fn encode_into(
        &self,
        frame: &Frame,
        batch: &mut EncodedFrames,
    ) -> Result<(), ConnectionError> {
        self.check(frame)?;
        self.encode_checked_into(frame, batch)
    }

    /// `FrameSender::encode_into` for a batch sent with
    /// [`FrameSender::send_encoded_within`], if the connection has room for the frame
    /// beside what is queued and what the batch holds already (`max_queued_bytes`, as
    /// [`FrameSender::try_send`] counts it). A broker gathers the messages of one read
    /// for each subscriber this way.
    ///
    /// ```
    /// use std::time::Duration;
    /// use rpc_core::connection::{self, ConnectionConfig, EncodedFrames};
    /// use rpc_core::frame::Frame;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, b) = tokio::io::duplex(1024);
    /// let config = ConnectionConfig::default();
    /// let (_a_reader, a_sender) = connection::start(a, &config);
    /// let (mut b_reader, _b_sender) = connection::start(b, &config);
    ///
    /// let mut batch = EncodedFrames::default();
    /// for id in 0..3 {
    ///     a_sender.try_encode_into(&Frame::Cancel { id }, &mut batch).unwrap();
    /// }
    /// a_sender.send_encoded_within(&mut batch, Duration::from_secs(1)).await.unwrap();
    /// assert!(batch.is_empty());
    /// for id in 0..3 {
    ///     assert_eq!(b_reader.next().await.unwrap().unwrap(), Frame::Cancel { id });
    /// }
    /// # }
    /// ```
    pub fn try_encode_into(
        &self,
        frame: &Frame,
        batch: &mut EncodedFrames,
    ) -> Result<(), BatchError> {
        let len = frame
            .encoded_len()
            .map_err(|e| BatchError::Failed(e.into()))?;
        self.batch_room(len, batch)?;
        self.encode_checked_into(frame, batch)
            .map_err(BatchError::Failed)
    }

    /// Whether a frame whose body is `len` bytes may join `batch`: the connection is
    /// open, the frame is within its limit (else [`ConnectionError::FrameTooLarge`]),
    /// and `max_queued_bytes` has room for it beside what is queued and what the batch
    /// holds (else [`BatchError::Full`]).
    fn batch_room(&self, len: usize, batch: &EncodedFrames) -> Result<(), BatchError> {
        if self.shared.close.is_set() {
            return Err(BatchError::Failed(self.shared.closed_error()));
        }
        check_body_len(len, self.max_frame_len()).map_err(BatchError::Failed)?;
        let queued = self
            .queued_bytes()
            .saturating_add(batch.cost())
            .saturating_add(queued_cost(len + LENGTH_PREFIX_LEN));
        if queued > self.shared.max_queued_bytes {
            return Err(BatchError::Full);
        }
        Ok(())
    }

    /// [`FrameSender::try_encode_into`] for the `Msg` frame that delivers a publish to
    /// subscription `sid`, encoded from the publish (see [`Delivery`]): a broker that
    /// fans one publish out to several subscribers checks its fields once and builds no
    /// frame per subscriber.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use rpc_core::connection::{self, ConnectionConfig, EncodedFrames};
    /// use rpc_core::frame::{Delivery, Frame, Publish};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, b) = tokio::io::duplex(1024);
    /// let config = ConnectionConfig::default();
    /// let (_a_reader, a_sender) = connection::start(a, &config);
    /// let (mut b_reader, _b_sender) = connection::start(b, &config);
    ///
    /// let publish = Publish {
    ///     subject: "orders.new".into(),
    ///     reply: Default::default(),
    ///     headers: Default::default(),
    ///     payload: Bytes::from_static(b"hi"),
    /// };
    /// let delivery = Delivery::new(&publish).unwrap();
    /// let mut batch = EncodedFrames::default();
    /// for sid in [1, 2] {
    ///     a_sender.try_encode_delivery_into(&delivery, sid, &mut batch).unwrap();
    /// }
    /// a_sender.send_encoded_within(&mut batch, Duration::from_secs(1)).await.unwrap();
    /// for sid in [1, 2] {
    ///     let Frame::Msg(m) = b_reader.next().await.unwrap().unwrap() else { panic!() };
    ///     assert_eq!((m.sid, &m.payload[..]), (sid, &b"hi"[..]));
    /// }
    /// # }
    /// ```
    pub fn try_encode_delivery_into(
        &self,
        delivery: &Delivery<'_>,
        sid: u64,
        batch: &mut EncodedFrames,
    ) -> Result<(), BatchError> {
        let len = delivery.encoded_len();
        self.batch_room(len, batch)?;
        let buf = &mut batch.buf;
        buf.reserve(LENGTH_PREFIX_LEN + len);
        // at most `max_frame_len`, which is at most `u32::MAX`
        buf.put_u32(len as u32);
        delivery.encode(sid, buf);
        batch.frames += 1;
        Ok(())
    }

    fn encode_checked_into(
        &self,
        frame: &Frame,
        batch: &mut EncodedFrames,
    ) -> Result<(), ConnectionError> {
        FrameCodec::new(self.max_frame_len()).encode_checked(frame, &mut batch.buf)?;
        batch.frames += 1;
        Ok(())
    }

    /// Sends the frames of `batch` as one: written now, in one write, if nothing is
    /// queued or being written (busy or not: they are a batch already; a batch of one
    /// only on an idle connection, as [`FrameSender::send_direct`] writes). Otherwise
    /// queued as one item, waiting for room as [`FrameSender::send`] does. No room within
    /// `keepalive_timeout`: the peer is cut off, as [`FrameSender::send_or_abort`] does.
    /// Leaves `batch` empty.
    pub(crate) async fn send_encoded_or_abort(
        &self,
        batch: &mut EncodedFrames,
    ) -> Result<(), ConnectionError> {
        match self.send_encoded_within(batch, self.shared.stall).await {
            Ok(()) => Ok(()),
            Err(BatchError::Full) => Err(self.stalled()),
            Err(BatchError::Failed(e)) => Err(e),
        }
    }

    /// Sends the frames of `batch` as one: written now, in one write, if nothing is
    /// queued or being written (a batch of one only on an idle connection, as
    /// [`FrameSender::send_direct`] writes); otherwise queued as one item, counted as
    /// queued bytes like a frame of its size, waiting at most `wait` for room as
    /// [`FrameSender::send_within`] does. Still no room after `wait`:
    /// [`BatchError::Full`], and the frames are dropped; the caller decides what becomes
    /// of a peer that does not read (a broker cuts it off as a slow consumer). Leaves
    /// `batch` empty.
    ///
    /// See [`FrameSender::try_encode_into`] for an example.
    pub async fn send_encoded_within(
        &self,
        batch: &mut EncodedFrames,
        wait: Duration,
    ) -> Result<(), BatchError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.shared.close.is_set() {
            batch.clear();
            return Err(BatchError::Failed(self.shared.closed_error()));
        }
        if self.direct.write_encoded_now(&batch.buf, batch.frames == 1) {
            batch.clear();
            return Ok(());
        }
        self.shared.queued_after_direct();
        let bytes = batch.cost();
        let item = queue::Item::Appended {
            frames: batch.take_frames(),
            cost: bytes,
        };
        // The common case, room now, sets no timer.
        let item = match self.try_push_reserved(item, bytes) {
            Ok(()) => return Ok(()),
            Err(queue::PushError::Closed(_)) => {
                return Err(BatchError::Failed(self.shared.closed_error()));
            }
            Err(queue::PushError::Full(back)) => back,
        };
        match tokio::time::timeout(wait, self.queue(item, bytes)).await {
            Ok(queued) => queued.map_err(|(e, _)| BatchError::Failed(e)),
            Err(_) => Err(BatchError::Full),
        }
    }

    /// Queues a checked frame of `bytes` (its queued cost) if its bytes fit now (see
    /// [`Shared::try_reserve`]) and the frame queue has room.
    #[allow(clippy::result_large_err)]
    fn try_push_checked(&self, frame: Frame, bytes: usize) -> Result<(), TryUnsent> {
        self.try_push_reserved(frame, bytes).map_err(|e| match e {
            queue::PushError::Closed(back) => {
                TryUnsent::Unsent(Unsent::new(self.shared.closed_error(), back))
            }
            queue::PushError::Full(back) => TryUnsent::Full(back),
        })
    }

    /// Queues an item of `bytes` (its queued cost) if its bytes fit now (see
    /// [`Shared::try_reserve`]) and the queue has room; hands it back otherwise.
    #[allow(clippy::result_large_err)]
    fn try_push_reserved<T: Into<queue::Item>>(
        &self,
        item: T,
        bytes: usize,
    ) -> Result<(), queue::PushError<T>> {
        if !self.shared.try_reserve(bytes) {
            return Err(queue::PushError::Full(item));
        }
        self.push_counted(item, bytes)
    }

    /// Puts a frame whose `bytes` are counted as queued already into the frame queue,
    /// counted as pending until written; a frame the queue refuses is counted as neither.
    #[allow(clippy::result_large_err)]
    fn push_counted<T: Into<queue::Item>>(
        &self,
        frame: T,
        bytes: usize,
    ) -> Result<(), queue::PushError<T>> {
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        self.tx
            .try_push(frame)
            .inspect_err(|_| self.unqueued(bytes))
    }

    /// Queues a checked frame of `bytes` (its queued cost), waiting for room; hands the
    /// frame back with the error when the connection closed first.
    async fn queue<T: Into<queue::Item>>(
        &self,
        frame: T,
        bytes: usize,
    ) -> Result<(), (ConnectionError, T)> {
        // The bytes first, then a place in the frame queue: no await comes between
        // counting the bytes and queueing the frame, so a send that is cancelled (a
        // caller's timeout) never leaves bytes counted for a frame that was not queued.
        let mut frame = frame;
        loop {
            if let Err(e) = self.reserve_bytes(bytes).await {
                return Err((e, frame));
            }
            match self.push_counted(frame, bytes) {
                Ok(()) => return Ok(()),
                Err(queue::PushError::Closed(back)) => {
                    return Err((self.shared.closed_error(), back));
                }
                Err(queue::PushError::Full(back)) => {
                    // Full in frames: the bytes were given back, and it waits without
                    // them, so that a send cancelled meanwhile (a caller's timeout)
                    // leaves nothing counted for a frame that was not queued.
                    frame = back;
                    if !self.tx.room().await {
                        return Err((self.shared.closed_error(), frame));
                    }
                }
            }
        }
    }

    /// Undoes the counting of a frame of `bytes` that was not queued after all.
    fn unqueued(&self, bytes: usize) {
        self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        self.shared.unqueue(bytes);
    }

    /// [`FrameSender::send`], for a side that cannot wait on its peer for ever (a reader
    /// answering pings, a server answering calls or refusing subscriptions): when the
    /// frame finds no room within the connection's `keepalive_timeout`, the peer is taken
    /// for one that stopped reading, and the connection is aborted with a
    /// `SLOW_CONSUMER` go-away saying so.
    pub async fn send_or_abort(&self, frame: Frame) -> Result<(), ConnectionError> {
        match tokio::time::timeout(self.shared.stall, self.send(frame)).await {
            Ok(sent) => sent,
            Err(_) => Err(self.stalled()),
        }
    }

    /// A send found no room within `keepalive_timeout`: the peer is taken for one that
    /// stopped reading, and cut off.
    fn stalled(&self) -> ConnectionError {
        let message = format!(
            "the peer is not reading: {} bytes wait for it and found no room under \
             max_queued_bytes within {:?} (keepalive_timeout); closing",
            self.queued_bytes(),
            self.shared.stall
        );
        tracing::warn!("{message}");
        self.cut_off(message)
    }

    /// Writes what is queued, then closes; a peer that does not read it within `within`
    /// is cut off ([`FrameSender::abort_with`]). Returns once the writer has stopped.
    pub async fn close_within(&self, within: Duration) {
        self.close();
        if tokio::time::timeout(within, self.closed()).await.is_err() {
            self.cut_off(format!(
                "the peer did not read what was left to write within {within:?}"
            ));
            self.closed().await;
        }
    }

    /// Cuts off a peer that does not keep up: [`FrameSender::abort_with`] a
    /// `SLOW_CONSUMER` go-away carrying `message`, which is also what local users see as
    /// the cause (the returned error).
    pub fn cut_off(&self, message: String) -> ConnectionError {
        let error = ConnectionError::Closed {
            reason: message.clone().into(),
        };
        self.abort_with(GoAway::new(GoAway::SLOW_CONSUMER, message), &error);
        error
    }

    /// Queues `frame` if there is room now; never waits. A full queue, in frames
    /// ([`ConnectionConfig::send_queue`]) or in bytes
    /// ([`ConnectionConfig::max_queued_bytes`]), hands the frame back: a `Drop`
    /// implementation sends it from a task instead, a broker treats the peer as a slow
    /// consumer.
    // The frame is handed back by value on `Full`, as tokio's own `TrySendError<T>` does;
    // boxing it would allocate on the one path that exists to avoid waiting.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, frame: Frame) -> Result<(), TrySendError> {
        let bytes = match self.check(&frame) {
            Ok(bytes) => bytes,
            Err(e) => return Err(TrySendError::Failed(e)),
        };
        self.try_queue(frame, bytes)
    }

    /// [`FrameSender::try_send`] for frames that many tasks send one at a time (a
    /// client's requests, the answers of a server's call tasks): a frame of up to
    /// [`APPEND_FRAME_MAX`] bytes is encoded now, by the caller, into the queue, after
    /// the frames encoded there before it, instead of queued for the writer task to
    /// encode. What the frame holds is freed by the caller, at once, on its own thread,
    /// and the writer only writes bytes. A larger frame is queued as `try_send` queues
    /// it. Counted, limited and handed back exactly as `try_send` does.
    #[allow(clippy::result_large_err)] // see try_send
    pub(crate) fn try_send_encoded(&self, frame: Frame) -> Result<(), TrySendError> {
        self.try_encode_or_give_back(frame)
            .map_err(TrySendError::from)
    }

    /// [`FrameSender::try_send_or_give_back`] for frames that one task sends one after
    /// the other (a bus client's publishes): a frame of up to 16 KiB is encoded now, by
    /// the caller, into the queue, after the frames encoded there before it, so that
    /// what it holds (a payload shared with the caller's next publishes, say) is let go
    /// on the caller's thread rather than by the writer task on another. The writer
    /// writes queued bytes from where they are when they add up to 2 KiB or more, and
    /// copies fewer into its own buffer. A larger frame is queued whole. With `direct`,
    /// a frame on an idle connection is written now instead. Handed back exactly as
    /// `try_send_or_give_back` does.
    ///
    /// ```
    /// use rpc_core::connection::{self, ConnectionConfig, TryUnsent, Unsent};
    /// use rpc_core::frame::Frame;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, b) = tokio::io::duplex(1024);
    /// let config = ConnectionConfig::default();
    /// let (_a_reader, a_sender) = connection::start(a, &config);
    /// let (mut b_reader, _b_sender) = connection::start(b, &config);
    ///
    /// a_sender.try_send_encoded_or_give_back(Frame::Cancel { id: 3 }, false).unwrap();
    /// assert_eq!(b_reader.next().await.unwrap().unwrap(), Frame::Cancel { id: 3 });
    ///
    /// // Closed: the frame comes back, for the caller to keep (a bus client buffers
    /// // its publishes for the next connection).
    /// a_sender.close();
    /// a_sender.closed().await;
    /// match a_sender.try_send_encoded_or_give_back(Frame::Cancel { id: 4 }, false) {
    ///     Err(TryUnsent::Unsent(Unsent::Closed { frame, .. })) => {
    ///         assert_eq!(frame, Frame::Cancel { id: 4 })
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// # }
    /// ```
    #[allow(clippy::result_large_err)] // see try_send
    pub fn try_send_encoded_or_give_back(
        &self,
        frame: Frame,
        direct: bool,
    ) -> Result<(), TryUnsent> {
        if direct {
            return self.try_send_or_give_back(frame, true);
        }
        self.try_encode_or_give_back(frame)
    }

    /// The body of [`FrameSender::try_send_encoded`]: the frame comes back when there is
    /// no room or the connection is closed.
    #[allow(clippy::result_large_err)] // see try_send
    fn try_encode_or_give_back(&self, frame: Frame) -> Result<(), TryUnsent> {
        if self.shared.close.is_set() {
            return Err(self.closed_unsent(frame));
        }
        let len = match check_frame_len(&frame, self.max_frame_len()) {
            Ok(len) => len,
            Err(e) => return Err(TryUnsent::Unsent(Unsent::new(e, frame))),
        };
        let wire = len + LENGTH_PREFIX_LEN;
        if wire > APPEND_FRAME_MAX {
            let bytes = queued_cost(wire);
            if !self.try_count(bytes) {
                return Err(TryUnsent::Full(frame));
            }
            return self.push_counted(frame, bytes).map_err(|e| match e {
                queue::PushError::Full(frame) => TryUnsent::Full(frame),
                queue::PushError::Closed(frame) => self.closed_unsent(frame),
            });
        }
        self.try_append(len, |buf| frame.encode_validated(buf))
            .map_err(|refused| match refused {
                queue::PushError::Full(()) => TryUnsent::Full(frame),
                queue::PushError::Closed(()) => self.closed_unsent(frame),
            })
    }

    /// Encodes a frame body of `len` bytes (checked, and at most [`APPEND_FRAME_MAX`]
    /// with its length prefix), written by `encode`, at the end of the send queue, if
    /// there is room now; counted as queued exactly as a queued frame is. Refused, with
    /// nothing counted, when the queue is full or closed.
    fn try_append(
        &self,
        len: usize,
        encode: impl FnOnce(&mut BytesMut),
    ) -> Result<(), queue::PushError<()>> {
        let wire = len + LENGTH_PREFIX_LEN;
        let bytes = queued_cost(wire);
        if !self.try_count(bytes) {
            return Err(queue::PushError::Full(()));
        }
        let pending = &self.shared.pending;
        self.tx
            .try_append(
                bytes,
                |buf| {
                    buf.reserve(wire);
                    // At most `max_frame_len`, which is at most `u32::MAX`.
                    buf.put_u32(len as u32);
                    let start = buf.len();
                    encode(buf);
                    debug_assert_eq!(buf.len() - start, len);
                },
                || {
                    pending.fetch_add(1, Ordering::AcqRel);
                },
            )
            .inspect_err(|_| self.shared.unqueue(bytes))
    }

    /// [`FrameSender::try_send_encoded`] for a request made of borrowed fields: encoded
    /// into the queue from where they lie, with no [`Frame`] made. A client's call
    /// among others sends its request this way, its arguments serialized in place
    /// ([`crate::format::Encoded`]): a small call allocates nothing to be sent.
    ///
    /// What became of it ([`Appended`]). Unless it was [`Appended::Queued`], nothing was
    /// queued or counted, and the caller sends the request as a frame. Fails, as a send
    /// does, when the connection is closed or the request is over the maximum frame
    /// length.
    pub(crate) fn try_encode_request(
        &self,
        id: u64,
        timeout: Option<Duration>,
        method: &Utf8Bytes,
        metadata: &Metadata,
        payload: &[u8],
    ) -> Result<Appended, ConnectionError> {
        self.check_open()?;
        let len = Request::encoded_len_of(method, metadata, payload.len())?;
        let len = check_body_len(len, self.max_frame_len())?;
        if len + LENGTH_PREFIX_LEN > APPEND_FRAME_MAX {
            return Ok(Appended::TooLarge);
        }
        match self.try_append(len, |buf| {
            Request::encode_fields(id, timeout, method, metadata, payload, buf)
        }) {
            Ok(()) => Ok(Appended::Queued),
            Err(queue::PushError::Full(())) => Ok(Appended::NoRoom),
            Err(queue::PushError::Closed(())) => Err(self.shared.closed_error()),
        }
    }

    /// `frame`, handed back because the connection is closed.
    fn closed_unsent(&self, frame: Frame) -> TryUnsent {
        TryUnsent::Unsent(Unsent::new(self.shared.closed_error(), frame))
    }

    /// [`FrameSender::try_send`], except that on an idle connection the frame is written
    /// by the caller, now, as [`FrameSender::send_direct`] does. For a lone answer or
    /// request that nothing else is queued behind: one thread hand-off less.
    ///
    /// ```
    /// use rpc_core::connection::{self, ConnectionConfig};
    /// use rpc_core::frame::Frame;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, b) = tokio::io::duplex(1024);
    /// let config = ConnectionConfig::default();
    /// let (_a_reader, a_sender) = connection::start(a, &config);
    /// let (mut b_reader, _b_sender) = connection::start(b, &config);
    ///
    /// a_sender.try_send_direct(Frame::Cancel { id: 3 }).unwrap();
    /// assert_eq!(b_reader.next().await.unwrap().unwrap(), Frame::Cancel { id: 3 });
    /// # }
    /// ```
    // Handed back by value on `Full`, as `try_send` does.
    #[allow(clippy::result_large_err)]
    pub fn try_send_direct(&self, frame: Frame) -> Result<(), TrySendError> {
        let bytes = match self.check(&frame) {
            Ok(bytes) => bytes,
            Err(e) => return Err(TrySendError::Failed(e)),
        };
        match self.direct.write_now(frame) {
            Ok(()) => Ok(()),
            Err(frame) => self.try_queue(frame, bytes),
        }
    }

    /// Counts `bytes` as queued for a send that does not wait, if they fit under
    /// `max_queued_bytes` with what is queued already (unlike [`Shared::try_reserve`],
    /// not when they alone are over it); notes the send for the direct-write pause.
    fn try_count(&self, bytes: usize) -> bool {
        let before = self.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.shared.max_queued_bytes {
            self.shared.unqueue(bytes);
            return false;
        }
        self.shared.queued_after_direct();
        true
    }

    /// Queues a checked frame of `bytes` (its queued cost) if there is room now.
    #[allow(clippy::result_large_err)]
    fn try_queue(&self, frame: Frame, bytes: usize) -> Result<(), TrySendError> {
        if !self.try_count(bytes) {
            return Err(TrySendError::Full(frame));
        }
        self.push_counted(frame, bytes).map_err(|e| match e {
            queue::PushError::Full(frame) => TrySendError::Full(frame),
            queue::PushError::Closed(_) => TrySendError::Failed(self.shared.closed_error()),
        })
    }

    /// Queues `frame` as soon as there is room, waiting at most `wait` for the writer to
    /// make some: room in frames ([`ConnectionConfig::send_queue`]) and in bytes
    /// ([`ConnectionConfig::max_queued_bytes`]). A queue still full after `wait` hands
    /// the frame back, as [`FrameSender::try_send`] does at once.
    ///
    /// A broker uses this to pace a publisher to a subscriber that is briefly behind,
    /// and to tell a stuck subscriber (still full after the grace) from a slow one.
    #[allow(clippy::result_large_err)] // see try_send
    pub async fn send_within(&self, frame: Frame, wait: Duration) -> Result<(), TrySendError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut frame = frame;
        loop {
            match self.try_send(frame) {
                Err(TrySendError::Full(back)) => frame = back,
                other => return other,
            }
            // Then wait until the queue is down to half its byte limit, not merely until
            // one frame fits: a sender woken for every write would move in lock step with
            // the writer, one frame per wake-up. Each waiter is registered before the
            // check it guards, so that a write in between is never missed.
            loop {
                let written = self.shared.written.notified();
                tokio::pin!(written);
                written.as_mut().enable();
                if self.queued_bytes() <= self.shared.max_queued_bytes / 2 {
                    break;
                }
                let stopped = self.shared.writer_done.wait();
                tokio::select! {
                    _ = &mut written => {}
                    _ = stopped => return Err(TrySendError::Failed(self.shared.closed_error())),
                    // One last attempt: full only if it still does not fit.
                    _ = tokio::time::sleep_until(deadline) => return self.try_send(frame),
                }
            }
        }
    }

    /// Waits until at most `bytes` are queued (`true`), or the connection's writer
    /// stops (`true`: nothing is queued any more), or `wait` passes (`false`). A broker
    /// uses it to pace a publisher to a subscriber that is falling behind, long before
    /// anything is at a limit.
    pub async fn wait_below(&self, bytes: usize, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let written = self.shared.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if self.queued_bytes() <= bytes {
                return true;
            }
            let stopped = self.shared.writer_done.wait();
            tokio::select! {
                _ = written => {}
                _ = stopped => return true,
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Queues `frame` now if there is room, otherwise from a task that waits for room:
    /// for frames a caller cannot wait for (a cancel sent from `Drop`, an unsubscribe).
    /// Fails at once only when the frame is too large or the connection is closed.
    /// [`FrameSender::settle`] waits for the sends still waiting.
    pub fn send_soon(&self, frame: Frame) -> Result<(), ConnectionError> {
        match self.try_send(frame) {
            Ok(()) => Ok(()),
            Err(TrySendError::Failed(e)) => Err(e),
            Err(TrySendError::Full(frame)) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    // No runtime to wait on (a drop outside tokio): the connection's own
                    // tasks are gone too.
                    return Err(self.shared.closed_error());
                };
                let sender = self.clone();
                self.shared.soon.spawn_on(
                    async move {
                        if let Err(e) = sender.send_or_abort(frame).await {
                            tracing::debug!(error = %e, "queued send failed");
                        }
                    },
                    &runtime,
                );
                Ok(())
            }
        }
    }

    /// Resolves once every send started by [`FrameSender::send_soon`] has queued its
    /// frame (or failed).
    pub async fn settle(&self) {
        self.shared.soon.wait().await;
    }

    /// Lowers the largest frame this side sends to `peer_limit`, the limit the peer
    /// stated when it connected (`0`: not stated, nothing changes). Frames over it are
    /// refused with [`ConnectionError::FrameTooLarge`] before they are queued, instead of
    /// reaching a peer that would close the connection over them.
    pub fn limit_frame_len(&self, peer_limit: usize) {
        if peer_limit > 0 {
            self.shared
                .max_frame_len
                .fetch_min(peer_limit, Ordering::Relaxed);
        }
    }

    /// The largest frame body this side sends now.
    pub fn max_frame_len(&self) -> usize {
        self.shared.max_frame_len.load(Ordering::Relaxed)
    }

    /// Adds `bytes` to the queued bytes once they fit under `max_queued_bytes` (or the
    /// queue is empty), waiting for the writer to make room.
    async fn reserve_bytes(&self, bytes: usize) -> Result<(), ConnectionError> {
        let try_reserve = || self.shared.try_reserve(bytes);
        // The common case, room now, registers no waiter.
        if try_reserve() {
            return Ok(());
        }
        loop {
            // Registered before trying again, so that a write in between is not missed.
            let written = self.shared.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if try_reserve() {
                return Ok(());
            }
            tokio::select! {
                _ = written => {}
                _ = self.shared.writer_done.wait() => return Err(self.shared.closed_error()),
            }
        }
    }

    /// Checks `frame` against the limits; returns what it adds to the queued bytes.
    fn check(&self, frame: &Frame) -> Result<usize, ConnectionError> {
        self.check_open()?;
        self.check_len(frame)
    }

    /// [`ConnectionError::Closed`], with the reason it closed, once the connection is
    /// closed.
    fn check_open(&self) -> Result<(), ConnectionError> {
        if self.shared.close.is_set() {
            return Err(self.shared.closed_error());
        }
        Ok(())
    }

    /// Checks `frame` against the maximum frame length (and its fields against their
    /// wire types); returns what it adds to the queued bytes.
    fn check_len(&self, frame: &Frame) -> Result<usize, ConnectionError> {
        check_frame_len(frame, self.max_frame_len()).map(|len| queued_cost(len + LENGTH_PREFIX_LEN))
    }

    /// Bytes queued and not yet written to the stream (frames waiting for the writer,
    /// and those in its buffer, which holds at most 256 KiB plus one frame, or plus one
    /// batch of frames their sender encoded).
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Relaxed)
    }

    /// Resolves once the peer has read every frame queued before this call: sends a ping
    /// and waits for its pong. A bus client's `flush` is this round trip.
    ///
    /// Fails with [`ConnectionError::Closed`] if the connection closes first.
    ///
    /// ```
    /// use rpc_core::connection::{self, ConnectionConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (a, b) = tokio::io::duplex(1024);
    /// let config = ConnectionConfig::default();
    /// let (mut a_reader, a_sender) = connection::start(a, &config);
    /// let (mut b_reader, _b_sender) = connection::start(b, &config);
    /// // Both readers must be polled: b's answers the ping, a's receives the pong.
    /// tokio::spawn(async move { while let Some(_) = b_reader.next().await {} });
    /// tokio::spawn(async move { while let Some(_) = a_reader.next().await {} });
    /// a_sender.round_trip().await.unwrap();
    /// # }
    /// ```
    pub async fn round_trip(&self) -> Result<(), ConnectionError> {
        let nonce = self.shared.next_nonce();
        let (done, answered) = oneshot::channel();
        match crate::sync::lock(&self.shared.round_trips).as_mut() {
            Some(waiting) => waiting.push((nonce, done)),
            None => return Err(self.shared.closed_error()),
        }
        self.send(Frame::Ping { nonce }).await?;
        // The reader drops the waiter when it stops; the writer stopping means the ping
        // may never have left.
        tokio::select! {
            answered = answered => answered.map_err(|_| self.shared.closed_error()),
            _ = self.closed() => Err(self.shared.closed_error()),
        }
    }

    /// Writes what is already queued, then closes the connection.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Sends `go_away` after what is already queued, then closes the connection. `reason`
    /// is what local users of the connection see as the cause.
    pub fn close_with(&self, go_away: GoAway, reason: &ConnectionError) {
        self.shared.record_error(reason);
        // The queue may be full of frames for a peer that stopped reading; the go-away is
        // best effort then, and the close happens regardless. Counted like any frame, since
        // the writer subtracts what it writes.
        let frame = Frame::GoAway(go_away);
        // Checked as every queued frame is (the writer counts on it): a go-away too
        // large to send is left out, and the connection closes without it.
        let cost = match self.check_len(&frame) {
            Ok(cost) => cost,
            Err(e) => {
                tracing::warn!(error = %e, "go-away not sent");
                self.shared.close();
                return;
            }
        };
        self.shared.queued_bytes.fetch_add(cost, Ordering::Relaxed);
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_push(frame).is_err() {
            self.unqueued(cost);
        }
        self.shared.close();
    }

    /// Closes the connection now: frames still queued are discarded, and `go_away` is
    /// written only if the stream takes it at once (a peer that stopped reading never
    /// gets it). For a peer that does not keep up, where [`Self::close_with`] would wait
    /// behind everything the peer is not reading. `reason` is what local users see.
    pub fn abort_with(&self, go_away: GoAway, reason: &ConnectionError) {
        self.shared.record_error(reason);
        let _ = self.shared.abort_go_away.set(go_away);
        self.shared.abort.set();
        self.shared.close(); // wakes the writer
    }

    /// Whether `other` feeds the same connection as `self`.
    pub fn same_connection(&self, other: &FrameSender) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Resolves once the writer stopped: the connection is closed for writing.
    pub async fn closed(&self) {
        self.shared.writer_done.wait().await;
    }
}

/// Why [`FrameSender::send_or_give_back`] did not queue a frame.
#[derive(Debug)]
pub enum Unsent {
    /// The connection is closed (`reason`, as [`ConnectionError::Closed`] gives it); the
    /// frame is handed back.
    Closed {
        /// Why the connection closed.
        reason: Arc<str>,
        /// The frame, unsent.
        frame: Frame,
    },
    /// The frame is refused (over the frame limit).
    Failed(ConnectionError),
}

impl Unsent {
    fn new(error: ConnectionError, frame: Frame) -> Unsent {
        match error {
            ConnectionError::Closed { reason } => Unsent::Closed { reason, frame },
            other => Unsent::Failed(other),
        }
    }
}

impl From<Unsent> for ConnectionError {
    /// The error alone, for a caller that does not keep the frame.
    fn from(unsent: Unsent) -> ConnectionError {
        match unsent {
            Unsent::Closed { reason, .. } => ConnectionError::Closed { reason },
            Unsent::Failed(error) => error,
        }
    }
}

/// Why [`FrameSender::try_send_or_give_back`] did not queue a frame.
#[derive(Debug)]
pub enum TryUnsent {
    /// No room now; the frame is handed back, for
    /// [`FrameSender::send_or_give_back`] to wait for room.
    Full(Frame),
    /// The connection is closed (the frame is handed back) or the frame is refused, as
    /// [`FrameSender::send_or_give_back`] says.
    Unsent(Unsent),
}

impl From<TryUnsent> for TrySendError {
    /// The frame back when there is no room; the error alone otherwise (a closed
    /// connection's frame is not kept), as [`FrameSender::try_send`] reports it.
    fn from(unsent: TryUnsent) -> TrySendError {
        match unsent {
            TryUnsent::Full(frame) => TrySendError::Full(frame),
            TryUnsent::Unsent(unsent) => TrySendError::Failed(unsent.into()),
        }
    }
}

/// Why [`FrameSender::try_send`] did not queue a frame.
#[derive(Debug)]
pub enum TrySendError {
    /// The queue is full right now; the frame is handed back.
    Full(Frame),
    /// The frame is refused (too large) or the connection is closed.
    Failed(ConnectionError),
}

/// Why a frame was not added to a batch ([`FrameSender::try_encode_into`]), or a batch
/// not sent ([`FrameSender::send_encoded_within`]).
#[derive(Debug)]
pub enum BatchError {
    /// No room on the connection (`max_queued_bytes`, or the send queue): now, or
    /// within the wait.
    Full,
    /// The frame is refused (over the frame limit), or the connection is closed.
    Failed(ConnectionError),
}

/// Frames encoded ahead of sending, in order, by a sender that gathers a batch itself
/// ([`FrameSender::try_encode_into`]), then written or queued as one
/// ([`FrameSender::send_encoded_within`]): a server's answers to the requests of one
/// read, a broker's messages to one subscriber from one read of a publisher.
///
/// A batch is bound to no connection; frames are checked against the connection that
/// encodes them, so a batch is meant for one connection at a time. See
/// [`FrameSender::try_encode_into`] for an example.
#[derive(Debug)]
pub struct EncodedFrames {
    buf: BytesMut,
    frames: usize,
    /// The most room its buffer keeps between batches.
    keep: usize,
}

impl Default for EncodedFrames {
    fn default() -> Self {
        EncodedFrames {
            buf: BytesMut::new(),
            frames: 0,
            keep: Self::KEEP,
        }
    }
}

impl EncodedFrames {
    /// What a batch keeps of its buffer between batches by default: a larger one is
    /// given back, so that a connection that once sent a large batch does not hold it
    /// while idle. A batch of this size or more is queued in its own buffer, not copied.
    const KEEP: usize = 16 * 1024;

    /// A batch with room for `capacity` bytes, which it keeps between batches (a default
    /// batch keeps at most 16 KiB): for a sender that pools its batches and reuses them
    /// for one connection after another. Such a batch neither grows its buffer nor gives
    /// it back each time, which under load costs a copy per growth and, with the
    /// system allocator, the pages the allocator hands back to the system and takes
    /// again. When queued, the frames of a batch with room for more than 16 KiB are
    /// copied, and the buffer stays.
    ///
    /// ```
    /// use rpc_core::connection::EncodedFrames;
    ///
    /// let batch = EncodedFrames::with_capacity(64 * 1024);
    /// assert!(batch.is_empty());
    /// assert!(batch.capacity() >= 64 * 1024);
    /// ```
    pub fn with_capacity(capacity: usize) -> Self {
        EncodedFrames {
            buf: BytesMut::with_capacity(capacity),
            frames: 0,
            keep: capacity.max(Self::KEEP),
        }
    }

    /// The room its buffer has, in bytes.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Frames in the batch.
    pub fn len(&self) -> usize {
        self.frames
    }

    /// Whether it holds no frame.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Encoded bytes, length prefixes included.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// What the batch counts for in a connection's queued bytes once sent.
    fn cost(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            queued_cost(self.buf.len())
        }
    }

    /// The frames, for a queue item, leaving the batch empty. A queued item holds no
    /// more memory than its frames, which is what it is counted for: frames of
    /// [`Self::KEEP`] bytes or more keep the batch's buffer, cut to their length (the
    /// allocator shrinks it in place: no copy), and the batch starts a new one; smaller
    /// ones are copied, and the buffer kept for the next batch. A batch made
    /// [`EncodedFrames::with_capacity`] with room for more than [`Self::KEEP`] bytes
    /// always has its frames copied: it keeps its buffer.
    fn take_frames(&mut self) -> BytesMut {
        let frames = if self.buf.len() >= Self::KEEP && self.keep == Self::KEEP {
            let mut frames = Vec::from(std::mem::take(&mut self.buf));
            frames.shrink_to_fit();
            BytesMut::from(bytes::Bytes::from(frames))
        } else {
            BytesMut::from(&self.buf[..])
        };
        self.clear();
        frames
    }

    /// Drops the frames, unsent, and keeps the buffer as sending them would: the batch
    /// is empty, ready for the next one.
    pub fn clear(&mut self) {
        self.frames = 0;
        if self.buf.capacity() > self.keep {
            self.buf = BytesMut::new();
        } else {
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests;
