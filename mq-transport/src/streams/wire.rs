//! The stream protocol of the broker: an API over request/reply subjects, carried by
//! the bus's own `Pub` and `Msg` frames (`docs/PROTOCOL.md`, "Streams on the broker").
//!
//! * `$CR.API.<OP>…` subjects take JSON requests and answer on the reply subject: JSON on
//!   success; on failure a message with [`STATUS_HEADER`] [`API_ERROR`] and a
//!   [`WireError`] as JSON.
//! * A durable publish is a `Pub` to the message's own subject with a reply subject and
//!   the [`DURABLE_HEADER`]; its options travel as headers; the answer is a [`PubAck`](crate::PubAck)
//!   as JSON. Many may be in flight.
//! * A message read from a stream (get, range, fetch) is routed to the requester's reply
//!   subject with its subject, sequence and time in [`SUBJECT_HEADER`], [`SEQ_HEADER`]
//!   and [`TIME_HEADER`] after its own headers; a fetched one has the reply subject
//!   `$CR.ACK.<stream>.<consumer>.<deliveries>.<stream seq>.<consumer seq>.<pending>`,
//!   where the answer to it is published. A batch ends with [`END_OF_BATCH`].
//! * A range or fetch asked with `"packed": true` gets its messages packed, many to one
//!   message ([`PACKED_HEADER`], `pack`), before the end of the batch.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use mq_store::{Answer, ErrorKind, Publish, SharedNames, StoreError, StoredMessage, WireError};
use rpc_core::Metadata;
use serde::{Deserialize, Serialize};

use crate::message::{DESCRIPTION_HEADER, STATUS_HEADER};

/// The subjects of the stream API start with this.
pub const API_PREFIX: &str = "$CR.API.";
/// The reply subjects of fetched messages start with this.
pub const ACK_PREFIX: &str = "$CR.ACK.";
/// Plain acks for many messages of one consumer travel to
/// `$CR.ACKS.<stream>.<consumer>`, their stream sequences as the payload (`u64` each,
/// big-endian).
pub const ACKS_PREFIX: &str = "$CR.ACKS.";
/// The most sequences one `$CR.ACKS.…` message carries (32 KiB of payload).
pub const MAX_ACKS: usize = 4096;
/// Marks a publish as durable: the broker answers it on its reply subject.
pub const DURABLE_HEADER: &str = "Courier-Durable";
/// [`Publish::expected_last_seq`] on the wire.
pub const EXPECTED_LAST_SEQ_HEADER: &str = "Courier-Expected-Last-Seq";
/// [`Publish::expected_last_subject_seq`] on the wire.
pub const EXPECTED_LAST_SUBJECT_SEQ_HEADER: &str = "Courier-Expected-Last-Subject-Seq";
/// [`Publish::expected_last_msg_id`] on the wire.
pub const EXPECTED_LAST_MSG_ID_HEADER: &str = "Courier-Expected-Last-Msg-Id";
/// [`Publish::delay`] on the wire, in nanoseconds.
pub const DELAY_HEADER: &str = "Courier-Delay";
/// The subject of a message read from a stream.
pub const SUBJECT_HEADER: &str = "Courier-Subject";
/// The stream sequence of a message read from a stream.
pub const SEQ_HEADER: &str = "Courier-Seq";
/// When a message read from a stream was stored (nanoseconds since the Unix epoch).
pub const TIME_HEADER: &str = "Courier-Time";
/// [`STATUS_HEADER`] of an API error; the body is a [`WireError`] as JSON.
pub const API_ERROR: &str = "422";
/// [`STATUS_HEADER`] of the message that ends a batch of a fetch or a range.
pub const END_OF_BATCH: &str = "204";
/// The largest batch one fetch or range may ask for.
pub const MAX_BATCH: usize = 4096;
/// Marks a message that carries several messages read from a stream, packed (a range
/// or fetch asked with `"packed": true`); its value is how many.
pub const PACKED_HEADER: &str = "Courier-Packed";
/// A pack grows to about this many bytes of payload, then the next one starts (a
/// message larger than this travels alone).
pub const PACK_BYTES: usize = 256 * 1024;

/// The body of `$CR.API.STREAM.PURGE.<stream>`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PurgeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) filter: Option<String>,
}

/// The body of `$CR.API.STREAM.GET.<stream>`: by sequence, or the last on a subject.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct GetRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_by_subject: Option<String>,
}

/// The body of `$CR.API.STREAM.RANGE.<stream>`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RangeRequest {
    pub(crate) from: u64,
    pub(crate) max_msgs: usize,
    pub(crate) max_bytes: usize,
    /// Answer with packed messages ([`PACKED_HEADER`]) rather than one per message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) packed: bool,
}

/// The body of `$CR.API.CONSUMER.FETCH.<stream>.<consumer>`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FetchRequest {
    pub(crate) batch: usize,
    /// Milliseconds.
    pub(crate) max_wait_ms: u64,
    /// Answer with packed messages ([`PACKED_HEADER`]) rather than one per message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) packed: bool,
}

/// Where a fetched message stands: what its ack subject carries besides the stream,
/// the consumer and the stream sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) deliveries: u32,
    pub(crate) consumer_seq: u64,
    pub(crate) pending: u64,
}

/// The bytes [`pack`] adds for `message`, or `None` if it cannot be packed (a subject
/// or header name over 65,535 bytes, more than 65,535 headers, or a header value or
/// payload over 4 GiB; the store never holds such a message).
pub(crate) fn packed_len(message: &StoredMessage, place: Option<Place>) -> Option<usize> {
    let u16_max = usize::from(u16::MAX);
    let u32_max = u32::MAX as usize;
    if message.subject.len() > u16_max
        || message.headers.len() > u16_max
        || message.payload.len() > u32_max
    {
        return None;
    }
    let mut len = 8 + 8 + if place.is_some() { 4 + 8 + 8 } else { 0 };
    len += 2 + message.subject.len() + 2 + 4 + message.payload.len();
    for (name, value) in &message.headers {
        if name.len() > u16_max || value.len() > u32_max {
            return None;
        }
        len += 2 + name.len() + 4 + value.len();
    }
    Some(len)
}

/// Appends `message` to a pack: `seq u64` · `time i64` · for a fetched message
/// `deliveries u32` · `consumer_seq u64` · `pending u64` · `subject str16` · `headers
/// metadata` · `payload_len u32` · payload, in the frames' encoding (big-endian). The
/// caller has checked it with [`packed_len`].
pub(crate) fn pack(buf: &mut BytesMut, message: &StoredMessage, place: Option<Place>) {
    buf.put_u64(message.seq);
    buf.put_i64(message.time);
    if let Some(place) = place {
        buf.put_u32(place.deliveries);
        buf.put_u64(place.consumer_seq);
        buf.put_u64(place.pending);
    }
    buf.put_u16(message.subject.len() as u16);
    buf.put_slice(message.subject.as_bytes());
    buf.put_u16(message.headers.len() as u16);
    for (name, value) in &message.headers {
        buf.put_u16(name.len() as u16);
        buf.put_slice(name.as_bytes());
        buf.put_u32(value.len() as u32);
        buf.put_slice(value);
    }
    buf.put_u32(message.payload.len() as u32);
    buf.put_slice(&message.payload);
}

/// A pack read back field by field; every length is checked against what is left.
struct Unpacker {
    bytes: Bytes,
    at: usize,
}

impl Unpacker {
    /// Where the next `n` bytes are, once checked against what is left.
    fn next(&mut self, n: usize, field: &str) -> Result<std::ops::Range<usize>, String> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(format!(
                "packed message at byte {}: field `{field}` needs {n} bytes, {left} left",
                self.at
            ));
        }
        let range = self.at..self.at + n;
        self.at += n;
        Ok(range)
    }

    fn take(&mut self, n: usize, field: &str) -> Result<Bytes, String> {
        let range = self.next(n, field)?;
        Ok(self.bytes.slice(range))
    }

    fn int<const N: usize>(&mut self, field: &str) -> Result<[u8; N], String> {
        let range = self.next(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[range]);
        Ok(out)
    }

    fn u16(&mut self, field: &str) -> Result<usize, String> {
        Ok(usize::from(u16::from_be_bytes(self.int(field)?)))
    }

    fn u32(&mut self, field: &str) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.int(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.int(field)?))
    }

    fn str16(&mut self, field: &str) -> Result<&str, String> {
        let len = self.u16(field)?;
        let at = self.at;
        let range = self.next(len, field)?;
        std::str::from_utf8(&self.bytes[range])
            .map_err(|_| format!("packed message at byte {at}: field `{field}` is not UTF-8"))
    }
}

/// The `count` messages of a pack (with their places when `fetched`); an error names
/// the field and byte where the pack is malformed.
pub(crate) fn unpack(
    payload: Bytes,
    count: usize,
    fetched: bool,
) -> Result<Vec<(StoredMessage, Option<Place>)>, String> {
    let mut r = Unpacker {
        bytes: payload,
        at: 0,
    };
    // every packed message takes at least 24 bytes: a lying count cannot allocate much
    let mut out = Vec::with_capacity(count.min(r.bytes.len() / 24 + 1));
    let mut names = SharedNames::default();
    for _ in 0..count {
        let seq = r.u64("seq")?;
        let time = i64::from_be_bytes(r.int("time")?);
        let place = if fetched {
            Some(Place {
                deliveries: r.u32("deliveries")?,
                consumer_seq: r.u64("consumer_seq")?,
                pending: r.u64("pending")?,
            })
        } else {
            None
        };
        let subject = names.subject(r.str16("subject")?);
        let headers_len = r.u16("headers")?;
        let mut headers = Vec::with_capacity(headers_len.min(64));
        for index in 0..headers_len {
            let name = names.header(index, r.str16("header name")?);
            let len = r.u32("header value")? as usize;
            headers.push((name, r.take(len, "header value")?));
        }
        let len = r.u32("payload_len")? as usize;
        let payload = r.take(len, "payload")?;
        out.push((
            StoredMessage {
                seq,
                time,
                subject,
                headers,
                payload,
            },
            place,
        ));
    }
    if r.at != r.bytes.len() {
        return Err(format!(
            "packed message: {} bytes left after its {count} messages",
            r.bytes.len() - r.at
        ));
    }
    Ok(out)
}

/// Headers as the store takes them: name and value.
pub(crate) type StoreHeaders<'a> = Vec<(&'a str, &'a [u8])>;

/// The publish options carried by a durable publish's headers, and the headers with
/// them (and the durable mark) taken out.
pub(crate) fn split_options(headers: &Metadata) -> Result<(StoreHeaders<'_>, Publish), String> {
    let mut options = Publish::default();
    let mut rest = Vec::with_capacity(headers.len());
    for (name, value) in headers.iter() {
        let text =
            || std::str::from_utf8(value).map_err(|_| format!("header `{name}` is not UTF-8"));
        let number = || -> Result<u64, String> {
            text()?
                .parse()
                .map_err(|_| format!("header `{name}` is not a number: {:?}", text()))
        };
        match name.as_str() {
            DURABLE_HEADER => {}
            mq_store::MSG_ID_HEADER => options.msg_id = Some(text()?.to_owned()),
            EXPECTED_LAST_SEQ_HEADER => options.expected_last_seq = Some(number()?),
            EXPECTED_LAST_SUBJECT_SEQ_HEADER => options.expected_last_subject_seq = Some(number()?),
            EXPECTED_LAST_MSG_ID_HEADER => options.expected_last_msg_id = Some(text()?.to_owned()),
            DELAY_HEADER => options.delay = Some(Duration::from_nanos(number()?)),
            _ => rest.push((name.as_str(), &value[..])),
        }
    }
    Ok((rest, options))
}

/// Whether a header is one of the durable publish's own (not delivered to
/// subscribers).
pub(crate) fn is_control_header(name: &str) -> bool {
    matches!(
        name,
        DURABLE_HEADER
            | EXPECTED_LAST_SEQ_HEADER
            | EXPECTED_LAST_SUBJECT_SEQ_HEADER
            | EXPECTED_LAST_MSG_ID_HEADER
            | DELAY_HEADER
    )
}

/// The headers of a durable publish: the message's own, then the options.
pub(crate) fn option_headers(headers: &mut Metadata, options: &Publish) {
    headers.insert(DURABLE_HEADER, "1");
    if let Some(id) = &options.msg_id {
        headers.insert(mq_store::MSG_ID_HEADER, id.clone());
    }
    if let Some(seq) = options.expected_last_seq {
        headers.insert(EXPECTED_LAST_SEQ_HEADER, seq.to_string());
    }
    if let Some(seq) = options.expected_last_subject_seq {
        headers.insert(EXPECTED_LAST_SUBJECT_SEQ_HEADER, seq.to_string());
    }
    if let Some(id) = &options.expected_last_msg_id {
        headers.insert(EXPECTED_LAST_MSG_ID_HEADER, id.clone());
    }
    if let Some(at) = options.deliver_at {
        headers.insert(mq_store::DELIVER_AT_HEADER, at.to_string());
    }
    if let Some(delay) = options.delay
        && options.deliver_at.is_none()
    {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        headers.insert(DELAY_HEADER, nanos.to_string());
    }
}

/// A stored message's headers as sent to a reader: its own, then its subject,
/// sequence and time.
pub(crate) fn message_headers(message: &StoredMessage) -> Metadata {
    let mut headers = Metadata::new();
    for (name, value) in &message.headers {
        headers.append(name.to_string(), value.clone());
    }
    headers.append(SUBJECT_HEADER, message.subject.to_string());
    headers.append(SEQ_HEADER, message.seq.to_string());
    headers.append(TIME_HEADER, message.time.to_string());
    headers
}

/// A stored message back from what [`message_headers`] made of it.
pub(crate) fn stored_message(headers: &Metadata, payload: Bytes) -> Result<StoredMessage, String> {
    let mut subject = None;
    let mut seq = None;
    let mut time = None;
    let mut own = Vec::with_capacity(headers.len().saturating_sub(3));
    for (name, value) in headers.iter() {
        match name.as_str() {
            SUBJECT_HEADER => subject = std::str::from_utf8(value).ok().map(Arc::<str>::from),
            SEQ_HEADER => seq = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()),
            TIME_HEADER => time = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()),
            _ => own.push((Arc::from(name.as_str()), value.clone())),
        }
    }
    match (subject, seq, time) {
        (Some(subject), Some(seq), Some(time)) => Ok(StoredMessage {
            seq,
            time,
            subject,
            headers: own,
            payload,
        }),
        _ => Err(format!(
            "a stream message without valid {SUBJECT_HEADER}, {SEQ_HEADER} and {TIME_HEADER} headers"
        )),
    }
}

/// Where a fetched message stands, as its ack subject carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AckSubject {
    pub(crate) stream: String,
    pub(crate) consumer: String,
    pub(crate) deliveries: u32,
    pub(crate) stream_seq: u64,
    pub(crate) consumer_seq: u64,
    pub(crate) pending: u64,
}

impl AckSubject {
    pub(crate) fn encode(&self) -> String {
        format!(
            "{ACK_PREFIX}{}.{}.{}.{}.{}.{}",
            self.stream,
            self.consumer,
            self.deliveries,
            self.stream_seq,
            self.consumer_seq,
            self.pending
        )
    }

    /// Parses an ack subject; `None` if it is not one.
    pub(crate) fn parse(subject: &str) -> Option<AckSubject> {
        let rest = subject.strip_prefix(ACK_PREFIX)?;
        let mut tokens = rest.split('.');
        let stream = tokens.next()?.to_owned();
        let consumer = tokens.next()?.to_owned();
        let mut number = || tokens.next()?.parse::<u64>().ok();
        let deliveries = u32::try_from(number()?).ok()?;
        let (stream_seq, consumer_seq, pending) = (number()?, number()?, number()?);
        if tokens.next().is_some() || stream.is_empty() || consumer.is_empty() {
            return None;
        }
        Some(AckSubject {
            stream,
            consumer,
            deliveries,
            stream_seq,
            consumer_seq,
            pending,
        })
    }
}

/// An answer to a fetched message as its payload: `+ACK` (or empty), `-NAK`,
/// `-NAK <delay in ns>`, `+WPI`, `+TERM` or `+TERM <reason>`.
pub(crate) fn encode_answer(answer: &Answer) -> Bytes {
    match answer {
        Answer::Ack => Bytes::from_static(b"+ACK"),
        Answer::Nak(None) => Bytes::from_static(b"-NAK"),
        Answer::Nak(Some(delay)) => Bytes::from(format!("-NAK {}", delay.as_nanos())),
        Answer::InProgress => Bytes::from_static(b"+WPI"),
        Answer::Term(reason) if reason.is_empty() => Bytes::from_static(b"+TERM"),
        Answer::Term(reason) => Bytes::from(format!("+TERM {reason}")),
    }
}

/// Parses an answer's payload.
pub(crate) fn decode_answer(payload: &[u8]) -> Result<Answer, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "an answer is not UTF-8".to_owned())?;
    let (word, rest) = match text.split_once(' ') {
        Some((word, rest)) => (word, Some(rest)),
        None => (text, None),
    };
    match (word, rest) {
        ("" | "+ACK", None) => Ok(Answer::Ack),
        ("-NAK", None) => Ok(Answer::Nak(None)),
        ("-NAK", Some(nanos)) => nanos
            .parse::<u64>()
            .map(|n| Answer::Nak(Some(Duration::from_nanos(n))))
            .map_err(|_| format!("a -NAK delay is not nanoseconds: {nanos:?}")),
        ("+WPI", None) => Ok(Answer::InProgress),
        ("+TERM", reason) => Ok(Answer::Term(reason.unwrap_or_default().to_owned())),
        _ => Err(format!(
            "unknown answer {:?}: expected +ACK, -NAK [ns], +WPI or +TERM [reason]",
            text.chars().take(32).collect::<String>()
        )),
    }
}

/// The headers and body of an API error reply.
/// A publish acknowledgement's body: `{"stream":"…","seq":…,"duplicate":…}`, the JSON
/// serde writes, formatted directly (one per durable publish) unless the stream's name
/// needs escaping.
pub(crate) fn pub_ack_body(ack: &mq_store::PubAck) -> Bytes {
    let plain = ack
        .stream
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if !plain {
        return Bytes::from(serde_json::to_vec(ack).expect("a PubAck serializes"));
    }
    let mut body = String::with_capacity(ack.stream.len() + 50);
    body.push_str(r#"{"stream":""#);
    body.push_str(&ack.stream);
    body.push_str(r#"","seq":"#);
    // through `itoa`, not `core::fmt`: one of these is written per durable publish
    body.push_str(itoa::Buffer::new().format(ack.seq));
    body.push_str(if ack.duplicate {
        r#","duplicate":true}"#
    } else {
        r#","duplicate":false}"#
    });
    Bytes::from(body)
}

pub(crate) fn error_reply_wire(error: &WireError) -> (Metadata, Bytes) {
    let mut headers = Metadata::new();
    headers.insert(STATUS_HEADER, API_ERROR);
    headers.insert(DESCRIPTION_HEADER, error.message.clone());
    let body = serde_json::to_vec(error).unwrap_or_default();
    (headers, Bytes::from(body))
}

/// An error for a request the broker could not understand.
pub(crate) fn bad_request(message: impl Into<String>) -> WireError {
    WireError {
        kind: ErrorKind::BadRequest,
        message: message.into(),
    }
}

/// The error an API reply carries, if it is one.
pub(crate) fn reply_error(headers: &Metadata, body: &[u8]) -> Option<StoreError> {
    if headers.get_str(STATUS_HEADER) != Some(API_ERROR) {
        return None;
    }
    let error = serde_json::from_slice::<WireError>(body).unwrap_or_else(|_| WireError {
        kind: ErrorKind::Other,
        message: headers
            .get_str(DESCRIPTION_HEADER)
            .unwrap_or("the broker failed a stream request without saying why")
            .to_owned(),
    });
    Some(error.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn a_pub_ack_body_is_the_json_serde_writes(stream in ".{0,40}", seq: u64, duplicate: bool) {
            let ack = mq_store::PubAck { stream, seq, duplicate };
            proptest::prop_assert_eq!(&pub_ack_body(&ack)[..], &serde_json::to_vec(&ack).unwrap()[..]);
        }
    }
    use rpc_core::Utf8Bytes;
    use rpc_core::frame::{Frame, Message as MsgFrame, Publish as PubFrame};

    fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn publish(subject: &str, reply: &str, headers: Metadata, payload: &[u8]) -> Frame {
        Frame::Pub(PubFrame {
            subject: subject.to_owned().into(),
            reply: reply.to_owned().into(),
            headers,
            payload: Bytes::copy_from_slice(payload),
        })
    }

    fn msg(sid: u64, subject: &str, reply: &str, headers: Metadata, payload: &[u8]) -> Frame {
        Frame::Msg(MsgFrame {
            sid,
            subject: subject.to_owned().into(),
            reply: Utf8Bytes::from(reply.to_owned()),
            headers,
            payload: Bytes::copy_from_slice(payload),
        })
    }

    /// The stream protocol's golden vectors, built by the code that makes these frames,
    /// and found byte for byte in docs/PROTOCOL.md ("Streams on the broker").
    #[test]
    fn the_stream_protocol_golden_vectors_match_the_code_and_the_document() {
        let mut durable = Metadata::new();
        option_headers(
            &mut durable,
            &Publish {
                msg_id: Some("m1".into()),
                ..Publish::default()
            },
        );
        let ack = AckSubject {
            stream: "O".into(),
            consumer: "c".into(),
            deliveries: 1,
            stream_seq: 1,
            consumer_seq: 1,
            pending: 0,
        }
        .encode();
        let pub_ack = serde_json::to_vec(&mq_store::PubAck {
            stream: "O".into(),
            seq: 1,
            duplicate: false,
        })
        .unwrap();
        let fetch = serde_json::to_vec(&FetchRequest {
            batch: 1,
            max_wait_ms: 0,
            packed: false,
        })
        .unwrap();
        let fetch_packed = serde_json::to_vec(&FetchRequest {
            batch: 1,
            max_wait_ms: 0,
            packed: true,
        })
        .unwrap();
        let stored = StoredMessage {
            seq: 1,
            time: 5,
            subject: "o.a".into(),
            headers: Vec::new(),
            payload: Bytes::from_static(b"x"),
        };
        let fetched = message_headers(&stored);
        let place = Place {
            deliveries: 1,
            consumer_seq: 1,
            pending: 0,
        };
        let mut packed = BytesMut::new();
        pack(&mut packed, &stored, Some(place));
        let mut packed_headers = Metadata::new();
        packed_headers.insert(PACKED_HEADER, "1");
        let mut end = Metadata::new();
        end.insert(STATUS_HEADER, END_OF_BATCH);
        end.insert(DESCRIPTION_HEADER, "end of batch: 1 messages");
        let (error_headers, error_body) =
            error_reply_wire(&WireError::from(&StoreError::StreamNotFound("X".into())));
        let vectors = [
            ("durable publish", publish("o.a", "r", durable, b"x")),
            (
                "its acknowledgement",
                msg(1, "r", "", Metadata::new(), &pub_ack),
            ),
            (
                "fetch request",
                publish("$CR.API.CONSUMER.FETCH.O.c", "i", Metadata::new(), &fetch),
            ),
            ("fetched message", msg(2, "i", &ack, fetched, b"x")),
            (
                "its ack",
                publish(&ack, "", Metadata::new(), &encode_answer(&Answer::Ack)),
            ),
            ("end of batch", msg(2, "i", "", end, b"")),
            (
                "packed fetch request",
                publish(
                    "$CR.API.CONSUMER.FETCH.O.c",
                    "i",
                    Metadata::new(),
                    &fetch_packed,
                ),
            ),
            ("packed message", msg(2, "i", "", packed_headers, &packed)),
            (
                "packed acks",
                publish(
                    "$CR.ACKS.O.c",
                    "",
                    Metadata::new(),
                    &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2],
                ),
            ),
            ("API error", msg(1, "r", "", error_headers, &error_body)),
        ];
        let doc = include_str!("../../../docs/PROTOCOL.md");
        let doc_hex: String = doc.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut missing = Vec::new();
        for (name, frame) in vectors {
            let mut buf = bytes::BytesMut::new();
            frame.encode(&mut buf).unwrap();
            let text = hex(&buf);
            assert_eq!(Frame::decode(buf.freeze()).unwrap(), frame, "{name}");
            if !doc_hex.contains(&text) {
                missing.push(format!("{name}:\n{text}"));
            }
        }
        assert!(
            missing.is_empty(),
            "docs/PROTOCOL.md lacks these vectors:\n{}",
            missing.join("\n")
        );
    }

    fn stored(seq: u64, headers: Vec<(Arc<str>, Bytes)>, payload: &'static [u8]) -> StoredMessage {
        StoredMessage {
            seq,
            time: -7 + seq as i64,
            subject: format!("orders.{seq}").into(),
            headers,
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn packed_messages_come_back_as_they_were_with_their_places() {
        let messages = [
            stored(1, Vec::new(), b""),
            stored(
                2,
                vec![
                    ("Trace".into(), Bytes::from_static(b"t")),
                    ("Trace".into(), Bytes::from_static(b"u")),
                ],
                b"order two",
            ),
        ];
        for fetched in [false, true] {
            let mut buf = BytesMut::new();
            let mut want = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                let place = fetched.then_some(Place {
                    deliveries: i as u32 + 1,
                    consumer_seq: 10 + i as u64,
                    pending: 5,
                });
                let before = buf.len();
                pack(&mut buf, m, place);
                assert_eq!(Some(buf.len() - before), packed_len(m, place));
                want.push((m.clone(), place));
            }
            assert_eq!(unpack(buf.freeze(), 2, fetched).unwrap(), want);
        }
    }

    #[test]
    fn a_malformed_pack_is_an_error_naming_the_field_never_a_panic() {
        let mut buf = BytesMut::new();
        pack(
            &mut buf,
            &stored(1, vec![("H".into(), Bytes::from_static(b"v"))], b"xy"),
            None,
        );
        let whole = buf.freeze();
        // every truncation fails, naming a field
        for cut in 0..whole.len() {
            let e = unpack(whole.slice(..cut), 1, false).unwrap_err();
            assert!(e.contains("field `"), "{cut}: {e}");
        }
        // a count larger than what is there, or smaller
        assert!(unpack(whole.clone(), 2, false).unwrap_err().contains("seq"));
        assert!(
            unpack(whole.clone(), 0, false)
                .unwrap_err()
                .contains("left after")
        );
        // a huge count allocates nothing up front
        assert!(unpack(Bytes::new(), usize::MAX, false).is_err());
        // a subject that is not UTF-8
        let mut bad = whole.to_vec();
        bad[18] = 0xff;
        assert!(
            unpack(Bytes::from(bad), 1, false)
                .unwrap_err()
                .contains("not UTF-8")
        );
    }

    #[test]
    fn an_ack_subject_round_trips_and_junk_is_not_one() {
        let subject = AckSubject {
            stream: "ORDERS".into(),
            consumer: "billing".into(),
            deliveries: 2,
            stream_seq: 17,
            consumer_seq: 40,
            pending: 3,
        };
        assert_eq!(subject.encode(), "$CR.ACK.ORDERS.billing.2.17.40.3");
        assert_eq!(AckSubject::parse(&subject.encode()), Some(subject));
        for junk in [
            "$CR.ACK.ORDERS.billing.2.17.40",
            "$CR.ACK.ORDERS.billing.2.17.40.3.9",
            "$CR.ACK.ORDERS.billing.x.17.40.3",
            "$CR.ACK.ORDERS.billing.4294967296.17.40.3",
            "$CR.ACK..billing.2.17.40.3",
            "orders.billing.2.17.40.3",
        ] {
            assert_eq!(AckSubject::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn answers_round_trip_and_unknown_ones_are_refused_by_name() {
        for answer in [
            Answer::Ack,
            Answer::Nak(None),
            Answer::Nak(Some(Duration::from_millis(2500))),
            Answer::InProgress,
            Answer::Term(String::new()),
            Answer::Term("bad order".into()),
        ] {
            assert_eq!(decode_answer(&encode_answer(&answer)), Ok(answer));
        }
        assert_eq!(decode_answer(b""), Ok(Answer::Ack));
        assert!(decode_answer(b"+NOPE").unwrap_err().contains("+NOPE"));
        assert!(decode_answer(b"-NAK soon").unwrap_err().contains("soon"));
        assert!(decode_answer(&[0xff]).is_err());
    }

    #[test]
    fn publish_options_travel_as_headers_and_come_back() {
        let options = Publish {
            msg_id: Some("order-1".into()),
            expected_last_seq: Some(4),
            expected_last_subject_seq: Some(0),
            expected_last_msg_id: Some("order-0".into()),
            delay: Some(Duration::from_millis(1500)),
            ..Publish::default()
        };
        let mut headers = Metadata::new();
        headers.insert("Trace", "t");
        option_headers(&mut headers, &options);
        let (rest, back) = split_options(&headers).unwrap();
        assert_eq!(back, options);
        assert_eq!(rest, vec![("Trace", &b"t"[..])]);
        let mut bad = Metadata::new();
        bad.insert(EXPECTED_LAST_SEQ_HEADER, "four");
        assert!(
            split_options(&bad)
                .unwrap_err()
                .contains(EXPECTED_LAST_SEQ_HEADER)
        );
    }

    #[test]
    fn a_stored_message_survives_its_headers() {
        let message = StoredMessage {
            seq: 9,
            time: 1_700_000_000_123_456_789,
            subject: "orders.eu".into(),
            headers: vec![("Trace".into(), Bytes::from_static(b"t"))],
            payload: Bytes::from_static(b"order"),
        };
        let headers = message_headers(&message);
        assert_eq!(
            stored_message(&headers, message.payload.clone()),
            Ok(message)
        );
        assert!(stored_message(&Metadata::new(), Bytes::new()).is_err());
    }
}
