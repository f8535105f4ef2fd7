//! An order pipeline that survives crashes, on durable streams.
//!
//! * A producer publishes 300 orders of 12 customers with message ids. It "crashes"
//!   half way and, restarted, sends everything again from order 100 on: the stream
//!   stores each order once.
//! * A consumer group of three workers fulfils them, in per-customer order (the
//!   consumer's key is the `Customer` header, one message in flight per customer).
//!   One worker crashes holding an order it never acknowledges: the order comes back
//!   after the ack wait and another worker fulfils it.
//! * One order is poison (a negative amount): the worker terminates it and it lands in
//!   the dead-letter stream.
//! * On the embedded bus the whole bus is closed mid-way and reopened on its directory
//!   too: the consumer goes on where it was.
//!
//! The example checks its totals and exits non-zero on a mismatch.
//! `cargo run --example orders` (embedded, in a temporary directory), or with
//! `COURIER_BROKER=host:port` against `courier broker --store DIR`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::bus::{
    Bus, BusError, ConsumerConfig, DeadLetter, EmbeddedConfig, KeySource, Message, Publish,
    Storage, StreamConfig, Streams,
};

const ORDERS: u64 = 300;
const CUSTOMERS: u64 = 12;
const POISON: u64 = 137;

/// Order `n`: its customer and amount (cents); the poison order's amount is negative.
fn order(n: u64) -> (u64, i64) {
    let amount = if n == POISON {
        -1
    } else {
        (n * 37 % 1000) as i64 + 100
    };
    (n % CUSTOMERS, amount)
}

async fn produce(streams: &Streams, from: u64, to: u64) -> Result<(u64, u64), BusError> {
    let (mut stored, mut duplicates) = (0, 0);
    let mut acks = Vec::new();
    for n in from..to {
        let (customer, amount) = order(n);
        let message = Message::new(format!("orders.c{customer}"), format!("{n} {amount}"))
            .with_header("Customer", format!("c{customer}"));
        let id = Publish {
            msg_id: Some(format!("order-{n}")),
            ..Publish::default()
        };
        acks.push(streams.publish_message(message, id).await?);
    }
    for ack in acks {
        if ack.await?.duplicate {
            duplicates += 1;
        } else {
            stored += 1;
        }
    }
    Ok((stored, duplicates))
}

/// What the workers did, shared by all of them.
#[derive(Debug, Default)]
struct Ledger {
    fulfilled: BTreeMap<u64, u32>,
    revenue: i64,
    last_per_customer: BTreeMap<u64, u64>,
    out_of_order: u64,
    terminated: u64,
}

/// A worker: fulfils orders until it handled `limit` or nothing comes for a while.
/// With `crash_after`, it takes one more order after that many and vanishes without
/// answering it.
async fn worker(
    streams: Streams,
    ledger: Arc<Mutex<Ledger>>,
    limit: u64,
    crash_after: Option<u64>,
) -> Result<(), BusError> {
    let consumer = streams.consumer("ORDERS", "fulfilment").await?;
    let mut handled = 0;
    while handled < limit {
        let batch = consumer.fetch(1, Duration::from_secs(3)).await?;
        let Some(delivery) = batch.into_iter().next() else {
            return Ok(()); // nothing for 3 s: the work is done
        };
        if crash_after == Some(handled) {
            println!(
                "worker crashes holding order #{} (not acknowledged)",
                delivery.message.seq
            );
            return Ok(());
        }
        let text = String::from_utf8_lossy(&delivery.message.payload).into_owned();
        let mut fields = text.split(' ');
        let n: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        let amount: i64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        if amount < 0 {
            delivery
                .term(&format!("order {n}: negative amount"))
                .await?;
            ledger.lock().unwrap().terminated += 1;
        } else {
            // fulfil, then acknowledge durably: a crash before the acknowledgement
            // means the order comes back (and would be counted twice here)
            {
                let mut l = ledger.lock().unwrap();
                *l.fulfilled.entry(n).or_default() += 1;
                l.revenue += amount;
                let customer = order(n).0;
                if l.last_per_customer
                    .get(&customer)
                    .is_some_and(|&last| last > n)
                {
                    l.out_of_order += 1;
                }
                l.last_per_customer.insert(customer, n);
            }
            delivery.ack_confirmed().await?;
        }
        handled += 1;
    }
    Ok(())
}

async fn setup(streams: &Streams) -> Result<(), BusError> {
    streams
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .await?;
    streams
        .create(StreamConfig::new("DEAD", ["$DLQ.ORDERS.>"]))
        .await?;
    let mut config = ConsumerConfig::durable("fulfilment");
    config.key = Some(KeySource::Header("Customer".into()));
    config.ack_wait = Duration::from_secs(1);
    config.max_deliver = Some(5);
    config.dead_letter = DeadLetter::Stream("DEAD".into());
    streams.create_consumer("ORDERS", config).await?;
    Ok(())
}

fn embedded_in(dir: &std::path::Path) -> Bus {
    let mut config = EmbeddedConfig::default();
    config.storage = Storage::Directory(dir.to_owned());
    Bus::embedded_with(config)
}

#[tokio::main]
async fn main() -> Result<ExitCode, BusError> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = std::env::var("COURIER_BROKER").ok();
    let connect = || async {
        match &broker {
            Some(addr) => Bus::connect(addr.clone()).await,
            None => Ok(embedded_in(dir.path())),
        }
    };
    match &broker {
        Some(addr) => println!("(on the courier broker at {addr})"),
        None => println!("(on the embedded bus, data in {})", dir.path().display()),
    }
    let mut bus = connect().await?;
    let mut streams = bus.streams()?;
    setup(&streams).await?;

    // the producer crashes after order 149; restarted, it sends again from order 100
    let (first, _) = produce(&streams, 0, 150).await?;
    let (second, duplicates) = produce(&streams, 100, ORDERS).await?;
    println!(
        "producer: {first} stored, crashed, restarted: {second} more stored, {duplicates} recognised as duplicates"
    );

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // first shift: three workers of 50 orders each, one crashes after 20
    let shift: Vec<_> = [None, Some(20), None]
        .into_iter()
        .map(|crash| tokio::spawn(worker(streams.clone(), ledger.clone(), 50, crash)))
        .collect();
    for w in shift {
        w.await.expect("worker")?;
    }
    if broker.is_none() {
        let done = ledger.lock().unwrap().fulfilled.len();
        drop((streams, bus));
        bus = connect().await?;
        streams = bus.streams()?;
        println!("bus closed and reopened after {done} orders fulfilled");
    }
    // second shift: until nothing is left
    let shift: Vec<_> = (0..3)
        .map(|_| tokio::spawn(worker(streams.clone(), ledger.clone(), u64::MAX, None)))
        .collect();
    for w in shift {
        w.await.expect("worker")?;
    }

    let stored = streams.info("ORDERS").await?.state.msgs;
    let dead = streams.info("DEAD").await?.state.msgs;
    let letter = streams.get("DEAD", 1).await?;
    let l = ledger.lock().unwrap();
    let expected_revenue: i64 = (0..ORDERS)
        .filter(|&n| n != POISON)
        .map(|n| order(n).1)
        .sum();
    let twice = l.fulfilled.values().filter(|&&c| c > 1).count();
    let reason = letter
        .header("Courier-Dlq-Reason")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    println!(
        "stored {stored} orders; fulfilled {} ({twice} twice), {} out of customer order; revenue {} (expected {expected_revenue}); dead letters {dead}: {reason}",
        l.fulfilled.len(),
        l.out_of_order,
        l.revenue
    );
    let ok = stored == ORDERS
        && l.fulfilled.len() as u64 == ORDERS - 1
        && twice == 0
        && l.out_of_order == 0
        && l.revenue == expected_revenue
        && dead == 1
        && l.terminated == 1
        && reason == format!("term: order {POISON}: negative amount");
    if ok {
        println!("all totals match");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("MISMATCH");
        Ok(ExitCode::FAILURE)
    }
}
