//! `courier bench stream`: nats-bench's JetStream workload (`../shared/peers/README.md`,
//! "JetStream scenarios") on courier's durable streams.
//!
//! # Where it runs
//!
//! `--backend broker` (the default): each row starts a `courier broker` child process
//! on 127.0.0.1 with `--store` on a fresh, empty directory, and publishes and consumes
//! through a [`Bus::connect`] connection to it, as JetStream's rows go through a
//! `nats-server` process over TCP. `--backend embedded`: each row opens a fresh
//! embedded bus ([`Bus::embedded_with`]) over a fresh directory
//! ([`Storage::Directory`]) in this process: no network hop, no second process. Every
//! row names its backend in `"backend"` and `"server"`. The data
//! directory is a fresh temporary directory under `$TMPDIR` (else `/tmp`), the
//! filesystem `run-js.sh` puts JetStream's store on; `--dir` picks another parent.
//! Each row's `"store_fs"` names the filesystem.
//!
//! # The stream
//!
//! One stream `BENCH_JS` capturing `bench.js.>`, file storage, one replica, no limits,
//! discard old, default 64 MiB segments, no `Msg-Id` sent. A fresh stream in a fresh
//! subdirectory (and a fresh bus) for every row; deleted, and the subdirectory removed,
//! after it. Subjects `bench.js.<seq|async|read>.<size>`, payload `0xAB` fill. Every row
//! reports the stream's state after the timed phase: `stream_messages`, `stream_bytes`
//! (courier counts a 36 B record header + subject + headers + payload per message;
//! JetStream 22 B + subject + payload + 8 B hash), `stream_first_seq`,
//! `stream_last_seq`, `stream_segments`.
//!
//! # Scenarios
//!
//! | scenario | what is done | timed |
//! | --- | --- | --- |
//! | `js_pub_seq` | `--seq-warmup` publishes (not measured), then `--seq-count`: publish, await its [`PubAck`], next | the measured loop; per op `Instant` before `publish` → ack resolved; `p50_us`/`p99_us` nearest rank over all of them |
//! | `js_pub_async` | a window of `--js-window` (64) outstanding acks: when it is full the **oldest** is awaited and checked, then the next message is published; the rest awaited at the end | first publish → last ack checked |
//! | `js_replay` | untimed pre-fill of N messages (the `js_pub_async` loop; every ack checked, the stream must hold N), then [`Streams::range`] from sequence 1 in batches of `--js-read-batch` (500, as async-nats' ordered consumer pulls) until the N-th message | first read → N-th message |
//! | `js_reopen` | (not compared) untimed pre-fill of `--js-reopen-count` 16 B messages, the bus dropped (the store closes: its committer writes and syncs what it holds), then a new embedded bus over the same directory and `info` of the stream | `Bus::embedded_with` → `info` returned (recovery of every segment) |
//!
//! | `js_consume` | per `--fsync` mode: untimed pre-fill of N messages (as above, the stream in that mode), then a durable consumer `bench_consume` (explicit ack, deliver all, ack wait 30 s, max ack pending 1,000, as JetStream's defaults); loop: one [`mq_transport::Consumer::fetch`] of up to `--js-batch` (256) messages with a zero wait (one outstanding) → every message checked and acked with a plain [`mq_transport::Delivery::ack`] (fire-and-forget: the consumer's state changes at once and reaches its state file with the next group-committed write; under `always` that write is `fdatasync`ed) → next fetch | first fetch → last ack; then untimed, the consumer's info is polled (≤ 10 s) until its ack floor reaches N with 0 pending |
//!
//! Checks, counted in the row exactly as nats-bench counts them: every ack — stream name,
//! not a duplicate, sequence = previous + 1 (`ack_mismatches`), errors (`ack_errors`);
//! every message read — sequence = previous + 1 (`out_of_order`), payload length
//! (`bad_length`), `redelivered` (always 0: a read from the log delivers each message
//! once). `lost`: publish rows = messages that should be in the stream (warm-up +
//! measured) − `stream_messages`; `js_replay` = N − received; `js_reopen` = N −
//! `stream_messages` after the reopen.
//!
//! # Durability labels (`"fsync"`)
//!
//! Each publish scenario runs once per `--fsync` mode (both by default):
//!
//! * `always`: [`Fsync::Always`]. A publish is acknowledged only after the `fdatasync`
//!   that covers it; publishes queued meanwhile share one write and one `fdatasync`
//!   (group commit). Nothing acknowledged is lost on a power loss. Comparable with
//!   nats-server 2.10+ `sync_interval: always` (one fsync per message there).
//! * `interval`: [`Fsync::Every`] 120 s. Acknowledged once written to the OS (page
//!   cache); the stream `fdatasync`s at most 120 s later (and when it is closed). Survives
//!   a kill of the process; a power loss or kernel crash can lose up to 120 s of acked
//!   messages: nats-server 2.9's default (2-minute sync timer, no fsync before the
//!   PubAck), which `run-js.sh` labels `interval`.
//!
//! `js_replay` and `js_reopen` pre-fill with `interval` (the pre-fill's durability does
//! not change what is read back) and are labelled so.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::ProgressBar;
use mq_transport::{
    AckPolicy, Bus, BusError, ConsumerConfig, EmbeddedConfig, Fsync, PubAck, PubAckFuture, Storage,
    StreamConfig, StreamState, Streams,
};
use rpc_core::Utf8Bytes;
use serde_json::{Map, Value, json};

use super::{Report, fields, percentile_us, progress, selected, whole};

/// The one stream name every row uses (as nats-bench's).
const STREAM: &str = "BENCH_JS";
/// The subjects it captures.
const SUBJECTS: &str = "bench.js.>";
/// `interval`'s fsync period: nats-server 2.9's hard-coded `SyncInterval`.
const INTERVAL: Duration = Duration::from_secs(120);
/// Payload size of the `js_reopen` pre-fill.
const REOPEN_PAYLOAD: usize = 16;
/// How often (in messages) the progress bars move.
const BAR_STEP: u64 = 4096;

/// A comma-separated list of numbers; `none` (or nothing) is the empty list, which
/// skips the scenarios it feeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct List(Vec<u64>);

fn parse_list(s: &str) -> Result<List, String> {
    let s = s.trim();
    if s.is_empty() || s == "none" {
        return Ok(List(Vec::new()));
    }
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<u64>()
                .map_err(|e| format!("`{x}` is not a count: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(List)
}

/// Which bus serves the streams (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// A `courier broker --store` child process, over TCP on 127.0.0.1.
    Broker,
    /// In this process.
    Embedded,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Broker => "broker",
            Backend::Embedded => "embedded",
        }
    }

    fn server(self) -> &'static str {
        match self {
            Backend::Broker => "courier broker --store (a child process, over TCP on 127.0.0.1)",
            Backend::Embedded => "courier embedded bus (in this process; no network, no broker)",
        }
    }
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    match s {
        "broker" => Ok(Backend::Broker),
        "embedded" => Ok(Backend::Embedded),
        other => Err(format!("`{other}`: expected broker or embedded")),
    }
}

/// The value of a flag taken for nats-bench's sake and ignored (so that the same flags
/// can be given to both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ignored;

fn ignore(_: &str) -> Result<Ignored, String> {
    Ok(Ignored)
}

/// A durability mode of the publish rows (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FsyncMode {
    /// Ack after write + `fdatasync` (group commit).
    Always,
    /// Ack after write; `fdatasync` every 120 s.
    Interval,
}

impl FsyncMode {
    /// The `"fsync"` label, as compare.sh matches it with JetStream's.
    fn label(self) -> &'static str {
        match self {
            FsyncMode::Always => "always",
            FsyncMode::Interval => "interval",
        }
    }

    /// The stream setting.
    fn fsync(self) -> Fsync {
        match self {
            FsyncMode::Always => Fsync::Always,
            FsyncMode::Interval => Fsync::Every(INTERVAL),
        }
    }

    /// What the label means, in words (`"durability"`).
    fn durability(self) -> &'static str {
        match self {
            FsyncMode::Always => {
                "ack after write + fdatasync of the segment (group commit: publishes queued \
                 meanwhile share one write and one fdatasync); nothing acked is lost on power \
                 loss"
            }
            FsyncMode::Interval => {
                "ack after write(2) to the OS (page cache), no fsync before the ack; fdatasync \
                 every 120 s and on close; survives a kill of the process, a power loss can \
                 lose up to 120 s of acked messages"
            }
        }
    }
}

impl fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// nats-bench's JetStream flags (same names and defaults), plus courier's own.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StreamFlags {
    /// js_pub_seq payload sizes in bytes (`none` skips it).
    #[arg(long, default_value = "16,1024", value_parser = parse_list)]
    js_seq_sizes: List,
    /// Publishes measured in js_pub_seq.
    #[arg(long, default_value_t = 20_000)]
    seq_count: usize,
    /// Publishes before js_pub_seq's measurement (same stream), not measured.
    #[arg(long, default_value_t = 2_000)]
    seq_warmup: usize,
    /// js_pub_async payload sizes (paired with --js-async-counts; `none` skips it).
    #[arg(long, default_value = "16,1024", value_parser = parse_list)]
    js_async_sizes: List,
    /// Messages published in js_pub_async, one count per size.
    #[arg(long, default_value = "500000,200000", value_parser = parse_list)]
    js_async_counts: List,
    /// Acks outstanding in js_pub_async and in the pre-fills.
    #[arg(long, default_value_t = 64)]
    js_window: usize,
    /// Payload sizes of the read scenarios (paired with --js-read-counts).
    #[arg(long, default_value = "16", value_parser = parse_list)]
    js_read_sizes: List,
    /// Messages pre-filled and read back per read size (`none` skips the read scenarios).
    #[arg(long, default_value = "500000", value_parser = parse_list)]
    js_read_counts: List,
    /// Messages per read (`Streams::range`) in js_replay (async-nats' ordered consumer
    /// pulls 500 at a time).
    #[arg(long, default_value_t = 500)]
    js_read_batch: usize,
    /// Messages per fetch in js_consume.
    #[arg(long, default_value_t = 256)]
    js_batch: usize,
    /// Messages pre-filled for js_reopen (16 B each; `none` skips it).
    #[arg(long, default_value = "1000000", value_parser = parse_list)]
    js_reopen_count: List,
    /// Durability modes of the publish rows, each run once per mode: `always` (ack after
    /// fdatasync, group commit) and `interval` (ack after write, fdatasync every 120 s).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "always,interval"
    )]
    fsync: Vec<FsyncMode>,
    /// Where the data goes: a fresh directory is made inside it (default: the system's
    /// temp directory, $TMPDIR or /tmp) and removed at the end.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Which bus serves the streams: `broker` (a `courier broker --store` child
    /// process) or `embedded` (in this process).
    #[arg(long, default_value = "broker", value_parser = parse_backend)]
    backend: Backend,
    /// Run only these scenarios (comma-separated: js_pub_seq, js_pub_async, js_consume,
    /// js_replay, js_reopen); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Ignored (nats-bench's label of the server's sync setting); courier's durability
    /// is set by --fsync.
    #[arg(long, value_name = "LABEL", value_parser = ignore)]
    js_fsync: Option<Ignored>,
    /// Ignored (nats-bench's description of its durability); rows describe their own.
    #[arg(long, value_name = "TEXT", value_parser = ignore)]
    js_durability: Option<Ignored>,
    /// Ignored (nats-bench's js_consume pull mode: `fetch`, the only one courier runs).
    #[arg(long, value_name = "MODE", value_parser = ignore)]
    js_pull: Option<Ignored>,
    /// Ignored (nats-bench's core/js/all selector); `bench stream` has only the js
    /// scenarios.
    #[arg(long, value_name = "WHICH", value_parser = ignore)]
    scenarios: Option<Ignored>,
    /// One JSON line per scenario instead of a table.
    #[arg(long)]
    json: bool,
}

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    PubSeq,
    PubAsync,
    Consume,
    Replay,
    Reopen,
}

impl Scenario {
    /// Its name: in `--only`, in the `"scenario"` field and in the table.
    fn as_str(self) -> &'static str {
        match self {
            Scenario::PubSeq => "js_pub_seq",
            Scenario::PubAsync => "js_pub_async",
            Scenario::Consume => "js_consume",
            Scenario::Replay => "js_replay",
            Scenario::Reopen => "js_reopen",
        }
    }

    /// The middle token of its subjects.
    fn subject_token(self) -> &'static str {
        match self {
            Scenario::PubSeq => "seq",
            Scenario::PubAsync => "async",
            Scenario::Consume | Scenario::Replay | Scenario::Reopen => "read",
        }
    }

    fn subject(self, size: usize) -> Utf8Bytes {
        Utf8Bytes::from(format!("bench.js.{}.{size}", self.subject_token()))
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl StreamFlags {
    fn wants(&self, scenario: Scenario) -> bool {
        selected(&self.only, scenario.as_str())
    }
}

/// Runs every selected scenario and prints its rows.
pub(crate) async fn run(flags: StreamFlags) -> Result<(), String> {
    let pairs = |sizes: &List, counts: &List, what: &str| -> Result<Vec<(usize, u64)>, String> {
        if sizes.0.is_empty() || counts.0.is_empty() {
            return Ok(Vec::new());
        }
        if sizes.0.len() != counts.0.len() {
            return Err(format!(
                "--js-{what}-sizes has {} values and --js-{what}-counts {}: give one count per size",
                sizes.0.len(),
                counts.0.len()
            ));
        }
        Ok(sizes
            .0
            .iter()
            .zip(&counts.0)
            .map(|(&s, &c)| (s as usize, c))
            .collect())
    };
    let async_rows = pairs(&flags.js_async_sizes, &flags.js_async_counts, "async")?;
    let read_rows = pairs(&flags.js_read_sizes, &flags.js_read_counts, "read")?;
    let mut modes = Vec::new();
    for mode in &flags.fsync {
        if !modes.contains(mode) {
            modes.push(*mode);
        }
    }

    let root = match &flags.dir {
        Some(parent) => tempfile::Builder::new()
            .prefix("courier-bench-stream.")
            .tempdir_in(parent),
        None => tempfile::Builder::new()
            .prefix("courier-bench-stream.")
            .tempdir(),
    }
    .map_err(|e| format!("cannot make a data directory: {e}"))?;
    let mut bench = Bench {
        flags: &flags,
        root: root.path().to_owned(),
        store_fs: filesystem_of(root.path()),
        rows: 0,
        out: Output::new(flags.json),
    };

    if flags.wants(Scenario::PubSeq) {
        for &size in &flags.js_seq_sizes.0 {
            for &mode in &modes {
                let row = bench.pub_seq(size as usize, mode).await?;
                bench.out.row(row);
            }
        }
    }
    if flags.wants(Scenario::PubAsync) {
        for &(size, count) in &async_rows {
            for &mode in &modes {
                let row = bench.pub_async(size, count, mode).await?;
                bench.out.row(row);
            }
        }
    }
    if flags.wants(Scenario::Consume) {
        for &(size, count) in &read_rows {
            for &mode in &modes {
                let row = bench.consume(size, count, mode).await?;
                bench.out.row(row);
            }
        }
    }
    if flags.wants(Scenario::Replay) {
        for &(size, count) in &read_rows {
            let row = bench.replay(size, count).await?;
            bench.out.row(row);
        }
    }
    if flags.wants(Scenario::Reopen) {
        for &count in &flags.js_reopen_count.0 {
            let row = bench.reopen(count).await?;
            bench.out.row(row);
        }
    }
    drop(bench);
    root.close()
        .map_err(|e| format!("cannot remove the data directory: {e}"))
}

/// State shared by the rows of one run.
struct Bench<'a> {
    flags: &'a StreamFlags,
    /// The run's data directory; each row gets a fresh subdirectory.
    root: PathBuf,
    /// The filesystem `root` is on.
    store_fs: String,
    /// Rows started so far (names the subdirectories).
    rows: usize,
    out: Output,
}

/// One row's fresh store: a new subdirectory, a new embedded bus over it and the
/// stream, just created.
struct Fresh {
    dir: PathBuf,
    bus: Bus,
    streams: Streams,
    mode: FsyncMode,
    /// The broker serving the row, with `--backend broker`.
    broker: Option<super::ChildServer>,
}

impl Fresh {
    /// The stream's counts now.
    async fn state(&self) -> Result<StreamState, String> {
        Ok(self.streams.info(STREAM).await.map_err(err)?.state)
    }

    /// Deletes the stream, drops the bus and removes the subdirectory.
    async fn finish(self) -> Result<(), String> {
        self.streams.delete(STREAM).await.map_err(err)?;
        drop(self.streams);
        drop(self.bus);
        drop(self.broker);
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| format!("cannot remove {}: {e}", self.dir.display()))
    }
}

/// The bench's stream configuration under `mode`.
fn stream_config(mode: FsyncMode) -> StreamConfig {
    StreamConfig {
        fsync: mode.fsync(),
        ..StreamConfig::new(STREAM, [SUBJECTS])
    }
}

/// A bus whose streams are stored in `dir`: an embedded one, or a connection to a
/// broker child process started on it (returned too).
async fn open_bus(
    backend: Backend,
    dir: &Path,
) -> Result<(Bus, Streams, Option<super::ChildServer>), String> {
    match backend {
        Backend::Embedded => {
            let mut config = EmbeddedConfig::default();
            config.storage = Storage::Directory(dir.to_owned());
            let bus = Bus::embedded_with(config);
            let streams = bus.streams().map_err(err)?;
            Ok((bus, streams, None))
        }
        Backend::Broker => {
            let dir_arg = dir.to_string_lossy();
            let child = super::ChildServer::start(&[
                "broker",
                "--listen",
                "127.0.0.1:0",
                "--store",
                &dir_arg,
            ])?;
            let mut options = mq_transport::ConnectOptions::default();
            options.bus.request_timeout = Duration::from_secs(30);
            let bus = Bus::connect_with(child.addr.clone(), options)
                .await
                .map_err(err)?;
            let streams = bus.streams().map_err(err)?;
            Ok((bus, streams, Some(child)))
        }
    }
}

fn err(e: BusError) -> String {
    e.to_string()
}

impl Bench<'_> {
    /// A fresh store and stream for one row.
    async fn fresh(
        &mut self,
        scenario: Scenario,
        size: usize,
        mode: FsyncMode,
    ) -> Result<Fresh, String> {
        self.rows += 1;
        let dir = self
            .root
            .join(format!("{:02}-{scenario}-{size}-{mode}", self.rows));
        let (bus, streams, broker) = open_bus(self.flags.backend, &dir).await?;
        streams
            .create(stream_config(mode))
            .await
            .map_err(|e| format!("cannot create stream {STREAM}: {e}"))?;
        Ok(Fresh {
            dir,
            bus,
            streams,
            mode,
            broker,
        })
    }

    /// The fields every row has, then `extra`.
    fn row(
        &self,
        scenario: Scenario,
        size: usize,
        mode: FsyncMode,
        state: &StreamState,
        extra: Value,
    ) -> Map<String, Value> {
        let mut row = fields(json!({
            "system": "courier",
            "scenario": scenario.as_str(),
            "payload_bytes": size,
            "backend": self.flags.backend.label(),
            "server": self.flags.backend.server(),
            "storage": "file",
            "replicas": 1,
            "fsync": mode.label(),
            "durability": mode.durability(),
            "store_fs": self.store_fs,
            "segment_size": stream_config(mode).segment_size,
            "stream": STREAM,
            "stream_messages": state.msgs,
            "stream_bytes": state.bytes,
            "stream_first_seq": state.first_seq,
            "stream_last_seq": state.last_seq,
            "stream_segments": state.segments,
        }));
        row.extend(fields(extra));
        row
    }

    /// js_pub_seq: publish, await the ack, next. `--seq-warmup` unmeasured, then
    /// `--seq-count` measured.
    async fn pub_seq(
        &mut self,
        size: usize,
        mode: FsyncMode,
    ) -> Result<Map<String, Value>, String> {
        let scenario = Scenario::PubSeq;
        let (warmup, count) = (self.flags.seq_warmup, self.flags.seq_count);
        let fresh = self.fresh(scenario, size, mode).await?;
        let subject = scenario.subject(size);
        let payload = Bytes::from(vec![0xAB; size]);
        let bar = progress(format!("stream {scenario} {size} B {mode}"));
        bar.set_length((warmup + count) as u64);
        let mut acks = Acks::default();
        for i in 0..warmup {
            let r = publish_and_ack(&fresh.streams, &subject, &payload).await;
            acks.check(r);
            tick(&bar, i);
        }
        let warm = std::mem::take(&mut acks);
        acks.last_seq = warm.last_seq;
        let mut latencies = Vec::with_capacity(count);
        let started = Instant::now();
        for i in 0..count {
            let t = Instant::now();
            let r = publish_and_ack(&fresh.streams, &subject, &payload).await;
            if r.is_ok() {
                latencies.push(t.elapsed().as_nanos() as u64);
            }
            acks.check(r);
            tick(&bar, warmup + i);
        }
        let secs = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let state = fresh.state().await?;
        let expected = (warmup + count) as u64;
        let row = self.row(
            scenario,
            size,
            fresh.mode,
            &state,
            json!({
                "in_flight": 1,
                "warmup": warmup,
                "published": count,
                "acked": acks.acked,
                "ack_errors": acks.errors + warm.errors,
                "ack_mismatches": acks.mismatches + warm.mismatches,
                "expected_stream_messages": expected,
                "lost": expected.saturating_sub(state.msgs),
                "elapsed_s": round4(secs),
                "msgs_per_s": whole(acks.acked as f64 / secs),
                "p50_us": percentile_us(&mut latencies, 50.0),
                "p99_us": percentile_us(&mut latencies, 99.0),
            }),
        );
        fresh.finish().await?;
        Ok(row)
    }

    /// js_pub_async: `count` publishes with `--js-window` acks outstanding; timed from
    /// the first publish to the last ack checked.
    async fn pub_async(
        &mut self,
        size: usize,
        count: u64,
        mode: FsyncMode,
    ) -> Result<Map<String, Value>, String> {
        let scenario = Scenario::PubAsync;
        let window = self.flags.js_window.max(1);
        let fresh = self.fresh(scenario, size, mode).await?;
        let subject = scenario.subject(size);
        let payload = Bytes::from(vec![0xAB; size]);
        let bar = progress(format!("stream {scenario} {size} B {mode}"));
        let mut acks = Acks::default();
        let started = Instant::now();
        publish_window(
            &fresh.streams,
            &subject,
            &payload,
            count,
            window,
            &mut acks,
            &bar,
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let state = fresh.state().await?;
        let row = self.row(
            scenario,
            size,
            fresh.mode,
            &state,
            json!({
                "in_flight": window,
                "published": count,
                "acked": acks.acked,
                "ack_errors": acks.errors,
                "ack_mismatches": acks.mismatches,
                "expected_stream_messages": count,
                "lost": count.saturating_sub(state.msgs),
                "elapsed_s": round4(secs),
                "msgs_per_s": whole(acks.acked as f64 / secs),
            }),
        );
        fresh.finish().await?;
        Ok(row)
    }

    /// A fresh stream in `mode` pre-filled, untimed, with `count` messages of `size`
    /// bytes by the js_pub_async loop; an error unless every ack was right and the
    /// stream holds exactly `count`.
    async fn prefill(
        &mut self,
        scenario: Scenario,
        size: usize,
        count: u64,
        mode: FsyncMode,
    ) -> Result<Fresh, String> {
        let fresh = self.fresh(scenario, size, mode).await?;
        let subject = scenario.subject(size);
        let payload = Bytes::from(vec![0xAB; size]);
        let bar = progress(format!("stream {scenario} pre-fill {size} B"));
        let mut acks = Acks::default();
        let started = Instant::now();
        let window = self.flags.js_window.max(1);
        publish_window(
            &fresh.streams,
            &subject,
            &payload,
            count,
            window,
            &mut acks,
            &bar,
        )
        .await;
        bar.finish_and_clear();
        let state = fresh.state().await?;
        if acks.acked != count || acks.errors != 0 || acks.mismatches != 0 || state.msgs != count {
            return Err(format!(
                "{scenario}: pre-fill incomplete: acked {} errors {} mismatches {} stream holds {}",
                acks.acked, acks.errors, acks.mismatches, state.msgs
            ));
        }
        eprintln!(
            "# {scenario}: pre-filled {count} x {size} B in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        Ok(fresh)
    }

    /// js_consume: pre-fill, then a durable consumer fetching `--js-batch` at a time and
    /// acking every message; timed from the first fetch to the last ack.
    async fn consume(
        &mut self,
        size: usize,
        count: u64,
        mode: FsyncMode,
    ) -> Result<Map<String, Value>, String> {
        let scenario = Scenario::Consume;
        let batch = self.flags.js_batch.max(1);
        let fresh = self.prefill(scenario, size, count, mode).await?;
        let config = ConsumerConfig {
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            ..ConsumerConfig::durable("bench_consume")
        };
        let consumer = fresh
            .streams
            .create_consumer(STREAM, config)
            .await
            .map_err(|e| format!("cannot create consumer bench_consume: {e}"))?;
        let bar = progress(format!("stream {scenario} {size} B ({mode})"));
        bar.set_length(count);
        let mut reads = Reads::default();
        let (mut fetches, mut redelivered, mut ack_errors, mut empty) = (0u64, 0u64, 0u64, 0u64);
        let started = Instant::now();
        while reads.received < count {
            let deliveries = match consumer.fetch(batch, Duration::ZERO).await {
                Ok(d) => d,
                Err(e) => {
                    reads.error(&e);
                    break;
                }
            };
            fetches += 1;
            if deliveries.is_empty() {
                // the stream holds N and nothing is pending: only a bug ends here
                empty += 1;
                if empty > 1000 {
                    break;
                }
                tokio::task::yield_now().await;
                continue;
            }
            let before = reads.received;
            for d in &deliveries {
                reads.check(d.info.stream_seq, d.message.payload.len(), size);
                if d.info.deliveries != 1 {
                    redelivered += 1;
                }
                if d.ack().await.is_err() {
                    ack_errors += 1;
                }
            }
            if reads.received / BAR_STEP != before / BAR_STEP {
                bar.set_position(reads.received);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        // untimed: the consumer's own account of what was acknowledged
        let mut info = consumer.info().await.map_err(|e| e.to_string())?;
        let polling = Instant::now();
        while (info.ack_floor < count || info.num_ack_pending > 0)
            && polling.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
            info = consumer.info().await.map_err(|e| e.to_string())?;
        }
        let acked = reads.received - ack_errors.min(reads.received);
        let state = fresh.state().await?;
        let row = self.row(
            scenario,
            size,
            fresh.mode,
            &state,
            json!({
                "prefilled": count,
                "consumer": "durable bench_consume: explicit ack, deliver all, ack wait 30 s, max ack pending 1000; Consumer::fetch with no wait, one outstanding; a plain ack per message (fire-and-forget), in process",
                "consumer_state": match mode {
                    FsyncMode::Always => "acks reach the consumer's state file by group commit, one write + fdatasync per batch; a plain ack is not waited for",
                    FsyncMode::Interval => "acks reach the consumer's state file by group commit, one write per batch, fdatasync every 120 s; a plain ack is not waited for",
                },
                "ack_policy": "explicit",
                "fetch_batch": batch,
                "fetches": fetches,
                "received": reads.received,
                "acked": acked,
                "ack_errors": ack_errors,
                "out_of_order": reads.out_of_order,
                "redelivered": redelivered,
                "bad_length": reads.bad_length,
                "errors": reads.errors,
                "lost": count.saturating_sub(acked),
                "server_ack_floor_stream_seq": info.ack_floor,
                "server_num_ack_pending": info.num_ack_pending,
                "server_num_redelivered": info.num_redelivered,
                "elapsed_s": round4(secs),
                "msgs_per_s": whole(acked as f64 / secs),
            }),
        );
        drop(consumer);
        fresh.finish().await?;
        Ok(row)
    }

    /// js_replay: pre-fill, then read everything from sequence 1 in batches; timed from
    /// the first read to the N-th message.
    async fn replay(&mut self, size: usize, count: u64) -> Result<Map<String, Value>, String> {
        let scenario = Scenario::Replay;
        let batch = self.flags.js_read_batch.max(1);
        let fresh = self
            .prefill(scenario, size, count, FsyncMode::Interval)
            .await?;
        let bar = progress(format!("stream {scenario} {size} B"));
        bar.set_length(count);
        let mut reads = Reads::default();
        let mut calls = 0u64;
        let started = Instant::now();
        while reads.received < count {
            let from = reads.last_seq + 1;
            let messages = match fresh.streams.range(STREAM, from, batch, usize::MAX).await {
                Ok(messages) => messages,
                Err(e) => {
                    reads.error(&e);
                    break;
                }
            };
            calls += 1;
            if messages.is_empty() {
                break; // nothing more to read: report what arrived
            }
            for message in &messages {
                reads.check(message.seq, message.payload.len(), size);
            }
            if reads.received / BAR_STEP != (reads.received - messages.len() as u64) / BAR_STEP {
                bar.set_position(reads.received);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let state = fresh.state().await?;
        let row = self.row(
            scenario,
            size,
            fresh.mode,
            &state,
            json!({
                "prefilled": count,
                "consumer": format!(
                    "none: Streams::range from seq 1, {batch} messages per read, in process"
                ),
                "ack_policy": "none",
                "read_batch": batch,
                "reads": calls,
                "received": reads.received,
                "out_of_order": reads.out_of_order,
                "redelivered": 0,
                "bad_length": reads.bad_length,
                "errors": reads.errors,
                "lost": count.saturating_sub(reads.received),
                "elapsed_s": round4(secs),
                "msgs_per_s": whole(reads.received as f64 / secs),
            }),
        );
        fresh.finish().await?;
        Ok(row)
    }

    /// js_reopen: pre-fill `count` messages, drop the bus (closing the store), and time
    /// a new embedded bus over the same directory up to the stream's `info`.
    async fn reopen(&mut self, count: u64) -> Result<Map<String, Value>, String> {
        let scenario = Scenario::Reopen;
        let size = REOPEN_PAYLOAD;
        let fresh = self
            .prefill(scenario, size, count, FsyncMode::Interval)
            .await?;
        let before = fresh.state().await?;
        let Fresh {
            dir,
            bus,
            streams,
            mode,
            broker,
        } = fresh;
        // Untimed: the last handles go, the store closes (its committer writes and
        // fdatasyncs what it still holds and exits).
        let closing = Instant::now();
        drop(streams);
        drop(bus);
        // the broker is stopped with SIGKILL: under `interval` what it wrote is with the
        // OS, and recovery reads it back
        drop(broker);
        let close_ms = closing.elapsed().as_secs_f64() * 1e3;
        let committers = committer_threads();
        if committers > 0 {
            eprintln!(
                "# {scenario}: {committers} stream committer thread(s) still running after the \
                 bus was dropped: the old store is still open"
            );
        }

        let started = Instant::now();
        let (bus, streams, broker) = open_bus(self.flags.backend, &dir).await?;
        let info = streams.info(STREAM).await.map_err(err)?;
        let reopen = started.elapsed();
        let state = info.state;

        // Untimed: the first and the last message read back whole.
        let mut reads = Reads::default();
        for seq in [1, count] {
            match streams.range(STREAM, seq, 1, usize::MAX).await {
                Ok(messages) => match messages.first() {
                    Some(m) if m.seq == seq => {
                        if m.payload.len() != size {
                            reads.bad_length += 1;
                        }
                    }
                    _ => reads.errors += 1,
                },
                Err(e) => reads.error(&e),
            }
        }
        let row = self.row(
            scenario,
            size,
            mode,
            &state,
            json!({
                "prefilled": count,
                "reopen_ms": round1(reopen.as_secs_f64() * 1e3),
                "reopen_timed": match self.flags.backend {
                    Backend::Embedded => "Bus::embedded_with (Store::open: every segment read, checked and indexed) + streams().info()",
                    Backend::Broker => "courier broker --store started on the directory (Store::open: every segment read, checked and indexed) + connect + streams().info()",
                },
                "page_cache": "warm (the segments were just written; caches not dropped)",
                "close_ms": round1(close_ms),
                "committer_threads_left_before_reopen": committers,
                "stream_messages_before_close": before.msgs,
                "stream_bytes_before_close": before.bytes,
                "bad_length": reads.bad_length,
                "errors": reads.errors,
                "lost": count.saturating_sub(state.msgs),
            }),
        );
        Fresh {
            dir,
            bus,
            streams,
            mode,
            broker,
        }
        .finish()
        .await?;
        Ok(row)
    }
}

/// Publishes one message and awaits its ack.
async fn publish_and_ack(
    streams: &Streams,
    subject: &Utf8Bytes,
    payload: &Bytes,
) -> Result<PubAck, BusError> {
    streams
        .publish(subject.clone(), payload.clone())
        .await?
        .await
}

/// Publishes `count` messages keeping `window` acks outstanding: when the window is
/// full, the oldest ack is awaited and checked before the next publish; at the end the
/// rest are awaited.
async fn publish_window(
    streams: &Streams,
    subject: &Utf8Bytes,
    payload: &Bytes,
    count: u64,
    window: usize,
    acks: &mut Acks,
    bar: &ProgressBar,
) {
    bar.set_length(count);
    let mut pending: VecDeque<PubAckFuture> = VecDeque::with_capacity(window);
    for i in 0..count {
        if pending.len() >= window
            && let Some(oldest) = pending.pop_front()
        {
            acks.check(oldest.await);
        }
        match streams.publish(subject.clone(), payload.clone()).await {
            Ok(ack) => pending.push_back(ack),
            Err(e) => acks.check(Err(e)),
        }
        tick(bar, i as usize);
    }
    while let Some(ack) = pending.pop_front() {
        acks.check(ack.await);
    }
}

/// Moves `bar` to `i` every [`BAR_STEP`] messages.
fn tick(bar: &ProgressBar, i: usize) {
    if (i as u64).is_multiple_of(BAR_STEP) {
        bar.set_position(i as u64);
    }
}

/// Ack bookkeeping: every ack checked (stream name, not a duplicate, sequence =
/// previous + 1), as nats-bench checks a PubAck.
#[derive(Debug, Default)]
struct Acks {
    acked: u64,
    errors: u64,
    mismatches: u64,
    last_seq: u64,
}

impl Acks {
    fn check(&mut self, result: Result<PubAck, BusError>) {
        match result {
            Ok(ack) => {
                if ack.stream != STREAM || ack.duplicate || ack.seq != self.last_seq + 1 {
                    if self.mismatches < 5 {
                        eprintln!(
                            "# unexpected ack after seq {}: stream {}, seq {}, duplicate {}",
                            self.last_seq, ack.stream, ack.seq, ack.duplicate
                        );
                    }
                    self.mismatches += 1;
                }
                self.last_seq = ack.seq;
                self.acked += 1;
            }
            Err(e) => {
                if self.errors < 5 {
                    eprintln!("# publish/ack error: {e}");
                }
                self.errors += 1;
            }
        }
    }
}

/// Per-message checks while reading: sequence = previous + 1, payload length.
#[derive(Debug, Default)]
struct Reads {
    received: u64,
    out_of_order: u64,
    bad_length: u64,
    errors: u64,
    last_seq: u64,
}

impl Reads {
    fn check(&mut self, seq: u64, len: usize, size: usize) {
        if seq != self.last_seq + 1 {
            self.out_of_order += 1;
        }
        self.last_seq = seq;
        if len != size {
            self.bad_length += 1;
        }
        self.received += 1;
    }

    fn error(&mut self, e: &BusError) {
        if self.errors < 5 {
            eprintln!("# read error: {e}");
        }
        self.errors += 1;
    }
}

/// Stream committer threads alive in this process (named `courier-store-<stream>`;
/// Linux shows the first 15 bytes), from `/proc/self/task`; 0 where it cannot tell.
fn committer_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .filter(|name| name.starts_with("courier-store-"))
        .count()
}

/// The type of the filesystem holding `path` (the longest mount point above it in
/// `/proc/mounts`), or `"unknown"`.
fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "unknown".into();
    };
    mounts
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (_device, point, fs) = (parts.next()?, parts.next()?, parts.next()?);
            let point = point.replace("\\040", " ");
            path.starts_with(&point)
                .then(|| (point.len(), fs.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Prints rows: JSON lines through [`Report`], or a table of the stream rows' own
/// columns (the fsync label matters here; `Report`'s table has no column for it).
struct Output {
    json: Option<Report>,
    header_printed: bool,
}

impl Output {
    fn new(json: bool) -> Output {
        Output {
            json: json.then(|| Report::new(true)),
            header_printed: false,
        }
    }

    fn row(&mut self, row: Map<String, Value>) {
        if let Some(report) = &mut self.json {
            report.line(row, "msgs_per_s");
            return;
        }
        if !self.header_printed {
            println!(
                "{:<14} {:>6} {:>9} {:>12} {:>9} {:>9} {:>6}  notes",
                "scenario", "bytes", "fsync", "msgs/s", "p50 µs", "p99 µs", "lost"
            );
            self.header_printed = true;
        }
        let show = |k: &str| match row.get(k) {
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.clone(),
            _ => "-".to_string(),
        };
        let mut notes = Vec::new();
        if row.contains_key("reopen_ms") {
            for key in [
                "reopen_ms",
                "close_ms",
                "stream_messages",
                "stream_segments",
            ] {
                notes.push(format!("{key}={}", show(key)));
            }
        }
        for key in [
            "ack_errors",
            "ack_mismatches",
            "out_of_order",
            "bad_length",
            "errors",
            "committer_threads_left_before_reopen",
        ] {
            if let Some(v) = row.get(key)
                && v.as_u64() != Some(0)
            {
                notes.push(format!("{key}={v}"));
            }
        }
        println!(
            "{:<14} {:>6} {:>9} {:>12} {:>9} {:>9} {:>6}  {}",
            show("scenario"),
            show("payload_bytes"),
            show("fsync"),
            show("msgs_per_s"),
            show("p50_us"),
            show("p99_us"),
            show("lost"),
            notes.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_none_is_empty() {
        assert_eq!(parse_list("16,1024"), Ok(List(vec![16, 1024])));
        assert_eq!(parse_list("none"), Ok(List(Vec::new())));
        assert_eq!(parse_list(""), Ok(List(Vec::new())));
        assert!(parse_list("16,x").is_err());
    }

    #[test]
    fn backends_parse_by_name() {
        assert_eq!(parse_backend("embedded"), Ok(Backend::Embedded));
        assert_eq!(parse_backend("broker"), Ok(Backend::Broker));
        let refused = parse_backend("nats").unwrap_err();
        assert!(refused.contains("broker or embedded"), "{refused}");
    }

    #[test]
    fn acks_count_mismatches_like_nats_bench() {
        let ack = |stream: &str, seq, duplicate| {
            Ok(PubAck {
                stream: stream.into(),
                seq,
                duplicate,
            })
        };
        let mut acks = Acks::default();
        acks.check(ack(STREAM, 1, false));
        acks.check(ack(STREAM, 2, false));
        acks.check(ack(STREAM, 4, false)); // a gap
        acks.check(ack("OTHER", 5, false));
        acks.check(ack(STREAM, 6, true));
        assert_eq!((acks.acked, acks.mismatches, acks.errors), (5, 3, 0));
    }
}
