//! `courier bench`: the peers' workloads (`../shared/peers/README.md`) on courier.
//!
//! * `rpc`: a `#[courier::service]` echo over TCP, server in a child process;
//! * `raw`: the same scenarios on bare tokio + `LengthDelimitedCodec`, the floor;
//! * `bus`: publish/subscribe and request/reply through a `courier broker` child process;
//! * `bus-raw`: the bus's pub/sub scenarios and `req_seq` through a relay on bare tokio
//!   that forwards frames as it read them, the bus's floor.
//!
//! Latencies are measured around each call in the client and reported as nearest-rank
//! percentiles over every call of the measured phase. One JSON line per scenario with
//! `--json` (the peers' field names), a table otherwise; a progress bar on stderr.

pub(crate) mod bus;
pub(crate) mod memory;
pub(crate) mod raw;
pub(crate) mod relay;
pub(crate) mod rpc;
pub(crate) mod stream;

use std::fmt;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

/// Flags shared by `bench rpc` and `bench raw`: those of tarpc-bench, same defaults.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RpcFlags {
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "16,4096")]
    pub(crate) sizes: Vec<usize>,
    /// Calls measured in `seq`.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) seq_calls: usize,
    /// Calls before `seq`'s measurement, not measured.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) seq_warmup: usize,
    /// Seconds measured in `concurrent` and `multi_conn`.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration_s: f64,
    /// Seconds of warm-up before them, not measured.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) warmup_s: f64,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 64)]
    pub(crate) inflight: usize,
    /// Connections in `multi_conn`.
    #[arg(long, default_value_t = 4)]
    pub(crate) conns: usize,
    /// Use a server already running there instead of starting one.
    #[arg(long)]
    pub(crate) connect: Option<String>,
    /// Run only these scenarios (comma-separated: seq, concurrent, multi_conn); all by
    /// default.
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// Which argument types `bench rpc` measures (`vec`, `bytes`); both by default.
    #[arg(long, value_delimiter = ',', default_value = "vec,bytes")]
    pub(crate) arguments: Vec<String>,
    /// One JSON line per scenario instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

impl RpcFlags {
    pub(crate) fn wants(&self, scenario: RpcScenario) -> bool {
        selected(&self.only, scenario.as_str())
    }

    /// Connections `scenario` calls on.
    pub(crate) fn connections(&self, scenario: RpcScenario) -> usize {
        match scenario {
            RpcScenario::MultiConn => self.conns.max(1),
            RpcScenario::Seq | RpcScenario::Concurrent => 1,
        }
    }

    /// Calls `scenario` keeps in flight on each connection.
    pub(crate) fn in_flight_per_conn(&self, scenario: RpcScenario) -> usize {
        match scenario {
            RpcScenario::Seq => 1,
            RpcScenario::Concurrent | RpcScenario::MultiConn => self.inflight,
        }
    }
}

/// Whether `--only` (`only`) selects the scenario named `name`: all are selected when it
/// is empty.
pub(crate) fn selected(only: &[String], name: &str) -> bool {
    only.is_empty() || only.iter().any(|s| s == name)
}

/// The scenarios of `bench rpc` and `bench raw`, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RpcScenario {
    /// One call at a time on one connection.
    Seq,
    /// `--inflight` calls in flight on one connection.
    Concurrent,
    /// `--inflight` calls in flight on each of `--conns` connections.
    MultiConn,
}

impl RpcScenario {
    pub(crate) const ALL: [RpcScenario; 3] = [
        RpcScenario::Seq,
        RpcScenario::Concurrent,
        RpcScenario::MultiConn,
    ];

    /// Its name: in `--only`, in the `"scenario"` field and in the table.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RpcScenario::Seq => "seq",
            RpcScenario::Concurrent => "concurrent",
            RpcScenario::MultiConn => "multi_conn",
        }
    }
}

impl fmt::Display for RpcScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One client handle able to make an echo call of a fixed payload.
pub(crate) trait Caller: Clone + Send + Sync + 'static {
    /// One echo call; an error if it failed or the echo has the wrong length.
    fn call(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// What one phase measured.
#[derive(Debug)]
pub(crate) struct Measured {
    pub(crate) calls: usize,
    pub(crate) elapsed: Duration,
    /// Nanoseconds, one per call.
    pub(crate) latencies: Vec<u64>,
}

impl Measured {
    pub(crate) fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile `p` (0–100) in µs, 0.1 µs resolution.
    pub(crate) fn percentile_us(&mut self, p: f64) -> f64 {
        percentile_us(&mut self.latencies, p)
    }
}

/// Nearest rank: `sorted[ceil(p/100·n) − 1]`, in µs rounded to 0.1.
pub(crate) fn percentile_us(latencies: &mut [u64], p: f64) -> f64 {
    if latencies.is_empty() {
        return 0.0;
    }
    latencies.sort_unstable();
    let rank = ((p / 100.0) * latencies.len() as f64).ceil().max(1.0) as usize;
    let ns = latencies[rank.min(latencies.len()) - 1];
    (ns as f64 / 100.0).round() / 10.0
}

/// `warmup` calls, then `calls` calls, one at a time.
pub(crate) async fn sequential<C: Caller>(
    caller: &C,
    warmup: usize,
    calls: usize,
    bar: &ProgressBar,
) -> Result<Measured, String> {
    bar.set_length((warmup + calls) as u64);
    for _ in 0..warmup {
        caller.call().await?;
        bar.inc(1);
    }
    let mut latencies = Vec::with_capacity(calls);
    let started = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        caller.call().await?;
        latencies.push(t.elapsed().as_nanos() as u64);
        bar.inc(1);
    }
    Ok(Measured {
        calls,
        elapsed: started.elapsed(),
        latencies,
    })
}

/// `inflight` tasks per caller (one caller per connection) calling in a loop: a warm-up
/// phase, discarded, then the measured phase.
pub(crate) async fn concurrent<C: Caller>(
    callers: &[C],
    inflight: usize,
    warmup: Duration,
    duration: Duration,
    bar: &ProgressBar,
) -> Result<Measured, String> {
    bar.set_length((warmup + duration).as_secs().max(1));
    let ticker = tick_each_second(bar.clone());
    phase(callers, inflight, warmup).await?;
    let measured = phase(callers, inflight, duration).await;
    ticker.abort();
    measured
}

fn tick_each_second(bar: ProgressBar) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        loop {
            every.tick().await;
            bar.inc(1);
        }
    })
}

async fn phase<C: Caller>(
    callers: &[C],
    inflight: usize,
    duration: Duration,
) -> Result<Measured, String> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(callers.len() * inflight);
    for caller in callers {
        for _ in 0..inflight {
            let caller = caller.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(4096);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    caller.call().await?;
                    latencies.push(t.elapsed().as_nanos() as u64);
                }
                Ok::<_, String>(latencies)
            }));
        }
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(
            task.await
                .map_err(|e| format!("a bench task failed: {e}"))??,
        );
    }
    Ok(Measured {
        calls: latencies.len(),
        elapsed: started.elapsed(),
        latencies,
    })
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub(crate) fn progress(label: String) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label);
    bar
}

/// Prints results: JSON lines, or a table (header first).
#[derive(Debug)]
pub(crate) struct Report {
    json: bool,
    header_printed: bool,
}

impl Report {
    pub(crate) fn new(json: bool) -> Report {
        Report {
            json,
            header_printed: false,
        }
    }

    /// One scenario's line; `rate_key` names its main rate field.
    pub(crate) fn line(&mut self, fields: Map<String, Value>, rate_key: &str) {
        if self.json {
            println!("{}", Value::Object(fields));
            return;
        }
        if memory::is_memory_row(&fields) {
            memory::print_row(&fields);
            return;
        }
        if !self.header_printed {
            println!(
                "{:<16} {:>9} {:>8} {:>14} {:>10} {:>10}  notes",
                "scenario", "argument", "bytes", "per second", "p50 µs", "p99 µs"
            );
            self.header_printed = true;
        }
        let get = |k: &str| fields.get(k).cloned().unwrap_or(Value::Null);
        let num = |k: &str| match get(k) {
            Value::Number(n) => n.to_string(),
            _ => "-".to_string(),
        };
        let text = |k: &str| match get(k) {
            Value::String(s) => s,
            _ => "-".to_string(),
        };
        let mut notes = Vec::new();
        for key in [
            "lost",
            "broker_peak_rss_kib",
            "served_per_responder",
            "errors",
        ] {
            if let Some(v) = fields.get(key) {
                notes.push(format!("{key}={v}"));
            }
        }
        println!(
            "{:<16} {:>9} {:>8} {:>14} {:>10} {:>10}  {}",
            text("scenario"),
            text("argument"),
            num("payload_bytes"),
            num(rate_key),
            num("p50_us"),
            num("p99_us"),
            notes.join(" ")
        );
    }
}

/// `json!`-built fields as a map.
pub(crate) fn fields(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// Rounds a rate to a whole number, as the peers print it.
pub(crate) fn whole(rate: f64) -> Value {
    json!(rate.round())
}

/// A server in a child process: `courier <args>`; its first stdout line that ends in an
/// address is where it listens. Killed (by its pid) when dropped.
#[derive(Debug)]
pub(crate) struct ChildServer {
    child: Child,
    pub(crate) addr: String,
}

impl ChildServer {
    pub(crate) fn start(args: &[&str]) -> Result<ChildServer, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
        // the server's log is dropped, or appended to $COURIER_BENCH_SERVER_LOG
        let stderr = match std::env::var_os("COURIER_BENCH_SERVER_LOG") {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map(Stdio::from)
                .map_err(|e| format!("cannot open {}: {e}", path.to_string_lossy()))?,
            None => Stdio::null(),
        };
        let mut child = Command::new(&exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start `{} {}`: {e}", exe.display(), args.join(" ")))?;
        let stdout = child.stdout.take().ok_or("no stdout from the child")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("reading the child's address: {e}"))?;
        let addr = line
            .split_whitespace()
            .last()
            .ok_or_else(|| format!("`{}` printed no address", args.join(" ")))?
            .to_owned();
        Ok(ChildServer { child, addr })
    }

    /// Its peak resident set (VmHWM) so far, in KiB, where /proc says.
    pub(crate) fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.child.id(), "VmHWM:")
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A `… kB` field of `/proc/<pid>/status` (`"VmRSS:"`, `"VmHWM:"`), in KiB.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server at `connect`, or a child process started with `args`; keep the first
/// element alive for as long as the server is needed.
pub(crate) fn server_or(
    connect: &Option<String>,
    args: &[&str],
) -> Result<(Option<ChildServer>, String), String> {
    match connect {
        Some(addr) => Ok((None, addr.clone())),
        None => {
            let server = ChildServer::start(args)?;
            let addr = server.addr.clone();
            Ok((Some(server), addr))
        }
    }
}

/// For a server run as a child (`courier bench serve-*`): binds `addr`, prints
/// `LISTENING <addr>` for the parent, and exits when the parent closes stdin (or dies).
pub(crate) async fn child_listener(addr: &str) -> Result<tokio::net::TcpListener, String> {
    exit_when_stdin_closes();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    println!("LISTENING {local}");
    Ok(listener)
}

/// For servers run as a child: exit when the parent closes our stdin (or dies).
fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            sink.clear();
        }
        std::process::exit(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut l: Vec<u64> = (1..=100).map(|i| i * 1_000).collect();
        assert_eq!(percentile_us(&mut l, 50.0), 50.0);
        assert_eq!(percentile_us(&mut l, 99.0), 99.0);
        let mut l = vec![1_234, 5_678];
        assert_eq!(percentile_us(&mut l, 50.0), 1.2);
        assert_eq!(percentile_us(&mut l, 99.0), 5.7);
        assert_eq!(percentile_us(&mut [], 50.0), 0.0);
    }
}
