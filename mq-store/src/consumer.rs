//! Consumers: a stream's messages turned into work that is done once, with every
//! failure visible.
//!
//! A [`Consumer`] reads a stream from a starting point ([`DeliverPolicy`]), keeps the
//! messages of its subjects ([`ConsumerConfig::filter_subjects`]), and hands them out
//! with [`Consumer::fetch`] or [`Consumer::messages`]. Every [`Delivery`] waits for an
//! answer ([`AckPolicy`]): [`Delivery::ack`], [`Delivery::nak`],
//! [`Delivery::in_progress`] or [`Delivery::term`]. Unanswered within `ack_wait` (or
//! the [`ConsumerConfig::backoff`] schedule), it is delivered again; after
//! `max_deliver` deliveries, or on `term`, it becomes a dead letter
//! ([`DeadLetter`]), published with headers saying where it came from and why.
//!
//! * **Groups.** Any number of tasks may fetch from one consumer (clones of the
//!   handle): each message goes to one of them. One that stops answering has its
//!   messages delivered to the others once their ack wait passes.
//! * **Per-key order.** With [`ConsumerConfig::key`], messages that share a key are
//!   delivered in stream order, and at most `max_in_flight_per_key` of them at a time
//!   (by default 1: the next waits until the previous one is acknowledged, terminated
//!   or dead-lettered); other keys go on meanwhile. No partitions to choose.
//! * **Delayed delivery.** A message published with [`crate::Publish::delay`] or
//!   [`crate::Publish::deliver_at`] is held until its time (to the nanosecond).
//! * **Durability.** A durable consumer's state (its ack floor, what is done above it,
//!   and delivery counts) is kept beside the stream's segments
//!   (`consumers/<name>.con`, see `docs/STORAGE.md`), written by group commit under
//!   the stream's [`crate::Fsync`] setting. [`Delivery::ack_confirmed`] returns once
//!   the acknowledgement is durable. After a restart every message not done is
//!   delivered again, its delivery count carried over.
//!
//! Timers (ack wait, backoff, nak delays) run on tokio's clock, so tests drive them
//! with a paused clock; delivery times are wall-clock times from the store's
//! [`crate::clock::Clock`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), mq_store::StoreError> {
//! use std::time::Duration;
//! use mq_store::{ConsumerConfig, Publish, Store, StreamConfig};
//! let store = Store::memory();
//! let orders = store.create(StreamConfig::new("ORDERS", ["orders.>"]))?;
//! orders.publish("orders.eu", &[], b"one", &Publish::default()).await?.await?;
//!
//! let worker = store.create_consumer("ORDERS", ConsumerConfig::durable("worker"))?;
//! for delivery in worker.fetch(10, Duration::from_secs(1)).await? {
//!     assert_eq!(delivery.message.payload, &b"one"[..]);
//!     delivery.ack_confirmed().await?; // durable: never delivered again
//! }
//! assert_eq!(worker.info().ack_floor, 1);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::error::StoreError;
use crate::journal::{self, Journal, Persisted};
use crate::message::{DELIVER_AT_HEADER, Publish, StoredMessage};
use crate::store::StoreRef;
use crate::stream::Stream;

/// Where a consumer starts reading its stream, when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicy {
    /// From the first message. The default.
    #[default]
    All,
    /// Only messages stored after the consumer is created.
    New,
    /// From the last message (of its subjects).
    Last,
    /// The last message of each of its subjects, then everything new.
    LastPerSubject,
    /// From this stream sequence.
    ByStartSequence(u64),
    /// From the first message stored at or after this time (ns since the Unix epoch).
    ByStartTime(i64),
}

/// What answer a delivery waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicy {
    /// Each message is acknowledged on its own. The default.
    #[default]
    Explicit,
    /// Acknowledging a message acknowledges every message delivered before it.
    All,
    /// None: a message is done once delivered (at most once).
    None,
}

/// Where a consumer finds a message's ordering key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The value of this header. Messages without it have no key (and no order).
    Header(String),
    /// This token of the subject, counted from 0 (`orders.<customer>.created`: 1).
    /// Messages with fewer tokens have no key.
    SubjectToken(u32),
}

/// Where a consumer's dead letters go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetter {
    /// Published to `$DLQ.<stream>.<consumer>`: stored by the stream that captures it,
    /// if one does (create one on `$DLQ.>` to keep every dead letter), and handed to
    /// the store's observer (the bus's subscribers). Without such a stream it is
    /// logged as an error and counted in [`ConsumerInfo::dead_letters_unstored`]. The
    /// default.
    #[default]
    Subject,
    /// Stored in this stream, under the subject `$DLQ.<stream>.<consumer>`; retried
    /// until it is stored, and only then is the message done with.
    Stream(String),
}

/// A consumer's configuration.
///
/// ```
/// use std::time::Duration;
/// use mq_store::{AckPolicy, ConsumerConfig, KeySource};
/// let config = ConsumerConfig {
///     filter_subjects: vec!["orders.*.created".into()],
///     ack_wait: Duration::from_secs(10),
///     max_deliver: Some(5),
///     backoff: vec![Duration::from_secs(1), Duration::from_secs(10)],
///     key: Some(KeySource::SubjectToken(1)), // per-customer order
///     ..ConsumerConfig::durable("billing")
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsumerConfig {
    /// Its name: letters, digits, `-` and `_`, at most 64 bytes.
    pub name: String,
    /// Stored with the stream (true), or gone with the last handle (false).
    pub durable: bool,
    /// The subjects it takes (wildcards allowed); every subject when empty.
    pub filter_subjects: Vec<String>,
    /// Where it starts; see [`DeliverPolicy`].
    pub deliver_policy: DeliverPolicy,
    /// What answer a delivery waits for; see [`AckPolicy`].
    pub ack_policy: AckPolicy,
    /// How long a delivery waits for an answer before the message is delivered
    /// again. Default 30 s.
    pub ack_wait: Duration,
    /// After this many deliveries an unanswered message becomes a dead letter.
    /// Default: no limit.
    pub max_deliver: Option<u32>,
    /// The ack wait of the first, second, … delivery (the last one repeats); overrides
    /// `ack_wait` when not empty.
    pub backoff: Vec<Duration>,
    /// The most deliveries waiting for an answer at once; fetches wait beyond it.
    /// Default 1,000.
    pub max_ack_pending: u32,
    /// Where a message's ordering key is; see [`KeySource`]. Default: no key.
    pub key: Option<KeySource>,
    /// Messages of one key delivered and not yet answered, at most. Default 1.
    pub max_in_flight_per_key: u32,
    /// Where dead letters go; see [`DeadLetter`].
    pub dead_letter: DeadLetter,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            name: String::new(),
            durable: true,
            filter_subjects: Vec::new(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            backoff: Vec::new(),
            max_ack_pending: 1000,
            key: None,
            max_in_flight_per_key: 1,
            dead_letter: DeadLetter::Subject,
        }
    }
}

impl ConsumerConfig {
    /// A durable consumer named `name`, every other setting its default.
    pub fn durable(name: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            ..ConsumerConfig::default()
        }
    }

    /// An ephemeral consumer: not stored, gone with its last handle.
    pub fn ephemeral() -> Self {
        ConsumerConfig {
            durable: false,
            ..ConsumerConfig::default()
        }
    }

    /// Checks the settings, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.durable || !self.name.is_empty() {
            crate::config::validate_name(&self.name)
                .map_err(|e| e.replace("stream name", "consumer name"))?;
        }
        for filter in &self.filter_subjects {
            crate::subject::validate_filter(filter).map_err(|e| e.to_string())?;
        }
        if self.ack_wait.is_zero() || self.ack_wait > MAX_WAIT {
            return Err(format!(
                "ack_wait must be more than 0 and at most {MAX_WAIT:?}"
            ));
        }
        if self.backoff.iter().any(|d| *d > MAX_WAIT) {
            return Err(format!("backoff durations must be at most {MAX_WAIT:?}"));
        }
        if self.max_deliver == Some(0) {
            return Err("max_deliver must be at least 1".into());
        }
        if self.backoff.iter().any(Duration::is_zero) {
            return Err("backoff durations must be more than 0".into());
        }
        if self.max_ack_pending == 0 {
            return Err("max_ack_pending must be at least 1".into());
        }
        if self.max_in_flight_per_key == 0 {
            return Err("max_in_flight_per_key must be at least 1".into());
        }
        if let Some(KeySource::Header(name)) = &self.key
            && name.is_empty()
        {
            return Err("the key header's name is empty".into());
        }
        if let DeadLetter::Stream(name) = &self.dead_letter {
            crate::config::validate_name(name)?;
        }
        Ok(())
    }

    fn takes(&self, subject: &str) -> bool {
        self.filter_subjects.is_empty()
            || self
                .filter_subjects
                .iter()
                .any(|f| crate::subject::matches(f, subject))
    }

    /// The ack wait of delivery number `n` (from 1).
    fn wait(&self, n: u32) -> Duration {
        match self.backoff.len() {
            0 => self.ack_wait,
            len => self.backoff[(n.max(1) as usize - 1).min(len - 1)],
        }
    }

    fn key_of(&self, message: &StoredMessage) -> Option<Bytes> {
        match self.key.as_ref()? {
            KeySource::Header(name) => message.header(name).cloned(),
            KeySource::SubjectToken(i) => message
                .subject
                .split('.')
                .nth(*i as usize)
                .map(|t| Bytes::copy_from_slice(t.as_bytes())),
        }
    }
}

/// What a consumer's state file records besides the configuration: where it started.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    config: ConsumerConfig,
    /// The first sequence it reads.
    start: u64,
    /// With [`DeliverPolicy::LastPerSubject`]: the last sequence when it was created;
    /// below it, only the last message of each subject is taken.
    last_per_subject_upto: Option<u64>,
}

/// A consumer's state and counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// The stream.
    pub stream: String,
    /// Its configuration.
    pub config: ConsumerConfig,
    /// Every message at or below this stream sequence is done with (acknowledged,
    /// dead-lettered, or not one of its subjects).
    pub ack_floor: u64,
    /// The next stream sequence it reads.
    pub next_seq: u64,
    /// Deliveries so far, redeliveries included (the last consumer sequence).
    pub delivered: u64,
    /// Deliveries waiting for an answer.
    pub num_ack_pending: u64,
    /// Messages waiting to be delivered again.
    pub num_redelivery_due: u64,
    /// Messages held back: behind their key, or before their delivery time.
    pub num_held: u64,
    /// Messages of the stream not read yet (all subjects: an upper bound).
    pub num_pending: u64,
    /// Redeliveries so far.
    pub num_redelivered: u64,
    /// Dead letters published.
    pub dead_letters: u64,
    /// Dead letters that no stream stored (see [`DeadLetter::Subject`]).
    pub dead_letters_unstored: u64,
    /// Damage found in its state file when it was opened.
    #[serde(default, with = "crate::error::optional_wire")]
    pub damage: Option<StoreError>,
}

impl ConsumerInfo {
    /// A consumer's info with zero counts, for a client that fills it in from what a
    /// server reports.
    pub fn new(stream: String, config: ConsumerConfig) -> ConsumerInfo {
        ConsumerInfo {
            stream,
            config,
            ack_floor: 0,
            next_seq: 1,
            delivered: 0,
            num_ack_pending: 0,
            num_redelivery_due: 0,
            num_held: 0,
            num_pending: 0,
            num_redelivered: 0,
            dead_letters: 0,
            dead_letters_unstored: 0,
            damage: None,
        }
    }
}

/// A handle to a consumer; clones share it, and each clone may fetch (a consumer
/// group).
#[derive(Clone, Debug)]
pub struct Consumer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    stream: Stream,
    store: StoreRef,
    config: ConsumerConfig,
    stored: Stored,
    name: Arc<str>,
    stream_name: Arc<str>,
    engine: Mutex<Engine>,
    journal: OnceLock<Journal>,
    /// Wakes fetches: a message became deliverable, or room opened up.
    available: Notify,
    /// Wakes the timer task: a timer was added.
    tick: Arc<Notify>,
    ticker: OnceLock<()>,
    damage: Option<StoreError>,
}

#[derive(Debug)]
struct Engine {
    cursor: u64,
    floor: u64,
    consumer_seq: u64,
    outstanding: BTreeMap<u64, Entry>,
    /// Done above the floor (messages of ours only).
    done: BTreeSet<u64>,
    /// Delivery counts carried over from before a restart, for messages not read yet.
    restored: BTreeMap<u64, u32>,
    timers: BTreeSet<(Instant, u64)>,
    delayed: BTreeSet<(i64, u64)>,
    due: BTreeSet<u64>,
    keys: HashMap<Bytes, KeyState>,
    pending: u64,
    held: u64,
    redelivered: u64,
    dead_letters: u64,
    dead_letters_unstored: u64,
    closed: bool,
    /// Changes for the state file, queued with the next journal write.
    log_delivered: Vec<(u64, u32)>,
    log_done: Vec<u64>,
    floor_logged: u64,
    /// Messages done with since the retention check last ran.
    retire: Vec<(u64, Arc<str>)>,
    /// Keys that had a message done with: the next of theirs may go.
    unblocked: Vec<Bytes>,
    /// Messages read again after a restart that had used up `max_deliver` already.
    restart_dead: Vec<u64>,
}

#[derive(Debug)]
struct Entry {
    subject: Arc<str>,
    key: Option<Bytes>,
    deliver_at: Option<i64>,
    deliveries: u32,
    state: EState,
    /// Set once the message is to become a dead letter: why.
    dead: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EState {
    /// Behind its key, or before its delivery time.
    Held,
    /// To be delivered (again) by the next fetch.
    Due,
    /// Delivered, waiting for an answer until `deadline`.
    Pending { deadline: Instant },
    /// Being published as a dead letter (the entry's `dead` says why).
    DeadLettering,
}

#[derive(Debug, Default)]
struct KeyState {
    in_flight: u32,
    queue: VecDeque<u64>,
}

/// A message handed out by a consumer, with what it needs to answer.
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub message: StoredMessage,
    /// Where it stands.
    pub info: DeliveryInfo,
    consumer: Arc<Shared>,
}

/// A delivery's position.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryInfo {
    /// The stream.
    pub stream: Arc<str>,
    /// The consumer.
    pub consumer: Arc<str>,
    /// The message's stream sequence.
    pub stream_seq: u64,
    /// This delivery's number among all the consumer's deliveries.
    pub consumer_seq: u64,
    /// How many times the message has been delivered, this time included.
    pub deliveries: u32,
    /// Messages of the stream not read yet, and messages waiting for redelivery (all
    /// subjects: an upper bound).
    pub pending: u64,
}

impl DeliveryInfo {
    /// A delivery's position, as a client rebuilds it from what a broker sent.
    pub fn new(
        stream: Arc<str>,
        consumer: Arc<str>,
        stream_seq: u64,
        consumer_seq: u64,
        deliveries: u32,
        pending: u64,
    ) -> DeliveryInfo {
        DeliveryInfo {
            stream,
            consumer,
            stream_seq,
            consumer_seq,
            deliveries,
            pending,
        }
    }
}

/// The headers a dead letter carries besides the original message's: the stream, the
/// stream sequence, the original subject, the delivery count and the reason
/// (`max_deliver`, or `term: <reason>`).
pub fn dead_letter_headers() -> [&'static str; 6] {
    [
        DLQ_STREAM,
        DLQ_CONSUMER,
        DLQ_SEQUENCE,
        DLQ_SUBJECT,
        DLQ_DELIVERIES,
        DLQ_REASON,
    ]
}

const DLQ_STREAM: &str = "Courier-Dlq-Stream";
const DLQ_CONSUMER: &str = "Courier-Dlq-Consumer";
const DLQ_SEQUENCE: &str = "Courier-Dlq-Sequence";
const DLQ_SUBJECT: &str = "Courier-Dlq-Subject";
const DLQ_DELIVERIES: &str = "Courier-Dlq-Deliveries";
const DLQ_REASON: &str = "Courier-Dlq-Reason";

/// Messages read from the stream at a time while looking for deliverable ones.
const SCAN_CHUNK: usize = 512;
/// Messages one fetch reads at most before it lets go of the consumer's lock (held
/// messages do not fill its batch).
const SCAN_BUDGET: usize = 8192;
/// Messages held back (behind their key, or before their time) at most: reading the
/// stream stops there until some are delivered, which bounds a consumer's memory.
const MAX_HELD: u64 = 65_536;
/// The longest ack wait, backoff step or nak delay: a year.
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn deliver_at(message: &StoredMessage) -> Option<i64> {
    std::str::from_utf8(message.header(DELIVER_AT_HEADER)?)
        .ok()?
        .parse()
        .ok()
}

impl journal::Snapshot for Shared {
    fn snapshot(&self) -> Persisted {
        let engine = lock(&self.engine);
        Persisted {
            floor: engine.floor,
            done: engine.done.clone(),
            deliveries: engine
                .outstanding
                .iter()
                .filter(|(_, e)| e.deliveries > 0)
                .map(|(&s, e)| (s, e.deliveries))
                .chain(engine.restored.iter().map(|(&s, &n)| (s, n)))
                .collect(),
        }
    }
}

impl Consumer {
    /// Creates a consumer on `stream` (or returns the one of that name, if its
    /// configuration is the same).
    pub(crate) fn create(
        stream: &Stream,
        store: StoreRef,
        mut config: ConsumerConfig,
    ) -> Result<Consumer, StoreError> {
        if !config.durable && config.name.is_empty() {
            config.name = format!("eph-{:016x}", rand_u64());
        }
        config.validate().map_err(StoreError::InvalidConsumer)?;
        if let DeadLetter::Stream(name) = &config.dead_letter
            && name == stream.name()
        {
            return Err(StoreError::InvalidConsumer(
                "a consumer's dead letters cannot go to its own stream".into(),
            ));
        }
        let existing = stream.consumers().get(&config.name).cloned();
        if let Some(existing) = existing {
            return if existing.shared.config == config {
                Ok(existing)
            } else {
                Err(StoreError::ConsumerExists {
                    stream: stream.name().to_owned(),
                    consumer: config.name,
                })
            };
        }
        let retention = stream.config().retention;
        if !config.durable && retention != crate::config::Retention::Limits {
            return Err(StoreError::InvalidConsumer(format!(
                "stream `{}` removes messages once its consumers acknowledge them ({retention:?} retention): its consumers must be durable",
                stream.name()
            )));
        }
        if retention == crate::config::Retention::WorkQueue {
            for other in stream.consumers().values() {
                if let Some(subject) = overlapping(&config, &other.shared.config) {
                    return Err(StoreError::InvalidConsumer(format!(
                        "stream `{}` is a work queue: `{subject}` is bound to consumer `{}` already",
                        stream.name(),
                        other.shared.config.name
                    )));
                }
            }
        }
        if config.durable
            && stream
                .fs()
                .open(&state_path(stream, &config.name), false)
                .is_ok()
        {
            // not opened (it is not in the map): damaged, and kept for an operator
            return Err(StoreError::InvalidConsumer(format!(
                "consumer `{}` of stream `{}` has a state file that could not be opened ({}); delete the consumer to remove it",
                config.name,
                stream.name(),
                state_path(stream, &config.name).display()
            )));
        }
        let last = stream.visible();
        let first = stream.info().state.first_seq;
        let (start, last_per_subject_upto) = match config.deliver_policy {
            DeliverPolicy::All => (first, None),
            DeliverPolicy::New => (last + 1, None),
            DeliverPolicy::Last => (
                stream
                    .last_matching(&config.filter_subjects)
                    .unwrap_or(last + 1),
                None,
            ),
            DeliverPolicy::LastPerSubject => (first, Some(last)),
            DeliverPolicy::ByStartSequence(seq) => (seq.max(1), None),
            DeliverPolicy::ByStartTime(time) => (stream.first_at_or_after(time)?, None),
        };
        let stored = Stored {
            config: config.clone(),
            start,
            last_per_subject_upto,
        };
        let state = Persisted {
            floor: start - 1,
            ..Persisted::default()
        };
        let consumer = Consumer::start(stream, store, stored, state, None)?;
        if config.durable {
            stream
                .consumers()
                .insert(config.name.clone(), consumer.clone());
        }
        Ok(consumer)
    }

    /// Opens a durable consumer from its state file; `None` if the file holds no
    /// configuration (a creation that did not complete).
    pub(crate) fn open(
        stream: &Stream,
        store: StoreRef,
        path: &std::path::Path,
    ) -> Result<Option<Consumer>, StoreError> {
        let Some(loaded) = journal::load(&**stream.fs(), path)? else {
            return Ok(None);
        };
        let stored: Stored = serde_json::from_slice(&loaded.config)
            .map_err(|e| StoreError::corrupt(path, 16, format!("configuration: {e}")))?;
        stored
            .config
            .validate()
            .map_err(|e| StoreError::corrupt(path, 16, format!("configuration: {e}")))?;
        let file_name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if stored.config.name != file_name || !stored.config.durable {
            return Err(StoreError::corrupt(
                path,
                16,
                format!(
                    "the configuration names consumer `{}`, the file `{file_name}`",
                    stored.config.name
                ),
            ));
        }
        if let Some(damage) = &loaded.damage {
            tracing::error!(
                stream = stream.name(),
                consumer = stored.config.name,
                "{damage}; its state after that point is lost, so those messages will be delivered again"
            );
            // keep the damaged file for inspection; a fresh one is written below
            let offset = match damage {
                StoreError::Corrupt { offset, .. } => *offset,
                _ => 0,
            };
            // a copy: the file itself is replaced (atomically) by a fresh one below
            copy_aside(&**stream.fs(), path, &format!("con.damaged-{offset}"))?;
        }
        let mut state = loaded.state;
        // Nothing of the state may lie beyond the stream's last sequence: a stream
        // under `every`/`never` can lose its tail in a power loss while the consumer's
        // file kept its state of those sequences, and they will be given out again to
        // new messages.
        let last = stream.info().state.last_seq;
        let beyond = state.done.range(last.saturating_add(1)..).count()
            + state.deliveries.range(last.saturating_add(1)..).count();
        if state.floor > last || beyond > 0 {
            tracing::error!(
                stream = stream.name(),
                consumer = stored.config.name,
                "the state file knows sequences beyond the stream's last, {last} (floor {}, {beyond} more): forgetting them",
                state.floor
            );
            state.floor = state.floor.min(last);
            state.done.retain(|&s| s <= last);
            state.deliveries.retain(|&s, _| s <= last);
        }
        state.raise_floor(stored.start.saturating_sub(1).min(last));
        let name = stored.config.name.clone();
        let consumer = Consumer::start(stream, store, stored, state, loaded.damage)?;
        stream.consumers().insert(name, consumer.clone());
        Ok(Some(consumer))
    }

    fn start(
        stream: &Stream,
        store: StoreRef,
        stored: Stored,
        state: Persisted,
        damage: Option<StoreError>,
    ) -> Result<Consumer, StoreError> {
        let config = stored.config.clone();
        let floor = state.floor;
        let shared = Arc::new(Shared {
            stream: stream.clone(),
            store,
            name: Arc::from(config.name.as_str()),
            stream_name: Arc::from(stream.name()),
            stored,
            engine: Mutex::new(Engine {
                cursor: floor + 1,
                floor,
                consumer_seq: 0,
                outstanding: BTreeMap::new(),
                done: state.done.clone(),
                restored: state.deliveries.clone(),
                timers: BTreeSet::new(),
                delayed: BTreeSet::new(),
                due: BTreeSet::new(),
                keys: HashMap::new(),
                pending: 0,
                held: 0,
                redelivered: 0,
                dead_letters: 0,
                dead_letters_unstored: 0,
                closed: false,
                log_delivered: Vec::new(),
                log_done: Vec::new(),
                floor_logged: floor,
                retire: Vec::new(),
                unblocked: Vec::new(),
                restart_dead: Vec::new(),
            }),
            config,
            journal: OnceLock::new(),
            available: Notify::new(),
            tick: Arc::new(Notify::new()),
            ticker: OnceLock::new(),
            damage,
        });
        if shared.config.durable {
            let json = serde_json::to_vec(&shared.stored).expect("a config serializes");
            let weak: Weak<dyn journal::Snapshot> = Arc::downgrade(&shared) as _;
            let journal = Journal::create(
                stream.fs().clone(),
                state_path(stream, &shared.name),
                stream.config().fsync,
                json,
                &state,
                weak,
            )?;
            let _ = shared.journal.set(journal);
        }
        Ok(Consumer { shared })
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Its configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.shared.config
    }

    /// Waits for up to `batch` messages, returning as soon as at least one is
    /// deliverable (a message published meanwhile wakes it at once), or with none
    /// once `max_wait` has passed. Redeliveries come first.
    pub async fn fetch(
        &self,
        batch: usize,
        max_wait: Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.shared.ensure_ticker();
        let deadline = Instant::now() + max_wait.min(MAX_WAIT);
        let mut arrivals = self.shared.stream.arrivals();
        loop {
            let notified = self.shared.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            arrivals.borrow_and_update();
            let (out, wake) = self.shared.take(batch.max(1))?;
            if !out.is_empty() {
                return Ok(out);
            }
            if Instant::now() >= deadline {
                return Ok(out);
            }
            let until = wake.map_or(deadline, |w| w.min(deadline));
            tokio::select! {
                _ = &mut notified => {}
                changed = arrivals.changed() => {
                    if changed.is_err() {
                        return Err(StoreError::Closed(self.shared.stream.name().to_owned()));
                    }
                }
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// The consumer's messages as a stream: it keeps a batch fetched ahead (within
    /// `max_ack_pending`) and waits as long as it takes for the next. Ends only with
    /// an error (the stream deleted, the store closed).
    pub fn messages(&self) -> Messages {
        Messages {
            consumer: self.clone(),
            buffer: VecDeque::new(),
            fetching: None,
            batch: (self.shared.config.max_ack_pending as usize / 2).clamp(1, 256),
        }
    }

    /// Its state and counts.
    pub fn info(&self) -> ConsumerInfo {
        let visible = self.shared.stream.visible();
        let engine = lock(&self.shared.engine);
        ConsumerInfo {
            stream: self.shared.stream.name().to_owned(),
            config: self.shared.config.clone(),
            ack_floor: engine.floor,
            next_seq: engine.cursor,
            delivered: engine.consumer_seq,
            num_ack_pending: engine.pending,
            num_redelivery_due: engine.due.len() as u64,
            num_held: engine.held,
            num_pending: visible.saturating_sub(engine.cursor - 1),
            num_redelivered: engine.redelivered,
            dead_letters: engine.dead_letters,
            dead_letters_unstored: engine.dead_letters_unstored,
            damage: self.shared.damage.clone(),
        }
    }

    /// Whether the consumer is done with `seq` (for retention by interest).
    fn is_done(&self, seq: u64) -> bool {
        let engine = lock(&self.shared.engine);
        seq <= engine.floor || engine.done.contains(&seq)
    }

    /// Whether the consumer was stopped: deleted, or its stream or store closed. A
    /// handle kept for later use is looked up again once this is true.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.engine).closed
    }

    /// Stops the consumer: fetches fail, its state file is written out and closed.
    pub(crate) fn close(&self) {
        lock(&self.shared.engine).closed = true;
        self.shared.flush(None);
        if let Some(journal) = self.shared.journal.get() {
            journal.close();
        }
        self.shared.available.notify_waiters();
        self.shared.tick.notify_one();
    }

    /// Applies a lowered or raised fsync setting of the stream.
    pub(crate) fn set_fsync(&self, fsync: crate::Fsync) {
        if let Some(journal) = self.shared.journal.get() {
            journal.set_fsync(fsync);
        }
    }
}

/// Copies a damaged state file aside (`<name>.<extension>`, or with `.1`, `.2`, … when
/// taken), synced, for inspection.
fn copy_aside(
    fs: &dyn crate::fs::Fs,
    from: &std::path::Path,
    extension: &str,
) -> Result<(), StoreError> {
    let mut to = from.with_extension(extension);
    let mut n = 0;
    while fs.open(&to, false).is_ok() {
        n += 1;
        to = from.with_extension(format!("{extension}.{n}"));
    }
    let to = &to;
    let source = fs
        .open(from, false)
        .map_err(|e| StoreError::io("open", from, e))?;
    let len = source.len().map_err(|e| StoreError::io("stat", from, e))?;
    let mut bytes = vec![0u8; len as usize];
    source
        .read_exact_at(&mut bytes, 0)
        .map_err(|e| StoreError::io("read", from, e))?;
    let copy = fs
        .open(to, true)
        .map_err(|e| StoreError::io("create", to, e))?;
    copy.write_all_at(&bytes, 0)
        .and_then(|()| copy.sync_data())
        .map_err(|e| StoreError::io("write", to, e))
}

fn state_path(stream: &Stream, name: &str) -> std::path::PathBuf {
    stream.dir().join("consumers").join(format!("{name}.con"))
}

/// A subject that both consumers take, if any (the first overlap found).
fn overlapping(a: &ConsumerConfig, b: &ConsumerConfig) -> Option<String> {
    let all = [">".to_string()];
    let fa = if a.filter_subjects.is_empty() {
        &all[..]
    } else {
        &a.filter_subjects
    };
    let fb = if b.filter_subjects.is_empty() {
        &all[..]
    } else {
        &b.filter_subjects
    };
    fa.iter()
        .find(|x| fb.iter().any(|y| crate::subject::overlaps(x, y)))
        .cloned()
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

impl Shared {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    fn ensure_ticker(self: &Arc<Self>) {
        if self.ticker.get().is_some() {
            return;
        }
        if self.ticker.set(()).is_ok() {
            let weak = Arc::downgrade(self);
            let tick = self.tick.clone();
            tokio::spawn(run_timers(weak, tick));
        }
    }

    /// Takes up to `batch` deliverable messages; when there are none, also when the
    /// next one may become deliverable. A read error ends the batch (what was taken is
    /// returned; the error is, if nothing was).
    fn take(
        self: &Arc<Self>,
        batch: usize,
    ) -> Result<(Vec<Delivery>, Option<Instant>), StoreError> {
        let now = Instant::now();
        let now_wall = self.stream.clock().now();
        let mut engine = self.engine();
        if engine.closed {
            return Err(StoreError::Closed(self.stream.name().to_owned()));
        }
        let mut dead = engine.advance(&self.config, now, now_wall);
        let mut out = Vec::new();
        let mut error = None;
        let ack_none = self.config.ack_policy == AckPolicy::None;
        let max_pending = u64::from(self.config.max_ack_pending);
        let mut visible = self.stream.visible();
        let mut scanned = 0usize;
        let mut more = false; // stopped scanning with messages left to read
        while out.len() < batch && (ack_none || engine.pending < max_pending) {
            if let Some(&seq) = engine.due.first() {
                match self.stream.get(seq) {
                    Ok(message) => {
                        let d = engine.deliver(self, message, now, ack_none, visible);
                        out.push(d);
                    }
                    Err(StoreError::NoMessage { .. }) => {
                        // removed from the stream meanwhile (limits, purge): done with
                        engine.finish(seq);
                        engine.release_unblocked(&self.config, now_wall);
                    }
                    Err(e) => {
                        error = Some(e); // it stays due
                        break;
                    }
                }
                continue;
            }
            visible = self.stream.visible();
            if engine.cursor > visible {
                break;
            }
            if scanned >= SCAN_BUDGET || engine.held >= MAX_HELD {
                // held messages do not fill a batch: bound what one call reads (and
                // what is held in memory), and let the fetch come back
                more = engine.held < MAX_HELD;
                break;
            }
            // read about what the batch needs (a fetch of one does not read 512)
            let chunk = (batch - out.len()).clamp(32, SCAN_CHUNK);
            let messages = match self.stream.range(engine.cursor, chunk, 8 << 20) {
                Ok(messages) => messages,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            };
            if messages.is_empty() {
                engine.cursor = engine.cursor.max(visible + 1);
                break;
            }
            for message in messages {
                if out.len() >= batch || (!ack_none && engine.pending >= max_pending) {
                    break;
                }
                scanned += 1;
                engine.cursor = message.seq + 1;
                if let Some(d) = engine.admit(self, message, (now, now_wall), ack_none, visible) {
                    out.push(d);
                }
            }
        }
        dead.append(&mut engine.restart_dead);
        if !out.is_empty() && !ack_none {
            self.tick.notify_one();
        }
        // stopped because this batch was full (not at max_ack_pending, where waking
        // the others would only make them spin): another fetch may take the rest
        let left_due = out.len() >= batch && !engine.due.is_empty();
        let wake = if more {
            Some(now)
        } else {
            engine.next_wake(now_wall)
        };
        let retire = engine.advance_floor();
        self.queue_changes(&mut engine, None);
        drop(engine);
        self.retire(retire);
        self.dead_letter_all(dead);
        if left_due {
            self.available.notify_waiters();
        }
        match error {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok((out, wake)),
        }
    }

    /// Sends what changed to the state file; `confirm` gets the write's result.
    fn flush(&self, confirm: Option<oneshot::Sender<Result<(), StoreError>>>) {
        self.queue_changes(&mut self.engine(), confirm);
    }

    /// [`Shared::flush`] with the engine locked already: records are queued under the
    /// engine's lock, so that they reach the file in the order of the changes.
    fn queue_changes(
        &self,
        engine: &mut Engine,
        confirm: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) {
        let Some(journal) = self.journal.get() else {
            if let Some(tx) = confirm {
                let _ = tx.send(Ok(()));
            }
            return;
        };
        let floor = (engine.floor > engine.floor_logged).then_some(engine.floor);
        if engine.log_delivered.is_empty()
            && engine.log_done.is_empty()
            && floor.is_none()
            && confirm.is_none()
        {
            return;
        }
        if let Some(f) = floor {
            engine.floor_logged = f;
        }
        journal.queue(&engine.log_delivered, &engine.log_done, floor, confirm);
        engine.log_delivered.clear();
        engine.log_done.clear();
    }

    /// Removes messages done with, when the stream's retention says so.
    fn retire(&self, done: Vec<(u64, Arc<str>)>) {
        use crate::config::Retention;
        if done.is_empty() {
            return;
        }
        // (read without copying the configuration: this runs for every answer)
        let retention = self.stream.retention();
        if retention == Retention::Limits {
            return;
        }
        let others: Vec<Consumer> = self
            .stream
            .consumers()
            .values()
            .filter(|c| c.shared.name != self.name)
            .cloned()
            .collect();
        for (seq, subject) in done {
            let everyone = retention == Retention::WorkQueue
                || others
                    .iter()
                    .filter(|c| c.shared.config.takes(&subject))
                    .all(|c| c.is_done(seq));
            if everyone && let Err(e) = self.stream.remove_now(seq) {
                tracing::warn!(
                    stream = self.stream.name(),
                    seq,
                    "removing an acknowledged message: {e}"
                );
            }
        }
    }

    /// Publishes dead letters in the background (they wait for a durable store).
    fn dead_letter_all(self: &Arc<Self>, dead: Vec<u64>) {
        for seq in dead {
            let this = self.clone();
            tokio::spawn(async move { this.dead_letter(seq).await });
        }
    }

    /// Publishes message `seq` as a dead letter, then is done with it. On failure it
    /// stays, and is tried again after the ack wait.
    async fn dead_letter(self: &Arc<Self>, seq: u64) {
        let (deliveries, reason) = {
            let engine = self.engine();
            match engine.outstanding.get(&seq) {
                Some(e) if e.state == EState::DeadLettering => {
                    (e.deliveries, e.dead.clone().unwrap_or_default())
                }
                _ => return,
            }
        };
        let result = self.publish_dead_letter(seq, deliveries, &reason).await;
        let mut engine = self.engine();
        match result {
            Ok(stored) => {
                engine.dead_letters += 1;
                if !stored {
                    engine.dead_letters_unstored += 1;
                }
                engine.finish(seq);
            }
            Err(e) => {
                tracing::error!(
                    stream = self.stream.name(),
                    consumer = &*self.name,
                    seq,
                    "publishing a dead letter failed, trying again after the ack wait: {e}"
                );
                let deadline = Instant::now() + self.config.ack_wait;
                engine.set_state(seq, EState::Pending { deadline });
                self.tick.notify_one();
            }
        }
        let retire = engine.advance_floor();
        self.queue_changes(&mut engine, None);
        drop(engine);
        self.retire(retire);
        self.available.notify_waiters();
    }

    /// Ok(true) once stored by a stream, Ok(false) if no stream takes it.
    async fn publish_dead_letter(
        &self,
        seq: u64,
        deliveries: u32,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let message = match self.stream.get(seq) {
            Ok(m) => m,
            Err(StoreError::NoMessage { .. }) => return Ok(true), // removed meanwhile
            Err(e) => return Err(e),
        };
        let stream_name = self.stream.name();
        let subject = format!("$DLQ.{stream_name}.{}", self.name);
        let seq_text = seq.to_string();
        let deliveries_text = deliveries.to_string();
        let mut headers: Vec<(&str, &[u8])> = message
            .headers
            .iter()
            .filter(|(n, _)| {
                &**n != crate::MSG_ID_HEADER
                    && &**n != DELIVER_AT_HEADER
                    && !n.starts_with("Courier-Dlq-")
            })
            .map(|(n, v)| (&**n, &v[..]))
            .collect();
        headers.extend([
            (DLQ_STREAM, stream_name.as_bytes()),
            (DLQ_CONSUMER, self.name.as_bytes()),
            (DLQ_SEQUENCE, seq_text.as_bytes()),
            (DLQ_SUBJECT, message.subject.as_bytes()),
            (DLQ_DELIVERIES, deliveries_text.as_bytes()),
            (DLQ_REASON, reason.as_bytes()),
        ]);
        let store = self
            .store
            .upgrade()
            .ok_or_else(|| StoreError::Closed(stream_name.to_owned()))?;
        let target = match &self.config.dead_letter {
            DeadLetter::Stream(name) => Some(store.stream(name)?),
            DeadLetter::Subject => store.stream_for(&subject),
        };
        let stored = match target {
            Some(target) => {
                let once = Publish {
                    // a retry after a crash or a failure lands once
                    msg_id: Some(format!("dlq:{stream_name}:{}:{seq}", self.name)),
                    ..Publish::default()
                };
                target
                    .publish(&subject, &headers, &message.payload, &once)
                    .await?
                    .await?;
                true
            }
            None => {
                tracing::error!(
                    stream = stream_name,
                    consumer = &*self.name,
                    seq,
                    reason,
                    "dead letter published to `{subject}`, which no stream stores: create a stream capturing it to keep dead letters"
                );
                false
            }
        };
        store.observe_dead_letter(&subject, &headers, &message.payload);
        Ok(stored)
    }

    /// Answers a delivery.
    fn answer(self: &Arc<Self>, seq: u64, answer: Answer) -> Result<Option<u64>, StoreError> {
        let mut engine = self.engine();
        if engine.closed {
            return Err(StoreError::Closed(self.stream.name().to_owned()));
        }
        let mut dead = None;
        let mut changed = true;
        match answer {
            Answer::Ack => {
                if self.config.ack_policy == AckPolicy::All {
                    let upto: Vec<u64> = engine
                        .outstanding
                        .range(..=seq)
                        .filter(|(_, e)| {
                            matches!(e.state, EState::Pending { .. } | EState::Due)
                                && e.deliveries > 0
                                && e.dead.is_none()
                        })
                        .map(|(&s, _)| s)
                        .collect();
                    for s in upto {
                        engine.finish(s);
                    }
                    // delivered before a restart and not read again since: done too
                    let cursor = engine.cursor;
                    if seq >= cursor {
                        let restored: Vec<u64> = engine
                            .restored
                            .range(cursor..=seq)
                            .filter(|&(_, &n)| n > 0)
                            .map(|(&s, _)| s)
                            .collect();
                        for s in restored {
                            self.finish_restored(&mut engine, s);
                        }
                    }
                } else {
                    match engine.outstanding.get(&seq) {
                        // on its way to the dead letters: too late to acknowledge
                        Some(e) if e.dead.is_some() => {
                            return Err(self.not_pending(seq));
                        }
                        Some(e) if e.deliveries > 0 => engine.finish(seq),
                        Some(_) => return Err(self.not_pending(seq)),
                        // done already (acknowledged twice): nothing to do
                        None if seq <= engine.floor || engine.done.contains(&seq) => {
                            changed = false;
                        }
                        // delivered before a restart and not read again since (an answer
                        // relayed by a broker that restarted): done now
                        None if seq >= engine.cursor
                            && engine.restored.get(&seq).is_some_and(|&n| n > 0) =>
                        {
                            self.finish_restored(&mut engine, seq);
                        }
                        None => return Err(self.not_pending(seq)),
                    }
                }
            }
            Answer::Nak(delay) => {
                let deliveries = engine
                    .answerable(seq, false)
                    .ok_or_else(|| self.not_pending(seq))?;
                if self.config.max_deliver.is_some_and(|m| deliveries >= m) {
                    engine.dead_letter(seq, "max_deliver".into());
                    dead = Some(seq);
                } else {
                    match delay.filter(|d| !d.is_zero()).map(|d| d.min(MAX_WAIT)) {
                        Some(d) => {
                            let deadline = Instant::now() + d;
                            engine.set_state(seq, EState::Pending { deadline });
                            self.tick.notify_one();
                        }
                        None => engine.set_state(seq, EState::Due),
                    }
                }
            }
            Answer::InProgress => {
                let deliveries = engine
                    .answerable(seq, false)
                    .ok_or_else(|| self.not_pending(seq))?;
                let deadline = Instant::now() + self.config.wait(deliveries);
                engine.set_state(seq, EState::Pending { deadline });
                self.tick.notify_one();
                changed = false;
            }
            Answer::Term(reason) => {
                engine
                    .answerable(seq, true)
                    .ok_or_else(|| self.not_pending(seq))?;
                engine.dead_letter(seq, format!("term: {reason}"));
                dead = Some(seq);
            }
        }
        if !engine.unblocked.is_empty() {
            engine.release_unblocked(&self.config, self.stream.clock().now());
        }
        let retire = engine.advance_floor();
        self.queue_changes(&mut engine, None);
        drop(engine);
        if changed {
            self.available.notify_waiters();
        }
        self.retire(retire);
        Ok(dead)
    }

    /// Marks done a message delivered before a restart and not read again since (an
    /// answer relayed by a broker that restarted): as an ack would have.
    fn finish_restored(&self, engine: &mut Engine, seq: u64) {
        let subject = self.stream.get(seq).map(|m| m.subject);
        engine.restored.remove(&seq);
        engine.done.insert(seq);
        engine.log_done.push(seq);
        if let Ok(subject) = subject {
            engine.retire.push((seq, subject));
        }
    }

    fn not_pending(&self, seq: u64) -> StoreError {
        StoreError::NotPending {
            consumer: self.name.to_string(),
            seq,
        }
    }
}

/// An answer to a delivery, for code that relays answers on behalf of a
/// [`Delivery`] it no longer holds (a broker answering for its clients): see
/// [`Consumer::answer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// [`Delivery::ack`].
    Ack,
    /// [`Delivery::nak`].
    Nak(Option<Duration>),
    /// [`Delivery::in_progress`].
    InProgress,
    /// [`Delivery::term`], with its reason.
    Term(String),
}

impl Engine {
    /// Brings the state to `now`: expired deliveries, delivery times come, keys freed.
    /// Returns the messages to publish as dead letters.
    fn advance(&mut self, config: &ConsumerConfig, now: Instant, now_wall: i64) -> Vec<u64> {
        let dead = self.expire(config, now);
        self.release_delayed(config, now_wall);
        self.release_unblocked(config, now_wall);
        dead
    }

    /// Moves expired deliveries to redelivery, or to dead-lettering past
    /// `max_deliver`; returns the latter.
    fn expire(&mut self, config: &ConsumerConfig, now: Instant) -> Vec<u64> {
        let mut dead = Vec::new();
        while let Some(&(deadline, seq)) = self.timers.first() {
            if deadline > now {
                break;
            }
            // timers follow the states (`set_state`), so leaving Pending removes this one
            let Some(entry) = self.outstanding.get(&seq) else {
                self.timers.pop_first(); // cannot happen; never loop on it
                continue;
            };
            if let Some(reason) = entry.dead.clone().or_else(|| {
                config
                    .max_deliver
                    .filter(|&m| entry.deliveries >= m)
                    .map(|_| "max_deliver".to_owned())
            }) {
                self.dead_letter(seq, reason);
                dead.push(seq);
            } else {
                self.set_state(seq, EState::Due);
            }
        }
        dead
    }

    /// Releases held messages whose delivery time has come (and whose key allows).
    fn release_delayed(&mut self, config: &ConsumerConfig, now_wall: i64) {
        while let Some(&(at, seq)) = self.delayed.first() {
            if at > now_wall {
                break;
            }
            self.delayed.pop_first();
            let Some(entry) = self.outstanding.get(&seq) else {
                continue;
            };
            if entry.state != EState::Held {
                continue;
            }
            match entry.key.clone() {
                Some(key) => self.promote(config, &key, now_wall),
                None => self.set_state(seq, EState::Due),
            }
        }
    }

    /// Moves the messages waiting behind `key` to delivery while its in-flight
    /// limit allows, in stream order; a message before its time holds the rest.
    fn promote(&mut self, config: &ConsumerConfig, key: &Bytes, now_wall: i64) {
        while let Some(ks) = self.keys.get_mut(key)
            && ks.in_flight < config.max_in_flight_per_key
            && let Some(&seq) = ks.queue.front()
        {
            let Some(entry) = self.outstanding.get(&seq) else {
                ks.queue.pop_front();
                continue;
            };
            if let Some(at) = entry.deliver_at
                && at > now_wall
            {
                self.delayed.insert((at, seq));
                break;
            }
            ks.queue.pop_front();
            ks.in_flight += 1;
            self.set_state(seq, EState::Due);
        }
        if self
            .keys
            .get(key)
            .is_some_and(|ks| ks.in_flight == 0 && ks.queue.is_empty())
        {
            self.keys.remove(key);
        }
    }

    /// Takes a message read from the stream: delivers it now, holds it, or skips it.
    fn admit(
        &mut self,
        shared: &Arc<Shared>,
        message: StoredMessage,
        (now, now_wall): (Instant, i64),
        ack_none: bool,
        visible: u64,
    ) -> Option<Delivery> {
        let config = &shared.config;
        let seq = message.seq;
        if self.done.contains(&seq) || !config.takes(&message.subject) {
            return None;
        }
        if let Some(upto) = shared.stored.last_per_subject_upto
            && seq <= upto
            && !shared
                .stream
                .is_last_of_subject(seq, &message.subject, upto)
        {
            return None;
        }
        // without acknowledgements a key has nothing to wait for
        let key = if ack_none {
            None
        } else {
            config.key_of(&message)
        };
        let at = deliver_at(&message).filter(|&at| at > now_wall);
        let deliveries = self.restored.remove(&seq).unwrap_or(0);
        if !ack_none && config.max_deliver.is_some_and(|m| deliveries >= m) {
            // delivered its last time before a restart and never answered: its key's
            // next message waits until it is dead-lettered
            if let Some(key) = &key {
                self.keys.entry(key.clone()).or_default().in_flight += 1;
            }
            self.insert(
                seq,
                Entry {
                    subject: message.subject.clone(),
                    key,
                    deliver_at: None,
                    deliveries,
                    state: EState::DeadLettering,
                    dead: Some("max_deliver".into()),
                },
            );
            self.restart_dead.push(seq);
            return None;
        }
        let mut entry = Entry {
            subject: message.subject.clone(),
            key: key.clone(),
            deliver_at: at,
            deliveries,
            state: EState::Held,
            dead: None,
        };
        let mut hold = at.is_some();
        if let Some(key) = &key
            && !ack_none
        {
            let ks = self.keys.entry(key.clone()).or_default();
            if hold || !ks.queue.is_empty() || ks.in_flight >= config.max_in_flight_per_key {
                let first = ks.queue.is_empty();
                ks.queue.push_back(seq);
                if let (Some(at), true) = (at, first) {
                    self.delayed.insert((at, seq));
                }
                hold = true;
            } else {
                ks.in_flight += 1;
            }
        } else if let Some(at) = at {
            self.delayed.insert((at, seq));
        }
        if !hold {
            entry.state = EState::Due;
        }
        self.insert(seq, entry);
        (!hold).then(|| self.deliver(shared, message, now, ack_none, visible))
    }

    /// Hands out message `message.seq`, which is outstanding and due.
    fn deliver(
        &mut self,
        shared: &Arc<Shared>,
        message: StoredMessage,
        now: Instant,
        ack_none: bool,
        visible: u64,
    ) -> Delivery {
        let seq = message.seq;
        self.consumer_seq += 1;
        let visible_gap = self.due.len() as u64;
        let entry = self
            .outstanding
            .get_mut(&seq)
            .expect("delivered messages are outstanding");
        entry.deliveries = entry.deliveries.saturating_add(1);
        let deliveries = entry.deliveries;
        if deliveries > 1 {
            self.redelivered += 1;
        }
        if ack_none {
            self.finish(seq);
        } else {
            let deadline = now + shared.config.wait(deliveries);
            self.set_state(seq, EState::Pending { deadline });
            self.log_delivered.push((seq, deliveries));
        }
        let pending = visible.saturating_sub(self.cursor - 1) + visible_gap;
        Delivery {
            info: DeliveryInfo {
                // shared, not copied: no allocation per delivery
                stream: shared.stream_name.clone(),
                consumer: shared.name.clone(),
                stream_seq: seq,
                consumer_seq: self.consumer_seq,
                deliveries,
                pending,
            },
            message,
            consumer: shared.clone(),
        }
    }

    /// Done with `seq`: acknowledged, dead-lettered, or gone from the stream.
    fn finish(&mut self, seq: u64) {
        let Some(entry) = self.outstanding.remove(&seq) else {
            return;
        };
        self.leave(seq, entry.state);
        if seq > self.floor {
            self.done.insert(seq);
        }
        self.log_done.push(seq);
        self.retire.push((seq, entry.subject));
        if let Some(key) = entry.key
            && let Some(ks) = self.keys.get_mut(&key)
        {
            if entry.state == EState::Held {
                ks.queue.retain(|&s| s != seq);
            } else {
                ks.in_flight = ks.in_flight.saturating_sub(1);
            }
            // promotion happens with the wall clock of the next take
            self.unblocked.push(key);
        }
    }

    /// Adds an outstanding message in the state its entry names.
    fn insert(&mut self, seq: u64, mut entry: Entry) {
        let state = std::mem::replace(&mut entry.state, EState::DeadLettering);
        self.outstanding.insert(seq, entry);
        self.set_state(seq, state);
    }

    /// Moves outstanding message `seq` to `state`. The one place states change: the
    /// timers, the due set and the counts follow them here.
    fn set_state(&mut self, seq: u64, state: EState) {
        let Some(entry) = self.outstanding.get_mut(&seq) else {
            return;
        };
        let old = std::mem::replace(&mut entry.state, state);
        self.leave(seq, old);
        match state {
            EState::Held => self.held += 1,
            EState::Due => {
                self.due.insert(seq);
            }
            EState::Pending { deadline } => {
                self.timers.insert((deadline, seq));
                self.pending += 1;
            }
            EState::DeadLettering => {}
        }
    }

    /// Undoes what being in `state` added for `seq`.
    fn leave(&mut self, seq: u64, state: EState) {
        match state {
            EState::Held => self.held -= 1,
            EState::Due => {
                self.due.remove(&seq);
            }
            EState::Pending { deadline } => {
                self.timers.remove(&(deadline, seq));
                self.pending -= 1;
            }
            EState::DeadLettering => {}
        }
    }

    /// Marks `seq` to become a dead letter, for `reason`.
    fn dead_letter(&mut self, seq: u64, reason: String) {
        if let Some(entry) = self.outstanding.get_mut(&seq) {
            entry.dead.get_or_insert(reason);
        }
        self.set_state(seq, EState::DeadLettering);
    }

    /// The delivery count of `seq` if a delivery of it may still be answered: it is
    /// waiting for an answer (or, with `due_too`, for its redelivery) and not on its way
    /// to the dead letters.
    fn answerable(&self, seq: u64, due_too: bool) -> Option<u32> {
        let entry = self.outstanding.get(&seq).filter(|e| e.dead.is_none())?;
        match entry.state {
            EState::Pending { .. } => Some(entry.deliveries),
            EState::Due if due_too => Some(entry.deliveries),
            _ => None,
        }
    }

    /// Moves the next messages of keys that had one done with to delivery.
    fn release_unblocked(&mut self, config: &ConsumerConfig, now_wall: i64) {
        for key in std::mem::take(&mut self.unblocked) {
            self.promote(config, &key, now_wall);
        }
    }

    /// Raises the floor past everything done, and returns the messages done with
    /// since the last call (for retention).
    fn advance_floor(&mut self) -> Vec<(u64, Arc<str>)> {
        let floor = match self.outstanding.first_key_value() {
            Some((&first, _)) => first - 1,
            None => self.cursor - 1,
        };
        if floor > self.floor {
            self.floor = floor;
            self.done = self.done.split_off(&(floor + 1));
            self.restored = self.restored.split_off(&(floor + 1));
        }
        std::mem::take(&mut self.retire)
    }

    /// When the next timer or delivery time is due, if any.
    fn next_wake(&self, now_wall: i64) -> Option<Instant> {
        let timer = self.timers.first().map(|&(t, _)| t);
        let delayed = self.delayed.first().map(|&(at, _)| {
            let wait = u64::try_from(at.saturating_sub(now_wall)).unwrap_or(0);
            Instant::now() + Duration::from_nanos(wait).min(MAX_WAIT)
        });
        match (timer, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The timer task of a consumer: expires deliveries and releases delayed messages
/// even when no fetch is waiting, and publishes dead letters.
async fn run_timers(consumer: Weak<Shared>, tick: Arc<Notify>) {
    loop {
        let wake = {
            let Some(shared) = consumer.upgrade() else {
                return;
            };
            let now = Instant::now();
            let now_wall = shared.stream.clock().now();
            let mut engine = shared.engine();
            if engine.closed {
                return;
            }
            let dead = engine.advance(&shared.config, now, now_wall);
            let woke = !engine.due.is_empty();
            let wake = engine.next_wake(now_wall);
            drop(engine);
            if woke {
                shared.available.notify_waiters();
            }
            shared.dead_letter_all(dead);
            wake
        };
        let sleep = match wake {
            Some(at) => tokio::time::sleep_until(at),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            () = sleep => {}
            () = tick.notified() => {}
        }
    }
}

impl Shared {
    /// Applies `answer` to message `seq`; with `confirm`, returns once the change is
    /// durable under the stream's fsync setting. A dead letter it causes is published
    /// before it returns.
    async fn reply(
        self: &Arc<Self>,
        seq: u64,
        answer: Answer,
        confirm: bool,
    ) -> Result<(), StoreError> {
        let dead = self.answer(seq, answer)?;
        if let Some(seq) = dead {
            // in a task of its own: dropping this future does not strand the message
            let consumer = self.clone();
            let _ = tokio::spawn(async move { consumer.dead_letter(seq).await }).await;
        }
        if confirm {
            let (tx, rx) = oneshot::channel();
            self.flush(Some(tx));
            return rx
                .await
                .unwrap_or_else(|_| Err(StoreError::Closed(self.stream_name.to_string())));
        }
        Ok(())
    }
}

impl Consumer {
    /// Answers the delivery of stream sequence `seq` as [`Delivery`]'s methods do, for
    /// code that relays answers (a broker answering for its clients). With `confirm`,
    /// returns once the answer is durable, as [`Delivery::ack_confirmed`] does.
    ///
    /// An ack of a message done with already is `Ok` (acks are idempotent); an ack of a
    /// message delivered before a restart and not read again since marks it done. An
    /// ack of a message never delivered, and a nak, in-progress or term of a message
    /// not waiting for an answer, are [`StoreError::NotPending`].
    pub async fn answer(&self, seq: u64, answer: Answer, confirm: bool) -> Result<(), StoreError> {
        self.shared.reply(seq, answer, confirm).await
    }
}

impl Delivery {
    /// Acknowledges the message: it is done with, and not delivered again (unless the
    /// consumer's state is lost before it is written: see [`Delivery::ack_confirmed`]).
    /// With [`AckPolicy::All`], every message delivered before it is acknowledged too.
    pub async fn ack(&self) -> Result<(), StoreError> {
        self.consumer
            .reply(self.info.stream_seq, Answer::Ack, false)
            .await
    }

    /// Acknowledges the message and returns once the acknowledgement is durable
    /// under the stream's fsync setting: for processing that must happen once.
    pub async fn ack_confirmed(&self) -> Result<(), StoreError> {
        self.consumer
            .reply(self.info.stream_seq, Answer::Ack, true)
            .await
    }

    /// Refuses the message for now: it is delivered again after `delay` (at once with
    /// `None`), or becomes a dead letter if this was its last delivery.
    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), StoreError> {
        self.consumer
            .reply(self.info.stream_seq, Answer::Nak(delay), false)
            .await
    }

    /// Says the message is still being worked on: its ack wait starts again.
    pub async fn in_progress(&self) -> Result<(), StoreError> {
        self.consumer
            .reply(self.info.stream_seq, Answer::InProgress, false)
            .await
    }

    /// Gives up on the message: it becomes a dead letter with `reason`, and is not
    /// delivered again. Returns once the dead letter is published (or has failed, to
    /// be tried again after the ack wait).
    pub async fn term(&self, reason: &str) -> Result<(), StoreError> {
        self.consumer
            .reply(self.info.stream_seq, Answer::Term(reason.to_owned()), false)
            .await
    }

    /// The consumer that delivered it.
    pub fn consumer(&self) -> Consumer {
        Consumer {
            shared: self.consumer.clone(),
        }
    }
}

type FetchFuture =
    Pin<Box<dyn std::future::Future<Output = Result<Vec<Delivery>, StoreError>> + Send>>;

/// A consumer's messages as a [`futures_core::Stream`]; see [`Consumer::messages`].
pub struct Messages {
    consumer: Consumer,
    buffer: VecDeque<Delivery>,
    fetching: Option<FetchFuture>,
    batch: usize,
}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages")
            .field("consumer", &self.consumer.name())
            .field("buffered", &self.buffer.len())
            .finish()
    }
}

impl Messages {
    /// The next message, waiting as long as it takes; `None` never comes, an error
    /// does when the consumer is closed.
    pub async fn next(&mut self) -> Option<Result<Delivery, StoreError>> {
        std::future::poll_fn(|cx| self.poll_next_delivery(cx)).await
    }

    fn poll_next_delivery(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Delivery, StoreError>>> {
        loop {
            if let Some(d) = self.buffer.pop_front() {
                return Poll::Ready(Some(Ok(d)));
            }
            let fetching = self.fetching.get_or_insert_with(|| {
                let consumer = self.consumer.clone();
                let batch = self.batch;
                Box::pin(async move { consumer.fetch(batch, Duration::from_secs(3600)).await })
            });
            match fetching.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => {
                    self.fetching = None;
                    match result {
                        Ok(batch) => self.buffer.extend(batch),
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
            }
        }
    }
}

impl futures_core::Stream for Messages {
    type Item = Result<Delivery, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_next_delivery(cx)
    }
}
