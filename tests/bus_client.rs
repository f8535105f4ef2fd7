//! The remote bus client against a scripted broker: what it makes of the messages that
//! one read brings. The client hands consecutive messages for one subscription over
//! together (a run, at most 64); these tests send such runs in one write and check what
//! each subscriber gets.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw_peer;
use courier::Metadata;
use courier::bus::{Bus, DESCRIPTION_HEADER, STATUS_HEADER, SUBSCRIPTION_REFUSED, Subscriber};
use courier::connection::{EncodedFrames, FrameSender};
use courier::frame::{Connect, Frame, Message as MsgFrame, Publish};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// What a scripted broker reports: each subscription (subject and sid) and each publish.
struct Seen {
    subs: mpsc::UnboundedReceiver<(String, u64)>,
    publishes: mpsc::UnboundedReceiver<Publish>,
}

/// A bus connected to a broker that the test scripts: it answers the hello, reports each
/// subscription and publish, answers pings, and sends only what the test sends with the
/// returned sender.
async fn connect_to_scripted_broker() -> (Bus, FrameSender, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (subs_tx, subs) = mpsc::unbounded_channel();
    let (publishes_tx, publishes) = mpsc::unbounded_channel();
    let (sender_tx, sender_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut reader, sender) = raw_peer(stream);
        match reader.next().await {
            Some(Ok(Frame::Connect(_))) => {}
            other => panic!("expected the client's hello, got {other:?}"),
        }
        sender
            .send(Frame::Connect(Connect {
                max_frame_len: 1 << 20,
                name: "scripted".into(),
                ..Connect::default()
            }))
            .await
            .unwrap();
        let _ = sender_tx.send(sender);
        // Reading answers the client's pings (a subscribe waits for one round trip).
        while let Some(Ok(frame)) = reader.next().await {
            match frame {
                Frame::Sub(sub) => {
                    let _ = subs_tx.send((sub.subject.to_string(), sub.sid));
                }
                Frame::Pub(publish) => {
                    let _ = publishes_tx.send(publish);
                }
                _ => {}
            }
        }
    });
    let bus = Bus::connect(addr).await.unwrap();
    let sender = sender_rx.await.unwrap();
    (bus, sender, Seen { subs, publishes })
}

/// The sid the scripted broker saw for a subscription to `subject`.
async fn sid_of(seen: &mut Seen, subject: &str) -> u64 {
    loop {
        match seen.subs.recv().await.expect("a subscription") {
            (s, sid) if s == subject => return sid,
            _ => {} // the client's own, to its reply inbox
        }
    }
}

/// A bus subscribed to `a` and `b` through a scripted broker.
struct Scripted {
    /// Kept for the connection.
    _bus: Bus,
    /// Sends as the broker.
    broker: FrameSender,
    a: Subscriber,
    b: Subscriber,
    /// The sids the broker saw for them.
    sid_a: u64,
    sid_b: u64,
}

async fn subscribed_to_a_and_b() -> Scripted {
    let (bus, broker, mut seen) = connect_to_scripted_broker().await;
    let a = bus.subscribe("a").await.unwrap();
    let sid_a = sid_of(&mut seen, "a").await;
    let b = bus.subscribe("b").await.unwrap();
    let sid_b = sid_of(&mut seen, "b").await;
    Scripted {
        _bus: bus,
        broker,
        a,
        b,
        sid_a,
        sid_b,
    }
}

fn msg(sid: u64, subject: &'static str, n: u32) -> Frame {
    Frame::Msg(MsgFrame {
        sid,
        subject: subject.into(),
        payload: Bytes::from(n.to_string()),
        ..MsgFrame::default()
    })
}

/// The refusal the broker sends for a subscription it ends.
fn refusal(sid: u64, subject: &'static str, reason: &'static str) -> Frame {
    let mut headers = Metadata::new();
    headers.insert(STATUS_HEADER, SUBSCRIPTION_REFUSED);
    headers.insert(DESCRIPTION_HEADER, reason);
    Frame::Msg(MsgFrame {
        sid,
        subject: subject.into(),
        headers,
        ..MsgFrame::default()
    })
}

/// Sends `frames` in one write (the connection is idle), so that the client reads them
/// together.
async fn send_in_one_write(broker: &FrameSender, frames: &[Frame]) {
    let mut batch = EncodedFrames::default();
    for frame in frames {
        broker.try_encode_into(frame, &mut batch).unwrap();
    }
    broker
        .send_encoded_within(&mut batch, Duration::from_secs(5))
        .await
        .unwrap();
}

/// The next message's payload as a number; `None` once the subscription has ended.
async fn next_n(sub: &mut Subscriber) -> Option<u32> {
    let message = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a message, or the end, within 10 s")?;
    let text = std::str::from_utf8(&message.payload).expect("a number");
    Some(text.parse().expect("a number"))
}

#[tokio::test]
async fn messages_read_together_reach_each_subscription_whole_and_in_order() {
    let mut s = subscribed_to_a_and_b().await;

    // More than a run's worth for `a` on each side of `b`'s, all in one write.
    let mut frames: Vec<Frame> = (0..100).map(|n| msg(s.sid_a, "a", n)).collect();
    frames.extend((0..3).map(|n| msg(s.sid_b, "b", n)));
    frames.extend((100..200).map(|n| msg(s.sid_a, "a", n)));
    send_in_one_write(&s.broker, &frames).await;

    let mut got_a = Vec::new();
    for _ in 0..200 {
        got_a.push(next_n(&mut s.a).await.expect("a's subscription open"));
    }
    let mut got_b = Vec::new();
    for _ in 0..3 {
        got_b.push(next_n(&mut s.b).await.expect("b's subscription open"));
    }
    println!(
        "a received {} of 200, b {} of 3; dropped: {} and {}",
        got_a.len(),
        got_b.len(),
        s.a.dropped(),
        s.b.dropped()
    );
    assert_eq!(got_a, (0..200).collect::<Vec<_>>(), "a's, in order");
    assert_eq!(got_b, [0, 1, 2], "b's, in order");
    assert_eq!((s.a.dropped(), s.b.dropped()), (0, 0), "none dropped");
}

#[tokio::test]
async fn a_refusal_inside_a_run_ends_that_subscription_after_the_messages_before_it() {
    let mut s = subscribed_to_a_and_b().await;

    // One run for `a`: five messages, the refusal, and one more that must not reach the
    // subscriber (a broker sends nothing after a refusal; the client must not deliver
    // it if one did). Then, as the broker does, the end of `a`, and a message for `b`.
    let mut frames: Vec<Frame> = (0..5).map(|n| msg(s.sid_a, "a", n)).collect();
    frames.push(refusal(s.sid_a, "a", "over the scripted limit"));
    frames.push(msg(s.sid_a, "a", 5));
    frames.push(Frame::Unsub { sid: s.sid_a });
    frames.push(msg(s.sid_b, "b", 0));
    send_in_one_write(&s.broker, &frames).await;

    let mut got_a = Vec::new();
    while let Some(n) = next_n(&mut s.a).await {
        got_a.push(n);
    }
    let got_b = next_n(&mut s.b).await;
    println!(
        "a received {:?} before its end ({:?}); delivered after the refusal: {}",
        got_a,
        s.a.ended_by_broker(),
        got_a.iter().filter(|&&n| n >= 5).count()
    );
    assert_eq!(
        got_a,
        [0, 1, 2, 3, 4],
        "the messages before the refusal, only"
    );
    assert_eq!(s.a.ended_by_broker(), Some("over the scripted limit"));
    assert_eq!(got_b, Some(0), "the other subscription carries on");
}

#[tokio::test]
async fn the_reply_to_a_request_read_alone_reaches_the_broker_in_publish_order() {
    // A request read alone is answered by a write of the responder's own (when nothing
    // is queued on the connection); its reply must still keep its place among the
    // responder's publishes: after those made before it, before those made after it.
    let (bus, broker, mut seen) = connect_to_scripted_broker().await;
    let mut service = bus.subscribe("svc").await.unwrap();
    let sid = sid_of(&mut seen, "svc").await;

    // Round 0: the reply first, then a burst. Round 1: a burst, the reply, a burst.
    for (round, before) in [(0u32, 0u32), (1, 50)] {
        let inbox = format!("_INBOX.scripted.{round}");
        broker
            .send(Frame::Msg(MsgFrame {
                sid,
                subject: "svc".into(),
                reply: inbox.clone().into(),
                payload: Bytes::from("request"),
                ..MsgFrame::default()
            }))
            .await
            .unwrap();
        let request = tokio::time::timeout(Duration::from_secs(10), service.next())
            .await
            .expect("the request within 10 s")
            .expect("the subscription open");
        let reply_to = request.reply.clone().expect("a reply subject");
        let mut expected = Vec::new();
        for n in 0..before {
            bus.publish("before", n.to_string()).await.unwrap();
            expected.push(format!("before {n}"));
        }
        bus.publish(reply_to.to_string(), "answer").await.unwrap();
        expected.push(format!("{inbox} answer"));
        for n in 0..50u32 {
            bus.publish("after", n.to_string()).await.unwrap();
            expected.push(format!("after {n}"));
        }
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let publish = tokio::time::timeout(Duration::from_secs(10), seen.publishes.recv())
                .await
                .expect("every publish within 10 s")
                .expect("the scripted broker running");
            let payload = std::str::from_utf8(&publish.payload).unwrap().to_owned();
            got.push(format!("{} {payload}", publish.subject));
        }
        let at = got.iter().position(|p| p.starts_with("_INBOX."));
        println!(
            "round {round}: {} publishes received of {}, the reply at {at:?} (expected at {before})",
            got.len(),
            expected.len()
        );
        assert_eq!(
            got, expected,
            "round {round}: each publish once, in publish order"
        );
    }
}
