//! Kill -9 mid-consumption with a real process: every unacknowledged message is
//! delivered again, and no message acknowledged with `ack_confirmed` is.
//!
//! The parent fills a stream (`fsync = always`) and then runs this binary as a child
//! that consumes it with a durable consumer, one message at a time: it prints
//! `D <seq> <deliveries>` when it starts on a message, then either leaves it
//! unanswered (`S <seq>`: one in five on its first delivery) or acknowledges it with
//! `ack_confirmed` and prints `A <seq>` once that returns. The parent kills the child
//! with SIGKILL mid-run, starts another on the same directory, and so on; at the end
//! it drains the consumer itself. It checks:
//!
//! * no message printed `A` is delivered again (`confirmed but delivered again`);
//! * every message delivered and not acknowledged when its process was killed is
//!   delivered again later (`unacknowledged not delivered again`), except the one the
//!   child was acknowledging at the kill, whose acknowledgement may have landed;
//! * every message is acknowledged in the end (`lost`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mq_store::{ConsumerConfig, Publish, Store, StreamConfig};

const CHILD: &str = "MQ_STORE_CONSUME_KILL9_CHILD";
const MESSAGES: u64 = 3000;
const CYCLES: usize = 5;

fn consumer_config() -> ConsumerConfig {
    ConsumerConfig {
        // long: within one process nothing comes back; after a restart everything
        // not done does, at once
        ack_wait: Duration::from_secs(300),
        max_ack_pending: 10_000,
        ..ConsumerConfig::durable("work")
    }
}

async fn child(dir: &Path) {
    let store = Store::open(dir).expect("open the store");
    let consumer = store
        .create_consumer("WORK", consumer_config())
        .expect("the consumer");
    let mut out = std::io::stdout().lock();
    loop {
        let batch = consumer
            .fetch(32, Duration::from_secs(5))
            .await
            .expect("fetch");
        for d in batch {
            let seq = d.info.stream_seq;
            writeln!(out, "D {seq} {}", d.info.deliveries).expect("stdout");
            if d.info.deliveries == 1 && seq % 5 == 0 {
                writeln!(out, "S {seq}").expect("stdout");
            } else {
                d.ack_confirmed().await.expect("ack");
                writeln!(out, "A {seq}").expect("stdout");
            }
            out.flush().expect("stdout");
        }
    }
}

#[derive(Default)]
struct Tally {
    confirmed: BTreeSet<u64>,
    /// Delivered (in a process since killed) and not acknowledged there.
    owed: BTreeMap<u64, usize>,
    /// Being acknowledged when its process was killed: the acknowledgement may have
    /// landed without the child printing it.
    maybe: BTreeSet<u64>,
    confirmed_then_delivered: usize,
    owed_not_redelivered: usize,
}

impl Tally {
    fn delivered(&mut self, seq: u64) {
        if self.confirmed.contains(&seq) {
            self.confirmed_then_delivered += 1;
        }
        self.owed.remove(&seq);
    }
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
            .block_on(child(Path::new(&dir)));
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        println!("consumers_resume_after_kill_9: test");
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    runtime.block_on(async {
        let store = Store::open(dir.path()).expect("open");
        let stream = store
            .create(StreamConfig::new("WORK", ["work.*"]))
            .expect("stream");
        let mut acks = Vec::new();
        for i in 0..MESSAGES {
            let body = format!("job {i}");
            acks.push(
                stream
                    .publish(
                        &format!("work.{}", i % 3),
                        &[],
                        body.as_bytes(),
                        &Publish::default(),
                    )
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    });

    let mut tally = Tally::default();
    for cycle in 0..CYCLES {
        let mut child = Command::new(std::env::current_exe().expect("this test's path"))
            .env(CHILD, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the consumer");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let kill_after = 300 + cycle * 211;
        let mut this_run: Vec<String> = Vec::new();
        while this_run.len() < kill_after {
            let line = lines
                .next()
                .expect("the child consumes until killed")
                .expect("utf-8");
            this_run.push(line);
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        this_run.extend(lines.map_while(Result::ok));
        // what this process was working on when it died: acknowledged, maybe
        let mut unanswered: BTreeSet<u64> = BTreeSet::new();
        let mut last_started = None; // (seq, deliveries)
        for line in &this_run {
            let mut parts = line.split(' ');
            let (Some(kind), Some(Ok(seq))) = (parts.next(), parts.next().map(str::parse::<u64>))
            else {
                continue; // a line cut by the kill
            };
            match kind {
                "D" => {
                    tally.delivered(seq);
                    unanswered.insert(seq);
                    let deliveries: u32 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    last_started = Some((seq, deliveries));
                }
                "A" => {
                    tally.confirmed.insert(seq);
                    unanswered.remove(&seq);
                }
                _ => {}
            }
        }
        for seq in unanswered {
            // the last one started was being acknowledged, unless it is one left alone
            let acking = last_started.is_some_and(|(s, n)| s == seq && !(n == 1 && s % 5 == 0));
            if acking {
                tally.maybe.insert(seq);
            } else {
                tally.owed.insert(seq, cycle);
            }
        }
        println!(
            "cycle {cycle}: {} lines, confirmed so far {}, owed redeliveries {}, confirmed but delivered again: {}",
            this_run.len(),
            tally.confirmed.len(),
            tally.owed.len(),
            tally.confirmed_then_delivered
        );
    }

    // drain what is left in this process
    let leftover = runtime.block_on(async {
        let store = Store::open(dir.path()).expect("reopen after kill -9");
        let consumer = store
            .consumer("WORK", "work")
            .expect("the consumer survives");
        let mut seen = Vec::new();
        loop {
            let batch = consumer
                .fetch(256, Duration::from_millis(200))
                .await
                .expect("fetch");
            if batch.is_empty() {
                break;
            }
            for d in batch {
                seen.push(d.info.stream_seq);
                d.ack_confirmed().await.expect("ack");
            }
        }
        let info = consumer.info();
        (seen, info.ack_floor, info.num_ack_pending)
    });
    let (leftover, floor, pending) = leftover;
    for &seq in &leftover {
        tally.delivered(seq);
        tally.confirmed.insert(seq);
    }
    tally.owed_not_redelivered = tally.owed.len();
    // a message acknowledged at a kill without a printed `A` must be done: the final
    // ack floor covers every message
    let lost = (1..=MESSAGES)
        .filter(|s| !(tally.confirmed.contains(s) || (tally.maybe.contains(s) && *s <= floor)))
        .count();
    let unprinted = tally
        .maybe
        .iter()
        .filter(|s| !tally.confirmed.contains(s))
        .count();
    println!(
        "final ack floor {floor} of {MESSAGES}, pending {pending}; acknowledged at a kill before the child printed it: {unprinted}"
    );
    assert_eq!(
        (floor, pending),
        (MESSAGES, 0),
        "the consumer is not done with everything"
    );
    println!(
        "drained {} at the end; confirmed but delivered again: {}; unacknowledged not delivered again: {}; lost: {lost}",
        leftover.len(),
        tally.confirmed_then_delivered,
        tally.owed_not_redelivered
    );
    assert_eq!(
        tally.confirmed_then_delivered, 0,
        "a confirmed acknowledgement was forgotten"
    );
    assert_eq!(
        tally.owed_not_redelivered, 0,
        "unacknowledged messages were not delivered again: {:?}",
        tally.owed
    );
    assert_eq!(lost, 0, "messages were never acknowledged");
    println!("test consumers_resume_after_kill_9 ... ok");
}
