//! Streams on the broker: the stream API (`$CR.API.…`), durable publishes and the
//! answers to fetched messages (`$CR.ACK.…`), served from the broker's store. The
//! protocol is in [`crate::streams::wire`] and `docs/PROTOCOL.md`.
//!
//! A connection's durable publishes are stored in the order they arrive, and written
//! together once its next frame is not at hand: none buffered, none ready on the socket
//! (or once [`MAX_DEFERRED`] wait). Their
//! acknowledgements go back in the same order: from the connection's own task when the
//! write is done by the time it has read everything (`interval`, `never`), else through
//! one task per connection, at most [`ACK_PIPELINE`] waiting (a publisher with more is
//! read no further until one is answered). A fetch waits in a task of its own, at most [`MAX_FETCHES`] per
//! connection; the connection's end cancels them, and what they had taken is
//! delivered again after its ack wait, as for any consumer that goes away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mq_store::{
    AckFuture, Answer, Consumer, ConsumerConfig, Store, StoreError, StoredMessage, StreamConfig,
    WireError,
};
use rpc_core::frame::Publish;
use rpc_core::{Metadata, Utf8Bytes};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::fanout::{Batches, ReplyRoutes};
use crate::lock;
use crate::message::{DESCRIPTION_HEADER, STATUS_HEADER};
use crate::streams::wire::{
    self, ACK_PREFIX, ACKS_PREFIX, API_PREFIX, AckSubject, DURABLE_HEADER, END_OF_BATCH,
    FetchRequest, GetRequest, MAX_BATCH, PACK_BYTES, PACKED_HEADER, Place, PurgeRequest,
    RangeRequest,
};

/// Durable publishes of one connection waiting for their acknowledgement.
pub(super) const ACK_PIPELINE: usize = 65_536;
/// Fetches of one connection waiting at once; one more is refused, naming the limit.
pub(super) const MAX_FETCHES: usize = 256;
/// Answers of one connection being applied in tasks of their own (confirmed acks, naks
/// and terms); past that, its reader waits.
pub(super) const MAX_ANSWERS: usize = 1024;
/// Ephemeral consumers one connection may hold; one more is refused, naming the limit.
pub(super) const MAX_EPHEMERAL: usize = 64;
/// The most bytes one range request reads (at least one message is always returned).
pub(super) const MAX_RANGE_BYTES: usize = 8 << 20;
/// Durable publishes of one connection queued for the disk before they are written
/// (and answered) even though more of the peer's bytes are buffered. Small, so that a
/// publisher with a window of acks outstanding gets answers, and sends more, while the
/// rest of its burst is read: publisher and broker work at once rather than by turns.
pub(super) const MAX_DEFERRED: usize = 16;

/// The broker's streams, shared by every connection.
#[derive(Debug)]
pub(super) struct StreamHost {
    pub(super) store: Store,
    /// [`crate::BrokerConfig::max_streams`].
    max_streams: usize,
    /// [`crate::BrokerConfig::max_consumers`].
    max_consumers: usize,
    /// [`crate::BrokerConfig::fsync`].
    fsync: Option<mq_store::Fsync>,
    /// Ephemeral consumers, by stream and name, with the connection that made them:
    /// they go when it does.
    ephemeral: Mutex<HashMap<(String, String), (u64, Consumer)>>,
    next_ephemeral: AtomicU64,
}

impl StreamHost {
    pub(super) fn new(store: Store, config: &crate::BrokerConfig) -> StreamHost {
        let fsync = config.fsync;
        StreamHost {
            max_streams: config.max_streams,
            max_consumers: config.max_consumers,
            store,
            fsync,
            ephemeral: Mutex::new(HashMap::new()),
            next_ephemeral: AtomicU64::new(1),
        }
    }

    /// `config` with the broker's fsync setting, if it has one.
    fn effective(&self, mut config: StreamConfig) -> StreamConfig {
        if let Some(fsync) = self.fsync
            && config.fsync != fsync
        {
            tracing::info!(
                stream = %config.name,
                asked = %config.fsync.label(),
                used = %fsync.label(),
                "the broker's fsync setting (BrokerConfig::fsync, --fsync) replaces the stream's"
            );
            config.fsync = fsync;
        }
        config
    }

    /// Brings the streams found on disk to the broker's fsync setting.
    pub(super) async fn apply_fsync(&self) {
        if self.fsync.is_none() {
            return;
        }
        for info in self.store.list() {
            let config = self.effective(info.config.clone());
            if config != info.config
                && let Err(e) = self.store.update(config).await
            {
                tracing::error!(stream = %info.config.name, "cannot apply the broker's fsync setting: {e}");
            }
        }
    }

    fn consumer(&self, stream: &str, name: &str) -> Result<Consumer, StoreError> {
        self.find_consumer(stream, name)
            .map(|(consumer, _)| consumer)
    }

    /// The consumer, and whether it is durable (kept by the store, and closed when it is
    /// deleted) rather than ephemeral.
    fn find_consumer(&self, stream: &str, name: &str) -> Result<(Consumer, bool), StoreError> {
        let key = (stream.to_owned(), name.to_owned());
        if let Some((_, consumer)) = lock(&self.ephemeral).get(&key) {
            return Ok((consumer.clone(), false));
        }
        self.store.consumer(stream, name).map(|c| (c, true))
    }
}

/// What becomes of a publish after the streams have seen it.
pub(super) enum Captured {
    /// Deliver it as it is.
    Deliver,
    /// Deliver this instead (a durable publish without its reply and options).
    DeliverThis(Publish),
    /// Deliver nothing (a duplicate, a durable publish that was refused, or one that no
    /// subscription matches).
    Nothing,
}

/// One connection's part in the streams.
#[derive(Debug)]
pub(super) struct StreamSession {
    conn_id: u64,
    acks: Option<mpsc::Sender<(AckFuture, Utf8Bytes)>>,
    fetches: Arc<Semaphore>,
    answers: Arc<Semaphore>,
    stop: CancellationToken,
    ephemeral: Vec<(String, String)>,
    /// Streams holding durable publishes of this connection not yet written, and how
    /// many publishes: written together once the peer's next frame is not at hand
    /// ([`Self::commit_deferred`]).
    deferred: Vec<mq_store::Stream>,
    deferred_count: usize,
    /// Their acknowledgements, in order, answered when they are written (in this task
    /// when they already are, else by the ack pipeline task).
    deferred_acks: std::collections::VecDeque<(AckFuture, Utf8Bytes)>,
    /// Acknowledgements handed to the ack pipeline task and not answered yet: while
    /// there are any, later ones go the same way, to keep the order.
    in_pipeline: Arc<AtomicU64>,
    /// The durable consumer this connection last answered for (stream, name, handle):
    /// answers come in runs for one consumer, and this spares a lookup per answer. A
    /// deleted consumer is closed, and then looked up again.
    answering: Option<(String, String, Consumer)>,
    /// The largest frame this connection may be sent ([`StreamSession::limit_frames`]):
    /// packs stay within it, and a read message that could not be sent fails its batch.
    max_frame_len: usize,
}

/// Room left in a pack's frame for its other fields: the subject it is sent to (at
/// most 4 KiB), its header and the frame's own fields.
const PACK_HEADROOM: usize = 8 * 1024;

impl StreamSession {
    pub(super) fn new(conn_id: u64) -> StreamSession {
        StreamSession {
            conn_id,
            acks: None,
            fetches: Arc::new(Semaphore::new(MAX_FETCHES)),
            answers: Arc::new(Semaphore::new(MAX_ANSWERS)),
            stop: CancellationToken::new(),
            ephemeral: Vec::new(),
            deferred: Vec::new(),
            deferred_count: 0,
            deferred_acks: std::collections::VecDeque::new(),
            in_pipeline: Arc::new(AtomicU64::new(0)),
            answering: None,
            max_frame_len: usize::MAX,
        }
    }

    /// Sets the largest frame this connection may be sent (the lower of the broker's
    /// limit and the one the peer stated in its connect frame).
    pub(super) fn limit_frames(&mut self, max_frame_len: usize) {
        self.max_frame_len = max_frame_len;
    }

    /// Whether enough durable publishes wait to be written without waiting for the
    /// read to end ([`MAX_DEFERRED`]).
    pub(super) fn many_deferred(&self) -> bool {
        self.deferred_count >= MAX_DEFERRED
    }

    /// Whether durable publishes of this connection wait to be written or answered.
    pub(super) fn has_deferred(&self) -> bool {
        !self.deferred_acks.is_empty() || !self.deferred.is_empty()
    }

    /// Writes this connection's durable publishes queued so far: one write per stream,
    /// in this task under `interval` and `never` ([`mq_store::Stream::commit_now`]), by
    /// the stream's committer (with its fsync) under `always`. Then answers them in
    /// order: here, those already written (no hand-off to another task; a lone one
    /// through the read's `batches`), while the ack pipeline holds none; the pipeline
    /// task the rest, as they complete.
    pub(super) async fn commit_deferred(&mut self, shared: &Arc<Shared>, batches: &mut Batches) {
        self.deferred_count = 0;
        for stream in self.deferred.drain(..) {
            stream.commit_now();
        }
        // A lone acknowledgement (one publish at a time, each waiting for its answer)
        // goes out with the read's batches: written by this task when the connection
        // is idle, without waking its writer task. Several go through the connection's
        // queue, so that the writer task writes them from the other thread while this
        // one reads on, and gathers the acknowledgements of several reads into one
        // write (batched here, `js_pub_async` 16 B lost a quarter of its rate).
        let mut batches = (self.deferred_acks.len() == 1).then_some(batches);
        let mut routes = ReplyRoutes::default();
        while let Some((ack, _)) = self.deferred_acks.front_mut() {
            if self.in_pipeline.load(Ordering::Acquire) > 0 {
                break;
            }
            let Some(result) = super::poll_now(std::pin::Pin::new(ack)) else {
                break;
            };
            let (_, to) = self.deferred_acks.pop_front().expect("front");
            let (headers, body) = match result {
                Ok(ack) => (Metadata::new(), wire::pub_ack_body(&ack)),
                Err(e) => wire::error_reply_wire(&WireError::from(&e)),
            };
            if !to.is_empty() {
                let publish = Publish {
                    subject: to,
                    reply: Utf8Bytes::default(),
                    headers,
                    payload: body,
                };
                shared
                    .route_reply(&publish, &mut routes, batches.as_deref_mut())
                    .await;
            }
        }
        if let Some(batches) = batches {
            shared.flush(batches).await;
        }
        if self.deferred_acks.is_empty() {
            return;
        }
        let pipeline = self.ack_pipeline(shared);
        while let Some(entry) = self.deferred_acks.pop_front() {
            self.in_pipeline.fetch_add(1, Ordering::AcqRel);
            // a full pipeline holds this connection's reader: back-pressure, not loss
            if pipeline.send(entry).await.is_err() {
                break;
            }
        }
    }

    /// The connection is gone: what it published is written (there is no one left to
    /// answer), its fetches end, its ephemeral consumers go.
    pub(super) fn close(&mut self, shared: &Shared) {
        self.deferred_count = 0;
        for stream in self.deferred.drain(..) {
            stream.commit_now();
        }
        self.deferred_acks.clear();
        self.stop.cancel();
        self.acks = None;
        let mut ephemeral = lock(&shared.streams.ephemeral);
        for key in self.ephemeral.drain(..) {
            if ephemeral
                .get(&key)
                .is_some_and(|(owner, _)| *owner == self.conn_id)
            {
                ephemeral.remove(&key);
            }
        }
    }

    /// Handles a publish to the stream API or an answer to a fetched message; false if
    /// `publish` is neither.
    pub(super) async fn on_system(&mut self, shared: &Arc<Shared>, publish: &Publish) -> bool {
        if let Some(op) = publish.subject.strip_prefix(API_PREFIX) {
            self.on_api(shared, op, publish).await;
            true
        } else if publish.subject.starts_with(ACK_PREFIX) {
            self.on_answer(shared, publish).await;
            true
        } else if let Some(names) = publish.subject.strip_prefix(ACKS_PREFIX) {
            self.on_acks(shared, names, &publish.payload).await;
            true
        } else {
            false
        }
    }

    /// Stores a publish in the stream that captures its subject, if any. A durable
    /// publish (reply subject and [`DURABLE_HEADER`]) is answered on its reply subject
    /// once stored; a plain one is stored without an answer (at-most-once, as every
    /// plain publish: a failure is logged and it is delivered anyway).
    pub(super) async fn capture(&mut self, shared: &Arc<Shared>, publish: &Publish) -> Captured {
        let store = &shared.streams.store;
        let durable = !publish.reply.is_empty() && publish.headers.get(DURABLE_HEADER).is_some();
        if !durable {
            if store.is_empty() {
                return Captured::Deliver;
            }
            let Some(stream) = store.stream_for(&publish.subject) else {
                return Captured::Deliver;
            };
            let headers: Vec<(&str, &[u8])> = publish
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), &v[..]))
                .collect();
            return match stream.store(&publish.subject, &headers, &publish.payload) {
                Ok(ack) if ack.duplicate => Captured::Nothing,
                Ok(_) => Captured::Deliver,
                Err(e) => {
                    tracing::warn!(subject = %publish.subject, "a published message was not stored: {e}");
                    Captured::Deliver
                }
            };
        }
        let Some(stream) = store.stream_for(&publish.subject) else {
            let e = StoreError::NoStreamForSubject(publish.subject.to_string());
            reply_error(shared, &publish.reply, &WireError::from(&e)).await;
            return Captured::Nothing;
        };
        let (headers, options) = match wire::split_options(&publish.headers) {
            Ok(split) => split,
            Err(message) => {
                reply_error(shared, &publish.reply, &wire::bad_request(message)).await;
                return Captured::Nothing;
            }
        };
        let ack = match stream
            .publish_deferred(&publish.subject, &headers, &publish.payload, &options)
            .await
        {
            Ok(ack) => ack,
            Err(e) => {
                reply_error(shared, &publish.reply, &WireError::from(&e)).await;
                return Captured::Nothing;
            }
        };
        if !self.deferred.iter().any(|s| s.name() == stream.name()) {
            self.deferred.push(stream);
        }
        self.deferred_count += 1;
        let duplicate = ack.is_duplicate();
        self.deferred_acks.push_back((ack, publish.reply.clone()));
        if duplicate || shared.subs.matches(&publish.subject).is_empty() {
            // (no subscriber: nothing to strip the options from)
            return Captured::Nothing;
        }
        let mut delivered = Metadata::new();
        for (name, value) in publish.headers.iter() {
            if !wire::is_control_header(name) {
                delivered.append(name.clone(), value.clone());
            }
        }
        Captured::DeliverThis(Publish {
            subject: publish.subject.clone(),
            reply: Utf8Bytes::default(),
            headers: delivered,
            payload: publish.payload.clone(),
        })
    }

    /// The task that answers this connection's durable publishes, in order.
    fn ack_pipeline(&mut self, shared: &Arc<Shared>) -> mpsc::Sender<(AckFuture, Utf8Bytes)> {
        self.acks
            .get_or_insert_with(|| {
                let (tx, mut rx) = mpsc::channel::<(AckFuture, Utf8Bytes)>(ACK_PIPELINE);
                let shared = shared.clone();
                let in_pipeline = self.in_pipeline.clone();
                tokio::spawn(async move {
                    while let Some((ack, to)) = rx.recv().await {
                        let result = ack.await.map_err(|e| WireError::from(&e));
                        reply_json(&shared, &to, result).await;
                        in_pipeline.fetch_sub(1, Ordering::AcqRel);
                    }
                });
                tx
            })
            .clone()
    }

    /// `$CR.API.<op>`.
    async fn on_api(&mut self, shared: &Arc<Shared>, op: &str, publish: &Publish) {
        let to = &publish.reply;
        if to.is_empty() {
            tracing::debug!(subject = %publish.subject, "a stream API request without a reply subject is ignored");
            return;
        }
        let tokens: Vec<&str> = op.split('.').collect();
        let body = &publish.payload[..];
        let host = &shared.streams;
        let store = &host.store;
        let result = match tokens.as_slice() {
            ["STREAM", "CREATE"] => match parse::<StreamConfig>(body) {
                Ok(config)
                    if store.stream(&config.name).is_err()
                        && store.list().len() >= host.max_streams =>
                {
                    Err(WireError::from(&StoreError::InvalidConfig(format!(
                        "the broker holds {} streams, its limit (BrokerConfig::max_streams)",
                        host.max_streams
                    ))))
                }
                Ok(config) => json(store.create(host.effective(config)).map(|s| s.info())),
                Err(e) => Err(e),
            },
            ["STREAM", "UPDATE"] => match parse::<StreamConfig>(body) {
                Ok(config) => json(store.update(host.effective(config)).await),
                Err(e) => Err(e),
            },
            ["STREAM", "INFO", stream] => json(store.stream(stream).map(|s| s.info())),
            ["STREAM", "LIST"] => json(Ok(store.list())),
            ["STREAM", "DELETE", stream] => json(store.delete(stream).map(|()| true)),
            ["STREAM", "PURGE", stream] => match parse_or_default::<PurgeRequest>(body) {
                Ok(request) => match store.stream(stream) {
                    Ok(s) => json(s.purge(request.filter.as_deref()).await),
                    Err(e) => Err(WireError::from(&e)),
                },
                Err(e) => Err(e),
            },
            ["STREAM", "GET", stream] => return self.get(shared, stream, body, to).await,
            ["STREAM", "RANGE", stream] => return self.range(shared, stream, body, to).await,
            ["CONSUMER", "CREATE", stream] => match parse::<ConsumerConfig>(body) {
                Ok(config) => json(self.create_consumer(host, stream, config)),
                Err(e) => Err(e),
            },
            ["CONSUMER", "INFO", stream, name] => {
                json(host.consumer(stream, name).map(|c| c.info()))
            }
            ["CONSUMER", "LIST", stream] => json(store.consumers(stream)),
            ["CONSUMER", "DELETE", stream, name] => {
                let key = (stream.to_string(), name.to_string());
                let removed = {
                    let mut ephemeral = lock(&host.ephemeral);
                    // only the connection that made an ephemeral consumer removes it
                    let mine = ephemeral
                        .get(&key)
                        .is_some_and(|(owner, _)| *owner == self.conn_id);
                    mine && ephemeral.remove(&key).is_some()
                };
                if removed {
                    self.ephemeral.retain(|k| *k != key);
                    json(Ok(true))
                } else {
                    json(store.delete_consumer(stream, name).map(|()| true))
                }
            }
            ["CONSUMER", "FETCH", stream, name] => {
                return self.fetch(shared, stream, name, body, to).await;
            }
            _ => Err(wire::bad_request(format!(
                "unknown stream API request `{}`",
                publish.subject
            ))),
        };
        match result {
            Ok(body) => reply(shared, to, Metadata::new(), body).await,
            Err(e) => reply_error(shared, to, &e).await,
        }
    }

    fn create_consumer(
        &mut self,
        host: &StreamHost,
        stream: &str,
        mut config: ConsumerConfig,
    ) -> Result<mq_store::ConsumerInfo, StoreError> {
        if config.durable {
            let exists = host.store.consumer(stream, &config.name).is_ok();
            if !exists && host.store.consumers(stream)?.len() >= host.max_consumers {
                return Err(StoreError::InvalidConsumer(format!(
                    "stream `{stream}` has {} durable consumers, the broker's limit \
                     (BrokerConfig::max_consumers)",
                    host.max_consumers
                )));
            }
            return host.store.create_consumer(stream, config).map(|c| c.info());
        }
        if self.ephemeral.len() >= MAX_EPHEMERAL {
            return Err(StoreError::InvalidConsumer(format!(
                "this connection holds {MAX_EPHEMERAL} ephemeral consumers, the broker's \
                 limit per connection (MAX_EPHEMERAL)"
            )));
        }
        if config.name.is_empty() {
            // unguessable: another connection cannot take a name before it is given
            let n = host.next_ephemeral.fetch_add(1, Ordering::Relaxed);
            let random = crate::delivery::new_inbox().replacen("_INBOX.", "", 1);
            config.name = format!("eph-{n}-{random}");
        }
        let key = (stream.to_owned(), config.name.clone());
        // checked and inserted under one lock: two connections cannot both take a name
        let mut ephemeral = lock(&host.ephemeral);
        if ephemeral.contains_key(&key) {
            return Err(StoreError::ConsumerExists {
                stream: stream.to_owned(),
                consumer: config.name,
            });
        }
        let consumer = host.store.create_consumer(stream, config)?;
        let info = consumer.info();
        ephemeral.insert(key.clone(), (self.conn_id, consumer));
        self.ephemeral.push(key);
        Ok(info)
    }

    /// `$CR.API.STREAM.GET.<stream>`: the message itself, or an error.
    async fn get(&mut self, shared: &Arc<Shared>, stream: &str, body: &[u8], to: &Utf8Bytes) {
        let found = parse::<GetRequest>(body).and_then(|request| {
            let s = shared
                .streams
                .store
                .stream(stream)
                .map_err(|e| WireError::from(&e))?;
            let found = match (request.seq, request.last_by_subject) {
                (Some(seq), None) => s.get(seq),
                (None, Some(subject)) => s.last(&subject),
                _ => {
                    return Err(wire::bad_request(
                        "a get names either `seq` or `last_by_subject`",
                    ));
                }
            };
            found.map_err(|e| WireError::from(&e))
        });
        match found {
            Ok(message) => {
                let headers = wire::message_headers(&message);
                reply(shared, to, headers, message.payload).await;
            }
            Err(e) => reply_error(shared, to, &e).await,
        }
    }

    /// `$CR.API.STREAM.RANGE.<stream>`: the messages, then the end of the batch.
    async fn range(&mut self, shared: &Arc<Shared>, stream: &str, body: &[u8], to: &Utf8Bytes) {
        let found = parse::<RangeRequest>(body).and_then(|request| {
            if request.max_msgs > MAX_BATCH {
                return Err(batch_too_large(request.max_msgs));
            }
            let s = shared
                .streams
                .store
                .stream(stream)
                .map_err(|e| WireError::from(&e))?;
            s.range(
                request.from,
                request.max_msgs,
                request.max_bytes.min(MAX_RANGE_BYTES),
            )
            .map(|messages| (messages, request.packed))
            .map_err(|e| WireError::from(&e))
        });
        match found {
            Ok((messages, packed)) => {
                let messages = messages.into_iter().map(|m| (m, None));
                let frames = Frames::new(packed, self.max_frame_len);
                send_batch(shared, to, messages, None, frames).await;
            }
            Err(e) => reply_error(shared, to, &e).await,
        }
    }

    /// `$CR.API.CONSUMER.FETCH.<stream>.<consumer>`: waits in a task of its own.
    async fn fetch(
        &mut self,
        shared: &Arc<Shared>,
        stream: &str,
        name: &str,
        body: &[u8],
        to: &Utf8Bytes,
    ) {
        let request = match parse::<FetchRequest>(body) {
            Ok(r) if r.batch == 0 || r.batch > MAX_BATCH => Err(batch_too_large(r.batch)),
            other => other,
        };
        let started = request.and_then(|request| {
            let consumer = shared
                .streams
                .consumer(stream, name)
                .map_err(|e| WireError::from(&e))?;
            let permit = self.fetches.clone().try_acquire_owned().map_err(|_| {
                wire::bad_request(format!(
                    "too many fetches waiting on this connection: the broker's limit is {MAX_FETCHES} (MAX_FETCHES)"
                ))
            })?;
            Ok((request, consumer, permit))
        });
        let (request, consumer, permit) = match started {
            Ok(started) => started,
            Err(e) => return reply_error(shared, to, &e).await,
        };
        let (shared, stop, to) = (shared.clone(), self.stop.clone(), to.clone());
        let frames = Frames::new(request.packed, self.max_frame_len);
        tokio::spawn(async move {
            let _permit = permit;
            let wait = Duration::from_millis(request.max_wait_ms);
            let fetched = tokio::select! {
                () = stop.cancelled() => return,
                fetched = consumer.fetch(request.batch, wait) => fetched,
            };
            match fetched {
                Ok(deliveries) => {
                    let Some(first) = deliveries.first() else {
                        return end_of_batch(&shared, &to, 0).await;
                    };
                    let names = (first.info.stream.clone(), first.info.consumer.clone());
                    let messages = deliveries.into_iter().map(|delivery| {
                        let info = &delivery.info;
                        let place = Place {
                            deliveries: info.deliveries,
                            consumer_seq: info.consumer_seq,
                            pending: info.pending,
                        };
                        (delivery.message, Some(place))
                    });
                    let names = Some((&*names.0, &*names.1));
                    send_batch(&shared, &to, messages, names, frames).await;
                }
                Err(e) => reply_error(&shared, &to, &WireError::from(&e)).await,
            }
        });
    }

    /// The consumer named by an answer: this connection's last one if it is the same
    /// (and still open), else looked up (and kept if durable).
    fn answering(
        &mut self,
        shared: &Shared,
        stream: &str,
        name: &str,
    ) -> Result<Consumer, WireError> {
        if let Some((s, n, consumer)) = &self.answering
            && s == stream
            && n == name
            && !consumer.is_closed()
        {
            return Ok(consumer.clone());
        }
        let (consumer, durable) = shared
            .streams
            .find_consumer(stream, name)
            .map_err(|e| WireError::from(&e))?;
        if durable {
            self.answering = Some((stream.to_owned(), name.to_owned(), consumer.clone()));
        }
        Ok(consumer)
    }

    /// `$CR.ACKS.<stream>.<consumer>`: plain acks of many messages, their stream
    /// sequences as `u64`s; applied in order, and, as any plain ack, a refused one is
    /// only logged.
    async fn on_acks(&mut self, shared: &Shared, names: &str, payload: &[u8]) {
        let (stream, name) = match names.split_once('.') {
            Some((s, n)) if !s.is_empty() && !n.is_empty() && !n.contains('.') => (s, n),
            _ => {
                tracing::debug!(subject = %format!("{ACKS_PREFIX}{names}"), "acks refused: the subject names no stream and consumer");
                return;
            }
        };
        if !payload.len().is_multiple_of(8) {
            tracing::debug!(
                stream,
                consumer = name,
                len = payload.len(),
                "acks refused: the payload is not a list of u64 sequences"
            );
            return;
        }
        let consumer = match self.answering(shared, stream, name) {
            Ok(consumer) => consumer,
            Err(e) => {
                tracing::debug!(stream, consumer = name, "acks refused: {}", e.message);
                return;
            }
        };
        for chunk in payload.chunks_exact(8) {
            let seq = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            if let Err(e) = consumer.answer(seq, Answer::Ack, false).await {
                tracing::debug!(stream, consumer = name, seq, "ack refused: {e}");
            }
        }
    }

    /// `$CR.ACK.…`: an answer to a fetched message. With a reply subject, the answer is
    /// confirmed there once it is durable (an ack) or applied (the others).
    async fn on_answer(&mut self, shared: &Arc<Shared>, publish: &Publish) {
        let parsed = AckSubject::parse(&publish.subject)
            .ok_or_else(|| {
                wire::bad_request(format!("malformed ack subject `{}`", publish.subject))
            })
            .and_then(|ack| {
                let answer = wire::decode_answer(&publish.payload).map_err(wire::bad_request)?;
                let consumer = self.answering(shared, &ack.stream, &ack.consumer)?;
                Ok((ack, answer, consumer))
            });
        let to = publish.reply.clone();
        let (ack, answer, consumer) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::debug!(subject = %publish.subject, "answer refused: {}", e.message);
                return reply_error(shared, &to, &e).await;
            }
        };
        let confirm = !to.is_empty();
        if !confirm && matches!(answer, Answer::Ack | Answer::InProgress) {
            // quick: applied in place, in the order answers arrive
            if let Err(e) = consumer.answer(ack.stream_seq, answer, false).await {
                tracing::debug!(subject = %publish.subject, "answer refused: {e}");
            }
            return;
        }
        // a confirmation waits for the disk, a dead letter for its stream: not here,
        // and at most MAX_ANSWERS at once (then this connection's reader waits)
        let Ok(permit) = self.answers.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = consumer.answer(ack.stream_seq, answer, confirm).await;
            match result {
                Ok(()) => reply(&shared, &to, Metadata::new(), Bytes::new()).await,
                Err(e) => {
                    tracing::debug!(stream = %ack.stream, consumer = %ack.consumer, seq = ack.stream_seq, "answer refused: {e}");
                    reply_error(&shared, &to, &WireError::from(&e)).await;
                }
            }
        });
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body)
        .map_err(|e| wire::bad_request(format!("malformed stream API request: {e}")))
}

fn parse_or_default<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, WireError> {
    if body.is_empty() {
        Ok(T::default())
    } else {
        parse(body)
    }
}

fn json<T: Serialize>(result: Result<T, StoreError>) -> Result<Bytes, WireError> {
    match result {
        Ok(value) => Ok(Bytes::from(
            serde_json::to_vec(&value).expect("API replies serialize"),
        )),
        Err(e) => Err(WireError::from(&e)),
    }
}

fn batch_too_large(batch: usize) -> WireError {
    wire::bad_request(format!(
        "a batch of {batch} messages: a fetch or range asks for 1 to {MAX_BATCH} (MAX_BATCH)"
    ))
}

/// Sends a reply to `to` (nothing without one), routed as any publish.
async fn reply(shared: &Shared, to: &Utf8Bytes, headers: Metadata, payload: Bytes) {
    if to.is_empty() {
        return;
    }
    let publish = Publish {
        subject: to.clone(),
        reply: Utf8Bytes::default(),
        headers,
        payload,
    };
    shared.route(&publish).await;
}

async fn reply_json<T: Serialize>(shared: &Shared, to: &Utf8Bytes, result: Result<T, WireError>) {
    match result {
        Ok(value) => {
            let body = Bytes::from(serde_json::to_vec(&value).expect("API replies serialize"));
            reply(shared, to, Metadata::new(), body).await;
        }
        Err(e) => reply_error(shared, to, &e).await,
    }
}

async fn reply_error(shared: &Shared, to: &Utf8Bytes, error: &WireError) {
    let (headers, body) = wire::error_reply_wire(error);
    reply(shared, to, headers, body).await;
}

/// How a batch of read messages is framed for one connection.
#[derive(Clone, Copy, Debug)]
struct Frames {
    /// Packed, as the request asked.
    packed: bool,
    /// How large a pack may grow: [`PACK_BYTES`], or less to stay within the
    /// connection's frame limit.
    pack_bytes: usize,
    /// The connection's frame limit.
    max_frame_len: usize,
}

impl Frames {
    fn new(packed: bool, max_frame_len: usize) -> Frames {
        Frames {
            packed,
            pack_bytes: PACK_BYTES.min(max_frame_len.saturating_sub(PACK_HEADROOM)),
            max_frame_len,
        }
    }
}

/// Sends messages read from a stream to `to`, then the end of the batch: one message
/// each, or packed, up to `frames.pack_bytes` a pack. Fetched messages have a place and
/// `names` (stream, consumer) for their ack subjects. A message too large for the
/// connection's frame limit ends the batch with an error naming it, rather than being
/// dropped on the way (a fetched one is delivered again after its ack wait).
async fn send_batch(
    shared: &Shared,
    to: &Utf8Bytes,
    messages: impl Iterator<Item = (StoredMessage, Option<Place>)>,
    names: Option<(&str, &str)>,
    frames: Frames,
) {
    let mut n = 0;
    let mut pack = BytesMut::new();
    let mut in_pack = 0usize;
    for (message, place) in messages {
        n += 1;
        let len = wire::packed_len(&message, place);
        let size = len.unwrap_or_else(|| {
            let headers: usize = message.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
            message.subject.len() + headers + message.payload.len()
        });
        if size.saturating_add(PACK_HEADROOM) > frames.max_frame_len {
            send_pack(shared, to, &mut pack, &mut in_pack).await;
            let error = WireError {
                kind: mq_store::ErrorKind::LimitReached,
                message: format!(
                    "message {} is about {} bytes, too large for this connection's frame \
                     limit of {} bytes (the lower of the client's max_frame_len and the \
                     broker's, less {PACK_HEADROOM} bytes for the frame's other fields); \
                     {} messages of the batch came before it",
                    message.seq,
                    size,
                    frames.max_frame_len,
                    n - 1
                ),
            };
            return reply_error(shared, to, &error).await;
        }
        if let (Some(len), true) = (len, frames.packed) {
            if in_pack > 0 && pack.len() + len > frames.pack_bytes {
                send_pack(shared, to, &mut pack, &mut in_pack).await;
            }
            wire::pack(&mut pack, &message, place);
            in_pack += 1;
            continue;
        }
        // one message on its own (unpacked, or one a pack cannot hold)
        send_pack(shared, to, &mut pack, &mut in_pack).await;
        let ack = match (names, place) {
            (Some((stream, consumer)), Some(place)) => AckSubject {
                stream: stream.to_owned(),
                consumer: consumer.to_owned(),
                deliveries: place.deliveries,
                stream_seq: message.seq,
                consumer_seq: place.consumer_seq,
                pending: place.pending,
            }
            .encode()
            .into(),
            _ => Utf8Bytes::default(),
        };
        let publish = Publish {
            subject: to.clone(),
            reply: ack,
            headers: wire::message_headers(&message),
            payload: message.payload,
        };
        shared.route(&publish).await;
    }
    send_pack(shared, to, &mut pack, &mut in_pack).await;
    end_of_batch(shared, to, n).await;
}

/// Sends the pack so far, if it holds anything, and starts the next.
async fn send_pack(shared: &Shared, to: &Utf8Bytes, pack: &mut BytesMut, in_pack: &mut usize) {
    if *in_pack == 0 {
        return;
    }
    let mut headers = Metadata::new();
    headers.insert(PACKED_HEADER, in_pack.to_string());
    *in_pack = 0;
    reply(shared, to, headers, pack.split().freeze()).await;
}

async fn end_of_batch(shared: &Shared, to: &Utf8Bytes, n: usize) {
    let mut headers = Metadata::new();
    headers.insert(STATUS_HEADER, END_OF_BATCH);
    headers.insert(DESCRIPTION_HEADER, format!("end of batch: {n} messages"));
    reply(shared, to, headers, Bytes::new()).await;
}
