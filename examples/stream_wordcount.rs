//! Stream computing on the bus (the course's case study): a producer publishes lines,
//! three workers in a queue group count the words of each line, and an aggregator keeps
//! running totals and publishes them. The final totals are checked against a direct count.
//!
//! ```text
//!  producer ──text.lines──▶ [queue group "counters": worker 1 | worker 2 | worker 3]
//!                                       │ text.counts (one per line)
//!                                       ▼
//!                                   aggregator ──text.totals──▶ main (prints)
//! ```
//!
//! `cargo run --example stream_wordcount` (embedded), or with `COURIER_BROKER=host:port`.
//!
//! With `-- --durable` the pipeline runs on durable streams instead: lines and counts
//! are stored (streams `LINES` and `COUNTS`), the workers are a consumer group that
//! publishes each line's count with the message id `count-<line>` before it
//! acknowledges the line, and one worker is killed mid-way (its task aborted, holding a
//! line it never acknowledged) and started again. The line comes back, is counted
//! again, and its count is recognised as a duplicate: no line is lost or counted twice.

#[path = "shared/backend.rs"]
mod backend;

use std::collections::BTreeMap;

use courier::{Bus, BusError};

const TEXT: &str = "the quick brown fox jumps over the lazy dog
a message queue keeps the order of messages per partition
the broker fans out one buffer to every subscriber
no message lost and no message duplicated
the quick consumer keeps up and the slow consumer is told so";

/// `word=count` pairs separated by spaces, the wire format of counts and totals.
fn encode(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(w, c)| format!("{w}={c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn decode(text: &str) -> BTreeMap<String, u64> {
    text.split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .filter_map(|(w, c)| Some((w.to_string(), c.parse().ok()?)))
        .collect()
}

async fn worker(bus: Bus, id: usize) -> Result<(), BusError> {
    let mut lines = bus.queue_subscribe("text.lines", "counters").await?;
    tokio::spawn(async move {
        while let Some(line) = lines.next().await {
            let mut counts = BTreeMap::new();
            for word in String::from_utf8_lossy(&line.payload).split_whitespace() {
                *counts.entry(word.to_lowercase()).or_insert(0) += 1;
            }
            let message = courier::Message::new("text.counts", encode(&counts))
                .with_header("Worker", id.to_string());
            bus.publish_message(message).await.ok();
        }
    });
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BusError> {
    let bus = backend::bus().await?;
    if std::env::args().any(|a| a == "--durable") {
        return durable::run(bus).await;
    }
    let repeat = 200; // lines = 5 × 200
    let total_lines = TEXT.lines().count() * repeat;

    for id in 1..=3 {
        worker(bus.clone(), id).await?;
    }

    // The aggregator: folds per-line counts into running totals, publishes them every
    // 250 lines and once more at the end.
    let mut counts = bus.subscribe("text.counts").await?;
    let aggregator_bus = bus.clone();
    let aggregator = tokio::spawn(async move {
        let mut totals: BTreeMap<String, u64> = BTreeMap::new();
        let mut per_worker: BTreeMap<String, usize> = BTreeMap::new();
        for seen in 1..=total_lines {
            let Some(m) = counts.next().await else { break };
            for (word, n) in decode(&String::from_utf8_lossy(&m.payload)) {
                *totals.entry(word).or_insert(0) += n;
            }
            let worker = m.headers.get_str("Worker").unwrap_or("?").to_string();
            *per_worker.entry(worker).or_insert(0) += 1;
            if seen % 250 == 0 || seen == total_lines {
                let message = courier::Message::new("text.totals", encode(&totals))
                    .with_header("Lines", seen.to_string());
                aggregator_bus.publish_message(message).await.ok();
            }
        }
        per_worker
    });

    let mut totals = bus.subscribe("text.totals").await?;
    for _ in 0..repeat {
        for line in TEXT.lines() {
            bus.publish("text.lines", line.to_string()).await?;
        }
    }

    let last = loop {
        let m = totals.next().await.expect("subscribed");
        let lines: usize = m
            .headers
            .get_str("Lines")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let running = decode(&String::from_utf8_lossy(&m.payload));
        println!(
            "running totals after {lines:>4} lines: the={} message={} quick={}",
            running.get("the").unwrap_or(&0),
            running.get("message").unwrap_or(&0),
            running.get("quick").unwrap_or(&0)
        );
        if lines == total_lines {
            break running;
        }
    };
    let per_worker = aggregator.await.expect("aggregator finished");
    println!("lines counted per worker: {per_worker:?}");

    let mut direct: BTreeMap<String, u64> = BTreeMap::new();
    for word in TEXT.split_whitespace() {
        *direct.entry(word.to_lowercase()).or_insert(0) += repeat as u64;
    }
    println!(
        "{} distinct words; totals match a direct count: {}",
        last.len(),
        last == direct
    );
    if last != direct {
        std::process::exit(1);
    }
    Ok(())
}

/// The pipeline on durable streams, with a worker killed and restarted.
mod durable {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use courier::bus::{ConsumerConfig, Message, Publish, StreamConfig, Streams};
    use courier::{Bus, BusError};

    use super::{TEXT, decode, encode};

    /// A worker of the consumer group `counters`: counts a line, publishes the count
    /// durably with the line's id, then acknowledges the line. `counted` is shared by
    /// every worker, to say how far the pipeline got.
    async fn worker(
        streams: Streams,
        id: usize,
        counted: Arc<AtomicU64>,
        crash_after: Option<u64>,
    ) -> Result<(), BusError> {
        let lines = streams.consumer("LINES", "counters").await?;
        let mut published = 0;
        loop {
            for line in lines.fetch(8, Duration::from_secs(3600)).await? {
                let mut counts = BTreeMap::new();
                for word in String::from_utf8_lossy(&line.message.payload).split_whitespace() {
                    *counts.entry(word.to_lowercase()).or_insert(0) += 1;
                }
                let message = Message::new("text.counts", encode(&counts))
                    .with_header("Worker", id.to_string())
                    .with_header("Line", line.message.seq.to_string());
                let once = Publish {
                    msg_id: Some(format!("count-{}", line.message.seq)),
                    ..Publish::default()
                };
                let ack = streams.publish_message(message, once).await?.await?;
                if ack.duplicate {
                    println!(
                        "worker {id}: line {} counted again after the kill: its count is a duplicate, not stored",
                        line.message.seq
                    );
                }
                counted.fetch_add(1, Ordering::Relaxed);
                published += 1;
                if crash_after == Some(published) {
                    // the worst moment: the count is stored, the line not acknowledged
                    println!(
                        "worker {id} killed after publishing the count of line {} and before acknowledging it",
                        line.message.seq
                    );
                    return Ok(());
                }
                line.ack_confirmed().await?;
            }
        }
    }

    pub(super) async fn run(bus: Bus) -> Result<(), BusError> {
        let streams = bus.streams()?;
        let repeat = 200;
        let total_lines = (TEXT.lines().count() * repeat) as u64;
        streams
            .create(StreamConfig::new("LINES", ["text.lines"]))
            .await?;
        streams
            .create(StreamConfig::new("COUNTS", ["text.counts"]))
            .await?;
        let mut config = ConsumerConfig::durable("counters");
        config.ack_wait = Duration::from_millis(500);
        streams.create_consumer("LINES", config).await?;
        streams
            .create_consumer("COUNTS", ConsumerConfig::durable("totals"))
            .await?;

        let mut acks = Vec::new();
        for (n, line) in TEXT.lines().cycle().take(total_lines as usize).enumerate() {
            let once = Publish {
                msg_id: Some(format!("line-{n}")),
                ..Publish::default()
            };
            acks.push(
                streams
                    .publish_with("text.lines", line.to_string(), once)
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
        println!("{total_lines} lines stored in LINES");

        let counted = Arc::new(AtomicU64::new(0));
        let mut workers: Vec<_> = (1..=3)
            .map(|id| {
                let crash = (id == 2).then_some(100);
                tokio::spawn(worker(streams.clone(), id, counted.clone(), crash))
            })
            .collect();
        // worker 2 dies after its 100th count; it is started again
        let killed = std::mem::replace(&mut workers[1], tokio::spawn(std::future::pending()));
        killed.await.expect("worker 2")?;
        workers[1] = tokio::spawn(worker(streams.clone(), 2, counted.clone(), None));
        println!("worker 2 started again");

        // the aggregator: folds each line's count once
        let totals_consumer = streams.consumer("COUNTS", "totals").await?;
        let mut totals: BTreeMap<String, u64> = BTreeMap::new();
        let mut lines_seen = BTreeSet::new();
        let mut per_worker: BTreeMap<String, usize> = BTreeMap::new();
        let mut twice = 0;
        while (lines_seen.len() as u64) < total_lines {
            for m in totals_consumer.fetch(256, Duration::from_secs(10)).await? {
                let line = m
                    .message
                    .header("Line")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                if lines_seen.insert(line) {
                    for (word, n) in decode(&String::from_utf8_lossy(&m.message.payload)) {
                        *totals.entry(word).or_insert(0) += n;
                    }
                    let worker = m
                        .message
                        .header("Worker")
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    *per_worker.entry(worker.unwrap_or_default()).or_insert(0) += 1;
                } else {
                    twice += 1;
                }
                m.ack().await?;
            }
        }
        for w in workers {
            w.abort();
        }
        let stored_counts = streams.info("COUNTS").await?.state.msgs;
        let mut direct: BTreeMap<String, u64> = BTreeMap::new();
        for word in TEXT.split_whitespace() {
            *direct.entry(word.to_lowercase()).or_insert(0) += repeat as u64;
        }
        println!(
            "counts stored: {stored_counts} for {total_lines} lines; lines counted twice: {twice}; per worker: {per_worker:?}"
        );
        println!(
            "{} distinct words; totals match a direct count: {}",
            totals.len(),
            totals == direct
        );
        if totals != direct || twice != 0 || stored_counts != total_lines {
            std::process::exit(1);
        }
        Ok(())
    }
}
