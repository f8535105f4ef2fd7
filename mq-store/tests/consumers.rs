//! Behaviour of consumers: acknowledgements of each kind, redelivery on the ack wait
//! and the backoff schedule, dead letters, waiting fetches, consumer groups, per-key
//! order, delayed delivery, retention by consumers, and state across a restart.
//!
//! Timing tests run on tokio's paused clock, with the store's wall clock tied to it
//! ([`TokioClock`]). The store's writer threads are outside tokio, so a test that must
//! wait for one while timers are armed spins on [`until`] (which keeps the runtime
//! busy, so the paused clock does not jump ahead meanwhile).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mq_store::clock::TokioClock;
use mq_store::fault::SimFs;
use mq_store::{
    AckPolicy, Consumer, ConsumerConfig, DeadLetter, DeliverPolicy, Delivery, KeySource, Publish,
    Retention, Store, StoreError, Stream, StreamConfig,
};
use tokio::time::Instant;

const ROOT: &str = "/data";
const T0: i64 = 1_700_000_000_000_000_000;

fn open(fs: &SimFs) -> Store {
    Store::open_with(
        Arc::new(fs.clone()),
        Path::new(ROOT),
        Arc::new(TokioClock::new(T0)),
    )
    .unwrap()
}

fn store() -> (SimFs, Store) {
    let fs = SimFs::default();
    let store = open(&fs);
    (fs, store)
}

async fn publish(stream: &Stream, subject: &str, payload: &str) -> u64 {
    publish_with(stream, subject, &[], payload, Publish::default()).await
}

async fn publish_with(
    stream: &Stream,
    subject: &str,
    headers: &[(&str, &[u8])],
    payload: &str,
    options: Publish,
) -> u64 {
    stream
        .publish(subject, headers, payload.as_bytes(), &options)
        .await
        .unwrap()
        .await
        .unwrap()
        .seq
}

/// Spins the runtime until `cond` holds (a store thread finished something).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2_000_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
        std::thread::yield_now();
    }
    panic!("gave up waiting for {what}");
}

/// Stream `S` on `s.>` holding `n` messages on `s.a`, with payloads `1` to `n`.
async fn stream_with(store: &Store, n: u64) -> Stream {
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    for i in 1..=n {
        publish(&stream, "s.a", &i.to_string()).await;
    }
    stream
}

/// A consumer of stream `S`.
fn consumer(store: &Store, config: ConsumerConfig) -> Consumer {
    store.create_consumer("S", config).unwrap()
}

/// Nothing is delivered within `wait`.
async fn assert_nothing_within(consumer: &Consumer, wait: Duration) {
    let got = consumer.fetch(10, wait).await.unwrap();
    assert!(
        got.is_empty(),
        "delivered within {wait:?}: {:?}",
        seqs(&got)
    );
}

fn seqs(batch: &[Delivery]) -> Vec<u64> {
    batch.iter().map(|d| d.info.stream_seq).collect()
}

fn header<'a>(d: &'a Delivery, name: &str) -> &'a str {
    std::str::from_utf8(
        d.message
            .header(name)
            .unwrap_or_else(|| panic!("no {name}")),
    )
    .unwrap()
}

const WAIT: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn an_explicit_ack_is_final_and_an_unacknowledged_message_comes_back_after_ack_wait() {
    let (_fs, store) = store();
    stream_with(&store, 3).await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            ack_wait: Duration::from_secs(10),
            ..ConsumerConfig::durable("c")
        },
    );
    let start = Instant::now();
    let batch = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(seqs(&batch), [1, 2, 3]);
    assert_eq!(
        batch
            .iter()
            .map(|d| d.info.consumer_seq)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    batch[0].ack().await.unwrap();
    batch[2].ack().await.unwrap();
    // nothing else until the ack wait of message 2 runs out
    let again = consumer.fetch(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(seqs(&again), [2]);
    assert_eq!(again[0].info.deliveries, 2);
    assert_eq!(again[0].info.consumer_seq, 4);
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    again[0].ack().await.unwrap();
    assert_nothing_within(&consumer, Duration::from_secs(60)).await;
    let info = consumer.info();
    assert_eq!(
        (info.ack_floor, info.num_ack_pending, info.num_redelivered),
        (3, 0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn ack_all_acknowledges_every_message_delivered_up_to_it() {
    let (_fs, store) = store();
    stream_with(&store, 4).await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            ack_policy: AckPolicy::All,
            ..ConsumerConfig::durable("c")
        },
    );
    let batch = consumer.fetch(4, WAIT).await.unwrap();
    batch[2].ack().await.unwrap();
    let info = consumer.info();
    assert_eq!((info.ack_floor, info.num_ack_pending), (3, 1));
    let later = consumer.fetch(10, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(
        seqs(&later),
        [4],
        "only the message after the cumulative ack comes back"
    );
}

#[tokio::test(start_paused = true)]
async fn ack_none_delivers_each_message_once_and_needs_no_answer() {
    let (_fs, store) = store();
    stream_with(&store, 3).await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            ack_policy: AckPolicy::None,
            ack_wait: Duration::from_secs(1),
            ..ConsumerConfig::durable("c")
        },
    );
    assert_eq!(seqs(&consumer.fetch(10, WAIT).await.unwrap()), [1, 2, 3]);
    assert_nothing_within(&consumer, Duration::from_secs(60)).await;
    let info = consumer.info();
    assert_eq!((info.ack_floor, info.num_ack_pending), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn a_nak_redelivers_at_once_or_after_its_delay_and_not_before() {
    let (_fs, store) = store();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    publish(&stream, "s.a", "one").await;
    publish(&stream, "s.a", "two").await;
    let consumer = consumer(&store, ConsumerConfig::durable("c"));
    let batch = consumer.fetch(2, WAIT).await.unwrap();
    batch[0].nak(None).await.unwrap();
    batch[1]
        .nak(Some(Duration::from_millis(2500)))
        .await
        .unwrap();
    let start = Instant::now();
    let now = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(seqs(&now), [1]);
    assert_eq!(now[0].info.deliveries, 2);
    assert_eq!(start.elapsed(), Duration::ZERO);
    now[0].ack().await.unwrap();
    // not before its delay
    assert_nothing_within(&consumer, Duration::from_millis(2499)).await;
    let later = consumer.fetch(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(seqs(&later), [2]);
    assert_eq!(start.elapsed(), Duration::from_millis(2500));
}

#[tokio::test(start_paused = true)]
async fn in_progress_restarts_the_ack_wait() {
    let (_fs, store) = store();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    publish(&stream, "s.a", "slow").await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            ack_wait: Duration::from_secs(10),
            ..ConsumerConfig::durable("c")
        },
    );
    let start = Instant::now();
    let d = consumer.fetch(1, WAIT).await.unwrap().pop().unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    d.in_progress().await.unwrap();
    assert_nothing_within(&consumer, Duration::from_millis(9_999)).await;
    let again = consumer.fetch(1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(seqs(&again), [1]);
    assert_eq!(start.elapsed(), Duration::from_secs(18));
}

#[tokio::test(start_paused = true)]
async fn redeliveries_follow_the_backoff_schedule_and_its_last_step_repeats() {
    let (_fs, store) = store();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    publish(&stream, "s.a", "flaky").await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(20),
            ],
            ..ConsumerConfig::durable("c")
        },
    );
    let start = Instant::now();
    let mut times = Vec::new();
    for _ in 0..5 {
        let d = consumer
            .fetch(1, Duration::from_secs(3600))
            .await
            .unwrap()
            .pop()
            .unwrap();
        times.push((d.info.deliveries, start.elapsed().as_secs()));
    }
    assert_eq!(times, [(1, 0), (2, 1), (3, 6), (4, 26), (5, 46)]);
    println!("deliveries at seconds: {times:?}");
}

async fn dead_letter_setup(
    max_deliver: Option<u32>,
) -> (Store, Stream, mq_store::Consumer, mq_store::Consumer) {
    let store = Store::memory();
    let stream = store
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .unwrap();
    store.create(StreamConfig::new("DLQ", ["$DLQ.>"])).unwrap();
    publish_with(
        &stream,
        "orders.eu",
        &[("Trace", b"t-1")],
        "poison",
        Publish::default(),
    )
    .await;
    let consumer = store
        .create_consumer(
            "ORDERS",
            ConsumerConfig {
                max_deliver,
                ack_wait: Duration::from_secs(5),
                ..ConsumerConfig::durable("billing")
            },
        )
        .unwrap();
    let dlq = store
        .create_consumer("DLQ", ConsumerConfig::durable("ops"))
        .unwrap();
    (store, stream, consumer, dlq)
}

#[tokio::test]
async fn a_terminated_message_becomes_a_dead_letter_with_its_origin_and_reason() {
    let (_store, _stream, consumer, dlq) = dead_letter_setup(None).await;
    let d = consumer.fetch(1, WAIT).await.unwrap().pop().unwrap();
    d.term("unknown customer").await.unwrap();
    let letter = dlq
        .fetch(1, Duration::from_secs(5))
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(&*letter.message.subject, "$DLQ.ORDERS.billing");
    assert_eq!(letter.message.payload, &b"poison"[..]);
    assert_eq!(header(&letter, "Courier-Dlq-Stream"), "ORDERS");
    assert_eq!(header(&letter, "Courier-Dlq-Consumer"), "billing");
    assert_eq!(header(&letter, "Courier-Dlq-Sequence"), "1");
    assert_eq!(header(&letter, "Courier-Dlq-Subject"), "orders.eu");
    assert_eq!(header(&letter, "Courier-Dlq-Deliveries"), "1");
    assert_eq!(
        header(&letter, "Courier-Dlq-Reason"),
        "term: unknown customer"
    );
    assert_eq!(
        header(&letter, "Trace"),
        "t-1",
        "the original headers are kept"
    );
    let info = consumer.info();
    assert_eq!(
        (info.ack_floor, info.dead_letters, info.num_ack_pending),
        (1, 1, 0)
    );
    assert_nothing_within(&consumer, Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_message_naked_on_its_last_delivery_becomes_a_dead_letter_for_max_deliver() {
    let (_store, _stream, consumer, dlq) = dead_letter_setup(Some(3)).await;
    for n in 1..=3 {
        let d = consumer.fetch(1, WAIT).await.unwrap().pop().unwrap();
        assert_eq!(d.info.deliveries, n);
        d.nak(None).await.unwrap();
    }
    let letter = dlq
        .fetch(1, Duration::from_secs(5))
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(header(&letter, "Courier-Dlq-Reason"), "max_deliver");
    assert_eq!(header(&letter, "Courier-Dlq-Deliveries"), "3");
    assert_eq!(header(&letter, "Courier-Dlq-Sequence"), "1");
    assert_eq!(header(&letter, "Courier-Dlq-Subject"), "orders.eu");
    assert_nothing_within(&consumer, Duration::from_millis(50)).await;
    assert_eq!(consumer.info().dead_letters, 1);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_message_becomes_a_dead_letter_after_max_deliver_ack_waits() {
    let (_store, _stream, consumer, dlq) = dead_letter_setup(Some(2)).await;
    let start = Instant::now();
    for n in 1..=2 {
        let d = consumer
            .fetch(1, Duration::from_secs(3600))
            .await
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(d.info.deliveries, n);
    }
    // the second ack wait runs out: the timer task dead-letters it, no fetch needed
    tokio::time::sleep(Duration::from_secs(5)).await;
    until("the dead letter", || consumer.info().dead_letters == 1).await;
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let letter = dlq.fetch(1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(header(&letter, "Courier-Dlq-Reason"), "max_deliver");
    assert_eq!(header(&letter, "Courier-Dlq-Deliveries"), "2");
}

#[tokio::test]
async fn dead_letters_go_to_a_named_stream_and_without_any_are_counted_as_unstored() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    store
        .create(StreamConfig::new("POISON", ["poison.>"]))
        .unwrap();
    publish(&stream, "s.a", "x").await;
    publish(&stream, "s.a", "y").await;
    let named = consumer(
        &store,
        ConsumerConfig {
            dead_letter: DeadLetter::Stream("POISON".into()),
            ..ConsumerConfig::durable("named")
        },
    );
    let d = named.fetch(1, WAIT).await.unwrap().pop().unwrap();
    d.term("bad").await.unwrap();
    let kept = store.stream("POISON").unwrap().get(1).unwrap();
    assert_eq!(&*kept.subject, "$DLQ.S.named");
    assert_eq!(
        kept.header("Courier-Dlq-Reason").unwrap(),
        &b"term: bad"[..]
    );

    let unstored = store
        .create_consumer("S", ConsumerConfig::durable("plain"))
        .unwrap();
    let d = unstored.fetch(1, WAIT).await.unwrap().pop().unwrap();
    d.term("bad").await.unwrap();
    let info = unstored.info();
    assert_eq!((info.dead_letters, info.dead_letters_unstored), (1, 1));
}

#[tokio::test]
async fn a_fetch_waiting_on_an_empty_stream_returns_a_message_published_1ms_later() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    let consumer = consumer(&store, ConsumerConfig::durable("c"));
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        publish(&stream, "s.a", "late").await
    });
    let max_wait = Duration::from_secs(30);
    let start = std::time::Instant::now();
    let batch = consumer.fetch(10, max_wait).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(seqs(&batch), [publisher.await.unwrap()]);
    println!("fetch returned after {waited:?} (max_wait {max_wait:?})");
    assert!(waited < max_wait / 4, "the fetch waited {waited:?}");
}

#[tokio::test]
async fn filters_and_deliver_policies_choose_where_a_consumer_starts() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    publish(&stream, "s.a", "a1").await; // 1
    publish(&stream, "s.b", "b1").await; // 2
    publish(&stream, "s.a", "a2").await; // 3
    publish(&stream, "s.c", "c1").await; // 4
    publish(&stream, "s.b", "b2").await; // 5
    let take = |name: &str, policy: DeliverPolicy, filters: &[&str]| {
        consumer(
            &store,
            ConsumerConfig {
                deliver_policy: policy,
                filter_subjects: filters.iter().map(|s| s.to_string()).collect(),
                ack_policy: AckPolicy::None,
                ..ConsumerConfig::durable(name)
            },
        )
    };
    let cases = [
        (take("all", DeliverPolicy::All, &[]), vec![1, 2, 3, 4, 5, 6]),
        (
            take("filtered", DeliverPolicy::All, &["s.a", "s.c"]),
            vec![1, 3, 4, 6],
        ),
        (take("last", DeliverPolicy::Last, &["s.a"]), vec![3, 6]),
        (
            take("lps", DeliverPolicy::LastPerSubject, &[]),
            vec![3, 4, 5, 6],
        ),
        (
            take("from", DeliverPolicy::ByStartSequence(4), &[]),
            vec![4, 5, 6],
        ),
        (take("new", DeliverPolicy::New, &[]), vec![6]),
    ];
    publish(&stream, "s.a", "a3").await; // 6: every consumer takes it
    for (consumer, want) in cases {
        let mut got = Vec::new();
        loop {
            let batch = consumer
                .fetch(100, Duration::from_millis(20))
                .await
                .unwrap();
            if batch.is_empty() {
                break;
            }
            got.extend(seqs(&batch));
        }
        assert_eq!(got, want, "consumer {}", consumer.name());
    }
}

#[tokio::test]
async fn a_consumer_starting_at_a_time_skips_older_messages() {
    let clock = mq_store::clock::ManualClock::new(T0);
    let store = Store::open_with(
        Arc::new(SimFs::default()),
        Path::new(ROOT),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    for i in 0..10 {
        publish(&stream, "s.a", &i.to_string()).await;
        clock.advance(Duration::from_secs(1));
    }
    let consumer = consumer(
        &store,
        ConsumerConfig {
            deliver_policy: DeliverPolicy::ByStartTime(T0 + 6_500_000_000),
            ..ConsumerConfig::durable("c")
        },
    );
    assert_eq!(seqs(&consumer.fetch(100, WAIT).await.unwrap()), [8, 9, 10]);
}

#[tokio::test]
async fn max_ack_pending_holds_fetches_until_answers_make_room() {
    let store = Store::memory();
    stream_with(&store, 5).await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            max_ack_pending: 2,
            ..ConsumerConfig::durable("c")
        },
    );
    let first = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(seqs(&first), [1, 2]);
    assert_nothing_within(&consumer, Duration::from_millis(20)).await;
    let waiting = {
        let consumer = consumer.clone();
        tokio::spawn(async move { consumer.fetch(10, Duration::from_secs(30)).await })
    };
    tokio::task::yield_now().await;
    first[0].ack().await.unwrap();
    assert_eq!(seqs(&waiting.await.unwrap().unwrap()), [3]);
}

#[tokio::test(start_paused = true)]
async fn a_group_member_that_leaves_has_its_messages_redelivered_to_the_others() {
    let (_fs, store) = store();
    stream_with(&store, 6).await;
    let config = ConsumerConfig {
        ack_wait: Duration::from_secs(5),
        ..ConsumerConfig::durable("workers")
    };
    let a = consumer(&store, config.clone());
    let b = consumer(&store, config); // the same consumer: a group
    let taken_by_a = a.fetch(3, WAIT).await.unwrap();
    assert_eq!(seqs(&taken_by_a), [1, 2, 3]);
    drop(taken_by_a); // a leaves without answering
    drop(a);
    let start = Instant::now();
    let mut done = Vec::new();
    while done.len() < 6 {
        for d in b.fetch(10, Duration::from_secs(60)).await.unwrap() {
            done.push((d.info.stream_seq, d.info.deliveries, start.elapsed()));
            d.ack().await.unwrap();
        }
    }
    done.sort();
    let five = Duration::from_secs(5);
    let zero = Duration::ZERO;
    // b gets the rest at once, and a's three once their ack wait has passed
    assert_eq!(
        done,
        [
            (1, 2, five),
            (2, 2, five),
            (3, 2, five),
            (4, 1, zero),
            (5, 1, zero),
            (6, 1, zero)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_delayed_message_is_not_delivered_before_its_time_and_is_at_it() {
    let (_fs, store) = store();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    let consumer = consumer(&store, ConsumerConfig::durable("c"));
    let start = Instant::now();
    let later = Publish {
        delay: Some(Duration::from_millis(1500)),
        ..Publish::default()
    };
    let at = Publish {
        deliver_at: Some(T0 + 3_000_000_123),
        ..Publish::default()
    };
    publish_with(&stream, "s.a", &[], "in 1.5 s", later).await;
    publish_with(&stream, "s.b", &[], "at 3.000000123 s", at).await;
    publish(&stream, "s.c", "now").await;
    let spent = start.elapsed();
    let now = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(
        seqs(&now),
        [3],
        "the undelayed message is not held behind the others"
    );
    assert_eq!(spent, Duration::ZERO);
    // (tokio's timers tick in milliseconds: a fetch gives up at the tick at or after
    // its max_wait, and a delivery time is met at the tick at or after it)
    assert_nothing_within(&consumer, Duration::from_millis(1499)).await;
    let first = consumer.fetch(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(seqs(&first), [1]);
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    let second = consumer.fetch(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(seqs(&second), [2]);
    let at = Duration::from_nanos(3_000_000_123);
    let elapsed = start.elapsed();
    assert!(
        elapsed >= at && elapsed < at + Duration::from_millis(1),
        "delivered at {elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn messages_of_one_key_wait_for_the_previous_answer_while_other_keys_go_on() {
    let (_fs, store) = store();
    let stream = store.create(StreamConfig::new("S", ["orders.>"])).unwrap();
    for (customer, n) in [("ann", 1), ("bob", 1), ("ann", 2), ("ann", 3), ("bob", 2)] {
        publish(
            &stream,
            &format!("orders.{customer}"),
            &format!("{customer}{n}"),
        )
        .await;
    }
    let consumer = consumer(
        &store,
        ConsumerConfig {
            key: Some(KeySource::SubjectToken(1)),
            ..ConsumerConfig::durable("c")
        },
    );
    let first = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(seqs(&first), [1, 2], "one message per key in flight");
    assert_eq!(consumer.info().num_held, 3);
    first[1].nak(None).await.unwrap(); // bob1 again: bob2 still waits
    let again = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(seqs(&again), [2]);
    first[0].ack().await.unwrap(); // ann1 done: ann2 may go
    assert_eq!(seqs(&consumer.fetch(10, WAIT).await.unwrap()), [3]);
    again[0].term("give up").await.unwrap(); // bob1 dead-lettered: bob2 may go
    assert_eq!(seqs(&consumer.fetch(10, WAIT).await.unwrap()), [5]);
}

#[tokio::test(start_paused = true)]
async fn a_key_from_a_header_and_a_higher_in_flight_limit() {
    let (_fs, store) = store();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    for k in ["x", "x", "x", "y"] {
        publish_with(
            &stream,
            "s.a",
            &[("Key", k.as_bytes())],
            k,
            Publish::default(),
        )
        .await;
    }
    publish(&stream, "s.a", "no key").await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            key: Some(KeySource::Header("Key".into())),
            max_in_flight_per_key: 2,
            ..ConsumerConfig::durable("c")
        },
    );
    let batch = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(seqs(&batch), [1, 2, 4, 5]);
    batch[1].ack().await.unwrap();
    assert_eq!(seqs(&consumer.fetch(10, WAIT).await.unwrap()), [3]);
}

#[tokio::test]
async fn consumer_state_survives_a_reopen_and_unacknowledged_messages_come_back_counted() {
    let fs = {
        let fs = SimFs::default();
        let store = open(&fs);
        stream_with(&store, 5).await;
        let consumer = store
            .create_consumer("S", ConsumerConfig::durable("c"))
            .unwrap();
        let batch = consumer.fetch(5, WAIT).await.unwrap();
        batch[0].ack_confirmed().await.unwrap();
        batch[3].ack_confirmed().await.unwrap();
        // 2, 3 and 5 delivered once, never answered
        fs.power_loss(None) // what was synced is all that is left
    };
    let store = open(&fs);
    let consumer = store.consumer("S", "c").unwrap();
    let batch = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(seqs(&batch), [2, 3, 5]);
    assert!(
        batch.iter().all(|d| d.info.deliveries == 2),
        "delivery counts carry over"
    );
    for d in &batch {
        d.ack_confirmed().await.unwrap();
    }
    let fs = fs.power_loss(None);
    drop((batch, consumer, store));
    let store = open(&fs);
    let consumer = store.consumer("S", "c").unwrap();
    assert_nothing_within(&consumer, Duration::from_millis(20)).await;
    assert_eq!(consumer.info().ack_floor, 5);
}

#[tokio::test]
async fn a_damaged_state_file_is_reported_kept_aside_and_its_messages_delivered_again() {
    let fs = SimFs::default();
    {
        let store = open(&fs);
        let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
        publish(&stream, "s.a", "1").await;
        publish(&stream, "s.a", "2").await;
        let consumer = store
            .create_consumer("S", ConsumerConfig::durable("c"))
            .unwrap();
        for d in consumer.fetch(5, WAIT).await.unwrap() {
            d.ack_confirmed().await.unwrap();
        }
    }
    let path = Path::new(ROOT).join("streams/S/consumers/c.con");
    let file = mq_store::fs::Fs::open(&fs, &path, false).unwrap();
    let mut bytes = vec![0u8; file.len().unwrap() as usize];
    file.read_exact_at(&mut bytes, 0).unwrap();
    // past the 16-byte header, the configuration and the first snapshot: the first
    // record of what the consumer did (its deliveries)
    let mut damaged_at = 16;
    for _ in 0..2 {
        let len = u32::from_le_bytes(bytes[damaged_at..damaged_at + 4].try_into().unwrap());
        damaged_at += 8 + len as usize;
    }
    file.write_all_at(&[bytes[damaged_at + 9] ^ 0xff], damaged_at as u64 + 9)
        .unwrap();
    let store = open(&fs);
    let consumer = store.consumer("S", "c").unwrap();
    match consumer.info().damage {
        Some(StoreError::Corrupt {
            file,
            offset,
            reason,
        }) => {
            assert_eq!((file, offset), (path, damaged_at as u64));
            println!("reported: offset {offset}: {reason}");
        }
        other => panic!("{other:?}"),
    }
    let names = mq_store::fs::Fs::list(&fs, &Path::new(ROOT).join("streams/S/consumers")).unwrap();
    assert!(
        names.iter().any(|n| n.starts_with("c.con.damaged-")),
        "{names:?}"
    );
    let again = consumer.fetch(5, WAIT).await.unwrap();
    assert_eq!(
        seqs(&again),
        [1, 2],
        "acknowledgements after the damage are forgotten, never the messages"
    );
}

#[tokio::test]
async fn a_work_queue_removes_acknowledged_messages_and_binds_each_subject_once() {
    let store = Store::memory();
    let stream = store
        .create(StreamConfig {
            retention: Retention::WorkQueue,
            ..StreamConfig::new("JOBS", ["jobs.>"])
        })
        .unwrap();
    for i in 0..4 {
        publish(&stream, "jobs.a", &i.to_string()).await;
    }
    let worker = store
        .create_consumer("JOBS", ConsumerConfig::durable("w"))
        .unwrap();
    let e = store
        .create_consumer(
            "JOBS",
            ConsumerConfig {
                filter_subjects: vec!["jobs.a".into()],
                ..ConsumerConfig::durable("other")
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("work queue"), "{e}");
    let batch = worker.fetch(10, WAIT).await.unwrap();
    batch[0].ack().await.unwrap();
    batch[2].ack_confirmed().await.unwrap();
    until("removal", || stream.info().state.msgs == 2).await;
    assert!(stream.get(1).is_err() && stream.get(3).is_err());
    assert!(stream.get(2).is_ok() && stream.get(4).is_ok());
}

#[tokio::test]
async fn interest_retention_removes_a_message_once_every_bound_consumer_has_acknowledged_it() {
    let store = Store::memory();
    let stream = store
        .create(StreamConfig {
            retention: Retention::Interest,
            ..StreamConfig::new("EV", ["ev.>"])
        })
        .unwrap();
    let a = store
        .create_consumer("EV", ConsumerConfig::durable("a"))
        .unwrap();
    let b = store
        .create_consumer(
            "EV",
            ConsumerConfig {
                filter_subjects: vec!["ev.shared".into()],
                ..ConsumerConfig::durable("b")
            },
        )
        .unwrap();
    publish(&stream, "ev.shared", "both").await; // 1: a and b
    publish(&stream, "ev.only_a", "a").await; // 2: a only
    for d in a.fetch(10, WAIT).await.unwrap() {
        d.ack().await.unwrap();
    }
    until("removal of 2", || stream.get(2).is_err()).await;
    assert!(stream.get(1).is_ok(), "b has not acknowledged 1");
    b.fetch(10, WAIT).await.unwrap()[0].ack().await.unwrap();
    until("removal of 1", || stream.info().state.msgs == 0).await;
}

#[tokio::test]
async fn consumer_configurations_are_checked_and_a_name_is_taken_once() {
    let store = Store::memory();
    store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    let bad = [
        ConsumerConfig::durable("has space"),
        ConsumerConfig {
            ack_wait: Duration::ZERO,
            ..ConsumerConfig::durable("c")
        },
        ConsumerConfig {
            max_deliver: Some(0),
            ..ConsumerConfig::durable("c")
        },
        ConsumerConfig {
            max_ack_pending: 0,
            ..ConsumerConfig::durable("c")
        },
        ConsumerConfig {
            filter_subjects: vec!["a..b".into()],
            ..ConsumerConfig::durable("c")
        },
        ConsumerConfig {
            dead_letter: DeadLetter::Stream("S".into()),
            ..ConsumerConfig::durable("c")
        },
    ];
    for config in bad {
        let e = store.create_consumer("S", config.clone()).unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidConsumer(_)),
            "{config:?}: {e}"
        );
    }
    let c = store
        .create_consumer("S", ConsumerConfig::durable("c"))
        .unwrap();
    let same = store
        .create_consumer("S", ConsumerConfig::durable("c"))
        .unwrap();
    assert_eq!(same.name(), c.name());
    let other = ConsumerConfig {
        ack_wait: Duration::from_secs(1),
        ..ConsumerConfig::durable("c")
    };
    assert!(matches!(
        store.create_consumer("S", other),
        Err(StoreError::ConsumerExists { .. })
    ));
    store.delete_consumer("S", "c").unwrap();
    assert!(matches!(
        store.consumer("S", "c"),
        Err(StoreError::ConsumerNotFound { .. })
    ));
    assert!(store.consumers("S").unwrap().is_empty());
}

#[tokio::test]
async fn an_ephemeral_consumer_is_not_stored() {
    let fs = SimFs::default();
    {
        let store = open(&fs);
        let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
        publish(&stream, "s.a", "x").await;
        let eph = store
            .create_consumer("S", ConsumerConfig::ephemeral())
            .unwrap();
        assert_eq!(eph.fetch(1, WAIT).await.unwrap().len(), 1);
        assert!(store.consumers("S").unwrap().is_empty());
    }
    let store = open(&fs);
    assert!(store.consumers("S").unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_state_write_fails_ack_confirmed_and_the_next_write_rewrites_the_file_whole() {
    let fs = SimFs::default();
    let after = {
        let store = open(&fs);
        stream_with(&store, 3).await;
        let consumer = store
            .create_consumer("S", ConsumerConfig::durable("c"))
            .unwrap();
        let batch = consumer.fetch(3, WAIT).await.unwrap();
        fs.fail_writes(Some(std::io::ErrorKind::Other));
        let e = batch[0].ack_confirmed().await.unwrap_err();
        assert!(e.to_string().contains("c.con"), "{e}");
        fs.fail_writes(None);
        batch[1].ack_confirmed().await.unwrap();
        fs.power_loss(None)
    };
    let store = open(&after);
    let consumer = store.consumer("S", "c").unwrap();
    assert!(consumer.info().damage.is_none());
    let batch = consumer.fetch(10, WAIT).await.unwrap();
    assert_eq!(
        seqs(&batch),
        [3],
        "both acknowledgements are on disk once a write works again"
    );
}

#[tokio::test]
async fn messages_is_a_stream_that_pulls_ahead_within_max_ack_pending() {
    let store = Store::memory();
    let stream = stream_with(&store, 10).await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            max_ack_pending: 4,
            ..ConsumerConfig::durable("c")
        },
    );
    let mut messages = consumer.messages();
    let first = messages.next().await.unwrap().unwrap();
    assert_eq!(first.info.stream_seq, 1);
    // pulled ahead: a batch is out, but never more than max_ack_pending
    assert_eq!(consumer.info().num_ack_pending, 2);
    let mut seen = vec![first];
    while seen.len() < 10 {
        let d = messages.next().await.unwrap().unwrap();
        assert!(consumer.info().num_ack_pending <= 4);
        seen.push(d);
        if seen.len() % 2 == 0 {
            for d in seen.iter().rev().take(2) {
                d.ack().await.unwrap();
            }
        }
    }
    let order: Vec<u64> = seen.iter().map(|d| d.info.stream_seq).collect();
    assert_eq!(order, (1..=10).collect::<Vec<_>>());
    // waits for the next publish
    let later =
        tokio::spawn(async move { messages.next().await.unwrap().unwrap().info.stream_seq });
    publish(&stream, "s.a", "11").await;
    assert_eq!(later.await.unwrap(), 11);
}

#[tokio::test(start_paused = true)]
async fn without_acknowledgements_a_keyed_delayed_message_is_still_delivered_at_its_time() {
    let (_fs, store) = store();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    let later = Publish {
        delay: Some(Duration::from_secs(2)),
        ..Publish::default()
    };
    publish_with(&stream, "s.k", &[], "later", later).await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            ack_policy: AckPolicy::None,
            key: Some(KeySource::SubjectToken(1)),
            ..ConsumerConfig::durable("c")
        },
    );
    let got = consumer.fetch(1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(seqs(&got), [1]);
    assert_eq!(consumer.info().ack_floor, 1);
}

#[tokio::test]
async fn a_term_whose_caller_gives_up_waiting_still_dead_letters_the_message() {
    let (_store, _stream, consumer, dlq) = dead_letter_setup(None).await;
    let d = consumer.fetch(1, WAIT).await.unwrap().pop().unwrap();
    // the caller stops waiting at once; the dead letter goes on in its own task
    let _ = tokio::time::timeout(Duration::ZERO, d.term("impatient")).await;
    let letter = dlq
        .fetch(1, Duration::from_secs(5))
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(header(&letter, "Courier-Dlq-Reason"), "term: impatient");
    until("the consumer to count it", || {
        consumer.info().dead_letters == 1
    })
    .await;
}

#[tokio::test]
async fn a_message_that_used_up_max_deliver_before_a_restart_becomes_a_dead_letter_after_it() {
    let fs = SimFs::default();
    let after = {
        let store = open(&fs);
        let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
        store.create(StreamConfig::new("DLQ", ["$DLQ.>"])).unwrap();
        publish(&stream, "s.a", "never answered").await;
        publish(&stream, "s.a", "answered").await;
        let consumer = consumer(
            &store,
            ConsumerConfig {
                max_deliver: Some(1),
                ..ConsumerConfig::durable("c")
            },
        );
        let batch = consumer.fetch(2, WAIT).await.unwrap();
        batch[1].ack_confirmed().await.unwrap(); // its write carries both deliveries
        fs.power_loss(None)
    };
    let store = open(&after);
    let consumer = store.consumer("S", "c").unwrap();
    assert_nothing_within(&consumer, Duration::from_millis(50)).await;
    let dlq = store
        .create_consumer("DLQ", ConsumerConfig::durable("ops"))
        .unwrap();
    let letter = dlq
        .fetch(1, Duration::from_secs(5))
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(header(&letter, "Courier-Dlq-Reason"), "max_deliver");
    assert_eq!(header(&letter, "Courier-Dlq-Deliveries"), "1");
    assert_eq!(header(&letter, "Courier-Dlq-Sequence"), "1");
}

#[tokio::test]
async fn consumers_that_remove_messages_must_be_durable() {
    let store = Store::memory();
    store
        .create(StreamConfig {
            retention: Retention::Interest,
            ..StreamConfig::new("EV", ["ev.>"])
        })
        .unwrap();
    let e = store
        .create_consumer("EV", ConsumerConfig::ephemeral())
        .unwrap_err();
    assert!(e.to_string().contains("must be durable"), "{e}");
}

#[tokio::test]
async fn a_state_file_whose_configuration_is_damaged_is_kept_and_the_name_stays_taken() {
    let fs = SimFs::default();
    {
        let store = open(&fs);
        let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
        publish(&stream, "s.a", "x").await;
        store
            .create_consumer("S", ConsumerConfig::durable("c"))
            .unwrap();
    }
    let path = Path::new(ROOT).join("streams/S/consumers/c.con");
    let file = mq_store::fs::Fs::open(&fs, &path, false).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 30).unwrap(); // inside the configuration record
    file.write_all_at(&[byte[0] ^ 0x01], 30).unwrap();
    let store = open(&fs);
    assert!(matches!(
        store.consumer("S", "c"),
        Err(StoreError::ConsumerNotFound { .. })
    ));
    assert!(
        mq_store::fs::Fs::open(&fs, &path, false).is_ok(),
        "the file is kept"
    );
    let e = store
        .create_consumer("S", ConsumerConfig::durable("c"))
        .unwrap_err();
    assert!(e.to_string().contains("could not be opened"), "{e}");
    store.delete_consumer("S", "c").unwrap();
    assert!(mq_store::fs::Fs::open(&fs, &path, false).is_err());
    store
        .create_consumer("S", ConsumerConfig::durable("c"))
        .unwrap();
}

#[tokio::test]
async fn an_answer_to_a_message_on_its_way_to_the_dead_letters_is_refused() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("S", ["s.>"])).unwrap();
    publish(&stream, "s.a", "x").await;
    let consumer = consumer(
        &store,
        ConsumerConfig {
            dead_letter: DeadLetter::Stream("MISSING".into()), // fails: retried later
            ..ConsumerConfig::durable("c")
        },
    );
    let d = consumer.fetch(1, WAIT).await.unwrap().pop().unwrap();
    d.term("bad").await.unwrap();
    for e in [
        d.ack().await.unwrap_err(),
        d.nak(None).await.unwrap_err(),
        d.in_progress().await.unwrap_err(),
        d.term("again").await.unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::NotPending { seq: 1, .. }), "{e}");
    }
    assert_nothing_within(&consumer, Duration::from_millis(20)).await;
    assert_eq!(
        consumer.info().dead_letters,
        0,
        "not published: the stream is missing"
    );
}

#[tokio::test]
async fn consumer_state_beyond_a_stream_tail_lost_in_a_power_loss_is_forgotten() {
    let fs = SimFs::default();
    let after = {
        let store = open(&fs);
        let config = StreamConfig {
            fsync: mq_store::Fsync::Every(Duration::from_secs(3600)),
            ..StreamConfig::new("S", ["s.>"])
        };
        let stream = store.create(config).unwrap();
        for i in 1..=3 {
            publish(&stream, "s.a", &i.to_string()).await; // written, not synced
        }
        // its state file is written whole and synced: floor 3
        let new = ConsumerConfig {
            deliver_policy: DeliverPolicy::New,
            ..ConsumerConfig::durable("c")
        };
        store.create_consumer("S", new).unwrap();
        fs.power_loss(None)
    };
    let store = open(&after);
    let stream = store.stream("S").unwrap();
    assert_eq!(
        stream.info().state.last_seq,
        0,
        "the stream lost its unsynced tail"
    );
    let consumer = store.consumer("S", "c").unwrap();
    assert_eq!(consumer.info().ack_floor, 0);
    let seq = publish(&stream, "s.a", "after the power loss").await;
    assert_eq!(seq, 1);
    assert_eq!(seqs(&consumer.fetch(1, WAIT).await.unwrap()), [1]);
}

#[tokio::test(start_paused = true)]
async fn an_ack_relayed_after_a_restart_for_a_message_delivered_before_it_marks_it_done() {
    let fs = SimFs::default();
    {
        let store = open(&fs);
        let stream = stream_with(&store, 5).await;
        let explicit = consumer(&store, ConsumerConfig::durable("e"));
        let batch = explicit.fetch(4, WAIT).await.unwrap();
        batch[3].ack_confirmed().await.unwrap(); // writes the four deliveries too
        let all = consumer(
            &store,
            ConsumerConfig {
                ack_policy: AckPolicy::All,
                ..ConsumerConfig::durable("a")
            },
        );
        let batch = all.fetch(4, WAIT).await.unwrap();
        batch[0].ack_confirmed().await.unwrap();
        drop(stream);
    }
    // a broker that restarted relays answers its clients send again: by sequence
    let store = open(&fs);
    let explicit = store.consumer("S", "e").unwrap();
    explicit
        .answer(2, mq_store::Answer::Ack, true)
        .await
        .expect("delivered before the restart: done now");
    let never = explicit.answer(5, mq_store::Answer::Ack, true).await;
    assert!(
        matches!(never, Err(StoreError::NotPending { seq: 5, .. })),
        "never delivered: {never:?}"
    );
    assert_eq!(seqs(&explicit.fetch(10, WAIT).await.unwrap()), [1, 3, 5]);

    let all = store.consumer("S", "a").unwrap();
    all.answer(3, mq_store::Answer::Ack, true)
        .await
        .expect("with AckPolicy::All, 2 and 3 are done");
    assert_eq!(seqs(&all.fetch(10, WAIT).await.unwrap()), [4, 5]);
}
