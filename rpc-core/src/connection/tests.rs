use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::frame::Message;

fn msg(len: usize) -> Frame {
    Frame::Msg(Message {
        sid: 1,
        subject: "s".into(),
        payload: Bytes::from(vec![0u8; len]),
        ..Message::default()
    })
}

/// Both ends of a connection over an in-memory pipe of `pipe` bytes, with default
/// settings: this side's reader and sender, then the peer's.
fn pair(pipe: usize) -> (Reader, FrameSender, Reader, FrameSender) {
    let (a, b) = tokio::io::duplex(pipe);
    let (reader, sender) = start(a, &ConnectionConfig::default());
    let (peer, peer_sender) = start(b, &ConnectionConfig::default());
    (reader, sender, peer, peer_sender)
}

type Reader = FrameReader<<tokio::io::DuplexStream as Io>::Read>;

/// A sender allowed 10,000 queued bytes (`max_queued_bytes`) whose peer reads nothing:
/// this side's reader and sender, and the peer's end of a 64-byte pipe.
fn unread_with_10_000_bytes_queued_at_most() -> (Reader, FrameSender, tokio::io::DuplexStream) {
    let (a, b) = tokio::io::duplex(64);
    let config = ConnectionConfig {
        max_queued_bytes: 10_000,
        ..ConnectionConfig::default()
    };
    let (reader, sender) = start(a, &config);
    (reader, sender, b)
}

#[tokio::test]
async fn try_send_reports_full_once_the_queued_bytes_reach_the_limit() {
    fill_until_full(FrameSender::try_send).await;
}

/// Sends ~1 KB frames with `send` over a connection whose peer reads nothing, until the
/// 10,000-byte limit refuses one: it comes back whole, and about as many frames as fit
/// were taken.
async fn fill_until_full(send: fn(&FrameSender, Frame) -> Result<(), TrySendError>) {
    let (_reader, sender, _b) = unread_with_10_000_bytes_queued_at_most();
    let mut accepted = 0;
    let back = loop {
        match send(&sender, msg(1000)) {
            Ok(()) => accepted += 1,
            Err(TrySendError::Full(frame)) => break frame,
            Err(TrySendError::Failed(e)) => panic!("unexpected failure: {e}"),
        }
        assert!(accepted < 100, "the byte limit was never applied");
    };
    assert_eq!(back, msg(1000), "handed back whole");
    // The peer reads nothing: at most the duplex buffer's worth leaves the queue.
    assert!(sender.queued_bytes() <= 10_000, "{}", sender.queued_bytes());
    assert!(
        accepted >= 9,
        "only {accepted} frames of ~1 KB fit in 10,000 bytes"
    );
}

#[tokio::test]
async fn queued_bytes_return_to_zero_once_written() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let config = ConnectionConfig::default();
    let (_reader, sender) = start(a, &config);
    let (mut b_reader, _b_sender) = start(b, &config);
    for _ in 0..10 {
        sender.send(msg(100)).await.unwrap();
    }
    for _ in 0..10 {
        b_reader.next().await.unwrap().unwrap();
    }
    assert_eq!(sender.queued_bytes(), 0);
}

#[tokio::test]
async fn abort_closes_a_connection_whose_peer_stopped_reading() {
    let (a, _b) = tokio::io::duplex(64);
    let (_reader, sender) = start(a, &ConnectionConfig::default());
    for _ in 0..10 {
        sender.try_send(msg(1000)).unwrap();
    }
    // The writer is stuck writing into a full pipe; a graceful close would wait forever.
    sender.abort_with(
        GoAway::new(GoAway::SLOW_CONSUMER, "too slow"),
        &ConnectionError::Closed {
            reason: "slow consumer".into(),
        },
    );
    tokio::time::timeout(Duration::from_secs(5), sender.closed())
        .await
        .expect("the writer stopped");
    let err = sender.send(msg(1)).await.unwrap_err();
    assert!(err.to_string().contains("slow consumer"), "{err}");
}

#[tokio::test]
async fn abort_between_writes_still_delivers_the_go_away() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let config = ConnectionConfig::default();
    let (_reader, sender) = start(a, &config);
    let (mut b_reader, _b_sender) = start(b, &config);
    sender.abort_with(
        GoAway::new(GoAway::SLOW_CONSUMER, "too slow"),
        &ConnectionError::Closed {
            reason: "slow consumer".into(),
        },
    );
    match b_reader.next().await {
        Some(Ok(Frame::GoAway(g))) => assert_eq!(g.code, GoAway::SLOW_CONSUMER),
        other => panic!("expected a go-away, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn round_trip_waits_for_the_peer_to_answer() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let config = ConnectionConfig::default();
    let (mut a_reader, a_sender) = start(a, &config);
    let (mut b_reader, _b_sender) = start(b, &config);
    tokio::spawn(async move { while a_reader.next().await.is_some() {} });
    // Nobody reads b yet, so nobody answers the ping.
    let pending = tokio::time::timeout(Duration::from_millis(50), a_sender.round_trip()).await;
    assert!(
        pending.is_err(),
        "answered without a reader on the other side"
    );
    tokio::spawn(async move { while b_reader.next().await.is_some() {} });
    tokio::time::timeout(Duration::from_secs(5), a_sender.round_trip())
        .await
        .expect("answered")
        .unwrap();
}

#[tokio::test]
async fn round_trip_fails_when_the_connection_closes() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (mut a_reader, a_sender) = start(a, &ConnectionConfig::default());
    tokio::spawn(async move { while a_reader.next().await.is_some() {} });
    let waiting = a_sender.round_trip();
    tokio::pin!(waiting);
    // One poll registers the round trip and queues its ping.
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut waiting)
            .await
            .is_err()
    );
    drop(b);
    let result = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("finished");
    assert!(result.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_peer_trickling_a_partial_frame_is_closed_for_sending_no_complete_frame() {
    use tokio::io::AsyncWriteExt;
    let (a, mut b) = tokio::io::duplex(1024);
    let config = ConnectionConfig {
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(3),
        ..ConnectionConfig::default()
    };
    let (mut reader, _sender) = start(a, &config);
    // A length prefix announcing 100 bytes, and 3 of them: a slowloris.
    b.write_all(&[0, 0, 0, 100, 1, 2, 3]).await.unwrap();
    let error = reader.next().await.unwrap().unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no complete frame within the keepalive timeout"),
        "{error}"
    );
}

#[tokio::test]
async fn send_waits_for_room_under_the_byte_limit() {
    let (a, b) = tokio::io::duplex(64);
    let config = ConnectionConfig {
        max_queued_bytes: 10_000,
        ..ConnectionConfig::default()
    };
    let (_reader, sender) = start(a, &config);
    // The peer reads nothing: sends stop once about 10,000 bytes wait.
    let mut sent = 0;
    while tokio::time::timeout(Duration::from_millis(50), sender.send(msg(1000)))
        .await
        .is_ok()
    {
        sent += 1;
        assert!(sent < 100, "send never waited for the byte limit");
    }
    assert!(
        sender.queued_bytes() <= 10_000 + 1_100,
        "{}",
        sender.queued_bytes()
    );
    // Once the peer reads, sends go through again.
    let (mut peer_reader, _peer_sender) = start(b, &ConnectionConfig::default());
    tokio::spawn(async move { while peer_reader.next().await.is_some() {} });
    tokio::time::timeout(Duration::from_secs(5), sender.send(msg(1000)))
        .await
        .expect("room again once the peer reads")
        .unwrap();
}

#[tokio::test]
async fn a_frame_over_the_limit_the_peer_stated_fails_its_send_not_the_connection() {
    let (_reader, sender, mut peer, _peer_sender) = pair(64 * 1024);
    sender.limit_frame_len(1000);
    sender.limit_frame_len(0); // not stated: no change
    assert_eq!(sender.max_frame_len(), 1000);
    let error = sender.send(msg(2000)).await.unwrap_err();
    assert!(
        matches!(error, ConnectionError::FrameTooLarge { limit: 1000, .. }),
        "{error}"
    );
    sender.send(msg(100)).await.unwrap();
    assert!(matches!(peer.next().await, Some(Ok(Frame::Msg(_)))));
}

#[tokio::test]
async fn bytes_count_as_queued_until_the_writer_has_written_them() {
    // A peer that reads nothing: the writer takes the frame, encodes it and blocks in
    // its write. The frame's bytes are still queued (pacing must see a peer that is
    // behind), not gone the moment they were encoded.
    let (a, _b) = tokio::io::duplex(64);
    let (_reader, sender) = start(a, &ConnectionConfig::default());
    sender.try_send(msg(10_000)).unwrap();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        sender.queued_bytes() >= 10_000,
        "{} bytes queued while the write is blocked",
        sender.queued_bytes()
    );
}

#[tokio::test]
async fn a_cancelled_send_leaves_no_bytes_counted() {
    let (a, _b) = tokio::io::duplex(64);
    let config = ConnectionConfig {
        send_queue: 1,
        ..ConnectionConfig::default()
    };
    let (_reader, sender) = start(a, &config);
    // Fill it: the writer takes a frame and blocks writing it, one more fills the
    // one-frame queue; from then on a send waits, and is given up after 5 ms.
    let mut sent = 0;
    while tokio::time::timeout(Duration::from_millis(5), sender.send(msg(1000)))
        .await
        .is_ok()
    {
        sent += 1;
        assert!(sent < 10, "the queue never filled");
    }
    let queued = sender.queued_bytes();
    for _ in 0..10 {
        let waited = tokio::time::timeout(Duration::from_millis(5), sender.send(msg(1000))).await;
        assert!(waited.is_err(), "the queue has no room");
    }
    assert_eq!(
        sender.queued_bytes(),
        queued,
        "cancelled sends counted nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_pings_but_never_reads_the_pongs_is_cut_off_after_the_keepalive_timeout() {
    use tokio::io::AsyncWriteExt;
    let (a, mut b) = tokio::io::duplex(4096);
    let config = ConnectionConfig {
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(3),
        max_queued_bytes: 2000,
        ..ConnectionConfig::default()
    };
    let (mut reader, _sender) = start(a, &config);
    let mut ping = bytes::BytesMut::new();
    tokio_util::codec::Encoder::encode(
        &mut crate::codec::FrameCodec::new(1024),
        &Frame::Ping { nonce: 1 },
        &mut ping,
    )
    .unwrap();
    tokio::spawn(async move { while b.write_all(&ping).await.is_ok() {} });
    let error = reader.next().await.unwrap().unwrap_err();
    assert!(error.to_string().contains("not reading"), "{error}");
}

/// Makes the connection look idle to the next send, whatever the clock says: as if
/// nothing had been written yet.
fn quiet(sender: &FrameSender) {
    sender.shared.times.last_write.store(0, Ordering::Relaxed);
}

#[tokio::test(flavor = "current_thread")]
async fn a_direct_send_on_an_idle_connection_is_written_by_the_sender_before_it_returns() {
    use tokio::io::AsyncReadExt;
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let (_reader, sender) = start(a, &ConnectionConfig::default());
    quiet(&sender);
    // one thread, no await that yields in between: only the sender itself can have
    // written the bytes
    sender.send_direct(msg(10)).await.unwrap();
    let n = written_now(&mut b).expect("the frame is there already");
    assert!(n > 10, "{n} bytes");
    // a second send right after it (within QUIET: set, so that a slow debug build
    // cannot make it later) goes through the writer task, which gathers
    just_written(&sender);
    sender.send_direct(msg(10)).await.unwrap();
    assert_eq!(written_now(&mut b), None, "queued, not written yet");
    let mut buf = [0u8; 256];
    assert!(b.read(&mut buf).await.unwrap() > 10);
}

/// Makes the connection look just written to, whatever the clock says: the last write
/// is dated after now.
fn just_written(sender: &FrameSender) {
    sender
        .shared
        .times
        .last_write
        .store(u64::MAX / 2, Ordering::Relaxed);
}

/// Bytes the peer can read from `b` without waiting; `None` when nothing is there yet.
fn written_now(b: &mut tokio::io::DuplexStream) -> Option<usize> {
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    b.read(&mut buf).now_or_never().map(|read| read.unwrap())
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_never_written_to_is_idle_however_young() {
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let (_reader, sender) = start(a, &ConnectionConfig::default());
    // no `quiet`: the connection is microseconds old, and still nothing was written
    sender.try_send_direct(msg(10)).unwrap();
    assert!(written_now(&mut b).is_some(), "written by the sender");
}

#[tokio::test(flavor = "current_thread")]
async fn a_try_send_direct_on_an_idle_connection_is_written_at_once_and_a_busy_one_queues_it() {
    use tokio::io::AsyncReadExt;
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let (_reader, sender) = start(a, &ConnectionConfig::default());
    quiet(&sender);
    sender.try_send_direct(msg(10)).unwrap();
    let n = written_now(&mut b).expect("written by the sender, with no await in between");
    assert!(n > 10, "{n} bytes");
    // Behind a frame waiting for the writer task (which has not run: one thread), the
    // frame is queued too, in order, whatever the clock says.
    quiet(&sender);
    sender.try_send(msg(10)).unwrap();
    sender.try_send_direct(msg(10)).unwrap();
    assert_eq!(written_now(&mut b), None, "queued, not written yet");
    let mut buf = [0u8; 256];
    assert!(b.read(&mut buf).await.unwrap() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_cut_short_by_a_full_stream_keep_every_senders_frames_whole_and_in_order() {
    // A 16-byte pipe: almost every direct write leaves a tail for the writer task, and
    // two senders race queued frames against it.
    let (_reader, sender, mut peer, _peer_sender) = pair(16);
    const N: u64 = 300;
    let senders: Vec<_> = (0..2u64)
        .map(|who| {
            let sender = sender.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    if i % 3 == 0 {
                        quiet(&sender);
                    }
                    let frame = Frame::Msg(Message {
                        sid: who,
                        subject: "s".into(),
                        payload: Bytes::from(i.to_be_bytes().repeat(1 + (i % 7) as usize)),
                        ..Message::default()
                    });
                    // mostly direct attempts, some plain sends between them
                    if i % 5 == 4 {
                        sender.send(frame).await.unwrap();
                    } else {
                        sender.send_direct(frame).await.unwrap();
                    }
                }
            })
        })
        .collect();
    let mut next = [0u64; 2];
    while next != [N, N] {
        let frame = tokio::time::timeout(Duration::from_secs(10), peer.next())
            .await
            .expect("frames keep coming")
            .expect("the connection stays up")
            .expect("every frame decodes");
        let Frame::Msg(m) = frame else {
            continue; // a keepalive
        };
        let who = m.sid as usize;
        let i = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
        assert_eq!(i, next[who], "sender {who}'s frames in order");
        assert_eq!(m.payload.len(), 8 * (1 + (i % 7) as usize), "whole");
        next[who] += 1;
    }
    for task in senders {
        task.await.unwrap();
    }
    println!("frames received in order: {} and {}", next[0], next[1]);
    assert_nothing_left_queued(&sender).await;
}

/// Everything was written: within 5 s, nothing is counted as queued any more (the
/// writer notes a write after it completed).
async fn assert_nothing_left_queued(sender: &FrameSender) {
    let settled = tokio::time::timeout(Duration::from_secs(5), async {
        while sender.queued_bytes() != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "{} bytes still counted",
        sender.queued_bytes()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_plain_send_on_an_idle_connection_is_left_to_the_writer_task() {
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let (_reader, sender) = start(a, &ConnectionConfig::default());
    quiet(&sender);
    sender.send(msg(10)).await.unwrap();
    let mut buf = [0u8; 256];
    assert!(
        b.read(&mut buf).now_or_never().is_none(),
        "queued, not written by the sender"
    );
    assert!(b.read(&mut buf).await.unwrap() > 10);
}

#[tokio::test(flavor = "current_thread")]
async fn an_abort_after_a_direct_write_cut_short_completes_that_frame_before_the_go_away() {
    // A 64-byte pipe and a 200-byte frame: the direct write leaves a tail; the abort
    // comes before the writer task has run at all (one thread, no await in between).
    let (_reader, sender, mut peer, _peer_sender) = pair(64);
    quiet(&sender);
    sender.send_direct(msg(200)).await.unwrap();
    let reason = ConnectionError::Closed {
        reason: "test".into(),
    };
    sender.abort_with(GoAway::new(GoAway::SLOW_CONSUMER, "cut off"), &reason);
    let mut frames = Vec::new();
    while let Some(frame) = peer.next().await {
        frames.push(frame.expect("every frame whole"));
    }
    assert!(
        matches!(&frames[..], [Frame::Msg(m), Frame::GoAway(g)] if m.payload.len() == 200 && g.message.contains("cut off")),
        "{frames:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_direct_writes_tail_is_written_when_the_last_sender_is_gone() {
    let (_reader, sender, mut peer, _peer_sender) = pair(64);
    quiet(&sender);
    sender.send_direct(msg(200)).await.unwrap();
    drop(sender);
    drop(_reader);
    let frame = tokio::time::timeout(Duration::from_secs(5), peer.next())
        .await
        .expect("the frame comes")
        .expect("not the end")
        .expect("whole");
    assert!(matches!(frame, Frame::Msg(m) if m.payload.len() == 200));
}

#[tokio::test(flavor = "current_thread")]
async fn a_burst_right_after_a_direct_write_pauses_direct_writes() {
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let (_reader, sender) = start(a, &ConnectionConfig::default());
    let mut buf = [0u8; 4096];
    quiet(&sender);
    sender.send_direct(msg(10)).await.unwrap();
    assert!(
        b.read(&mut buf).now_or_never().is_some(),
        "written directly"
    );
    let shared = &sender.shared;
    assert_ne!(shared.times.direct_at.load(Ordering::Relaxed), 0, "noted");
    // queued within QUIET of the direct write (whatever the clock says: the direct
    // write is dated after now, so that a slow debug build cannot make it later): the
    // sender is in a burst
    shared
        .times
        .direct_at
        .store(u64::MAX / 2, Ordering::Relaxed);
    sender.send(msg(10)).await.unwrap();
    assert!(b.read(&mut buf).await.unwrap() > 10);
    for attempt in 0..DIRECT_PAUSE {
        quiet(&sender);
        sender.send_direct(msg(10)).await.unwrap();
        assert!(
            b.read(&mut buf).now_or_never().is_none(),
            "attempt {attempt} of the pause was queued"
        );
        assert!(b.read(&mut buf).await.unwrap() > 10);
    }
    quiet(&sender);
    sender.send_direct(msg(10)).await.unwrap();
    assert!(
        b.read(&mut buf).now_or_never().is_some(),
        "written directly again after the pause"
    );
}

#[tokio::test(start_paused = true)]
async fn a_busy_connection_reads_into_a_larger_buffer_and_an_idle_one_gives_it_back() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let config = ConnectionConfig::default();
    let (_a_reader, a_sender) = start(a, &config);
    let (mut b_reader, _b_sender) = start(b, &config);
    assert_eq!(b_reader.read_capacity(), reader::MIN_READ);
    // 512 frames of ~1 KiB wait in the stream before the reader reads any
    for _ in 0..512 {
        a_sender.send(msg(1000)).await.unwrap();
    }
    while a_sender.queued_bytes() > 0 {
        tokio::task::yield_now().await;
    }
    let mut largest = 0;
    for _ in 0..512 {
        assert!(matches!(b_reader.next().await, Some(Ok(Frame::Msg(_)))));
        largest = largest.max(b_reader.read_capacity());
    }
    assert!(
        largest >= reader::MAX_READ,
        "reads of a full stream never got a buffer of {} bytes (largest {largest})",
        reader::MAX_READ
    );
    assert!(b_reader.is_wide());
    // A keepalive interval later the empty buffer is small again.
    let next = tokio::spawn(async move {
        let frame = b_reader.next().await;
        (b_reader, frame)
    });
    tokio::time::sleep(config.keepalive_interval + Duration::from_millis(1)).await;
    a_sender.send(Frame::Cancel { id: 9 }).await.unwrap();
    let (b_reader, frame) = next.await.unwrap();
    assert_eq!(frame.unwrap().unwrap(), Frame::Cancel { id: 9 });
    assert!(
        b_reader.read_capacity() <= reader::MIN_READ,
        "an idle connection kept a buffer of {} bytes",
        b_reader.read_capacity()
    );
    // ...and not a slice of a 64 KiB allocation that would come back at the next read
    assert!(!b_reader.is_wide(), "an idle connection kept 64 KiB reads");
}

#[tokio::test]
async fn frames_that_arrive_in_one_read_come_out_in_order_and_a_ping_among_them_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let (mut reader, _sender) = start(a, &ConnectionConfig::default());
    let mut codec = crate::codec::FrameCodec::new(1024);
    let mut wire = bytes::BytesMut::new();
    let sent = [
        Frame::Cancel { id: 1 },
        Frame::Ping { nonce: 42 },
        Frame::Cancel { id: 2 },
        Frame::Pong { nonce: 7 },
        Frame::Cancel { id: 3 },
    ];
    for frame in &sent {
        tokio_util::codec::Encoder::encode(&mut codec, frame, &mut wire).unwrap();
    }
    // The last frame's final byte comes later: the reader must wait for it.
    let last = wire.split_off(wire.len() - 1);
    b.write_all(&wire).await.unwrap();
    for id in [1, 2] {
        assert_eq!(reader.next().await.unwrap().unwrap(), Frame::Cancel { id });
    }
    let mut third = Box::pin(reader.next());
    assert!(
        futures_util::poll!(third.as_mut()).is_pending(),
        "a frame not all read is not returned"
    );
    b.write_all(&last).await.unwrap();
    assert_eq!(third.await.unwrap().unwrap(), Frame::Cancel { id: 3 });

    let mut pong = [0u8; 14];
    b.read_exact(&mut pong).await.unwrap();
    let pong =
        tokio_util::codec::Decoder::decode(&mut codec, &mut bytes::BytesMut::from(&pong[..]));
    assert_eq!(pong.unwrap(), Some(Frame::Pong { nonce: 42 }));
}

#[tokio::test(start_paused = true)]
async fn a_ping_whose_pong_waited_for_room_when_next_was_dropped_is_answered_by_the_next_call() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = tokio::io::duplex(64);
    let (mut peer_read, mut peer_write) = tokio::io::split(b);
    let config = ConnectionConfig {
        max_queued_bytes: 2000,
        ..ConnectionConfig::default()
    };
    let (mut reader, sender) = start(a, &config);
    // The peer reads nothing yet: the send queue fills, with no room left even for a pong.
    while sender.try_send(msg(500)).is_ok() {}
    while sender.try_send(Frame::Pong { nonce: 0 }).is_ok() {}
    let mut codec = crate::codec::FrameCodec::new(1 << 20);
    let mut ping = bytes::BytesMut::new();
    tokio_util::codec::Encoder::encode(&mut codec, &Frame::Ping { nonce: 5 }, &mut ping).unwrap();
    peer_write.write_all(&ping).await.unwrap();

    let mut next = Box::pin(reader.next());
    assert!(
        futures_util::poll!(next.as_mut()).is_pending(),
        "the pong found room in a full queue"
    );
    drop(next);

    // The peer reads again, and the reader is called again: the ping gets its pong.
    let pong = async move {
        let mut read = bytes::BytesMut::with_capacity(4096);
        loop {
            while let Some(frame) =
                tokio_util::codec::Decoder::decode(&mut codec, &mut read).unwrap()
            {
                if frame == (Frame::Pong { nonce: 5 }) {
                    return;
                }
            }
            assert!(peer_read.read_buf(&mut read).await.unwrap() > 0, "closed");
        }
    };
    tokio::select! {
        answered = tokio::time::timeout(Duration::from_secs(5), pong) => {
            answered.expect("the ping was never answered");
        }
        frame = reader.next() => panic!("the peer sent nothing more, yet: {frame:?}"),
    }
}

/// A cancel frame's bytes on the wire, length prefix included.
fn cancel_len() -> usize {
    Frame::Cancel { id: 0 }.encoded_len().unwrap() + LENGTH_PREFIX_LEN
}

fn cancel_batch(sender: &FrameSender, ids: std::ops::Range<u64>) -> EncodedFrames {
    let mut batch = EncodedFrames::default();
    for id in ids {
        sender
            .encode_into(&Frame::Cancel { id }, &mut batch)
            .unwrap();
    }
    batch
}

async fn read_cancels<R: AsyncRead + Unpin>(peer: &mut FrameReader<R>, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(5), peer.next())
            .await
            .expect("frames keep coming")
            .expect("the connection stays up")
            .expect("every frame decodes");
        if let Frame::Cancel { id } = frame {
            ids.push(id);
        }
    }
    ids
}

#[tokio::test(flavor = "current_thread")]
async fn an_encoded_batch_on_a_busy_connection_with_nothing_queued_is_written_by_its_sender() {
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let (_reader, sender) = start(a, &ConnectionConfig::default());
    let mut batch = cancel_batch(&sender, 0..3);
    assert_eq!((batch.len(), batch.bytes()), (3, 3 * cancel_len()));
    // busy or not: a batch is one write already
    just_written(&sender);
    sender.send_encoded_or_abort(&mut batch).await.unwrap();
    assert!(batch.is_empty());
    assert_eq!(
        written_now(&mut b),
        Some(3 * cancel_len()),
        "all three, by the sender"
    );
    assert_eq!(sender.queued_bytes(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn an_encoded_batch_of_one_on_a_busy_connection_is_left_to_the_writer_task() {
    let (_reader, sender, mut peer, _peer_sender) = pair(1 << 16);
    let mut batch = cancel_batch(&sender, 7..8);
    just_written(&sender);
    sender.send_encoded_or_abort(&mut batch).await.unwrap();
    assert!(batch.is_empty());
    assert!(sender.queued_bytes() > 0, "queued for the writer task");
    assert_eq!(read_cancels(&mut peer, 1).await, [7]);
}

#[tokio::test(flavor = "current_thread")]
async fn an_encoded_batch_queued_behind_frames_keeps_its_place_among_them() {
    let (_reader, sender, mut peer, _peer_sender) = pair(1 << 16);
    // The writer task has not run (one thread): a frame waits for it, so the batch
    // cannot be written directly, and is queued after that frame, before the next.
    sender.try_send(Frame::Cancel { id: 0 }).unwrap();
    let mut batch = cancel_batch(&sender, 1..4);
    sender.send_encoded_or_abort(&mut batch).await.unwrap();
    assert!(batch.is_empty());
    sender.try_send(Frame::Cancel { id: 4 }).unwrap();
    assert_eq!(read_cancels(&mut peer, 5).await, [0, 1, 2, 3, 4]);
    assert_nothing_left_queued(&sender).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_frame_too_large_is_not_encoded_into_a_batch_and_leaves_it_as_it_was() {
    let (a, _b) = tokio::io::duplex(1 << 16);
    let config = ConnectionConfig {
        max_frame_len: 256,
        ..ConnectionConfig::default()
    };
    let (_reader, sender) = start(a, &config);
    let mut batch = cancel_batch(&sender, 0..2);
    let refused = sender.encode_into(&msg(1000), &mut batch);
    assert!(
        matches!(
            refused,
            Err(ConnectionError::FrameTooLarge { limit: 256, .. })
        ),
        "{refused:?}"
    );
    assert_eq!((batch.len(), batch.bytes()), (2, 2 * cancel_len()));
}

#[tokio::test(flavor = "current_thread")]
async fn an_answer_encoded_from_a_borrowed_payload_is_the_response_frame_and_checked_alike() {
    use crate::frame::{Response, Status};

    // A 46-byte payload: a 60-byte body (preamble 2, id 8, status 2, message length 2).
    let payload = [7u8; 46];
    for limit in [59, 60] {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let config = ConnectionConfig {
            max_frame_len: limit,
            ..ConnectionConfig::default()
        };
        let (_reader, sender) = start(a, &config);
        let mut batch = cancel_batch(&sender, 0..1);
        let added = sender.encode_ok_response_into(9, &payload, &mut batch);
        if limit == 59 {
            assert!(
                matches!(
                    added,
                    Err(ConnectionError::FrameTooLarge {
                        size: 60,
                        limit: 59
                    })
                ),
                "{added:?}"
            );
            assert_eq!((batch.len(), batch.bytes()), (1, cancel_len()));
            continue;
        }
        added.unwrap();
        let response = Frame::Response(Response {
            id: 9,
            status: Status::OK,
            message: Default::default(),
            payload: Bytes::copy_from_slice(&payload),
        });
        let mut expected = cancel_batch(&sender, 0..1);
        sender.encode_into(&response, &mut expected).unwrap();
        assert_eq!((batch.len(), &batch.buf[..]), (2, &expected.buf[..]));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_encoded_batch_cut_short_by_a_full_stream_is_finished_by_the_writer_task() {
    // A 16-byte pipe: the sender writes what fits and leaves the rest, counted as
    // queued, to the writer task.
    let (_reader, sender, mut peer, _peer_sender) = pair(16);
    let mut batch = cancel_batch(&sender, 0..10);
    sender.send_encoded_or_abort(&mut batch).await.unwrap();
    assert!(sender.queued_bytes() > 0, "the rest is the writer's");
    assert_eq!(
        read_cancels(&mut peer, 10).await,
        (0..10).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn frames_encoded_into_the_queue_keep_their_order_among_queued_frames() {
    let (_reader, sender, mut peer, _peer_sender) = pair(1 << 16);
    // One thread: the writer task has not run, so everything is queued, in this order.
    sender.try_send_encoded(Frame::Cancel { id: 0 }).unwrap();
    sender.try_send_encoded(Frame::Cancel { id: 1 }).unwrap();
    sender.try_send(Frame::Cancel { id: 2 }).unwrap();
    sender.try_send_encoded(Frame::Cancel { id: 3 }).unwrap();
    // Too large to encode into the queue: queued whole, still in its place.
    let large = msg(APPEND_FRAME_MAX);
    sender.try_send_encoded(large.clone()).unwrap();
    sender.try_send_encoded(Frame::Cancel { id: 4 }).unwrap();
    assert_eq!(read_cancels(&mut peer, 4).await, [0, 1, 2, 3]);
    assert_eq!(peer.next().await.unwrap().unwrap(), large);
    assert_eq!(read_cancels(&mut peer, 1).await, [4]);
    assert_nothing_left_queued(&sender).await;
}

#[tokio::test]
async fn a_frame_encoded_into_the_queue_counts_against_the_byte_limit_and_comes_back_when_full() {
    fill_until_full(FrameSender::try_send_encoded).await;
}

#[tokio::test]
#[allow(clippy::result_large_err)] // fill_until_full's signature, as try_send's
async fn a_frame_its_sender_encodes_comes_back_whole_when_full_or_closed() {
    fill_until_full(|sender, frame| {
        sender
            .try_send_encoded_or_give_back(frame, false)
            .map_err(TrySendError::from)
    })
    .await;

    let (_reader, sender, _peer, _peer_sender) = pair(1 << 16);
    sender.close();
    tokio::time::timeout(Duration::from_secs(5), sender.closed())
        .await
        .expect("closed");
    match sender.try_send_encoded_or_give_back(msg(10), false) {
        Err(TryUnsent::Unsent(Unsent::Closed { frame, .. })) => assert_eq!(frame, msg(10)),
        other => panic!("expected the frame back, closed: {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_frame_past_the_byte_limit_beside_the_batch_is_refused_as_full_and_leaves_the_batch() {
    let (_reader, sender, _b) = unread_with_10_000_bytes_queued_at_most();
    // Nothing is queued: the batch alone fills the limit, though none of it is sent yet.
    let mut batch = EncodedFrames::default();
    let mut taken = 0;
    let refused = loop {
        match sender.try_encode_into(&msg(1000), &mut batch) {
            Ok(()) => taken += 1,
            Err(refused) => break refused,
        }
        assert!(taken < 100, "the byte limit was never applied");
    };
    assert!(matches!(refused, BatchError::Full), "{refused:?}");
    assert_eq!(batch.len(), taken);
    assert!((9..=10).contains(&taken), "{taken} frames of ~1 KB");
    assert!(batch.bytes() <= 10_000, "{}", batch.bytes());
    assert_eq!(sender.queued_bytes(), 0, "a batch counts once sent");
}

#[tokio::test(flavor = "current_thread")]
async fn a_delivery_is_encoded_counted_and_refused_as_its_msg_frame_would_be() {
    let (a, _b) = tokio::io::duplex(64);
    let config = ConnectionConfig {
        max_queued_bytes: 10_000,
        max_frame_len: 2_000,
        ..ConnectionConfig::default()
    };
    let (_reader, sender) = start(a, &config);
    let publish = |len: usize| crate::frame::Publish {
        subject: "s".into(),
        payload: Bytes::from(vec![0u8; len]),
        ..Default::default()
    };
    // the same frames, one way and the other, until the byte limit refuses one
    let fill = |encode: &dyn Fn(&mut EncodedFrames) -> Result<(), BatchError>| {
        let mut batch = EncodedFrames::default();
        loop {
            match encode(&mut batch) {
                Ok(()) => assert!(batch.len() < 100, "the byte limit was never applied"),
                Err(refused) => {
                    assert!(matches!(refused, BatchError::Full), "{refused:?}");
                    return batch;
                }
            }
        }
    };
    let small = publish(1000);
    let delivery = Delivery::new(&small).unwrap();
    let delivered = fill(&|batch| sender.try_encode_delivery_into(&delivery, 1, batch));
    let framed = fill(&|batch| sender.try_encode_into(&msg(1000), batch));
    assert_eq!(delivered.len(), framed.len());
    assert_eq!(delivered.buf, framed.buf, "the same bytes");
    assert_eq!(sender.queued_bytes(), 0, "a batch counts once sent");

    // over the frame limit this connection has: refused, naming both, batch untouched
    let large = publish(3000);
    let delivery = Delivery::new(&large).unwrap();
    let mut batch = EncodedFrames::default();
    let refused = sender
        .try_encode_delivery_into(&delivery, 1, &mut batch)
        .unwrap_err();
    assert!(
        matches!(
            refused,
            BatchError::Failed(ConnectionError::FrameTooLarge { limit: 2_000, size }) if size as usize == delivery.encoded_len()
        ),
        "{refused:?}"
    );
    assert!(batch.is_empty());

    // closed: refused as the connection's failure
    sender.close();
    let refused = sender
        .try_encode_delivery_into(&Delivery::new(&small).unwrap(), 1, &mut batch)
        .unwrap_err();
    assert!(matches!(refused, BatchError::Failed(_)), "{refused:?}");
    assert!(batch.is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_batch_that_finds_no_room_within_the_wait_is_full_and_leaves_nothing_counted() {
    let (_reader, sender, _b) = unread_with_10_000_bytes_queued_at_most();
    // The peer reads nothing: fill the queue, to the last small frame.
    while sender.try_send(msg(1000)).is_ok() {}
    while sender.try_send(Frame::Cancel { id: 99 }).is_ok() {}
    let queued = sender.queued_bytes();
    let mut batch = cancel_batch(&sender, 0..3);
    let sent = sender
        .send_encoded_within(&mut batch, Duration::from_millis(50))
        .await;
    assert!(matches!(sent, Err(BatchError::Full)), "{sent:?}");
    assert!(batch.is_empty(), "the frames are dropped");
    assert_eq!(
        sender.queued_bytes(),
        queued,
        "nothing of the batch counted"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_large_batch_queued_behind_a_frame_is_written_whole_in_its_place() {
    // 16 KiB or more: queued in the batch's own buffer, cut to its length, not copied.
    for bytes in [16 * 1024, 40 * 1024] {
        large_batch_behind_a_frame(bytes).await;
    }
}

async fn large_batch_behind_a_frame(bytes: usize) {
    let (_reader, sender, mut peer, _peer_sender) = pair(1 << 16);
    // One thread: the writer task has not run, so the batch is queued behind frame 0.
    sender.try_send(Frame::Cancel { id: 0 }).unwrap();
    let n = (bytes / cancel_len()) as u64 + 10;
    let mut batch = cancel_batch(&sender, 1..n + 1);
    assert!(batch.bytes() > bytes);
    sender
        .send_encoded_within(&mut batch, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(batch.is_empty());
    // The batch is reused for the next one, which must not disturb the first.
    for id in n + 1..n + 4 {
        sender
            .try_encode_into(&Frame::Cancel { id }, &mut batch)
            .unwrap();
    }
    sender
        .send_encoded_within(&mut batch, Duration::from_secs(1))
        .await
        .unwrap();
    sender.try_send(Frame::Cancel { id: n + 4 }).unwrap();
    let total = n as usize + 5;
    assert_eq!(
        read_cancels(&mut peer, total).await,
        (0..total as u64).collect::<Vec<_>>(),
        "a batch of {bytes} bytes or more"
    );
    assert_nothing_left_queued(&sender).await;
}

/// Sends `batch`, which is then empty with its room kept.
async fn send_keeping_room(sender: &FrameSender, batch: &mut EncodedFrames, capacity: usize) {
    sender
        .send_encoded_within(batch, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(batch.is_empty());
    assert!(batch.capacity() >= capacity, "{}", batch.capacity());
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_made_with_capacity_keeps_its_buffer_whether_written_or_queued() {
    let (_reader, sender, mut peer, _peer_sender) = pair(1 << 20);
    let capacity = 64 * 1024;
    let mut batch = EncodedFrames::with_capacity(capacity);
    let fill = |batch: &mut EncodedFrames, ids: std::ops::Range<u64>| {
        for id in ids {
            sender
                .try_encode_into(&Frame::Cancel { id }, batch)
                .unwrap();
        }
    };
    // 40 KiB of frames: over what a default batch keeps
    let n = (40 * 1024 / cancel_len()) as u64;
    // written at once: nothing is queued
    fill(&mut batch, 0..n);
    send_keeping_room(&sender, &mut batch, capacity).await;
    // queued behind a frame (the writer task has not run): its frames are copied
    sender.try_send(Frame::Cancel { id: n }).unwrap();
    fill(&mut batch, n + 1..2 * n + 1);
    send_keeping_room(&sender, &mut batch, capacity).await;
    // reused at once: the queued copy is not disturbed
    fill(&mut batch, 2 * n + 1..2 * n + 4);
    send_keeping_room(&sender, &mut batch, capacity).await;
    let total = 2 * n as usize + 4;
    assert_eq!(
        read_cancels(&mut peer, total).await,
        (0..total as u64).collect::<Vec<_>>()
    );
    assert_nothing_left_queued(&sender).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_reader_may_have_more_with_a_frame_buffered_or_after_a_read_that_filled_its_room() {
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;
    let (a, mut peer) = tokio::io::duplex(1 << 20);
    let (mut reader, _sender) = start(a, &ConnectionConfig::default());
    let encoded = |ids: std::ops::Range<u64>| {
        let mut buf = BytesMut::new();
        let mut codec = FrameCodec::new(1 << 20);
        for id in ids {
            codec.encode(&Frame::Cancel { id }, &mut buf).unwrap();
        }
        buf
    };
    // Three frames, which one short read takes: more while one is buffered, none after.
    peer.write_all(&encoded(0..3)).await.unwrap();
    for id in 0..3 {
        assert_eq!(reader.next().await.unwrap().unwrap(), Frame::Cancel { id });
        assert_eq!(reader.may_have_more(), id < 2, "after frame {id} of 3");
    }
    // Twice what the first read has room for: once its whole frames are taken, the
    // rest is still on the stream.
    let n = (2 * reader::MIN_READ / cancel_len()) as u64;
    peer.write_all(&encoded(3..3 + n)).await.unwrap();
    let mut next_id = 3;
    loop {
        let frame = reader.next().await.unwrap().unwrap();
        assert_eq!(frame, Frame::Cancel { id: next_id });
        next_id += 1;
        if !reader.has_frame() {
            break;
        }
    }
    assert!(next_id < 3 + n, "one read took everything");
    assert!(reader.may_have_more(), "the read filled its room");
    while next_id < 3 + n {
        let frame = reader.next().await.unwrap().unwrap();
        assert_eq!(frame, Frame::Cancel { id: next_id });
        next_id += 1;
    }
    assert!(
        !reader.may_have_more(),
        "all taken, the last read was short"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_reader_takes_a_routed_request_in_place_and_leaves_every_other_frame_to_next() {
    use crate::frame::Request;
    use crate::{Metadata, Utf8Bytes};
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;
    let config = ConnectionConfig {
        max_frame_len: 200,
        ..ConnectionConfig::default()
    };
    let (a, mut peer) = tokio::io::duplex(1 << 16);
    let (mut reader, _sender) = start(a, &config);
    let request = |id: u64, method: &'static str, metadata: Metadata| {
        Frame::Request(Request {
            id,
            timeout: id.is_multiple_of(2).then(|| Duration::from_millis(id)),
            method: Utf8Bytes::from_static(method),
            metadata,
            payload: Bytes::from(vec![id as u8; 3]),
        })
    };
    let mut traced = Metadata::new();
    traced.insert("trace", "t");
    let frames = [
        Frame::Ping { nonce: 9 },
        request(1, "Echo.echo", Metadata::new()),
        request(2, "Echo.unknown", Metadata::new()),
        request(3, "Echo.echo", traced.clone()),
        request(4, "Echo.echo", Metadata::new()),
        Frame::Cancel { id: 4 },
    ];
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::new(1 << 20);
    for frame in &frames {
        codec.encode(frame, &mut buf).unwrap();
    }
    codec
        .encode(&request(5, "Echo.echo", Metadata::new()), &mut buf)
        .unwrap();
    // one over the reader's limit, last
    let big = Frame::Request(Request {
        id: 6,
        timeout: None,
        method: Utf8Bytes::from_static("Echo.echo"),
        metadata: Metadata::new(),
        payload: Bytes::from(vec![0; 300]),
    });
    codec.encode(&big, &mut buf).unwrap();
    peer.write_all(&buf).await.unwrap();

    // The route names what it knows with a string of its own.
    static PATH: &str = "Echo.echo";
    let route = |method: &[u8]| (method == PATH.as_bytes()).then_some(("routed", PATH));
    // Nothing is read yet: nothing to take.
    assert!(reader.take_request(route).is_none());
    // The ping comes first: it is `next`'s (which answers it and returns the request
    // after it).
    assert_eq!(
        reader.next().await.unwrap().unwrap(),
        request(1, "Echo.echo", Metadata::new())
    );
    // A method the route does not know, then one with metadata: left in place, whole.
    assert!(reader.take_request(route).is_none());
    assert_eq!(
        reader.next().await.unwrap().unwrap(),
        request(2, "Echo.unknown", Metadata::new())
    );
    assert!(reader.take_request(route).is_none());
    assert_eq!(
        reader.next().await.unwrap().unwrap(),
        request(3, "Echo.echo", traced)
    );
    // A request the route knows is taken: what `decode` makes of it, named by the
    // route's string.
    let (taken, routed) = reader.take_request(route).expect("taken in place");
    assert_eq!(routed, "routed");
    assert_eq!(
        taken.method.as_str().as_ptr(),
        PATH.as_ptr(),
        "the route's string"
    );
    assert_eq!(
        Frame::Request(taken),
        request(4, "Echo.echo", Metadata::new())
    );
    // The frame after it is intact.
    assert!(reader.take_request(route).is_none());
    assert_eq!(
        reader.next().await.unwrap().unwrap(),
        Frame::Cancel { id: 4 }
    );
    let (taken, _) = reader.take_request(route).expect("taken in place");
    assert_eq!(
        Frame::Request(taken),
        request(5, "Echo.echo", Metadata::new())
    );
    // Over the frame limit: `next` refuses it as ever.
    assert!(reader.take_request(route).is_none());
    assert!(matches!(
        reader.next().await,
        Some(Err(ConnectionError::FrameTooLarge { limit: 200, .. }))
    ));
    assert!(
        reader.take_request(route).is_none(),
        "a failed reader takes nothing"
    );
}

fn request(id: u64, payload: &[u8]) -> Request {
    let mut metadata = Metadata::new();
    metadata.insert("authorization", "Bearer t0ken");
    Request {
        id,
        timeout: Some(Duration::from_millis(1500)),
        method: "Lab.echo".into(),
        metadata,
        payload: Bytes::copy_from_slice(payload),
    }
}

/// [`FrameSender::try_encode_request`] with `request`'s fields, borrowed.
fn try_encode(sender: &FrameSender, request: &Request) -> Result<Appended, ConnectionError> {
    sender.try_encode_request(
        request.id,
        request.timeout,
        &request.method,
        &request.metadata,
        &request.payload,
    )
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_encoded_from_borrowed_fields_arrives_as_that_request_frame_in_its_place() {
    let (_reader, sender, mut peer, _peer_sender) = pair(1 << 16);
    let first = request(1, b"small");
    let second = Request {
        timeout: None,
        metadata: Metadata::new(),
        ..request(2, &[7u8; 300])
    };
    assert_eq!(try_encode(&sender, &first).unwrap(), Appended::Queued);
    sender.try_send_encoded(Frame::Cancel { id: 9 }).unwrap();
    assert_eq!(try_encode(&sender, &second).unwrap(), Appended::Queued);
    assert_eq!(peer.next().await.unwrap().unwrap(), Frame::Request(first));
    assert_eq!(read_cancels(&mut peer, 1).await, [9]);
    assert_eq!(peer.next().await.unwrap().unwrap(), Frame::Request(second));
    assert_nothing_left_queued(&sender).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_too_large_to_encode_into_the_queue_is_left_to_its_caller_uncounted() {
    let (_reader, sender, _peer, _peer_sender) = pair(1 << 16);
    let large = request(1, &vec![0u8; APPEND_FRAME_MAX]);
    assert_eq!(try_encode(&sender, &large).unwrap(), Appended::TooLarge);
    assert_eq!(sender.queued_bytes(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_finding_the_queue_full_is_left_to_its_caller_and_counts_nothing() {
    let (_reader, sender, _b) = unread_with_10_000_bytes_queued_at_most();
    let mut taken = 0;
    while try_encode(&sender, &request(taken, &[0u8; 1000])).unwrap() == Appended::Queued {
        taken += 1;
        assert!(taken < 100, "the byte limit was never applied");
    }
    assert!(
        taken >= 9,
        "only {taken} requests of ~1 KB fit in 10,000 bytes"
    );
    let queued = sender.queued_bytes();
    assert!(queued <= 10_000, "{queued}");
    assert_eq!(
        try_encode(&sender, &request(taken, &[0u8; 1000])).unwrap(),
        Appended::NoRoom
    );
    assert_eq!(
        sender.queued_bytes(),
        queued,
        "a refused request counts nothing"
    );
}

#[tokio::test]
async fn a_request_over_the_frame_limit_or_on_a_closed_connection_fails_as_a_send_does() {
    let (a, _b) = tokio::io::duplex(1 << 16);
    let config = ConnectionConfig {
        max_frame_len: 200,
        ..ConnectionConfig::default()
    };
    let (_reader, sender) = start(a, &config);
    match try_encode(&sender, &request(1, &[0u8; 200])) {
        Err(ConnectionError::FrameTooLarge { limit: 200, .. }) => {}
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(
        try_encode(&sender, &request(2, b"fits")).unwrap(),
        Appended::Queued,
        "the connection stays up"
    );

    sender.close();
    tokio::time::timeout(Duration::from_secs(5), sender.closed())
        .await
        .expect("closed");
    match try_encode(&sender, &request(3, b"late")) {
        Err(ConnectionError::Closed { .. }) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
}
