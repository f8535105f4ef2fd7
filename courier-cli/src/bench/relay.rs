//! `courier bench bus-raw`: the floor of the bus. `pubsub_1to1`, `fanout_1toN` and
//! `req_seq` through a relay child process on bare tokio that forwards length-prefixed
//! frames (4-byte big-endian length, then the payload) as it read them: no subjects, no
//! routing, no re-encoding.
//!
//! What the relay does is the least any broker does with the same sockets:
//! * It reads what arrived, finds where the last whole frame ends, and hands that slice
//!   (shared, not copied) to every subscriber of the channel. One hand-off per read, as
//!   nats-server flushes each client once per read.
//! * A subscriber's slices are written by the reading task itself when nothing is queued
//!   or being written for that subscriber (one `write` from where they were read), and
//!   otherwise queued for the subscriber's writer task, which writes everything queued
//!   in one `writev`. Courier's broker writes directly or queues the same way.
//! * A subscriber with more than [`QUEUE_LIMIT`] bytes queued holds up the reading task:
//!   back-pressure, never a drop.
//!
//! The publishing client encodes frames into 64 KiB chunks that its own writer task
//! writes, so encoding and writing overlap, as they do in courier's client.
//!
//! Courier's broker has to do more (parse subjects, match subscriptions, address each
//! subscriber by its own id), so the ratio of `bench bus` to this says what that costs
//! above the same I/O, and this against nats-server says how far the I/O alone goes.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc};

use super::{Caller, Report, fields, progress, selected, whole};
use crate::bench::bus::{PubSubFlags, Received, pubsub_row};
use crate::bench::rpc::check;

/// `courier bench bus-raw`'s flags: those of `bench bus` that its three scenarios use.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RelayFlags {
    #[command(flatten)]
    pubsub: PubSubFlags,
    /// Payload size of req_seq, in bytes.
    #[arg(long, default_value_t = 16)]
    req_size: usize,
    /// Requests measured in req_seq.
    #[arg(long, default_value_t = 20_000)]
    seq_count: usize,
    /// Requests before req_seq's measurement.
    #[arg(long, default_value_t = 2_000)]
    seq_warmup: usize,
    /// Use a relay already running there (`courier bench serve-relay ADDR`) instead of
    /// starting one per scenario.
    #[arg(long)]
    connect: Option<String>,
    /// Run only these scenarios (comma-separated: pubsub_1to1, fanout_1toN, req_seq); all
    /// by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// One JSON line per scenario instead of a table.
    #[arg(long)]
    json: bool,
}

/// Bytes queued for one subscriber past which the reading task waits for its writer.
pub(crate) const QUEUE_LIMIT: usize = 4 << 20;

/// The largest frame the relay accepts; a longer length prefix closes the connection.
const MAX_FRAME: usize = 16 << 20;

/// "No channel" in a connection's hello.
const NONE: u8 = 0xFF;

/// What a read asks for room for: the relay's and the subscribers' read size.
const READ_CHUNK: usize = 64 << 10;

/// `courier bench serve-relay ADDR`: the relay, in its own process.
///
/// A connection starts with two bytes, the channel it publishes to and the one it
/// subscribes to ([`NONE`] for neither). A subscriber is answered with an empty frame
/// once it is registered.
pub(crate) async fn serve(addr: &str) -> Result<(), String> {
    let listener = super::child_listener(addr).await?;
    let relay = Relay::default();
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accept failed: {e}"))?;
        let relay = relay.clone();
        tokio::spawn(async move {
            if let Err(error) = relay.serve_connection(stream).await {
                eprintln!("relay connection closed: {error}");
            }
        });
    }
}

/// The channels: who subscribes to what.
#[derive(Clone, Default)]
struct Relay {
    channels: Arc<Mutex<HashMap<u8, Vec<Arc<Outbound>>>>>,
}

impl Relay {
    fn channels(&self) -> MutexGuard<'_, HashMap<u8, Vec<Arc<Outbound>>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn serve_connection(&self, stream: TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let (mut read, write) = stream.into_split();
        let mut hello = [0u8; 2];
        read.read_exact(&mut hello).await?;
        let [publish_to, subscribe_to] = hello;
        let outbound = Arc::new(Outbound::new(write));
        tokio::spawn(outbound.clone().write_queued());
        if subscribe_to != NONE {
            // the answer goes first: nothing forwarded can overtake it
            outbound.send(Bytes::from_static(&[0; 4])).await;
            self.channels()
                .entry(subscribe_to)
                .or_default()
                .push(outbound.clone());
        }
        let result = if publish_to == NONE {
            // Nothing to forward: wait for the peer to go (or to break the rules).
            let mut byte = [0u8; 1];
            match read.read(&mut byte).await {
                Ok(0) => Ok(()),
                Ok(_) => Err(io::Error::other("a subscriber-only connection sent data")),
                Err(e) => Err(e),
            }
        } else {
            self.forward(read, publish_to).await
        };
        if let Some(subscribers) = self.channels().get_mut(&subscribe_to) {
            subscribers.retain(|s| !Arc::ptr_eq(s, &outbound));
        }
        outbound.close();
        result
    }

    /// Reads frames and hands every read's whole frames to the channel's subscribers.
    async fn forward(&self, mut read: OwnedReadHalf, channel: u8) -> io::Result<()> {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut scanned = 0;
        loop {
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            if read.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
            scanned = whole_frames(&buf, scanned)?;
            if scanned == 0 {
                continue;
            }
            let frames = buf.split_to(scanned).freeze();
            scanned = 0;
            let subscribers = self.channels().get(&channel).cloned().unwrap_or_default();
            for subscriber in &subscribers {
                subscriber.send(frames.clone()).await;
            }
        }
    }
}

/// Where the whole frames at the start of `buf` end, scanning on from `from` (itself the
/// end of a whole frame). An error for a length past [`MAX_FRAME`].
fn whole_frames(buf: &[u8], mut from: usize) -> io::Result<usize> {
    while let Some(prefix) = buf.get(from..from + 4) {
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::other(format!(
                "frame of {len} bytes at offset {from} is over the relay's limit of {MAX_FRAME}"
            )));
        }
        if buf.len() - from - 4 < len {
            break;
        }
        from += 4 + len;
    }
    Ok(from)
}

/// One connection's outbound side: what is queued for it, and its socket.
struct Outbound {
    state: Mutex<OutState>,
    socket: OwnedWriteHalf,
    /// Wakes the writer task: something was queued, or the connection closed.
    ready: Notify,
    /// Wakes senders waiting for room.
    room: Notify,
}

#[derive(Default)]
struct OutState {
    queue: VecDeque<Bytes>,
    queued: usize,
    /// The writer task holds slices taken from the queue: no direct write now.
    writing: bool,
    closed: bool,
}

impl Outbound {
    fn new(socket: OwnedWriteHalf) -> Outbound {
        Outbound {
            state: Mutex::default(),
            socket,
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `frames` at once when nothing is ahead of them, else queues them (after
    /// waiting for room). Dropped if the connection is closed.
    async fn send(&self, frames: Bytes) {
        let mut frames = Some(frames);
        while let Some(next) = frames.take() {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Err(full) = self.try_send(next) {
                frames = Some(full);
                room.await;
            }
        }
    }

    /// [`send`](Self::send) without the wait: the frames back when the queue is full.
    fn try_send(&self, frames: Bytes) -> Result<(), Bytes> {
        let mut state = self.state();
        if state.closed {
            return Ok(());
        }
        if state.queued > QUEUE_LIMIT {
            return Err(frames);
        }
        let mut rest = frames;
        if state.queue.is_empty() && !state.writing {
            match self.socket.try_write(&rest) {
                Ok(n) if n == rest.len() => return Ok(()),
                Ok(n) => rest.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    state.closed = true;
                    drop(state);
                    self.ready.notify_one();
                    return Ok(());
                }
            }
        }
        state.queued += rest.len();
        state.queue.push_back(rest);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    fn close(&self) {
        self.state().closed = true;
        self.ready.notify_one();
        self.room.notify_waiters();
    }

    /// The writer task: writes whatever is queued, up to 64 slices in one `writev`.
    async fn write_queued(self: Arc<Self>) {
        let mut taken: Vec<Bytes> = Vec::new();
        loop {
            let idle = {
                let mut state = self.state();
                if state.queue.is_empty() {
                    state.writing = false;
                    if state.closed {
                        return;
                    }
                    true
                } else {
                    state.writing = true;
                    let n = state.queue.len().min(64);
                    taken.extend(state.queue.drain(..n));
                    false
                }
            };
            if idle {
                self.ready.notified().await;
                continue;
            }
            let bytes: usize = taken.iter().map(Bytes::len).sum();
            if self.write_all(&mut taken).await.is_err() {
                let mut state = self.state();
                state.closed = true;
                state.queue.clear();
                drop(state);
                self.room.notify_waiters();
                return;
            }
            self.state().queued -= bytes;
            self.room.notify_waiters();
        }
    }

    async fn write_all(&self, slices: &mut Vec<Bytes>) -> io::Result<()> {
        while !slices.is_empty() {
            let written = {
                let io: Vec<IoSlice<'_>> = slices.iter().map(|s| IoSlice::new(s)).collect();
                self.socket.try_write_vectored(&io)
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    while n > 0 {
                        let first = &mut slices[0];
                        if n >= first.len() {
                            n -= first.len();
                            slices.remove(0);
                        } else {
                            first.advance(n);
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.socket.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A client connection to the relay, hello sent (and, for a subscriber, answered).
async fn join(addr: &str, publish_to: u8, subscribe_to: u8) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to the relay at {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .write_all(&[publish_to, subscribe_to])
        .await
        .map_err(|e| e.to_string())?;
    if subscribe_to != NONE {
        let mut ack = [0u8; 4];
        stream
            .read_exact(&mut ack)
            .await
            .map_err(|e| format!("no answer to the relay hello: {e}"))?;
    }
    Ok(stream)
}

/// Reads frames from a relay connection, one read at a time.
struct FrameReader {
    read: OwnedReadHalf,
    buf: BytesMut,
}

impl FrameReader {
    /// The payload lengths of the whole frames that the next read completes.
    async fn next_lengths(&mut self, lengths: &mut Vec<usize>) -> Result<(), String> {
        lengths.clear();
        while lengths.is_empty() {
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self
                .read
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the relay closed the connection".into());
            }
            let end = whole_frames(&self.buf, 0).map_err(|e| e.to_string())?;
            let mut at = 0;
            while at < end {
                let len = (&self.buf[at..at + 4]).get_u32() as usize;
                lengths.push(len);
                at += 4 + len;
            }
            self.buf.advance(end);
        }
        Ok(())
    }
}

/// Counts frames until `expected` arrived or none came for 3 s.
async fn receive(
    mut reader: FrameReader,
    expected: usize,
    size: usize,
) -> Result<Received, String> {
    let mut got = Received {
        delivered: 0,
        first: None,
        last: None,
    };
    let mut lengths = Vec::new();
    while got.delivered < expected {
        match tokio::time::timeout(Duration::from_secs(3), reader.next_lengths(&mut lengths)).await
        {
            Ok(result) => result?,
            Err(_) => break,
        }
        for &len in &lengths {
            check(len, size)?;
        }
        let now = Instant::now();
        got.first.get_or_insert(now);
        got.last = Some(now);
        got.delivered += lengths.len();
    }
    Ok(got)
}

pub(crate) async fn run(flags: RelayFlags) -> Result<(), String> {
    let mut report = Report::new(flags.json);
    let runs = flags.pubsub.runs()?;
    for (scenario, subscribers) in [("pubsub_1to1", 1), ("fanout_1toN", flags.pubsub.fanout)] {
        if !selected(&flags.only, scenario) {
            continue;
        }
        for &(size, count) in &runs {
            let line = pubsub(&flags, scenario, subscribers, size, count).await?;
            report.line(line, "delivered_msgs_per_s");
        }
    }
    if selected(&flags.only, "req_seq") {
        report.line(req_seq(&flags).await?, "req_per_s");
    }
    Ok(())
}

async fn pubsub(
    flags: &RelayFlags,
    scenario: &str,
    subscribers: usize,
    size: usize,
    count: usize,
) -> Result<serde_json::Map<String, Value>, String> {
    let (_relay, addr) =
        super::server_or(&flags.connect, &["bench", "serve-relay", "127.0.0.1:0"])?;
    let mut receivers = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..subscribers {
        let (read, write) = join(&addr, NONE, 0).await?.into_split();
        let reader = FrameReader {
            read,
            buf: BytesMut::with_capacity(READ_CHUNK),
        };
        receivers.push(tokio::spawn(receive(reader, count, size)));
        keep.push(write);
    }
    let (_, mut write) = join(&addr, 0, NONE).await?.into_split();
    let (chunks, mut to_write) = mpsc::channel::<Bytes>(8);
    let writer = tokio::spawn(async move {
        while let Some(chunk) = to_write.recv().await {
            write.write_all(&chunk).await?;
        }
        write.flush().await
    });
    let payload = vec![0xAB; size];
    let bar = progress(format!("bus-raw {scenario} {size} B"));
    bar.set_length(count as u64);
    let started = Instant::now();
    let mut buf = BytesMut::with_capacity(READ_CHUNK + 4 + size);
    for i in 0..count {
        buf.put_u32(size as u32);
        buf.put_slice(&payload);
        if buf.len() >= READ_CHUNK || i + 1 == count {
            let chunk = buf.split().freeze();
            chunks
                .send(chunk)
                .await
                .map_err(|_| "the publisher's writer stopped")?;
            buf.reserve(READ_CHUNK + 4 + size);
        }
        if i % 65_536 == 0 {
            bar.set_position(i as u64);
        }
    }
    drop(chunks);
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("publishing to the relay: {e}"))?;
    let publish_elapsed = started.elapsed();
    let mut row = pubsub_row(
        "courier-raw-relay",
        scenario,
        size,
        count,
        publish_elapsed,
        receivers,
    )
    .await?;
    bar.finish_and_clear();
    row.insert("server".into(), json!("raw relay"));
    Ok(row)
}

/// The requester of `req_seq`: one request (a frame to channel 0) and its echo (a frame
/// on channel 1) at a time.
#[derive(Clone)]
struct Requester {
    conn: Arc<tokio::sync::Mutex<(OwnedWriteHalf, FrameReader, Vec<usize>)>>,
    frame: Bytes,
    size: usize,
}

impl Caller for Requester {
    async fn call(&self) -> Result<(), String> {
        let mut conn = self.conn.lock().await;
        let (write, reader, lengths) = &mut *conn;
        write
            .write_all(&self.frame)
            .await
            .map_err(|e| e.to_string())?;
        reader.next_lengths(lengths).await?;
        match lengths.as_slice() {
            [len] => check(*len, self.size),
            more => Err(format!("{} answers to one request", more.len())),
        }
    }
}

/// The responder echoes each read's frames back in one write.
async fn respond(stream: TcpStream) -> Result<(), String> {
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader {
        read,
        buf: BytesMut::with_capacity(READ_CHUNK),
    };
    let mut lengths = Vec::new();
    let mut out = BytesMut::new();
    loop {
        reader.next_lengths(&mut lengths).await?;
        for &len in &lengths {
            out.put_u32(len as u32);
            out.put_bytes(0xAB, len);
        }
        write.write_all(&out).await.map_err(|e| e.to_string())?;
        out.clear();
    }
}

async fn req_seq(flags: &RelayFlags) -> Result<serde_json::Map<String, Value>, String> {
    let (_relay, addr) =
        super::server_or(&flags.connect, &["bench", "serve-relay", "127.0.0.1:0"])?;
    let responder = tokio::spawn(respond(join(&addr, 1, 0).await?));
    let (read, write) = join(&addr, 0, 1).await?.into_split();
    let mut frame = BytesMut::new();
    frame.put_u32(flags.req_size as u32);
    frame.put_bytes(0xAB, flags.req_size);
    let requester = Requester {
        conn: Arc::new(tokio::sync::Mutex::new((
            write,
            FrameReader {
                read,
                buf: BytesMut::with_capacity(READ_CHUNK),
            },
            Vec::new(),
        ))),
        frame: frame.freeze(),
        size: flags.req_size,
    };
    let bar = progress(format!("bus-raw req_seq {} B", flags.req_size));
    let mut measured =
        super::sequential(&requester, flags.seq_warmup, flags.seq_count, &bar).await?;
    bar.finish_and_clear();
    responder.abort();
    Ok(fields(json!({
        "system": "courier-raw-relay",
        "scenario": "req_seq",
        "payload_bytes": flags.req_size,
        "requests": measured.calls,
        "req_per_s": whole(measured.rate()),
        "elapsed_s": (measured.elapsed.as_secs_f64() * 10_000.0).round() / 10_000.0,
        "p50_us": measured.percentile_us(50.0),
        "p99_us": measured.percentile_us(99.0),
        "in_flight": 1,
        "responders": 1,
        "server": "raw relay",
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn whole_frames_stop_before_a_partial_frame() {
        let mut buf = frame(b"abc");
        buf.extend(frame(b""));
        let complete = buf.len();
        buf.extend(&frame(b"hello")[..6]);
        assert_eq!(whole_frames(&buf, 0).unwrap(), complete);
        assert_eq!(whole_frames(&buf, 7).unwrap(), complete);
        assert_eq!(whole_frames(&buf[..3], 0).unwrap(), 0);
    }

    #[test]
    fn a_length_over_the_limit_is_an_error_naming_it() {
        let buf = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let error = whole_frames(&buf, 0).unwrap_err().to_string();
        assert!(error.contains("over the relay's limit"), "{error}");
    }

    #[tokio::test]
    async fn the_relay_forwards_whole_frames_to_every_subscriber_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let relay = Relay::default();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let relay = relay.clone();
                tokio::spawn(async move { relay.serve_connection(stream).await });
            }
        });
        let mut readers = Vec::new();
        for _ in 0..2 {
            let (read, write) = join(&addr, NONE, 0).await.unwrap().into_split();
            let reader = FrameReader {
                read,
                buf: BytesMut::new(),
            };
            readers.push((reader, write));
        }
        let mut publisher = join(&addr, 0, NONE).await.unwrap();
        // one frame cut in two writes, then many frames in one
        let first = frame(&[1; 100]);
        publisher.write_all(&first[..50]).await.unwrap();
        publisher.flush().await.unwrap();
        publisher.write_all(&first[50..]).await.unwrap();
        let mut many = Vec::new();
        for i in 0..1000u32 {
            many.extend(frame(&vec![7; (i % 50) as usize]));
        }
        publisher.write_all(&many).await.unwrap();
        for (reader, _) in &mut readers {
            let mut got = Vec::new();
            let mut lengths = Vec::new();
            while got.len() < 1001 {
                reader.next_lengths(&mut lengths).await.unwrap();
                got.extend_from_slice(&lengths);
            }
            let want: Vec<usize> = std::iter::once(100)
                .chain((0..1000).map(|i| i % 50))
                .collect();
            assert_eq!(got, want);
        }
    }
}
