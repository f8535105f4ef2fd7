//! A broker restart under a durable publisher and a consumer: the client sends again
//! the publishes whose acknowledgements were outstanding, with the same message id, so
//! each lands once; the consumer goes on where it was.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::raw_peer;
use courier::bus::{
    Broker, BrokerConfig, Bus, ConnectOptions, ConsumerConfig, Storage, StreamConfig,
};
use courier::frame::{Connect, Frame, Message as MsgFrame};

async fn broker_in(dir: &std::path::Path, addr: &str) -> Broker {
    let mut config = BrokerConfig::default();
    config.storage = Storage::Directory(dir.to_owned());
    Broker::bind_with(addr, config).await.expect("broker binds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_flight_across_a_broker_restart_land_exactly_once_and_the_consumer_resumes() {
    const N: usize = 3_000;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_in(dir.path(), "127.0.0.1:0").await;
    let addr = broker.local_addr().to_string();
    let bus = Bus::connect(addr.clone()).await.unwrap();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    let consumer = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("billing"))
        .await
        .unwrap();

    // the publisher keeps up to 200 acknowledgements outstanding
    let publisher = tokio::spawn({
        let streams = streams.clone();
        async move {
            let mut acks = std::collections::VecDeque::new();
            let mut acked = 0usize;
            for i in 0..N {
                let ack = streams
                    .publish("orders.eu", format!("{i}"))
                    .await
                    .expect("publish is accepted (buffered while disconnected)");
                acks.push_back(ack);
                if acks.len() >= 200 {
                    acks.pop_front().unwrap().await.expect("acknowledged");
                    acked += 1;
                }
            }
            for ack in acks {
                ack.await.expect("acknowledged");
                acked += 1;
            }
            acked
        }
    });
    // the consumer confirms each ack; across the restart it goes on until the
    // consumer's ack floor says every message is done
    let reader = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            let mut delivered: BTreeMap<String, u32> = BTreeMap::new();
            let mut confirmed: BTreeSet<String> = BTreeSet::new();
            let mut delivered_after_confirm = 0;
            let mut errors = Vec::new();
            loop {
                match consumer.fetch(100, Duration::from_secs(1)).await {
                    Ok(batch) if batch.is_empty() => {
                        if consumer.info().await.is_ok_and(|i| i.ack_floor == N as u64) {
                            break;
                        }
                    }
                    Ok(batch) => {
                        for d in batch {
                            let payload = String::from_utf8_lossy(&d.message.payload).into_owned();
                            if confirmed.contains(&payload) {
                                delivered_after_confirm += 1;
                            }
                            *delivered.entry(payload.clone()).or_default() += 1;
                            match d.ack_confirmed().await {
                                Ok(()) => {
                                    confirmed.insert(payload);
                                }
                                Err(e) => errors.push(e.to_string()),
                            }
                        }
                    }
                    Err(e) => {
                        errors.push(e.to_string()); // the broker is away: try again
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (delivered, delivered_after_confirm, errors)
        }
    });

    tokio::time::sleep(Duration::from_millis(150)).await;
    broker.shutdown().await;
    let broker = broker_in(dir.path(), &addr).await;

    let acked = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("the publisher finishes")
        .unwrap();
    let (seen, delivered_after_confirm, errors) =
        match tokio::time::timeout(Duration::from_secs(60), reader).await {
            Ok(done) => done.unwrap(),
            Err(_) => panic!(
                "the consumer did not finish: {:?}; stream {:?}",
                consumer.info().await,
                streams.info("ORDERS").await.map(|i| i.state)
            ),
        };
    let info = streams.info("ORDERS").await.unwrap();
    let stored: Vec<u64> = streams
        .range("ORDERS", 1, N + 10, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).parse().unwrap())
        .collect();
    let mut distinct = stored.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let redelivered = seen.values().filter(|&&n| n > 1).count();
    println!(
        "publishes acknowledged {acked} of {N}; stored {} ({} distinct); consumed {} distinct, \
         {redelivered} more than once, confirmed but delivered again: {delivered_after_confirm}; \
         errors while the broker was away: {errors:?}",
        info.state.msgs,
        distinct.len(),
        seen.len()
    );
    assert_eq!(acked, N, "every publish acknowledged");
    assert_eq!(
        info.state.msgs as usize, N,
        "each stored once: no duplicates"
    );
    assert_eq!(distinct, (0..N as u64).collect::<Vec<_>>(), "none lost");
    assert_eq!(seen.len(), N, "the consumer got every message");
    assert_eq!(
        delivered_after_confirm, 0,
        "a confirmed ack is never undone by the restart"
    );
    let floor = consumer.info().await.unwrap().ack_floor;
    assert_eq!(floor, N as u64, "the consumer resumed and finished");
    broker.shutdown().await;
}

/// A broker that never answers the first send of a durable publish: the client's answer
/// future times out, sends the publish again with the same message id, and resolves to
/// the answer of that second send.
#[tokio::test(start_paused = true)]
async fn a_durable_publish_unanswered_within_the_request_timeout_is_sent_again_with_its_id() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        let (mut reader, sender) = raw_peer(io);
        let mut inbox_sid = None;
        let mut ids = Vec::new();
        while let Some(frame) = reader.next().await {
            match frame.unwrap() {
                Frame::Connect(_) => sender
                    .send(Frame::Connect(Connect {
                        name: "fake".into(),
                        ..Connect::default()
                    }))
                    .await
                    .unwrap(),
                Frame::Ping { nonce } => sender.send(Frame::Pong { nonce }).await.unwrap(),
                Frame::Sub(sub) if sub.subject.starts_with("_INBOX.") => inbox_sid = Some(sub.sid),
                Frame::Pub(publish) if publish.subject.as_str() == "orders.eu" => {
                    let id = publish
                        .headers
                        .get("Msg-Id")
                        .expect("a generated id")
                        .clone();
                    ids.push(id);
                    if ids.len() == 2 {
                        // the second send is answered
                        let ack = br#"{"stream":"ORDERS","seq":1,"duplicate":false}"#;
                        sender
                            .send(Frame::Msg(MsgFrame {
                                sid: inbox_sid.expect("the inbox is subscribed first"),
                                subject: publish.reply,
                                reply: "".into(),
                                headers: Default::default(),
                                payload: bytes::Bytes::from_static(ack),
                            }))
                            .await
                            .unwrap();
                        return ids;
                    }
                }
                _ => {}
            }
        }
        panic!("the client went away after {} sends", ids.len());
    });
    let mut options = ConnectOptions::default();
    options.bus.request_timeout = Duration::from_secs(2);
    let bus = Bus::connect_with(addr, options).await.unwrap();
    let streams = bus.streams().unwrap();
    let started = tokio::time::Instant::now();
    let ack = streams
        .publish("orders.eu", "x")
        .await
        .unwrap()
        .await
        .expect("acknowledged after the second send");
    assert_eq!(
        (ack.stream.as_str(), ack.seq, ack.duplicate),
        ("ORDERS", 1, false)
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "sent again only after the request timeout"
    );
    let ids = fake.await.unwrap();
    println!(
        "sends seen by the broker: {}, message ids: {ids:?}",
        ids.len()
    );
    assert_eq!(ids[0], ids[1], "the same message id both times");
}
