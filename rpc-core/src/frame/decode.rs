//! Bytes → frame. Pure, and total: any input gives a frame or a [`ProtocolError`].

use std::time::Duration;

use bytes::{Buf, Bytes};

use super::{
    Connect, Frame, GoAway, Kind, Message, ProtocolError, Publish, Request, Response, Status,
    Subscribe, VERSION,
};
use crate::{Metadata, Utf8Bytes};

/// The smallest encoding of one metadata entry: empty key (2) and empty value (4).
const MIN_METADATA_ENTRY: usize = 6;

impl Frame {
    /// Decodes one frame body (what follows the length prefix).
    ///
    /// The payload and every text field are slices of `body`: nothing is copied.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use rpc_core::frame::{Frame, ProtocolError};
    ///
    /// let frame = Frame::decode(Bytes::from_static(&[1, 0x20, 0, 0, 0, 0, 0, 0, 0, 9])).unwrap();
    /// assert_eq!(frame, Frame::Ping { nonce: 9 });
    ///
    /// let err = Frame::decode(Bytes::from_static(&[2, 0x20])).unwrap_err();
    /// assert_eq!(err, ProtocolError::UnsupportedVersion { version: 2, supported: 1 });
    /// ```
    pub fn decode(mut body: Bytes) -> Result<Frame, ProtocolError> {
        if body.len() < 2 {
            return Err(ProtocolError::MissingPreamble { len: body.len() });
        }
        let version = body.get_u8();
        if version != VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                version,
                supported: VERSION,
            });
        }
        let kind_byte = body.get_u8();
        let kind =
            Kind::from_u8(kind_byte).ok_or(ProtocolError::UnknownKind { kind: kind_byte })?;
        let mut r = Reader { kind, buf: body };
        let frame = match kind {
            Kind::Request => {
                let id = r.u64("id")?;
                let micros = r.u64("timeout")?;
                let method = r.str16("method")?;
                let metadata = r.metadata()?;
                Frame::Request(Request {
                    id,
                    timeout: (micros != 0).then(|| Duration::from_micros(micros)),
                    method,
                    metadata,
                    payload: r.rest(),
                })
            }
            Kind::Response => Frame::Response(Response {
                id: r.u64("id")?,
                status: Status(r.u16("status")?),
                message: r.str16("message")?,
                payload: r.rest(),
            }),
            Kind::Cancel => Frame::Cancel { id: r.u64("id")? },
            Kind::Connect => Frame::Connect(Connect {
                max_frame_len: r.u32("max_frame_len")?,
                max_payload: r.u32("max_payload")?,
                name: r.str16("name")?,
                token: r.str16("token")?,
            }),
            Kind::Pub => Frame::Pub(Publish {
                subject: r.str16("subject")?,
                reply: r.str16("reply")?,
                headers: r.metadata()?,
                payload: r.rest(),
            }),
            Kind::Sub => Frame::Sub(Subscribe {
                sid: r.u64("sid")?,
                subject: r.str16("subject")?,
                queue: r.str16("queue")?,
            }),
            Kind::Unsub => Frame::Unsub { sid: r.u64("sid")? },
            Kind::Msg => Frame::Msg(Message {
                sid: r.u64("sid")?,
                subject: r.str16("subject")?,
                reply: r.str16("reply")?,
                headers: r.metadata()?,
                payload: r.rest(),
            }),
            Kind::Ping => Frame::Ping {
                nonce: r.u64("nonce")?,
            },
            Kind::Pong => Frame::Pong {
                nonce: r.u64("nonce")?,
            },
            Kind::GoAway => Frame::GoAway(GoAway {
                code: r.u16("code")?,
                message: r.str16("message")?,
            }),
        };
        r.finish()?;
        Ok(frame)
    }
}

/// Where the fields of a request body lie: what a server's read loop needs to take a
/// request from its read buffer without making a [`Frame`] of it
/// (`FrameReader::take_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHead {
    pub(crate) id: u64,
    pub(crate) timeout: Option<Duration>,
    /// The method name's bytes within the body (not checked as UTF-8 here).
    pub(crate) method: std::ops::Range<usize>,
    /// Where the payload starts; it runs to the end of the body.
    pub(crate) payload: usize,
}

impl RequestHead {
    /// The fields of `body` when it is a request without metadata, or `None` for any
    /// other body: another kind, a request with metadata, or one [`Frame::decode`]
    /// would refuse as truncated or of another version. The method name is not checked
    /// as UTF-8: a caller names the request with a string of its own that equals these
    /// bytes, or leaves the frame to `decode`, which refuses a name that is not. For a
    /// request it accepts whose name is UTF-8, `decode` gives the same id, timeout,
    /// method and payload.
    pub(crate) fn parse(body: &[u8]) -> Option<RequestHead> {
        const FIXED: usize = 2 + 8 + 8 + 2; // version, kind, id, timeout, method length
        let fixed = body.get(..FIXED)?;
        if fixed[0] != VERSION || fixed[1] != Kind::Request as u8 {
            return None;
        }
        let id = u64::from_be_bytes(fixed[2..10].try_into().ok()?);
        let micros = u64::from_be_bytes(fixed[10..18].try_into().ok()?);
        let method_len = usize::from(u16::from_be_bytes([fixed[18], fixed[19]]));
        let method = FIXED..FIXED + method_len;
        // the metadata count, which must be 0 here
        let count = body.get(method.end..method.end + 2)?;
        if count != [0, 0] {
            return None;
        }
        let payload = method.end + 2;
        Some(RequestHead {
            id,
            timeout: (micros != 0).then(|| Duration::from_micros(micros)),
            method,
            payload,
        })
    }
}

/// An answer with status OK and no message, read in place: what a client's read loop
/// needs to hand a call its answer without making a [`Frame`] of it
/// (`FrameReader::take_ok_response`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OkResponseHead {
    pub(crate) id: u64,
}

impl OkResponseHead {
    /// The preamble, id, status and the empty message's length: the payload follows.
    pub(crate) const LEN: usize = 2 + 8 + 2 + 2;

    /// The head of `body` when it is an answer with status OK and an empty message, or
    /// `None` for any other body: another kind or version, another status, a message,
    /// or one too short for these fields. For a body it accepts, [`Frame::decode`]
    /// gives a [`Response`] with that id, status OK, no message, and the bytes from
    /// [`OkResponseHead::LEN`] on as its payload.
    pub(crate) fn parse(body: &[u8]) -> Option<OkResponseHead> {
        let head: &[u8; Self::LEN] = body.get(..Self::LEN)?.try_into().ok()?;
        let [version, kind, id @ .., s0, s1, m0, m1] = *head;
        if version != VERSION
            || kind != Kind::Response as u8
            || Status(u16::from_be_bytes([s0, s1])) != Status::OK
            || [m0, m1] != [0, 0]
        {
            return None;
        }
        Some(OkResponseHead {
            id: u64::from_be_bytes(id),
        })
    }
}

/// A cursor over a frame body whose every read is bounds-checked.
struct Reader {
    kind: Kind,
    buf: Bytes,
}

impl Reader {
    fn need(&self, field: &'static str, needed: usize) -> Result<(), ProtocolError> {
        if self.buf.remaining() < needed {
            return Err(ProtocolError::Truncated {
                kind: self.kind,
                field,
                needed,
                remaining: self.buf.remaining(),
            });
        }
        Ok(())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        self.need(field, 2)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        self.need(field, 4)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        self.need(field, 8)?;
        Ok(self.buf.get_u64())
    }

    fn bytes(&mut self, field: &'static str, len: usize) -> Result<Bytes, ProtocolError> {
        self.need(field, len)?;
        if len == 0 {
            // An empty field (an answer's message, a message's reply subject) holds no
            // reference to the read buffer: one count fewer to take, and to give back
            // from whichever thread drops the frame.
            return Ok(Bytes::new());
        }
        Ok(self.buf.split_to(len))
    }

    fn str16(&mut self, field: &'static str) -> Result<Utf8Bytes, ProtocolError> {
        let len = usize::from(self.u16(field)?);
        let bytes = self.bytes(field, len)?;
        Utf8Bytes::try_from(bytes).map_err(|_| ProtocolError::InvalidUtf8 {
            kind: self.kind,
            field,
        })
    }

    fn metadata(&mut self) -> Result<Metadata, ProtocolError> {
        let count = usize::from(self.u16("metadata count")?);
        if count == 0 {
            return Ok(Metadata::new()); // most frames carry none
        }
        // Never reserve more entries than the remaining bytes could hold.
        let mut md = Metadata::with_capacity(count.min(self.buf.remaining() / MIN_METADATA_ENTRY));
        for _ in 0..count {
            let key = self.str16("metadata key")?;
            let len = self.u32("metadata value")?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let value = self.bytes("metadata value", len)?;
            md.push_raw(key, value);
        }
        Ok(md)
    }

    /// The payload: everything left. Taken whole rather than split off, so that the
    /// body's handle on the read buffer becomes the payload's: one reference count
    /// fewer to take now and to give back when the body is dropped.
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn finish(self) -> Result<(), ProtocolError> {
        match self.buf.remaining() {
            0 => Ok(()),
            extra => Err(ProtocolError::TrailingBytes {
                kind: self.kind,
                extra,
            }),
        }
    }
}
