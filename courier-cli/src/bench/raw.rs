//! `courier bench raw`: the floor. The RPC scenarios on bare tokio +
//! `LengthDelimitedCodec`: no frames of courier's, no serialization, no deadlines. A frame
//! is an 8-byte call id and the payload; the server echoes each frame as it is, and the
//! client matches answers to callers by id (the least a connection with many calls in
//! flight needs). Both sides coalesce what is ready into one write, and yield once
//! before writing on a busy connection, exactly as courier's connection writer does, so
//! the ratio measures what courier adds above the same I/O. One difference: courier's
//! server sends the first 16 answers of a long read early when no other connection is
//! at work (`FIRST_BATCH_FRAMES` in rpc-core); the floor tried the same rule and was
//! slower with it (`concurrent` 16 B, 6 alternating pairs, 5 slower), so it keeps one
//! write per read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::{Caller, Report, RpcFlags, RpcScenario, progress};
use crate::bench::rpc::{System, check, line, measure};

/// `courier bench serve-raw ADDR`: the echo server, in its own process.
pub(crate) async fn serve(addr: &str) -> Result<(), String> {
    let listener = super::child_listener(addr).await?;
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accept failed: {e}"))?;
        tokio::spawn(echo(stream));
    }
}

async fn echo(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, LengthDelimitedCodec::new());
    let mut out = FramedWrite::new(write, LengthDelimitedCodec::new());
    let mut last_write = Instant::now();
    while let Some(Ok(frame)) = frames.next().await {
        if out.feed(frame.freeze()).await.is_err() {
            return;
        }
        // Echo everything already read in the same write; on a busy connection, yield
        // once first, as courier's writer does.
        let mut n = 1;
        for pass in 0..2 {
            while let Some(Some(Ok(frame))) = frames.next().now_or_never() {
                n += 1;
                if out.feed(frame.freeze()).await.is_err() {
                    return;
                }
            }
            if pass == 0 && (n > 1 || last_write.elapsed() < BUSY_GAP) {
                tokio::task::yield_now().await;
            } else {
                break;
            }
        }
        if SinkExt::<Bytes>::flush(&mut out).await.is_err() {
            return;
        }
        last_write = Instant::now();
    }
}

/// The same rule as courier's connection writer: writes closer together than this mean
/// a busy connection, worth one yield to gather more frames.
const BUSY_GAP: Duration = Duration::from_micros(20);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>>;

/// One connection: a writer task fed by a channel, a reader task completing callers.
#[derive(Clone)]
struct RawConn {
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    next: Arc<AtomicU64>,
}

impl RawConn {
    async fn connect(addr: &str) -> Result<RawConn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (read, write) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
        tokio::spawn(async move {
            let mut out = FramedWrite::new(write, LengthDelimitedCodec::new());
            let mut last_write = Instant::now();
            while let Some(frame) = rx.recv().await {
                if out.feed(frame).await.is_err() {
                    return;
                }
                let mut n = 1;
                while let Ok(frame) = rx.try_recv() {
                    n += 1;
                    if out.feed(frame).await.is_err() {
                        return;
                    }
                }
                if n > 1 || last_write.elapsed() < BUSY_GAP {
                    tokio::task::yield_now().await;
                    while let Ok(frame) = rx.try_recv() {
                        if out.feed(frame).await.is_err() {
                            return;
                        }
                    }
                }
                if SinkExt::<Bytes>::flush(&mut out).await.is_err() {
                    return;
                }
                last_write = Instant::now();
            }
        });
        let pending: Pending = Arc::default();
        let completions = pending.clone();
        tokio::spawn(async move {
            let mut frames = FramedRead::new(read, LengthDelimitedCodec::new());
            while let Some(Ok(mut frame)) = frames.next().await {
                if frame.len() < 8 {
                    return;
                }
                let id = u64::from_be_bytes(frame[..8].try_into().unwrap_or_default());
                let payload = frame.split_off(8).freeze();
                let waiter = completions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(payload);
                }
            }
            // Connection gone: callers still waiting see their sender dropped.
            completions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        });
        Ok(RawConn {
            tx,
            pending,
            next: Arc::new(AtomicU64::new(0)),
        })
    }

    async fn call(&self, payload: &[u8]) -> Result<Bytes, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, done);
        let mut frame = BytesMut::with_capacity(8 + payload.len());
        frame.put_u64(id);
        frame.put_slice(payload);
        self.tx
            .send(frame.freeze())
            .await
            .map_err(|_| "raw connection closed".to_string())?;
        answer
            .await
            .map_err(|_| "raw connection closed before the echo".to_string())
    }
}

#[derive(Clone)]
struct RawCaller {
    conn: RawConn,
    payload: Bytes,
}

impl Caller for RawCaller {
    async fn call(&self) -> Result<(), String> {
        let echo = self.conn.call(&self.payload).await?;
        check(echo.len(), self.payload.len())
    }
}

pub(crate) async fn run(flags: RpcFlags) -> Result<(), String> {
    let (_server, addr) = super::server_or(&flags.connect, &["bench", "serve-raw", "127.0.0.1:0"])?;
    let mut report = Report::new(flags.json);
    let mut conns = Vec::new();
    for _ in 0..flags.conns.max(1) {
        conns.push(RawConn::connect(&addr).await?);
    }
    for scenario in RpcScenario::ALL {
        if !flags.wants(scenario) {
            continue;
        }
        for &size in &flags.sizes {
            let n = flags.connections(scenario);
            let callers: Vec<RawCaller> = conns[..n]
                .iter()
                .map(|conn| RawCaller {
                    conn: conn.clone(),
                    payload: Bytes::from(vec![0xAB; size]),
                })
                .collect();
            let bar = progress(format!("raw {scenario} {size} B"));
            let measured = measure(&flags, scenario, &callers, &bar).await?;
            bar.finish_and_clear();
            report.line(
                line(System::Raw, scenario, size, n, &flags, measured, None),
                "calls_per_s",
            );
        }
    }
    Ok(())
}
