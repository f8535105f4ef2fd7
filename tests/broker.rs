//! The courier broker: limits, slow consumers, bad peers, restarts.

mod bus;
mod common;

use std::time::Duration;

use bus::next;
use common::{RawReader, raw_peer, wait_for};
use courier::bus::{Broker, BrokerConfig, Bus, BusError, ConnectOptions, Event};
use courier::connection::FrameSender;
use courier::frame::{Connect, Frame, GoAway, Publish, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A [`raw_peer`] connected to the broker, past the hello: it reads only when told to.
async fn raw_bus_peer(broker: &Broker) -> (RawReader, FrameSender) {
    let (reader, sender) = raw_peer(TcpStream::connect(broker.local_addr()).await.unwrap());
    sender
        .send(Frame::Connect(Connect {
            name: "raw".into(),
            ..Connect::default()
        }))
        .await
        .unwrap();
    (reader, sender)
}

/// A raw peer subscribed to `subject` (sid 1) that reads only when told to.
async fn raw_subscriber(broker: &Broker, subject: &'static str) -> RawReader {
    let (reader, sender) = raw_bus_peer(broker).await;
    sender
        .send(Frame::Sub(Subscribe {
            sid: 1,
            subject: subject.into(),
            queue: "".into(),
        }))
        .await
        .unwrap();
    reader
}

async fn next_event(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event within 10 s")
        .expect("event channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_that_never_reads_is_cut_off_within_the_memory_bound() {
    const LIMIT: usize = 256 * 1024;
    const N: u32 = 20_000;
    let mut config = BrokerConfig::default();
    config.connection.max_queued_bytes = LIMIT;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let addr = broker.local_addr().to_string();

    // The stuck peer subscribes and never reads its socket again.
    let mut stuck_reader = raw_subscriber(&broker, "feed").await;
    let healthy_bus = Bus::connect(addr.clone()).await.unwrap();
    let mut healthy = healthy_bus.subscribe("feed").await.unwrap();
    let publisher = Bus::connect(addr).await.unwrap();
    publisher.flush().await.unwrap();
    // Two subscriptions to the feed, and each client's inbox.
    assert_eq!(broker.stats().subscriptions, 4);

    let reader = tokio::spawn(async move {
        for i in 0..N {
            let m = next(&mut healthy).await;
            assert_eq!(
                m.payload[..4],
                i.to_be_bytes(),
                "the healthy subscriber misses nothing"
            );
        }
    });
    let mut peak = 0;
    for i in 0..N {
        let mut payload = vec![0u8; 1024];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publisher.publish("feed", payload).await.unwrap();
        if i % 100 == 0 {
            peak = peak.max(broker.stats().queued_bytes);
            // Paced so that the healthy subscriber (whose queue has the same limit)
            // keeps up: its round trip returns once what was queued before is written.
            publisher.flush().await.unwrap();
            healthy_bus.flush().await.unwrap();
        }
    }
    publisher.flush().await.unwrap();
    reader.await.unwrap();

    let stats = broker.stats();
    assert_eq!(stats.slow_consumers, 1);
    // Two connections receive messages; each may hold at most LIMIT queued bytes.
    assert!(
        peak <= 2 * LIMIT,
        "queued bytes peaked at {peak}, bound {}",
        2 * LIMIT
    );
    wait_for("the stuck connection to be removed", || {
        broker.stats().connections == 2
    })
    .await;
    // The reader task dropped the healthy subscriber (an unsubscribe, confirmed by the
    // flush's round trip): only the two clients' inboxes are left.
    healthy_bus.flush().await.unwrap();
    assert_eq!(
        broker.stats().subscriptions,
        2,
        "the stuck peer's subscription is gone"
    );

    // What the stuck peer finds when it finally reads: part of the feed, then the end of
    // the connection (the go-away when it could still be written, or the stream ending).
    let mut delivered = 0u32;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stuck_reader.next()).await {
            Ok(Some(Ok(Frame::Msg(_)))) => delivered += 1,
            Ok(Some(Ok(Frame::Connect(_)))) => {}
            Ok(end) => break end,
            Err(_) => panic!("the stuck peer's connection was never closed"),
        }
    };
    eprintln!("stuck peer: {delivered} messages, then {end:?}; broker queue peak {peak} bytes");
    assert!(
        delivered < N,
        "cut off before the end: got {delivered} of {N}"
    );
    match end {
        // The go-away, when the writer was between writes…
        Some(Ok(Frame::GoAway(g))) => assert_eq!(g.code, GoAway::SLOW_CONSUMER, "{}", g.message),
        // …or the stream cut mid-frame (or, rarely, exactly at a frame boundary).
        Some(Err(_)) | None => {}
        Some(Ok(other)) => panic!("unexpected frame after the feed: {other:?}"),
    }
}

#[tokio::test]
async fn a_client_cut_off_as_slow_consumer_sees_why_and_reconnects() {
    let mut config = BrokerConfig::default();
    // Smaller than a burst of ten 1 KiB messages, routed before the writer runs; no
    // grace: a full connection is cut at once.
    config.connection.max_queued_bytes = 4 * 1024;
    config.slow_consumer_grace = Duration::ZERO;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let addr = broker.local_addr().to_string();
    let mut options = ConnectOptions::default();
    options.reconnect.initial = Duration::from_millis(10);
    let victim = Bus::connect_with(addr.clone(), options).await.unwrap();
    let mut events = victim.events();
    let mut sub = victim.subscribe("burst").await.unwrap();
    let publisher = Bus::connect(addr).await.unwrap();
    for _ in 0..50 {
        publisher.publish("burst", vec![0u8; 1024]).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let event = next_event(&mut events).await;
    match &event {
        Event::Disconnected { reason } => {
            assert!(reason.contains("slow consumer"), "{reason}");
            assert!(reason.contains("max_queued_bytes"), "{reason}");
        }
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert_eq!(broker.stats().slow_consumers, 1);
    // It comes back, and its subscription with it.
    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    while tokio::time::timeout(Duration::from_millis(10), sub.next())
        .await
        .is_ok()
    {}
    publisher.publish("burst", "after").await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"after");
}

#[tokio::test]
async fn a_subscriber_briefly_behind_is_paced_within_the_grace_not_cut() {
    let mut config = BrokerConfig::default();
    // The same burst as above, with the default grace: the publisher waits for room.
    config.connection.max_queued_bytes = 4 * 1024;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let addr = broker.local_addr().to_string();
    let subscriber = Bus::connect(addr.clone()).await.unwrap();
    let mut events = subscriber.events();
    let mut sub = subscriber.subscribe("burst").await.unwrap();
    let publisher = Bus::connect(addr).await.unwrap();
    for i in 0..2_000u32 {
        publisher
            .publish("burst", [i.to_be_bytes().as_slice(), &[0u8; 1020]].concat())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    for i in 0..2_000u32 {
        let m = next(&mut sub).await;
        assert_eq!(m.payload[..4], i.to_be_bytes(), "message {i} in order");
    }
    assert_eq!(broker.stats().slow_consumers, 0);
    assert!(
        events.try_recv().is_err(),
        "no disconnect, no slow-consumer event"
    );
}

#[tokio::test]
async fn a_publisher_is_paced_to_a_subscriber_that_reads_slowly() {
    let mut config = BrokerConfig::default();
    config.pace_queued_bytes = 64 * 1024;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let mut slow_reader = raw_subscriber(&broker, "paced").await;
    wait_for("the raw subscription", || broker.stats().subscriptions == 1).await;
    let publisher = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let publishing = tokio::spawn(async move {
        for i in 0..20_000u32 {
            let payload = [i.to_be_bytes().as_slice(), &[0u8; 1020]].concat();
            publisher.publish("paced", payload).await.unwrap();
        }
        publisher.flush().await.unwrap();
    });
    // The reader does not read yet: the queue grows to the pace mark, and there the
    // publisher is held (within the grace), instead of queueing all 20 MB (beyond what the sockets' buffers hold).
    wait_for("the queue to reach the pace mark", || {
        broker.stats().queued_bytes >= 64 * 1024
    })
    .await;
    // Not a timing assertion: time in which an unpaced publisher would queue everything.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let peak = broker.stats().queued_bytes;
    assert!(!publishing.is_finished(), "the publisher is held back");
    let mut i = 0u32;
    while i < 20_000 {
        match slow_reader.next().await {
            Some(Ok(Frame::Msg(m))) => assert_eq!(m.payload[..4], i.to_be_bytes()),
            Some(Ok(Frame::Connect(_))) => continue,
            other => panic!("message {i}: {other:?}"),
        }
        i += 1;
    }
    publishing.await.unwrap();
    assert_eq!(broker.stats().slow_consumers, 0);
    assert!(
        peak <= 64 * 1024 + 256 * 1024,
        "{peak} bytes queued, far past the 64 KiB pace mark"
    );
}

#[tokio::test]
async fn garbage_bytes_close_only_that_connection() {
    let broker = Broker::bind("127.0.0.1:0").await.unwrap();
    let addr = broker.local_addr().to_string();
    let bus = Bus::connect(addr.clone()).await.unwrap();
    let mut sub = bus.subscribe("alive").await.unwrap();

    let mut garbage = TcpStream::connect(broker.local_addr()).await.unwrap();
    garbage
        .write_all(b"\x00\x00\x00\x05\x07\x99hello, this is not a frame")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut answer))
        .await
        .expect("the broker closes the garbage connection")
        .ok();
    assert!(
        String::from_utf8_lossy(&answer).contains("unsupported protocol version"),
        "the go-away names the problem: {:?}",
        String::from_utf8_lossy(&answer)
    );

    bus.publish("alive", "still").await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"still");
    wait_for("the garbage connection to be removed", || {
        broker.stats().connections == 1
    })
    .await;
}

#[tokio::test]
async fn a_publish_over_the_limit_from_a_raw_peer_closes_its_connection() {
    let mut config = BrokerConfig::default();
    config.max_payload = 1024;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let (mut reader, sender) = raw_bus_peer(&broker).await;
    assert!(matches!(reader.next().await, Some(Ok(Frame::Connect(c))) if c.max_payload == 1024));
    sender
        .send(Frame::Pub(Publish {
            subject: "big".into(),
            payload: vec![0u8; 2048].into(),
            ..Publish::default()
        }))
        .await
        .unwrap();
    match reader.next().await {
        Some(Ok(Frame::GoAway(g))) => {
            assert_eq!(g.code, GoAway::LIMIT_EXCEEDED);
            assert!(g.message.contains("max_payload"), "{}", g.message);
        }
        other => panic!("expected a go-away, got {other:?}"),
    }
    // A client learns the limit on connect and refuses locally.
    let bus = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let err = bus.publish("big", vec![0u8; 2048]).await.unwrap_err();
    assert!(
        matches!(err, BusError::PayloadTooLarge { limit: 1024, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn after_a_broker_restart_the_client_reconnects_and_its_subscriptions_work() {
    let broker = Broker::bind("127.0.0.1:0").await.unwrap();
    let addr = broker.local_addr();
    let mut options = ConnectOptions::default();
    options.reconnect.initial = Duration::from_millis(10);
    options.reconnect.max = Duration::from_millis(50);
    let bus = Bus::connect_with(addr.to_string(), options).await.unwrap();
    let mut events = bus.events();
    let mut plain = bus.subscribe("restart.plain").await.unwrap();
    let mut grouped = bus.queue_subscribe("restart.work", "g").await.unwrap();

    broker.shutdown().await;
    match next_event(&mut events).await {
        Event::Disconnected { reason } => assert!(reason.contains("shutting down"), "{reason}"),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    // Published while disconnected: kept in the reconnect buffer.
    bus.publish("restart.plain", "while away").await.unwrap();
    let err = bus.flush().await.unwrap_err();
    assert!(matches!(err, BusError::NotConnected { .. }), "{err}");

    let broker = Broker::bind(addr).await.unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    // The publisher learns that what it published into the gap was sent late.
    match next_event(&mut events).await {
        Event::PublishedWhileDisconnected { publishes, bytes } => {
            assert_eq!(publishes, 1);
            assert!(bytes > 10, "{bytes}");
        }
        other => panic!("expected the replay to be reported, got {other:?}"),
    }
    assert_eq!(&next(&mut plain).await.payload[..], b"while away");

    let other = Bus::connect(addr.to_string()).await.unwrap();
    other.publish("restart.plain", "after").await.unwrap();
    assert_eq!(&next(&mut plain).await.payload[..], b"after");
    other.publish("restart.work", "job").await.unwrap();
    assert_eq!(&next(&mut grouped).await.payload[..], b"job");
    // Request/reply works again too (the inbox was restored).
    let mut service = other.subscribe("restart.echo").await.unwrap();
    let responder = other.clone();
    tokio::spawn(async move {
        while let Some(m) = service.next().await {
            responder
                .publish(m.reply.unwrap(), m.payload)
                .await
                .unwrap();
        }
    });
    assert_eq!(
        &bus.request("restart.echo", "hi").await.unwrap().payload[..],
        b"hi"
    );
    drop(broker);
}

#[tokio::test]
async fn publishes_while_disconnected_are_bounded_by_the_reconnect_buffer() {
    let broker = Broker::bind("127.0.0.1:0").await.unwrap();
    let mut options = ConnectOptions::default();
    options.reconnect_buffer = 1000;
    let bus = Bus::connect_with(broker.local_addr().to_string(), options)
        .await
        .unwrap();
    let mut events = bus.events();
    broker.shutdown().await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    bus.publish("x", vec![0u8; 600]).await.unwrap();
    let err = bus.publish("x", vec![0u8; 600]).await.unwrap_err();
    assert!(
        matches!(err, BusError::ReconnectBufferFull { limit: 1000, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("ConnectOptions::reconnect_buffer"),
        "{err}"
    );
}

#[tokio::test]
async fn a_token_is_required_when_the_broker_has_one() {
    let mut config = BrokerConfig::default();
    config.token = Some("s3cret".into());
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let addr = broker.local_addr().to_string();

    let err = Bus::connect(addr.clone()).await.unwrap_err();
    assert!(err.to_string().contains("authorization required"), "{err}");
    let mut options = ConnectOptions::default();
    options.token = Some("wrong".into());
    let err = Bus::connect_with(addr.clone(), options.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("wrong token"), "{err}");
    options.token = Some("s3cret".into());
    let bus = Bus::connect_with(addr, options).await.unwrap();
    bus.flush().await.unwrap();
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_naming_it() {
    let mut config = BrokerConfig::default();
    config.max_connections = 1;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let addr = broker.local_addr().to_string();
    let first = Bus::connect(addr.clone()).await.unwrap();
    let err = Bus::connect(addr).await.unwrap_err();
    assert!(err.to_string().contains("max_connections"), "{err}");
    first.flush().await.unwrap();
}

#[tokio::test]
async fn subscriptions_over_the_limit_are_refused_and_the_connection_stays() {
    let mut config = BrokerConfig::default();
    config.max_subscriptions = 3; // the inbox is one of them
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let bus = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let mut a = bus.subscribe("a").await.unwrap();
    let _b = bus.subscribe("b").await.unwrap();
    let err = bus.subscribe("c").await.unwrap_err();
    assert!(matches!(err, BusError::SubscriptionRefused { .. }), "{err}");
    assert!(err.to_string().contains("max_subscriptions"), "{err}");
    bus.publish("a", "still here").await.unwrap();
    assert_eq!(&next(&mut a).await.payload[..], b"still here");
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_even_when_a_peer_stopped_reading() {
    let mut config = BrokerConfig::default();
    config.connection.max_queued_bytes = 64 * 1024 * 1024;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let _stuck_reader = raw_subscriber(&broker, "feed").await;
    let publisher = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    // Enough to fill the socket buffers: the stuck peer's writer is blocked mid-write.
    for _ in 0..200 {
        publisher
            .publish("feed", vec![0u8; 64 * 1024])
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), broker.shutdown())
        .await
        .expect("shutdown returns despite the stuck peer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_briefly_behind_on_many_small_messages_is_not_a_slow_consumer() {
    // 500,000 small frames (~20 MB) are far below the 64 MiB byte limit: however many
    // frames that is, the byte limit decides, not a frame count. (Pacing, which would
    // hold the publisher at 1 MiB until this reader reads, is set to the limit here.)
    const N: u32 = 500_000;
    let mut config = BrokerConfig::default();
    config.pace_queued_bytes = config.connection.max_queued_bytes;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let mut paused_reader = raw_subscriber(&broker, "small").await;
    let publisher = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    publisher.flush().await.unwrap();
    for i in 0..N {
        publisher
            .publish("small", i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    assert_eq!(broker.stats().slow_consumers, 0);
    // Now it reads, and gets everything in order.
    let mut expected = 0u32;
    while expected < N {
        match paused_reader.next().await {
            Some(Ok(Frame::Msg(m))) => {
                assert_eq!(m.payload[..], expected.to_be_bytes());
                expected += 1;
            }
            Some(Ok(Frame::Connect(_))) => {}
            other => panic!("after {expected} messages: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_broker_refuses_a_payload_limit_its_frames_cannot_carry_naming_both_settings() {
    let mut config = BrokerConfig::default();
    config.max_payload = 16 * 1024 * 1024; // the frame limit stays at its default
    let error = Broker::bind_with("127.0.0.1:0", config.clone())
        .await
        .expect_err("a 16 MiB payload limit cannot travel in the default frames");
    let text = error.to_string();
    assert!(text.contains("max_payload"), "{text}");
    assert!(text.contains("max_frame_len"), "{text}");

    // Sized together, the same payload limit works end to end.
    let broker = Broker::bind_with("127.0.0.1:0", config.with_max_payload(16 * 1024 * 1024))
        .await
        .unwrap();
    let mut options = ConnectOptions::default();
    options.connection.max_frame_len = 17 * 1024 * 1024;
    let bus = Bus::connect_with(broker.local_addr().to_string(), options)
        .await
        .unwrap();
    let mut sub = bus.subscribe("big").await.unwrap();
    bus.publish("big", vec![7u8; 12 * 1024 * 1024])
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.payload.len(), 12 * 1024 * 1024);
}

#[tokio::test]
async fn a_subscriber_is_sent_no_frame_over_the_limit_it_stated_and_stays_connected() {
    let broker = Broker::bind("127.0.0.1:0").await.unwrap();
    let addr = broker.local_addr().to_string();
    let mut options = ConnectOptions::default();
    options.connection.max_frame_len = 64 * 1024;
    let small = Bus::connect_with(addr.clone(), options).await.unwrap();
    let mut events = small.events();
    let mut sub = small.subscribe("feed").await.unwrap();
    let publisher = Bus::connect(addr).await.unwrap();

    publisher
        .publish("feed", vec![1u8; 100 * 1024])
        .await
        .unwrap();
    publisher.publish("feed", "small").await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"small");
    assert!(small.is_connected());
    assert!(
        events.try_recv().is_err(),
        "no disconnect: the large message was held back, not sent to a peer that refuses it"
    );
    let stats = broker.stats();
    assert_eq!(stats.messages_too_large, 1, "{stats:?}");
}

#[tokio::test]
async fn a_publisher_is_held_to_the_limits_the_broker_stated() {
    let mut config = BrokerConfig::default();
    config.max_payload = 64 * 1024;
    config.connection.max_frame_len = 128 * 1024;
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let addr = broker.local_addr().to_string();
    let publisher = Bus::connect(addr.clone()).await.unwrap(); // its own frame limit is 8 MiB
    let mut events = publisher.events();
    let subscriber = Bus::connect(addr).await.unwrap();
    let mut sub = subscriber.subscribe("h").await.unwrap();

    // A small payload under 200 KiB of headers: over the broker's payload limit (headers
    // count) and its frame limit. Refused by the client, naming the broker's limit.
    let heavy = courier::bus::Message::new("h", "x").with_header("Big", vec![b'a'; 200 * 1024]);
    let error = publisher.publish_message(heavy).await.unwrap_err();
    assert!(
        matches!(&error, BusError::PayloadTooLarge { limit: 65_536, .. }),
        "{error}"
    );
    // Refused here, not by the broker: the connection is still up and in use.
    publisher.publish("h", "after").await.unwrap();
    assert_eq!(&next(&mut sub).await.payload[..], b"after");
    assert!(events.try_recv().is_err(), "no disconnect");
}

/// The broker over in-memory connections runs on tokio's paused clock: a peer that never
/// sends its connect is told why at the handshake timeout, with no real time passing.
#[tokio::test(start_paused = true)]
async fn a_peer_silent_past_the_handshake_timeout_is_told_why_on_a_paused_clock() {
    use courier::transport::{Connector, memory};
    let (listener, connector) = memory::listen();
    let broker = Broker::serve(listener, BrokerConfig::default()).unwrap();
    let (io, _) = connector.connect().await.unwrap();
    let (mut reader, _sender) = raw_peer(io);
    let started = tokio::time::Instant::now();
    let Some(Ok(Frame::GoAway(g))) = reader.next().await else {
        panic!("expected a go-away");
    };
    assert_eq!(g.code, GoAway::PROTOCOL_ERROR);
    assert!(g.message.contains("handshake_timeout"), "{}", g.message);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(5),
        "the paused clock's 5 s"
    );
    broker.shutdown().await;
}

/// A raw peer's go-away, after it published `publish` to a broker with `config`.
async fn go_away_after_publishing(config: BrokerConfig, publish: Publish) -> GoAway {
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let (mut reader, sender) = raw_bus_peer(&broker).await;
    assert!(matches!(reader.next().await, Some(Ok(Frame::Connect(_)))));
    sender.send(Frame::Pub(publish)).await.unwrap();
    match reader.next().await {
        Some(Ok(Frame::GoAway(g))) => g,
        other => panic!("expected a go-away, got {other:?}"),
    }
}

#[tokio::test]
async fn headers_count_against_max_payload_as_in_nats() {
    let mut config = BrokerConfig::default();
    config.max_payload = 1024;
    let mut headers = courier::Metadata::new();
    headers.insert("Big", vec![b'h'; 2000]);
    let g = go_away_after_publishing(
        config.clone(),
        Publish {
            subject: "h".into(),
            headers: headers.clone(),
            ..Publish::default()
        },
    )
    .await;
    assert_eq!(g.code, GoAway::LIMIT_EXCEEDED);
    assert!(
        g.message.contains("payload and headers of 2011 bytes"),
        "{}",
        g.message
    );
    // A client counts them too, before sending.
    let broker = Broker::bind_with("127.0.0.1:0", config).await.unwrap();
    let bus = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let message = courier::bus::Message::new("h", "").with_header("Big", vec![b'h'; 2000]);
    let err = bus.publish_message(message).await.unwrap_err();
    assert!(
        matches!(
            err,
            BusError::PayloadTooLarge {
                size: 2011,
                limit: 1024,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn the_largest_publish_the_broker_accepts_is_delivered_not_lost() {
    // Subject and reply at their 4,096-byte maximum, payload and headers at max_payload:
    // its delivery is 8 bytes larger than the publish, and must still fit the frames.
    let broker = Broker::bind("127.0.0.1:0").await.unwrap();
    let max = BrokerConfig::default().max_payload;
    let subject = "s".repeat(4096);
    let mut headers = courier::Metadata::new();
    headers.insert("H", vec![b'h'; 100]);
    let payload_len = max - headers.wire_len();
    let subscriber = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let mut sub = subscriber.subscribe(subject.clone()).await.unwrap();
    let (mut reader, sender) = raw_bus_peer(&broker).await;
    assert!(matches!(reader.next().await, Some(Ok(Frame::Connect(_)))));
    let publish = Publish {
        subject: subject.clone().into(),
        reply: "r".repeat(4096).into(),
        headers,
        payload: vec![0u8; payload_len].into(),
    };
    sender.send(Frame::Pub(publish.clone())).await.unwrap();
    let got = next(&mut sub).await;
    assert_eq!(got.payload.len(), payload_len);
    assert_eq!(broker.stats().messages_too_large, 0);

    // One byte more is refused at publish, naming the limit, not accepted and dropped.
    let over = Publish {
        payload: vec![0u8; payload_len + 1].into(),
        ..publish
    };
    sender.send(Frame::Pub(over)).await.unwrap();
    match reader.next().await {
        Some(Ok(Frame::GoAway(g))) => {
            assert_eq!(g.code, GoAway::LIMIT_EXCEEDED);
            assert!(g.message.contains("max_payload"), "{}", g.message);
        }
        other => panic!("expected a go-away, got {other:?}"),
    }
}

/// A publish to `subject` whose payload is `i`, big-endian, then `extra` zero bytes.
fn numbered(subject: &'static str, i: u32, extra: usize) -> Frame {
    let mut payload = i.to_be_bytes().to_vec();
    payload.resize(4 + extra, 0);
    Frame::Pub(Publish {
        subject: subject.into(),
        payload: payload.into(),
        ..Publish::default()
    })
}

#[tokio::test]
async fn messages_published_just_before_the_publisher_leaves_are_all_delivered() {
    let broker = Broker::bind("127.0.0.1:0").await.unwrap();
    let subscriber = Bus::connect(broker.local_addr().to_string()).await.unwrap();
    let mut sub = subscriber.subscribe("last.words").await.unwrap();
    subscriber.flush().await.unwrap();
    // A raw peer: its publishes and the end of its stream arrive together, so the
    // broker reads the end while the messages of its last read are still to be sent.
    let (_reader, sender) = raw_bus_peer(&broker).await;
    for i in 0..500 {
        sender.send(numbered("last.words", i, 0)).await.unwrap();
    }
    sender.close_within(Duration::from_secs(10)).await;
    for i in 0..500u32 {
        assert_eq!(
            next(&mut sub).await.payload[..4],
            i.to_be_bytes(),
            "message {i}"
        );
    }
}

#[tokio::test]
async fn publishes_sent_unbatched_keep_their_place_among_batched_ones() {
    let broker = Broker::bind("127.0.0.1:0").await.unwrap();
    let addr = broker.local_addr().to_string();
    // One subscription sees every message, in publish order.
    let subscriber = Bus::connect(addr.clone()).await.unwrap();
    let mut all = subscriber.subscribe("order.*").await.unwrap();
    // Forty more on `order.wide`: a publish there reaches more subscriptions than the
    // broker batches, and goes out unbatched. So does a message over 16 KiB.
    let crowd = Bus::connect(addr.clone()).await.unwrap();
    let mut wide = Vec::new();
    for _ in 0..40 {
        wide.push(crowd.subscribe("order.wide").await.unwrap());
    }
    subscriber.flush().await.unwrap();
    crowd.flush().await.unwrap();
    let (_reader, sender) = raw_bus_peer(&broker).await;
    const N: u32 = 3_000;
    for i in 0..N {
        let frame = match i % 10 {
            3 | 6 => numbered("order.wide", i, 16),
            7 => numbered("order.small", i, 20 * 1024),
            _ => numbered("order.small", i, 16),
        };
        sender.send(frame).await.unwrap();
    }
    for i in 0..N {
        let m = next(&mut all).await;
        assert_eq!(m.payload[..4], i.to_be_bytes(), "message {i} in its place");
    }
    for sub in &mut wide {
        let first = next(sub).await;
        assert_eq!(first.payload[..4], 3u32.to_be_bytes());
    }
}
