//! Durable streams on the bus: what a user of `Bus::streams` can count on.

use std::time::Duration;

use courier::bus::{Bus, BusError, EmbeddedConfig, Message, Publish, Storage, StreamConfig};

async fn timeout<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("in time")
}

fn bus_in(dir: &std::path::Path) -> Bus {
    let mut config = EmbeddedConfig::default();
    config.storage = Storage::Directory(dir.to_owned());
    Bus::embedded_with(config)
}

/// A broker on 127.0.0.1:0 keeping its streams in a fresh temporary directory, removed
/// when the returned guard is dropped; `config` as given otherwise.
async fn broker_with_store(
    mut config: courier::bus::BrokerConfig,
) -> (courier::bus::Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    config.storage = Storage::Directory(dir.path().to_owned());
    let broker = courier::bus::Broker::bind_with("127.0.0.1:0", config)
        .await
        .unwrap();
    (broker, dir)
}

#[tokio::test]
async fn a_durable_publish_is_acknowledged_with_its_sequence_and_plain_subscribers_still_get_it() {
    let bus = Bus::embedded();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    let mut plain = bus.subscribe("orders.*").await.unwrap();
    let ack = streams
        .publish("orders.eu", "first")
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        (ack.stream.as_str(), ack.seq, ack.duplicate),
        ("ORDERS", 1, false)
    );
    let seen = timeout(plain.next()).await.unwrap();
    assert_eq!(&seen.payload[..], b"first");
    assert_eq!(
        &streams.get("ORDERS", 1).await.unwrap().payload[..],
        b"first"
    );
}

#[tokio::test]
async fn a_plain_publish_to_a_stream_subject_is_stored_too() {
    let bus = Bus::embedded();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("LOG", ["log.*"]))
        .await
        .unwrap();
    let mut message = Message::new("log.app", "plain");
    message.headers.insert("trace", "t-1");
    bus.publish_message(message).await.unwrap();
    bus.publish("elsewhere", "not captured").await.unwrap();
    // the store makes a plain publish readable once written: a durable one after it
    // is acknowledged only when both are
    streams
        .publish("log.app", "durable")
        .await
        .unwrap()
        .await
        .unwrap();
    let stored = streams.range("LOG", 1, 10, usize::MAX).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(&stored[0].payload[..], b"plain");
    assert_eq!(&stored[0].header("trace").unwrap()[..], b"t-1");
}

#[tokio::test]
async fn many_publishes_in_flight_are_acknowledged_in_order() {
    let bus = Bus::embedded();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("PIPE", ["pipe"]))
        .await
        .unwrap();
    let mut pending = Vec::new();
    for i in 0..5_000u32 {
        pending.push(
            streams
                .publish("pipe", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
        );
    }
    for (i, ack) in pending.into_iter().enumerate() {
        assert_eq!(ack.await.unwrap().seq, i as u64 + 1);
    }
}

#[tokio::test]
async fn a_retried_publish_is_stored_and_delivered_once() {
    let bus = Bus::embedded();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("PAY", ["pay"]))
        .await
        .unwrap();
    let mut plain = bus.subscribe("pay").await.unwrap();
    let once = Publish {
        msg_id: Some("payment-7".into()),
        ..Publish::default()
    };
    let first = streams
        .publish_with("pay", "7 EUR", once.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let retry = streams
        .publish_with("pay", "7 EUR", once)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((retry.seq, retry.duplicate), (first.seq, true));
    assert_eq!(streams.info("PAY").await.unwrap().state.msgs, 1);
    bus.publish("pay", "marker").await.unwrap();
    assert_eq!(&timeout(plain.next()).await.unwrap().payload[..], b"7 EUR");
    assert_eq!(
        &timeout(plain.next()).await.unwrap().payload[..],
        b"marker",
        "the retry was not delivered"
    );
}

#[tokio::test]
async fn streams_in_a_directory_outlive_the_bus_that_wrote_them() {
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = bus_in(dir.path());
        let streams = bus.streams().unwrap();
        streams
            .create(StreamConfig::new("KEEP", ["keep.*"]))
            .await
            .unwrap();
        for i in 0..100u32 {
            streams
                .publish(format!("keep.{}", i % 3), i.to_string())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    let bus = bus_in(dir.path());
    let streams = bus.streams().unwrap();
    let info = streams.info("KEEP").await.unwrap();
    assert_eq!((info.state.msgs, info.state.last_seq), (100, 100));
    assert_eq!(
        &streams.last("KEEP", "keep.0").await.unwrap().payload[..],
        b"99"
    );
    assert_eq!(
        streams
            .publish("keep.1", "more")
            .await
            .unwrap()
            .await
            .unwrap()
            .seq,
        101
    );
}

#[tokio::test]
async fn admin_operations_create_update_list_purge_and_delete() {
    let bus = Bus::embedded();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("A", ["a.>"]))
        .await
        .unwrap();
    let err = streams
        .create(StreamConfig::new("B", ["a.b"]))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "subject `a.b` overlaps `a.>` of stream `A`"
    );
    streams.create(StreamConfig::new("B", ["b"])).await.unwrap();
    for _ in 0..5 {
        streams.publish("a.x", "x").await.unwrap().await.unwrap();
        streams.publish("a.y", "y").await.unwrap().await.unwrap();
    }
    assert_eq!(streams.purge_subject("A", "a.x").await.unwrap(), 5);
    let info = streams
        .update(StreamConfig {
            max_msgs: Some(2),
            ..StreamConfig::new("A", ["a.>"])
        })
        .await
        .unwrap();
    assert_eq!(info.state.msgs, 2);
    assert_eq!(streams.purge("A").await.unwrap(), 2);
    let names: Vec<String> = streams
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.config.name)
        .collect();
    assert_eq!(names, ["A", "B"]);
    streams.delete("B").await.unwrap();
    assert!(streams.info("B").await.is_err());
    let err = streams.publish("b", "x").await.unwrap_err();
    assert_eq!(err.to_string(), "no stream captures subject `b`");
}

#[tokio::test]
async fn an_expectation_that_does_not_hold_is_refused_naming_both_values() {
    let bus = Bus::embedded();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("CAS", ["cas"]))
        .await
        .unwrap();
    streams.publish("cas", "1").await.unwrap().await.unwrap();
    let stale = Publish {
        expected_last_seq: Some(0),
        ..Publish::default()
    };
    let err = streams.publish_with("cas", "2", stale).await.unwrap_err();
    assert!(matches!(err, BusError::Stream(_)));
    assert_eq!(
        err.to_string(),
        "stream `CAS`: expected last sequence 0, found 1"
    );
}

#[tokio::test]
async fn a_storage_directory_that_cannot_be_opened_makes_streams_fail_with_the_reason() {
    let file = tempfile::NamedTempFile::new().unwrap(); // a file, not a directory
    let bus = bus_in(file.path());
    let err = bus.streams().unwrap_err();
    assert!(
        err.to_string().contains(&file.path().display().to_string()),
        "{err}"
    );
    bus.publish("plain", "still works").await.unwrap();
}

#[tokio::test]
async fn a_consumer_on_the_bus_gets_plainly_published_messages_and_its_dead_letters_reach_subscribers()
 {
    use courier::bus::ConsumerConfig;
    let bus = Bus::embedded();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
    let mut dead = bus.subscribe("$DLQ.>").await.unwrap();
    bus.publish("orders.eu", "plain").await.unwrap(); // captured by the stream
    let worker = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("billing"))
        .await
        .unwrap();
    let d = timeout(worker.fetch(1, Duration::from_secs(5)))
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(&d.message.payload[..], b"plain");
    d.term("no such customer").await.unwrap();
    let letter = timeout(dead.next()).await.unwrap();
    assert_eq!(&*letter.subject, "$DLQ.ORDERS.billing");
    assert_eq!(
        &letter.headers.get("Courier-Dlq-Reason").unwrap()[..],
        b"term: no such customer"
    );
    let infos = streams.consumers("ORDERS").await.unwrap();
    assert_eq!((infos.len(), infos[0].dead_letters), (1, 1));
    streams.delete_consumer("ORDERS", "billing").await.unwrap();
    assert!(streams.consumer("ORDERS", "billing").await.is_err());
}

#[tokio::test]
async fn a_broker_refuses_streams_and_consumers_past_its_limits_naming_them() {
    use courier::bus::{Broker, BrokerConfig, ConsumerConfig};
    let mut config = BrokerConfig::default();
    config.max_streams = 2;
    config.max_consumers = 1;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let bus = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("A", ["a.>"]))
        .await
        .unwrap();
    streams
        .create(StreamConfig::new("B", ["b.>"]))
        .await
        .unwrap();
    streams
        .create(StreamConfig::new("A", ["a.>"]))
        .await
        .expect("the same stream again is no new stream");
    let err = streams
        .create(StreamConfig::new("C", ["c.>"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_streams"), "{err}");

    streams
        .create_consumer("A", ConsumerConfig::durable("one"))
        .await
        .unwrap();
    let err = streams
        .create_consumer("A", ConsumerConfig::durable("two"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_consumers"), "{err}");

    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(
            streams
                .create_consumer("A", ConsumerConfig::ephemeral())
                .await
                .unwrap(),
        );
    }
    let err = streams
        .create_consumer("A", ConsumerConfig::ephemeral())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MAX_EPHEMERAL"), "{err}");
    // another connection has its own allowance
    let other = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    other
        .streams()
        .unwrap()
        .create_consumer("A", ConsumerConfig::ephemeral())
        .await
        .unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn on_a_broker_under_fsync_every_pipelined_publishes_are_acknowledged_in_order_and_stored_once()
 {
    use courier::bus::{BrokerConfig, Fsync};
    let mut config = BrokerConfig::default();
    config.fsync = Some(Fsync::Every(Duration::from_secs(120)));
    let (broker, _dir) = broker_with_store(config).await;
    let bus = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("P", ["p.>"]))
        .await
        .unwrap();
    // many publishes in flight: the broker writes them once per read, in its own task
    let mut acks = std::collections::VecDeque::new();
    let mut seqs = Vec::new();
    for i in 0..5000u32 {
        if acks.len() == 500 {
            let ack: courier::bus::PubAckFuture = acks.pop_front().unwrap();
            seqs.push(timeout(ack).await.unwrap().seq);
        }
        acks.push_back(streams.publish("p.x", i.to_string()).await.unwrap());
    }
    while let Some(ack) = acks.pop_front() {
        seqs.push(timeout(ack).await.unwrap().seq);
    }
    assert_eq!(
        seqs,
        (1..=5000).collect::<Vec<u64>>(),
        "acknowledged in order"
    );
    let read = streams.range("P", 1, 4096, usize::MAX).await.unwrap();
    assert_eq!(read.len(), 4096);
    assert!(
        read.iter()
            .enumerate()
            .all(|(i, m)| m.payload == i.to_string())
    );
    assert_eq!(streams.info("P").await.unwrap().state.msgs, 5000);
}

#[tokio::test]
async fn a_durable_publish_and_a_ping_in_one_read_are_answered_with_nothing_more_sent() {
    use bytes::BytesMut;
    use courier::bus::{BrokerConfig, Fsync};
    use courier::codec::FrameCodec;
    use courier::frame::{Connect, Frame, Publish as PubFrame, Subscribe};
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::{Encoder, FramedRead};

    let mut config = BrokerConfig::default();
    config.fsync = Some(Fsync::Every(Duration::from_secs(120)));
    let (broker, _dir) = broker_with_store(config).await;
    let bus = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    bus.streams()
        .unwrap()
        .create(StreamConfig::new("P", ["p.>"]))
        .await
        .unwrap();

    let socket = tokio::net::TcpStream::connect(broker.local_addr())
        .await
        .unwrap();
    let (read, mut write) = socket.into_split();
    let mut frames = FramedRead::new(read, FrameCodec::new(1 << 20));
    let mut codec = FrameCodec::new(1 << 20);
    let mut bytes = BytesMut::new();
    let hello = Frame::Connect(Connect {
        name: "raw".into(),
        ..Connect::default()
    });
    codec.encode(&hello, &mut bytes).unwrap();
    let sub = Frame::Sub(Subscribe {
        sid: 1,
        subject: "raw.reply".into(),
        queue: "".into(),
    });
    codec.encode(&sub, &mut bytes).unwrap();
    write.write_all(&bytes).await.unwrap();
    assert!(matches!(
        timeout(frames.next()).await,
        Some(Ok(Frame::Connect(_)))
    ));

    // one write: the publish, then a ping, which the broker answers and keeps to itself;
    // then nothing more from this peer
    let mut publish = PubFrame {
        subject: "p.x".into(),
        reply: "raw.reply".into(),
        payload: "stored".into(),
        ..PubFrame::default()
    };
    publish.headers.insert("Courier-Durable", "1");
    bytes.clear();
    codec.encode(&Frame::Pub(publish), &mut bytes).unwrap();
    codec.encode(&Frame::Ping { nonce: 7 }, &mut bytes).unwrap();
    write.write_all(&bytes).await.unwrap();

    let answer = timeout(async {
        loop {
            match frames.next().await {
                Some(Ok(Frame::Msg(msg))) => return msg,
                Some(Ok(_)) => {} // the pong, the broker's pings
                other => panic!("connection ended: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(answer.subject.as_str(), "raw.reply");
    let ack = String::from_utf8_lossy(&answer.payload);
    assert!(ack.contains(r#""seq":1,"#), "answer: {ack}");
    drop(bus);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_client_with_a_small_frame_limit_reads_and_fetches_every_message_of_a_large_batch() {
    use courier::bus::{BrokerConfig, ConnectOptions, ConsumerConfig};
    let (broker, _dir) = broker_with_store(BrokerConfig::default()).await;
    let mut options = ConnectOptions::default();
    options.connection.max_frame_len = 32 * 1024;
    let bus = Bus::connect_with(broker.local_addr().to_string(), options)
        .await
        .unwrap();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("BIG", ["big.>"]))
        .await
        .unwrap();
    // 300 KB in all: more than a pack's usual size and than this client's frame limit
    for i in 0..300u32 {
        let payload = format!("{i:04}").repeat(250);
        timeout(streams.publish("big.x", payload).await.unwrap())
            .await
            .unwrap();
    }
    let read = timeout(streams.range("BIG", 1, 300, usize::MAX))
        .await
        .unwrap();
    assert_eq!(read.len(), 300, "every message of the range");
    assert!(read.iter().enumerate().all(
        |(i, m)| m.payload.len() == 1000 && m.payload.starts_with(format!("{i:04}").as_bytes())
    ));
    let consumer = streams
        .create_consumer("BIG", ConsumerConfig::durable("all"))
        .await
        .unwrap();
    let mut fetched = 0;
    while fetched < 300 {
        let batch = timeout(consumer.fetch(300, Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "fetched {fetched} of 300, then nothing");
        fetched += batch.len();
    }
    assert_eq!(fetched, 300);
    drop(bus);
    broker.shutdown().await;
}

#[tokio::test]
async fn malformed_packed_acks_are_dropped_and_the_connection_and_consumer_carry_on() {
    use courier::bus::{BrokerConfig, ConsumerConfig};
    let (broker, _dir) = broker_with_store(BrokerConfig::default()).await;
    let bus = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let streams = bus.streams().unwrap();
    streams
        .create(StreamConfig::new("S", ["s.>"]))
        .await
        .unwrap();
    for payload in ["one", "two"] {
        timeout(streams.publish("s.x", payload).await.unwrap())
            .await
            .unwrap();
    }
    let consumer = streams
        .create_consumer("S", ConsumerConfig::durable("c"))
        .await
        .unwrap();
    let fetched = timeout(consumer.fetch(2, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(fetched.len(), 2);

    // each names message 2 wrongly: a sequence cut short, no consumer, an unknown
    // consumer; and a message never delivered
    let two = 2u64.to_be_bytes().to_vec();
    let bad: [(&str, Vec<u8>); 4] = [
        ("$CR.ACKS.S.c", two[1..].to_vec()),
        ("$CR.ACKS.S", two.clone()),
        ("$CR.ACKS.S.nope", two),
        ("$CR.ACKS.S.c", 99u64.to_be_bytes().to_vec()),
    ];
    for (subject, payload) in bad {
        bus.publish(subject, payload).await.unwrap();
    }
    fetched[0].ack().await.unwrap();
    bus.flush().await.unwrap();

    // answered on the same connection, after the acks: one done, one still pending
    let info = timeout(consumer.info()).await.unwrap();
    assert_eq!(
        (info.ack_floor, info.num_ack_pending),
        (1, 1),
        "after the malformed acks and one good one"
    );
    fetched[1].ack().await.unwrap();
    bus.flush().await.unwrap();
    let info = timeout(consumer.info()).await.unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (2, 0));
    drop(bus);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_stored_message_too_large_for_a_readers_frame_limit_fails_its_read_naming_the_limit() {
    use courier::bus::{BrokerConfig, ConnectOptions, ConsumerConfig};
    let (broker, _dir) = broker_with_store(BrokerConfig::default()).await;
    let writer = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let streams = writer.streams().unwrap();
    streams
        .create(StreamConfig::new("W", ["w.>"]))
        .await
        .unwrap();
    for payload in ["small".to_string(), "x".repeat(40_000)] {
        timeout(streams.publish("w.x", payload).await.unwrap())
            .await
            .unwrap();
    }
    let mut options = ConnectOptions::default();
    options.connection.max_frame_len = 32 * 1024;
    let reader = Bus::connect_with(broker.local_addr().to_string(), options)
        .await
        .unwrap();
    let small = reader.streams().unwrap();
    let err = timeout(small.range("W", 1, 10, usize::MAX))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("message 2") && text.contains("frame limit"),
        "{text}"
    );
    assert_eq!(
        timeout(small.range("W", 1, 1, usize::MAX))
            .await
            .unwrap()
            .len(),
        1,
        "the message before it is read"
    );
    let consumer = small
        .create_consumer("W", ConsumerConfig::durable("c"))
        .await
        .unwrap();
    let err = timeout(consumer.fetch(10, Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("frame limit"), "{err}");
    drop((reader, writer));
    broker.shutdown().await;
}
