//! Durable streams and consumers, written once and run on every backend that serves
//! them: the embedded bus and the courier broker (over TCP), each on a storage
//! directory, and (cargo feature `nats`) a nats-server with JetStream and a three-node
//! JetStream cluster with replicated (R3) streams. Every test reads like a promise of
//! `Bus::streams`, and holds wherever the bus runs; where NATS promises less, the test
//! says so and checks what it promises instead.

#[cfg(feature = "nats")]
#[path = "streams/jetstream_server.rs"]
mod jetstream_server;

use std::time::Duration;

use courier::bus::{
    AckPolicy, Broker, BrokerConfig, Bus, BusError, ConsumerConfig, DeadLetter, EmbeddedConfig,
    ErrorKind, KeySource, Message, Publish, Storage, StreamConfig, Streams,
};

/// A backend serving streams from a directory of its own, which a restart reopens.
enum Fixture {
    Embedded {
        dir: tempfile::TempDir,
        bus: Option<Bus>,
    },
    Broker {
        dir: tempfile::TempDir,
        broker: Option<Broker>,
        port: u16,
    },
    /// nats-server with JetStream: one node, or three with R3 streams. The nodes are
    /// dropped (killed) before their directory.
    #[cfg(feature = "nats")]
    Nats {
        nodes: Vec<jetstream_server::JsNode>,
        _dir: tempfile::TempDir,
        replicas: usize,
    },
}

impl Fixture {
    fn embedded() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let bus = Some(embedded_in(dir.path()));
        Fixture::Embedded { dir, bus }
    }

    async fn broker() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker_in(dir.path(), "127.0.0.1:0").await;
        let port = broker.local_addr().port();
        Fixture::Broker {
            dir,
            broker: Some(broker),
            port,
        }
    }

    /// A single JetStream server.
    #[cfg(feature = "nats")]
    async fn nats() -> Fixture {
        Fixture::nats_of(jetstream_server::JsNode::start, 1).await
    }

    /// A three-node JetStream cluster; streams are made with three replicas.
    #[cfg(feature = "nats")]
    async fn nats_cluster() -> Fixture {
        Fixture::nats_of(jetstream_server::JsNode::cluster_of_three, 3).await
    }

    /// JetStream nodes `start` makes in a fresh directory, once they answer.
    #[cfg(feature = "nats")]
    async fn nats_of(
        start: fn(&std::path::Path) -> Vec<jetstream_server::JsNode>,
        replicas: usize,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let nodes = start(dir.path());
        let fx = Fixture::Nats {
            _dir: dir,
            nodes,
            replicas,
        };
        fx.wait_for_jetstream(&[]).await;
        fx
    }

    /// Until JetStream answers (a cluster elects its leaders first): creating and
    /// deleting a stream of every replica count works, every stream answers its info,
    /// and so does every consumer in `known` (a cluster's list of consumers can come
    /// back short while some leaders are not elected yet: the names come from before).
    #[cfg(feature = "nats")]
    async fn wait_for_jetstream(&self, known: &[(String, String)]) {
        let started = std::time::Instant::now();
        loop {
            let (_bus, streams) = self.streams().await;
            let probe = StreamConfig::new("PROBE", ["courier.probe"]);
            let ready = streams.create(probe).await.is_ok()
                && streams.delete("PROBE").await.is_ok()
                && all_answer(&streams, known).await;
            if ready {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "JetStream not ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every durable (stream, consumer) there is now, to wait for after a restart.
    #[cfg(feature = "nats")]
    async fn consumer_names(&self) -> Vec<(String, String)> {
        let (_bus, streams) = self.streams().await;
        let mut names = Vec::new();
        for info in streams.list().await.expect("streams listed") {
            let stream = info.config.name;
            for c in streams.consumers(&stream).await.expect("consumers listed") {
                if c.config.durable {
                    names.push((stream.clone(), c.config.name));
                }
            }
        }
        names
    }

    fn is_nats(&self) -> bool {
        #[cfg(feature = "nats")]
        if matches!(self, Fixture::Nats { .. }) {
            return true;
        }
        false
    }

    /// A participant: the embedded bus, or a new connection to the broker or NATS.
    async fn bus(&self) -> Bus {
        match self {
            Fixture::Embedded { bus, .. } => bus.clone().expect("running"),
            Fixture::Broker { port, .. } => Bus::connect(format!("127.0.0.1:{port}"))
                .await
                .expect("connects to the broker"),
            #[cfg(feature = "nats")]
            Fixture::Nats {
                nodes, replicas, ..
            } => {
                let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
                let mut options = courier::bus::NatsOptions::default();
                options.stream_replicas = *replicas;
                options.connect = options.connect.retry_on_initial_connect();
                Bus::connect_nats_with(&urls.join(","), options)
                    .await
                    .expect("connects to nats-server")
            }
        }
    }

    async fn streams(&self) -> (Bus, Streams) {
        let bus = self.bus().await;
        let streams = bus.streams().expect("streams are served");
        (bus, streams)
    }

    /// Stops the backend and starts it again on the same directory (the broker on the
    /// same port). Handles made before are not used again.
    async fn restart(&mut self) {
        // the consumers a cluster is to elect leaders for again
        #[cfg(feature = "nats")]
        let known = match self {
            Fixture::Nats { .. } => self.consumer_names().await,
            _ => Vec::new(),
        };
        match self {
            Fixture::Embedded { dir, bus } => {
                drop(bus.take());
                *bus = Some(embedded_in(dir.path()));
            }
            Fixture::Broker { dir, broker, port } => {
                broker.take().expect("running").shutdown().await;
                *broker = Some(broker_in(dir.path(), &format!("127.0.0.1:{port}")).await);
            }
            #[cfg(feature = "nats")]
            Fixture::Nats { nodes, .. } => {
                for node in nodes.iter_mut() {
                    node.kill();
                }
                for node in nodes.iter_mut() {
                    node.restart();
                }
                self.wait_for_jetstream(&known).await;
            }
        }
    }
}

/// Whether every stream, every consumer listed and every consumer in `known` (stream,
/// consumer) answer their info: after a restart, a cluster elects their leaders.
#[cfg(feature = "nats")]
async fn all_answer(streams: &Streams, known: &[(String, String)]) -> bool {
    let Ok(list) = streams.list().await else {
        return false;
    };
    let mut consumers = known.to_vec();
    for info in list {
        let name = &info.config.name;
        if streams.info(name).await.is_err() {
            return false;
        }
        let Ok(listed) = streams.consumers(name).await else {
            return false;
        };
        consumers.extend(listed.into_iter().map(|c| (name.clone(), c.config.name)));
    }
    for (stream, name) in &consumers {
        // a consumer whose leader is elected answers its info
        let Ok(consumer) = streams.consumer(stream, name).await else {
            return false;
        };
        if consumer.info().await.is_err() {
            return false;
        }
    }
    true
}

fn embedded_in(dir: &std::path::Path) -> Bus {
    let mut config = EmbeddedConfig::default();
    config.storage = Storage::Directory(dir.to_owned());
    Bus::embedded_with(config)
}

async fn broker_in(dir: &std::path::Path, addr: &str) -> Broker {
    let mut config = BrokerConfig::default();
    config.storage = Storage::Directory(dir.to_owned());
    Broker::bind_with(addr, config).await.expect("broker binds")
}

/// Generates one `#[tokio::test]` per backend for each behaviour `async fn(Fixture)`.
macro_rules! on_every_stream_backend {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::embedded()).await
                }
            )*
        }
        #[cfg(feature = "nats")]
        mod nats {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::nats().await).await
                }
            )*
        }
        #[cfg(feature = "nats")]
        mod nats_cluster_r3 {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::nats_cluster().await).await
                }
            )*
        }
        mod broker {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::broker().await).await
                }
            )*
        }
    };
}

on_every_stream_backend!(
    a_durable_publish_is_acknowledged_in_order_and_plain_subscribers_get_it,
    a_plain_publish_to_a_stream_subject_is_stored_with_its_headers,
    a_retried_message_id_is_stored_and_delivered_once,
    expectations_that_do_not_hold_are_refused_naming_both_values,
    a_subject_no_stream_captures_is_refused,
    admin_operations_create_update_list_purge_and_delete,
    get_last_and_range_read_back_what_was_stored,
    acknowledged_messages_survive_a_restart_and_sequences_go_on,
    a_consumer_delivers_in_order_and_its_acks_move_the_floor,
    a_nak_delivers_again_and_counts_the_delivery,
    an_unanswered_message_comes_back_after_the_ack_wait,
    a_terminated_message_becomes_a_dead_letter_subscribers_see,
    max_deliver_sends_the_message_to_a_dead_letter_stream,
    a_consumer_group_shares_the_work_without_duplicates,
    a_durable_consumer_resumes_where_it_was_after_a_restart,
    a_nak_after_an_ack_is_refused_and_a_second_ack_is_harmless,
    one_key_has_one_message_in_flight,
    a_delayed_message_waits_for_its_time,
    messages_is_a_stream_of_deliveries,
    an_ephemeral_consumer_works_and_is_not_listed,
    consumer_errors_name_the_stream_and_consumer,
);

/// Waits up to 10 s for `future`.
async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("within 10 s")
}

fn kind(e: &BusError) -> Option<ErrorKind> {
    match e {
        BusError::Stream(e) => Some(e.kind()),
        _ => None,
    }
}

async fn orders(streams: &Streams) {
    streams
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .await
        .unwrap();
}

async fn publish_n(streams: &Streams, subject: &str, n: u64) {
    let mut acks = Vec::new();
    for i in 1..=n {
        acks.push(
            streams
                .publish(subject.to_owned(), format!("m{i}"))
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Fetches until `n` messages came (each waiting up to 10 s).
async fn fetch_n(consumer: &courier::bus::Consumer, n: usize) -> Vec<courier::bus::Delivery> {
    let mut out = Vec::new();
    while out.len() < n {
        let got = within(consumer.fetch(n - out.len(), Duration::from_secs(10)))
            .await
            .unwrap();
        assert!(!got.is_empty(), "no message within 10 s; had {}", out.len());
        out.extend(got);
    }
    out
}

fn payloads(deliveries: &[courier::bus::Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
        .collect()
}

async fn a_durable_publish_is_acknowledged_in_order_and_plain_subscribers_get_it(fx: Fixture) {
    let (bus, streams) = fx.streams().await;
    orders(&streams).await;
    let mut plain = bus.subscribe("orders.*").await.unwrap();
    let mut acks = Vec::new();
    for i in 0..100 {
        acks.push(streams.publish("orders.eu", format!("{i}")).await.unwrap());
    }
    for (i, ack) in acks.into_iter().enumerate() {
        let ack = ack.await.unwrap();
        assert_eq!(
            (ack.stream.as_str(), ack.seq, ack.duplicate),
            ("ORDERS", i as u64 + 1, false)
        );
    }
    for i in 0..100 {
        let m = within(plain.next()).await.unwrap();
        assert_eq!(m.payload, format!("{i}").as_bytes());
        if !fx.is_nats() {
            // (NATS core shows subscribers the publisher's reply subject)
            assert_eq!(
                m.reply, None,
                "subscribers cannot answer the publisher's acknowledgement"
            );
        }
        assert!(m.headers.get("Courier-Durable").is_none());
    }
}

async fn a_plain_publish_to_a_stream_subject_is_stored_with_its_headers(fx: Fixture) {
    let (bus, streams) = fx.streams().await;
    orders(&streams).await;
    bus.publish_message(Message::new("orders.eu", "plain").with_header("Trace", "t-1"))
        .await
        .unwrap();
    bus.publish("elsewhere", "not captured").await.unwrap();
    // a durable publish after it is acknowledged only once the plain one is stored
    let ack = streams
        .publish("orders.us", "durable")
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.seq, 2);
    let stored = streams.get("ORDERS", 1).await.unwrap();
    assert_eq!(
        (&*stored.subject, &stored.payload[..]),
        ("orders.eu", &b"plain"[..])
    );
    assert_eq!(stored.header("Trace").map(|v| &v[..]), Some(&b"t-1"[..]));
    assert_eq!(streams.info("ORDERS").await.unwrap().state.msgs, 2);
}

async fn a_retried_message_id_is_stored_and_delivered_once(fx: Fixture) {
    let (bus, streams) = fx.streams().await;
    orders(&streams).await;
    let mut plain = bus.subscribe("orders.>").await.unwrap();
    let once = Publish {
        msg_id: Some("order-42".into()),
        ..Publish::default()
    };
    let first = streams
        .publish_with("orders.eu", "42", once.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let retry = streams
        .publish_with("orders.eu", "42", once)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!((retry.seq, retry.duplicate), (1, true));
    streams
        .publish("orders.eu", "end")
        .await
        .unwrap()
        .await
        .unwrap();
    if fx.is_nats() {
        // NATS core hands every publish to subscribers, the retry too; JetStream
        // stores it once (below)
    } else {
        let got: Vec<_> = [
            within(plain.next()).await.unwrap(),
            within(plain.next()).await.unwrap(),
        ]
        .into_iter()
        .map(|m| m.payload)
        .collect();
        assert_eq!(got, [&b"42"[..], &b"end"[..]]);
    }
    assert_eq!(streams.info("ORDERS").await.unwrap().state.msgs, 2);
    let stored = streams.get("ORDERS", 1).await.unwrap();
    assert_eq!(
        stored.header("Msg-Id").map(|v| &v[..]),
        Some(&b"order-42"[..])
    );
}

async fn expectations_that_do_not_hold_are_refused_naming_both_values(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    publish_n(&streams, "orders.eu", 3).await;
    let wrong = Publish {
        expected_last_seq: Some(2),
        ..Publish::default()
    };
    let err = streams.publish_with("orders.eu", "x", wrong).await;
    let err = match err {
        Ok(ack) => ack.await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(kind(&err), Some(ErrorKind::WrongLast), "{err}");
    let text = err.to_string();
    assert!(
        text.contains('2') && text.contains('3') && text.contains("ORDERS"),
        "{text}"
    );
    let right = Publish {
        expected_last_seq: Some(3),
        expected_last_subject_seq: Some(3),
        ..Publish::default()
    };
    let ack = streams
        .publish_with("orders.eu", "y", right)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.seq, 4);
}

async fn a_subject_no_stream_captures_is_refused(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    let err = match streams.publish("invoices.eu", "x").await {
        Ok(ack) => ack.await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(kind(&err), Some(ErrorKind::NoStreamForSubject), "{err}");
    assert!(err.to_string().contains("invoices.eu"), "{err}");
}

async fn admin_operations_create_update_list_purge_and_delete(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    let config = StreamConfig::new("ORDERS", ["orders.>"]);
    streams.create(config.clone()).await.unwrap();
    streams
        .create(config.clone())
        .await
        .expect("the same configuration again is fine");
    let mut other = config.clone();
    other.max_msgs = Some(5);
    let err = streams.create(other.clone()).await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::StreamExists), "{err}");
    let err = streams
        .create(StreamConfig::new("ALL", ["orders.eu"]))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::SubjectOverlap), "{err}");
    streams
        .create(StreamConfig::new("LOG", ["log.*"]))
        .await
        .unwrap();
    let names: Vec<String> = streams
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.config.name)
        .collect();
    assert_eq!(names, ["LOG", "ORDERS"]);

    publish_n(&streams, "orders.eu", 4).await;
    publish_n(&streams, "orders.us", 4).await;
    let updated = streams.update(other).await.unwrap();
    assert_eq!(
        (updated.config.max_msgs, updated.state.msgs),
        (Some(5), 5),
        "a lowered limit applies at once"
    );
    assert_eq!(
        streams.purge_subject("ORDERS", "orders.eu").await.unwrap(),
        1
    );
    assert_eq!(streams.purge("ORDERS").await.unwrap(), 4);
    let info = streams.info("ORDERS").await.unwrap();
    assert_eq!((info.state.msgs, info.state.last_seq), (0, 8));
    streams.delete("ORDERS").await.unwrap();
    let err = streams.info("ORDERS").await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::StreamNotFound), "{err}");
    assert!(err.to_string().contains("ORDERS"), "{err}");
}

async fn get_last_and_range_read_back_what_was_stored(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    for (subject, payload) in [("orders.eu", "a"), ("orders.us", "b"), ("orders.eu", "c")] {
        let message = Message::new(subject, payload).with_header("Customer", "7");
        streams
            .publish_message(message, Publish::default())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let second = streams.get("ORDERS", 2).await.unwrap();
    assert_eq!(
        (second.seq, &*second.subject, &second.payload[..]),
        (2, "orders.us", &b"b"[..])
    );
    assert_eq!(second.header("Customer").map(|v| &v[..]), Some(&b"7"[..]));
    assert!(second.time > 0);
    assert_eq!(streams.last("ORDERS", "orders.eu").await.unwrap().seq, 3);
    let all = streams.range("ORDERS", 1, 10, usize::MAX).await.unwrap();
    let seqs: Vec<u64> = all.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(all[1], second);
    assert_eq!(
        streams
            .range("ORDERS", 2, 1, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    let err = streams.get("ORDERS", 9).await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::NoMessage), "{err}");
    let err = streams.last("ORDERS", "orders.asia").await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::NoMessage), "{err}");
}

async fn acknowledged_messages_survive_a_restart_and_sequences_go_on(mut fx: Fixture) {
    {
        let (_bus, streams) = fx.streams().await;
        orders(&streams).await;
        publish_n(&streams, "orders.eu", 50).await;
    }
    fx.restart().await;
    let (_bus, streams) = fx.streams().await;
    let info = streams.info("ORDERS").await.unwrap();
    assert_eq!((info.state.msgs, info.state.last_seq), (50, 50));
    assert_eq!(
        &streams.get("ORDERS", 50).await.unwrap().payload[..],
        b"m50"
    );
    let ack = streams
        .publish("orders.eu", "after")
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.seq, 51);
}

async fn a_consumer_delivers_in_order_and_its_acks_move_the_floor(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    publish_n(&streams, "orders.eu", 10).await;
    let consumer = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("billing"))
        .await
        .unwrap();
    assert_eq!(consumer.name(), "billing");
    let got = fetch_n(&consumer, 10).await;
    let expected: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(&got), expected);
    for (i, d) in got.iter().enumerate() {
        assert_eq!(
            (d.info.stream_seq, d.info.consumer_seq, d.info.deliveries),
            (i as u64 + 1, i as u64 + 1, 1)
        );
        assert_eq!((&*d.info.stream, &*d.info.consumer), ("ORDERS", "billing"));
    }
    for d in &got[..9] {
        d.ack().await.unwrap();
    }
    got[9].ack_confirmed().await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        (info.ack_floor, info.num_ack_pending, info.delivered),
        (10, 0, 10)
    );
    assert!(
        within(consumer.fetch(10, Duration::from_millis(50)))
            .await
            .unwrap()
            .is_empty()
    );
    let listed = streams.consumers("ORDERS").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].config.name.as_str(), listed[0].ack_floor),
        ("billing", 10)
    );
}

async fn a_nak_delivers_again_and_counts_the_delivery(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    publish_n(&streams, "orders.eu", 2).await;
    let consumer = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("c"))
        .await
        .unwrap();
    let first = fetch_n(&consumer, 2).await;
    first[0].nak(None).await.unwrap();
    first[1].ack_confirmed().await.unwrap();
    let again = fetch_n(&consumer, 1).await;
    assert_eq!((again[0].info.stream_seq, again[0].info.deliveries), (1, 2));
    assert_eq!(again[0].info.consumer_seq, 3);
    again[0].ack_confirmed().await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (2, 0));
}

async fn an_unanswered_message_comes_back_after_the_ack_wait(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    publish_n(&streams, "orders.eu", 1).await;
    let mut config = ConsumerConfig::durable("c");
    config.ack_wait = Duration::from_millis(300);
    let consumer = streams.create_consumer("ORDERS", config).await.unwrap();
    let first = fetch_n(&consumer, 1).await;
    let started = std::time::Instant::now();
    let again = fetch_n(&consumer, 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the ack wait"
    );
    assert_eq!((again[0].info.stream_seq, again[0].info.deliveries), (1, 2));
    // a late ack from the first delivery still counts: the work was done
    first[0].ack_confirmed().await.unwrap();
    again[0].ack_confirmed().await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (1, 0));
}

async fn a_terminated_message_becomes_a_dead_letter_subscribers_see(fx: Fixture) {
    let (bus, streams) = fx.streams().await;
    orders(&streams).await;
    let mut dead = bus.subscribe("$DLQ.>").await.unwrap();
    let message = Message::new("orders.eu", "poison").with_header("Customer", "7");
    streams
        .publish_message(message, Publish::default())
        .await
        .unwrap()
        .await
        .unwrap();
    let consumer = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("billing"))
        .await
        .unwrap();
    let d = fetch_n(&consumer, 1).await.pop().unwrap();
    d.term("no such customer").await.unwrap();
    let letter = within(dead.next()).await.unwrap();
    assert_eq!(&*letter.subject, "$DLQ.ORDERS.billing");
    assert_eq!(&letter.payload[..], b"poison");
    let header = |name: &str| letter.headers.get_str(name).map(str::to_owned);
    assert_eq!(
        header("Courier-Dlq-Reason").as_deref(),
        Some("term: no such customer")
    );
    assert_eq!(header("Courier-Dlq-Stream").as_deref(), Some("ORDERS"));
    assert_eq!(header("Courier-Dlq-Sequence").as_deref(), Some("1"));
    assert_eq!(header("Customer").as_deref(), Some("7"));
    let info = consumer.info().await.unwrap();
    assert_eq!(info.ack_floor, 1);
    if !fx.is_nats() {
        // on NATS dead letters are published by the client, which keeps no count
        assert_eq!(info.dead_letters, 1);
    }
}

async fn max_deliver_sends_the_message_to_a_dead_letter_stream(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    streams
        .create(StreamConfig::new("DEAD", ["$DLQ.>"]))
        .await
        .unwrap();
    publish_n(&streams, "orders.eu", 1).await;
    let mut config = ConsumerConfig::durable("c");
    config.max_deliver = Some(2);
    config.dead_letter = DeadLetter::Stream("DEAD".into());
    let consumer = streams.create_consumer("ORDERS", config).await.unwrap();
    for _ in 0..2 {
        fetch_n(&consumer, 1)
            .await
            .pop()
            .unwrap()
            .nak(None)
            .await
            .unwrap();
    }
    let mut stored = None;
    for _ in 0..100 {
        if let Ok(m) = streams.get("DEAD", 1).await {
            stored = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = stored.expect("the dead letter is stored in DEAD");
    assert_eq!(&stored.payload[..], b"m1");
    assert_eq!(
        stored.header("Courier-Dlq-Reason").map(|v| &v[..]),
        Some(&b"max_deliver"[..])
    );
    assert_eq!(
        stored.header("Courier-Dlq-Deliveries").map(|v| &v[..]),
        Some(&b"2"[..])
    );
    assert!(
        within(consumer.fetch(1, Duration::from_millis(50)))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_consumer_group_shares_the_work_without_duplicates(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    streams
        .create_consumer("ORDERS", ConsumerConfig::durable("workers"))
        .await
        .unwrap();
    const N: u64 = 500;
    let mut members = Vec::new();
    for _ in 0..3 {
        let (_b, s) = fx.streams().await;
        let member = s.consumer("ORDERS", "workers").await.unwrap();
        members.push(tokio::spawn(async move {
            let _keep = _b;
            let mut seqs = Vec::new();
            loop {
                let got = member.fetch(20, Duration::from_millis(500)).await.unwrap();
                if got.is_empty() {
                    return seqs;
                }
                for d in got {
                    seqs.push(d.info.stream_seq);
                    d.ack().await.unwrap();
                }
                // the work takes a moment: the other members get their turn
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    publish_n(&streams, "orders.eu", N).await;
    let mut all = Vec::new();
    let mut busy = 0;
    for member in members {
        let seqs = within(member).await.unwrap();
        busy += usize::from(!seqs.is_empty());
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=N).collect::<Vec<_>>(), "each message once");
    assert!(busy >= 2, "the work is shared");
}

async fn a_durable_consumer_resumes_where_it_was_after_a_restart(mut fx: Fixture) {
    {
        let (_bus, streams) = fx.streams().await;
        orders(&streams).await;
        publish_n(&streams, "orders.eu", 10).await;
        let mut config = ConsumerConfig::durable("c");
        config.ack_wait = Duration::from_secs(1);
        let consumer = streams.create_consumer("ORDERS", config).await.unwrap();
        let got = fetch_n(&consumer, 6).await;
        for d in &got[..4] {
            d.ack_confirmed().await.unwrap();
        }
        // 5 and 6 delivered, never answered
    }
    fx.restart().await;
    let (_bus, streams) = fx.streams().await;
    let consumer = streams.consumer("ORDERS", "c").await.unwrap();
    let info = consumer.info().await.unwrap();
    if fx.is_nats() {
        // nats-server writes a consumer's acks to disk after it answers them: a server
        // killed right after may deliver acknowledged messages again (at least once),
        // never lose one
        assert!(info.ack_floor <= 4, "{info:?}");
        // What must come is every message never acknowledged (5 to 10). One
        // acknowledged but above the floor read here may come again, or not: a
        // leader elected later may hold more of the acks than the one that answered.
        // None at or below the floor comes.
        let owed: std::collections::BTreeSet<u64> = (5..=10).collect();
        let mut came = std::collections::BTreeSet::new();
        while !owed.is_subset(&came) {
            let got = tokio::time::timeout(
                Duration::from_secs(20),
                consumer.fetch(1, Duration::from_secs(10)),
            )
            .await
            .map_err(|_| "the fetch did not end".to_owned())
            .and_then(|r| r.map_err(|e| format!("the fetch failed: {e}")));
            let got = match got {
                Ok(got) if !got.is_empty() => got,
                other => panic!(
                    "no message from a fetch of 10 s ({other:?}): came {came:?} of {owed:?}, \
                     after the restart {info:?}"
                ),
            };
            for d in got {
                let seq = d.info.stream_seq;
                assert!(
                    (info.ack_floor + 1..=10).contains(&seq),
                    "{seq} came, at or below the ack floor {info:?}"
                );
                came.insert(seq);
                d.ack().await.unwrap();
            }
        }
        return;
    }
    assert_eq!(info.ack_floor, 4);
    let rest = fetch_n(&consumer, 6).await;
    let seqs: Vec<u64> = rest.iter().map(|d| d.info.stream_seq).collect();
    assert_eq!(
        seqs,
        [5, 6, 7, 8, 9, 10],
        "unanswered ones again, then the rest"
    );
    assert!(rest[0].info.deliveries >= 1);
}

async fn a_nak_after_an_ack_is_refused_and_a_second_ack_is_harmless(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    publish_n(&streams, "orders.eu", 1).await;
    let consumer = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("c"))
        .await
        .unwrap();
    let d = fetch_n(&consumer, 1).await.pop().unwrap();
    d.ack_confirmed().await.unwrap();
    d.ack_confirmed()
        .await
        .expect("acknowledging twice is harmless");
    if fx.is_nats() {
        // JetStream does not answer a nak, and ignores one for a message it has done
        // with: the message is not delivered again
        d.nak(None).await.unwrap();
        assert!(
            within(consumer.fetch(1, Duration::from_millis(300)))
                .await
                .unwrap()
                .is_empty()
        );
        return;
    }
    let err = d.nak(None).await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::NotPending), "{err}");
    assert!(err.to_string().contains('1'), "{err}");
}

async fn one_key_has_one_message_in_flight(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    for (customer, payload) in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("a", "a3")] {
        let message = Message::new("orders.eu", payload).with_header("Customer", customer);
        streams
            .publish_message(message, Publish::default())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut config = ConsumerConfig::durable("c");
    config.key = Some(KeySource::Header("Customer".into()));
    if fx.is_nats() {
        let err = streams.create_consumer("ORDERS", config).await.unwrap_err();
        assert!(matches!(err, BusError::Unsupported { .. }), "{err}");
        assert!(
            err.to_string().starts_with(
                "per-key order (ConsumerConfig::key) are not available on the NATS backend"
            ),
            "{err}"
        );
        return;
    }
    let consumer = streams.create_consumer("ORDERS", config).await.unwrap();
    let first = fetch_n(&consumer, 2).await;
    assert_eq!(payloads(&first), ["a1", "b1"]);
    assert!(
        within(consumer.fetch(10, Duration::from_millis(100)))
            .await
            .unwrap()
            .is_empty(),
        "a2 waits for a1"
    );
    first[0].ack().await.unwrap();
    let next = fetch_n(&consumer, 1).await;
    assert_eq!(payloads(&next), ["a2"]);
    next[0].ack().await.unwrap();
    assert_eq!(payloads(&fetch_n(&consumer, 1).await), ["a3"]);
}

async fn a_delayed_message_waits_for_its_time(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    let consumer = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("c"))
        .await
        .unwrap();
    let later = Publish {
        delay: Some(Duration::from_millis(400)),
        ..Publish::default()
    };
    let started = std::time::Instant::now();
    streams
        .publish_with("orders.eu", "later", later)
        .await
        .unwrap()
        .await
        .unwrap();
    streams
        .publish("orders.eu", "now")
        .await
        .unwrap()
        .await
        .unwrap();
    let first = fetch_n(&consumer, 1).await;
    assert_eq!(payloads(&first), ["now"]);
    let second = fetch_n(&consumer, 1).await;
    assert_eq!(payloads(&second), ["later"]);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

async fn messages_is_a_stream_of_deliveries(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    let consumer = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("c"))
        .await
        .unwrap();
    let mut messages = consumer.messages();
    publish_n(&streams, "orders.eu", 5).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        let d = within(messages.next()).await.unwrap().unwrap();
        got.push(String::from_utf8_lossy(&d.message.payload).into_owned());
        d.ack().await.unwrap();
    }
    assert_eq!(got, ["m1", "m2", "m3", "m4", "m5"]);
}

async fn an_ephemeral_consumer_works_and_is_not_listed(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    publish_n(&streams, "orders.eu", 3).await;
    let mut config = ConsumerConfig::ephemeral();
    config.ack_policy = AckPolicy::None;
    let consumer = streams.create_consumer("ORDERS", config).await.unwrap();
    assert_eq!(payloads(&fetch_n(&consumer, 3).await), ["m1", "m2", "m3"]);
    assert!(streams.consumers("ORDERS").await.unwrap().is_empty());
    assert_eq!(consumer.info().await.unwrap().delivered, 3);
}

async fn consumer_errors_name_the_stream_and_consumer(fx: Fixture) {
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    let err = streams.consumer("ORDERS", "nobody").await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::ConsumerNotFound), "{err}");
    assert!(
        err.to_string().contains("nobody") && err.to_string().contains("ORDERS"),
        "{err}"
    );
    let err = streams
        .create_consumer("MISSING", ConsumerConfig::durable("c"))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::StreamNotFound), "{err}");
    streams
        .create_consumer("ORDERS", ConsumerConfig::durable("c"))
        .await
        .unwrap();
    let mut other = ConsumerConfig::durable("c");
    other.max_deliver = Some(3);
    let err = streams.create_consumer("ORDERS", other).await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::ConsumerExists), "{err}");
    streams.delete_consumer("ORDERS", "c").await.unwrap();
    let err = streams.consumer("ORDERS", "c").await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::ConsumerNotFound), "{err}");
}

/// A fetch waiting on a replicated consumer whose leader steps down still gets the
/// message published after: the old leader ends the pull it held ("409 Leadership
/// Change"), and the fetch pulls again from the new one.
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_consumer_whose_leader_steps_down_under_a_waiting_fetch_delivers_to_it() {
    leader_change_under_a_waiting_fetch(LeaderChange::StepDown).await;
}

/// A fetch waiting on a replicated consumer whose leader's node is killed (SIGKILL)
/// still gets the message published after: the pull the dead node held ends with
/// "409 Leadership Change" (nats-server 2.9.10 and 2.15.1 both send it), and the fetch
/// pulls again from the new leader.
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_consumer_whose_leader_is_killed_under_a_waiting_fetch_delivers_to_it() {
    leader_change_under_a_waiting_fetch(LeaderChange::Kill).await;
}

#[cfg(feature = "nats")]
enum LeaderChange {
    StepDown,
    Kill,
}

/// A fetch of up to 30 s waits on a durable consumer of an R3 stream, its leader
/// changes, one message is published: the fetch returns that message.
#[cfg(feature = "nats")]
async fn leader_change_under_a_waiting_fetch(change: LeaderChange) {
    let mut fx = Fixture::nats_cluster().await;
    let (bus, streams) = fx.streams().await;
    orders(&streams).await;
    let consumer = streams
        .create_consumer("ORDERS", ConsumerConfig::durable("c"))
        .await
        .unwrap();
    let api = |verb: &str| format!("$JS.API.CONSUMER.{verb}.ORDERS.c");
    let js = |reply: Message| -> serde_json::Value {
        serde_json::from_slice(&reply.payload).expect("a JetStream API answer")
    };
    let waiting = tokio::spawn(async move { consumer.fetch(1, Duration::from_secs(30)).await });
    // the pull is held by the consumer's leader
    let leader = within(async {
        loop {
            let info = js(bus.request(api("INFO"), "").await.unwrap());
            if info["num_waiting"].as_u64().unwrap_or(0) > 0 {
                return info["cluster"]["leader"].as_str().unwrap_or("").to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match change {
        LeaderChange::StepDown => {
            let stepped = js(bus.request(api("LEADER.STEPDOWN"), "").await.unwrap());
            assert_eq!(stepped["success"], true, "{stepped}");
        }
        LeaderChange::Kill => {
            let Fixture::Nats { nodes, .. } = &mut fx else {
                unreachable!()
            };
            // nodes n1, n2, n3 in order
            let n: usize = leader.trim_start_matches('n').parse().expect("a node name");
            nodes[n - 1].kill();
        }
    }
    // another node leads the consumer, and the stream takes publishes
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let info = bus.request(api("INFO"), "").await.map(js);
            let led_anew = info.is_ok_and(|i| {
                i.get("error").is_none() && i["cluster"]["leader"].as_str() != Some(&leader)
            });
            if led_anew && streams.info("ORDERS").await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a new consumer leader within 30 s");
    publish_n(&streams, "orders.eu", 1).await;
    let got = within(waiting).await.unwrap().unwrap();
    assert_eq!(
        payloads(&got),
        ["m1"],
        "the message published after the leader changed"
    );
}

/// A replicated stream on a three-node cluster loses a node (SIGKILL) under a durable
/// publisher and a consumer: nothing acknowledged is lost, and the consumer reads it all.
#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_that_loses_a_node_loses_no_acknowledged_message() {
    const N: u64 = 1_000;
    let mut fx = Fixture::nats_cluster().await;
    let (_bus, streams) = fx.streams().await;
    orders(&streams).await;
    let mut config = ConsumerConfig::durable("billing");
    config.ack_wait = Duration::from_secs(2);
    let consumer = streams.create_consumer("ORDERS", config).await.unwrap();
    let mut acked = std::collections::BTreeSet::new();
    let mut retries = 0;
    for i in 1..=N {
        if i == N / 3 {
            let Fixture::Nats { nodes, .. } = &mut fx else {
                unreachable!()
            };
            nodes[1].kill();
            println!(
                "node n2 killed after {} acknowledged publishes",
                acked.len()
            );
        }
        let once = Publish {
            msg_id: Some(format!("order-{i}")),
            ..Publish::default()
        };
        // a publish in flight when the node died is sent again, with the same id
        let mut attempts = 0;
        loop {
            attempts += 1;
            let sent = streams
                .publish_with("orders.eu", i.to_string(), once.clone())
                .await;
            match sent {
                Ok(ack) => match ack.await {
                    Ok(_) => {
                        acked.insert(i);
                        break;
                    }
                    Err(e) if attempts < 300 => {
                        retries += 1;
                        tracing::debug!("publish {i} again: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("publish {i} failed 300 times: {e}"),
                },
                Err(e) if attempts < 300 => {
                    retries += 1;
                    tracing::debug!("publish {i} again: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("publish {i} failed 300 times: {e}"),
            }
        }
    }
    let mut read = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read.len() < acked.len() && std::time::Instant::now() < deadline {
        match consumer.fetch(100, Duration::from_secs(1)).await {
            Ok(batch) => {
                for d in batch {
                    read.insert(
                        String::from_utf8_lossy(&d.message.payload)
                            .parse::<u64>()
                            .unwrap(),
                    );
                    d.ack().await.unwrap();
                }
            }
            Err(e) => tracing::debug!("fetch again: {e}"),
        }
    }
    let info = streams.info("ORDERS").await.unwrap();
    let lost = acked.difference(&read).count();
    println!(
        "R3 stream, one of three nodes killed: publishes acknowledged {} of {N} ({retries} sent again), \
         stored {}, read back {}; acknowledged but lost: {lost}",
        acked.len(),
        info.state.msgs,
        read.len()
    );
    assert_eq!(acked.len() as u64, N);
    assert_eq!(info.state.msgs, N, "each stored once");
    assert_eq!(lost, 0, "acknowledged but lost");
}
