//! Golden vectors (they pin the wire format: changing one is a protocol change and needs a
//! new version) and property tests of encode/decode.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn md(pairs: &[(&'static str, &'static str)]) -> Metadata {
    pairs.iter().map(|(k, v)| (*k, *v)).collect()
}

/// One vector per kind (two for responses: success and error), as documented in
/// docs/PROTOCOL.md.
fn golden() -> Vec<(Frame, &'static str)> {
    vec![
        (
            Frame::Request(Request {
                id: 1,
                timeout: Some(Duration::from_secs(1)),
                method: "E.m".into(),
                metadata: md(&[("k", "v")]),
                payload: Bytes::from_static(b"hi"),
            }),
            "01 01  0000000000000001  00000000000F4240  0003 452E6D
             0001  0001 6B  00000001 76  6869",
        ),
        (
            Frame::Response(Response {
                id: 1,
                status: Status::OK,
                message: Utf8Bytes::default(),
                payload: Bytes::from_static(b"ok"),
            }),
            "01 02  0000000000000001  0000  0000  6F6B",
        ),
        (
            Frame::Response(Response {
                id: 2,
                status: Status::UNKNOWN_METHOD,
                message: "no".into(),
                payload: Bytes::new(),
            }),
            "01 02  0000000000000002  0002  0002 6E6F",
        ),
        (Frame::Cancel { id: 5 }, "01 03  0000000000000005"),
        (
            Frame::Connect(Connect {
                max_frame_len: 1024,
                max_payload: 512,
                name: "c".into(),
                token: Utf8Bytes::default(),
            }),
            "01 10  00000400  00000200  0001 63  0000",
        ),
        (
            Frame::Pub(Publish {
                subject: "a.b".into(),
                reply: "r".into(),
                headers: Metadata::new(),
                payload: Bytes::from_static(b"x"),
            }),
            "01 11  0003 612E62  0001 72  0000  78",
        ),
        (
            Frame::Sub(Subscribe {
                sid: 7,
                subject: "a.*".into(),
                queue: "q".into(),
            }),
            "01 12  0000000000000007  0003 612E2A  0001 71",
        ),
        (Frame::Unsub { sid: 7 }, "01 13  0000000000000007"),
        (
            Frame::Msg(Message {
                sid: 7,
                subject: "a.b".into(),
                reply: Utf8Bytes::default(),
                headers: md(&[("h", "1")]),
                payload: Bytes::from_static(b"x"),
            }),
            "01 14  0000000000000007  0003 612E62  0000  0001  0001 68  00000001 31  78",
        ),
        (Frame::Ping { nonce: 1 }, "01 20  0000000000000001"),
        (Frame::Pong { nonce: 1 }, "01 21  0000000000000001"),
        (
            Frame::GoAway(GoAway::new(GoAway::FRAME_TOO_LARGE, "big")),
            "01 22  0002  0003 626967",
        ),
    ]
}

#[test]
fn golden_vectors_cover_every_kind() {
    let kinds: std::collections::HashSet<Kind> = golden().iter().map(|(f, _)| f.kind()).collect();
    for kind in Kind::ALL {
        assert!(kinds.contains(&kind), "no golden vector for {kind}");
    }
}

#[test]
fn encode_matches_golden_vectors() {
    for (frame, expected) in golden() {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        assert_eq!(&buf[..], &hex(expected)[..], "{frame:?}");
        assert_eq!(frame.encoded_len().unwrap(), buf.len(), "{frame:?}");
    }
}

#[test]
fn decode_matches_golden_vectors() {
    for (frame, bytes) in golden() {
        assert_eq!(Frame::decode(Bytes::from(hex(bytes))).unwrap(), frame);
    }
}

#[test]
fn unknown_version_is_an_error_naming_both_versions() {
    let err = Frame::decode(Bytes::from(hex("02 20 0000000000000001"))).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::UnsupportedVersion {
            version: 2,
            supported: 1
        }
    );
    assert_eq!(
        err.to_string(),
        "unsupported protocol version 2 (this side speaks version 1)"
    );
}

#[test]
fn unknown_kind_is_an_error() {
    let err = Frame::decode(Bytes::from(hex("01 7F"))).unwrap_err();
    assert_eq!(err, ProtocolError::UnknownKind { kind: 0x7F });
    assert_eq!(err.to_string(), "unknown frame kind 0x7f");
}

#[test]
fn empty_body_is_missing_its_preamble() {
    assert_eq!(
        Frame::decode(Bytes::new()).unwrap_err(),
        ProtocolError::MissingPreamble { len: 0 }
    );
}

#[test]
fn truncated_field_is_named() {
    let err = Frame::decode(Bytes::from(hex("01 01 0000000000000001 0000"))).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::Truncated {
            kind: Kind::Request,
            field: "timeout",
            needed: 8,
            remaining: 2
        }
    );
}

#[test]
fn bytes_after_the_last_field_of_a_kind_without_payload_are_refused() {
    let err = Frame::decode(Bytes::from(hex("01 13 0000000000000001 FF"))).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::TrailingBytes {
            kind: Kind::Unsub,
            extra: 1
        }
    );
}

#[test]
fn text_that_is_not_utf8_is_refused() {
    let err = Frame::decode(Bytes::from(hex("01 22 0001 0001 FF"))).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::InvalidUtf8 {
            kind: Kind::GoAway,
            field: "message"
        }
    );
}

#[test]
fn metadata_count_larger_than_the_frame_is_truncated_not_allocated() {
    // 65,535 entries announced, none present.
    let err = Frame::decode(Bytes::from(hex("01 11 0001 61 0000 FFFF"))).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Truncated {
                field: "metadata key",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn zero_timeout_is_sent_as_already_expired_not_as_no_deadline() {
    let frame = Frame::Request(Request {
        timeout: Some(Duration::ZERO),
        method: "S.m".into(),
        ..Request::default()
    });
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).unwrap();
    let Frame::Request(back) = Frame::decode(buf.freeze()).unwrap() else {
        panic!()
    };
    assert_eq!(back.timeout, Some(Duration::from_micros(1)));
}

#[test]
fn text_over_65535_bytes_is_refused_on_encode() {
    let frame = Frame::GoAway(GoAway::new(0, "x".repeat(70_000)));
    let err = frame.encode(&mut BytesMut::new()).unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::FieldTooLong {
            field: "message",
            len: 70_000,
            ..
        }
    ));
}

#[test]
fn a_delivery_of_a_publish_whose_subject_is_over_65535_bytes_is_refused() {
    let publish = Publish {
        subject: "x".repeat(70_000).into(),
        reply: Utf8Bytes::default(),
        headers: Metadata::default(),
        payload: Bytes::new(),
    };
    let err = Delivery::new(&publish).unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::FieldTooLong {
            kind: Kind::Msg,
            field: "subject",
            len: 70_000,
            ..
        }
    ));
}

fn text() -> impl Strategy<Value = Utf8Bytes> {
    ".{0,12}".prop_map(Utf8Bytes::from)
}

fn payload() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn metadata() -> impl Strategy<Value = Metadata> {
    proptest::collection::vec((text(), payload()), 0..4)
        .prop_map(|pairs| pairs.into_iter().collect())
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u64>(),
            proptest::option::of(1u64..u64::MAX),
            text(),
            metadata(),
            payload()
        )
            .prop_map(
                |(id, t, method, metadata, payload)| Frame::Request(Request {
                    id,
                    timeout: t.map(Duration::from_micros),
                    method,
                    metadata,
                    payload,
                })
            ),
        (any::<u64>(), any::<u16>(), text(), payload()).prop_map(|(id, s, message, payload)| {
            Frame::Response(Response {
                id,
                status: Status(s),
                message,
                payload,
            })
        }),
        any::<u64>().prop_map(|id| Frame::Cancel { id }),
        (any::<u32>(), any::<u32>(), text(), text()).prop_map(
            |(max_frame_len, max_payload, name, token)| {
                Frame::Connect(Connect {
                    max_frame_len,
                    max_payload,
                    name,
                    token,
                })
            }
        ),
        (text(), text(), metadata(), payload()).prop_map(|(subject, reply, headers, payload)| {
            Frame::Pub(Publish {
                subject,
                reply,
                headers,
                payload,
            })
        }),
        (any::<u64>(), text(), text()).prop_map(|(sid, subject, queue)| Frame::Sub(Subscribe {
            sid,
            subject,
            queue
        })),
        any::<u64>().prop_map(|sid| Frame::Unsub { sid }),
        (any::<u64>(), text(), text(), metadata(), payload()).prop_map(
            |(sid, subject, reply, headers, payload)| Frame::Msg(Message {
                sid,
                subject,
                reply,
                headers,
                payload,
            })
        ),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (any::<u16>(), text()).prop_map(|(code, message)| Frame::GoAway(GoAway { code, message })),
    ]
}

proptest! {
    #[test]
    fn encode_then_decode_gives_the_same_frame(frame in arb_frame()) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        prop_assert_eq!(buf.len(), frame.encoded_len().unwrap());
        prop_assert_eq!(Frame::decode(buf.freeze()).unwrap(), frame);
    }

    #[test]
    fn a_checked_frame_is_encoded_byte_for_byte_as_the_codec_encodes_it(frame in arb_frame()) {
        use tokio_util::codec::Encoder;
        let mut codec = crate::codec::FrameCodec::new(1 << 20);
        let mut encoded = BytesMut::from(&b"before"[..]);
        codec.encode(&frame, &mut encoded).unwrap();
        let mut checked = BytesMut::from(&b"before"[..]);
        codec.encode_checked(&frame, &mut checked).unwrap();
        prop_assert_eq!(checked, encoded);
    }

    #[test]
    fn a_delivery_encodes_the_msg_frame_of_its_publish(
        sid in any::<u64>(),
        (subject, reply, headers, payload) in (text(), text(), metadata(), payload()),
    ) {
        let publish = Publish { subject, reply, headers, payload };
        let delivery = Delivery::new(&publish).unwrap();
        let msg = Frame::Msg(Message {
            sid,
            subject: publish.subject.clone(),
            reply: publish.reply.clone(),
            headers: publish.headers.clone(),
            payload: publish.payload.clone(),
        });
        let mut expected = BytesMut::from(&b"before"[..]);
        msg.encode(&mut expected).unwrap();
        let mut delivered = BytesMut::from(&b"before"[..]);
        delivery.encode(sid, &mut delivered);
        prop_assert_eq!(delivery.encoded_len(), msg.encoded_len().unwrap());
        prop_assert_eq!(delivered, expected);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Frame::decode(Bytes::from(bytes));
    }

    #[test]
    fn random_bytes_after_a_valid_preamble_never_panic(
        kind in proptest::sample::select(Kind::ALL.to_vec()),
        rest in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = vec![VERSION, kind as u8];
        bytes.extend(rest);
        let _ = Frame::decode(Bytes::from(bytes));
    }

    #[test]
    fn every_truncation_of_a_frame_decodes_or_errors_without_panicking(frame in arb_frame()) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        let full = buf.freeze();
        for cut in 0..full.len() {
            let _ = Frame::decode(full.slice(..cut));
        }
    }

    #[test]
    fn codec_never_panics_on_random_streams(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
    ) {
        use tokio_util::codec::Decoder;
        let mut codec = crate::codec::FrameCodec::new(128);
        let mut buf = BytesMut::new();
        for chunk in chunks {
            buf.extend_from_slice(&chunk);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
        let _ = codec.decode_eof(&mut buf);
    }
}

/// The body of `frame`, without its length prefix.
fn body_of(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).unwrap();
    buf.freeze()
}

#[test]
fn a_request_head_is_found_in_place_only_for_a_request_without_metadata() {
    let request = |metadata: Metadata| {
        Frame::Request(Request {
            id: 7,
            timeout: Some(Duration::from_micros(1500)),
            method: Utf8Bytes::from_static("Echo.echo"),
            metadata,
            payload: Bytes::from_static(b"args"),
        })
    };
    let body = body_of(&request(Metadata::new()));
    let head = RequestHead::parse(&body).unwrap();
    assert_eq!(head.id, 7);
    assert_eq!(head.timeout, Some(Duration::from_micros(1500)));
    assert_eq!(&body[head.method.clone()], b"Echo.echo");
    assert_eq!(&body[head.payload..], b"args");

    let mut metadata = Metadata::new();
    metadata.insert("trace", "1");
    assert_eq!(RequestHead::parse(&body_of(&request(metadata))), None);
    assert_eq!(RequestHead::parse(&body_of(&Frame::Cancel { id: 7 })), None);
    let mut other_version = body.to_vec();
    other_version[0] = VERSION + 1;
    assert_eq!(RequestHead::parse(&other_version), None);
}

proptest! {
    #[test]
    fn a_request_head_found_in_place_agrees_with_decode(frame in arb_frame()) {
        let body = body_of(&frame);
        let head = RequestHead::parse(&body);
        match &frame {
            Frame::Request(request) if request.metadata.is_empty() => {
                let head = head.expect("a request without metadata is found in place");
                prop_assert_eq!(head.id, request.id);
                prop_assert_eq!(head.timeout, request.timeout);
                prop_assert_eq!(&body[head.method.clone()], request.method.as_str().as_bytes());
                prop_assert_eq!(&body[head.payload..], &request.payload[..]);
            }
            _ => prop_assert_eq!(head, None),
        }
    }

    #[test]
    fn a_request_head_is_found_only_where_decode_finds_the_same_request(
        id in any::<u64>(),
        micros in prop_oneof![Just(0u64), any::<u64>()],
        method in proptest::collection::vec(any::<u8>(), 0..12),
        // the method length as sent: right, or off by a little
        skew in -2i32..3,
        count in prop_oneof![Just(0u16), any::<u16>()],
        rest in proptest::collection::vec(any::<u8>(), 0..24),
    ) {
        let mut body = vec![VERSION, Kind::Request as u8];
        body.extend(id.to_be_bytes());
        body.extend(micros.to_be_bytes());
        let sent_len = u16::try_from((method.len() as i32 + skew).max(0)).unwrap();
        body.extend(sent_len.to_be_bytes());
        body.extend(&method);
        body.extend(count.to_be_bytes());
        body.extend(rest);
        if let Some(head) = RequestHead::parse(&body) {
            // A name that is not UTF-8 is the one thing left to check (the reader does).
            if std::str::from_utf8(&body[head.method.clone()]).is_ok() {
                let Ok(Frame::Request(request)) = Frame::decode(Bytes::from(body.clone())) else {
                    panic!("found in place, refused by decode: {body:?}");
                };
                prop_assert_eq!(head.id, request.id);
                prop_assert_eq!(head.timeout, request.timeout);
                prop_assert_eq!(&body[head.method.clone()], request.method.as_str().as_bytes());
                prop_assert!(request.metadata.is_empty());
                prop_assert_eq!(&body[head.payload..], &request.payload[..]);
            }
        }
    }

    #[test]
    fn every_truncation_of_a_request_is_found_in_place_or_not_without_panicking(
        frame in arb_frame(),
    ) {
        let body = body_of(&frame);
        for cut in 0..body.len() {
            let _ = RequestHead::parse(&body[..cut]);
        }
    }
}

#[test]
fn an_ok_answer_is_found_in_place_only_with_status_ok_and_no_message() {
    let answer = |status: Status, message: &'static str| {
        Frame::Response(Response {
            id: 9,
            status,
            message: Utf8Bytes::from_static(message),
            payload: Bytes::from_static(b"result"),
        })
    };
    let body = body_of(&answer(Status::OK, ""));
    assert_eq!(OkResponseHead::parse(&body), Some(OkResponseHead { id: 9 }));
    assert_eq!(&body[OkResponseHead::LEN..], b"result");

    assert_eq!(
        OkResponseHead::parse(&body_of(&answer(Status(1), ""))),
        None
    );
    assert_eq!(
        OkResponseHead::parse(&body_of(&answer(Status::OK, "note"))),
        None
    );
    assert_eq!(
        OkResponseHead::parse(&body_of(&Frame::Cancel { id: 9 })),
        None
    );
    let mut other_version = body.to_vec();
    other_version[0] = VERSION + 1;
    assert_eq!(OkResponseHead::parse(&other_version), None);
    assert_eq!(
        OkResponseHead::parse(&body[..OkResponseHead::LEN - 1]),
        None
    );
}

proptest! {
    #[test]
    fn an_ok_answer_found_in_place_agrees_with_decode(frame in arb_frame()) {
        let body = body_of(&frame);
        match &frame {
            Frame::Response(r) if r.status == Status::OK && r.message.is_empty() => {
                prop_assert_eq!(OkResponseHead::parse(&body), Some(OkResponseHead { id: r.id }));
                prop_assert_eq!(&body[OkResponseHead::LEN..], &r.payload[..]);
            }
            _ => prop_assert_eq!(OkResponseHead::parse(&body), None),
        }
    }

    #[test]
    fn an_ok_answer_is_found_in_place_only_where_decode_finds_the_same_answer(
        head in proptest::collection::vec(any::<u8>(), 0..16),
        kind in prop_oneof![Just(Kind::Response as u8), any::<u8>()],
        status in prop_oneof![Just(0u16), any::<u16>()],
        message_len in prop_oneof![Just(0u16), 0u16..4],
        rest in proptest::collection::vec(any::<u8>(), 0..24),
    ) {
        // A body shaped like an answer (the first bytes of `head` stand in for the id,
        // or cut it short), with the kind, status and message length varied.
        let mut body = vec![VERSION, kind];
        body.extend(head.iter().take(8));
        body.extend(status.to_be_bytes());
        body.extend(message_len.to_be_bytes());
        body.extend(rest);
        if let Some(OkResponseHead { id }) = OkResponseHead::parse(&body) {
            let Ok(Frame::Response(answer)) = Frame::decode(Bytes::from(body.clone())) else {
                panic!("found in place, refused by decode: {body:?}");
            };
            prop_assert_eq!(answer.id, id);
            prop_assert_eq!(answer.status, Status::OK);
            prop_assert!(answer.message.is_empty());
            prop_assert_eq!(&body[OkResponseHead::LEN..], &answer.payload[..]);
        }
    }
}
