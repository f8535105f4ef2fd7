//! The writer task: coalesces every queued frame into one write.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::codec::Encoder;

use super::Shared;
use crate::codec::FrameCodec;
use crate::error::RpcError;
use crate::frame::Frame;

/// Frames taken from the queue per batch.
const MAX_BATCH: usize = 256;
/// Once this many bytes are encoded, write them out before encoding more.
const FLUSH_AT: usize = 256 * 1024;
/// The buffer's usual size; it is shrunk back to this after carrying a large frame.
const BUF_CAPACITY: usize = 16 * 1024;

pub(super) async fn run<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: mpsc::Receiver<Frame>,
    mut codec: FrameCodec,
    keepalive_interval: Duration,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut buf = BytesMut::with_capacity(BUF_CAPACITY);
    let mut ping =
        tokio::time::interval_at(Instant::now() + keepalive_interval, keepalive_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    // Pinned once: a fresh `cancelled()` per loop would register a waiter per write.
    let close = shared.close.clone().cancelled_owned();
    tokio::pin!(close);

    let result: Result<(), RpcError> = async {
        loop {
            let closing = tokio::select! {
                biased;
                _ = &mut close => {
                    // Write what was queued before the close, then stop.
                    while let Ok(frame) = rx.try_recv() {
                        batch.push(frame);
                    }
                    true
                }
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        return Ok(()); // every sender is gone
                    }
                    false
                }
                _ = ping.tick() => {
                    nonce = nonce.wrapping_add(1);
                    batch.push(Frame::Ping { nonce });
                    false
                }
            };
            for frame in batch.drain(..) {
                // Senders checked the size already; a frame failing here is dropped
                // alone rather than taking the connection down.
                if let Err(e) = codec.encode(&frame, &mut buf) {
                    tracing::error!(error = %e, kind = %frame.kind(), "dropping unencodable frame");
                }
                if buf.len() >= FLUSH_AT {
                    io.write_all(&buf).await?;
                    buf.clear();
                }
            }
            if !buf.is_empty() {
                io.write_all(&buf).await?;
                io.flush().await?;
                buf.clear();
            }
            if buf.capacity() > 4 * BUF_CAPACITY.max(FLUSH_AT) {
                buf = BytesMut::with_capacity(BUF_CAPACITY);
            }
            if closing {
                return Ok(());
            }
        }
    }
    .await;

    match result {
        Ok(()) => {
            let _ = io.shutdown().await;
        }
        Err(e) => {
            tracing::debug!(error = %e, "connection writer failed");
            shared.record_error(&e);
        }
    }
    rx.close();
    shared.close.cancel();
    shared.writer_done.cancel();
}
