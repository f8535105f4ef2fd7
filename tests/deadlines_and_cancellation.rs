//! Deadlines, cancellation, backpressure and keepalive, on tokio's paused clock.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    Event, Transport, answer, args, lab, lab_client, no_options, raw_peer, serve_lab, timeout,
};
use courier::frame::{Frame, Request, Status};
use courier::transport::{Connector, PeerAddr, memory};
use courier::{Client, ClientConfig, RpcError, Server, ServerConfig};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn a_call_past_its_deadline_times_out_and_its_handler_is_stopped() {
    let (client, mut probe) = lab_client(Transport::Memory, ServerConfig::default()).await;
    let started = Instant::now();
    let err = client
        .call(
            "Lab.sleep",
            args(&(1u64, 60_000u64)),
            &timeout(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::Timeout { method, timeout } if method == "Lab.sleep" && *timeout == Duration::from_millis(100)),
        "{err}"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(probe.next().await, Event::Started(1));
    assert_eq!(probe.next().await, Event::Aborted(1));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "handler ran on after the deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn the_server_stops_a_handler_at_the_deadline_even_without_a_cancel() {
    // Called with a raw connection that never sends a cancel: only the server's own
    // deadline can stop the handler.
    let (lab, mut probe) = lab();
    let server = Server::new(ServerConfig::default()).add_service(lab);
    let (a, b) = tokio::io::duplex(4096);
    tokio::spawn(async move { server.serve_connection(b, PeerAddr::Memory(9)).await });
    let (mut reader, sender) = raw_peer(a);
    let request = Request {
        id: 1,
        timeout: Some(Duration::from_millis(250)),
        method: "Lab.sleep".into(),
        metadata: Default::default(),
        payload: args(&(5u64, 60_000u64)),
    };
    let started = Instant::now();
    sender.send(Frame::Request(request)).await.unwrap();
    assert_eq!(probe.next().await, Event::Started(5));
    assert_eq!(probe.next().await, Event::Aborted(5));
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    let Some(Ok(Frame::Response(response))) = reader.next().await else {
        panic!("no answer")
    };
    assert_eq!(response.status, Status::DEADLINE_EXCEEDED);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_call_aborts_its_handler_on_the_server() {
    let (client, mut probe) = lab_client(Transport::Memory, ServerConfig::default()).await;
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call("Lab.hold", args(&7u64), &timeout(Duration::from_secs(3600)))
                .await
        }
    });
    assert_eq!(probe.next().await, Event::Started(7));
    call.abort(); // drops the call's future
    assert_eq!(probe.next().await, Event::Aborted(7));
    // The connection is still good.
    let out = client
        .call("Lab.double", args(&2u64), &timeout(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(answer::<u64>(&out), 4);
}

#[tokio::test(start_paused = true)]
async fn the_call_timeout_overrides_the_client_default() {
    let (server, _probe) = serve_lab(Transport::Memory, ServerConfig::default()).await;
    let mut config = ClientConfig::default();
    config.default_timeout = Duration::from_millis(50);
    let client = server.client(config).await;

    let started = Instant::now();
    let err = client
        .call("Lab.hold", args(&1u64), &no_options())
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }));
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(50),
        "client default applies"
    );

    let started = Instant::now();
    let err = client
        .call("Lab.hold", args(&2u64), &timeout(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }));
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "the call's own timeout wins"
    );
}

#[tokio::test(start_paused = true)]
async fn at_max_calls_in_flight_the_server_stops_reading_instead_of_failing_calls() {
    let mut config = ServerConfig::default();
    config.max_calls_in_flight = 2;
    let (client, mut probe) = lab_client(Transport::Memory, config).await;
    let mut calls = tokio::task::JoinSet::new();
    for tag in 0..5u64 {
        let client = client.clone();
        calls.spawn(async move {
            client
                .call("Lab.hold", args(&tag), &timeout(Duration::from_secs(60)))
                .await
        });
    }
    let mut started = 0;
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_secs(1), probe.events.recv()).await
    {
        assert!(matches!(event, Event::Started(_)));
        started += 1;
    }
    assert_eq!(started, 2, "only max_calls_in_flight handlers run at once");
    probe.release(5);
    while let Some(result) = calls.join_next().await {
        result
            .unwrap()
            .expect("every call is answered once there is room");
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_fails_pending_calls_at_the_keepalive_timeout() {
    // A "server" that accepts and then never sends a byte (a dead host).
    let (mut listener, connector) = memory::listen();
    tokio::spawn(async move {
        use courier::transport::Listener;
        let (_silent, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let mut config = ClientConfig::default();
    config.connection.keepalive_interval = Duration::from_secs(1);
    config.connection.keepalive_timeout = Duration::from_secs(3);
    config.wait_for_connection = false;
    let client = Client::connect(connector, config).await.unwrap();

    let started = Instant::now();
    let err = client
        .call(
            "Lab.double",
            args(&1u64),
            &timeout(Duration::from_secs(600)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::ConnectionClosed { reason } if reason.contains("keepalive")),
        "{err}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_secs(4),
        "failed after {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_quiet_but_live_connection_survives_many_keepalive_periods() {
    let mut config = ServerConfig::default();
    config.connection.keepalive_interval = Duration::from_secs(1);
    config.connection.keepalive_timeout = Duration::from_secs(3);
    let (server, _probe) = serve_lab(Transport::Memory, config).await;
    let mut config = ClientConfig::default();
    config.connection.keepalive_interval = Duration::from_secs(1);
    config.connection.keepalive_timeout = Duration::from_secs(3);
    let client = server.client(config).await;

    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(client.is_connected());
    let out = client
        .call(
            "Lab.echo",
            Bytes::from_static(b"still here"),
            &timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert_eq!(&out[..], b"still here");
}

#[tokio::test(start_paused = true)]
async fn while_disconnected_a_fail_fast_client_fails_at_once_and_a_waiting_one_at_its_deadline() {
    let (listener, connector) = memory::listen();
    drop(listener); // nobody listens
    let mut fail_fast = ClientConfig::default();
    fail_fast.wait_for_connection = false;
    let client = Client::connect_lazy(connector.clone(), fail_fast);
    tokio::task::yield_now().await;
    let started = Instant::now();
    let err = client
        .call("Lab.double", args(&1u64), &timeout(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::NotConnected { .. }), "{err}");
    assert_eq!(started.elapsed(), Duration::ZERO);

    assert!(connector.connect().await.is_err(), "the listener is gone");
    let client = Client::connect_lazy(connector, ClientConfig::default());
    let err = client
        .call("Lab.double", args(&1u64), &timeout(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::NotConnected { reason, .. } if reason.contains("deadline")),
        "{err}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_call_past_its_deadline_sends_the_server_a_cancel_and_each_call_ends_at_its_own_deadline()
{
    // A raw server that never answers: only the client's deadlines end the calls.
    let (mut listener, connector) = memory::listen();
    let server = tokio::spawn(async move {
        use courier::transport::Listener;
        let (io, _) = listener.accept().await.unwrap();
        let (mut reader, _sender) = raw_peer(io);
        let mut cancels = Vec::new();
        let mut requests = Vec::new();
        while cancels.len() < 3 {
            match reader.next().await {
                Some(Ok(Frame::Request(r))) => requests.push((r.id, r.timeout)),
                Some(Ok(Frame::Cancel { id })) => cancels.push((id, Instant::now())),
                other => panic!("unexpected {other:?}"),
            }
        }
        (requests, cancels)
    });
    let client = Client::connect(connector, ClientConfig::default())
        .await
        .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = [300u64, 100, 200]
        .into_iter()
        .map(|ms| {
            let client = client.clone();
            tokio::spawn(async move {
                let result = client
                    .call("Lab.hold", args(&ms), &timeout(Duration::from_millis(ms)))
                    .await;
                (ms, result, Instant::now())
            })
        })
        .collect();
    for call in calls {
        let (ms, result, ended) = call.await.unwrap();
        assert!(
            matches!(&result, Err(RpcError::Timeout { timeout, .. }) if *timeout == Duration::from_millis(ms)),
            "{result:?}"
        );
        assert_eq!(
            ended - started,
            Duration::from_millis(ms),
            "the {ms} ms call"
        );
    }
    let (requests, cancels) = server.await.unwrap();
    assert_eq!(requests.len(), 3);
    for (id, at) in cancels {
        let (_, told) = requests.iter().find(|(r, _)| *r == id).unwrap();
        assert_eq!(
            Some(at - started),
            *told,
            "call {id} cancelled at its deadline"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn calls_that_find_the_send_queue_full_wait_for_room_and_are_then_all_answered() {
    // A server that reads nothing until told to: 200 calls of 1,000 bytes are more than
    // the in-memory stream (64 KiB) and the client's queue (10,000 bytes) hold, so some
    // find no room and wait for it.
    const CALLS: usize = 200;
    let (mut listener, connector) = memory::listen();
    let (go, told) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        use courier::transport::Listener;
        let (io, _) = listener.accept().await.unwrap();
        told.await.unwrap();
        let (mut reader, sender) = raw_peer(io);
        for _ in 0..CALLS {
            let Some(Ok(Frame::Request(request))) = reader.next().await else {
                panic!("expected a request");
            };
            sender
                .send(Frame::Response(courier::frame::Response {
                    id: request.id,
                    status: Status::OK,
                    message: Default::default(),
                    payload: request.payload,
                }))
                .await
                .unwrap();
        }
        reader
    });
    let mut config = ClientConfig::default();
    config.connection.max_queued_bytes = 10_000;
    let client = Client::connect(connector, config).await.unwrap();
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let sent = Bytes::from(vec![i as u8; 1000]);
                let got = client
                    .call("Lab.echo", sent.clone(), &timeout(Duration::from_secs(5)))
                    .await;
                (sent, got)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let ended = calls.iter().filter(|call| call.is_finished()).count();
    println!("calls ended while the server read nothing: {ended}");
    assert_eq!(
        ended, 0,
        "a call that found no room failed instead of waiting"
    );

    go.send(()).unwrap();
    let mut answered = 0;
    for call in calls {
        let (sent, got) = call.await.unwrap();
        assert_eq!(got.unwrap(), sent, "each call gets its own bytes back");
        answered += 1;
    }
    println!("calls answered once the server read, each with its own bytes: {answered} of {CALLS}");
    server.await.unwrap();
}
