//! Fan-out: a publish to every matching subscription's connection, pacing publishers to
//! subscribers that fall behind, and cutting off those that stop reading.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rpc_core::connection::{BatchError, EncodedFrames, TrySendError};
use rpc_core::frame::{Delivery, Frame, Message as MsgFrame, Publish};
use rpc_core::{ConnectionError, Utf8Bytes};

use super::Shared;
use super::connection::Conn;
use crate::message::{NO_RESPONDERS, status_headers};
use crate::subject::{SubjectError, validate_subject};
use crate::sublist::{KeptMatch, Match, Offered, Sublist, inbox_of};

/// One subscription's way out: its connection and its sid there.
#[derive(Clone, Debug)]
pub(super) struct Route {
    pub(super) conn: Arc<Conn>,
    pub(super) sid: u64,
}

/// The match of the last reply's inbox prefix, for the next reply of the same batch
/// (see [`Shared::route_reply`]). Kept for one batch only: a subscription made meanwhile
/// is as if made just after the batch.
#[derive(Default)]
pub(super) struct ReplyRoutes {
    last: Option<(Box<str>, Arc<Match<Route>>)>,
}

/// A connection's last publish subject, and what it matched ([`KeptMatch`]): a
/// publisher that sends to one subject again and again is validated and matched once,
/// until a subscription comes or goes. (The shared cache costs a lock and a hash per
/// publish.) The match is held weakly, so a change that evicts it frees it (and the
/// connections its routes hold) even while this publisher is idle.
///
/// Reply subjects differ in their last token from one reply to the next: the match of
/// the last inbox replied to (`_INBOX.<id>.`) is kept the same way, weakly, while the
/// broker's [`Sublist::matches_inbox`] keeps it.
///
/// [`Sublist::matches_inbox`]: crate::sublist::Sublist::matches_inbox
#[derive(Default)]
pub(super) struct PublishRoutes {
    /// Validated already.
    subject: Utf8Bytes,
    found: Option<KeptMatch<Route>>,
    /// The last inbox replied to, up to and including its last `.`, and its match.
    inbox: Option<(Box<str>, KeptMatch<Route>)>,
}

impl PublishRoutes {
    /// Checks a publish subject and notes it as the connection's last one: validated
    /// unless it is the last one already (validation depends on the bytes alone).
    pub(super) fn check(&mut self, subject: &Utf8Bytes) -> Result<(), SubjectError> {
        if self.subject.is_empty() || self.subject != *subject {
            validate_subject(subject)?;
            self.subject = subject.clone();
            self.found = None;
        }
        Ok(())
    }

    /// The subscriptions the reply subject `subject` reaches: the last inbox's match if
    /// `subject` is in that inbox and nothing changed since, else the broker's
    /// ([`Sublist::matches_inbox`]), read after `generation`.
    ///
    /// [`Sublist::matches_inbox`]: crate::sublist::Sublist::matches_inbox
    fn inbox_match(
        &mut self,
        subs: &Sublist<Route>,
        subject: &str,
        generation: u64,
    ) -> Arc<Match<Route>> {
        let inbox = inbox_of(subject);
        if let Some((last, kept)) = &self.inbox
            && inbox == Some(&**last)
            && let Some(found) = subs.kept(kept)
        {
            return found;
        }
        let (found, kept) = subs.matches_inbox(subject);
        self.inbox = inbox
            .filter(|_| kept)
            .map(|inbox| (inbox.into(), KeptMatch::new(generation, &found)));
        found
    }
}

/// The messages that one read of a publisher's connection routed, encoded per
/// subscriber connection and sent once per connection when the read is done, as
/// nats-server flushes each client once per read: one write (or one queued item) per
/// subscriber per read, from the thread that read them, instead of one queued frame per
/// message for each subscriber's writer task to encode.
///
/// Bounded: a connection's batch is sent once it holds [`Batches::CONN_BYTES`], all of
/// them once they hold [`Batches::TOTAL_BYTES`] or reach [`Batches::MAX_CONNS`]
/// connections. Only messages of up to [`Batches::MESSAGE_BYTES`] to at most
/// [`Batches::MAX_ROUTES`] subscriptions are batched; a larger publish is sent as
/// before, after the batches (its frames share its buffers rather than copying them for
/// each subscriber). The batches come from the broker's [`BatchPool`] and go back to it
/// once sent.
#[derive(Default)]
pub(super) struct Batches {
    /// Subscriber connections and what is encoded for each, in the order first reached.
    conns: Vec<(Arc<Conn>, EncodedFrames)>,
    /// Bytes encoded in all of them.
    bytes: usize,
    /// A connection's batch reached [`Batches::CONN_BYTES`].
    conn_full: bool,
}

impl Batches {
    /// A connection's batch is sent once it holds this many bytes. (At 64 KiB, with
    /// 256 KiB for all, a fan-out of 1 KiB messages to 4 subscribers made four times the
    /// writes, and the broker spent about 20% more CPU per message, mostly in the
    /// kernel's send path.)
    pub(super) const CONN_BYTES: usize = 256 * 1024;
    /// All batches are sent once they hold this many bytes together.
    pub(super) const TOTAL_BYTES: usize = 1024 * 1024;
    /// Messages whose `Msg` frame is larger are not batched.
    pub(super) const MESSAGE_BYTES: usize = 16 * 1024;
    /// Publishes that reach more subscriptions (queue groups counting once) are not
    /// batched: one publish encoded for thousands of subscribers would hold as many
    /// copies at once.
    pub(super) const MAX_ROUTES: usize = 32;
    /// All batches are sent once this many connections have one (each publish is
    /// looked up among them).
    pub(super) const MAX_CONNS: usize = 64;
    /// The most a batch holds while each publish reaches its connection once: it is
    /// sent once past [`Batches::CONN_BYTES`], so its last frame (at most
    /// [`Batches::MESSAGE_BYTES`] and a length prefix) starts below that. (A publish to
    /// several subscriptions of one connection adds a frame for each before the batch
    /// is sent; its buffer then grows, within `max_queued_bytes`, and is given back to
    /// the allocator once sent.)
    const MOST: usize = Self::CONN_BYTES + Self::MESSAGE_BYTES + 4;

    /// Whether nothing waits to be sent.
    pub(super) fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// `publish`, ready to be encoded for each subscription, if it is batched (it
    /// matched `found`).
    fn takes<'p>(publish: &'p Publish, found: &Match<Route>) -> Option<Delivery<'p>> {
        let routes = found.plain.len() + found.groups.len();
        if routes == 0 || routes > Self::MAX_ROUTES {
            return None;
        }
        // A field too long for the wire is refused per subscription, as unbatched.
        Delivery::new(publish)
            .ok()
            .filter(|delivery| delivery.encoded_len() <= Self::MESSAGE_BYTES)
    }

    /// Encodes the delivery of `route`'s message into its connection's batch if that
    /// connection has room for it beside what is queued there and what the batch holds.
    fn encode(
        &mut self,
        route: &Route,
        delivery: &Delivery<'_>,
        pool: &BatchPool,
    ) -> Result<(), BatchError> {
        let conn = &route.conn;
        let at = match self.conns.iter().rposition(|(c, _)| Arc::ptr_eq(c, conn)) {
            Some(at) => at,
            None => {
                let batch = pool.take();
                self.conns.push((conn.clone(), batch));
                self.conns.len() - 1
            }
        };
        let batch = &mut self.conns[at].1;
        let before = batch.bytes();
        conn.sender
            .try_encode_delivery_into(delivery, route.sid, batch)?;
        let after = batch.bytes();
        self.bytes += after - before;
        self.conn_full |= after >= Self::CONN_BYTES;
        Ok(())
    }

    /// Whether the batches are to be sent now, before the read is done.
    fn over_limit(&self) -> bool {
        self.conn_full || self.bytes >= Self::TOTAL_BYTES || self.conns.len() >= Self::MAX_CONNS
    }
}

/// Empty batches, with their buffers, for the sessions of a broker: a session takes one
/// for each subscriber connection a read reaches and gives it back once sent. Each has
/// room for what a batch holds at most ([`Batches::MOST`]), so a batch does not grow its
/// buffer, and the buffers
/// are not given back to the allocator after every read. (With the system allocator,
/// `fanout_1toN` 1 KiB ran at about half speed in one run in three, spending its time
/// in page faults: freed batches let the allocator hand pages back to the system,
/// `madvise`, and take them again on the next read.) At most [`BatchPool::POOLED`]
/// are kept, about 8.5 MiB; a read that reaches more connections takes new ones for the
/// rest, and frees them once sent.
#[derive(Debug, Default)]
pub(super) struct BatchPool {
    free: Mutex<Vec<EncodedFrames>>,
}

impl BatchPool {
    /// Batches kept for reuse.
    const POOLED: usize = 32;

    fn take(&self) -> EncodedFrames {
        crate::lock(&self.free)
            .pop()
            .unwrap_or_else(|| EncodedFrames::with_capacity(Batches::MOST))
    }

    /// Keeps `batches` (emptied) while the pool has room; drops the rest.
    fn give_back(&self, batches: impl Iterator<Item = EncodedFrames>) {
        let mut free = crate::lock(&self.free);
        for mut batch in batches {
            if free.len() >= Self::POOLED {
                break;
            }
            // left by a connection cut off or closed meanwhile
            batch.clear();
            free.push(batch);
        }
    }
}

/// What routing a publish left to wait for.
#[derive(Default)]
struct Later {
    /// Subscriptions whose connections are at `max_queued_bytes` (for a queue group: only
    /// when no member had room).
    full: Vec<Route>,
    /// Connections past `pace_queued_bytes`.
    behind: Vec<Arc<Conn>>,
}

impl Shared {
    /// A publish the session accepted, after the streams captured it. Subscribers get a
    /// captured message once its stream has taken it (as on the embedded bus, before
    /// its fsync under `always`: plain delivery is at-most-once).
    ///
    /// `routes` is the session's, which checked this publish's subject
    /// ([`PublishRoutes::check`]); `batches` its messages of this read, which the
    /// session sends ([`Shared::flush`]) when the read is done.
    pub(super) async fn publish(
        &self,
        publish: &Publish,
        routes: &mut PublishRoutes,
        batches: &mut Batches,
    ) {
        self.count_in();
        debug_assert!(routes.subject == publish.subject, "checked first");
        let cached = routes.found.as_ref().and_then(|kept| self.subs.kept(kept));
        let found = cached.unwrap_or_else(|| {
            // the generation first: a change after it shows as a new one next time
            let generation = self.subs.generation();
            let subject = &publish.subject;
            if subject.starts_with(crate::delivery::INBOX_PREFIX) {
                // a reply subject is used once: its inbox's match is kept, not its own
                return routes.inbox_match(&self.subs, subject, generation);
            }
            let found = self.subs.matches(subject);
            routes.found = Some(KeptMatch::new(generation, &found));
            found
        });
        self.route_batched(publish, &found, batches).await;
    }

    /// Routes `publish` to the subscriptions `found` through this read's `batches`
    /// (sent by [`Shared::flush`]) when it can be batched, else on its own after them.
    async fn route_batched(&self, publish: &Publish, found: &Match<Route>, batches: &mut Batches) {
        let Some(delivery) = Batches::takes(publish, found) else {
            // what this read batched before it goes first, then this one as it is
            self.flush(batches).await;
            self.route_match(publish, found).await;
            return;
        };
        let mut full = Vec::new(); // allocates only when a connection is full
        let delivered = found.offer(|route| route.batch(&delivery, self, batches), &mut full);
        self.messages_out.fetch_add(delivered, Ordering::Relaxed);
        if !full.is_empty() {
            // Earlier messages to a full connection wait in its batch: they go first,
            // then this one waits for room as an unbatched one does.
            let later = Later {
                full: full.into_iter().cloned().collect(),
                behind: Vec::new(),
            };
            self.flush(batches).await;
            self.settle(publish, later).await;
        } else if batches.over_limit() {
            self.flush(batches).await;
        }
    }

    /// Sends what `batches` holds, one batch per subscriber connection: written at once
    /// where nothing is queued or being written, queued otherwise. A connection without
    /// room waits up to `slow_consumer_grace` and is then cut off as a slow consumer;
    /// one past `pace_queued_bytes` afterwards paces the publisher, as for a single
    /// message ([`Shared::settle`]).
    pub(super) async fn flush(&self, batches: &mut Batches) {
        if batches.is_empty() {
            return;
        }
        let grace = self.config.slow_consumer_grace;
        let mut sent = std::mem::take(&mut batches.conns);
        for (conn, batch) in &mut sent {
            if conn.slow.load(Ordering::Relaxed) {
                continue;
            }
            match conn.sender.send_encoded_within(batch, grace).await {
                Ok(()) => self.pace(conn).await,
                Err(BatchError::Full) => conn.cut_off_full(self),
                Err(BatchError::Failed(_)) => {} // closed: its queue goes with it
            }
        }
        batches.bytes = 0;
        batches.conn_full = false;
        // the batches back to the pool, for their buffers; the connections let go
        self.batch_pool
            .give_back(sent.drain(..).map(|(_, batch)| batch));
        batches.conns = sent;
    }

    /// Counts a publish received that is not routed (handled by the streams, or a
    /// duplicate).
    pub(super) fn count_in(&self) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
    }

    /// Delivers a publish to every plain subscriber and one member of each queue group;
    /// waits (up to `slow_consumer_grace`) for room on subscriber connections that are
    /// full, and paces the publisher to those past `pace_queued_bytes`.
    pub(super) async fn route(&self, publish: &Publish) {
        self.route_match(publish, &self.lookup(&publish.subject))
            .await;
    }

    /// [`Shared::route`] to the subscriptions `found`.
    async fn route_match(&self, publish: &Publish, found: &Match<Route>) {
        let mut later = Later::default();
        self.route_found(publish, found, &mut later);
        self.settle(publish, later).await;
    }

    /// The subscriptions `subject` reaches.
    fn lookup(&self, subject: &str) -> Arc<Match<Route>> {
        // A reply goes to an inbox subject used once: caching it would only churn. (Not
        // through `matches_inbox` either: the tasks that route this way, a stream's
        // acknowledgements after their fsync say, would share its match, and its count,
        // with the session replying to that inbox on the other core. With it, and a
        // read's acknowledgements matched the same way, `always` 1 KiB `js_pub_async`
        // made 156–170k publishes/s against 167–177k without, 5 alternating runs each.)
        if subject.starts_with(crate::delivery::INBOX_PREFIX) {
            self.subs.matches_once(subject)
        } else {
            self.subs.matches(subject)
        }
    }

    /// [`Shared::route`] for a reply of a batch (a connection's publish acknowledgements,
    /// one per publish, each to its own inbox subject): matched once per inbox prefix
    /// while the match does not depend on the last token (see [`Sublist::matches_reply`]).
    ///
    /// [`Sublist::matches_reply`]: crate::sublist::Sublist::matches_reply
    ///
    /// With `batches`, into them, as the messages of a read are: sent by
    /// [`Shared::flush`], by this task when the connection is idle. Without, through
    /// each connection's queue, for its writer task. (A lone acknowledgement through
    /// the queue woke the writer task for it: 3,300 of the broker's 22,700 instructions
    /// per `js_pub_seq` publish, callgrind.)
    pub(super) async fn route_reply(
        &self,
        publish: &Publish,
        routes: &mut ReplyRoutes,
        batches: Option<&mut Batches>,
    ) {
        let subject = &publish.subject;
        let inbox = inbox_of(subject);
        let found = match &routes.last {
            Some((cached, found)) if inbox == Some(&**cached) => found.clone(),
            _ => {
                let (found, any_last) = self.subs.matches_reply(subject);
                routes.last = inbox
                    .filter(|_| any_last)
                    .map(|inbox| (inbox.into(), found.clone()));
                found
            }
        };
        match batches {
            Some(batches) => self.route_batched(publish, &found, batches).await,
            None => self.route_match(publish, &found).await,
        }
    }

    /// Waits for what routing left: room on full connections, pacing.
    async fn settle(&self, publish: &Publish, later: Later) {
        for route in later.full {
            let frame = route.frame(publish);
            route.conn.deliver_within(frame, self).await;
        }
        for conn in later.behind {
            self.pace(&conn).await;
        }
    }

    /// Paces the publisher to `conn` while it is past `pace_queued_bytes`: waits up to
    /// `slow_consumer_grace` for it to drain below half of that, and cuts it off as a
    /// slow consumer if it does not. Without a grace, nothing is paced.
    async fn pace(&self, conn: &Conn) {
        let pace = self.config.pace_queued_bytes;
        let grace = self.config.slow_consumer_grace;
        if grace.is_zero()
            || conn.sender.queued_bytes() <= pace
            || conn.slow.load(Ordering::Relaxed)
        {
            return;
        }
        if !conn.sender.wait_below(pace / 2, grace).await {
            conn.cut_off(
                format!(
                    "slow consumer: {} bytes queued for this connection did not drain \
                     below {} bytes (half of pace_queued_bytes) within {grace:?} \
                     (slow_consumer_grace); disconnecting",
                    conn.sender.queued_bytes(),
                    pace / 2,
                ),
                self,
            );
        }
    }

    /// Queues `publish` for the subscriptions `found`.
    fn route_found(&self, publish: &Publish, found: &Match<Route>, later: &mut Later) {
        if found.is_empty() {
            if !publish.reply.is_empty() {
                self.no_responders(publish, later);
            }
            return;
        }
        let mut full = Vec::new(); // allocates only when a connection is full
        let delivered = found.offer(|route| route.deliver(publish, self, later), &mut full);
        later.full.extend(full.into_iter().cloned());
        self.messages_out.fetch_add(delivered, Ordering::Relaxed);
    }

    /// Tells a requester at once that its request reached nobody: a status message to
    /// the reply subject, routed like any publish (it has no reply subject itself).
    fn no_responders(&self, request: &Publish, later: &mut Later) {
        let description = format!("no responders for `{}`", request.subject);
        let status = Publish {
            subject: request.reply.clone(),
            reply: Utf8Bytes::default(),
            headers: status_headers(NO_RESPONDERS, description),
            payload: bytes::Bytes::new(),
        };
        self.route_found(&status, &self.lookup(&status.subject), later);
    }
}

impl Route {
    /// The `Msg` frame that delivers `publish` to this subscription (shares its buffers).
    fn frame(&self, publish: &Publish) -> Frame {
        Frame::Msg(MsgFrame {
            sid: self.sid,
            subject: publish.subject.clone(),
            reply: publish.reply.clone(),
            headers: publish.headers.clone(),
            payload: publish.payload.clone(),
        })
    }

    /// Queues the message on the subscriber's connection if it has room. A full
    /// connection is reported as such (the fan-out tries another member of a queue group
    /// first, then waits for it); one past the pace mark is noted to pace the publisher
    /// (`later.behind`); a cut-off or closed connection, or a frame over the limit that
    /// connection stated, cannot take it.
    fn deliver(&self, publish: &Publish, shared: &Shared, later: &mut Later) -> Offered {
        let conn = &self.conn;
        if conn.slow.load(Ordering::Relaxed) {
            return Offered::Refused;
        }
        match conn.sender.try_send(self.frame(publish)) {
            Ok(()) => {
                if conn.sender.queued_bytes() > shared.config.pace_queued_bytes {
                    later.behind.push(conn.clone());
                }
                Offered::Taken
            }
            Err(TrySendError::Full(_)) => Offered::Full,
            Err(TrySendError::Failed(ConnectionError::FrameTooLarge { size, limit })) => {
                self.too_large(publish, shared, size, limit);
                Offered::Refused
            }
            Err(TrySendError::Failed(_)) => Offered::Refused,
        }
    }

    /// [`Route::deliver`] into this read's batch for the subscriber's connection.
    fn batch(&self, delivery: &Delivery<'_>, shared: &Shared, batches: &mut Batches) -> Offered {
        if self.conn.slow.load(Ordering::Relaxed) {
            return Offered::Refused;
        }
        match batches.encode(self, delivery, &shared.batch_pool) {
            Ok(()) => Offered::Taken,
            Err(BatchError::Full) => Offered::Full,
            Err(BatchError::Failed(ConnectionError::FrameTooLarge { size, limit })) => {
                self.too_large(delivery.publish(), shared, size, limit);
                Offered::Refused
            }
            Err(BatchError::Failed(_)) => Offered::Refused,
        }
    }

    /// Counts and logs a message not delivered here: its frame is over the limit this
    /// subscriber's connection stated.
    fn too_large(&self, publish: &Publish, shared: &Shared, size: u64, limit: usize) {
        shared.messages_too_large.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            peer = %self.conn.peer,
            subject = %publish.subject,
            size,
            limit,
            "message not delivered: its frame exceeds the frame limit this subscriber's connection stated"
        );
    }
}

impl Conn {
    /// Queues `frame` once there is room, waiting up to the grace; a connection still
    /// full after it is cut off as a slow consumer.
    async fn deliver_within(&self, frame: Frame, shared: &Shared) {
        if self.slow.load(Ordering::Relaxed) {
            return;
        }
        let grace = shared.config.slow_consumer_grace;
        if !grace.is_zero() {
            let Err(TrySendError::Full(_)) = self.sender.send_within(frame, grace).await else {
                return; // queued, or the connection is gone
            };
        }
        self.cut_off_full(shared);
    }

    /// Cuts this connection off as a slow consumer that stayed full for the grace.
    fn cut_off_full(&self, shared: &Shared) {
        let grace = shared.config.slow_consumer_grace;
        let limits = &shared.config.connection;
        let message = format!(
            "slow consumer: {} bytes queued for this connection reached the broker's \
             limit of {} bytes (max_queued_bytes) or of {} frames (send_queue), and did not \
             drain within {:?} (slow_consumer_grace); disconnecting",
            self.sender.queued_bytes(),
            limits.max_queued_bytes,
            limits.send_queue,
            grace,
        );
        self.cut_off(message, shared);
    }

    /// Cuts this connection off as a slow consumer, once: go-away, queue discarded.
    fn cut_off(&self, message: String, shared: &Shared) {
        if self.slow.swap(true, Ordering::Relaxed) {
            return;
        }
        shared.slow_consumers.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %self.peer, name = %self.name(), "{message}");
        self.sender.cut_off(message);
    }
}
