//! Frames: the one wire format shared by RPC, the bus and connection control.
//!
//! A frame on the wire is a 4-byte big-endian length (written and read by tokio-util's
//! `LengthDelimitedCodec` conventions, see [`crate::codec`]) followed by the frame body
//! that this module encodes and decodes:
//!
//! ```text
//! +---------+--------+----------------------+------------------+
//! | version |  kind  | kind-specific header | payload (opaque) |
//! |   u8    |   u8   |                      |  rest of frame   |
//! +---------+--------+----------------------+------------------+
//! ```
//!
//! [`Frame::encode`] and [`Frame::decode`] are pure functions over byte buffers, testable
//! without any I/O. Decoding never panics: every length is checked against what is left
//! of the frame before anything is sliced or allocated, and a problem comes back as a
//! [`ProtocolError`] that names the field. `docs/PROTOCOL.md` draws every kind's bytes;
//! the golden vectors in this module's tests pin them.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

pub(crate) use self::decode::{OkResponseHead, RequestHead};
pub use self::encode::Delivery;
pub use crate::error::ProtocolError;
use crate::{Metadata, Utf8Bytes};

/// The protocol version this build speaks. A frame with another version is refused with
/// [`ProtocolError::UnsupportedVersion`].
pub const VERSION: u8 = 1;

/// Bytes every frame body starts with: version and kind.
pub const BODY_PREAMBLE_LEN: usize = 2;

/// The kind byte: which header layout follows.
///
/// `0x0_` are RPC kinds, `0x1_` bus kinds and `0x2_` connection control.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// An RPC call: [`Request`].
    Request = 0x01,
    /// The answer to a call: [`Response`].
    Response = 0x02,
    /// The caller gave up on a call: [`Frame::Cancel`].
    Cancel = 0x03,
    /// Introduction of a bus peer: [`Connect`].
    Connect = 0x10,
    /// A message published to a subject: [`Publish`].
    Pub = 0x11,
    /// Interest in a subject: [`Subscribe`].
    Sub = 0x12,
    /// End of interest: [`Frame::Unsub`].
    Unsub = 0x13,
    /// A message delivered to a subscription: [`Message`].
    Msg = 0x14,
    /// Liveness probe: [`Frame::Ping`].
    Ping = 0x20,
    /// Answer to a ping: [`Frame::Pong`].
    Pong = 0x21,
    /// The sender stops taking new work, and says why: [`GoAway`].
    GoAway = 0x22,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 11] = [
        Kind::Request,
        Kind::Response,
        Kind::Cancel,
        Kind::Connect,
        Kind::Pub,
        Kind::Sub,
        Kind::Unsub,
        Kind::Msg,
        Kind::Ping,
        Kind::Pong,
        Kind::GoAway,
    ];

    /// The kind for a byte, if it is one this version knows.
    pub fn from_u8(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == byte)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One frame, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// An RPC call.
    Request(Request),
    /// The answer to a call.
    Response(Response),
    /// The caller no longer wants the answer to call `id`; the server aborts its handler.
    Cancel {
        /// The request id of the call to cancel.
        id: u64,
    },
    /// Introduction of a bus peer.
    Connect(Connect),
    /// Publish a message.
    Pub(Publish),
    /// Subscribe to a subject.
    Sub(Subscribe),
    /// Remove subscription `sid`.
    Unsub {
        /// The subscription id given in [`Subscribe::sid`].
        sid: u64,
    },
    /// A message delivered to a subscription.
    Msg(Message),
    /// Liveness probe; the peer answers with a [`Frame::Pong`] carrying the same nonce.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The sender takes no new work on this connection.
    GoAway(GoAway),
}

impl Frame {
    /// This frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Request(_) => Kind::Request,
            Frame::Response(_) => Kind::Response,
            Frame::Cancel { .. } => Kind::Cancel,
            Frame::Connect(_) => Kind::Connect,
            Frame::Pub(_) => Kind::Pub,
            Frame::Sub(_) => Kind::Sub,
            Frame::Unsub { .. } => Kind::Unsub,
            Frame::Msg(_) => Kind::Msg,
            Frame::Ping { .. } => Kind::Ping,
            Frame::Pong { .. } => Kind::Pong,
            Frame::GoAway(_) => Kind::GoAway,
        }
    }
}

/// An RPC call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the caller, unique among its calls in flight on this connection.
    pub id: u64,
    /// Time left until the caller gives up, relative to when the frame was sent, so that
    /// peers need no synchronised clocks. `None` is encoded as 0: no deadline.
    pub timeout: Option<Duration>,
    /// `"Service.method"`.
    pub method: Utf8Bytes,
    /// Metadata of the call (for example an authorization token).
    pub metadata: Metadata,
    /// The serialized arguments; opaque to the framing.
    pub payload: Bytes,
}

/// The answer to a call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// The id of the [`Request`] this answers.
    pub id: u64,
    /// [`Status::OK`] when the handler ran and `payload` holds its serialized return value
    /// (which may itself be an application error, in the service's own types).
    pub status: Status,
    /// What went wrong, when `status` is not OK; empty otherwise.
    pub message: Utf8Bytes,
    /// The serialized return value.
    pub payload: Bytes,
}

/// Why a server could not answer a call with its handler's return value.
///
/// Codes this build does not know are kept as they are (forward compatibility) and shown
/// as `Status(n)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(pub u16);

impl Status {
    /// The handler ran; the payload is its return value.
    pub const OK: Status = Status(0);
    /// No service of that name on this server.
    pub const UNKNOWN_SERVICE: Status = Status(1);
    /// The service has no method of that name.
    pub const UNKNOWN_METHOD: Status = Status(2);
    /// The call's deadline passed before the handler finished.
    pub const DEADLINE_EXCEEDED: Status = Status(3);
    /// The request's payload could not be decoded as the method's arguments.
    pub const BAD_REQUEST: Status = Status(4);
    /// The handler failed without an answer (it panicked, or its return value could not
    /// be encoded).
    pub const INTERNAL: Status = Status(5);
    /// The answer would exceed a frame size limit.
    pub const FRAME_TOO_LARGE: Status = Status(6);
    /// The server is shutting down and took no new call.
    pub const SHUTTING_DOWN: Status = Status(7);

    /// Whether this is [`Status::OK`].
    pub fn is_ok(self) -> bool {
        self == Status::OK
    }

    fn name(self) -> Option<&'static str> {
        Some(match self {
            Status::OK => "OK",
            Status::UNKNOWN_SERVICE => "UNKNOWN_SERVICE",
            Status::UNKNOWN_METHOD => "UNKNOWN_METHOD",
            Status::DEADLINE_EXCEEDED => "DEADLINE_EXCEEDED",
            Status::BAD_REQUEST => "BAD_REQUEST",
            Status::INTERNAL => "INTERNAL",
            Status::FRAME_TOO_LARGE => "FRAME_TOO_LARGE",
            Status::SHUTTING_DOWN => "SHUTTING_DOWN",
            _ => return None,
        })
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "Status({})", self.0),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Introduction of a bus peer: the client sends one first, the broker answers with its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connect {
    /// The largest frame the sender accepts, in bytes (0 = not stated).
    pub max_frame_len: u32,
    /// The largest message payload the sender accepts in a publish, in bytes (0 = not
    /// stated). A broker states its limit so that clients refuse oversized publishes
    /// before sending them.
    pub max_payload: u32,
    /// A name for logs (client name, broker id).
    pub name: Utf8Bytes,
    /// A shared token the broker may require; empty when none is sent.
    pub token: Utf8Bytes,
}

/// A message published to a subject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Publish {
    /// Where the message goes.
    pub subject: Utf8Bytes,
    /// Where an answer should go; empty when none.
    pub reply: Utf8Bytes,
    /// Message headers.
    pub headers: Metadata,
    /// The message body; opaque.
    pub payload: Bytes,
}

/// Interest in a subject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subscribe {
    /// Chosen by the subscriber; deliveries carry it back.
    pub sid: u64,
    /// The subject, possibly with wildcards.
    pub subject: Utf8Bytes,
    /// Queue group; empty for a plain subscription.
    pub queue: Utf8Bytes,
}

/// A message delivered to a subscription.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// The subscription it is delivered to.
    pub sid: u64,
    /// The subject it was published to.
    pub subject: Utf8Bytes,
    /// Where an answer should go; empty when none.
    pub reply: Utf8Bytes,
    /// Message headers.
    pub headers: Metadata,
    /// The message body; opaque.
    pub payload: Bytes,
}

/// The sender takes no new work on this connection and says why.
///
/// With [`GoAway::SHUTDOWN`] the sender still finishes what it already took (calls in
/// flight are answered) and closes afterwards; with any other code it closes at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoAway {
    /// Why; see the associated constants.
    pub code: u16,
    /// A human-readable explanation, naming the limit where one was hit.
    pub message: Utf8Bytes,
}

impl GoAway {
    /// Graceful shutdown: calls in flight are still answered.
    pub const SHUTDOWN: u16 = 0;
    /// The peer sent something this side cannot parse or does not allow.
    pub const PROTOCOL_ERROR: u16 = 1;
    /// The peer sent a frame over this side's frame size limit.
    pub const FRAME_TOO_LARGE: u16 = 2;
    /// This side is at its connection limit.
    pub const TOO_MANY_CONNECTIONS: u16 = 3;
    /// The peer did not keep up with what it was sent.
    pub const SLOW_CONSUMER: u16 = 4;
    /// The peer's credentials were refused.
    pub const AUTHORIZATION: u16 = 5;
    /// The peer sent nothing within the keepalive timeout.
    pub const KEEPALIVE_TIMEOUT: u16 = 6;
    /// A limit other than frame size was exceeded (named in the message).
    pub const LIMIT_EXCEEDED: u16 = 7;

    /// A go-away with `code` and `message`.
    pub fn new(code: u16, message: impl Into<Utf8Bytes>) -> Self {
        GoAway {
            code,
            message: message.into(),
        }
    }
}
