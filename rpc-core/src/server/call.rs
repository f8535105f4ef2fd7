//! One call's lifecycle, whatever carried it: [`InFlight`] runs the handlers of one
//! connection (or one bus service instance), and a [`Responder`] sends their answers.
//!
//! Both transports give the same answers because this is the only place that decides
//! them:
//!
//! * a handler that returns is answered with its result;
//! * a handler that panics is answered [`Status::INTERNAL`];
//! * a handler still running at the call's deadline is aborted and answered
//!   [`Status::DEADLINE_EXCEEDED`];
//! * a cancelled call ([`InFlight::cancel`]) is aborted and gets no answer: its caller
//!   has gone.

use std::collections::HashMap;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{CallBox, CallContext, ServiceError};
use crate::format::Encoded;
use crate::frame::Status;
use crate::transport::PeerAddr;
use crate::{Metadata, Utf8Bytes};

/// A call as it arrived, before it runs.
#[derive(Debug)]
#[non_exhaustive]
pub struct IncomingCall {
    /// The request id, unique among the calls in flight where it arrived.
    pub id: u64,
    /// `"Service.method"`.
    pub method: Utf8Bytes,
    /// When the caller stops waiting, on this side's clock.
    pub deadline: Option<Instant>,
    /// The call's metadata.
    pub metadata: Metadata,
    /// The serialized arguments.
    pub payload: Bytes,
    /// Who called.
    pub peer: Arc<PeerAddr>,
}

impl IncomingCall {
    /// A call with no deadline and no metadata.
    pub fn new(id: u64, method: Utf8Bytes, payload: Bytes, peer: Arc<PeerAddr>) -> Self {
        IncomingCall {
            id,
            method,
            deadline: None,
            metadata: Metadata::new(),
            payload,
            peer,
        }
    }

    /// The same call with a deadline.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// The same call with metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// Sends the answers of calls: a frame on a connection, a reply message on a bus.
pub trait Responder: Clone + Send + Sync + 'static {
    /// Sends the answer to call `id`, waiting for room if it must.
    fn respond(
        &self,
        id: u64,
        result: Result<Encoded, ServiceError>,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// What [`InFlight::start`] did with a call.
#[derive(Debug)]
#[must_use = "an answered call's answer must be sent"]
pub enum Started {
    /// The handler finished at its first poll: this is its answer, for the caller to
    /// send from the loop that reads calls, so that a peer that does not read its
    /// answers stops that loop (backpressure) instead of piling answers up.
    Answered(Result<Encoded, ServiceError>),
    /// The handler runs as a task, which sends its answer through the responder.
    Running,
}

/// The handlers running for one connection or one service instance, by a key that a
/// cancel names (the request id on a connection, the reply subject on a bus).
#[derive(Debug)]
pub struct InFlight<K> {
    running: Mutex<HashMap<K, AbortHandle>>,
    /// `running.len()`, kept beside it (changed under its lock) so that a call can see
    /// that nothing is running without taking the lock.
    count: AtomicUsize,
    tasks: TaskTracker,
}

impl<K> Default for InFlight<K> {
    fn default() -> Self {
        InFlight {
            running: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            tasks: TaskTracker::new(),
        }
    }
}

/// A call's key is already in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplicateCall;

impl<K: Hash + Eq + Clone + Send + Sync + 'static> InFlight<K> {
    /// No calls yet.
    pub fn new() -> Arc<Self> {
        Arc::new(InFlight::default())
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<K, AbortHandle>> {
        // Single inserts and removals: a panic elsewhere cannot leave it half-updated.
        crate::sync::lock(&self.running)
    }

    /// Removes `key` from the running calls; its abort handle if it was there.
    fn remove(&self, key: &K) -> Option<AbortHandle> {
        let mut running = self.running();
        let handle = running.remove(key);
        self.count.store(running.len(), Ordering::Release);
        handle
    }

    /// Runs `call`: `start` puts the handler's future, made of the call's context and
    /// payload, in `into` (with [`crate::server::Service::call_in`]).
    ///
    /// The handler is polled once at once: one that finishes without waiting is
    /// [`Started::Answered`], with no task, timer or map entry, and costs neither the
    /// responder nor the slot; its box stays in `into`, for the caller's next call. One
    /// that waits becomes a task, which takes the box (leaving an empty one), registered
    /// under `key` for [`InFlight::cancel`] and bounded by the deadline. That task takes a
    /// clone of `responder` to send its answer, and takes `slot` (a place under an
    /// in-flight limit), which it holds until the responder has queued its answer. A
    /// slot left in place is the caller's to reuse for its next call. Fails, running
    /// nothing, when `key` is in flight.
    pub fn start<R: Responder>(
        self: &Arc<Self>,
        key: K,
        call: IncomingCall,
        start: impl FnOnce(CallContext, Bytes, &mut CallBox),
        into: &mut CallBox,
        responder: &R,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Started, DuplicateCall> {
        let IncomingCall {
            id,
            method,
            deadline,
            metadata,
            payload,
            peer,
        } = call;
        let ctx = CallContext {
            request_id: id,
            method,
            deadline,
            metadata,
            peer,
        };
        self.start_in(key, ctx, payload, start, into, responder, slot)
    }

    /// [`InFlight::start`] for a call whose context is made already: a server's read
    /// loop builds it from the request, with no [`IncomingCall`] on the way.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_in<R: Responder>(
        self: &Arc<Self>,
        key: K,
        ctx: CallContext,
        payload: Bytes,
        start: impl FnOnce(CallContext, Bytes, &mut CallBox),
        into: &mut CallBox,
        responder: &R,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Started, DuplicateCall> {
        let id = ctx.request_id;
        let deadline = ctx.deadline;
        // Nothing running (every call so far answered at once) needs no lookup, nor the
        // lock: the key is hashed only when there is something to find. Only `start`
        // adds to the count, so its caller (the one loop that reads the calls) always
        // sees its own additions; other tasks only take away.
        if self.count.load(Ordering::Acquire) != 0 && self.running().contains_key(&key) {
            return Err(DuplicateCall);
        }
        let span = tracing::info_span!("call", method = %ctx.method, id, peer = %ctx.peer);
        start(ctx, payload, into);
        let first = {
            let _entered = span.enter();
            let mut cx = Context::from_waker(Waker::noop());
            std::panic::catch_unwind(AssertUnwindSafe(|| into.poll_unpin(&mut cx)))
        };
        match first {
            // The caller holds its read loop until the answer is queued. An answer is
            // handed on as it is (the read loop's calls move it as little as they can);
            // a failure goes through `finish`, which logs it.
            Ok(Poll::Ready(Ok(answer))) => return Ok(Started::Answered(Ok(answer))),
            Ok(Poll::Ready(failed)) => return Ok(Started::Answered(finish(Ok(failed)))),
            Err(panic) => {
                drop(into.take()); // not kept for the next call: its state is unknown
                return Ok(Started::Answered(finish(Err(panic))));
            }
            Ok(Poll::Pending) => {}
        }

        let future = AssertUnwindSafe(into.take()).catch_unwind();
        let slot = slot.take();
        let responder = responder.clone();
        let calls = self.clone();
        let task_key = key.clone();
        // Held while spawning so that a call finishing at once cannot remove its entry
        // before it was inserted.
        let mut running = self.running();
        let task = self.tasks.spawn(
            async move {
                let outcome = match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, future)
                        .await
                        .unwrap_or_else(|_| Ok(Err(deadline_exceeded()))),
                    None => future.await,
                };
                let result = finish(outcome);
                calls.remove(&task_key);
                responder.respond(id, result).await;
                drop(slot);
            }
            .instrument(span),
        );
        running.insert(key, task.abort_handle());
        self.count.store(running.len(), Ordering::Release);
        Ok(Started::Running)
    }

    /// Aborts the call under `key`, which gets no answer; `false` when it is not running
    /// (it may have finished as the cancel flew, which is normal).
    pub fn cancel(&self, key: &K) -> bool {
        match self.remove(key) {
            Some(handle) => {
                handle.abort();
                true
            }
            None => false,
        }
    }

    /// Aborts every call running; none gets an answer.
    pub fn abort_all(&self) {
        let handles: Vec<_> = {
            let mut running = self.running();
            self.count.store(0, Ordering::Release);
            running.drain().map(|(_, h)| h).collect()
        };
        for handle in handles {
            handle.abort();
        }
    }

    /// Calls running now (not those answered at once).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether no call is running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes no more calls' tasks into account for [`InFlight::wait`]: call before
    /// waiting for the last ones.
    pub fn close(&self) {
        self.tasks.close();
    }

    /// Resolves once [`InFlight::close`] was called and every call's task (answers sent
    /// from tasks included) has finished.
    pub async fn wait(&self) {
        self.tasks.wait().await;
    }
}

fn deadline_exceeded() -> ServiceError {
    ServiceError::new(
        Status::DEADLINE_EXCEEDED,
        "deadline passed before the handler finished; handler aborted",
    )
}

/// A handler's outcome as the answer to send: a panic becomes `INTERNAL`.
fn finish(
    outcome: Result<Result<Encoded, ServiceError>, Box<dyn std::any::Any + Send>>,
) -> Result<Encoded, ServiceError> {
    let result = outcome.unwrap_or_else(|_| {
        tracing::error!("handler panicked");
        Err(ServiceError::internal("handler panicked"))
    });
    if let Err(e) = &result {
        tracing::debug!(status = %e.status, message = %e.message, "call failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;
    use crate::server::CallFuture;

    /// `start` for a handler that makes a boxed future.
    fn put(
        make: impl FnOnce(CallContext, Bytes) -> CallFuture,
    ) -> impl FnOnce(CallContext, Bytes, &mut CallBox) {
        move |ctx, payload, into| into.put(make(ctx, payload))
    }

    #[derive(Clone)]
    struct Collect(mpsc::UnboundedSender<(u64, Result<Encoded, ServiceError>)>);

    impl Responder for Collect {
        async fn respond(&self, id: u64, result: Result<Encoded, ServiceError>) {
            let _ = self.0.send((id, result));
        }
    }

    fn call(id: u64) -> IncomingCall {
        IncomingCall::new(
            id,
            "S.m".into(),
            Bytes::new(),
            Arc::new(PeerAddr::Memory(0)),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_past_its_deadline_is_answered_deadline_exceeded() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let calls = InFlight::<u64>::new();
        let deadline = Instant::now() + Duration::from_millis(50);
        let started = calls.start(
            7,
            call(7).with_deadline(Some(deadline)),
            put(|_, _| Box::pin(std::future::pending())),
            &mut CallBox::new(),
            &Collect(tx),
            &mut None,
        );
        assert!(matches!(started, Ok(Started::Running)));
        let (id, result) = rx.recv().await.unwrap();
        assert_eq!(id, 7);
        assert_eq!(result.unwrap_err().status, Status::DEADLINE_EXCEEDED);
        assert!(calls.is_empty());
    }

    #[tokio::test]
    async fn a_call_answered_at_once_leaves_its_slot_for_the_next_and_a_running_one_holds_it() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let mut slot = Some(slots.clone().try_acquire_owned().unwrap());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let calls = InFlight::<u64>::new();
        let answers =
            |_, _| -> CallFuture { Box::pin(async { Ok(Bytes::from_static(b"at once")) }) };
        let started = calls.start(
            1,
            call(1),
            put(answers),
            &mut CallBox::new(),
            &Collect(tx.clone()),
            &mut slot,
        );
        assert!(matches!(started, Ok(Started::Answered(Ok(ref b))) if b.as_slice() == b"at once"));
        assert!(slot.is_some(), "an answered call leaves the slot in place");

        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = std::sync::Mutex::new(Some(released));
        let waits = |_, _| -> CallFuture {
            let released = released.lock().unwrap().take().unwrap();
            Box::pin(async move {
                let _ = released.await;
                Ok(Bytes::new())
            })
        };
        let started = calls.start(
            2,
            call(2),
            put(waits),
            &mut CallBox::new(),
            &Collect(tx),
            &mut slot,
        );
        assert!(matches!(started, Ok(Started::Running)));
        assert!(slot.is_none(), "a running call takes the slot");
        assert_eq!(slots.available_permits(), 0, "and holds it while it runs");
        release.send(()).unwrap();
        assert_eq!(rx.recv().await.unwrap().0, 2);
        calls.close();
        calls.wait().await;
        assert_eq!(slots.available_permits(), 1, "given back once answered");
    }

    #[tokio::test]
    async fn a_call_answered_at_once_leaves_its_box_for_the_next_and_a_running_one_takes_it() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let calls = InFlight::<u64>::new();
        let mut into = CallBox::new();
        let at_once = |_: CallContext, payload: Bytes, into: &mut CallBox| {
            into.put(async move { Ok(payload) })
        };
        let mut boxes = Vec::new();
        for id in [1, 2] {
            let started = calls.start(
                id,
                call(id),
                at_once,
                &mut into,
                &Collect(tx.clone()),
                &mut None,
            );
            assert!(matches!(started, Ok(Started::Answered(Ok(_)))));
            boxes.push(into.address());
        }
        assert_eq!(
            boxes[0], boxes[1],
            "the second call's future reused the box"
        );
        let first = boxes[0];

        let waits = |_: CallContext, _: Bytes, into: &mut CallBox| {
            into.put(async move {
                tokio::task::yield_now().await;
                Ok(Bytes::new())
            })
        };
        let started = calls.start(3, call(3), waits, &mut into, &Collect(tx), &mut None);
        assert!(matches!(started, Ok(Started::Running)));
        assert_ne!(into.address(), first, "the running call took the box");
    }

    #[tokio::test]
    async fn a_key_is_free_again_once_its_call_was_cancelled_or_answered_from_its_task() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let calls = InFlight::<u64>::new();
        let waits = |_, _| -> CallFuture { Box::pin(std::future::pending()) };
        let yields = |_, _| -> CallFuture {
            Box::pin(async {
                tokio::task::yield_now().await;
                Ok(Bytes::from_static(b"later"))
            })
        };
        let start = |f: fn(CallContext, Bytes) -> CallFuture| {
            calls.start(
                4,
                call(4),
                put(f),
                &mut CallBox::new(),
                &Collect(tx.clone()),
                &mut None,
            )
        };
        assert!(matches!(start(waits), Ok(Started::Running)));
        assert!(matches!(start(waits), Err(DuplicateCall)));
        assert!(calls.cancel(&4));
        assert!(calls.is_empty());
        assert!(
            matches!(start(yields), Ok(Started::Running)),
            "free after a cancel"
        );
        assert_eq!(rx.recv().await.unwrap().0, 4);
        assert!(calls.is_empty());
        assert!(
            matches!(start(yields), Ok(Started::Running)),
            "free after its answer"
        );
        assert_eq!(rx.recv().await.unwrap().0, 4);
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_internal_and_a_cancelled_one_not_at_all() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let calls = InFlight::<u64>::new();
        let panics = |_, _| -> CallFuture {
            Box::pin(async {
                tokio::task::yield_now().await;
                panic!("boom")
            })
        };
        assert!(matches!(
            calls.start(
                1,
                call(1),
                put(panics),
                &mut CallBox::new(),
                &Collect(tx.clone()),
                &mut None
            ),
            Ok(Started::Running)
        ));
        let waits = |_, _| -> CallFuture { Box::pin(std::future::pending()) };
        assert!(matches!(
            calls.start(
                2,
                call(2),
                put(waits),
                &mut CallBox::new(),
                &Collect(tx),
                &mut None
            ),
            Ok(Started::Running)
        ));
        let (unused, _) = mpsc::unbounded_channel();
        assert!(matches!(
            calls.start(
                2,
                call(2),
                put(waits),
                &mut CallBox::new(),
                &Collect(unused),
                &mut None
            ),
            Err(DuplicateCall)
        ));
        assert!(calls.cancel(&2));
        calls.close();
        calls.wait().await;
        let (id, result) = rx.recv().await.unwrap();
        assert_eq!((id, result.unwrap_err().status), (1, Status::INTERNAL));
        assert!(
            rx.recv().await.is_none(),
            "the cancelled call got no answer"
        );
    }
}
