//! Hostile peers against real server processes: `courier broker` and the RPC server of
//! `courier bench serve-rpc`, each a child process of this test, attacked over loopback
//! while a healthy client keeps making requests beside the attacker.
//!
//! Each case prints the server's memory (VmRSS before, VmHWM after, from `/proc`) and the
//! healthy client's worst request/reply latency, and asserts the documented bounds:
//!
//! * memory a hostile connection costs: at most `max_queued_bytes` + one frame +
//!   [`SLACK`] (allocator and bookkeeping);
//! * a healthy client never waits more than 1 s (the goal is under 200 ms, which
//!   nats-server meets in the same cases).
//!
//! `COURIER_BIN=/path/to/courier` runs the same attacks against another build.
//!
//! They are `#[ignore]`d because they need file descriptors (5,000 connections), time and
//! a release build to say anything about speed; `.ci/run` runs them with
//! `cargo test --release -p courier-cli --test hostile -- --ignored --test-threads 1`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use courier::bus::{Bus, Message};
use courier::frame::{Connect, Frame, Publish, Request, Subscribe};
use courier::{Client, ClientConfig};
use rpc_core::codec::FrameCodec;
use rpc_core::transport::TcpConnector;
use tokio_util::codec::Encoder;

/// Memory allowed besides the queued bytes and one frame: the allocator's arenas, the
/// connection's tasks, buffers and maps.
const SLACK: u64 = 8 * 1024 * 1024;
/// The longest a healthy client may wait for an answer while an attack runs.
const WORST_ALLOWED: Duration = Duration::from_secs(1);
/// The broker's send queue limit in these tests (`--max-queued-bytes`).
const BROKER_QUEUED: u64 = 8 * 1024 * 1024;

/// A server process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn broker(extra: &[&str]) -> Server {
        let mut args = vec![
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--max-queued-bytes",
            "8388608",
        ];
        args.extend_from_slice(extra);
        Server::start(&args, "listening on ")
    }

    fn rpc() -> Server {
        Server::start(&["bench", "serve-rpc", "127.0.0.1:0"], "LISTENING ")
    }

    fn start(args: &[&str], marker: &str) -> Server {
        // COURIER_BIN runs the same attacks against another build (an older one, to
        // compare).
        let bin = std::env::var("COURIER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_courier").to_owned());
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("courier starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("a first line");
        let addr = line
            .split(marker)
            .nth(1)
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim()
            .to_owned();
        Server {
            child,
            addr,
            _stdout: stdout,
        }
    }

    /// A `/proc/<pid>/status` field, in KiB.
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    fn rss(&self) -> u64 {
        self.status_kib("VmRSS:") * 1024
    }

    fn peak(&self) -> u64 {
        self.status_kib("VmHWM:") * 1024
    }
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    FrameCodec::new(64 * 1024 * 1024)
        .encode(frame, &mut buf)
        .expect("encodable");
    buf.to_vec()
}

/// A raw connection that has said hello to the broker (and reads nothing).
fn raw_bus_peer(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .write_all(&encode(&Frame::Connect(Connect {
            name: "attacker".into(),
            ..Connect::default()
        })))
        .expect("hello");
    stream
}

/// Writes `frame` again and again until the server stops reading (a write blocks for
/// 2 s) or `limit` bytes went out; returns the bytes written.
fn flood(stream: &mut TcpStream, frame: &[u8], limit: u64) -> u64 {
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut written = 0u64;
    while written < limit {
        match stream.write_all(frame) {
            Ok(()) => written += frame.len() as u64,
            Err(_) => break, // the server stopped reading: back-pressure
        }
    }
    written
}

/// A healthy client of the broker: request/reply through it until stopped.
struct HealthyBus {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Duration)>,
}

impl HealthyBus {
    async fn start(addr: &str) -> HealthyBus {
        let responder = Bus::connect(addr).await.expect("responder connects");
        let mut requests = responder.subscribe("healthy.echo").await.unwrap();
        let replier = responder.clone();
        tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                if let Some(reply) = m.reply {
                    let _ = replier.publish(reply, m.payload).await;
                }
            }
        });
        let requester = Bus::connect(addr).await.expect("requester connects");
        // Warm up: the first request sets up the inbox path.
        requester.request("healthy.echo", "warm").await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let _responder = responder;
            let (mut count, mut worst) = (0u64, Duration::ZERO);
            while !stopping.load(Ordering::Relaxed) {
                let started = Instant::now();
                let answer = requester
                    .request_message(
                        Message::new("healthy.echo", "ping"),
                        Duration::from_secs(30),
                    )
                    .await;
                assert!(answer.is_ok(), "healthy request failed: {answer:?}");
                worst = worst.max(started.elapsed());
                count += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (count, worst)
        });
        HealthyBus { stop, task }
    }

    async fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("healthy client")
    }
}

fn report(case: &str, server: &Server, before: u64, healthy: (u64, Duration), extra: &str) {
    let peak = server.peak();
    println!(
        "{case}: server RSS before {:.1} MiB, peak {:.1} MiB (+{:.1} MiB); healthy client: \
         {} requests, worst wait {:.1} ms{extra}",
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
        healthy.0,
        healthy.1.as_secs_f64() * 1e3
    );
    assert!(healthy.0 > 0, "the healthy client got answers");
    assert!(
        healthy.1 < WORST_ALLOWED,
        "{case}: a healthy client waited {:?}",
        healthy.1
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Asserts that the server grew by at most `bound` bytes since `before`.
fn assert_bounded(case: &str, server: &Server, before: u64, bound: u64) {
    let grew = server.peak().saturating_sub(before);
    assert!(
        grew <= bound,
        "{case}: the server grew by {:.1} MiB, over the bound of {:.1} MiB",
        mib(grew),
        mib(bound)
    );
}

/// A broker attacked by one peer that writes `frame` over and over (up to `limit`
/// bytes) and reads nothing, while a healthy client runs beside it. Its growth must stay
/// within the queue limit, one frame and the slack.
async fn flood_a_broker_that_never_gets_read(case: &str, what: &str, frame: Vec<u8>, limit: u64) {
    let broker = Server::broker(&[]);
    let healthy = HealthyBus::start(&broker.addr).await;
    let before = broker.rss();
    let mut attacker = raw_bus_peer(&broker.addr);
    let (sent, _attacker) = tokio::task::spawn_blocking(move || {
        let sent = flood(&mut attacker, &frame, limit);
        (sent, attacker)
    })
    .await
    .unwrap();
    let healthy = healthy.finish().await;
    report(
        case,
        &broker,
        before,
        healthy,
        &format!("; attacker sent {:.1} MiB of {what}", mib(sent)),
    );
    assert_bounded(case, &broker, before, BROKER_QUEUED + 1024 * 1024 + SLACK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "hostile-peer suite: run by .ci/run with --release --ignored"]
async fn a_broker_peer_that_never_reads_its_pongs_costs_at_most_its_queue() {
    let pings = encode(&Frame::Ping { nonce: 1 }).repeat(4096);
    flood_a_broker_that_never_gets_read("pings never read", "pings", pings, 256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "hostile-peer suite: run by .ci/run with --release --ignored"]
async fn a_broker_peer_that_never_reads_its_refusals_costs_at_most_its_queue() {
    // A 60 KB filter is over the subject limit: each is refused with a status message
    // that echoes it, plus an unsubscribe.
    let refused = encode(&Frame::Sub(Subscribe {
        sid: 1,
        subject: "a".repeat(60_000).into(),
        queue: "".into(),
    }));
    flood_a_broker_that_never_gets_read(
        "refusals never read",
        "refused subscriptions",
        refused,
        1 << 30,
    )
    .await;
}

#[courier::service]
trait Echo {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "hostile-peer suite: run by .ci/run with --release --ignored"]
async fn an_rpc_peer_that_never_reads_its_answers_costs_at_most_its_queue() {
    let server = Server::rpc();
    let client = Client::connect(
        TcpConnector::new(server.addr.clone()),
        ClientConfig::default(),
    )
    .await
    .expect("healthy client connects");
    let echo = EchoClient::new(client);
    echo.echo(vec![1; 16]).await.unwrap();
    let before = server.rss();

    // 1 MiB echo requests, answers never read. The argument is one byte string: a
    // varint length (0xFC + u32) and the bytes.
    let mut payload = vec![0xFC];
    payload.extend_from_slice(&(1024u32 * 1024).to_le_bytes());
    payload.extend(std::iter::repeat_n(0xAB, 1024 * 1024));
    let request = encode(&Frame::Request(Request {
        id: 0,
        timeout: None,
        method: "Echo.echo".into(),
        metadata: Default::default(),
        payload: payload.into(),
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let attack = {
        let (addr, stop, sent) = (server.addr.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_write_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut id = 1u64;
            let mut frame = request;
            while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 1 << 30 {
                // A fresh id per request (bytes 6..14 of the frame: after the length
                // prefix and the version and kind bytes).
                frame[6..14].copy_from_slice(&id.to_be_bytes());
                id += 1;
                if stream.write_all(&frame).is_err() {
                    break; // the server stopped reading
                }
                sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            stream
        })
    };
    // A healthy caller beside it.
    let (mut count, mut worst) = (0u64, Duration::ZERO);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let started = Instant::now();
        echo.echo(vec![2; 16]).await.expect("healthy call");
        worst = worst.max(started.elapsed());
        count += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _attacker = attack.join().unwrap();
    report(
        "RPC answers never read",
        &server,
        before,
        (count, worst),
        &format!(
            "; attacker sent {:.1} MiB of 1 MiB echo requests",
            mib(sent.load(Ordering::Relaxed))
        ),
    );
    // The RPC server's queue limit is the default, 64 MiB; a frame is 1 MiB here.
    let bound = 64 * 1024 * 1024 + 2 * 1024 * 1024 + SLACK;
    assert_bounded("RPC answers never read", &server, before, bound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "hostile-peer suite: run by .ci/run with --release --ignored"]
async fn a_hundred_connections_each_holding_a_partial_maximum_frame_cost_what_they_sent() {
    let broker = Server::broker(&[]);
    let healthy = HealthyBus::start(&broker.addr).await;
    let before = broker.rss();
    // The frame limit the broker states: sized to its payload limit (1 MiB) plus 64 KiB
    // of headroom, not 8 MiB.
    let mut probe = raw_bus_peer(&broker.addr);
    let Frame::Connect(stated) = read_frame(&mut probe) else {
        panic!("expected the broker's connect");
    };
    let max_frame = stated.max_frame_len as usize;
    assert!(
        max_frame <= 1024 * 1024 + 64 * 1024,
        "the broker takes frames of {max_frame} bytes for a 1 MiB payload limit"
    );
    let mut held = Vec::new();
    let mut partial = (max_frame as u32).to_be_bytes().to_vec();
    partial.extend(std::iter::repeat_n(0u8, max_frame - 1));
    for _ in 0..100 {
        let mut stream = raw_bus_peer(&broker.addr);
        stream.write_all(&partial).unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let healthy = healthy.finish().await;
    let grew = broker.peak().saturating_sub(before);
    report(
        "100 partial maximum frames",
        &broker,
        before,
        healthy,
        &format!(
            "; frames of {:.2} MiB, {:.2} MiB per connection",
            mib(max_frame as u64),
            mib(grew) / 100.0
        ),
    );
    // Each connection may cost its frame, its read buffer's 64 KiB, and what glibc's heaps
    // keep besides: the `courier` binary takes buffers under 4 MiB from them, and free heap
    // chunks stay with the process (`MMAP_THRESHOLD` in `src/main.rs`; likely the sizes
    // the read buffer grew through). Measured: 1.23 to 1.28 MiB per connection for a
    // 1.06 MiB frame, in six runs. A quarter of a frame more than before is allowed.
    let per_connection = max_frame as u64 + max_frame as u64 / 4 + 64 * 1024;
    assert!(
        grew <= 100 * per_connection + SLACK,
        "{:.1} MiB for 100 partial frames of {:.2} MiB",
        mib(grew),
        mib(max_frame as u64)
    );
    drop(held);
}

/// Reads one frame, blocking.
fn read_frame(stream: &mut TcpStream) -> Frame {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut codec = FrameCodec::new(64 * 1024 * 1024);
    let mut buf = BytesMut::new();
    let mut byte = [0u8; 1];
    loop {
        if let Some(frame) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf).unwrap() {
            return frame;
        }
        stream.read_exact(&mut byte).expect("a frame");
        buf.extend_from_slice(&byte);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "hostile-peer suite: run by .ci/run with --release --ignored"]
async fn five_thousand_idle_connections_cost_under_64_kib_each() {
    const N: usize = 5_000;
    let broker = Server::broker(&["--max-connections", "20000"]);
    let healthy = HealthyBus::start(&broker.addr).await;
    let before = broker.rss();
    let mut idle = Vec::with_capacity(N);
    for _ in 0..N {
        idle.push(raw_bus_peer(&broker.addr));
    }
    // Every hello answered: the connections are established on the broker's side.
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut first = [0u8; 4];
        stream.read_exact(&mut first).expect("the broker's connect");
    }
    let after = broker.rss();
    let healthy = healthy.finish().await;
    let per = after.saturating_sub(before) as f64 / N as f64;
    report(
        "5,000 idle connections",
        &broker,
        before,
        healthy,
        &format!("; {:.1} KiB per idle connection (VmRSS)", per / 1024.0),
    );
    assert!(per < 64.0 * 1024.0, "{per} bytes per idle connection");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "hostile-peer suite: run by .ci/run with --release --ignored"]
async fn dropping_65536_subscriptions_at_once_stalls_nobody() {
    const N: u64 = 65_536;
    let broker = Server::broker(&[]);
    let healthy = HealthyBus::start(&broker.addr).await;
    // Another client keeps the broker's match cache full while the subscriptions go.
    let churn = Bus::connect(broker.addr.as_str()).await.unwrap();
    let churning = Arc::new(AtomicBool::new(true));
    let cache_filler = {
        let churning = churning.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while churning.load(Ordering::Relaxed) {
                churn
                    .publish(format!("fill.{}", i % 4096), "x")
                    .await
                    .unwrap();
                i += 1;
                if i.is_multiple_of(256) {
                    churn.flush().await.unwrap();
                }
            }
        })
    };
    let before = broker.rss();
    let mut attacker = raw_bus_peer(&broker.addr);
    let mut subs = Vec::new();
    for sid in 0..N {
        subs.extend(encode(&Frame::Sub(Subscribe {
            sid,
            subject: format!("many.{sid}").into(),
            queue: "".into(),
        })));
    }
    subs.extend(encode(&Frame::Pub(Publish {
        subject: "many.done".into(),
        ..Publish::default()
    })));
    attacker.write_all(&subs).unwrap();
    // A ping after them: its pong says all 65,536 are in.
    attacker
        .write_all(&encode(&Frame::Ping { nonce: 7 }))
        .unwrap();
    let mut reader = BufReader::new(attacker.try_clone().unwrap());
    let mut codec_buf = BytesMut::new();
    let mut chunk = [0u8; 64 * 1024];
    let mut codec = FrameCodec::new(64 * 1024 * 1024);
    'wait: loop {
        let n = reader.read(&mut chunk).expect("reads");
        assert!(n > 0, "the broker closed the attacker");
        codec_buf.extend_from_slice(&chunk[..n]);
        while let Some(frame) =
            tokio_util::codec::Decoder::decode(&mut codec, &mut codec_buf).unwrap()
        {
            if matches!(frame, Frame::Pong { nonce: 7 }) {
                break 'wait;
            }
        }
    }
    let loaded = broker.rss();
    drop(reader);
    drop(attacker); // all 65,536 go at once
    tokio::time::sleep(Duration::from_secs(2)).await;
    churning.store(false, Ordering::Relaxed);
    cache_filler.await.unwrap();
    let healthy = healthy.finish().await;
    // They are gone: a request to one of them reaches nobody.
    let probe = Bus::connect(broker.addr.as_str()).await.unwrap();
    let answer = probe.request("many.5", "").await;
    assert!(
        matches!(answer, Err(courier::bus::BusError::NoResponders { .. })),
        "the subscriptions are removed: {answer:?}"
    );
    report(
        "65,536 subscriptions dropped at once",
        &broker,
        before,
        healthy,
        &format!(
            "; {:.0} B per subscription (VmRSS)",
            loaded.saturating_sub(before) as f64 / N as f64
        ),
    );
}
