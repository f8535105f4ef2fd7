//! Dead servers, reconnects, garbage on the wire, frame size limits, connection limits.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{Endpoint, Event, Lab, Transport, answer, args, lab, no_options, serve_lab, timeout};
use courier::codec::FrameCodec;
use courier::frame::{Frame, GoAway, Status};
use courier::{ClientConfig, RpcError, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;

/// A server on its own runtime, so that it can be killed: shutting the runtime down drops
/// every task and socket at once, as the death of a server process would.
struct ServerProcess {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start(addr: SocketAddr, lab: Lab, config: ServerConfig) -> ServerProcess {
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            // A restart may race the old runtime's shutdown, which closes its listener in
            // the background: retry the port for a while, as a restarted process would.
            let listener = runtime.block_on(async {
                let give_up = std::time::Instant::now() + Duration::from_secs(5);
                loop {
                    match TcpListener::bind(addr).await {
                        Ok(listener) => return listener,
                        Err(e) if std::time::Instant::now() < give_up => {
                            assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => panic!("cannot bind {addr}: {e}"),
                    }
                }
            });
            let addr = listener.local_addr().unwrap();
            runtime.spawn(
                Server::new(config)
                    .add_service(lab)
                    .serve(listener, std::future::pending()),
            );
            ServerProcess {
                runtime: Some(runtime),
                addr,
            }
        })
        .join()
        .unwrap()
    }

    fn kill(self) {
        drop(self);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background(); // a blocking drop is not allowed in async code
        }
    }
}

#[tokio::test]
async fn killing_the_server_fails_every_pending_call_within_a_second_and_the_client_reconnects_when_it_is_back()
 {
    const PENDING: u64 = 50;
    let (lab, mut probe) = lab();
    let server = ServerProcess::start(
        "127.0.0.1:0".parse().unwrap(),
        lab.clone(),
        ServerConfig::default(),
    );
    let addr = server.addr;
    let mut config = ClientConfig::default();
    config.reconnect.initial = Duration::from_millis(10);
    config.reconnect.max = Duration::from_millis(100);
    let client = Endpoint::Tcp(addr).client(config).await;

    let mut calls = tokio::task::JoinSet::new();
    for tag in 0..PENDING {
        let client = client.clone();
        calls.spawn(async move {
            client
                .call("Lab.hold", args(&tag), &timeout(Duration::from_secs(60)))
                .await
        });
    }
    for _ in 0..PENDING {
        assert!(matches!(probe.next().await, Event::Started(_)));
    }

    let killed = std::time::Instant::now();
    server.kill();
    while let Some(result) = calls.join_next().await {
        let err = result.unwrap().unwrap_err();
        assert!(matches!(err, RpcError::ConnectionClosed { .. }), "{err}");
    }
    let failed_after = killed.elapsed();
    eprintln!("{PENDING} pending calls failed {failed_after:?} after the kill");
    assert!(
        failed_after < Duration::from_secs(1),
        "pending calls failed only after {failed_after:?}"
    );

    let _server = ServerProcess::start(addr, lab, ServerConfig::default());
    let out = client
        .call(
            "Lab.double",
            args(&21u64),
            &timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    assert_eq!(answer::<u64>(&out), 42);
    assert!(client.is_connected());
}

/// Writes `garbage` on a raw connection, ends the stream, and returns every frame the
/// server sent back before it closed the connection.
async fn send_garbage(addr: SocketAddr, garbage: &[u8]) -> Vec<Frame> {
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(garbage).await.unwrap();
    raw.shutdown().await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut received))
        .await
        .expect("the server did not close the connection")
        .unwrap();
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::from(&received[..]);
    let mut frames = Vec::new();
    while let Some(frame) = codec.decode(&mut buf).unwrap() {
        frames.push(frame);
    }
    frames
}

fn go_away(frames: &[Frame]) -> &GoAway {
    frames
        .iter()
        .find_map(|f| match f {
            Frame::GoAway(g) => Some(g),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no go-away in {frames:?}"))
}

#[tokio::test]
async fn garbage_bytes_from_a_raw_socket_close_that_connection_only() {
    let (server, _probe) = serve_lab(Transport::Tcp, ServerConfig::default()).await;
    let addr = server.addr();
    let good = server.client(ClientConfig::default()).await;
    let double = |n: u64| {
        let good = good.clone();
        async move {
            answer::<u64>(
                &good
                    .call("Lab.double", args(&n), &timeout(Duration::from_secs(5)))
                    .await
                    .unwrap(),
            )
        }
    };
    assert_eq!(double(1).await, 2);

    // An HTTP request read as a length prefix: 0x47455420 bytes, over the 8 MiB limit.
    let frames = send_garbage(addr, b"GET / HTTP/1.1\r\nHost: courier\r\n\r\n").await;
    let g = go_away(&frames);
    assert_eq!(g.code, GoAway::FRAME_TOO_LARGE);
    assert!(
        g.message.contains("1195725856 bytes") && g.message.contains("8388608 bytes"),
        "{}",
        g.message
    );
    assert_eq!(double(2).await, 4);

    // A well-sized frame with a version nobody speaks.
    let frames = send_garbage(addr, &[0, 0, 0, 3, 9, 9, 9]).await;
    let g = go_away(&frames);
    assert_eq!(g.code, GoAway::PROTOCOL_ERROR);
    assert!(
        g.message.contains("unsupported protocol version 9"),
        "{}",
        g.message
    );
    assert_eq!(double(3).await, 6);

    // A frame cut off by the end of the stream.
    let frames = send_garbage(addr, &[0, 0, 0, 100, 1, 1, 0]).await;
    assert!(
        go_away(&frames)
            .message
            .contains("in the middle of a frame")
    );

    // A frame a server never accepts.
    let mut bytes = BytesMut::new();
    tokio_util::codec::Encoder::encode(
        &mut FrameCodec::new(1024),
        &Frame::Unsub { sid: 1 },
        &mut bytes,
    )
    .unwrap();
    let frames = send_garbage(addr, &bytes).await;
    assert!(go_away(&frames).message.contains("unexpected Unsub frame"));

    // Pseudo-random junk of many shapes.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..20 {
        let junk: Vec<u8> = (0..(round * 13 + 1))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        send_garbage(addr, &junk).await;
    }
    assert_eq!(
        double(4).await,
        8,
        "the server goes on serving everyone else"
    );
}

#[tokio::test]
async fn a_call_over_the_client_frame_limit_fails_alone_with_the_limit_named() {
    let (server, _probe) = serve_lab(Transport::Tcp, ServerConfig::default()).await;
    let mut config = ClientConfig::default();
    config.connection.max_frame_len = 1024;
    let client = server.client(config).await;

    let err = client
        .call("Lab.echo", Bytes::from(vec![0u8; 2000]), &no_options())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::FrameTooLarge { limit: 1024, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("maximum frame length of 1024 bytes"),
        "{err}"
    );
    let out = client
        .call("Lab.echo", Bytes::from(vec![1u8; 500]), &no_options())
        .await
        .unwrap();
    assert_eq!(out.len(), 500);
}

#[tokio::test]
async fn a_frame_over_the_server_limit_closes_that_connection_only_with_the_limit_named() {
    let mut config = ServerConfig::default();
    config.connection.max_frame_len = 1024;
    let (server, _probe) = serve_lab(Transport::Tcp, config).await;
    let offender = server.client(ClientConfig::default()).await;
    let bystander = server.client(ClientConfig::default()).await;

    let err = offender
        .call("Lab.echo", Bytes::from(vec![0u8; 2000]), &no_options())
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, RpcError::ConnectionClosed { .. }), "{err}");
    assert!(
        message.contains("exceeds the maximum frame length of 1024 bytes"),
        "{message}"
    );

    let out = bystander
        .call("Lab.echo", Bytes::from_static(b"fine"), &no_options())
        .await
        .unwrap();
    assert_eq!(&out[..], b"fine");
    // The offender reconnects and may go on with frames that fit.
    let out = offender
        .call("Lab.echo", Bytes::from_static(b"small"), &no_options())
        .await
        .unwrap();
    assert_eq!(&out[..], b"small");
}

#[tokio::test]
async fn an_answer_over_the_server_frame_limit_becomes_an_error_naming_the_limit() {
    let mut config = ServerConfig::default();
    config.connection.max_frame_len = 1024;
    let (server, _probe) = serve_lab(Transport::Tcp, config).await;
    let client = server.client(ClientConfig::default()).await;
    let err = client
        .call("Lab.big", args(&5000usize), &no_options())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::Remote { status, message } if *status == Status::FRAME_TOO_LARGE && message.contains("1024 bytes")),
        "{err}"
    );
    assert!(client.is_connected());
}

#[tokio::test]
async fn an_answer_over_the_client_frame_limit_is_refused_by_the_client() {
    let (server, _probe) = serve_lab(Transport::Tcp, ServerConfig::default()).await;
    let mut config = ClientConfig::default();
    config.connection.max_frame_len = 1024;
    let client = server.client(config).await;
    let err = client
        .call("Lab.big", args(&5000usize), &no_options())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("maximum frame length of 1024 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn a_connection_past_max_connections_is_told_the_limit_and_closed() {
    let mut config = ServerConfig::default();
    config.max_connections = 1;
    let (server, _probe) = serve_lab(Transport::Tcp, config).await;
    let first = server.client(ClientConfig::default()).await;
    first
        .call("Lab.double", args(&1u64), &no_options())
        .await
        .unwrap();

    let mut config = ClientConfig::default();
    config.wait_for_connection = false;
    let second = server.client(config).await;
    let err = second
        .call("Lab.double", args(&1u64), &no_options())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("connection limit of 1 (ServerConfig::max_connections)"),
        "{err}"
    );

    first
        .call("Lab.double", args(&2u64), &no_options())
        .await
        .unwrap();
}
