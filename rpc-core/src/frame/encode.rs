//! Frame → bytes. Pure: writes into a caller's buffer, no I/O.

use bytes::{BufMut, BytesMut};

use super::{
    BODY_PREAMBLE_LEN, Connect, Frame, GoAway, Kind, Message, ProtocolError, Publish, Request,
    Response, Subscribe, VERSION,
};
use crate::{Metadata, Utf8Bytes};

const U16_MAX: usize = u16::MAX as usize;
const U32_MAX: usize = u32::MAX as usize;

impl Publish {
    /// How much longer the `Msg` frame that delivers a publish is than the `Pub` frame:
    /// the 8-byte subscription id; every other field is the same.
    pub const DELIVERY_OVERHEAD: usize = 8;
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
            Frame::Request(r) => {
                8 + 8
                    + str16_len(kind, "method", &r.method)?
                    + metadata_len(kind, &r.metadata)?
                    + r.payload.len()
            }
            Frame::Response(r) => 8 + 2 + str16_len(kind, "message", &r.message)? + r.payload.len(),
            Frame::Cancel { .. }
            | Frame::Unsub { .. }
            | Frame::Ping { .. }
            | Frame::Pong { .. } => 8,
            Frame::Connect(c) => {
                8 + str16_len(kind, "name", &c.name)? + str16_len(kind, "token", &c.token)?
            }
            Frame::Pub(p) => {
                str16_len(kind, "subject", &p.subject)?
                    + str16_len(kind, "reply", &p.reply)?
                    + metadata_len(kind, &p.headers)?
                    + p.payload.len()
            }
            Frame::Sub(s) => {
                8 + str16_len(kind, "subject", &s.subject)? + str16_len(kind, "queue", &s.queue)?
            }
            Frame::Msg(m) => {
                8 + str16_len(kind, "subject", &m.subject)?
                    + str16_len(kind, "reply", &m.reply)?
                    + metadata_len(kind, &m.headers)?
                    + m.payload.len()
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
        dst.put_u8(VERSION);
        dst.put_u8(self.kind() as u8);
        match self {
            Frame::Request(Request {
                id,
                timeout,
                method,
                metadata,
                payload,
            }) => {
                dst.put_u64(*id);
                // 0 means "no deadline", so a zero timeout is sent as 1 µs: still expired.
                let micros = timeout.map_or(0, |t| {
                    u64::try_from(t.as_micros()).unwrap_or(u64::MAX).max(1)
                });
                dst.put_u64(micros);
                put_str16(dst, method);
                put_metadata(dst, metadata);
                dst.put_slice(payload);
            }
            Frame::Response(Response {
                id,
                status,
                message,
                payload,
            }) => {
                dst.put_u64(*id);
                dst.put_u16(status.0);
                put_str16(dst, message);
                dst.put_slice(payload);
            }
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
            }) => {
                put_str16(dst, subject);
                put_str16(dst, reply);
                put_metadata(dst, headers);
                dst.put_slice(payload);
            }
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
                put_str16(dst, subject);
                put_str16(dst, reply);
                put_metadata(dst, headers);
                dst.put_slice(payload);
            }
            Frame::GoAway(GoAway { code, message }) => {
                dst.put_u16(*code);
                put_str16(dst, message);
            }
        }
    }
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
