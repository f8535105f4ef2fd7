//! [`BusError`]: what can go wrong on the bus.

use std::sync::Arc;
use std::time::Duration;

use rpc_core::ConnectionError;
use rpc_core::frame::Kind;

use crate::subject::SubjectError;

/// Everything a bus operation can fail with. Messages name the limit and its setting
/// where one was hit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// A durable stream refused or failed an operation; the error names the stream,
    /// and the limit, expectation, file or offset concerned.
    #[error(transparent)]
    Stream(#[from] mq_store::StoreError),
    /// The backend does not offer a feature.
    #[error("{feature} are not available on the {backend} backend: {reason}")]
    Unsupported {
        /// The feature.
        feature: &'static str,
        /// The backend.
        backend: &'static str,
        /// Why, and what to use instead.
        reason: &'static str,
    },
    /// A subject, filter or queue group name is malformed.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// A publish carries more payload and headers than the bus accepts (headers count,
    /// as in NATS).
    #[error(
        "payload and headers of {size} bytes exceed the maximum payload of {limit} bytes ({setting})"
    )]
    PayloadTooLarge {
        /// The payload's size plus the headers' (see `Metadata::wire_len`).
        size: usize,
        /// The limit in force.
        limit: usize,
        /// Where the limit is set.
        setting: &'static str,
    },
    /// A request reached no subscriber at all; reported at once, not at the timeout.
    #[error("no responders: nobody is subscribed to `{subject}`")]
    NoResponders {
        /// The request's subject.
        subject: String,
    },
    /// No reply arrived within the request's timeout.
    #[error("request to `{subject}` timed out: no reply within {timeout:?}")]
    Timeout {
        /// The request's subject.
        subject: String,
        /// The timeout in force.
        timeout: Duration,
    },
    /// The broker refused a subscription (for example over its subscription limit).
    #[error("subscription to `{subject}` refused: {reason}")]
    SubscriptionRefused {
        /// The subscription's filter.
        subject: String,
        /// The broker's reason.
        reason: String,
    },
    /// Connecting failed (to a broker, or to NATS).
    #[error("could not connect to {addr}: {source}")]
    Connect {
        /// Where the client tried to connect.
        addr: String,
        /// What went wrong: an I/O error, a timeout, the broker's refusal naming its
        /// reason, …
        #[source]
        source: Box<ConnectError>,
    },
    /// Not connected right now, and the operation needs a connection (a flush).
    #[error("not connected to the broker at {addr}: {reason}")]
    NotConnected {
        /// The broker's address.
        addr: String,
        /// Why the last connection ended.
        reason: Arc<str>,
    },
    /// Publishes made while disconnected exceed the reconnect buffer.
    #[error(
        "reconnect buffer is full: {buffered} bytes of publishes wait for the connection, \
         limit {limit} bytes (ConnectOptions::reconnect_buffer)"
    )]
    ReconnectBufferFull {
        /// Bytes already buffered.
        buffered: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The connection ended while a request waited for its reply.
    #[error("connection lost while waiting for a reply from `{subject}`: {reason}")]
    ConnectionLost {
        /// The request's subject.
        subject: String,
        /// Why the connection ended.
        reason: Arc<str>,
    },
    /// A header the backend cannot carry (NATS headers are text without CR or LF).
    #[error("header `{name}` cannot be sent: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The backend (for example the NATS client) failed an operation.
    #[error("bus backend could not {operation}: {source}")]
    Backend {
        /// What was attempted.
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The bus handle was closed.
    #[error("the bus is closed")]
    Closed,
    /// A connection-level error (frame too large, connection closed, …), from the
    /// framing layer shared with RPC.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

/// Why a connection could not be made; the source of [`BusError::Connect`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Opening the stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// No connection, or no answer to the connect frame, within the timeout.
    #[error("no {what} within {timeout:?} (ConnectOptions::connect_timeout)")]
    Timeout {
        /// `"connection"` or `"answer to connect"`.
        what: &'static str,
        /// The timeout in force.
        timeout: Duration,
    },
    /// The broker answered the connect with a go-away (wrong token, too many
    /// connections, …).
    #[error("the broker refused the connection: {message} (go-away code {code})")]
    Refused {
        /// The go-away code.
        code: u16,
        /// The broker's explanation.
        message: String,
    },
    /// The broker answered the connect with another frame.
    #[error("expected the broker's connect frame, got {kind}")]
    UnexpectedFrame {
        /// What it sent.
        kind: Kind,
    },
    /// The broker closed the connection before answering.
    #[error("the broker closed the connection before answering connect")]
    Closed,
    /// The framing layer failed during the handshake.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// Another backend's client (NATS) could not connect.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

impl BusError {
    /// Whether trying again later may succeed (connection trouble, timeouts, nobody
    /// listening yet), as opposed to a malformed or oversized request.
    pub fn is_transient(&self) -> bool {
        match self {
            BusError::NoResponders { .. }
            | BusError::Timeout { .. }
            | BusError::Connect { .. }
            | BusError::NotConnected { .. }
            | BusError::ReconnectBufferFull { .. }
            | BusError::ConnectionLost { .. } => true,
            BusError::Connection(e) => e.is_transient(),
            _ => false,
        }
    }
}
