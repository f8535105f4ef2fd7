//! One server connection: reads requests, runs each through [`InFlight`], writes the
//! answers.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::call::{InFlight, Responder, Started};
use super::{CallBox, CallContext, Copies, Listed, ServerConfig, ServiceError, Shared};
use crate::connection::{self, EncodedFrames, FrameReader, FrameSender, Io, TrySendError};
use crate::error::{ConnectionError, ProtocolError};
use crate::format::Encoded;
use crate::frame::{Frame, GoAway, Request, Response, Status};
use crate::transport::PeerAddr;

/// Answers a connection over the limit with a go-away naming the limit, then closes it.
pub(super) async fn refuse<T: Io>(io: T, peer: PeerAddr, server: Arc<Shared>) {
    let limit = server.config.max_connections;
    tracing::warn!(%peer, limit, "refusing connection: at max_connections");
    let message =
        format!("server is at its connection limit of {limit} (ServerConfig::max_connections)");
    let go_away = GoAway::new(GoAway::TOO_MANY_CONNECTIONS, message);
    connection::refuse(io, &server.config.connection, go_away).await;
}

/// Serves one connection until it closes. `drain` starts a graceful shutdown of it;
/// `abort` ends the grace period.
pub(super) async fn serve<T: Io>(
    io: T,
    peer: PeerAddr,
    server: Arc<Shared>,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let config: &ServerConfig = &server.config;
    let (mut reader, sender) = connection::start(io, &config.connection);
    let conn = Conn {
        server: server.clone(),
        answers: Answers {
            sender: sender.clone(),
            abort: abort.clone(),
        },
        peer: Arc::new(peer),
        calls: InFlight::new(),
        slots: Arc::new(Semaphore::new(config.max_calls_in_flight.max(1))),
    };
    tracing::info!(peer = %conn.peer, "connection opened");

    // Serving: read, run, answer, until the peer leaves or the server drains. The drain
    // future is pinned once: a fresh `cancelled()` per frame would register a waiter each
    // time. A frame already read is taken before the drain is looked at (polling the
    // token takes its locks), so a busy connection checks the drain only when it runs out
    // of frames, and at least once every DRAIN_CHECK frames.
    let draining = drain.cancelled();
    tokio::pin!(draining);
    // The in-flight slot for the next call. A call answered at once leaves it here for
    // the one after, so only calls that become tasks cost the semaphore anything.
    let mut slot: Option<OwnedSemaphorePermit> = None;
    // The box the next call's future is made in: a call answered at once leaves it here
    // for the next, so only calls that become tasks allocate one.
    let mut into = CallBox::new();
    // This connection's copies of the services it calls (`Service::local_copy`).
    let mut copies = Copies::default();
    // Answers to the requests of one read, encoded as they are made and sent together
    // once no whole request is left to read (see `Answers::flush`).
    let mut batch = EncodedFrames::default();
    // Whether this batch has had its one more read (see below).
    let mut gathered = false;
    let mut frames = 0u32;
    // When the requests of the current read were taken in: read from the clock once per
    // read, at its first request, and the start of each of their deadlines. A later
    // request of the read thus starts its deadline a little earlier than a clock read of
    // its own would (by the time its predecessors took), never later.
    let mut received: Option<Instant> = None;
    // Whether no answer of the current read has been sent yet (see FIRST_BATCH_FRAMES).
    let mut first_of_read = true;
    // Whether the server's last read before this connection's current one was this
    // connection's too (see FIRST_BATCH_FRAMES).
    let reads = Reads::new(&server.last_reader);
    let mut read_alone = false;
    // The listed method of the last request taken in place (`FrameReader::take_request`).
    let mut last_listed: Option<Listed<'_>> = None;
    let ended: Option<ConnectionError> = 'serve: loop {
        frames = frames.wrapping_add(1);
        if frames.is_multiple_of(DRAIN_CHECK) && drain.is_cancelled() {
            break None;
        }
        if batch.is_empty() {
            gathered = false;
        }
        // Whether a whole request is buffered: the next frame needs no read. Nothing
        // below changes that until the frame is taken (a `poll_once` is made only when
        // none is, and one that would wait has found no whole frame either).
        let buffered = reader.has_frame();
        if !buffered {
            // The next request comes from a read still to be made.
            received = None;
            first_of_read = true;
        }
        let mut more = None;
        if !batch.is_empty() && !buffered {
            // Nothing more to answer without waiting for the peer. A busy connection
            // (several answers from one read) first lets the runtime poll for I/O once
            // and reads again without waiting: the peer's next requests are often on
            // their way, and their answers then share this write. Fewer, larger writes
            // mean fewer syscalls and wake-ups on both sides; a lone answer (one call
            // in flight) is never held back.
            if batch.len() > 1 && !gathered {
                gathered = true;
                tokio::task::yield_now().await;
                // `next` is cancel safe: if it would wait, nothing read is lost.
                more = poll_once(reader.next()).await;
            }
            // Anything but a frame (nothing yet, the end, an error) sends the batch first.
            if !matches!(more, Some(Some(Ok(_)))) {
                conn.answers.flush(&mut batch).await;
            }
        }
        // The next request, and its route when it was taken in place. A request of a
        // listed method (every method of a generated service) whose bytes are all
        // buffered is taken from the buffer and routed as it is read, with no `Frame`
        // made; anything else `next` returns (without waiting when a whole frame is
        // buffered). The drain is looked at every DRAIN_CHECK frames.
        let (request, route) = 'taken: {
            let frame = match more {
                Some(frame) => frame,
                None if buffered => {
                    let routed = reader.take_request(|name| {
                        // A connection calls the same method again and again, most of
                        // the time.
                        let listed = last_listed
                            .filter(|last| **last.name == *name)
                            .or_else(|| server.listed(name))?;
                        last_listed = Some(listed);
                        Some((listed, listed.path()?))
                    });
                    if let Some((request, listed)) = routed {
                        break 'taken (request, Some(listed));
                    }
                    reader.next().await
                }
                None => tokio::select! {
                    biased;
                    frame = reader.next() => frame,
                    _ = &mut draining => break 'serve None,
                },
            };
            match frame {
                Some(Ok(Frame::Request(request))) => (request, None),
                Some(Ok(frame)) => {
                    if let Err(e) = conn.on_other_frame(frame) {
                        break 'serve Some(reader.protocol_violation(e));
                    }
                    continue 'serve;
                }
                Some(Err(e)) => break 'serve Some(e),
                None => {
                    break 'serve Some(ConnectionError::Closed {
                        reason: "peer closed the connection".into(),
                    });
                }
            }
        };
        // A peer whose requests fill every read is served in turns with the
        // runtime's other tasks: each request spends a unit of the coop budget
        // (as waiting for a slot did), and the loop yields when it runs out.
        tokio::task::consume_budget().await;
        // Backpressure: at the in-flight limit, stop reading until a call ends.
        if slot.is_none() {
            slot = match conn.slots.clone().try_acquire_owned() {
                Ok(free) => Some(free),
                Err(_) => {
                    // What was answered goes out before this waits.
                    conn.answers.flush(&mut batch).await;
                    tokio::select! {
                        biased;
                        _ = &mut draining => {
                            conn.refuse_shutting_down(request.id).await;
                            break None;
                        }
                        freed = conn.slots.clone().acquire_owned() => match freed {
                            Ok(freed) => Some(freed),
                            Err(_) => break None, // never closed
                        },
                    }
                }
            };
        }
        let id = request.id;
        // The read's first request: the clock is read, and the read noted as the
        // server's last.
        let now = *received.get_or_insert_with(|| {
            read_alone = reads.begin();
            Instant::now()
        });
        match conn.start_call(request, route, now, &mut into, &mut copies, &mut slot) {
            // Answered here, and sent with the others of its read: a peer that
            // does not read its answers stops being read once a batch finds no
            // room (see `Answers::flush`).
            Ok(Started::Answered(result)) => {
                if let Err(e) = conn.answers.add(&mut batch, id, result) {
                    conn.answers.not_added(&mut batch, id, e).await;
                }
                // A connection reading alone sends the first answers of a long
                // read early (see FIRST_BATCH_FRAMES).
                let early = first_of_read
                    && read_alone
                    && batch.len() >= FIRST_BATCH_FRAMES
                    && reader.has_frame();
                if early || batch.len() >= BATCH_FRAMES || batch.bytes() >= BATCH_BYTES {
                    first_of_read = false;
                    conn.answers.flush(&mut batch).await;
                }
            }
            Ok(Started::Running) => {}
            Err(e) => break Some(reader.protocol_violation(e)),
        }
    };
    drop(slot);
    drop(into);

    match ended {
        Some(reason) => {
            // The peer is gone or broke the protocol: nobody will read the answers (the
            // batch's among them).
            tracing::info!(peer = %conn.peer, %reason, "connection closed");
            conn.calls.abort_all();
        }
        None => {
            // Answered before the drain began: they go out before the go-away.
            conn.answers.flush(&mut batch).await;
            conn.drain(&mut reader, &abort).await;
            tracing::info!(peer = %conn.peer, "connection closed after shutdown");
        }
    }
    conn.calls.close();
    conn.calls.wait().await;
    sender.settle().await;
    // A peer that stopped reading would keep the writer, and the server's shutdown, from
    // finishing: it gets keepalive_timeout to read what is left.
    sender
        .close_within(server.config.connection.keepalive_timeout)
        .await;
}

/// A connection with frames always waiting is checked for a drain at least once every
/// this many frames.
const DRAIN_CHECK: u32 = 64;

/// Notes, at the first request of each read, which connection the server read from
/// last: a connection whose reads no other connection's came between is reading alone.
struct Reads<'a> {
    /// The server's: the id of the connection whose read began last, 0 before any.
    last: &'a AtomicU64,
    /// This connection's id, unique in the process.
    id: u64,
}

impl<'a> Reads<'a> {
    fn new(last: &'a AtomicU64) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Reads {
            last,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A read begins: whether the server's last read before it was this connection's
    /// too (or the server's first). Written only when that changes: a connection
    /// reading alone leaves the line shared.
    fn begin(&self) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        if last == self.id {
            return true;
        }
        self.last.store(self.id, Ordering::Relaxed);
        last == 0
    }
}

/// Polls `future` once: its output if it is ready now, `None` if it would wait. For a
/// cancel-safe future only: one that would wait is dropped.
async fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        Poll::Ready(match future.as_mut().poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
}

struct Conn {
    server: Arc<Shared>,
    answers: Answers,
    peer: Arc<PeerAddr>,
    calls: Arc<InFlight<u64>>,
    slots: Arc<Semaphore>,
}

impl Conn {
    /// Starts the call of `request`, received at `received`, on the connection's copy
    /// of its service in `copies`, its future in `into`: the service of `route` when
    /// the read loop routed it, otherwise the one [`Shared::dispatch`] finds.
    fn start_call(
        &self,
        request: Request,
        route: Option<Listed<'_>>,
        received: Instant,
        into: &mut CallBox,
        copies: &mut Copies,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Started, ProtocolError> {
        let Request {
            id,
            timeout,
            method,
            metadata,
            payload,
        } = request;
        // Built whole, not through its builder: each `with_` moves the context.
        let ctx = CallContext {
            request_id: id,
            method,
            deadline: timeout.map(|t| received + t),
            metadata,
            peer: self.peer.clone(),
        };
        let server = &self.server;
        self.calls
            .start_in(
                id,
                ctx,
                payload,
                |ctx, payload, into| match route {
                    Some(listed) => {
                        copies
                            .of(listed.hosted())
                            .call_in(listed.method(), ctx, payload, into)
                    }
                    None => server.dispatch(ctx, payload, into, copies),
                },
                into,
                &self.answers,
                slot,
            )
            .map_err(|_| ProtocolError::DuplicateRequestId { id })
    }

    fn on_other_frame(&self, frame: Frame) -> Result<(), ProtocolError> {
        match frame {
            Frame::Cancel { id } => {
                // Unknown ids are normal: the call may have finished as the cancel flew.
                if self.calls.cancel(&id) {
                    tracing::debug!(id, peer = %self.peer, "call cancelled by the client");
                }
                Ok(())
            }
            Frame::GoAway(g) => {
                tracing::debug!(peer = %self.peer, code = g.code, message = %g.message, "client going away");
                Ok(())
            }
            other => Err(ProtocolError::UnexpectedFrame {
                kind: other.kind(),
                context: "an RPC server accepts only request, cancel and go-away frames",
            }),
        }
    }

    async fn refuse_shutting_down(&self, id: u64) {
        let error = ServiceError::new(
            Status::SHUTTING_DOWN,
            "server is shutting down; call not started",
        );
        self.answers.respond(id, Err(error)).await;
    }

    /// Graceful end: tell the client, keep answering cancels (and refusing new calls)
    /// while calls in flight finish, abort them when the grace period ends.
    async fn drain<R: tokio::io::AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<R>,
        abort: &CancellationToken,
    ) {
        let go_away = Frame::GoAway(GoAway::new(GoAway::SHUTDOWN, "server is shutting down"));
        tokio::select! {
            _ = self.answers.sender.send_or_abort(go_away) => {}
            _ = abort.cancelled() => {}
        }
        self.calls.close();
        loop {
            tokio::select! {
                _ = self.calls.wait() => return,
                _ = abort.cancelled() => break,
                frame = reader.next() => match frame {
                    Some(Ok(Frame::Request(r))) => self.refuse_shutting_down(r.id).await,
                    Some(Ok(frame)) => {
                        if let Err(e) = self.on_other_frame(frame) {
                            reader.protocol_violation(e);
                            break;
                        }
                    }
                    Some(Err(_)) | None => break,
                },
            }
        }
        self.calls.abort_all();
    }
}

/// Answers as response frames on the connection.
#[derive(Clone)]
struct Answers {
    sender: FrameSender,
    /// The end of the shutdown grace: nobody waits for answers any more.
    abort: CancellationToken,
}

/// Answers gathered in the read loop are sent once this many are waiting (or
/// [`BATCH_BYTES`] of them): a peer that does not read its answers is stopped being read
/// after that many.
const BATCH_FRAMES: usize = 64;
/// A connection reading alone (no other connection's read came between its last read
/// and this one: [`Reads`]) sends the first this many answers of a read that holds more
/// at once, then the rest as above. Its peer works on those answers (a client wakes
/// their callers, which send their next calls) while this task answers the rest, where
/// it would otherwise wait for the whole read's answers: one connection with many calls
/// in flight is a ping-pong of batches, with a core idle at each turn. When other
/// connections are at work the cores are busy anyway, and the extra write only costs.
/// Measured (`courier bench rpc`, 16 B, alternating pairs): `concurrent` (one
/// connection, 64 in flight) 550k → 624k calls/s (medians of 8 pairs, all faster),
/// where sending the first 16 early on every connection cost `multi_conn` (four
/// connections) 5%. The raw floor (`courier bench raw`) was slower with the same rule
/// (6 pairs) and keeps one write per read. Which connections are at work was first
/// told by counting those answering a read at that moment; with four connections on
/// two cores one was often alone at that moment, and `multi_conn` wrote 0.050 times per
/// call against 0.036 reads (`perf stat`, `syscalls:sys_enter_sendto`); without early
/// sends it ran 4.4% faster (medians of 6 alternating pairs, all faster). With
/// [`Reads`] it writes 0.035 times per call against 0.033 reads, and ran faster in 11
/// of 14 pairs; `concurrent` is unchanged (medians +0.3%, 4 of 6 pairs).
const FIRST_BATCH_FRAMES: usize = 16;
/// See [`BATCH_FRAMES`]; encoded bytes, length prefixes included.
const BATCH_BYTES: usize = 64 * 1024;

impl Answers {
    /// Adds the answer to call `id` to `batch`, encoded now: what it holds is freed
    /// here, on the thread that made it, rather than after the batch is written; an
    /// answer held inline is copied from where it lies. Not a future: the read loop
    /// moves each answer once, into here. Fails, adding nothing, when the answer cannot
    /// be sent (too large, or the connection closed); the read loop then calls
    /// [`Answers::not_added`].
    fn add(
        &self,
        batch: &mut EncodedFrames,
        id: u64,
        result: Result<Encoded, ServiceError>,
    ) -> Result<(), ConnectionError> {
        match result {
            Ok(answer) if answer.is_inline() => {
                self.sender.encode_ok_response_into(id, &answer, batch)
            }
            result => self.sender.encode_into(&response(id, result), batch),
        }
    }

    /// After [`Answers::add`] failed with `error`: sends the answers before it in
    /// `batch`, then, for an answer too large to send, an error answer saying so (a
    /// closed connection has nobody to tell).
    async fn not_added(&self, batch: &mut EncodedFrames, id: u64, error: ConnectionError) {
        self.flush(batch).await;
        answer_not_sent(&self.sender, id, error);
    }

    /// Sends the answers in `batch`, which it leaves empty, as one: written now, in one
    /// write, if nothing is queued or being written (a lone answer only on an idle
    /// connection), by the task that read the requests, as a hand-written echo server
    /// would, rather than handed to the writer task. Otherwise queued as one, waiting
    /// for room as [`Answers::answer`] does.
    async fn flush(&self, batch: &mut EncodedFrames) {
        if batch.is_empty() {
            return;
        }
        let answers = batch.len();
        // Biased: a batch written or queued at once (the common case) never polls the
        // abort token, which takes a lock.
        tokio::select! {
            biased;
            sent = self.sender.send_encoded_or_abort(batch) => {
                if let Err(e) = sent {
                    // The connection is gone; the callers learn that from their side.
                    tracing::debug!(answers, error = %e, "answers not sent");
                }
            }
            _ = self.abort.cancelled() => {}
        }
    }

    /// Queues the answer of a call that ran as a task, at once when there is room (the
    /// common case). Otherwise waits for room, holding the call's in-flight slot: a
    /// peer that sends requests but does not read the answers stops being read once
    /// `max_queued_bytes` of answers wait for it, so the memory it costs is bounded. No
    /// room within `keepalive_timeout`: the connection is closed with a go-away saying
    /// why ([`FrameSender::send_or_abort`]).
    async fn answer(&self, id: u64, result: Result<Encoded, ServiceError>) {
        let frame = match self.sender.try_send_encoded(response(id, result)) {
            Ok(()) => return,
            Err(TrySendError::Failed(e)) => return answer_not_sent(&self.sender, id, e),
            Err(TrySendError::Full(frame)) => frame,
        };
        tokio::select! {
            sent = self.sender.send_or_abort(frame) => {
                if let Err(e) = sent {
                    answer_not_sent(&self.sender, id, e);
                }
            }
            _ = self.abort.cancelled() => {}
        }
    }
}

impl Responder for Answers {
    /// Queues the answer of a call that ran as a task ([`Answers::answer`]).
    async fn respond(&self, id: u64, result: Result<Encoded, ServiceError>) {
        self.answer(id, result).await
    }
}

fn response(id: u64, result: Result<Encoded, ServiceError>) -> Frame {
    Frame::Response(match result {
        Ok(payload) => Response {
            id,
            status: Status::OK,
            message: Default::default(),
            payload: payload.into_bytes(),
        },
        Err(e) => Response {
            id,
            status: e.status,
            message: e.message.into(),
            payload: Bytes::new(),
        },
    })
}

/// An answer could not be queued: one too large is replaced by an error answer saying
/// so; on a closed connection there is nobody to tell.
fn answer_not_sent(sender: &FrameSender, id: u64, error: ConnectionError) {
    match error {
        ConnectionError::FrameTooLarge { size, limit } => {
            let message = format!(
                "response of {size} bytes exceeds the maximum frame length of {limit} bytes (ConnectionConfig::max_frame_len)"
            );
            tracing::warn!(id, %message, "answer too large");
            let error = Response {
                id,
                status: Status::FRAME_TOO_LARGE,
                message: message.into(),
                payload: Bytes::new(),
            };
            let _ = sender.send_soon(Frame::Response(error));
        }
        // The connection is gone; the caller learns that from its own side.
        e => tracing::debug!(id, error = %e, "answer not sent"),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::Context;

    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::codec::FrameCodec;
    use crate::server::{CallContext, CallFuture, Server, Service};

    struct Echo;

    impl Service for Echo {
        fn name(&self) -> &'static str {
            "Echo"
        }

        fn call(&self, _method: &str, _ctx: CallContext, payload: Bytes) -> CallFuture {
            Box::pin(std::future::ready(Ok(payload)))
        }
    }

    /// A stream that records the length of every write made on it.
    struct Recorded {
        io: DuplexStream,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    struct RecordingWriter {
        inner: WriteHalf<DuplexStream>,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl connection::Io for Recorded {
        type Read = ReadHalf<DuplexStream>;
        type Write = RecordingWriter;

        fn split_io(self) -> (Self::Read, Self::Write) {
            let (read, write) = tokio::io::split(self.io);
            let writes = self.writes;
            (
                read,
                RecordingWriter {
                    inner: write,
                    writes,
                },
            )
        }
    }

    impl AsyncWrite for RecordingWriter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = polled {
                self.writes.lock().unwrap().push(n);
            }
            polled
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Sends 40 requests in one write to a server whose last read was another
    /// connection's (`after_another`) or that has read nothing yet; returns the number
    /// of answers in each of the server's writes.
    async fn answers_per_write(after_another: bool) -> Vec<usize> {
        let server = Server::new(ServerConfig::default()).add_service(Echo);
        if after_another {
            server.shared.last_reader.store(u64::MAX, Ordering::Relaxed);
        }
        let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let io = Recorded {
            io: theirs,
            writes: writes.clone(),
        };
        tokio::spawn(async move { server.serve_connection(io, PeerAddr::Memory(1)).await });

        let mut codec = FrameCodec::new(1 << 20);
        let mut wire = BytesMut::new();
        for id in 1..=40 {
            let request = Frame::Request(Request {
                id,
                method: "Echo.echo".into(),
                payload: Bytes::from_static(b"0123456789abcdef"),
                ..Request::default()
            });
            codec.encode(&request, &mut wire).unwrap();
        }
        ours.write_all(&wire).await.unwrap();

        let mut read = BytesMut::new();
        let mut answers = Vec::new();
        let mut answer_len = 0;
        while answers.len() < 40 {
            let before = read.len();
            if let Some(frame) = codec.decode(&mut read).unwrap() {
                answer_len = before - read.len();
                match frame {
                    Frame::Response(r) => answers.push(r.id),
                    other => panic!("unexpected {other:?}"),
                }
                continue;
            }
            let n = ours.read_buf(&mut read).await.unwrap();
            assert!(n > 0, "the server closed the connection");
        }
        answers.sort_unstable();
        assert_eq!(answers, (1..=40).collect::<Vec<u64>>());
        let writes = writes.lock().unwrap().clone();
        writes.iter().map(|bytes| bytes / answer_len).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_reading_alone_sends_the_first_answers_of_a_read_before_the_rest() {
        let alone = answers_per_write(false).await;
        println!("answers per write, reading alone: {alone:?}");
        assert_eq!(alone, vec![FIRST_BATCH_FRAMES, 40 - FIRST_BATCH_FRAMES]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_read_follows_another_connections_answers_it_in_one_write() {
        let beside = answers_per_write(true).await;
        println!("answers per write, after another connection's read: {beside:?}");
        assert_eq!(beside, vec![40]);
    }
}
