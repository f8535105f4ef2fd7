//! Per-key order, as a property: four members share one consumer keyed by a subject
//! token; they nak at random (with and without a delay), take random time to
//! process, some messages carry a delivery delay, and one member disappears mid-run
//! holding whatever it had fetched. For every key, the order in which messages are
//! first processed successfully is their stream order, and every message is
//! processed.
//!
//! Runs on tokio's paused clock: ack waits, nak delays and processing times are
//! virtual, so a case takes milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mq_store::clock::TokioClock;
use mq_store::fault::SimFs;
use mq_store::{ConsumerConfig, KeySource, Publish, Store, StreamConfig};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Case {
    /// (key, delivery delay in ms) per message, in publish order.
    messages: Vec<(u8, u8)>,
    /// Per delivery, what a member does: 0..=5 ack after `time` ms, 6 nak now,
    /// 7 nak with a delay of `time` ms.
    answers: Vec<(u8, u8)>,
    /// After this many deliveries, member 3 disappears with what it holds.
    vanish_after: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((0u8..5, prop_oneof![3 => Just(0u8), 1 => 1u8..40]), 10..60),
        prop::collection::vec((0u8..8, 0u8..50), 64),
        0usize..12,
    )
        .prop_map(|(messages, answers, vanish_after)| Case {
            messages,
            answers,
            vanish_after,
        })
}

#[derive(Default)]
struct Log {
    /// Per key, the stream sequences in the order they were first processed.
    order: BTreeMap<String, Vec<u64>>,
    processed: HashMap<u64, usize>,
    deliveries: usize,
}

async fn run(case: Case) -> Result<(), TestCaseError> {
    let store = Store::open_with(
        Arc::new(SimFs::default()),
        Path::new("/data"),
        Arc::new(TokioClock::new(1_700_000_000_000_000_000)),
    )
    .expect("store");
    let stream = store
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .expect("stream");
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (i, (key, delay)) in case.messages.iter().enumerate() {
        let options = Publish {
            delay: (*delay > 0).then(|| Duration::from_millis(u64::from(*delay))),
            ..Publish::default()
        };
        let subject = format!("orders.k{key}.created");
        let ack = stream
            .publish(&subject, &[], format!("{i}").as_bytes(), &options)
            .await
            .expect("publish")
            .await
            .expect("ack");
        expected.entry(format!("k{key}")).or_default().push(ack.seq);
    }
    let config = ConsumerConfig {
        key: Some(KeySource::SubjectToken(1)),
        ack_wait: Duration::from_millis(500),
        ..ConsumerConfig::durable("workers")
    };
    let total = case.messages.len();
    let log = Arc::new(Mutex::new(Log::default()));
    let answers = Arc::new(case.answers);
    let mut members = Vec::new();
    for member in 0..4 {
        let consumer = store
            .create_consumer("ORDERS", config.clone())
            .expect("consumer");
        let log = log.clone();
        let answers = answers.clone();
        let vanish_after = case.vanish_after;
        members.push(tokio::spawn(async move {
            let mut held = Vec::new(); // what a vanished member keeps, unanswered
            let mut mine = 0usize;
            loop {
                if log.lock().unwrap().processed.len() == total {
                    return;
                }
                let batch = consumer
                    .fetch(3, Duration::from_millis(200))
                    .await
                    .expect("fetch");
                for d in batch {
                    mine += 1;
                    if member == 3 && mine > vanish_after {
                        held.push(d); // gone: never answers; its messages come back
                        continue;
                    }
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.deliveries += 1;
                        log.deliveries
                    };
                    let (what, time) = answers[n % answers.len()];
                    let time = Duration::from_millis(u64::from(time));
                    match what {
                        0..=5 => {
                            tokio::time::sleep(time).await;
                            // first successful processing is recorded when the ack
                            // is accepted
                            d.ack().await.expect("ack");
                            let seq = d.info.stream_seq;
                            let key = d.message.subject.split('.').nth(1).unwrap().to_owned();
                            let mut log = log.lock().unwrap();
                            let count = log.processed.entry(seq).or_insert(0);
                            *count += 1;
                            if *count == 1 {
                                log.order.entry(key).or_default().push(seq);
                            }
                        }
                        6 => d.nak(None).await.expect("nak"),
                        _ => d.nak(Some(time)).await.expect("nak"),
                    }
                }
                if member == 3 && mine > vanish_after {
                    // disappeared: hold on to the deliveries, fetch no more
                    std::future::pending::<()>().await;
                }
            }
        }));
    }
    let vanished = members.pop().expect("four members");
    let done = tokio::time::timeout(Duration::from_secs(3600), async {
        for m in members {
            m.await.expect("member");
        }
    })
    .await;
    vanished.abort();
    let log = log.lock().unwrap();
    prop_assert!(
        done.is_ok(),
        "members did not finish: {} of {total} processed",
        log.processed.len()
    );
    prop_assert_eq!(log.processed.len(), total, "every message is processed");
    prop_assert_eq!(
        &log.order,
        &expected,
        "per key, first processing follows stream order"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn per_key_first_processing_follows_stream_order_and_nothing_is_lost(case in case()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(case))?;
    }
}
