//! The writer task: coalesces every queued frame into one write.

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

/// Frames taken from the queue per batch.
const MAX_BATCH: usize = 256;
/// Once this many bytes are encoded, write them out before encoding more.
const FLUSH_AT: usize = 256 * 1024;
/// The buffer's usual size; it is shrunk back to this after carrying a large frame.
const BUF_CAPACITY: usize = 16 * 1024;
/// How long an aborting writer tries to deliver its go-away.
/// Writes closer together than this mean the connection is busy: the writer yields once
/// before writing, to gather more frames. A call's round trip on loopback is ~60 µs.
const BUSY_GAP: Duration = Duration::from_micros(20);
const ABORT_GO_AWAY_TIMEOUT: Duration = Duration::from_millis(100);

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
    let mut buf = BytesMut::with_capacity(BUF_CAPACITY);
    // Bytes of queued frames in `buf`, subtracted from the queued bytes once written.
    let mut encoded = 0usize;
    let mut ping =
        tokio::time::interval_at(Instant::now() + keepalive_interval, keepalive_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Pinned once: a fresh `cancelled()` per loop would register a waiter per write.
    let close = shared.close.wait_owned();
    tokio::pin!(close);
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
                _ = &mut abort => return Ok(End::AbortedIdle),
                _ = &mut close => {
                    // Write what was queued before the close, then stop.
                    rx.try_recv_many(&mut batch, usize::MAX);
                    true
                }
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
                    }
                    // Encoded directly: keepalive pings were never counted as queued.
                    let ping = Frame::Ping { nonce: shared.next_nonce() };
                    if let Err(e) = codec.encode(&ping, &mut buf) {
                        tracing::error!(error = %e, "cannot encode a ping");
                    }
                    false
                }
                // a sender's direct write left bytes to write
                _ = shared.tail_ready.notified() => false,
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
                let before = buf.len();
                match item {
                    // Senders checked the frame already; a frame failing here is dropped
                    // alone rather than taking the connection down.
                    Item::Frame(frame) => match codec.encode_checked(&frame, &mut buf) {
                        Ok(()) => encoded += queued_cost(buf.len() - before),
                        Err(e) => {
                            tracing::error!(error = %e, kind = %frame.kind(), "dropping unencodable frame");
                            shared.unqueue(frame_cost(&frame));
                        }
                    },
                    // Encoded and checked by their senders, and counted as they came.
                    Item::Appended { frames, cost } => {
                        buf.extend_from_slice(&frames);
                        encoded += cost;
                        rx.written(frames);
                    }
                }
                if buf.len() >= FLUSH_AT {
                    write_or_abort!(out.io.write_all(&buf));
                    buf.clear();
                    // Counted as queued until written: a peer that reads slowly shows as
                    // bytes still queued, not as an empty queue and a blocked write.
                    shared.unqueue(std::mem::take(&mut encoded));
                    shared.written.notify_waiters();
                }
            }
            if !buf.is_empty() {
                write_or_abort!(out.io.write_all(&buf));
                write_or_abort!(out.io.flush());
                buf.clear();
                last_write = std::time::Instant::now();
                shared.wrote();
                shared.unqueue(std::mem::take(&mut encoded));
                shared.written.notify_waiters();
            }
            // written (or dropped as unencodable): a direct write may go next
            shared.pending.fetch_sub(taken, std::sync::atomic::Ordering::AcqRel);
            if buf.capacity() > 4 * BUF_CAPACITY.max(FLUSH_AT) {
                buf = BytesMut::with_capacity(BUF_CAPACITY);
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
    shared.writer_done.cancel();
}
