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
