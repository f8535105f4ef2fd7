//! `courier`: the command-line tool of the courier RPC framework and message bus.
//!
//! ```text
//! courier broker --listen 127.0.0.1:7222 --token s3cret
//! courier sub 'orders.>'                    # prints messages
//! courier pub orders.created 'order 42'
//! courier broker --store ./data               # streams kept in ./data
//! courier stream add ORDERS --subjects 'orders.>'
//! courier pub --durable --msg-id order-42 orders.eu 'order 42'
//! courier consume ORDERS billing              # prints and acknowledges
//! courier reply time.now                    # an echo responder
//! courier req time.now ping
//! courier bench rpc | bus | raw | bus-raw [--json]   # the peers' workloads
//! ```
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`).

mod bench;
mod streams;
mod tools;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use mq_transport::{Broker, BrokerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "courier",
    version,
    about = "courier RPC framework and message bus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a message broker until Ctrl-C, then shuts down gracefully.
    Broker(BrokerArgs),
    /// Publishes DATA to SUBJECT.
    Pub {
        /// Where to publish (no wildcards).
        subject: String,
        /// The payload.
        #[arg(default_value = "")]
        data: String,
        /// A header, `Name:value`; repeatable.
        #[arg(long = "header", short = 'H', value_parser = tools::parse_header)]
        headers: Vec<(String, String)>,
        /// Publish this many times.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Publish to the stream that captures SUBJECT and wait for its
        /// acknowledgement (the message is durable when this returns).
        #[arg(long)]
        durable: bool,
        /// With --durable: the message id that makes a retry land once (with --count,
        /// ID-1, ID-2, …).
        #[arg(long, requires = "durable")]
        msg_id: Option<String>,
        #[command(flatten)]
        target: tools::Target,
    },
    /// Durable streams: add, ls, info, rm, purge, view.
    #[command(subcommand)]
    Stream(streams::StreamCommand),
    /// Prints and answers messages of the durable consumer CONSUMER of STREAM (made
    /// with the defaults if it does not exist). Acknowledges each message unless
    /// --nak or --term says otherwise.
    Consume {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Stop when no message came within this many seconds.
        #[arg(long, default_value_t = 2.0)]
        wait: f64,
        /// Refuse each message (it is delivered again, or dead-lettered at max_deliver).
        #[arg(long, conflicts_with = "term")]
        nak: bool,
        /// Give up on each message with this reason: it goes to the dead letters.
        #[arg(long)]
        term: Option<String>,
        #[command(flatten)]
        target: tools::Target,
    },
    /// Prints messages on SUBJECT (wildcards allowed) until Ctrl-C.
    Sub {
        /// What to subscribe to: `orders.*`, `orders.>`, …
        subject: String,
        /// Join this queue group: each message goes to one member.
        #[arg(long)]
        queue: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        target: tools::Target,
    },
    /// Sends a request and prints the reply.
    Req {
        /// Where to send it.
        subject: String,
        /// The payload.
        #[arg(default_value = "")]
        data: String,
        /// How long to wait for the reply, in seconds.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        #[command(flatten)]
        target: tools::Target,
    },
    /// Answers requests on SUBJECT with their own payload and headers (an echo responder).
    Reply {
        /// What to answer.
        subject: String,
        /// Join this queue group (several responders share the load).
        #[arg(long)]
        queue: Option<String>,
        #[command(flatten)]
        target: tools::Target,
    },
    /// Benchmarks: the workloads of tarpc-bench and nats-bench, on courier.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// RPC: an echo `#[courier::service]`, server in a child process (tarpc-bench's workload).
    Rpc(bench::RpcFlags),
    /// The bus: pub/sub and request/reply through a broker child process (nats-bench's workload).
    Bus(bench::bus::BusFlags),
    /// The floor: the RPC scenarios on bare tokio + LengthDelimitedCodec.
    Raw(bench::RpcFlags),
    /// The bus's floor: pub/sub and req_seq through a relay on bare tokio that forwards
    /// length-prefixed frames as it read them (no subjects, no routing).
    BusRaw(bench::relay::RelayFlags),
    /// Durable streams: JetStream's publish, consume and replay scenarios, on a broker
    /// child process (default) or the embedded bus.
    Stream(bench::stream::StreamFlags),
    /// The RPC bench's server (run by `bench rpc`).
    #[command(hide = true)]
    ServeRpc { addr: String },
    /// The raw bench's server (run by `bench raw`).
    #[command(hide = true)]
    ServeRaw { addr: String },
    /// The relay of `bench bus-raw`.
    #[command(hide = true)]
    ServeRelay { addr: String },
}

#[derive(Debug, Args)]
struct BrokerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7222")]
    listen: SocketAddr,
    /// Largest payload a publish may carry, in bytes.
    #[arg(long, default_value_t = BrokerConfig::default().max_payload)]
    max_payload: usize,
    /// Connections served at once.
    #[arg(long, default_value_t = BrokerConfig::default().max_connections)]
    max_connections: usize,
    /// Subscriptions per connection.
    #[arg(long, default_value_t = BrokerConfig::default().max_subscriptions)]
    max_subscriptions: usize,
    /// Bytes queued for one connection before it is cut off as a slow consumer.
    #[arg(long, default_value_t = BrokerConfig::default().connection.max_queued_bytes)]
    max_queued_bytes: usize,
    /// Require this token from clients.
    #[arg(long)]
    token: Option<String>,
    /// Milliseconds a publisher waits for room on a full subscriber connection before
    /// that subscriber is cut off as a slow consumer (0: cut at once).
    #[arg(long, default_value_t = BrokerConfig::default().slow_consumer_grace.as_millis() as u64)]
    slow_consumer_grace_ms: u64,
    /// Bytes queued for a subscriber past which its publishers are paced.
    #[arg(long, default_value_t = BrokerConfig::default().pace_queued_bytes)]
    pace_queued_bytes: usize,
    /// Keep durable streams and consumers in this directory (created if missing);
    /// without it they are kept in memory and last as long as the broker.
    #[arg(long)]
    store: Option<std::path::PathBuf>,
    /// Use this fsync setting for every stream, whatever its configuration asks:
    /// `always`, `every=100ms` or `never`. Without it, each stream's own (by
    /// default `always`: acknowledged after fdatasync).
    #[arg(long)]
    fsync: Option<mq_transport::Fsync>,
}

/// How much free memory glibc's malloc keeps at the top of each heap before it gives
/// memory back to the kernel (its default is 128 KiB).
///
/// A busy connection's read buffer is 64 KiB. It is allocated afresh while the frames
/// read into the last one are still held (a subscriber's messages share its bytes), and
/// freed once they are not. With the default, freeing a chunk that size gives the free
/// top of the heap back to the kernel, and the next buffers touch those pages anew: in
/// `courier bench bus --only pubsub_1to1 --sizes 1024`, the bench process took 48,000 to
/// 121,000 page faults per million messages, most of them inside `recv`. With 8 MiB kept
/// it took 15,000 to 46,000, used 11–22% less CPU and delivered 6–14% more messages per
/// second (README, Performance, has the runs). A larger threshold saved more faults but
/// no more CPU in those runs, and keeps more free memory.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 8 * 1024 * 1024;

/// The size from which glibc's malloc maps each allocation on its own, and unmaps it
/// when freed: 4 MiB. With [`TRIM_THRESHOLD`] at 8 MiB, this is the pair glibc's own
/// adaptive rule sets once the process has freed a mapped 4 MiB chunk.
///
/// By default glibc starts at 128 KiB and raises the threshold (and the trim threshold
/// with it) to the size of each mapped chunk freed. Setting [`TRIM_THRESHOLD`] turns
/// that rule off, so without this every buffer of 128 KiB or more (a large payload, the
/// read buffer that holds it) would be mapped, faulted in page by page and unmapped
/// again. In three rounds of `courier bench rpc --only concurrent --sizes 262144`, that
/// made 1,039 to 1,109 calls/s, against 3,246 to 3,800 with glibc's defaults and 3,066 to
/// 4,404 with this as well (README, Performance, has these and the bus's runs).
///
/// Buffers under 4 MiB then come from glibc's heaps, whose free chunks stay with the
/// process: a connection holding a partial 1 MiB frame cost the broker 1.23 to 1.28 MiB
/// in six runs, against 1.12 MiB with every such buffer mapped (`tests/hostile.rs`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 4 * 1024 * 1024;

/// Sets [`TRIM_THRESHOLD`] and [`MMAP_THRESHOLD`]. Where the system's allocator is not
/// glibc's, nothing.
#[allow(unsafe_code)]
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: each `mallopt` call sets one of glibc's malloc parameters, under its own lock;
    // it takes no pointers. If it fails (returns 0) that parameter's default stays,
    // which is only slower.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log(&cli.command))),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Broker(args) => broker(args).await,
            Command::Pub {
                subject,
                data,
                headers,
                count,
                durable,
                msg_id,
                target,
            } => {
                if durable {
                    streams::publish_durable(&target, subject, data, headers, count, msg_id).await
                } else {
                    tools::publish(&target, subject, data, headers, count).await
                }
            }
            Command::Stream(command) => streams::run(command).await,
            Command::Consume {
                stream,
                consumer,
                count,
                wait,
                nak,
                term,
                target,
            } => {
                let wait =
                    Duration::try_from_secs_f64(wait).map_err(|e| format!("--wait {wait}: {e}"))?;
                let answer = match (nak, term) {
                    (true, _) => streams::Answer::Nak,
                    (false, Some(reason)) => streams::Answer::Term(reason),
                    (false, None) => streams::Answer::Ack,
                };
                streams::consume(&target, stream, consumer, count, wait, answer).await
            }
            Command::Sub {
                subject,
                queue,
                count,
                target,
            } => tools::subscribe(&target, subject, queue, count).await,
            Command::Req {
                subject,
                data,
                timeout,
                target,
            } => {
                let timeout = Duration::try_from_secs_f64(timeout)
                    .map_err(|e| format!("--timeout {timeout}: {e}"))?;
                tools::request(&target, subject, data, timeout).await
            }
            Command::Reply {
                subject,
                queue,
                target,
            } => tools::reply(&target, subject, queue).await,
            Command::Bench(BenchCommand::Rpc(flags)) => bench::rpc::run(flags).await,
            Command::Bench(BenchCommand::Bus(flags)) => bench::bus::run(flags).await,
            Command::Bench(BenchCommand::Raw(flags)) => bench::raw::run(flags).await,
            Command::Bench(BenchCommand::BusRaw(flags)) => bench::relay::run(flags).await,
            Command::Bench(BenchCommand::Stream(flags)) => bench::stream::run(flags).await,
            Command::Bench(BenchCommand::ServeRpc { addr }) => bench::rpc::serve(&addr).await,
            Command::Bench(BenchCommand::ServeRaw { addr }) => bench::raw::serve(&addr).await,
            Command::Bench(BenchCommand::ServeRelay { addr }) => bench::relay::serve(&addr).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

/// Logs at `info` for the broker; quieter for the tools and benches, whose output is
/// their results.
fn default_log(command: &Command) -> &'static str {
    match command {
        Command::Broker(_) => "info",
        _ => "warn",
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("courier: error: {message}");
    ExitCode::FAILURE
}

async fn broker(args: BrokerArgs) -> Result<(), String> {
    // Frames sized to the payload limit, with the stated headroom for subject, reply and
    // headers.
    let mut config = BrokerConfig::default().with_max_payload(args.max_payload);
    config.max_connections = args.max_connections;
    config.max_subscriptions = args.max_subscriptions;
    config.connection.max_queued_bytes = args.max_queued_bytes;
    config.token = args.token;
    config.slow_consumer_grace = Duration::from_millis(args.slow_consumer_grace_ms);
    config.pace_queued_bytes = args.pace_queued_bytes;
    if let Some(dir) = &args.store {
        config.storage = mq_transport::Storage::Directory(dir.clone());
    }
    config.fsync = args.fsync;
    let broker = Broker::bind_with(args.listen, config)
        .await
        .map_err(|e| format!("cannot start the broker on {}: {e}", args.listen))?;
    let storage = match &args.store {
        Some(dir) => format!("streams in {}", dir.display()),
        None => "streams in memory".to_owned(),
    };
    let fsync = args
        .fsync
        .map(|f| format!(", fsync {} for every stream", f.label()))
        .unwrap_or_default();
    tracing::info!("{storage}{fsync}");
    // the address is the line's last word: scripts and tests read it
    println!("courier broker listening on {}", broker.local_addr());
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| format!("cannot wait for Ctrl-C: {e}"))?;
    tracing::info!("Ctrl-C: shutting down");
    broker.shutdown().await;
    Ok(())
}
