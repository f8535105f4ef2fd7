//! [`Service`]: what a server dispatches calls to, and the [`CallContext`] a handler sees.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::ReusableBoxFuture;

use crate::format::{Encoded, FormatError};
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
    /// `payload`. The server polls the returned future once; one that has not finished
    /// then runs as its own task, which the server aborts when the caller cancels or the
    /// deadline passes. A panic becomes an error answer.
    fn call(&self, method: &str, ctx: CallContext, payload: Bytes) -> CallFuture;

    /// Starts `method` as [`Service::call`] does, with its future put in `into`. This is
    /// what servers call: they keep one [`CallBox`] per connection, so a handler that
    /// finishes at its first poll leaves the box's memory for the next call's future.
    ///
    /// The default puts [`Service::call`]'s future in the box, which costs an
    /// allocation per call as before. `#[courier::service]` puts the handler's own
    /// future in it: no allocation at all when the last future in the box had the same
    /// size and alignment (the same method, most of the time).
    fn call_in(&self, method: &str, ctx: CallContext, payload: Bytes, into: &mut CallBox) {
        into.put(self.call(method, ctx, payload));
    }

    /// The methods the service answers (each the part after the dot), for routing: a
    /// server finds a call of one of these by its whole name (`"Service.method"`) in one
    /// lookup, and passes this list's `&'static str` as `method`. A call of a method not
    /// listed reaches [`Service::call_in`] as well, with the name it was sent with.
    /// `#[courier::service]` lists every method; the default lists none.
    fn methods(&self) -> &'static [&'static str] {
        &[]
    }

    /// The whole names of [`Service::methods`], `"Service.method"`, in the same order.
    /// A server takes a request of a method with a path here straight from its read
    /// buffer and names the call with the path ([`CallContext::method`]): the
    /// request's bytes for the name are neither checked as UTF-8 nor held on to. A
    /// call of a listed method without one is decoded whole first, as any other. A
    /// path that is not the service's name, a dot and the method's is not used.
    /// `#[courier::service]` gives every path; the default gives none.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use rpc_core::server::{CallContext, CallFuture, Service};
    ///
    /// struct Echo;
    ///
    /// impl Service for Echo {
    ///     fn name(&self) -> &'static str {
    ///         "Echo"
    ///     }
    ///
    ///     fn call(&self, _method: &str, _ctx: CallContext, payload: Bytes) -> CallFuture {
    ///         Box::pin(async move { Ok(payload) })
    ///     }
    ///
    ///     fn methods(&self) -> &'static [&'static str] {
    ///         &["echo", "ping"]
    ///     }
    ///
    ///     fn method_paths(&self) -> &'static [&'static str] {
    ///         &["Echo.echo", "Echo.ping"]
    ///     }
    /// }
    /// ```
    fn method_paths(&self) -> &'static [&'static str] {
        &[]
    }

    /// A copy of this service for the calls of one connection, sharing its state, or
    /// `None` to have them call this one.
    ///
    /// A server's connections all call one shared service. A call's future is
    /// `'static`, so a service whose futures hold a reference-counted pointer to its
    /// state (an `Arc`) writes that count twice per call, on one cache line that every
    /// connection on every core writes. A server asks each connection for a copy at its
    /// first call of the service and calls the copy from then on: a copy with a count of
    /// its own keeps those writes on the connection's own line.
    ///
    /// `#[courier::service]` returns a clone of itself, which shares the implementation
    /// behind a pointer of its own. In a profile of `courier bench rpc` (`multi_conn`,
    /// 16 B, four connections on two cores), the count's increment and decrement had
    /// 10.5% of the server's samples on the shared pointer and 3.6% on the copies'. The
    /// default returns `None`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// use bytes::Bytes;
    /// use rpc_core::server::{CallContext, CallFuture, Service};
    ///
    /// /// Counts its calls, on every connection together.
    /// struct Counter {
    ///     calls: Arc<Arc<AtomicU64>>,
    /// }
    ///
    /// impl Service for Counter {
    ///     fn name(&self) -> &'static str {
    ///         "Counter"
    ///     }
    ///
    ///     fn call(&self, _method: &str, _ctx: CallContext, _payload: Bytes) -> CallFuture {
    ///         // The future owns a pointer: on a copy, one with a count of its own.
    ///         let calls = self.calls.clone();
    ///         Box::pin(async move {
    ///             let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
    ///             Ok(Bytes::from(n.to_string()))
    ///         })
    ///     }
    ///
    ///     fn local_copy(&self) -> Option<Box<dyn Service>> {
    ///         // The same counter behind a pointer of the copy's own.
    ///         Some(Box::new(Counter { calls: Arc::new(Arc::clone(&self.calls)) }))
    ///     }
    /// }
    /// ```
    fn local_copy(&self) -> Option<Box<dyn Service>> {
        None
    }
}

impl<S: Service + ?Sized> Service for Arc<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn call(&self, method: &str, ctx: CallContext, payload: Bytes) -> CallFuture {
        (**self).call(method, ctx, payload)
    }

    fn call_in(&self, method: &str, ctx: CallContext, payload: Bytes, into: &mut CallBox) {
        (**self).call_in(method, ctx, payload, into)
    }

    fn methods(&self) -> &'static [&'static str] {
        (**self).methods()
    }

    fn method_paths(&self) -> &'static [&'static str] {
        (**self).method_paths()
    }

    fn local_copy(&self) -> Option<Box<dyn Service>> {
        (**self).local_copy()
    }
}

/// The box a call's future runs in ([`Service::call_in`]), reused from call to call.
///
/// Putting a future in the box drops the one it held and reuses its memory when the two
/// have the same size and alignment; otherwise the box is allocated anew. A future that
/// finished stays in the box until the next is put in it (an `async` block has dropped
/// what it captured by then). A new box holds nothing and allocates nothing.
///
/// The box's future gives the answer as an [`Encoded`]: a future that gives [`Bytes`]
/// has them wrapped, one that encodes its answer with
/// [`Format::encode_small`](crate::Format::encode_small) (as `#[courier::service]`'s do)
/// gives a small one inline, which its connection copies into its write buffer without
/// an allocation.
///
/// ```
/// use bytes::Bytes;
/// use futures_util::FutureExt;
/// use rpc_core::format::Encoded;
/// use rpc_core::server::{CallBox, ServiceError};
///
/// let mut call = CallBox::new();
/// call.put(async { Ok(Bytes::from_static(b"first")) });
/// assert_eq!((&mut call).now_or_never().unwrap().unwrap().as_slice(), b"first");
/// // A future of the same size and alignment: the box's memory is reused.
/// call.put(async { Ok(Bytes::from_static(b"second")) });
/// assert_eq!((&mut call).now_or_never().unwrap().unwrap().as_slice(), b"second");
/// call.put(async { Ok(Encoded::copy_from_slice(b"third")) });
/// assert!((&mut call).now_or_never().unwrap().unwrap().is_inline());
/// call.put_error(ServiceError::internal("no"));
/// assert_eq!((&mut call).now_or_never().unwrap().unwrap_err().message, "no");
/// ```
pub struct CallBox {
    future: ReusableBoxFuture<'static, Result<Encoded, ServiceError>>,
}

impl CallBox {
    /// An empty box (its future never finishes); allocates nothing.
    pub fn new() -> Self {
        CallBox {
            future: ReusableBoxFuture::new(std::future::pending()),
        }
    }

    /// Puts `future` in the box, dropping the one there. Its answer is [`Bytes`] or
    /// [`Encoded`].
    pub fn put<F, A>(&mut self, future: F)
    where
        F: Future<Output = Result<A, ServiceError>> + Send + 'static,
        A: Into<Encoded>,
    {
        self.future
            .set(futures_util::FutureExt::map(future, |answer| {
                answer.map(Into::into)
            }));
    }

    /// Puts in the box a future that has already failed with `error`.
    pub fn put_error(&mut self, error: ServiceError) {
        self.put(std::future::ready(Err::<Encoded, _>(error)));
    }

    /// The box as a [`CallFuture`], its answer as [`Bytes`] (an inline one copied into
    /// an allocation of its own): [`Service::call`] made of [`Service::call_in`].
    pub fn into_call_future(self) -> CallFuture {
        Box::pin(futures_util::FutureExt::map(self, |answer| {
            answer.map(Encoded::into_bytes)
        }))
    }

    /// The box, leaving an empty one in its place: for a call that goes on running
    /// after its first poll.
    pub(crate) fn take(&mut self) -> CallBox {
        std::mem::take(self)
    }

    /// Where the box's future is (tests: whether its memory was reused).
    #[cfg(test)]
    pub(crate) fn address(&mut self) -> *const () {
        let future: &(dyn Future<Output = Result<Encoded, ServiceError>> + Send) =
            &*self.future.get_pin();
        (future as *const (dyn Future<Output = Result<Encoded, ServiceError>> + Send)).cast()
    }
}

impl Default for CallBox {
    fn default() -> Self {
        CallBox::new()
    }
}

impl fmt::Debug for CallBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallBox")
    }
}

impl Future for CallBox {
    type Output = Result<Encoded, ServiceError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.future.poll(cx)
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
