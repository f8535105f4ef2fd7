//! Graceful shutdown: stop accepting, finish what is in flight, abort after the grace period.

mod common;

use std::time::Duration;

use common::{Event, Transport, answer, args, lab, serve_until, timeout, wait_for};
use courier::frame::{Frame, GoAway, Request, Status};
use courier::{ClientConfig, RpcError, Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_call_finish_and_refuses_new_connections() {
    let (lab, mut probe) = lab();
    let stop = CancellationToken::new();
    let (server, serving) = serve_until(
        Transport::Tcp,
        Server::new(ServerConfig::default()).add_service(lab),
        stop.clone().cancelled_owned(),
    )
    .await;
    let client = server.client(ClientConfig::default()).await;

    let in_flight = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call("Lab.hold", args(&1u64), &timeout(Duration::from_secs(30)))
                .await
        }
    });
    assert_eq!(probe.next().await, Event::Started(1));

    stop.cancel();
    // The client hears the go-away and retires the connection for new calls.
    wait_for("the client to hear of the shutdown", || {
        !client.is_connected()
    })
    .await;
    let refused = tokio::net::TcpStream::connect(server.addr())
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = client
        .call(
            "Lab.double",
            args(&1u64),
            &timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::NotConnected { .. }), "{err}");
    assert!(
        !serving.is_finished(),
        "the server waits for the call in flight"
    );

    probe.release(1);
    let out = in_flight
        .await
        .unwrap()
        .expect("the call in flight completes");
    assert_eq!(answer::<u64>(&out), 1);
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("server did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn calls_still_running_after_the_grace_period_are_aborted() {
    let (lab, mut probe) = lab();
    let stop = CancellationToken::new();
    let mut config = ServerConfig::default();
    config.shutdown_grace = Duration::from_secs(5);
    let (server, serving) = serve_until(
        Transport::Memory,
        Server::new(config).add_service(lab),
        stop.clone().cancelled_owned(),
    )
    .await;
    let client = server.client(ClientConfig::default()).await;

    let stuck = tokio::spawn(async move {
        client
            .call("Lab.hold", args(&1u64), &timeout(Duration::from_secs(3600)))
            .await
    });
    assert_eq!(probe.next().await, Event::Started(1));
    let stopped_at = tokio::time::Instant::now();
    stop.cancel();

    assert_eq!(probe.next().await, Event::Aborted(1));
    assert_eq!(stopped_at.elapsed(), Duration::from_secs(5));
    serving.await.unwrap().unwrap();
    let err = stuck.await.unwrap().unwrap_err();
    assert!(matches!(err, RpcError::ConnectionClosed { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_call_arriving_while_the_server_drains_is_refused_as_shutting_down() {
    let (lab, mut probe) = lab();
    let stop = CancellationToken::new();
    let (server, _serving) = serve_until(
        Transport::Memory,
        Server::new(ServerConfig::default()).add_service(lab),
        stop.clone().cancelled_owned(),
    )
    .await;

    // A raw connection, to send a request after the go-away as a careless client might.
    let (mut reader, sender) = server.raw_peer().await;
    let request = |id| {
        Frame::Request(Request {
            id,
            method: "Lab.hold".into(),
            payload: args(&id),
            ..Request::default()
        })
    };
    sender.send(request(1)).await.unwrap();
    assert_eq!(probe.next().await, Event::Started(1));
    stop.cancel();

    let Some(Ok(Frame::GoAway(g))) = reader.next().await else {
        panic!("expected a go-away")
    };
    assert_eq!(g.code, GoAway::SHUTDOWN);
    sender.send(request(2)).await.unwrap();
    let Some(Ok(Frame::Response(refused))) = reader.next().await else {
        panic!("expected an answer")
    };
    assert_eq!((refused.id, refused.status), (2, Status::SHUTTING_DOWN));

    probe.release(1);
    let Some(Ok(Frame::Response(done))) = reader.next().await else {
        panic!("expected an answer")
    };
    assert_eq!((done.id, done.status), (1, Status::OK));
    assert!(
        reader.next().await.is_none(),
        "the server closes once the drain is over"
    );
}
