//! The writer task: coalesces every queued frame into one write.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::codec::Encoder;

use super::queue::{Item, Rx};
use super::{Output, Shared, frame_cost, queued_cost};
use crate::codec::FrameCodec;
use crate::error::ConnectionError;
use crate::frame::Frame;

/// What ends a writer's wait, besides frames and its keepalive tick.
enum Signal {
    Abort,
    Close,
    /// A direct write left bytes to write.
    Tail,
}

/// Whether `abort`, `close` or `tail_ready` is set; `Pending` if none is, with the task
/// registered to be woken when one is. Registered before the flags are read, so that
/// one set in between wakes it (each is set before the wake).
fn signalled(shared: &Shared, cx: &mut std::task::Context<'_>) -> std::task::Poll<Signal> {
    shared.writer_waiting.register(cx.waker());
    if shared.abort.is_set() {
        std::task::Poll::Ready(Signal::Abort)
    } else if shared.close.is_set() {
        std::task::Poll::Ready(Signal::Close)
    } else if shared
        .tail_ready
        .swap(false, std::sync::atomic::Ordering::AcqRel)
    {
        std::task::Poll::Ready(Signal::Tail)
    } else {
        std::task::Poll::Pending
    }
}

/// Frames taken from the queue per batch.
const MAX_BATCH: usize = 256;
/// Once this many bytes are encoded, write them out before encoding more.
const FLUSH_AT: usize = 256 * 1024;
/// The buffer's usual size; it is shrunk back to this after carrying a large frame.
const BUF_CAPACITY: usize = 16 * 1024;
/// Writes closer together than this mean the connection is busy: the writer yields once
/// before writing, to gather more frames. A call's round trip on loopback is ~60 µs.
const BUSY_GAP: Duration = Duration::from_micros(20);
/// How long an aborting writer tries to deliver its go-away.
const ABORT_GO_AWAY_TIMEOUT: Duration = Duration::from_millis(100);

/// Frames that senders encoded ([`Item::Appended`]) and that take at least this many
/// bytes are written from their senders' buffer rather than copied into the writer's:
/// below it, a copy costs less than another slice of a vectored write.
const IN_PLACE_MIN: usize = 2 * 1024;
/// At most this many buffers are written in place per write; later ones are copied
/// (Linux takes up to 1,024 slices in one `writev`).
const IN_PLACE_MAX: usize = 31;

/// The bytes of the next write, in order: frames this task encoded, in `buf`, and the
/// buffers of frames that their senders encoded, written where they are (one vectored
/// write for all), so that the bytes of a large frame are copied once, by its sender,
/// rather than twice.
struct Round {
    buf: BytesMut,
    /// Senders' buffers, each with the length `buf` had when it came: it is written
    /// after those bytes of `buf` and before the rest.
    in_place: Vec<(usize, BytesMut)>,
    /// Bytes in `in_place`.
    in_place_len: usize,
}

impl Round {
    fn new() -> Round {
        Round {
            buf: BytesMut::with_capacity(BUF_CAPACITY),
            // Grown at its first use: an idle connection holds none.
            in_place: Vec::new(),
            in_place_len: 0,
        }
    }

    fn len(&self) -> usize {
        self.buf.len() + self.in_place_len
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds frames their sender encoded: in place if they are large enough, copied
    /// otherwise. Hands back a buffer it is done with.
    fn add_encoded(&mut self, frames: BytesMut) -> Option<BytesMut> {
        if frames.len() >= IN_PLACE_MIN && self.in_place.len() < IN_PLACE_MAX {
            self.in_place_len += frames.len();
            self.in_place.push((self.buf.len(), frames));
            None
        } else {
            self.buf.extend_from_slice(&frames);
            Some(frames)
        }
    }

    /// Writes every byte, in order, with vectored writes where the stream takes them.
    async fn write_to<W: AsyncWrite + Unpin>(&self, io: &mut W) -> std::io::Result<()> {
        if self.in_place.is_empty() {
            return io.write_all(&self.buf).await;
        }
        // On the heap, not in this future: the writer task's future, which every
        // connection keeps for its lifetime, holds what its awaits hold. One allocation
        // per write of 2 KiB or more.
        let mut slices = Vec::with_capacity(2 * self.in_place.len() + 1);
        let mut from = 0;
        for (at, frames) in &self.in_place {
            if *at > from {
                slices.push(IoSlice::new(&self.buf[from..*at]));
                from = *at;
            }
            slices.push(IoSlice::new(frames));
        }
        if self.buf.len() > from {
            slices.push(IoSlice::new(&self.buf[from..]));
        }
        let mut left = &mut slices[..];
        while !left.is_empty() {
            let written = io.write_vectored(left).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut left, written);
        }
        Ok(())
    }

    /// Empties it once written, giving the senders' buffers back to `rx` for reuse.
    fn written(&mut self, rx: &mut Rx) {
        self.buf.clear();
        for (_, frames) in self.in_place.drain(..) {
            rx.written(frames);
        }
        self.in_place_len = 0;
    }
}

/// Takes more frames into `batch`, which holds the `n` just taken, when the connection
/// is under load: the tasks that are ready to send run first, so that their frames
/// share this write (fewer syscalls and wake-ups per frame). "Under load": several
/// frames were waiting, or the last write was under [`BUSY_GAP`] ago. A lone frame on a
/// quiet connection (one call in flight: a round trip apart) is written at once, since
/// yielding would cost it a trip through the I/O driver.
async fn gather(rx: &mut Rx, batch: &mut Vec<Item>, n: usize, last_write: std::time::Instant) {
    if n < MAX_BATCH && (n > 1 || last_write.elapsed() < BUSY_GAP) {
        tokio::task::yield_now().await;
        let room = MAX_BATCH - batch.len();
        rx.try_recv_many(batch, room);
    }
}

/// How the write loop ended.
enum End {
    /// Everything queued was written; shut the stream down.
    Done,
    /// Aborted between writes: the go-away can still be framed correctly.
    AbortedIdle,
    /// Aborted inside a write: the stream may end mid-frame, so nothing more is written.
    AbortedMidWrite,
}

pub(super) async fn run<W: AsyncWrite + Unpin>(
    output: Arc<tokio::sync::Mutex<Output<W>>>,
    mut rx: Rx,
    mut codec: FrameCodec,
    keepalive_interval: Duration,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_write = std::time::Instant::now();
    let mut round = Round::new();
    // Bytes of queued frames in `round`, subtracted from the queued bytes once written.
    let mut encoded = 0usize;
    let mut ping =
        tokio::time::interval_at(Instant::now() + keepalive_interval, keepalive_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // For a write that waits: pinned once, as a fresh `cancelled()` per write would
    // register a waiter each time. A wait for frames watches the latches through
    // `Shared::writer_waiting` instead (`signalled`).
    let abort = shared.abort.wait_owned();
    tokio::pin!(abort);

    // A write that the abort token interrupts. Every write starts at a frame boundary:
    // an abort seen before it starts leaves the stream there (idle, so the go-away can
    // follow), one seen while the write waits may leave it mid-frame. The write is
    // polled first, so a write the stream takes at once is never cut.
    macro_rules! write_or_abort {
        ($write:expr) => {{
            if shared.abort.is_set() {
                return Ok(End::AbortedIdle);
            }
            tokio::select! {
                biased;
                result = $write => result?,
                _ = &mut abort => return Ok(End::AbortedMidWrite),
            }
        }};
    }

    let result: Result<End, ConnectionError> = async {
        loop {
            // A busy connection finds frames queued as it comes back: taken without the
            // select below, whose every round polls the abort and the close (each a
            // lock) and builds the timer's and the tail's futures. Pings are for quiet
            // connections, and a direct write's tail is written first in every round.
            if !shared.abort.is_set() && !shared.close.is_set() {
                let n = rx.try_recv_many(&mut batch, MAX_BATCH);
                if n > 0 {
                    gather(&mut rx, &mut batch, n, last_write).await;
                }
            }
            let closing = if !batch.is_empty() {
                false
            } else {
                tokio::select! {
                biased;
                signal = std::future::poll_fn(|cx| signalled(&shared, cx)) => match signal {
                    Signal::Abort => return Ok(End::AbortedIdle),
                    Signal::Close => {
                        // Write what was queued before the close, then stop.
                        rx.try_recv_many(&mut batch, usize::MAX);
                        true
                    }
                    // a sender's direct write left bytes to write
                    Signal::Tail => false,
                },
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        return Ok(End::Done); // every sender is gone
                    }
                    gather(&mut rx, &mut batch, n, last_write).await;
                    false
                }
                _ = ping.tick() => {
                    if last_write.elapsed() >= keepalive_interval {
                        // quiet for a while: give back the room a burst left
                        rx.shrink();
                        round.in_place = Vec::new();
                    }
                    // Encoded directly: keepalive pings were never counted as queued.
                    let ping = Frame::Ping { nonce: shared.next_nonce() };
                    if let Err(e) = codec.encode(&ping, &mut round.buf) {
                        tracing::error!(error = %e, "cannot encode a ping");
                    }
                    false
                }
                }
            };
            // The write half, held until this round is written: a sender that finds it
            // taken queues its frame. A direct write never holds it long (it never waits).
            let mut out = output.lock().await;
            let out = &mut *out;
            if out.unflushed {
                // first what a direct write left: it began before anything queued now
                write_or_abort!(out.io.write_all(&out.tail));
                write_or_abort!(out.io.flush());
                out.tail_written(&shared);
                shared.wrote();
                shared.written.notify_waiters();
            }
            let taken = batch.len();
            for item in batch.drain(..) {
                match item {
                    // Senders checked the frame already; a frame failing here is dropped
                    // alone rather than taking the connection down.
                    Item::Frame(frame) => {
                        let before = round.buf.len();
                        match codec.encode_checked(&frame, &mut round.buf) {
                            Ok(()) => encoded += queued_cost(round.buf.len() - before),
                            Err(e) => {
                                tracing::error!(error = %e, kind = %frame.kind(), "dropping unencodable frame");
                                shared.unqueue(frame_cost(&frame));
                            }
                        }
                    }
                    // Encoded and checked by their senders, and counted as they came.
                    Item::Appended { frames, cost } => {
                        encoded += cost;
                        if let Some(done) = round.add_encoded(frames) {
                            rx.written(done);
                        }
                    }
                }
                if round.len() >= FLUSH_AT {
                    write_or_abort!(round.write_to(&mut out.io));
                    round.written(&mut rx);
                    // Counted as queued until written: a peer that reads slowly shows as
                    // bytes still queued, not as an empty queue and a blocked write.
                    shared.unqueue(std::mem::take(&mut encoded));
                    shared.written.notify_waiters();
                }
            }
            if !round.is_empty() {
                write_or_abort!(round.write_to(&mut out.io));
                write_or_abort!(out.io.flush());
                round.written(&mut rx);
                last_write = std::time::Instant::now();
                shared.wrote();
                shared.unqueue(std::mem::take(&mut encoded));
                shared.written.notify_waiters();
            }
            // written (or dropped as unencodable): a direct write may go next
            shared.pending.fetch_sub(taken, std::sync::atomic::Ordering::AcqRel);
            if round.buf.capacity() > 4 * BUF_CAPACITY.max(FLUSH_AT) {
                round.buf = BytesMut::with_capacity(BUF_CAPACITY);
            }
            if closing {
                return Ok(End::Done);
            }
        }
    }
    .await;

    // Held from here on: no direct write comes after the end (they check `close`, set
    // below, under this lock).
    let mut out = output.lock().await;
    let out = &mut *out;
    match result {
        Ok(End::Done) => {
            // A direct write's tail may be left when the last sender went away before
            // the writer saw it: it completes a frame already begun. Cut short by an
            // abort like any other write.
            let tail_written = !out.unflushed
                || tokio::select! {
                    biased;
                    result = out.io.write_all(&out.tail) => result.is_ok(),
                    _ = &mut abort => false,
                };
            if tail_written {
                out.tail_written(&shared);
                let _ = out.io.shutdown().await;
            }
        }
        Ok(End::AbortedIdle) => {
            if let Some(go_away) = shared.abort_go_away.get() {
                let mut buf = std::mem::take(&mut round.buf);
                buf.clear();
                // a direct write's tail first: the go-away must start at a frame boundary
                buf.extend_from_slice(&out.tail);
                if codec
                    .encode(&Frame::GoAway(go_away.clone()), &mut buf)
                    .is_ok()
                {
                    let _ = tokio::time::timeout(ABORT_GO_AWAY_TIMEOUT, async {
                        out.io.write_all(&buf).await?;
                        out.io.shutdown().await
                    })
                    .await;
                }
            }
        }
        Ok(End::AbortedMidWrite) => {}
        Err(e) => {
            tracing::debug!(error = %e, "connection writer failed");
            shared.record_error(&e);
        }
    }
    rx.close();
    shared.close();
    shared.writer_done.set();
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::connection::queue;

    /// A stream that takes at most `max` bytes per write, across slices when it is
    /// vectored, as a socket with little room does.
    struct Trickle {
        written: Vec<u8>,
        max: usize,
        vectored: bool,
        writes: usize,
        /// Of `writes`, those made with `poll_write_vectored`.
        vectored_writes: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.written.extend_from_slice(&buf[..n]);
            self.writes += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            if !self.vectored {
                // What tokio's default does: the first slice that is not empty, alone.
                let first = slices.iter().find(|s| !s.is_empty()).map_or(&[][..], |s| s);
                return self.poll_write(cx, first);
            }
            self.vectored_writes += 1;
            let mut left = self.max;
            for slice in slices {
                let n = slice.len().min(left);
                self.written.extend_from_slice(&slice[..n]);
                left -= n;
            }
            self.writes += 1;
            Poll::Ready(Ok(self.max - left))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// `len` bytes, each its position's low byte plus `seed`: a misplaced run shows.
    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_add(seed)).collect()
    }

    #[tokio::test]
    async fn a_round_writes_its_own_and_its_senders_bytes_in_the_order_they_came() {
        let streams = [
            (usize::MAX, true),
            (1000, true),
            (7, true),
            (usize::MAX, false),
            (1000, false),
        ];
        for (max, vectored) in streams {
            let (_tx, mut rx) = queue::queue(8);
            let mut round = Round::new();
            let mut expected = Vec::new();
            // Small and large, from this task and from senders, more senders' buffers
            // than are written in place: each kind next to each other kind.
            for i in 0..2 * IN_PLACE_MAX {
                let own = bytes(i % 5 * 3, i as u8);
                round.buf.extend_from_slice(&own);
                expected.extend_from_slice(&own);
                let len = if i % 3 == 0 { 100 } else { IN_PLACE_MIN + i };
                let theirs = bytes(len, 100 + i as u8);
                expected.extend_from_slice(&theirs);
                if let Some(done) = round.add_encoded(BytesMut::from(&theirs[..])) {
                    rx.written(done);
                }
            }
            round.buf.extend_from_slice(b"the end");
            expected.extend_from_slice(b"the end");
            assert_eq!(round.in_place.len(), IN_PLACE_MAX, "the rest copied");
            assert_eq!(round.len(), expected.len());

            let mut io = Trickle {
                written: Vec::new(),
                max,
                vectored,
                writes: 0,
                vectored_writes: 0,
            };
            round.write_to(&mut io).await.unwrap();
            assert!(
                io.written == expected,
                "{max} bytes a write, vectored: {vectored}"
            );
            if max == usize::MAX && vectored {
                assert_eq!(io.writes, 1, "one vectored write for the whole round");
                assert_eq!(io.vectored_writes, 1);
            }
            if !vectored {
                // At least one write per slice: each in-place buffer, and the runs of
                // this task's bytes between them ("the end" among them).
                assert!(io.writes > IN_PLACE_MAX, "{} writes", io.writes);
            }
            round.written(&mut rx);
            assert!(round.is_empty());
        }
    }

    #[tokio::test]
    async fn a_round_of_copied_bytes_only_is_one_plain_write() {
        let (_tx, mut rx) = queue::queue(8);
        let mut round = Round::new();
        round.buf.extend_from_slice(b"abc");
        assert!(round.add_encoded(BytesMut::from(&b"def"[..])).is_some());
        let mut io = Trickle {
            written: Vec::new(),
            max: usize::MAX,
            vectored: true,
            writes: 0,
            vectored_writes: 0,
        };
        round.write_to(&mut io).await.unwrap();
        assert_eq!(io.written, b"abcdef");
        assert_eq!(io.writes, 1);
        assert_eq!(io.vectored_writes, 0, "a plain write");
        round.written(&mut rx);
    }
}
