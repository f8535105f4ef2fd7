//! The read side: decodes frames, answers pings, watches for a dead peer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::{ConnectionConfig, FrameSender, Shared};
use crate::codec::FrameCodec;
use crate::error::{ConnectionError, ProtocolError};
use crate::frame::{Frame, GoAway, Kind, OkResponseHead, Request, RequestHead};
use crate::{Metadata, Utf8Bytes};

/// The read half of a connection; see [`super::start`].
///
/// Call [`FrameReader::next`] in a loop. Pings and pongs are handled here and never
/// returned. A reader that is not polled does not read: that is how a server applies
/// backpressure to a peer.
#[derive(Debug)]
pub struct FrameReader<R> {
    framed: FramedRead<Metered<R>, FrameCodec>,
    /// The same codec, for frames decoded straight from `framed`'s buffer.
    decoder: FrameCodec,
    /// Reading into [`MAX_READ`]-byte buffers (see [`FrameReader::size_buffer`]).
    wide: bool,
    sender: FrameSender,
    shared: Arc<Shared>,
    writer_done: WriterDone,
    keepalive: Keepalive,
    /// A ping read whose pong is not queued yet: a [`FrameReader::next`] dropped while
    /// the pong waited for room leaves it to the next call.
    unanswered_ping: Option<u64>,
    finished: bool,
}

/// The read buffer of a quiet connection, and of a new one.
pub(super) const MIN_READ: usize = 8 * 1024;
/// The read buffer of a busy one: one system call reads up to this many bytes.
pub(super) const MAX_READ: usize = 64 * 1024;

/// The read half, noting whether a read filled all the room it was given (the peer had
/// more to say than the buffer took).
#[derive(Debug)]
struct Metered<R> {
    inner: R,
    /// Set by such a read, taken by [`FrameReader::size_buffer`].
    filled: bool,
    /// Whether the last read filled its room.
    last_filled: bool,
}

impl<R: AsyncRead + Unpin> AsyncRead for Metered<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let room = buf.remaining();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.last_filled = room > 0 && buf.remaining() == 0;
            self.filled |= self.last_filled;
        }
        polled
    }
}

/// Answers a ping. A closed sender means the connection is going down; the reader's
/// next poll sees that. A peer that pings but reads no pongs is cut off after
/// keepalive_timeout.
async fn pong(sender: &FrameSender, nonce: u64) {
    let _ = sender.send_or_abort(Frame::Pong { nonce }).await;
}

/// What [`FrameReader::sort`] made of a frame.
enum Sorted {
    /// A frame for the caller of [`FrameReader::next`].
    Caller(Frame),
    /// A ping, to answer with this nonce.
    Ping(u64),
    /// A pong, taken.
    Taken,
}

/// Dead-peer detection without reading the clock per frame: a flag set by every frame,
/// inspected once per interval.
#[derive(Debug)]
struct Keepalive {
    /// The next inspection.
    tick: Pin<Box<Sleep>>,
    /// The waker `tick` was last polled with (see [`Registered`]).
    registered: Registered,
    interval: Duration,
    timeout: Duration,
    idle: Duration,
    seen: bool,
}

impl Keepalive {
    /// Ready once per interval, counted from the inspection before (a late one delays
    /// the next). The timer is polled only when it fired or another task waits on it.
    fn poll_tick(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let fired = self.tick.is_elapsed();
        std::task::ready!(self.registered.poll(fired, self.tick.as_mut(), cx));
        self.tick.as_mut().reset(Instant::now() + self.interval);
        Poll::Ready(())
    }
}

/// Waits for the connection's writer to stop (its `writer_done` latch).
#[derive(Debug)]
struct WriterDone {
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker `stopped` was last polled with.
    registered: Registered,
}

impl WriterDone {
    fn new(shared: &Shared) -> Self {
        WriterDone {
            stopped: Box::pin(shared.writer_done.wait_owned()),
            registered: Registered::default(),
        }
    }

    /// Ready once the writer stopped; `shared` is the connection's, whose latch says so
    /// with one load.
    fn poll(&mut self, shared: &Shared, cx: &mut Context<'_>) -> Poll<()> {
        let fired = shared.writer_done.is_set();
        self.registered.poll(fired, self.stopped.as_mut(), cx)
    }
}

/// The waker a future that fires once (a timer, a cancellation) was last polled with.
/// Such a future keeps the waker it was given, and wakes it when it fires; until then,
/// polling it again with the same waker only registers that waker anew. A reader polls
/// two of them each time it waits for the peer, and registering anew cost it 240 to 270
/// instructions per wait (callgrind, `courier bench bus --only req_seq`): they are
/// polled again only when they fired, or when the waker differs (another task, or a
/// caller's own waker, as a poll that must not wait gives).
#[derive(Debug, Default)]
struct Registered(Option<Waker>);

impl Registered {
    /// Polls `future`, whose waker this is, unless it is pending with a waker that wakes
    /// `cx`'s task already and has not `fired` (as its owner can tell with one load).
    fn poll<F: Future + ?Sized>(
        &mut self,
        fired: bool,
        future: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        let holds = |registered: &Option<Waker>, cx: &Context<'_>| {
            registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        };
        if !fired && holds(&self.0, cx) {
            return Poll::Pending;
        }
        let polled = future.poll(cx);
        if polled.is_ready() {
            self.0 = None; // to be polled again, for its next wait
        } else if !holds(&self.0, cx) {
            self.0 = Some(cx.waker().clone());
        }
        polled
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(super) fn new(
        read: R,
        codec: FrameCodec,
        sender: FrameSender,
        config: &ConnectionConfig,
        shared: Arc<Shared>,
    ) -> Self {
        let interval = config
            .keepalive_interval
            .min(config.keepalive_timeout)
            .max(Duration::from_millis(1));
        let tick = Box::pin(tokio::time::sleep_until(Instant::now() + interval));
        FrameReader {
            decoder: FrameCodec::new(codec.max_frame_len()),
            framed: FramedRead::with_capacity(
                Metered {
                    inner: read,
                    filled: false,
                    last_filled: false,
                },
                codec,
                MIN_READ,
            ),
            wide: false,
            sender,
            writer_done: WriterDone::new(&shared),
            shared,
            unanswered_ping: None,
            keepalive: Keepalive {
                tick,
                registered: Registered::default(),
                interval,
                timeout: config.keepalive_timeout,
                idle: Duration::ZERO,
                seen: false,
            },
            finished: false,
        }
    }

    /// Whether a whole frame other than a ping or pong waits to be decoded:
    /// [`FrameReader::next`] will return it without waiting for the peer. (A ping or pong
    /// it takes itself, and may then wait for more.)
    pub fn has_frame(&self) -> bool {
        let buf = self.framed.read_buffer();
        let prefix = crate::codec::LENGTH_PREFIX_LEN;
        // the body starts with the version, then the kind
        match (crate::codec::announced_len(buf), buf.get(prefix + 1)) {
            (Some(len), Some(&kind)) => {
                buf.len() - prefix >= len && kind != Kind::Ping as u8 && kind != Kind::Pong as u8
            }
            _ => false,
        }
    }

    /// Whether more is likely at hand without waiting for the peer: a whole frame is
    /// buffered ([`FrameReader::has_frame`]), or the last read from the stream filled
    /// all the room it had (the peer had more to say than it took). When neither holds,
    /// [`FrameReader::next`] would most likely find the stream empty: a reader that
    /// sends what it gathered from one read (a broker's messages) sends it first.
    pub fn may_have_more(&self) -> bool {
        self.has_frame() || self.framed.get_ref().last_filled
    }

    /// The next frame, taken straight from the read buffer when it is a request
    /// without metadata whose bytes are all buffered and whose method name `route`
    /// knows: the request, with `route`'s answer for the name, and no [`Frame`] made on
    /// the way (a server's read loop routes the call as it takes it). `None` leaves
    /// everything as it was: [`FrameReader::next`] then returns that frame, or the
    /// error it makes, as it always did.
    ///
    /// `route` is given the name's bytes, which need not be UTF-8, and answers with its
    /// own `'static` string equal to them, which names the request: the name's bytes
    /// are neither checked nor held.
    pub(crate) fn take_request<T>(
        &mut self,
        route: impl FnOnce(&[u8]) -> Option<(T, &'static str)>,
    ) -> Option<(Request, T)> {
        let body = self.buffered_body()?;
        let head = RequestHead::parse(body)?;
        let name = &body[head.method];
        let (routed, method) = route(name)?;
        debug_assert_eq!(method.as_bytes(), name);
        let payload = self.take_body(body.len(), head.payload);
        let request = Request {
            id: head.id,
            timeout: head.timeout,
            method: Utf8Bytes::from_static(method),
            metadata: Metadata::new(),
            payload,
        };
        Some((request, routed))
    }

    /// The next frame, taken straight from the read buffer when it is an answer with
    /// status OK and no message whose bytes are all buffered: the call id and the
    /// payload, with no [`Frame`] made on the way (a client's read loop hands the
    /// payload to the caller). `None` leaves everything as it was:
    /// [`FrameReader::next`] then returns that frame, or the error it makes, as it
    /// always did.
    pub(crate) fn take_ok_response(&mut self) -> Option<(u64, Bytes)> {
        let body = self.buffered_body()?;
        let head = OkResponseHead::parse(body)?;
        let payload = self.take_body(body.len(), OkResponseHead::LEN);
        Some((head.id, payload))
    }

    /// The body of the next frame, for a caller to read in place, when the frame is all
    /// buffered and within the frame limit and nothing comes before it (a pong still to
    /// send, the end of the connection). `None` when [`FrameReader::next`] has to
    /// decide.
    fn buffered_body(&self) -> Option<&[u8]> {
        if self.finished || self.unanswered_ping.is_some() {
            return None;
        }
        let buf = self.framed.read_buffer();
        let prefix = crate::codec::LENGTH_PREFIX_LEN;
        let len = crate::codec::announced_len(buf)?;
        if len > self.decoder.max_frame_len() || buf.len() - prefix < len {
            return None;
        }
        Some(&buf[prefix..prefix + len])
    }

    /// Takes the frame [`FrameReader::buffered_body`] found, of a `len`-byte body, off
    /// the read buffer; returns its payload, the body from `payload_at` on.
    fn take_body(&mut self, len: usize, payload_at: usize) -> Bytes {
        let prefix = crate::codec::LENGTH_PREFIX_LEN;
        let mut payload = self
            .framed
            .read_buffer_mut()
            .split_to(prefix + len)
            .freeze();
        bytes::Buf::advance(&mut payload, prefix + payload_at);
        self.keepalive.seen = true;
        payload
    }

    /// The next frame other than ping and pong.
    ///
    /// `None` after a clean close (end of stream between frames, or after an error was
    /// returned once). `Some(Err(_))` when the connection failed: an I/O error, an end of
    /// stream inside a frame, a frame that is oversized or cannot be decoded (the peer is
    /// sent a go-away naming the problem), or a peer silent past the keepalive timeout.
    ///
    /// Cancel safe: a frame is taken from the buffer only when it is returned, and a ping
    /// whose pong was still waiting for room in the send queue is answered by the next
    /// call, before anything more is read.
    pub async fn next(&mut self) -> Option<Result<Frame, ConnectionError>> {
        if self.finished {
            return None;
        }
        loop {
            if let Some(nonce) = self.unanswered_ping {
                pong(&self.sender, nonce).await;
                self.unanswered_ping = None;
            }
            self.size_buffer();
            // A frame whose bytes are all buffered is decoded here, without the select
            // below: biased to the stream, it would return that frame first anyway, but
            // setting it up and polling it cost a busy connection more than decoding the
            // frame did. Only when the buffer runs short does the reader wait, and look
            // at the timer and the writer.
            let buffered = self.decoder.decode(self.framed.read_buffer_mut());
            match buffered {
                Ok(Some(frame)) => {
                    match self.sort(frame) {
                        Sorted::Caller(frame) => return Some(Ok(frame)),
                        // answered at the top of the loop, before the next frame
                        Sorted::Ping(nonce) => self.unanswered_ping = Some(nonce),
                        Sorted::Taken => {}
                    }
                    continue;
                }
                Ok(None) => {}
                Err(error) => return Some(Err(self.fail(error))),
            }
            tokio::select! {
                biased;
                item = self.framed.next() => match item {
                    Some(Ok(frame)) => match self.sort(frame) {
                        Sorted::Caller(frame) => return Some(Ok(frame)),
                        Sorted::Ping(nonce) => self.unanswered_ping = Some(nonce),
                        Sorted::Taken => {}
                    },
                    Some(Err(error)) => return Some(Err(self.fail(error))),
                    None => {
                        self.finished = true;
                        self.shared.reader_done();
                        return None;
                    }
                },
                () = std::future::poll_fn(|cx| self.keepalive.poll_tick(cx)) => {
                    self.shrink_buffer();
                    let ka = &mut self.keepalive;
                    if std::mem::take(&mut ka.seen) {
                        ka.idle = Duration::ZERO;
                    } else {
                        ka.idle += ka.interval;
                        if ka.idle >= ka.timeout {
                            let error = ConnectionError::KeepaliveTimeout { timeout: ka.timeout };
                            return Some(Err(self.fail(error)));
                        }
                    }
                }
                () = std::future::poll_fn(|cx| self.writer_done.poll(&self.shared, cx)) => {
                    // The writer stopped (write error, or a local close): nothing more
                    // can be answered on this connection.
                    self.finished = true;
                    self.shared.reader_done();
                    return match self.shared.error.get() {
                        Some(_) => Some(Err(self.shared.closed_error())),
                        None => None,
                    };
                }
            }
        }
    }

    /// Marks the peer as alive and takes a pong; says whether the frame is the caller's
    /// or a ping to answer. Not async: a frame for the caller, nearly every one, costs no
    /// future of its own.
    fn sort(&mut self, frame: Frame) -> Sorted {
        self.keepalive.seen = true;
        match frame {
            Frame::Ping { nonce } => Sorted::Ping(nonce),
            Frame::Pong { nonce } => {
                self.shared.pong(nonce);
                Sorted::Taken
            }
            frame => Sorted::Caller(frame),
        }
    }

    /// Sizes the read buffer to the traffic, before the next read. A new connection
    /// reads into [`MIN_READ`] bytes; the first read that fills all the room it was given
    /// (the peer had more to say) moves it to [`MAX_READ`]: the buffer is replaced by
    /// one of that size, holding the bytes of a frame not yet complete, and the codec
    /// takes buffers of that size from then on whenever one is full. Frames already
    /// decoded keep their bytes: they share the old buffer. A connection that goes quiet
    /// gets a small buffer back ([`FrameReader::shrink_buffer`]).
    fn size_buffer(&mut self) {
        if std::mem::take(&mut self.framed.get_mut().filled) && !self.wide {
            self.wide = true;
            let buf = self.framed.read_buffer_mut();
            let mut fresh = BytesMut::with_capacity(MAX_READ + buf.len());
            fresh.extend_from_slice(buf);
            *buf = fresh;
        }
    }

    /// Once per keepalive interval: an empty buffer that is wide (whatever room is left
    /// in it: it holds its whole allocation) or larger than [`MIN_READ`] is given back,
    /// so that a connection that went idle holds little memory. A busy one, whose buffer
    /// is seldom empty, regrows it with its next full read.
    fn shrink_buffer(&mut self) {
        let buf = self.framed.read_buffer_mut();
        if buf.is_empty() && (self.wide || buf.capacity() > MIN_READ) {
            *buf = BytesMut::with_capacity(MIN_READ);
            self.wide = false;
        }
    }

    /// The read buffer's capacity now.
    #[cfg(test)]
    pub(super) fn read_capacity(&self) -> usize {
        self.framed.read_buffer().capacity()
    }

    /// Whether the codec takes [`MAX_READ`]-byte buffers now.
    #[cfg(test)]
    pub(super) fn is_wide(&self) -> bool {
        self.wide
    }

    /// Ends the connection because of `error`: tells the peer why when it is the peer's
    /// fault, records the cause, and asks the writer to close.
    fn fail(&mut self, error: ConnectionError) -> ConnectionError {
        self.finished = true;
        self.shared.reader_done();
        let code = match &error {
            ConnectionError::FrameTooLarge { .. } => Some(GoAway::FRAME_TOO_LARGE),
            ConnectionError::Protocol(_) => Some(GoAway::PROTOCOL_ERROR),
            ConnectionError::KeepaliveTimeout { .. } => Some(GoAway::KEEPALIVE_TIMEOUT),
            _ => None,
        };
        match code {
            Some(code) => {
                tracing::warn!(error = %error, "closing connection");
                self.sender
                    .close_with(GoAway::new(code, error.to_string()), &error);
            }
            None => {
                tracing::debug!(error = %error, "connection failed");
                self.shared.record_error(&error);
                self.sender.close();
            }
        }
        error
    }

    /// Ends the connection because the peer sent a well-formed frame that is not allowed
    /// here; returns the error for the caller to report.
    pub fn protocol_violation(&mut self, error: ProtocolError) -> ConnectionError {
        self.fail(ConnectionError::Protocol(error))
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::{MAX_READ, MIN_READ};
    use crate::connection::{ConnectionConfig, start};

    #[tokio::test]
    async fn an_idle_wide_reader_gives_back_its_allocation_even_when_little_room_is_left() {
        let (a, _b) = tokio::io::duplex(64);
        let (mut reader, _sender) = start(a, &ConnectionConfig::default());
        // An empty buffer that is the last 100 bytes of a 64 KiB allocation, whose
        // frames are all decoded: it keeps the whole allocation alive.
        let mut wide = BytesMut::with_capacity(MAX_READ);
        wide.resize(MAX_READ - 100, 0);
        let _decoded = wide.split_to(MAX_READ - 100);
        *reader.framed.read_buffer_mut() = wide;
        reader.wide = true;
        reader.shrink_buffer();
        assert!(!reader.wide);
        assert_eq!(reader.framed.read_buffer().capacity(), MIN_READ);
    }
}
