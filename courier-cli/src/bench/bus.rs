//! `courier bench bus`: nats-bench's workload through a `courier broker` child process.
//!
//! Each role has its own connection; subscriptions are confirmed by the broker before
//! anything is published (`subscribe` returns after a round trip); every scenario gets a
//! fresh broker, so its peak RSS is the scenario's own. The publisher gets back-pressure
//! from its connection's queue rather than dropping; subscription queues hold
//! `--sub-capacity` messages, as nats-bench's do, so nothing is dropped client-side while
//! the subscriber keeps up. Lost messages are counted, never hidden.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mq_transport::{Bus, ConnectOptions, Event, Message, Subscriber};
use rpc_core::Utf8Bytes;
use serde_json::{Value, json};

use super::memory::{self, MemScenario};
use super::{Caller, ChildServer, Report, fields, progress, selected, whole};
use crate::bench::rpc::check;

/// nats-bench's flags, same defaults.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BusFlags {
    #[command(flatten)]
    pubsub: PubSubFlags,
    /// Payload sizes of the request/reply scenarios.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    req_sizes: Vec<usize>,
    /// Requests measured in req_seq.
    #[arg(long, default_value_t = 20_000)]
    seq_count: usize,
    /// Requests before req_seq's measurement.
    #[arg(long, default_value_t = 2_000)]
    seq_warmup: usize,
    /// Requests in flight in req_concurrent and req_queue_group.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Seconds measured in the concurrent request scenarios.
    #[arg(long, default_value_t = 5.0)]
    duration_s: f64,
    /// Seconds of warm-up before them.
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// Messages each subscription may queue in the client.
    #[arg(long, default_value_t = 2_097_152)]
    sub_capacity: usize,
    /// Use a broker already running there (no peak RSS then) instead of starting one per
    /// scenario. The memory scenarios always start their own.
    #[arg(long)]
    connect: Option<String>,
    /// Idle connections measured in mem_idle_conns (the broker's resident memory per
    /// connection); 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    mem_conns: usize,
    /// Subscriptions measured in mem_subs (resident memory per subscription); 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    mem_subs: usize,
    /// Measure a nats-server started from this binary beside the broker in the memory
    /// scenarios (e.g. `$(../shared/peers/nats-server.sh)`).
    #[arg(long)]
    nats_server: Option<std::path::PathBuf>,
    /// Run only these scenarios (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// One JSON line per scenario instead of a table.
    #[arg(long)]
    json: bool,
}

/// The pub/sub scenarios' flags (nats-bench's, same defaults), shared by `bench bus` and
/// `bench bus-raw`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PubSubFlags {
    /// Payload sizes of the pub/sub scenarios, in bytes.
    #[arg(long, value_delimiter = ',', default_value = "16,1024")]
    sizes: Vec<usize>,
    /// Messages published per size (paired with --sizes).
    #[arg(long, value_delimiter = ',', default_value = "2000000,1000000")]
    counts: Vec<usize>,
    /// Subscribers in fanout_1toN.
    #[arg(long, default_value_t = 4)]
    pub(crate) fanout: usize,
}

impl PubSubFlags {
    /// Each payload size with its message count; an error unless they pair up.
    pub(crate) fn runs(&self) -> Result<Vec<(usize, usize)>, String> {
        if self.sizes.len() != self.counts.len() {
            return Err(format!(
                "--sizes has {} values and --counts {}: give one count per size",
                self.sizes.len(),
                self.counts.len()
            ));
        }
        Ok(self
            .sizes
            .iter()
            .copied()
            .zip(self.counts.iter().copied())
            .collect())
    }
}

impl BusFlags {
    fn wants(&self, scenario: BusScenario) -> bool {
        selected(&self.only, scenario.as_str())
    }
}

/// nats-bench's scenarios, in the order they run (per size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BusScenario {
    /// One publisher, one subscriber.
    PubSub1To1,
    /// One publisher, `--fanout` subscribers.
    FanOut1ToN,
    /// One request at a time, one responder.
    ReqSeq,
    /// `--inflight` requests in flight, one responder.
    ReqConcurrent,
    /// `--inflight` requests in flight, two responders in a queue group.
    ReqQueueGroup,
    /// `--inflight` calls in flight to a `#[courier::service]` echo served over the bus:
    /// a service called over the bus, beside NATS request/reply (`req_concurrent`).
    RpcOverBus,
}

impl BusScenario {
    /// Its name: in `--only`, in the `"scenario"` field and in the table.
    fn as_str(self) -> &'static str {
        match self {
            BusScenario::PubSub1To1 => "pubsub_1to1",
            BusScenario::FanOut1ToN => "fanout_1toN",
            BusScenario::ReqSeq => "req_seq",
            BusScenario::ReqConcurrent => "req_concurrent",
            BusScenario::ReqQueueGroup => "req_queue_group",
            BusScenario::RpcOverBus => "rpc_over_bus",
        }
    }
}

impl fmt::Display for BusScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A broker for one scenario.
struct Broker {
    child: Option<ChildServer>,
    addr: String,
}

impl Broker {
    fn start(flags: &BusFlags) -> Result<Broker, String> {
        let (child, addr) =
            super::server_or(&flags.connect, &["broker", "--listen", "127.0.0.1:0"])?;
        Ok(Broker { child, addr })
    }

    async fn connection(&self, flags: &BusFlags) -> Result<Bus, String> {
        let mut options = ConnectOptions::default();
        options.bus.subscription_capacity = flags.sub_capacity;
        options.bus.request_timeout = Duration::from_secs(10);
        Bus::connect_with(self.addr.clone(), options)
            .await
            .map_err(|e| e.to_string())
    }

    fn peak_rss(&self) -> Value {
        match self.child.as_ref().and_then(ChildServer::peak_rss_kib) {
            Some(kib) => json!(kib),
            None => Value::Null,
        }
    }
}

/// Slow-consumer and disconnect events seen on some connections.
#[derive(Clone, Default)]
struct Events {
    slow: Arc<AtomicU64>,
    disconnects: Arc<AtomicU64>,
}

impl Events {
    fn watch(&self, bus: &Bus) {
        let mut events = bus.events();
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    Event::SlowConsumer { .. } => this.slow.fetch_add(1, Ordering::Relaxed),
                    Event::Disconnected { .. } => this.disconnects.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
        });
    }
}

pub(crate) async fn run(flags: BusFlags) -> Result<(), String> {
    let mut report = Report::new(flags.json);
    let runs = flags.pubsub.runs()?;
    for (scenario, subscribers) in [
        (BusScenario::PubSub1To1, 1),
        (BusScenario::FanOut1ToN, flags.pubsub.fanout),
    ] {
        if !flags.wants(scenario) {
            continue;
        }
        for &(size, count) in &runs {
            let line = pubsub(&flags, scenario, subscribers, size, count).await?;
            report.line(line, "delivered_msgs_per_s");
        }
    }
    for &size in &flags.req_sizes {
        for (scenario, responders) in [
            (BusScenario::ReqSeq, 1),
            (BusScenario::ReqConcurrent, 1),
            (BusScenario::ReqQueueGroup, 2),
        ] {
            if flags.wants(scenario) {
                let line = request_reply(&flags, scenario, responders, size).await?;
                report.line(line, "req_per_s");
            }
        }
        if flags.wants(BusScenario::RpcOverBus) {
            let line = rpc_over_bus(&flags, size).await?;
            report.line(line, "req_per_s");
        }
    }
    // Last, and not fatal: a machine that cannot open 10,000 connections still gets the
    // throughput rows, and the memory row says why it has no figure.
    for (scenario, count) in [
        (MemScenario::IdleConns, flags.mem_conns),
        (MemScenario::Subs, flags.mem_subs),
    ] {
        if count > 0 && selected(&flags.only, scenario.as_str()) {
            match memory::run(scenario, count, flags.nats_server.as_deref()).await {
                Ok(line) => report.line(line, "broker_bytes_per"),
                Err(error) => {
                    eprintln!("{error}");
                    report.line(memory::failed(scenario, count, &error), "broker_bytes_per");
                }
            }
        }
    }
    Ok(())
}

/// What one subscriber received: how many messages, and when the first and the last came.
pub(crate) struct Received {
    pub(crate) delivered: usize,
    pub(crate) first: Option<Instant>,
    pub(crate) last: Option<Instant>,
}

/// A pub/sub scenario's row in nats-bench's fields: `count` messages of `size` bytes
/// published in `publish_elapsed` by `system`, and what each subscriber's task
/// `received`. The rate is deliveries over the span from the earliest first message to
/// the latest last one.
pub(crate) async fn pubsub_row(
    system: &str,
    scenario: &str,
    size: usize,
    count: usize,
    publish_elapsed: Duration,
    received: Vec<tokio::task::JoinHandle<Result<Received, String>>>,
) -> Result<serde_json::Map<String, Value>, String> {
    let subscribers = received.len();
    let mut per_sub = Vec::new();
    let (mut delivered, mut first, mut last) = (0, None::<Instant>, None::<Instant>);
    for receiver in received {
        let got = receiver.await.map_err(|e| e.to_string())??;
        delivered += got.delivered;
        if let (Some(f), Some(l)) = (got.first, got.last) {
            per_sub.push(whole(
                got.delivered as f64 / (l - f).as_secs_f64().max(1e-9),
            ));
            first = Some(first.map_or(f, |x| x.min(f)));
            last = Some(last.map_or(l, |x| x.max(l)));
        } else {
            per_sub.push(json!(0.0));
        }
    }
    let span = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64().max(1e-9),
        _ => f64::INFINITY,
    };
    let expected = count * subscribers;
    Ok(fields(json!({
        "system": system,
        "scenario": scenario,
        "payload_bytes": size,
        "published": count,
        "publish_msgs_per_s": whole(count as f64 / publish_elapsed.as_secs_f64()),
        "delivered": delivered,
        "expected_deliveries": expected,
        "lost": expected - delivered.min(expected),
        "delivered_msgs_per_s": whole(delivered as f64 / span),
        "per_sub_msgs_per_s": per_sub,
        "sub_elapsed_s": (span * 10_000.0).round() / 10_000.0,
        "subscribers": subscribers,
    })))
}

/// Counts messages until `expected` arrived or none came for 3 s.
async fn receive(mut sub: Subscriber, expected: usize, size: usize) -> Result<Received, String> {
    let mut got = Received {
        delivered: 0,
        first: None,
        last: None,
    };
    while got.delivered < expected {
        match tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
            Ok(Some(message)) => {
                check(message.payload.len(), size)?;
                let now = Instant::now();
                got.first.get_or_insert(now);
                got.last = Some(now);
                got.delivered += 1;
            }
            _ => break,
        }
    }
    Ok(got)
}

async fn pubsub(
    flags: &BusFlags,
    scenario: BusScenario,
    subscribers: usize,
    size: usize,
    count: usize,
) -> Result<serde_json::Map<String, Value>, String> {
    let broker = Broker::start(flags)?;
    let subject = Utf8Bytes::from(format!("bench.ps.{subscribers}.{size}"));
    let events = Events::default();
    let mut receivers = Vec::new();
    let mut sub_buses = Vec::new();
    for _ in 0..subscribers {
        let bus = broker.connection(flags).await?;
        events.watch(&bus);
        let sub = bus
            .subscribe(subject.clone())
            .await
            .map_err(|e| e.to_string())?;
        receivers.push(tokio::spawn(receive(sub, count, size)));
        sub_buses.push(bus);
    }
    let publisher = broker.connection(flags).await?;
    events.watch(&publisher);
    let payload = Bytes::from(vec![0xAB; size]);
    let bar = progress(format!("bus {scenario} {size} B"));
    bar.set_length(count as u64);
    let started = Instant::now();
    for i in 0..count {
        publisher
            .publish(subject.clone(), payload.clone())
            .await
            .map_err(|e| e.to_string())?;
        if i % 65_536 == 0 {
            bar.set_position(i as u64);
        }
    }
    publisher.flush().await.map_err(|e| e.to_string())?;
    let publish_elapsed = started.elapsed();
    let mut row = pubsub_row(
        "courier",
        scenario.as_str(),
        size,
        count,
        publish_elapsed,
        receivers,
    )
    .await?;
    bar.finish_and_clear();
    row.extend(fields(json!({
        "sub_capacity": flags.sub_capacity,
        "slow_consumer_events": events.slow.load(Ordering::Relaxed),
        "disconnect_events": events.disconnects.load(Ordering::Relaxed),
        "broker_peak_rss_kib": broker.peak_rss(),
        "server": "courier broker",
    })));
    Ok(row)
}

#[derive(Clone)]
struct Requester {
    bus: Bus,
    subject: Utf8Bytes,
    payload: Bytes,
}

impl Caller for Requester {
    async fn call(&self) -> Result<(), String> {
        let message = Message::new(self.subject.clone(), self.payload.clone());
        let reply = self
            .bus
            .request_message(message, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        check(reply.payload.len(), self.payload.len())
    }
}

async fn request_reply(
    flags: &BusFlags,
    scenario: BusScenario,
    responders: usize,
    size: usize,
) -> Result<serde_json::Map<String, Value>, String> {
    let broker = Broker::start(flags)?;
    let subject = Utf8Bytes::from(format!("bench.rr.{size}"));
    let events = Events::default();
    let mut served = Vec::new();
    for _ in 0..responders {
        let bus = broker.connection(flags).await?;
        events.watch(&bus);
        let mut sub = if responders > 1 {
            bus.queue_subscribe(subject.clone(), "workers").await
        } else {
            bus.subscribe(subject.clone()).await
        }
        .map_err(|e| e.to_string())?;
        let count = Arc::new(AtomicU64::new(0));
        served.push(count.clone());
        tokio::spawn(async move {
            while let Some(request) = sub.next().await {
                if let Some(reply) = request.reply {
                    if bus.publish(reply, request.payload).await.is_err() {
                        return;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let requester = Requester {
        bus: broker.connection(flags).await?,
        subject,
        payload: Bytes::from(vec![0xAB; size]),
    };
    events.watch(&requester.bus);
    let bar = progress(format!("bus {scenario} {size} B"));
    let (mut measured, in_flight) = match scenario {
        BusScenario::ReqSeq => (
            super::sequential(&requester, flags.seq_warmup, flags.seq_count, &bar).await?,
            1,
        ),
        _ => (
            super::concurrent(
                std::slice::from_ref(&requester),
                flags.inflight,
                Duration::from_secs_f64(flags.warmup_s),
                Duration::from_secs_f64(flags.duration_s),
                &bar,
            )
            .await?,
            flags.inflight,
        ),
    };
    bar.finish_and_clear();
    let served: Vec<u64> = served.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let mut row = request_row(
        scenario,
        size,
        &mut measured,
        in_flight,
        responders,
        &events,
        &broker,
    );
    // (a failed request ends the phase with an error: a row means none failed)
    row.extend(fields(
        json!({ "served_per_responder": served, "errors": 0 }),
    ));
    Ok(row)
}

/// The fields of a request/reply row: the rate and latencies measured, and what the
/// connections and the broker saw.
fn request_row(
    scenario: BusScenario,
    size: usize,
    measured: &mut super::Measured,
    in_flight: usize,
    responders: usize,
    events: &Events,
    broker: &Broker,
) -> serde_json::Map<String, Value> {
    fields(json!({
        "system": "courier",
        "scenario": scenario.as_str(),
        "payload_bytes": size,
        "requests": measured.calls,
        "req_per_s": whole(measured.rate()),
        "elapsed_s": (measured.elapsed.as_secs_f64() * 10_000.0).round() / 10_000.0,
        "p50_us": measured.percentile_us(50.0),
        "p99_us": measured.percentile_us(99.0),
        "in_flight": in_flight,
        "responders": responders,
        "slow_consumer_events": events.slow.load(Ordering::Relaxed),
        "disconnect_events": events.disconnects.load(Ordering::Relaxed),
        "broker_peak_rss_kib": broker.peak_rss(),
        "server": "courier broker",
    }))
}

/// `rpc_over_bus`: the echo service of `bench rpc`, served on one connection to the
/// broker (one instance, queue group `Echo`), called through its generated client on
/// another with `--inflight` calls in flight: the RPC layer's call lifecycle (deadline,
/// typed encoding, dispatch) on top of a request/reply through the broker.
async fn rpc_over_bus(
    flags: &BusFlags,
    size: usize,
) -> Result<serde_json::Map<String, Value>, String> {
    let scenario = BusScenario::RpcOverBus;
    let broker = Broker::start(flags)?;
    let events = Events::default();
    let server = broker.connection(flags).await?;
    events.watch(&server);
    let instance = server
        .serve(crate::bench::rpc::echo_service())
        .await
        .map_err(|e| e.to_string())?;
    let caller_bus = broker.connection(flags).await?;
    events.watch(&caller_bus);
    let caller = crate::bench::rpc::echo_caller(caller_bus.rpc_client(), size);
    let bar = progress(format!("bus {scenario} {size} B"));
    let mut measured = super::concurrent(
        std::slice::from_ref(&caller),
        flags.inflight,
        Duration::from_secs_f64(flags.warmup_s),
        Duration::from_secs_f64(flags.duration_s),
        &bar,
    )
    .await?;
    bar.finish_and_clear();
    drop(instance);
    let mut row = request_row(
        scenario,
        size,
        &mut measured,
        flags.inflight,
        1,
        &events,
        &broker,
    );
    row.insert(
        "compare_with".into(),
        json!("nats-bench req_concurrent (NATS request/reply, same in-flight count)"),
    );
    Ok(row)
}
