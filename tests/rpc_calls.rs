//! Calls: transports, concurrency, routing, metadata, handler failures.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    Event, Transport, Whoami, answer, args, lab, lab_client, no_options, serve, serve_and_connect,
    timeout,
};
use courier::frame::Status;
use courier::{CallOptions, ClientConfig, Metadata, RpcError, Server, ServerConfig};

on_every_transport!(a_call_is_answered);

async fn a_call_is_answered(transport: Transport) {
    let (client, _probe) = lab_client(transport, ServerConfig::default()).await;
    let out = client
        .call("Lab.double", args(&21u64), &no_options())
        .await
        .unwrap();
    assert_eq!(answer::<u64>(&out), 42);
    let out = client
        .call("Lab.echo", Bytes::from_static(b"ping"), &no_options())
        .await
        .unwrap();
    assert_eq!(&out[..], b"ping");
}

#[tokio::test]
async fn ten_thousand_calls_in_flight_on_one_connection_each_get_their_own_answer() {
    const CALLS: u64 = 10_000;
    let mut config = ServerConfig::default();
    config.max_calls_in_flight = CALLS as usize;
    let (client, mut probe) = lab_client(Transport::Tcp, config).await;

    let mut calls = tokio::task::JoinSet::new();
    for tag in 0..CALLS {
        let client = client.clone();
        calls.spawn(async move {
            let out = client
                .call("Lab.hold", args(&tag), &timeout(Duration::from_secs(60)))
                .await
                .unwrap();
            (tag, answer::<u64>(&out))
        });
    }
    // Every handler is running at once before any is let go: all 10,000 are in flight.
    for _ in 0..CALLS {
        assert!(matches!(probe.next().await, Event::Started(_)));
    }
    probe.release(CALLS as usize);
    let mut answered = 0;
    while let Some(result) = calls.join_next().await {
        let (tag, got) = result.unwrap();
        assert_eq!(got, tag, "call {tag} got another call's answer");
        answered += 1;
    }
    assert_eq!(answered, CALLS);
}

#[tokio::test]
async fn unknown_service_and_method_get_error_answers_and_the_connection_stays_usable() {
    let (client, _probe) = lab_client(Transport::Memory, ServerConfig::default()).await;

    let err = client
        .call("Nope.x", Bytes::new(), &no_options())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::UnknownService { message } if message.contains("`Nope`") && message.contains("Lab")),
        "{err}"
    );
    let err = client
        .call("Lab.nope", Bytes::new(), &no_options())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::UnknownMethod { message } if message.contains("`nope`")),
        "{err}"
    );
    let err = client
        .call("no-dot", Bytes::new(), &no_options())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::UnknownMethod { message } if message.contains("Service.method")),
        "{err}"
    );

    let out = client
        .call("Lab.double", args(&1u64), &no_options())
        .await
        .unwrap();
    assert_eq!(answer::<u64>(&out), 2);
}

#[tokio::test]
async fn arguments_that_do_not_decode_get_a_bad_request_answer() {
    let (client, _probe) = lab_client(Transport::Memory, ServerConfig::default()).await;
    let err = client
        .call("Lab.double", Bytes::from_static(b"\xff\xff"), &no_options())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::Remote { status, message } if *status == Status::BAD_REQUEST && message.contains("request")),
        "{err}"
    );
}

#[tokio::test]
async fn a_panicking_handler_is_an_internal_error_and_the_connection_stays_usable() {
    let (client, _probe) = lab_client(Transport::Memory, ServerConfig::default()).await;
    // At once (the server's first, inline poll) and after waiting (in the call's task).
    for method in ["Lab.panic", "Lab.panic_later"] {
        let err = client
            .call(method, args(&()), &no_options())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RpcError::Remote { status, message } if *status == Status::INTERNAL && message.contains("panicked")),
            "{method}: {err}"
        );
    }
    let out = client
        .call("Lab.double", args(&5u64), &no_options())
        .await
        .unwrap();
    assert_eq!(answer::<u64>(&out), 10);
}

#[tokio::test]
async fn client_and_call_metadata_reach_the_handler_with_the_call_context() {
    let mut metadata = Metadata::new();
    metadata.insert("authorization", "Bearer client");
    let mut config = ClientConfig::default();
    config.metadata = metadata;
    let client = serve(
        Transport::Memory,
        Server::new(ServerConfig::default()).add_service(lab().0),
    )
    .await
    .client(config)
    .await;

    let options = CallOptions::default()
        .with_timeout(Duration::from_secs(5))
        .with_metadata("x-call", "1");
    let out = client
        .call("Lab.whoami", args(&()), &options)
        .await
        .unwrap();
    let who: Whoami = answer(&out);
    assert_eq!(
        who.metadata,
        vec![
            ("authorization".to_string(), b"Bearer client".to_vec()),
            ("x-call".to_string(), b"1".to_vec())
        ]
    );
    assert!(who.peer.starts_with("memory://"), "{}", who.peer);
    assert!(who.request_id > 0);
    let left = who
        .time_left_ms
        .expect("the deadline travels with the call");
    assert!(left > 4_000 && left <= 5_000, "time left {left} ms");
}

#[tokio::test]
async fn one_server_hosts_several_services() {
    struct Upper;
    impl courier::Service for Upper {
        fn name(&self) -> &'static str {
            "Upper"
        }
        fn call(
            &self,
            method: &str,
            _: courier::CallContext,
            payload: Bytes,
        ) -> courier::CallFuture {
            match method {
                "upper" => Box::pin(async move { Ok(Bytes::from(payload.to_ascii_uppercase())) }),
                other => courier::ServiceError::unknown_method("Upper", other).into_future(),
            }
        }
    }
    let server = Server::new(ServerConfig::default())
        .add_service(lab().0)
        .add_service(Upper);
    let client = serve_and_connect(Transport::Memory, server).await;
    let out = client
        .call("Upper.upper", Bytes::from_static(b"abc"), &no_options())
        .await
        .unwrap();
    assert_eq!(&out[..], b"ABC");
    let out = client
        .call("Lab.double", args(&3u64), &no_options())
        .await
        .unwrap();
    assert_eq!(answer::<u64>(&out), 6);
}

#[tokio::test]
async fn client_clones_share_one_connection() {
    let (client, _probe) = lab_client(Transport::Memory, ServerConfig::default()).await;
    let a = client
        .call("Lab.whoami", args(&()), &no_options())
        .await
        .unwrap();
    let b = client
        .clone()
        .call("Lab.whoami", args(&()), &no_options())
        .await
        .unwrap();
    assert_eq!(answer::<Whoami>(&a).peer, answer::<Whoami>(&b).peer);
}

/// The server's end of a memory pair, counting the writes the server makes on it.
struct CountedWrites {
    io: tokio::io::DuplexStream,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// [`CountedWrites`]' write half.
struct CountingWriter {
    inner: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl courier::connection::Io for CountedWrites {
    type Read = tokio::io::ReadHalf<tokio::io::DuplexStream>;
    type Write = CountingWriter;
    fn split_io(self) -> (Self::Read, Self::Write) {
        let (read, write) = tokio::io::split(self.io);
        (
            read,
            CountingWriter {
                inner: write,
                writes: self.writes,
            },
        )
    }
}

impl tokio::io::AsyncWrite for CountingWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection to a server with the lab service, spoken to frame by frame, and the
/// number of writes the server has made on it.
async fn raw_lab_connection() -> (
    tokio::io::DuplexStream,
    courier::codec::FrameCodec,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let writes = std::sync::Arc::default();
    let server = Server::new(ServerConfig::default()).add_service(lab().0);
    let io = CountedWrites {
        io: theirs,
        writes: std::sync::Arc::clone(&writes),
    };
    tokio::spawn(async move {
        server
            .serve_connection(io, courier::transport::PeerAddr::Memory(1))
            .await
    });
    (ours, courier::codec::FrameCodec::new(1 << 20), writes)
}

/// A request to `Lab.echo` with call id `id` and three bytes of `id`.
fn echo_request(id: u64) -> courier::frame::Frame {
    courier::frame::Frame::Request(courier::frame::Request {
        id,
        method: "Lab.echo".into(),
        payload: Bytes::from(vec![id as u8; 3]),
        ..courier::frame::Request::default()
    })
}

/// The server answers the requests of one read together; a ping read last, behind them,
/// must not hold their answers back until the peer sends something more.
#[tokio::test(start_paused = true)]
async fn requests_and_a_ping_in_one_read_are_all_answered_with_nothing_more_sent() {
    use courier::frame::Frame;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::{Decoder, Encoder};

    let (mut io, mut codec, _writes) = raw_lab_connection().await;
    let mut wire = bytes::BytesMut::new();
    for frame in [
        echo_request(1),
        Frame::Ping { nonce: 8 },
        echo_request(2),
        echo_request(3),
        Frame::Ping { nonce: 9 },
    ] {
        codec.encode(&frame, &mut wire).unwrap();
    }
    io.write_all(&wire).await.unwrap();

    let mut got = Vec::new();
    let mut read = bytes::BytesMut::new();
    while got.len() < 5 {
        while let Some(frame) = codec.decode(&mut read).unwrap() {
            got.push(frame);
        }
        if got.len() == 5 {
            break;
        }
        let more = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_buf(&mut io, &mut read),
        )
        .await
        .expect("every answer and the pong arrive without another frame from the peer");
        assert!(more.unwrap() > 0, "the server closed the connection");
    }
    let mut answered: Vec<(u64, Vec<u8>)> = got
        .iter()
        .filter_map(|frame| match frame {
            Frame::Response(r) => Some((r.id, r.payload.to_vec())),
            _ => None,
        })
        .collect();
    answered.sort();
    assert_eq!(
        answered,
        vec![(1, vec![1; 3]), (2, vec![2; 3]), (3, vec![3; 3])]
    );
    assert!(got.contains(&Frame::Pong { nonce: 8 }), "{got:?}");
    assert!(got.contains(&Frame::Pong { nonce: 9 }), "{got:?}");
}

/// A busy connection's answers wait one turn of the runtime for the peer's next requests:
/// requests that arrive meanwhile are answered in the same write. (Fewer, larger writes:
/// fewer system calls and wake-ups on both sides.)
#[tokio::test(start_paused = true)]
async fn requests_arriving_while_a_busy_connections_answers_wait_a_turn_share_their_write() {
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::{Decoder, Encoder};

    let (mut io, mut codec, writes) = raw_lab_connection().await;
    let mut first = bytes::BytesMut::new();
    let mut second = bytes::BytesMut::new();
    for id in [1, 2] {
        codec.encode(&echo_request(id), &mut first).unwrap();
    }
    for id in [3, 4] {
        codec.encode(&echo_request(id), &mut second).unwrap();
    }
    io.write_all(&first).await.unwrap();
    // The server reads and answers the first two, then gives the peer a turn.
    tokio::task::yield_now().await;
    let mut read = bytes::BytesMut::with_capacity(4096);
    let early = io.read_buf(&mut read).now_or_never();
    assert!(
        early.is_none(),
        "the answers to two requests were written before the peer's turn: {read:?}"
    );
    assert_eq!(writes.load(std::sync::atomic::Ordering::Relaxed), 0);
    io.write_all(&second).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), io.read_buf(&mut read))
        .await
        .expect("the answers arrive")
        .unwrap();
    assert!(n > 0, "the server closed the connection");
    let mut answered = Vec::new();
    while let Some(frame) = codec.decode(&mut read).unwrap() {
        match frame {
            courier::frame::Frame::Response(r) => answered.push(r.id),
            other => panic!("unexpected {other:?}"),
        }
    }
    answered.sort();
    assert_eq!(answered, vec![1, 2, 3, 4]);
    assert_eq!(
        writes.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "all four answers in one write"
    );
}

/// A client takes the answers of one read together: each caller still gets its own,
/// whether it is an OK answer without a message (taken from the read buffer in place),
/// one with a message, or an error; and a go-away read right after them is still heard
/// (the connection takes no more calls).
#[tokio::test]
async fn answers_read_together_reach_their_callers_and_a_go_away_after_them_is_heard() {
    use bytes::BytesMut;
    use courier::Client;
    use courier::frame::{Frame, GoAway, Response};
    use courier::transport::TcpConnector;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::{Decoder, Encoder};

    const CALLS: u8 = 40;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A server that reads every request, then writes every answer (last first) and a
    // go-away in one write. It takes one connection: a reconnect is refused.
    tokio::spawn(async move {
        let (mut io, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut codec = courier::codec::FrameCodec::new(1 << 20);
        let mut read = BytesMut::new();
        let mut requests = Vec::new();
        while requests.len() < usize::from(CALLS) {
            if let Some(frame) = codec.decode(&mut read).unwrap() {
                if let Frame::Request(request) = frame {
                    requests.push((request.id, request.payload));
                }
                continue;
            }
            assert!(io.read_buf(&mut read).await.unwrap() > 0, "client left");
        }
        let mut wire = BytesMut::new();
        for (id, payload) in requests.into_iter().rev() {
            // Call n (its payload is n, three times): an OK answer without a message, one
            // with a message, or an error (without one), in turn.
            let (status, message) = match payload[0] % 3 {
                0 => (Status::OK, ""),
                1 => (Status::OK, "noted"),
                _ => (Status(77), ""),
            };
            let answer = Response {
                id,
                status,
                message: message.into(),
                payload,
            };
            codec.encode(&Frame::Response(answer), &mut wire).unwrap();
        }
        let go_away = GoAway::new(GoAway::SHUTDOWN, "draining");
        codec.encode(&Frame::GoAway(go_away), &mut wire).unwrap();
        io.write_all(&wire).await.unwrap();
        let _ = io.read_buf(&mut read).await; // open until the client goes
    });

    let client = Client::connect(TcpConnector::from(addr), ClientConfig::default())
        .await
        .unwrap();
    let calls = (0..CALLS).map(|n| {
        let client = client.clone();
        async move {
            let sent = Bytes::from(vec![n; 3]);
            let echoed = client.call("Lab.echo", sent.clone(), &no_options()).await;
            (sent, echoed)
        }
    });
    for (sent, echoed) in futures_util::future::join_all(calls).await {
        if sent[0] % 3 == 2 {
            match echoed {
                Err(RpcError::Remote { status, message }) => {
                    assert_eq!((status, message.as_str()), (Status(77), ""))
                }
                other => panic!("call {}: expected its error, got {other:?}", sent[0]),
            }
        } else {
            assert_eq!(echoed.unwrap(), sent);
        }
    }
    common::wait_for("the go-away to retire the connection", || {
        !client.is_connected()
    })
    .await;
}
