//! Frame → bytes. Pure: writes into a caller's buffer, no I/O.

use bytes::{BufMut, BytesMut};

use super::{
    BODY_PREAMBLE_LEN, Connect, Frame, GoAway, Kind, Message, ProtocolError, Publish, Request,
    Response, Status, Subscribe, VERSION,
};
use crate::{Metadata, Utf8Bytes};

const U16_MAX: usize = u16::MAX as usize;
const U32_MAX: usize = u32::MAX as usize;

/// The length of a `Response` body after its preamble: id, status, the message as a
/// `str16` of `message_len` bytes (its length prefix included), and the payload.
const fn response_fields_len(message_len: usize, payload_len: usize) -> usize {
    8 + 2 + message_len + payload_len
}

/// A `Response` body: its fixed fields, preamble included, go in as one slice. The
/// caller has checked that `message` fits its `u16` length.
fn put_response(dst: &mut BytesMut, id: u64, status: Status, message: &[u8], payload: &[u8]) {
    let mut head = [0u8; 14];
    head[0] = VERSION;
    head[1] = Kind::Response as u8;
    head[2..10].copy_from_slice(&id.to_be_bytes());
    head[10..12].copy_from_slice(&status.0.to_be_bytes());
    head[12..14].copy_from_slice(&(message.len() as u16).to_be_bytes());
    dst.put_slice(&head);
    dst.put_slice(message);
    dst.put_slice(payload);
}

impl Publish {
    /// How much longer the `Msg` frame that delivers a publish is than the `Pub` frame:
    /// the 8-byte subscription id; every other field is the same.
    pub const DELIVERY_OVERHEAD: usize = 8;
}

/// A publish about to be delivered, as `Msg` frames, to one subscription or many: its
/// fields are checked against their wire types and its body length computed once, and
/// each frame is encoded from the publish itself (no [`Frame`] is built per
/// subscription). The bytes are those of the [`Frame::Msg`] with the same fields.
///
/// ```
/// use bytes::{Bytes, BytesMut};
/// use rpc_core::frame::{Delivery, Frame, Message, Publish};
///
/// let publish = Publish {
///     subject: "orders.new".into(),
///     reply: Default::default(),
///     headers: Default::default(),
///     payload: Bytes::from_static(b"hi"),
/// };
/// let delivery = Delivery::new(&publish).unwrap();
/// let mut frame = BytesMut::new();
/// Frame::Msg(Message {
///     sid: 7,
///     subject: publish.subject.clone(),
///     reply: publish.reply.clone(),
///     headers: publish.headers.clone(),
///     payload: publish.payload.clone(),
/// })
/// .encode(&mut frame)
/// .unwrap();
/// assert_eq!(delivery.encoded_len(), frame.len());
///
/// let mut delivered = BytesMut::new();
/// delivery.encode(7, &mut delivered);
/// assert_eq!(delivered, frame);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Delivery<'a> {
    publish: &'a Publish,
    len: usize,
}

impl<'a> Delivery<'a> {
    /// Checks `publish`'s fields as [`Frame::encoded_len`] does for its `Msg` frame.
    pub fn new(publish: &'a Publish) -> Result<Self, ProtocolError> {
        let len = BODY_PREAMBLE_LEN
            + Publish::DELIVERY_OVERHEAD
            + message_fields_len(
                Kind::Msg,
                &publish.subject,
                &publish.reply,
                &publish.headers,
                &publish.payload,
            )?;
        Ok(Delivery { publish, len })
    }

    /// The publish delivered.
    pub fn publish(&self) -> &'a Publish {
        self.publish
    }

    /// The body length of each `Msg` frame (without the 4-byte length prefix).
    pub fn encoded_len(&self) -> usize {
        self.len
    }

    /// Appends the body of the `Msg` frame for subscription `sid` (no length prefix).
    /// `dst` grows as needed; a caller that encodes into a reused buffer reserves
    /// [`Delivery::encoded_len`] first, once.
    pub fn encode(&self, sid: u64, dst: &mut BytesMut) {
        let p = self.publish;
        dst.put_u8(VERSION);
        dst.put_u8(Kind::Msg as u8);
        dst.put_u64(sid);
        put_message_fields(dst, &p.subject, &p.reply, &p.headers, &p.payload);
    }
}

/// The length of a `Request` body after its preamble: id, timeout, the method as a
/// `str16`, the metadata and a payload of `payload_len` bytes. Fails as
/// [`Frame::encoded_len`] does.
fn request_fields_len(
    method: &Utf8Bytes,
    metadata: &Metadata,
    payload_len: usize,
) -> Result<usize, ProtocolError> {
    Ok(8 + 8
        + str16_len(Kind::Request, "method", method)?
        + metadata_len(Kind::Request, metadata)?
        + payload_len)
}

impl Request {
    /// The body length (no length prefix) of a request with these fields and a payload
    /// of `payload_len` bytes: [`Frame::encoded_len`] of that [`Frame::Request`].
    pub(crate) fn encoded_len_of(
        method: &Utf8Bytes,
        metadata: &Metadata,
        payload_len: usize,
    ) -> Result<usize, ProtocolError> {
        Ok(BODY_PREAMBLE_LEN + request_fields_len(method, metadata, payload_len)?)
    }

    /// Appends the body (no length prefix) of a request with these fields, made from
    /// borrowed ones: the bytes of that [`Frame::Request`]. The caller has checked
    /// [`Request::encoded_len_of`].
    pub(crate) fn encode_fields(
        id: u64,
        timeout: Option<std::time::Duration>,
        method: &Utf8Bytes,
        metadata: &Metadata,
        payload: &[u8],
        dst: &mut BytesMut,
    ) {
        // 0 means "no deadline", so a zero timeout is sent as 1 µs: still expired.
        let micros = timeout.map_or(0, |t| {
            u64::try_from(t.as_micros()).unwrap_or(u64::MAX).max(1)
        });
        let mut head = [0u8; 20];
        head[0] = VERSION;
        head[1] = Kind::Request as u8;
        head[2..10].copy_from_slice(&id.to_be_bytes());
        head[10..18].copy_from_slice(&micros.to_be_bytes());
        head[18..20].copy_from_slice(&(method.len() as u16).to_be_bytes());
        dst.put_slice(&head);
        dst.put_slice(method.as_bytes());
        put_metadata(dst, metadata);
        dst.put_slice(payload);
    }
}

impl Response {
    /// The body length (no length prefix) of an answer with status OK, no message and a
    /// payload of `payload_len` bytes.
    pub(crate) const fn ok_len(payload_len: usize) -> usize {
        // The empty message is its 2-byte length alone.
        BODY_PREAMBLE_LEN + response_fields_len(2, payload_len)
    }

    /// Appends the body (no length prefix) of an answer to call `id` with status OK, no
    /// message and `payload`: the bytes of that [`Frame::Response`], made from a
    /// borrowed payload. [`Response::ok_len`] long.
    pub(crate) fn encode_ok(id: u64, payload: &[u8], dst: &mut BytesMut) {
        put_response(dst, id, Status::OK, &[], payload);
    }
}

impl Frame {
    /// The length of this frame's body on the wire (version, kind, header and payload;
    /// without the 4-byte length prefix).
    ///
    /// Fails when a field does not fit its wire type: a text field over 65,535 bytes,
    /// more than 65,535 metadata entries, or a metadata value over 4 GiB.
    pub fn encoded_len(&self) -> Result<usize, ProtocolError> {
        let kind = self.kind();
        let header = match self {
            Frame::Request(r) => request_fields_len(&r.method, &r.metadata, r.payload.len())?,
            Frame::Response(r) => {
                response_fields_len(str16_len(kind, "message", &r.message)?, r.payload.len())
            }
            Frame::Cancel { .. }
            | Frame::Unsub { .. }
            | Frame::Ping { .. }
            | Frame::Pong { .. } => 8,
            Frame::Connect(c) => {
                8 + str16_len(kind, "name", &c.name)? + str16_len(kind, "token", &c.token)?
            }
            Frame::Pub(p) => {
                message_fields_len(kind, &p.subject, &p.reply, &p.headers, &p.payload)?
            }
            Frame::Sub(s) => {
                8 + str16_len(kind, "subject", &s.subject)? + str16_len(kind, "queue", &s.queue)?
            }
            Frame::Msg(m) => {
                8 + message_fields_len(kind, &m.subject, &m.reply, &m.headers, &m.payload)?
            }
            Frame::GoAway(g) => 2 + str16_len(kind, "message", &g.message)?,
        };
        Ok(BODY_PREAMBLE_LEN + header)
    }

    /// Appends this frame's body (no length prefix) to `dst`.
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use rpc_core::frame::Frame;
    ///
    /// let mut buf = BytesMut::new();
    /// Frame::Cancel { id: 7 }.encode(&mut buf).unwrap();
    /// assert_eq!(&buf[..], &[1, 0x03, 0, 0, 0, 0, 0, 0, 0, 7]);
    /// ```
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let len = self.encoded_len()?;
        dst.reserve(len);
        self.encode_validated(dst);
        Ok(())
    }

    /// Writes the body; the caller has checked [`Frame::encoded_len`] and reserved room.
    pub(crate) fn encode_validated(&self, dst: &mut BytesMut) {
        // A call's and an answer's fixed fields, preamble included, go in as one slice:
        // every `put` checks and moves the buffer's length, and these two frames are most
        // of an RPC connection's traffic.
        if !matches!(self, Frame::Request(_) | Frame::Response(_)) {
            dst.put_slice(&[VERSION, self.kind() as u8]);
        }
        match self {
            Frame::Request(Request {
                id,
                timeout,
                method,
                metadata,
                payload,
            }) => Request::encode_fields(*id, *timeout, method, metadata, payload, dst),
            Frame::Response(Response {
                id,
                status,
                message,
                payload,
            }) => put_response(dst, *id, *status, message.as_bytes(), payload),
            Frame::Cancel { id } => dst.put_u64(*id),
            Frame::Unsub { sid } => dst.put_u64(*sid),
            Frame::Ping { nonce } | Frame::Pong { nonce } => dst.put_u64(*nonce),
            Frame::Connect(Connect {
                max_frame_len,
                max_payload,
                name,
                token,
            }) => {
                dst.put_u32(*max_frame_len);
                dst.put_u32(*max_payload);
                put_str16(dst, name);
                put_str16(dst, token);
            }
            Frame::Pub(Publish {
                subject,
                reply,
                headers,
                payload,
            }) => put_message_fields(dst, subject, reply, headers, payload),
            Frame::Sub(Subscribe {
                sid,
                subject,
                queue,
            }) => {
                dst.put_u64(*sid);
                put_str16(dst, subject);
                put_str16(dst, queue);
            }
            Frame::Msg(Message {
                sid,
                subject,
                reply,
                headers,
                payload,
            }) => {
                dst.put_u64(*sid);
                put_message_fields(dst, subject, reply, headers, payload);
            }
            Frame::GoAway(GoAway { code, message }) => {
                dst.put_u16(*code);
                put_str16(dst, message);
            }
        }
    }
}

/// The fields that `Pub` and `Msg` share: subject, reply, headers, payload.
fn message_fields_len(
    kind: Kind,
    subject: &Utf8Bytes,
    reply: &Utf8Bytes,
    headers: &Metadata,
    payload: &[u8],
) -> Result<usize, ProtocolError> {
    Ok(str16_len(kind, "subject", subject)?
        + str16_len(kind, "reply", reply)?
        + metadata_len(kind, headers)?
        + payload.len())
}

fn put_message_fields(
    dst: &mut BytesMut,
    subject: &Utf8Bytes,
    reply: &Utf8Bytes,
    headers: &Metadata,
    payload: &[u8],
) {
    put_str16(dst, subject);
    put_str16(dst, reply);
    put_metadata(dst, headers);
    dst.put_slice(payload);
}

fn str16_len(kind: Kind, field: &'static str, s: &Utf8Bytes) -> Result<usize, ProtocolError> {
    if s.len() > U16_MAX {
        return Err(ProtocolError::FieldTooLong {
            kind,
            field,
            len: s.len(),
            max: U16_MAX,
        });
    }
    Ok(2 + s.len())
}

fn metadata_len(kind: Kind, md: &Metadata) -> Result<usize, ProtocolError> {
    if md.len() > U16_MAX {
        return Err(ProtocolError::FieldTooLong {
            kind,
            field: "metadata count",
            len: md.len(),
            max: U16_MAX,
        });
    }
    let mut len = 2;
    for (key, value) in md.iter() {
        if value.len() > U32_MAX {
            return Err(ProtocolError::FieldTooLong {
                kind,
                field: "metadata value",
                len: value.len(),
                max: U32_MAX,
            });
        }
        len += str16_len(kind, "metadata key", key)? + 4 + value.len();
    }
    Ok(len)
}

// The casts below are exact: `encoded_len` has checked every length against its field.
fn put_str16(dst: &mut BytesMut, s: &Utf8Bytes) {
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

fn put_metadata(dst: &mut BytesMut, md: &Metadata) {
    dst.put_u16(md.len() as u16);
    for (key, value) in md.iter() {
        put_str16(dst, key);
        dst.put_u32(value.len() as u32);
        dst.put_slice(value);
    }
}
