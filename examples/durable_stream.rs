//! Durable streams on the embedded bus: publish with acknowledgements, deduplicate a
//! retry, close the bus, open a new one on the same directory and replay everything.
//!
//! `cargo run --example durable_stream` (the data goes to a temporary directory, removed
//! at the end). It checks its own figures and exits non-zero on a mismatch.

use std::process::ExitCode;
use std::time::Instant;

use courier::bus::{Bus, EmbeddedConfig, Publish, Storage, StreamConfig};

const ORDERS: u64 = 10_000;

fn bus_in(dir: &std::path::Path) -> Bus {
    let mut config = EmbeddedConfig::default();
    config.storage = Storage::Directory(dir.to_owned());
    Bus::embedded_with(config)
}

#[tokio::main]
async fn main() -> Result<ExitCode, courier::BusError> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    println!("data directory: {}", dir.path().display());

    {
        let bus = bus_in(dir.path());
        let streams = bus.streams()?;
        // fsync = always (the default): acknowledged means written and fdatasync'd.
        streams
            .create(StreamConfig::new("ORDERS", ["orders.>"]))
            .await?;
        let mut watcher = bus.subscribe("orders.>").await?; // a stream records, it does not hide

        let started = Instant::now();
        let mut pending = std::collections::VecDeque::new();
        for i in 0..ORDERS {
            let subject = format!("orders.{}", ["eu", "us", "apac"][i as usize % 3]);
            pending.push_back(streams.publish(subject, format!("order {i}")).await?);
            if pending.len() == 64 {
                pending.pop_front().expect("64").await?; // 64 in flight, oldest first
            }
        }
        for ack in pending {
            ack.await?;
        }
        println!(
            "{ORDERS} orders acknowledged durable in {:?} (64 in flight, group commit)",
            started.elapsed()
        );
        let first = watcher.next().await.expect("subscribed");
        println!(
            "a plain subscriber saw them too, first: {:?}",
            first.payload
        );

        // A retry of a publish whose acknowledgement was lost: same id, stored once.
        let once = Publish {
            msg_id: Some("order-final".into()),
            ..Publish::default()
        };
        let ack = streams
            .publish_with("orders.eu", "final", once.clone())
            .await?
            .await?;
        let retry = streams
            .publish_with("orders.eu", "final", once)
            .await?
            .await?;
        println!(
            "retry of seq {} acknowledged as duplicate: {}",
            ack.seq, retry.duplicate
        );
        if !retry.duplicate || retry.seq != ack.seq {
            eprintln!("MISMATCH: the retry was stored again");
            return Ok(ExitCode::FAILURE);
        }
    } // the bus and its store close here

    let started = Instant::now();
    let bus = bus_in(dir.path()); // recovers the store: reads and verifies every segment
    let streams = bus.streams()?;
    let info = streams.info("ORDERS").await?;
    println!(
        "reopened in {:?}: {} messages, sequences {}..={}",
        started.elapsed(),
        info.state.msgs,
        info.state.first_seq,
        info.state.last_seq
    );
    let mut next = 1;
    let mut replayed = 0;
    loop {
        let batch = streams.range("ORDERS", next, 1000, 1 << 20).await?;
        let Some(last) = batch.last() else { break };
        next = last.seq + 1;
        replayed += batch.len() as u64;
    }
    let last_eu = streams.last("ORDERS", "orders.eu").await?;
    println!(
        "replayed {replayed} messages; last on orders.eu: seq {} {:?}",
        last_eu.seq, last_eu.payload
    );
    if replayed != ORDERS + 1 || info.state.msgs != ORDERS + 1 {
        eprintln!("MISMATCH: expected {} messages", ORDERS + 1);
        return Ok(ExitCode::FAILURE);
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}
