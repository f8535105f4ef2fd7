//! Where messages end up: subscription queues, the request inbox, and [`Subscriber`].

use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use rpc_core::Utf8Bytes;
use rustc_hash::FxHashMap;
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

use crate::event::Event;
use crate::message::{DESCRIPTION_HEADER, Message, SUBSCRIPTION_REFUSED};
use crate::queue::{self, SendTimeoutError, TrySendError};

/// What one subscription's queue shares with its [`Subscriber`].
#[derive(Debug)]
pub(crate) struct SubState {
    pub(crate) subject: Utf8Bytes,
    pub(crate) queue: Option<Utf8Bytes>,
    dropped: AtomicU64,
    /// Dropping right now: the next drop is not a new episode.
    lagging: AtomicBool,
    /// Why the broker ended this subscription, if it did.
    refused: OnceLock<String>,
    events: broadcast::Sender<Event>,
}

impl SubState {
    pub(crate) fn refused(&self) -> Option<&str> {
        self.refused.get().map(String::as_str)
    }
}

/// The sending side of a subscription's bounded queue.
///
/// [`SubQueue::deliver`] never waits: a full queue drops the message and counts it, so
/// that one slow subscriber cannot hold up the connection's reader (remote and NATS
/// backends). [`SubQueue::deliver_within`] waits a grace period for room first: the
/// embedded bus paces a publisher to a subscriber that is reading, as the broker does.
#[derive(Clone, Debug)]
pub(crate) struct SubQueue {
    tx: queue::Sender<Message>,
    pub(crate) state: Arc<SubState>,
}

/// What [`SubQueue::offer`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued.
    Taken,
    /// The queue is full: nothing was queued or counted.
    Full,
    /// The queue is full and its subscriber is a slow consumer (it did not drain within
    /// a grace before): nothing was queued or counted.
    Behind,
    /// The subscriber is gone.
    Gone,
}

impl SubQueue {
    /// A queue of `capacity` messages and its receiving side.
    pub(crate) fn new(
        subject: Utf8Bytes,
        queue: Option<Utf8Bytes>,
        capacity: usize,
        events: broadcast::Sender<Event>,
    ) -> (SubQueue, queue::Receiver<Message>) {
        let (tx, rx) = queue::channel(capacity);
        let state = Arc::new(SubState {
            subject,
            queue,
            dropped: AtomicU64::new(0),
            lagging: AtomicBool::new(false),
            refused: OnceLock::new(),
            events,
        });
        (SubQueue { tx, state }, rx)
    }

    /// Queues `message` if there is room now.
    pub(crate) fn offer(&self, message: Message) -> Offer {
        match self.tx.try_send(message) {
            Ok(()) => {
                self.has_room_again();
                Offer::Taken
            }
            Err(TrySendError::Full(_)) if self.state.lagging.load(Ordering::Relaxed) => {
                Offer::Behind
            }
            Err(TrySendError::Full(_)) => Offer::Full,
            Err(TrySendError::Closed(_)) => Offer::Gone,
        }
    }

    /// Queues `message`; `false` when it was not queued (full, or the subscriber is gone).
    #[cfg(any(test, feature = "nats"))]
    pub(crate) fn deliver(&self, message: Message) -> bool {
        match self.offer(message) {
            Offer::Taken => true,
            Offer::Full | Offer::Behind => {
                self.drop_one();
                false
            }
            Offer::Gone => false,
        }
    }

    /// Queues `messages`, which it leaves empty, as [`SubQueue::deliver`] would one
    /// after the other, but with one lock and one wake-up of the subscriber for all of
    /// them. Returns how many were queued.
    pub(crate) fn deliver_all(&self, messages: &mut Vec<Message>) -> usize {
        let mut messages = messages.drain(..);
        let sent = self.tx.try_send_all(&mut messages);
        if sent.sent > 0 {
            self.has_room_again();
        }
        if let Some(TrySendError::Full(_)) = sent.refused {
            // This one and every one after it: the queue has no room for them now.
            self.drop_one();
            for _ in messages {
                self.drop_one();
            }
        }
        sent.sent
    }

    /// Queues `message`, waiting up to `grace` for room. A subscriber still full after
    /// the grace is a slow consumer: the message is dropped and counted, and so is every
    /// later one that finds its queue full, at once, until it has room again.
    pub(crate) async fn deliver_within(&self, message: Message, grace: Duration) -> bool {
        let message = match self.tx.try_send(message) {
            Ok(()) => return true,
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(message)) => message,
        };
        if grace.is_zero() || self.state.lagging.load(Ordering::Relaxed) {
            self.drop_one();
            return false;
        }
        match self.tx.send_timeout(message, grace).await {
            Ok(()) => true,
            Err(SendTimeoutError::Timeout(_)) => {
                self.drop_one();
                false
            }
            Err(SendTimeoutError::Closed(_)) => false,
        }
    }

    /// A message was queued: a slow-consumer episode, if one was on, is over. Read
    /// before it is written: the flag's line stays shared while nothing changes.
    fn has_room_again(&self) {
        if self.state.lagging.load(Ordering::Relaxed) {
            self.state.lagging.store(false, Ordering::Relaxed);
        }
    }

    /// Counts a dropped message; the first of an episode is logged and reported.
    fn drop_one(&self) {
        let dropped = self.state.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.state.lagging.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                subject = %self.state.subject,
                dropped,
                "slow consumer: subscription queue is full, dropping messages"
            );
            let _ = self.state.events.send(Event::SlowConsumer {
                subject: self.state.subject.to_string(),
                dropped,
            });
        }
    }

    /// The broker ended this subscription; `message` says why. Ends the subscriber's
    /// stream once it has read what was queued.
    pub(crate) fn refuse(&self, message: &Message) {
        let reason = message
            .headers
            .get_str(DESCRIPTION_HEADER)
            .unwrap_or("refused by the broker");
        let _ = self.state.refused.set(reason.to_owned());
    }
}

/// Whether `message` is the broker's refusal of a subscription.
pub(crate) fn is_refusal(message: &Message) -> bool {
    message.status() == Some(SUBSCRIPTION_REFUSED)
}

/// A delivery target: a subscription queue, or the request inbox.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Queue(SubQueue),
    Inbox(Arc<Inbox>),
}

impl Target {
    #[cfg(feature = "nats")]
    pub(crate) fn deliver(&self, message: Message) -> bool {
        match self {
            Target::Queue(q) => q.deliver(message),
            Target::Inbox(inbox) => inbox.deliver(message),
        }
    }
}

/// Request/reply: one wildcard subscription (`_INBOX.<random>.*`) per bus handle, one
/// child subject per request, and a map from child to the waiting request.
///
/// The requests' deadlines are watched by one task per inbox (the sweeper, started by
/// the first request with a deadline), not by a timer per request: without a tokio
/// timer registered and cancelled per request, `req_seq`'s bench process went from
/// 16,133 to 15,571 instructions per request (callgrind). A request made on another
/// runtime than the sweeper's still gets a timer of its own.
#[derive(Debug)]
pub(crate) struct Inbox {
    /// `_INBOX.<random>.`
    prefix: String,
    next: AtomicU64,
    /// What the sweeper shares: it does not hold the inbox, which ends it when dropped.
    shared: Arc<InboxShared>,
}

#[derive(Debug)]
struct InboxShared {
    waiting: Mutex<Waits>,
    /// `waiting`'s length, stored after each change: read without the lock, which the
    /// connection's reader takes for every reply.
    in_flight: AtomicUsize,
    /// Wakes the sweeper: a deadline earlier than it sleeps for, or the inbox dropped.
    sweep: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Waits {
    /// By request id: this inbox's own sequence, so a fast unkeyed hash is safe.
    requests: FxHashMap<u64, Pending>,
    /// No swept request's deadline is earlier than this (it may be earlier than all of
    /// them: an answered request leaves it be); `None` once a sweep found none left.
    earliest: Option<Instant>,
    /// The runtime the sweeper runs on, while it runs.
    sweeper: Option<tokio::runtime::Id>,
    /// The inbox was dropped: the sweeper ends.
    closed: bool,
}

/// A registered request: where its reply goes, and its deadline if the sweeper
/// watches it.
#[derive(Debug)]
struct Pending {
    reply: oneshot::Sender<Message>,
    swept_at: Option<Instant>,
}

/// Deadline sweeps this close together at most: requests timing out one after another
/// are ended once per millisecond, not one wake-up each. Tokio's timer has the same
/// resolution.
const SWEEP_GAP: Duration = Duration::from_millis(1);

impl Inbox {
    pub(crate) fn new() -> Inbox {
        Inbox {
            prefix: format!("{}.", new_inbox()),
            next: AtomicU64::new(1),
            shared: Arc::new(InboxShared {
                waiting: Mutex::new(Waits::default()),
                in_flight: AtomicUsize::new(0),
                sweep: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The filter to subscribe the inbox with.
    pub(crate) fn filter(&self) -> String {
        format!("{}*", self.prefix)
    }

    /// Registers a request: its reply subject and where its reply will arrive. The
    /// registration ends when the returned [`Waiting`] is dropped. A request with a
    /// `deadline` is ended then ([`Waiting::reply`] says it timed out): by the inbox's
    /// sweeper if it runs on this task's runtime (it is started if none runs), or by a
    /// timer of the request's own.
    pub(crate) fn register(self: &Arc<Self>, deadline: Option<Instant>) -> (Utf8Bytes, Waiting) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        // Outside the lock: a thread-local read and a reference count.
        let runtime = deadline.and(tokio::runtime::Handle::try_current().ok());
        let here = runtime.as_ref().map(tokio::runtime::Handle::id);
        let mut start = false;
        let mut wake = false;
        let mut swept_at = None;
        {
            let mut waits = self.lock();
            if let (Some(at), Some(here)) = (deadline, here) {
                let swept = match waits.sweeper {
                    Some(there) => there == here,
                    None => {
                        waits.sweeper = Some(here);
                        start = true;
                        true
                    }
                };
                if swept {
                    swept_at = Some(at);
                    if waits.earliest.is_none_or(|earliest| at < earliest) {
                        waits.earliest = Some(at);
                        wake = true;
                    }
                }
            }
            waits.requests.insert(id, Pending { reply, swept_at });
            self.shared
                .in_flight
                .store(waits.requests.len(), Ordering::Relaxed);
        }
        if let (true, Some(runtime), Some(here)) = (start, runtime, here) {
            runtime.spawn(sweep(self.shared.clone(), here));
        } else if wake {
            self.shared.sweep.notify_one();
        }
        let reply = Utf8Bytes::from(crate::numbered(&self.prefix, id));
        (
            reply,
            Waiting {
                inbox: self.clone(),
                id,
                rx,
                deadline,
                own_timer: deadline.is_some() && swept_at.is_none(),
            },
        )
    }

    /// Requests registered and not answered or given up yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn deliver(&self, message: Message) -> bool {
        let Some(id) = message
            .subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|id| id.parse::<u64>().ok())
        else {
            return false;
        };
        match self.remove(id) {
            Some(pending) => pending.reply.send(message).is_ok(),
            None => false, // a reply after its request gave up, or a second reply
        }
    }

    /// Fails every waiting request (the connection their replies would use is gone).
    pub(crate) fn fail_all(&self) {
        let failed = {
            let mut waits = self.lock();
            self.shared.in_flight.store(0, Ordering::Relaxed);
            std::mem::take(&mut waits.requests)
        };
        drop(failed); // outside the lock: each wakes its request
    }

    fn remove(&self, id: u64) -> Option<Pending> {
        let mut waits = self.lock();
        let pending = waits.requests.remove(&id);
        self.shared
            .in_flight
            .store(waits.requests.len(), Ordering::Relaxed);
        pending
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waits> {
        self.shared.lock()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.lock().closed = true;
        self.shared.sweep.notify_one();
    }
}

impl InboxShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waits> {
        // Inserts and removes only: a panic elsewhere cannot leave the map half-updated.
        crate::lock(&self.waiting)
    }
}

/// The sweeper: ends every swept request whose deadline passed (its reply sender is
/// dropped), until the inbox is dropped. Sleeps until the earliest deadline, or
/// [`SWEEP_GAP`] after the last sweep if later. If its runtime shuts down first, the
/// next request with a deadline starts another.
async fn sweep(shared: Arc<InboxShared>, runtime: tokio::runtime::Id) {
    /// Marks the sweeper gone when its task ends or is dropped with its runtime.
    struct Gone(Arc<InboxShared>, tokio::runtime::Id);
    impl Drop for Gone {
        fn drop(&mut self) {
            let mut waits = self.0.lock();
            if waits.sweeper == Some(self.1) {
                waits.sweeper = None;
            }
        }
    }
    let shared = Gone(shared, runtime);
    let shared = &shared.0;
    rpc_core::sync::sweep_deadlines(
        &shared.sweep,
        SWEEP_GAP,
        || {
            let waits = shared.lock();
            (!waits.closed).then_some(waits.earliest)
        },
        |now| {
            let expired: Vec<(u64, Pending)> = {
                let mut waits = shared.lock();
                let expired = waits
                    .requests
                    .extract_if(|_, pending| pending.swept_at.is_some_and(|at| at <= now))
                    .collect();
                waits.earliest = waits
                    .requests
                    .values()
                    .filter_map(|pending| pending.swept_at)
                    .min();
                shared
                    .in_flight
                    .store(waits.requests.len(), Ordering::Relaxed);
                expired
            };
            drop(expired); // outside the lock: each wakes its request, which timed out
        },
    )
    .await;
}

/// Why a request ended without a reply ([`Waiting::reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unanswered {
    /// Its deadline passed.
    TimedOut,
    /// The connection its reply would come on is gone.
    Lost,
}

/// A request waiting for its reply.
#[derive(Debug)]
pub(crate) struct Waiting {
    inbox: Arc<Inbox>,
    id: u64,
    pub(crate) rx: oneshot::Receiver<Message>,
    /// The deadline it was registered with.
    deadline: Option<Instant>,
    /// Its deadline is not the sweeper's to watch: [`Waiting::reply`] starts a timer.
    own_timer: bool,
}

impl Waiting {
    /// The reply, or why none came: the deadline it was registered with passed, or the
    /// connection was lost. Without a deadline, waits until one of the others.
    pub(crate) async fn reply(&mut self) -> Result<Message, Unanswered> {
        let answer = match self.deadline {
            Some(at) if self.own_timer => match tokio::time::timeout_at(at, &mut self.rx).await {
                Ok(answer) => answer,
                Err(_) => return Err(Unanswered::TimedOut),
            },
            _ => (&mut self.rx).await,
        };
        answer.map_err(|_| {
            // Dropped unanswered: by the sweeper once the deadline passed (it takes
            // out only those), or because the connection was lost.
            if self.deadline.is_some_and(|at| Instant::now() >= at) {
                Unanswered::TimedOut
            } else {
                Unanswered::Lost
            }
        })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // A receiver that yielded its reply, or the error of a dropped sender, is no
        // longer in the map: whatever answered or failed it took it out first. That
        // spares the common case (a request answered) a second taking of the lock
        // that the connection's reader takes for every reply.
        if !self.rx.is_terminated() {
            self.inbox.remove(self.id);
        }
    }
}

/// How inbox subjects start ([`new_inbox`]).
pub(crate) const INBOX_PREFIX: &str = "_INBOX.";

/// A fresh, unique inbox subject: `_INBOX.` and 22 random characters.
pub fn new_inbox() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = std::collections::hash_map::RandomState::new();
    // the process id tells a forked child's inboxes from its parent's (both start from
    // the same counter and hash keys); asked once, as it is a system call
    let pid = std::process::id();
    let mut id = String::with_capacity(7 + 22);
    id.push_str(INBOX_PREFIX);
    for half in 0..2u64 {
        let mut bits = state.hash_one((n, half, pid));
        for _ in 0..11 {
            id.push(ALPHABET[(bits % 62) as usize] as char);
            bits /= 62;
        }
    }
    id
}

/// How a backend removes a subscription when its [`Subscriber`] is dropped.
pub(crate) trait Unsubscribe: Send + Sync + 'static {
    /// Removes the subscription now; what is in flight to it is lost. Idempotent.
    fn unsubscribe(&self, key: u64, state: &SubState);

    /// Removes the subscription once everything already sent to it has arrived in its
    /// queue. The default suits backends that route synchronously.
    fn drain(
        self: Arc<Self>,
        key: u64,
        state: Arc<SubState>,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        self.unsubscribe(key, &state);
        Box::pin(std::future::ready(()))
    }
}

/// A subscription: a [`Stream`] of the messages that match its subject.
///
/// Dropping it unsubscribes. Its queue is bounded (`subscription_capacity`); when the
/// subscriber does not keep up, new messages are dropped and counted
/// ([`Subscriber::dropped`], [`Event::SlowConsumer`]) instead of growing memory or
/// slowing other subscribers.
///
/// ```
/// use mq_transport::Bus;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mq_transport::BusError> {
/// let bus = Bus::embedded();
/// let mut sub = bus.subscribe("greetings.*").await?;
/// bus.publish("greetings.en", "hello").await?;
/// let message = sub.next().await.expect("subscribed");
/// assert_eq!(message.subject, "greetings.en");
/// assert_eq!(sub.dropped(), 0);
/// # Ok(()) }
/// ```
pub struct Subscriber {
    rx: queue::Receiver<Message>,
    state: Arc<SubState>,
    key: u64,
    backend: Arc<dyn Unsubscribe>,
    drained: bool,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("subject", &self.state.subject)
            .field("queue", &self.state.queue)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    pub(crate) fn new(
        rx: queue::Receiver<Message>,
        state: Arc<SubState>,
        key: u64,
        backend: Arc<dyn Unsubscribe>,
    ) -> Self {
        Subscriber {
            rx,
            state,
            key,
            backend,
            drained: false,
        }
    }

    /// The next message; `None` once the subscription ended (the bus was closed, or the
    /// broker ended it: see [`Subscriber::ended_by_broker`]).
    pub async fn next(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The subject (filter) subscribed to.
    pub fn subject(&self) -> &str {
        &self.state.subject
    }

    /// The queue group, for a queue subscription.
    pub fn queue(&self) -> Option<&str> {
        self.state.queue.as_deref()
    }

    /// Messages dropped because this subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }

    /// Why the broker ended this subscription, if it did.
    pub fn ended_by_broker(&self) -> Option<&str> {
        self.state.refused()
    }

    /// Unsubscribes now (the same as dropping it).
    pub fn unsubscribe(self) {}

    /// Unsubscribes without losing what was already sent here: returns once the bus has
    /// removed the subscription and every message routed to it before that is in its
    /// queue (on a remote bus, after a round trip to the broker). [`Subscriber::next`]
    /// then yields those messages, then `None`.
    ///
    /// A service instance drains to stop taking work without dropping work it was
    /// already given (NATS calls this draining a subscription). On the NATS backend this
    /// is async-nats's drain, which drops messages the server sent before it read the
    /// unsubscribe.
    pub async fn drain(&mut self) {
        if !std::mem::replace(&mut self.drained, true) {
            self.backend
                .clone()
                .drain(self.key, self.state.clone())
                .await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        // Also completes a drain that was abandoned half-way.
        self.backend.unsubscribe(self.key, &self.state);
    }
}

impl Stream for Subscriber {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inboxes_are_unique_valid_subjects() {
        let a = new_inbox();
        let b = new_inbox();
        assert_ne!(a, b);
        assert_eq!(a.len(), 29);
        crate::subject::validate_subject(&a).unwrap();
    }

    #[tokio::test]
    async fn a_request_leaves_the_inbox_when_answered_failed_or_given_up() {
        let inbox = Arc::new(Inbox::new());
        let (answered_to, mut answered) = inbox.register(None);
        let (_, given_up) = inbox.register(None);
        let (_, mut failed) = inbox.register(None);
        assert_eq!(inbox.in_flight(), 3);

        assert!(inbox.deliver(Message::new(answered_to.clone(), "ok")));
        assert_eq!(answered.reply().await.unwrap().payload, "ok");
        assert_eq!(inbox.in_flight(), 2);
        drop(answered);
        assert_eq!(inbox.in_flight(), 2, "the others stay registered");
        assert!(
            !inbox.deliver(Message::new(answered_to, "again")),
            "a second reply finds no one"
        );

        drop(given_up);
        assert_eq!(inbox.in_flight(), 1, "a request given up leaves at once");

        inbox.fail_all();
        assert_eq!(failed.reply().await.unwrap_err(), Unanswered::Lost);
        drop(failed);
        assert_eq!(inbox.in_flight(), 0);
        assert!(inbox.lock().requests.is_empty());
    }

    /// Whether `waiting` has its reply or its end by now, after the tasks that can run
    /// have run.
    async fn ended(waiting: &mut Waiting) -> Option<Result<Message, Unanswered>> {
        tokio::task::yield_now().await;
        let reply = waiting.reply();
        tokio::pin!(reply);
        std::future::poll_fn(|cx| match reply.as_mut().poll(cx) {
            Poll::Ready(end) => Poll::Ready(Some(end)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }

    /// `at` is `after` a test's start, to tokio's timer resolution.
    fn at_about(at: Instant, start: Instant, after: Duration) -> bool {
        let elapsed = at - start;
        elapsed >= after && elapsed < after + Duration::from_millis(2)
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_ends_each_request_at_its_own_deadline_and_no_sooner() {
        let inbox = Arc::new(Inbox::new());
        let start = Instant::now();
        let (_, mut late) = inbox.register(Some(start + Duration::from_secs(10)));
        // An earlier deadline after a later one: the sweeper is woken for it.
        let (_, mut early) = inbox.register(Some(start + Duration::from_secs(1)));
        let (answered_to, mut answered) = inbox.register(Some(start + Duration::from_millis(500)));
        assert!(
            !early.own_timer && !late.own_timer,
            "the sweeper watches both"
        );

        tokio::time::sleep_until(start + Duration::from_millis(400)).await;
        assert!(inbox.deliver(Message::new(answered_to, "in time")));
        assert_eq!(answered.reply().await.unwrap().payload, "in time");

        tokio::time::sleep_until(start + Duration::from_millis(999)).await;
        assert!(ended(&mut early).await.is_none(), "not before its deadline");
        assert_eq!(early.reply().await.unwrap_err(), Unanswered::TimedOut);
        assert!(at_about(Instant::now(), start, Duration::from_secs(1)));
        assert_eq!(inbox.in_flight(), 1, "the late one is still waiting");

        assert!(ended(&mut late).await.is_none());
        assert_eq!(late.reply().await.unwrap_err(), Unanswered::TimedOut);
        assert!(at_about(Instant::now(), start, Duration::from_secs(10)));
        assert_eq!(inbox.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_one_after_another_leave_the_first_deadline_as_the_one_slept_for() {
        let inbox = Arc::new(Inbox::new());
        let first = Instant::now() + Duration::from_secs(5);
        for n in 0..100 {
            let at = first + Duration::from_millis(10 * n);
            let (to, mut waiting) = inbox.register(Some(at));
            assert!(inbox.deliver(Message::new(to, "ok")));
            waiting.reply().await.unwrap();
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // Each later deadline left the one slept for as it was: registering them woke
        // nobody.
        let waits = inbox.lock();
        assert_eq!(waits.requests.len(), 0);
        assert_eq!(waits.earliest, Some(first));
    }

    #[test]
    fn a_request_made_on_another_runtime_than_the_sweepers_keeps_its_own_timer() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let inbox = Arc::new(Inbox::new());
        let first = runtime();
        let swept = first.block_on(async {
            let (_, waiting) = inbox.register(Some(Instant::now() + Duration::from_secs(60)));
            tokio::task::yield_now().await; // the sweeper starts on this runtime
            waiting
        });
        assert!(!swept.own_timer);

        let second = runtime();
        second.block_on(async {
            let (_, mut own) = inbox.register(Some(Instant::now() + Duration::from_millis(20)));
            assert!(own.own_timer, "the sweeper runs on the first runtime");
            assert_eq!(own.reply().await.unwrap_err(), Unanswered::TimedOut);
        });

        drop(first); // its sweeper with it
        assert_eq!(inbox.lock().sweeper, None);
        second.block_on(async {
            let (_, mut late) = inbox.register(Some(Instant::now() + Duration::from_millis(20)));
            assert!(!late.own_timer, "a sweeper started on this runtime");
            assert_eq!(late.reply().await.unwrap_err(), Unanswered::TimedOut);
            // The first runtime's request is swept here now.
            let mut swept = swept;
            assert_eq!(swept.reply().await.unwrap_err(), Unanswered::TimedOut);
        });
    }

    #[tokio::test]
    async fn a_dropped_inbox_ends_its_sweeper() {
        let inbox = Arc::new(Inbox::new());
        let shared = inbox.shared.clone();
        drop(inbox.register(Some(Instant::now() + Duration::from_secs(60))));
        tokio::task::yield_now().await;
        assert!(shared.lock().sweeper.is_some());
        drop(inbox);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(shared.lock().sweeper, None);
        assert_eq!(
            Arc::strong_count(&shared),
            1,
            "nothing holds it but this test"
        );
    }

    /// The next event is the one `SlowConsumer` of an episode on subject `s`, with
    /// `dropped` counted so far, and no other follows it.
    fn expect_slow_consumer(seen: &mut broadcast::Receiver<Event>, dropped: u64) {
        assert_eq!(
            seen.try_recv().unwrap(),
            Event::SlowConsumer {
                subject: "s".into(),
                dropped
            }
        );
        assert!(seen.try_recv().is_err(), "one event per episode");
    }

    #[tokio::test]
    async fn delivering_several_at_once_queues_what_fits_and_counts_the_rest_as_dropped() {
        let (events, mut seen) = broadcast::channel(16);
        let (q, mut rx) = SubQueue::new("s".into(), None, 2, events);
        let mut messages: Vec<Message> = (0..4).map(|i| Message::new("s", i.to_string())).collect();
        assert_eq!(q.deliver_all(&mut messages), 2);
        assert!(messages.is_empty());
        assert_eq!(q.state.dropped.load(Ordering::Relaxed), 2);
        expect_slow_consumer(&mut seen, 1);
        assert_eq!(rx.recv().await.unwrap().payload, "0");
        assert_eq!(rx.recv().await.unwrap().payload, "1");
        let mut more = vec![Message::new("s", "4")];
        assert_eq!(q.deliver_all(&mut more), 1);
        assert!(
            !q.state.lagging.load(Ordering::Relaxed),
            "the episode ended"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_counts_and_reports_once_per_episode() {
        let (events, mut seen) = broadcast::channel(16);
        let (q, mut rx) = SubQueue::new("s".into(), None, 2, events);
        assert!(q.deliver(Message::new("s", "1")));
        assert!(q.deliver(Message::new("s", "2")));
        assert!(!q.deliver(Message::new("s", "3")));
        assert!(!q.deliver(Message::new("s", "4")));
        expect_slow_consumer(&mut seen, 1);
        rx.recv().await.unwrap();
        assert!(q.deliver(Message::new("s", "5")));
        assert!(!q.deliver(Message::new("s", "6")));
        expect_slow_consumer(&mut seen, 3);
        assert_eq!(q.state.dropped.load(Ordering::Relaxed), 3);
    }
}
