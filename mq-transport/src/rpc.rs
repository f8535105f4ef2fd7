//! RPC over the bus: services served by any number of instances, called through their
//! subjects, on any backend.
//!
//! * **Discovery is the subject.** Method `"Service.method"` is the subject
//!   `rpc.Service.method`. An instance ([`serve`], [`Bus::serve`]) subscribes to
//!   `rpc.Service.*` in the queue group `Service`, so each call goes to exactly one
//!   instance and more instances mean more capacity. There is no registry to run.
//! * **A call is a request** with a reply inbox. The time left before the caller's
//!   deadline travels in the header [`TIMEOUT_HEADER`] (microseconds: a duration, not a
//!   timestamp, so clocks need not agree), the call's metadata as the other headers. An
//!   error answer carries [`STATUS_HEADER`] and [`MESSAGE_HEADER`]; a success carries
//!   neither.
//! * **Cancellation.** Dropping a call's future before its answer publishes a cancel to
//!   `rpc-cancel.Service` naming the call's reply subject ([`CALL_HEADER`]); the instance
//!   running it aborts the handler. A handler still running when the deadline passes is
//!   aborted and answered `DEADLINE_EXCEEDED` (the caller sees [`RpcError::Timeout`]),
//!   exactly as over TCP: both run calls through rpc-core's [`InFlight`].
//! * **No instance.** A call that reaches no instance (the bus answers "no responders")
//!   was received by nobody, so it is safe to send again: the client retries with a short
//!   backoff until the call's deadline ([`ClientConfig::wait_for_connection`], the
//!   default) or fails at once with [`RpcError::NotConnected`]. This covers an instance
//!   restarting or moving to another node.
//! * **An instance that dies** with calls in flight leaves those calls unanswered: they
//!   fail with [`RpcError::Timeout`] at their deadline. They are never resent, since they
//!   may have run. New calls go to the instances that remain.
//!
//! With `#[courier::service]` the generated `<Trait>Service` and `<Trait>Client` do the
//! encoding (see the `rpc_over_bus` example); by hand it looks like this:
//!
//! ```
//! use bytes::Bytes;
//! use mq_transport::Bus;
//! use rpc_core::client::CallOptions;
//! use rpc_core::server::{CallContext, CallFuture, Service, ServiceError};
//!
//! struct Upper;
//!
//! impl Service for Upper {
//!     fn name(&self) -> &'static str {
//!         "Upper"
//!     }
//!
//!     fn call(&self, method: &str, _ctx: CallContext, payload: Bytes) -> CallFuture {
//!         match method {
//!             "upper" => Box::pin(async move { Ok(payload.to_ascii_uppercase().into()) }),
//!             other => ServiceError::unknown_method("Upper", other).into_future(),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded(); // or Bus::connect("broker:7222").await?, or a NATS server
//! let instance = bus.serve(Upper).await?; // subscribes to `rpc.Upper.*`, queue group `Upper`
//!
//! let client = bus.rpc_client();
//! let answer = client.call("Upper.upper", Bytes::from("hi"), &CallOptions::default()).await?;
//! assert_eq!(&answer[..], b"HI");
//!
//! instance.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! [`ClientConfig::wait_for_connection`]: rpc_core::client::ClientConfig::wait_for_connection

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rpc_core::client::{CancelOnDrop, Channel, ChannelFuture, Client, ClientConfig, OutgoingCall};
use rpc_core::format::Encoded;
use rpc_core::frame::Status;
use rpc_core::server::{
    CallBox, InFlight, IncomingCall, Responder, Service, ServiceError, Started,
};
use rpc_core::transport::PeerAddr;
use rpc_core::{Metadata, RpcError, Utf8Bytes};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::error::BusError;
use crate::message::Message;

/// The first token of every call subject: `rpc.Service.method`.
pub const SUBJECT_PREFIX: &str = "rpc";
/// The first token of every cancel subject: `rpc-cancel.Service`.
pub const CANCEL_PREFIX: &str = "rpc-cancel";
/// Request header: the time left before the caller's deadline, in whole microseconds.
pub const TIMEOUT_HEADER: &str = "Courier-Rpc-Timeout";
/// Answer header: the [`Status`] code of an error answer (absent on success).
pub const STATUS_HEADER: &str = "Courier-Rpc-Status";
/// Answer header: the explanation of an error answer.
pub const MESSAGE_HEADER: &str = "Courier-Rpc-Message";
/// Cancel header: the reply subject of the call to cancel.
pub const CALL_HEADER: &str = "Courier-Rpc-Call";

/// Headers of this prefix are courier's own; they are not passed to handlers as metadata.
const RESERVED_PREFIX: &str = "Courier-Rpc-";

/// The subject of method `method` (`"Service.method"`): `rpc.Service.method`.
pub fn call_subject(method: &str) -> String {
    format!("{SUBJECT_PREFIX}.{method}")
}

/// The filter an instance of `service` subscribes to: `rpc.Service.*`.
pub fn service_filter(service: &str) -> String {
    format!("{SUBJECT_PREFIX}.{service}.*")
}

/// Where cancels for calls to `service` go: `rpc-cancel.Service`.
pub fn cancel_subject(service: &str) -> String {
    format!("{CANCEL_PREFIX}.{service}")
}

impl Bus {
    /// A client whose calls are requests on this bus, with default settings. Wrap it in
    /// a generated client: `GreeterClient::new(bus.rpc_client())`.
    pub fn rpc_client(&self) -> Client {
        self.rpc_client_with(ClientConfig::default())
    }

    /// A client whose calls are requests on this bus. The deadline, metadata and
    /// `wait_for_connection` settings apply; connection settings do not (the bus has its
    /// own).
    pub fn rpc_client_with(&self, config: ClientConfig) -> Client {
        let channel = BusChannel {
            bus: self.clone(),
            wait_for_instance: config.wait_for_connection,
        };
        Client::with_channel(channel, config)
    }

    /// Serves `service` on this bus as one more instance; see [`serve`].
    pub async fn serve(&self, service: impl Service) -> Result<ServiceInstance, BusError> {
        serve(self, service).await
    }
}

/// Calls as requests on a bus.
#[derive(Debug)]
struct BusChannel {
    bus: Bus,
    wait_for_instance: bool,
}

impl Channel for BusChannel {
    fn call(&self, call: OutgoingCall) -> ChannelFuture {
        Box::pin(call_over_bus(
            self.bus.clone(),
            call,
            self.wait_for_instance,
        ))
    }

    fn is_connected(&self) -> bool {
        self.bus.is_connected()
    }

    fn describe(&self) -> String {
        format!("the {} bus", self.bus.backend_name())
    }
}

/// Backoff between attempts while no instance answers: 5 ms doubling to 200 ms.
const FIRST_RETRY: Duration = Duration::from_millis(5);
const MAX_RETRY: Duration = Duration::from_millis(200);

async fn call_over_bus(
    bus: Bus,
    call: OutgoingCall,
    wait_for_instance: bool,
) -> Result<Bytes, RpcError> {
    let subject = Utf8Bytes::from(call_subject(&call.method));
    let service = call.method.split('.').next().unwrap_or_default().to_owned();
    let mut retry = FIRST_RETRY;
    let no_instance = |retried: bool| RpcError::NotConnected {
        peer: format!("{subject} on the {} bus", bus.backend_name()),
        reason: format!(
            "no responders: no instance of service `{service}` is subscribed (queue group \
             `{service}`){}",
            if retried {
                "; retried until the call's deadline"
            } else {
                ""
            }
        )
        .into(),
    };
    let mut retried = false;
    loop {
        let left = call.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if retried {
                no_instance(true)
            } else {
                call.timed_out()
            });
        }
        let mut headers = call.metadata.clone();
        headers.insert(TIMEOUT_HEADER, left.as_micros().to_string());
        let message = Message {
            subject: subject.clone(),
            reply: None,
            headers,
            payload: call.payload.clone(),
        };
        let (reply, waiting) = bus
            .send_request(message, Some(call.deadline))
            .await
            .map_err(|e| channel_error(&call, e))?;
        // Until an answer or a failure arrives, dropping this future cancels the call.
        let cancel = CancelOnDrop::new(|| {
            let cancel = Message::new(cancel_subject(&service), Bytes::new())
                .with_header(CALL_HEADER, Bytes::from(reply.to_string()));
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let bus = bus.clone();
                runtime.spawn(async move { bus.publish_message(cancel).await });
            }
        });
        let answer = bus.await_reply(waiting, &subject, left).await;
        cancel.disarm();
        match answer {
            Ok(answer) => {
                let status = answer
                    .headers
                    .get_str(STATUS_HEADER)
                    .map(|s| s.parse().map(Status).unwrap_or(Status::INTERNAL))
                    .unwrap_or(Status::OK);
                let message = answer.headers.get_str(MESSAGE_HEADER).unwrap_or("");
                return call.answer(status, message, answer.payload);
            }
            Err(BusError::NoResponders { .. }) if wait_for_instance => {
                // Nobody received it: safe to send again once an instance may be there.
                retried = true;
                tokio::time::sleep(
                    retry.min(call.deadline.saturating_duration_since(Instant::now())),
                )
                .await;
                retry = (retry * 2).min(MAX_RETRY);
            }
            Err(BusError::NoResponders { .. }) => return Err(no_instance(false)),
            Err(BusError::Timeout { .. }) => return Err(call.timed_out()),
            Err(BusError::ConnectionLost { reason, .. }) => {
                return Err(RpcError::ConnectionClosed { reason });
            }
            Err(e) => return Err(channel_error(&call, e)),
        }
    }
}

fn channel_error(call: &OutgoingCall, error: BusError) -> RpcError {
    RpcError::Channel {
        method: call.method.to_string(),
        source: Box::new(error),
    }
}

/// Serves `service` on `bus` as one instance: subscribes to `rpc.<Service>.*` in queue
/// group `<Service>` (and to `rpc-cancel.<Service>`), and runs each call as its own task.
/// Returns once both subscriptions are active.
///
/// Start it several times, in one process or many, on any backend, to spread calls over
/// the instances. [`ServiceInstance::shutdown`] stops it gracefully; dropping the
/// [`ServiceInstance`] stops it at once, aborting the calls it is running.
pub async fn serve(bus: &Bus, service: impl Service) -> Result<ServiceInstance, BusError> {
    let name = service.name();
    let requests = bus.queue_subscribe(service_filter(name), name).await?;
    let cancels = bus.subscribe(cancel_subject(name)).await?;
    let stop = CancellationToken::new();
    let served = Arc::new(AtomicU64::new(0));
    let instance = Instance {
        service: Arc::new(service),
        prefix: format!("{SUBJECT_PREFIX}.{name}."),
        calls: InFlight::new(),
        next_id: AtomicU64::new(1),
        bus: bus.clone(),
        served: served.clone(),
    };
    let calls = instance.calls.clone();
    let task = tokio::spawn(instance.run(requests, cancels, stop.clone()));
    Ok(ServiceInstance {
        name,
        served,
        stop,
        calls,
        task: Some(task),
    })
}

/// One running instance of a service on a bus; see [`serve`].
#[derive(Debug)]
pub struct ServiceInstance {
    name: &'static str,
    served: Arc<AtomicU64>,
    stop: CancellationToken,
    calls: Arc<InFlight<Utf8Bytes>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ServiceInstance {
    /// The service's name (also its queue group).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How many calls this instance has answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops gracefully: unsubscribes (new calls go to the other instances), answers the
    /// calls it had already received, including those still queued, then returns.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServiceInstance {
    /// Stops at once: unsubscribes and aborts the calls in progress, which get no answer.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            self.calls.abort_all();
        }
    }
}

struct Instance<S> {
    service: Arc<S>,
    /// `rpc.<Service>.`: what is left of a call's subject is the method.
    prefix: String,
    /// Calls running, by reply subject (what a cancel names).
    calls: Arc<InFlight<Utf8Bytes>>,
    /// Request ids, unique among this instance's calls.
    next_id: AtomicU64,
    bus: Bus,
    /// Calls answered.
    served: Arc<AtomicU64>,
}

impl<S: Service> Instance<S> {
    async fn run(
        self,
        mut requests: crate::Subscriber,
        mut cancels: crate::Subscriber,
        stop: CancellationToken,
    ) {
        let mut stopping = false;
        // The box each call's future is made in, kept for the next while calls are
        // answered at once.
        let mut into = CallBox::new();
        // Pinned once: a fresh `cancelled()` per request would register a waiter with
        // the token, and take it out again, for every call.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped, if !stopping => {
                    stopping = true;
                    requests.drain().await;
                }
                request = requests.next() => match request {
                    Some(request) => self.start(request, &mut into).await,
                    None => break,
                },
                Some(cancel) = cancels.next() => self.cancel(&cancel),
            }
        }
        // Every call received is running; keep honouring cancels until they are done.
        self.calls.close();
        loop {
            tokio::select! {
                _ = self.calls.wait() => break,
                Some(cancel) = cancels.next() => self.cancel(&cancel),
            }
        }
    }

    fn cancel(&self, cancel: &Message) {
        let Some(reply) = cancel.headers.get_str(CALL_HEADER) else {
            return;
        };
        if self.calls.cancel(&Utf8Bytes::from(reply.to_owned())) {
            tracing::debug!(call = reply, "call cancelled by its caller");
        }
    }

    /// Runs one call, its future made in `into`; a handler that finished at once is
    /// answered here, before the next request is taken.
    async fn start(&self, request: Message, into: &mut CallBox) {
        let Some(reply) = request.reply.clone() else {
            tracing::debug!(subject = %request.subject, "call without a reply subject ignored");
            return;
        };
        let method = request
            .subject
            .strip_prefix(self.prefix.as_str())
            .unwrap_or_default()
            .to_owned();
        let mut metadata = Metadata::new();
        let mut deadline = None;
        for (name, value) in request.headers.iter() {
            if name.as_str() == TIMEOUT_HEADER {
                deadline = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|micros| Instant::now() + Duration::from_micros(micros));
            } else if !name.starts_with(RESERVED_PREFIX) {
                metadata.append(name.clone(), value.clone());
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let call = IncomingCall::new(
            id,
            Utf8Bytes::from(format!("{}.{method}", self.service.name())),
            request.payload,
            Arc::new(PeerAddr::Bus(Arc::from(reply.as_str()))),
        )
        .with_deadline(deadline)
        .with_metadata(metadata);
        let answers = Answers {
            bus: self.bus.clone(),
            served: self.served.clone(),
            reply: reply.clone(),
        };
        let service = &self.service;
        let started = self.calls.start(
            reply,
            call,
            |ctx, payload, into| service.call_in(&method, ctx, payload, into),
            into,
            &answers,
            &mut None,
        );
        match started {
            Ok(Started::Answered(result)) => answers.respond(id, result).await,
            Ok(Started::Running) => {}
            // Reply subjects are unique per call: a repeat is a duplicate delivery.
            Err(_) => {
                tracing::debug!(subject = %request.subject, "call already running; duplicate ignored")
            }
        }
    }
}

/// Answers one call, as a message to its reply subject.
#[derive(Clone)]
struct Answers {
    bus: Bus,
    served: Arc<AtomicU64>,
    reply: Utf8Bytes,
}

impl Responder for Answers {
    async fn respond(&self, _id: u64, result: Result<Encoded, ServiceError>) {
        let reply = self.reply.clone();
        let answer = match result {
            // A message owns its payload: an answer held inline is copied into one.
            Ok(payload) => Message::new(reply, payload.into_bytes()),
            Err(error) => Message::new(reply, Bytes::new())
                .with_header(STATUS_HEADER, error.status.0.to_string())
                .with_header(MESSAGE_HEADER, error.message),
        };
        match self.bus.publish_message(answer).await {
            Ok(()) => {
                self.served.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "could not send an answer"),
        }
    }
}
