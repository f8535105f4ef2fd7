//! [`Service`]: what a server dispatches calls to, and the [`CallContext`] a handler sees.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use crate::format::FormatError;
use crate::frame::Status;
use crate::transport::PeerAddr;
use crate::{Metadata, Utf8Bytes};

/// The future of one call: the serialized return value, or why there is none.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<Bytes, ServiceError>> + Send + 'static>>;

/// A set of methods reachable under one name: `"Name.method"`.
///
/// `#[courier::service]` implements this for you; by hand it looks like this:
///
/// ```
/// use bytes::Bytes;
/// use rpc_core::format::{Bincode, Format};
/// use rpc_core::server::{CallContext, CallFuture, Service, ServiceError};
///
/// struct Echo;
///
/// impl Service for Echo {
///     fn name(&self) -> &'static str {
///         "Echo"
///     }
///
///     fn call(&self, method: &str, _ctx: CallContext, payload: Bytes) -> CallFuture {
///         match method {
///             "echo" => Box::pin(async move {
///                 let text: String = Bincode::decode(&payload).map_err(ServiceError::bad_request)?;
///                 Bincode::encode(&text).map_err(ServiceError::encode)
///             }),
///             other => ServiceError::unknown_method(self.name(), other).into_future(),
///         }
///     }
/// }
/// ```
pub trait Service: Send + Sync + 'static {
    /// The service name: the part of `"Service.method"` before the dot.
    fn name(&self) -> &'static str;

    /// Starts method `method` (the part after the dot) with serialized arguments
    /// `payload`. The server runs the returned future as its own task, aborts it when the
    /// caller cancels or the deadline passes, and turns a panic into an error answer.
    fn call(&self, method: &str, ctx: CallContext, payload: Bytes) -> CallFuture;
}

impl<S: Service + ?Sized> Service for Arc<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn call(&self, method: &str, ctx: CallContext, payload: Bytes) -> CallFuture {
        (**self).call(method, ctx, payload)
    }
}

/// Why a service could not produce an answer. The caller receives it as an
/// [`crate::RpcError`] carrying the status and message.
///
/// Application errors (a method's own `Err(E)`) are not this: they are part of the
/// method's return value and travel in the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceError {
    /// The status sent to the caller.
    pub status: Status,
    /// The explanation sent to the caller.
    pub message: String,
}

impl ServiceError {
    /// An error with any status.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        ServiceError {
            status,
            message: message.into(),
        }
    }

    /// The service has no method `method`.
    pub fn unknown_method(service: &str, method: &str) -> Self {
        Self::new(
            Status::UNKNOWN_METHOD,
            format!("service `{service}` has no method `{method}`"),
        )
    }

    /// The arguments could not be decoded.
    pub fn bad_request(error: FormatError) -> Self {
        Self::new(Status::BAD_REQUEST, error.context("request").to_string())
    }

    /// The return value could not be encoded.
    pub fn encode(error: FormatError) -> Self {
        Self::new(Status::INTERNAL, error.context("response").to_string())
    }

    /// Something else went wrong on the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Status::INTERNAL, message)
    }

    /// This error as an already-finished [`CallFuture`].
    pub fn into_future(self) -> CallFuture {
        Box::pin(std::future::ready(Err(self)))
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for ServiceError {}

/// What a handler knows about the call it serves.
#[derive(Clone, Debug)]
pub struct CallContext {
    pub(crate) request_id: u64,
    pub(crate) method: Utf8Bytes,
    pub(crate) deadline: Option<Instant>,
    pub(crate) metadata: Metadata,
    pub(crate) peer: Arc<PeerAddr>,
}

impl CallContext {
    /// A context for calling a [`Service`] directly, outside a server (in tests).
    pub fn new(method: impl Into<Utf8Bytes>, peer: PeerAddr) -> Self {
        CallContext {
            request_id: 0,
            method: method.into(),
            deadline: None,
            metadata: Metadata::new(),
            peer: Arc::new(peer),
        }
    }

    /// The same context with `metadata`.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The same context with a deadline.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The request id, unique among the calls in flight on this connection (over a bus,
    /// on this service instance).
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// `"Service.method"`.
    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    /// When the caller stops waiting, on this server's clock (the request carries the time
    /// left, not a timestamp). The server aborts the handler at this instant.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The call's metadata: the client's defaults and the call's own entries.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Who called.
    pub fn peer(&self) -> &PeerAddr {
        &self.peer
    }
}
