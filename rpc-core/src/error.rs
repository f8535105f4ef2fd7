//! Errors, by layer:
//!
//! * [`ProtocolError`]: a frame that cannot be decoded, or is not allowed where it arrived;
//! * [`ConnectionError`]: the framing layer (codec, connection engine) failed: shared by
//!   RPC and the bus, each of which wraps it in its own error type;
//! * [`RpcError`]: the one enum RPC callers match on.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::format::FormatError;
use crate::frame::{Kind, Status};

/// Everything that can go wrong with a call, a connection or a server.
///
/// Messages say what happened and, where a limit was hit, which limit and its value.
/// Application errors of a service (a method returning `Result<T, E>`) are not here:
/// they travel in the payload, in the service's own types.
///
/// ```
/// use rpc_core::RpcError;
/// # fn f(e: RpcError) {
/// match e {
///     RpcError::Timeout { .. } => { /* retry with a longer deadline */ }
///     RpcError::ConnectionClosed { .. } | RpcError::NotConnected { .. } => { /* retry later */ }
///     other => eprintln!("call failed: {other}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The call's deadline passed before an answer arrived.
    #[error("call to `{method}` timed out: no answer within its deadline of {timeout:?}")]
    Timeout {
        /// `"Service.method"`.
        method: String,
        /// The deadline the call had.
        timeout: Duration,
    },
    /// The call was cancelled before it was answered.
    #[error("call was cancelled")]
    Cancelled,
    /// The connection the call was on closed before the answer arrived. Every call pending
    /// on a connection fails with this error as soon as the connection is seen to close.
    #[error("connection closed: {reason}")]
    ConnectionClosed {
        /// Why: end of stream, an I/O error, the peer's go-away, a missed keepalive, …
        reason: Arc<str>,
    },
    /// The client has no connection and is configured to fail fast instead of waiting for
    /// a reconnect (or the deadline passed while it waited).
    #[error("not connected to {peer}: {reason}")]
    NotConnected {
        /// Where the client connects to.
        peer: String,
        /// The last connection error, or why the client stopped trying.
        reason: Arc<str>,
    },
    /// Connecting failed.
    #[error("could not connect to {peer}: {source}")]
    Connect {
        /// Where the client tried to connect.
        peer: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An I/O error on an established connection.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// A frame is larger than the maximum frame length, on sending or on receiving.
    #[error(
        "frame of {size} bytes exceeds the maximum frame length of {limit} bytes \
         (ConnectionConfig::max_frame_len, or the peer's stated limit when lower)"
    )]
    FrameTooLarge {
        /// The size of the frame body.
        size: u64,
        /// The limit in force.
        limit: usize,
    },
    /// The server hosts no service of that name.
    #[error("unknown service: {message}")]
    UnknownService {
        /// The server's explanation.
        message: String,
    },
    /// The service has no method of that name.
    #[error("unknown method: {message}")]
    UnknownMethod {
        /// The server's explanation.
        message: String,
    },
    /// The server could not run the call, for a reason other than those above.
    #[error("server answered {status}: {message}")]
    Remote {
        /// The status code the server sent.
        status: Status,
        /// The server's explanation.
        message: String,
    },
    /// A value could not be serialized or deserialized.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The peer sent a go-away: it takes no new work on this connection.
    #[error("peer is going away (code {code}): {message}")]
    GoAway {
        /// The go-away code (see [`crate::frame::GoAway`]).
        code: u16,
        /// The peer's explanation.
        message: String,
    },
    /// No complete frame arrived from the peer within the keepalive timeout: it is
    /// presumed dead (a peer trickling a partial frame counts as silent).
    #[error(
        "peer sent no complete frame within the keepalive timeout of {timeout:?} (ConnectionConfig::keepalive_timeout)"
    )]
    KeepaliveTimeout {
        /// The timeout in force.
        timeout: Duration,
    },
    /// The client was shut down, or every handle to it was dropped.
    #[error("client is closed")]
    ClientClosed,
    /// The [`crate::client::Channel`] carrying the call (a message bus, say) failed, for
    /// a reason none of the variants above describes.
    #[error("call to `{method}` failed on its channel: {source}")]
    Channel {
        /// `"Service.method"`.
        method: String,
        /// The channel's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why the framing layer (the codec and the connection engine, shared by RPC and the bus)
/// could not carry a frame. RPC and the bus wrap it in their own errors: it converts into
/// the [`RpcError`] variant of the same name, and into `mq_transport::BusError::Connection`.
///
/// ```
/// use rpc_core::{ConnectionError, RpcError};
///
/// let e = ConnectionError::FrameTooLarge { size: 10, limit: 8 };
/// assert!(e.to_string().contains("limit"));
/// assert!(matches!(RpcError::from(e), RpcError::FrameTooLarge { size: 10, limit: 8 }));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The connection is closed (or closing): nothing more can be sent on it.
    #[error("connection closed: {reason}")]
    Closed {
        /// Why: end of stream, an I/O error, the peer's go-away, a missed keepalive, …
        reason: Arc<str>,
    },
    /// An I/O error on the stream.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol (or a frame cannot be encoded).
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// A frame is larger than the limit in force, on sending or on receiving.
    #[error(
        "frame of {size} bytes exceeds the maximum frame length of {limit} bytes \
         (ConnectionConfig::max_frame_len, or the peer's stated limit when lower)"
    )]
    FrameTooLarge {
        /// The size of the frame body.
        size: u64,
        /// The limit in force.
        limit: usize,
    },
    /// No complete frame arrived from the peer within the keepalive timeout: it is
    /// presumed dead (a peer trickling a partial frame counts as silent).
    #[error(
        "peer sent no complete frame within the keepalive timeout of {timeout:?} (ConnectionConfig::keepalive_timeout)"
    )]
    KeepaliveTimeout {
        /// The timeout in force.
        timeout: Duration,
    },
}

impl ConnectionError {
    /// Whether a new connection may succeed where this one failed (I/O trouble, a closed
    /// connection, a silent peer), as opposed to a frame that is wrong in itself.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnectionError::Closed { .. }
                | ConnectionError::Io(_)
                | ConnectionError::KeepaliveTimeout { .. }
        )
    }
}

impl From<ConnectionError> for RpcError {
    fn from(error: ConnectionError) -> Self {
        match error {
            ConnectionError::Closed { reason } => RpcError::ConnectionClosed { reason },
            ConnectionError::Io(e) => RpcError::Io(e),
            ConnectionError::Protocol(e) => RpcError::Protocol(e),
            ConnectionError::FrameTooLarge { size, limit } => {
                RpcError::FrameTooLarge { size, limit }
            }
            ConnectionError::KeepaliveTimeout { timeout } => RpcError::KeepaliveTimeout { timeout },
        }
    }
}

impl RpcError {
    /// Whether retrying the same call later could succeed: connection trouble and
    /// timeouts, as opposed to errors in the call itself.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RpcError::Timeout { .. }
                | RpcError::ConnectionClosed { .. }
                | RpcError::NotConnected { .. }
                | RpcError::Connect { .. }
                | RpcError::Io(_)
                | RpcError::GoAway { .. }
                | RpcError::KeepaliveTimeout { .. }
        ) || matches!(self, RpcError::Remote { status, .. } if *status == Status::SHUTTING_DOWN)
    }
}

/// A frame that cannot be decoded, or that is not allowed where it arrived.
///
/// Each variant names the frame kind and field involved. A connection that receives one
/// answers with a go-away naming the problem and closes; other connections are unaffected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame body is shorter than the version and kind bytes.
    #[error("frame body of {len} bytes is shorter than the 2-byte version and kind preamble")]
    MissingPreamble {
        /// The body's length.
        len: usize,
    },
    /// The version byte is not one this build speaks.
    #[error("unsupported protocol version {version} (this side speaks version {supported})")]
    UnsupportedVersion {
        /// The version received.
        version: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The kind byte is not one this version defines.
    #[error("unknown frame kind 0x{kind:02x}")]
    UnknownKind {
        /// The kind byte received.
        kind: u8,
    },
    /// A field runs past the end of the frame.
    #[error("{kind} frame truncated: field `{field}` needs {needed} bytes, {remaining} left")]
    Truncated {
        /// The frame's kind.
        kind: Kind,
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the frame.
        remaining: usize,
    },
    /// A text field is not UTF-8.
    #[error("{kind} frame: field `{field}` is not valid UTF-8")]
    InvalidUtf8 {
        /// The frame's kind.
        kind: Kind,
        /// The field.
        field: &'static str,
    },
    /// Bytes follow the last field of a kind that carries no payload.
    #[error("{kind} frame has {extra} unexpected bytes after its last field")]
    TrailingBytes {
        /// The frame's kind.
        kind: Kind,
        /// How many bytes were left over.
        extra: usize,
    },
    /// A value does not fit the field's wire type (only possible when encoding).
    #[error("{kind} frame: field `{field}` is {len} long, more than its maximum of {max}")]
    FieldTooLong {
        /// The frame's kind.
        kind: Kind,
        /// The field.
        field: &'static str,
        /// The value's length (bytes or entries).
        len: usize,
        /// The field's maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes of it received)")]
    UnexpectedEof {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
    /// A well-formed frame of a kind this side does not accept here.
    #[error("unexpected {kind} frame: {context}")]
    UnexpectedFrame {
        /// The frame's kind.
        kind: Kind,
        /// Where it arrived.
        context: &'static str,
    },
    /// A payload does not decode as the type the method declares: the peer runs another
    /// version of the service, or another format.
    #[error("{what} of `{method}` does not have the declared shape: {error}")]
    InvalidPayload {
        /// `"request"` or `"response"`.
        what: &'static str,
        /// `"Service.method"`.
        method: String,
        /// The format's complaint.
        error: FormatError,
    },
    /// A request reused the id of a call still in flight on the connection.
    #[error("request id {id} is already in flight on this connection")]
    DuplicateRequestId {
        /// The reused id.
        id: u64,
    },
}
