//! `courier bench bus`'s memory scenarios: what a broker keeps resident for each idle
//! connection (`mem_idle_conns`) and for each subscription (`mem_subs`).
//!
//! Each scenario starts a fresh `courier broker` child, reads its `VmRSS` from `/proc`,
//! opens the connections (or the subscriptions), waits until the broker has answered all
//! of them, and reads `VmRSS` again: the difference divided by the count. With
//! `--nats-server BIN`, a nats-server started from that binary is measured the same way
//! in the same run, over its own protocol, and the row gives both and their ratio.
//!
//! * An idle connection has said hello and been answered: courier's connect frame and
//!   the broker's; NATS's `INFO`, `CONNECT` and a `PING` answered by `PONG`.
//! * Subscriptions are spread over as few connections as the broker's per-connection
//!   limit allows (65,536 by default), on distinct subjects `mem.<n>`; a ping after the
//!   last is answered once the server has taken them all.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use mq_transport::BrokerConfig;
use rpc_core::codec::FrameCodec;
use rpc_core::frame::{Connect, Frame, Subscribe};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use super::{ChildServer, fields};

/// Open files (and broker connections) beyond the measured ones: the bench's own, the
/// runtime's, the connections around the measured ones.
const HEADROOM: usize = 64;
/// How long the server may take to answer a handshake or a ping.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// Let the server's allocator settle before reading its memory.
const SETTLE: Duration = Duration::from_millis(200);

/// Which memory scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemScenario {
    /// `count` idle connections.
    IdleConns,
    /// `count` subscriptions.
    Subs,
}

impl MemScenario {
    /// Its name: in `--only`, in the `"scenario"` field and in the table.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MemScenario::IdleConns => "mem_idle_conns",
            MemScenario::Subs => "mem_subs",
        }
    }

    /// What its count counts.
    fn unit(self) -> &'static str {
        match self {
            MemScenario::IdleConns => "connections",
            MemScenario::Subs => "subscriptions",
        }
    }
}

/// Subscriptions per connection: the broker's default limit, which `mem_subs` keeps.
fn subs_per_conn() -> usize {
    BrokerConfig::default().max_subscriptions
}

/// A server being measured: a courier broker or a nats-server, in a child process.
enum Server {
    Courier(ChildServer),
    Nats {
        child: Child,
        addr: String,
        /// Where it writes its ports file; removed with it.
        _dir: tempfile::TempDir,
    },
}

impl Server {
    fn courier(scenario: MemScenario, count: usize) -> Result<Server, String> {
        // room for the measured connections and the few around them
        let max = (count + HEADROOM)
            .max(BrokerConfig::default().max_connections)
            .to_string();
        let args = match scenario {
            MemScenario::IdleConns => vec![
                "broker",
                "--listen",
                "127.0.0.1:0",
                "--max-connections",
                &max,
            ],
            MemScenario::Subs => vec!["broker", "--listen", "127.0.0.1:0"],
        };
        Ok(Server::Courier(ChildServer::start(&args)?))
    }

    /// `bin -a 127.0.0.1 -p -1`, its port read from the ports file it writes into a
    /// temporary directory.
    async fn nats(bin: &Path) -> Result<Server, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a directory: {e}"))?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let ports = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let mut server = Server::Nats {
            child,
            addr: String::new(),
            _dir: dir,
        };
        for _ in 0..100 {
            if let Ok(text) = std::fs::read_to_string(&ports)
                && let Ok(json) = serde_json::from_str::<Value>(&text)
                && let Some(url) = json["nats"][0].as_str()
            {
                if let Server::Nats { addr, .. } = &mut server {
                    *addr = url.trim_start_matches("nats://").to_owned();
                }
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "{} wrote no ports file within 10 s ({})",
            bin.display(),
            ports.display()
        ))
    }

    fn addr(&self) -> &str {
        match self {
            Server::Courier(child) => &child.addr,
            Server::Nats { addr, .. } => addr,
        }
    }

    fn rss_kib(&self) -> Result<u64, String> {
        let pid = match self {
            Server::Courier(child) => child.pid(),
            Server::Nats { child, .. } => child.id(),
        };
        super::status_kib(pid, "VmRSS:").ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
    }

    /// A connection that has said hello and been answered.
    async fn hello(&self) -> Result<TcpStream, String> {
        let mut stream = TcpStream::connect(self.addr())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.addr()))?;
        match self {
            Server::Courier(_) => {
                let hello = Frame::Connect(Connect {
                    name: "bench-mem".into(),
                    ..Connect::default()
                });
                write_frames(&mut stream, &[hello]).await?;
                read_until(&mut stream, Answer::Connect).await?;
            }
            Server::Nats { .. } => {
                stream
                    .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")
                    .await
                    .map_err(|e| format!("writing to nats-server: {e}"))?;
                read_until(&mut stream, Answer::NatsPong).await?;
            }
        }
        Ok(stream)
    }

    /// Subscribes `stream` to `mem.<n>` for each n in `range`, then waits for a ping's
    /// answer: every one of them is in.
    async fn subscribe(
        &self,
        stream: &mut TcpStream,
        range: std::ops::Range<usize>,
    ) -> Result<(), String> {
        match self {
            Server::Courier(_) => {
                let mut frames: Vec<Frame> = range
                    .map(|n| {
                        Frame::Sub(Subscribe {
                            sid: n as u64,
                            subject: format!("mem.{n}").into(),
                            queue: "".into(),
                        })
                    })
                    .collect();
                frames.push(Frame::Ping { nonce: 1 });
                write_frames(stream, &frames).await?;
                read_until(stream, Answer::Pong).await
            }
            Server::Nats { .. } => {
                let mut text = String::new();
                for n in range {
                    text.push_str(&format!("SUB mem.{n} {n}\r\n"));
                }
                text.push_str("PING\r\n");
                stream
                    .write_all(text.as_bytes())
                    .await
                    .map_err(|e| format!("writing to nats-server: {e}"))?;
                read_until(stream, Answer::NatsPong).await
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Server::Courier(_) => "courier broker",
            Server::Nats { .. } => "nats-server",
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Nats { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What [`read_until`] waits for.
#[derive(Clone, Copy)]
enum Answer {
    /// The broker's connect frame.
    Connect,
    /// A pong frame.
    Pong,
    /// NATS's `PONG` line.
    NatsPong,
}

async fn write_frames(stream: &mut TcpStream, frames: &[Frame]) -> Result<(), String> {
    let mut codec = FrameCodec::new(64 * 1024 * 1024);
    let mut buf = BytesMut::new();
    for frame in frames {
        codec
            .encode(frame, &mut buf)
            .map_err(|e| format!("encoding a {:?} frame: {e}", frame.kind()))?;
    }
    stream
        .write_all(&buf)
        .await
        .map_err(|e| format!("writing to the broker: {e}"))
}

/// Reads from `stream` until `answer` arrived, within [`ANSWER_WITHIN`].
async fn read_until(stream: &mut TcpStream, answer: Answer) -> Result<(), String> {
    let wait = async {
        let mut buf = BytesMut::with_capacity(4096);
        let mut codec = FrameCodec::new(64 * 1024 * 1024);
        loop {
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("reading the server's answer: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "the server closed the connection: {}",
                    String::from_utf8_lossy(&buf)
                ));
            }
            match answer {
                Answer::NatsPong => {
                    if buf.windows(6).any(|w| w == b"PONG\r\n") {
                        return Ok(());
                    }
                    if buf.windows(4).any(|w| w == b"-ERR") {
                        return Err(format!("nats-server: {}", String::from_utf8_lossy(&buf)));
                    }
                }
                Answer::Connect | Answer::Pong => {
                    while let Some(frame) = codec
                        .decode(&mut buf)
                        .map_err(|e| format!("a frame from the broker: {e}"))?
                    {
                        match (answer, frame) {
                            (Answer::Connect, Frame::Connect(_))
                            | (Answer::Pong, Frame::Pong { .. }) => {
                                return Ok(());
                            }
                            (_, Frame::GoAway(g)) => {
                                return Err(format!("the broker went away: {}", g.message));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(ANSWER_WITHIN, wait)
        .await
        .map_err(|_| format!("no answer from the server within {ANSWER_WITHIN:?}"))?
}

/// One server's figure for `scenario`: resident bytes per connection or subscription,
/// and the RSS before and after.
async fn measure(
    server: &Server,
    scenario: MemScenario,
    count: usize,
) -> Result<(f64, u64, u64), String> {
    // the connections around the measured ones (for subscriptions) come first
    let mut streams = Vec::new();
    if scenario == MemScenario::Subs {
        for _ in 0..count.div_ceil(subs_per_conn()) {
            streams.push(server.hello().await?);
        }
    }
    tokio::time::sleep(SETTLE).await;
    let before = server.rss_kib()?;
    match scenario {
        MemScenario::IdleConns => {
            streams.reserve(count);
            for _ in 0..count {
                streams.push(server.hello().await?);
            }
        }
        MemScenario::Subs => {
            let per_conn = subs_per_conn();
            for (i, stream) in streams.iter_mut().enumerate() {
                let start = i * per_conn;
                server
                    .subscribe(stream, start..(start + per_conn).min(count))
                    .await?;
            }
        }
    }
    tokio::time::sleep(SETTLE).await;
    let after = server.rss_kib()?;
    drop(streams);
    let per = after.saturating_sub(before) as f64 * 1024.0 / count as f64;
    Ok((per, before, after))
}

/// Open files this process may have: the soft limit, from `/proc/self/limits`.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Runs `scenario` with `count` connections or subscriptions on a courier broker, and
/// on nats-server when `nats` names its binary.
pub(crate) async fn run(
    scenario: MemScenario,
    count: usize,
    nats: Option<&Path>,
) -> Result<Map<String, Value>, String> {
    let needed = count + HEADROOM;
    if scenario == MemScenario::IdleConns
        && let Some(limit) = open_files_limit()
        && limit < needed
    {
        return Err(format!(
            "{}: {count} connections need {needed} open files and this process may have \
             {limit}; raise it (`ulimit -n {needed}`) or lower --mem-conns",
            scenario.as_str(),
        ));
    }
    let courier = Server::courier(scenario, count)?;
    let (per, before, after) = measure(&courier, scenario, count)
        .await
        .map_err(|e| format!("{} on the {}: {e}", scenario.as_str(), courier.name()))?;
    drop(courier);
    let mut row = fields(json!({
        "system": "courier",
        "scenario": scenario.as_str(),
        "count": count,
        "unit": scenario.unit(),
        "broker_rss_before_kib": before,
        "broker_rss_after_kib": after,
        "broker_bytes_per": per.round(),
    }));
    if let Some(bin) = nats {
        let measured = match Server::nats(bin).await {
            Ok(server) => measure(&server, scenario, count)
                .await
                .map_err(|e| format!("{} on {}: {e}", scenario.as_str(), server.name())),
            Err(e) => Err(e),
        };
        // the broker's figure stands without the peer's
        let (nats_per, nats_before, nats_after) = match measured {
            Ok(figures) => figures,
            Err(e) => {
                eprintln!("{e}");
                row.insert("nats_error".into(), json!(e));
                return Ok(row);
            }
        };
        row.extend(fields(json!({
            "nats_server": bin.display().to_string(),
            "nats_rss_before_kib": nats_before,
            "nats_rss_after_kib": nats_after,
            "nats_bytes_per": nats_per.round(),
            "courier_over_nats": if nats_per > 0.0 { json!((per / nats_per * 100.0).round() / 100.0) } else { Value::Null },
        })));
    }
    Ok(row)
}

/// The row of a memory scenario that could not be measured, saying why.
pub(crate) fn failed(scenario: MemScenario, count: usize, error: &str) -> Map<String, Value> {
    fields(json!({
        "system": "courier",
        "scenario": scenario.as_str(),
        "count": count,
        "error": error,
    }))
}

/// Whether `row` is a memory scenario's (its table line differs from the rates').
pub(crate) fn is_memory_row(row: &Map<String, Value>) -> bool {
    row.get("scenario")
        .and_then(Value::as_str)
        .is_some_and(|s| s == MemScenario::IdleConns.as_str() || s == MemScenario::Subs.as_str())
}

/// A memory row as a line of the table.
pub(crate) fn print_row(row: &Map<String, Value>) {
    let num = |k: &str| row.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let text = |k: &str| row.get(k).and_then(Value::as_str).unwrap_or("-");
    if let Some(error) = row.get("error").and_then(Value::as_str) {
        println!("{:<16} not measured: {error}", text("scenario"));
        return;
    }
    let mut line = format!(
        "{:<16} {} {}: courier broker {:.0} B each (RSS {} -> {} KiB)",
        text("scenario"),
        num("count"),
        text("unit"),
        num("broker_bytes_per"),
        num("broker_rss_before_kib"),
        num("broker_rss_after_kib"),
    );
    if let Some(error) = row.get("nats_error").and_then(Value::as_str) {
        line.push_str(&format!("; nats-server not measured: {error}"));
    }
    if row.contains_key("nats_bytes_per") {
        line.push_str(&format!(
            "; nats-server {:.0} B each (RSS {} -> {} KiB); courier / nats-server {}",
            num("nats_bytes_per"),
            num("nats_rss_before_kib"),
            num("nats_rss_after_kib"),
            row.get("courier_over_nats")
                .map_or("-".to_string(), Value::to_string),
        ));
    }
    println!("{line}");
}
