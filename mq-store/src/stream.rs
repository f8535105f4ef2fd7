//! A stream: its log, the committer that writes it, deduplication, expectations and
//! limits.
//!
//! Publishing takes the stream's lock only to check the message, give it a sequence
//! and encode it into the pending write. The committer thread takes everything
//! pending at once, writes it with one `write` per segment, `fdatasync`s it (under
//! [`Fsync::Always`]) and only then completes the acknowledgements and makes the
//! messages readable. Publishes that arrive meanwhile form the next batch: that is
//! group commit, and why many publishes in flight cost one fsync between them.
//!
//! A failed write or fsync poisons the stream. The batch fails, and so does
//! everything queued behind it; none of their publishers is acknowledged. At once, each
//! file the batch wrote is cut back to where the batch began (or, if the batch had
//! removed a segment, to what it synced before that removal, which the removal relies
//! on: those records stay, although their publishers got the error). When a publish
//! next asks, the stream reads its log back from disk, verifying it, syncs its
//! directory and starts a new segment. The failed write is never retried and then
//! assumed good.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::clock::{Clock, nanos};
use crate::config::{Discard, Fsync, MAX_DUPLICATE_WINDOW, StreamConfig};
use crate::error::StoreError;
use crate::fs::{File, Fs};
use crate::log::{self, Dedup, Log, MAX_MSG_ID_LEN, MSG_ID_HEADER, Op};
use crate::message::{PubAck, Publish, StoredMessage};
use crate::record;

/// A stream's counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct StreamState {
    /// Messages stored.
    pub msgs: u64,
    /// Bytes of their records.
    pub bytes: u64,
    /// The first sequence still stored (last + 1 when empty).
    pub first_seq: u64,
    /// The last sequence given out (0 before the first message).
    pub last_seq: u64,
    /// Distinct subjects stored.
    pub subjects: u64,
    /// Sequences between first and last that were removed.
    pub deleted: u64,
    /// Segment files.
    pub segments: u64,
    /// When the last message was stored, nanoseconds since the Unix epoch (0: none).
    pub last_time: i64,
}

/// A stream's configuration and counts.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct StreamInfo {
    /// Its configuration.
    pub config: StreamConfig,
    /// Its counts.
    pub state: StreamState,
}

impl StreamInfo {
    /// A stream's info, for a client that builds it from what a server reports.
    pub fn new(config: StreamConfig, state: StreamState) -> StreamInfo {
        StreamInfo { config, state }
    }
}

/// A handle to one stream of a [`crate::Store`]; clones share it.
#[derive(Clone, Debug)]
pub struct Stream {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    name: Arc<str>,
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    wake: Condvar,
    committer: Mutex<Option<JoinHandle<()>>>,
    /// Damage recovery found and skipped, each naming its file and offset.
    damage: Mutex<Vec<StoreError>>,
    /// Raised when recovery changes the configuration, for the store to re-route.
    config_changed: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>>,
    /// The last readable sequence, for consumers waiting for messages to arrive.
    arrivals: tokio::sync::watch::Sender<u64>,
    /// The stream's durable consumers, by name.
    consumers: Mutex<std::collections::BTreeMap<String, crate::consumer::Consumer>>,
}

#[derive(Debug)]
struct State {
    log: Log,
    config: StreamConfig,
    waiters: Vec<Waiter>,
    /// Incremented whenever operations are queued; a waiter completes once the batch
    /// holding its ticket is done.
    ticket: u64,
    done: u64,
    /// The last sequence readable: written, and synced under `Fsync::Always`.
    visible: u64,
    poison: Option<Poison>,
    /// Callers waiting for an attempt to recover.
    heal_waiters: Vec<oneshot::Sender<Result<(), StoreError>>>,
    /// One of them is a delete, purge or update, which gets an attempt even before the
    /// backoff allows one: those are rare, and asked for by an operator.
    heal_forced: bool,
    /// The next batch is synced whatever the setting: it holds appends queued under
    /// `Fsync::Always` before an update lowered it.
    force_sync: bool,
    /// A plain store found the stream poisoned: recover when next due.
    heal_requested: bool,
    /// When recovery may next be tried.
    backoff: HealBackoff,
    closed: bool,
    /// A batch is being written (by the committer thread, or by a caller in
    /// [`Stream::commit_now`]); the next waits for it.
    committing: bool,
    unsynced: Vec<Written>,
    last_sync: Instant,
    last_expiry: i64,
}

#[derive(Debug)]
struct Poison {
    cause: String,
    /// Where each file written by the failed batch must be cut back to.
    truncate: Vec<(Arc<dyn File>, PathBuf, u64)>,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    ack: PubAck,
    tx: Option<oneshot::Sender<Result<PubAck, StoreError>>>,
}

/// The acknowledgement of a publish, once the stream says it is durable.
#[derive(Debug)]
#[must_use = "a publish is durable only once its acknowledgement arrives"]
pub struct AckFuture {
    inner: AckInner,
    stream: Arc<str>,
    duplicate: bool,
}

impl AckFuture {
    /// Whether the publish was recognised as a duplicate (its `Msg-Id` seen within the
    /// window), known before the acknowledgement resolves.
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }
}

#[derive(Debug)]
enum AckInner {
    Ready(Option<Result<PubAck, StoreError>>),
    Waiting(oneshot::Receiver<Result<PubAck, StoreError>>),
}

impl Future for AckFuture {
    type Output = Result<PubAck, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match &mut this.inner {
            AckInner::Ready(result) => Poll::Ready(result.take().expect("polled after completion")),
            AckInner::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(StoreError::Closed(this.stream.to_string())))),
        }
    }
}

/// The wait before the second attempt to recover a poisoned stream; it doubles with
/// each attempt after that, up to [`MAX_HEAL_BACKOFF`], until a batch is written.
const HEAL_INTERVAL: Duration = Duration::from_secs(1);

/// The longest wait between two attempts to recover.
const MAX_HEAL_BACKOFF: Duration = Duration::from_secs(30);

/// Recovery re-reads the whole log: the wait after an attempt is at least this many
/// times what the attempt took, so that at most a tenth of the time goes to it.
const HEAL_COST_FACTOR: u32 = 10;

/// The longest header name a record can hold (its length is 16 bits).
const MAX_HEADER_NAME: usize = u16::MAX as usize;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Stream {
    /// Creates a new stream's files and starts it.
    pub(crate) fn create(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        clock: Arc<dyn Clock>,
        config: StreamConfig,
    ) -> Result<Stream, StoreError> {
        let mut log = Log::create(fs.clone(), &dir, &config)?;
        // The first segment and its configuration are durable before the stream exists.
        for op in log.take_ops() {
            match op {
                Op::Write {
                    file,
                    path,
                    offset,
                    bytes,
                } => file
                    .write_all_at(&bytes, offset)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| StoreError::io("write", path, e))?,
                Op::SyncDir | Op::Remove { .. } | Op::Sync { .. } => {}
            }
        }
        fs.sync_dir(&dir)
            .map_err(|e| StoreError::io("sync directory", &dir, e))?;
        Ok(Stream::start(fs, dir, clock, log, config, Vec::new()))
    }

    /// Opens an existing stream's files, recovering them; `None` if they hold no
    /// configuration (a creation that did not complete).
    pub(crate) fn open(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        clock: Arc<dyn Clock>,
    ) -> Result<Option<Stream>, StoreError> {
        let since = clock.now().saturating_sub(nanos(MAX_DUPLICATE_WINDOW));
        let recovered = Log::open(fs.clone(), &dir, since)?;
        let Some(config) = recovered.config else {
            if let Some(damage) = recovered.damage.into_iter().next() {
                return Err(damage);
            }
            if recovered.log.next_seq() > 1 {
                return Err(StoreError::corrupt(
                    &dir,
                    0,
                    "messages but no configuration record in any segment",
                ));
            }
            if let Some(aside) = recovered.set_aside.first() {
                // Most likely a creation that did not complete; but the file is kept,
                // and so is the stream's name, rather than deleted unread.
                return Err(StoreError::corrupt(
                    aside,
                    0,
                    "no readable segment is left: the first segment's header is unreadable (a torn first write, or damage), and the file was moved aside",
                ));
            }
            return Ok(None);
        };
        let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if config.name != dir_name {
            return Err(StoreError::corrupt(
                &dir,
                0,
                format!(
                    "the configuration names stream `{}`, the directory `{dir_name}`",
                    config.name
                ),
            ));
        }
        let mut log = recovered.log;
        log.ensure_config();
        let stream = Stream::start(fs, dir, clock, log, config, recovered.msg_ids);
        *lock(&stream.shared.damage) = recovered.damage;
        Ok(Some(stream))
    }

    fn start(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        clock: Arc<dyn Clock>,
        mut log: Log,
        config: StreamConfig,
        msg_ids: Vec<log::SeenId>,
    ) -> Stream {
        let now = clock.now();
        log.dedup = Dedup::rebuild(nanos(config.duplicate_window), msg_ids, now);
        let visible = log.next_seq() - 1;
        let shared = Arc::new(Shared {
            name: Arc::from(config.name.as_str()),
            fs,
            dir,
            clock,
            state: Mutex::new(State {
                log,
                config,
                waiters: Vec::new(),
                ticket: 0,
                done: 0,
                visible,
                poison: None,
                heal_waiters: Vec::new(),
                heal_forced: false,
                heal_requested: false,
                force_sync: false,
                backoff: HealBackoff::default(),
                closed: false,
                committing: false,
                unsynced: Vec::new(),
                last_sync: Instant::now(),
                last_expiry: now,
            }),
            wake: Condvar::new(),
            committer: Mutex::new(None),
            damage: Mutex::new(Vec::new()),
            config_changed: std::sync::OnceLock::new(),
            arrivals: tokio::sync::watch::Sender::new(visible),
            consumers: Mutex::new(std::collections::BTreeMap::new()),
        });
        let runner = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("courier-store-{}", shared.name))
            .spawn(move || runner.run())
            .expect("spawning a committer thread");
        *lock(&shared.committer) = Some(handle);
        Stream { shared }
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Stores a message and returns its acknowledgement, which resolves once the
    /// message is durable under the stream's `fsync` setting. Many may be in flight:
    /// acknowledgements complete in sequence order, a batch at a time.
    ///
    /// Errors that need no disk (a limit, an expectation, a poisoned stream that cannot
    /// recover) are returned here; a failed write resolves the acknowledgement with it.
    pub async fn publish(
        &self,
        subject: &str,
        headers: &[(&str, &[u8])],
        payload: &[u8],
        options: &Publish,
    ) -> Result<AckFuture, StoreError> {
        self.publish_inner(subject, headers, payload, options, false)
            .await
    }

    /// [`Stream::publish`] without starting the write: the caller calls
    /// [`Stream::commit_now`] once it has queued what it has at hand (a broker, once per
    /// read from a connection), so that one write carries them all. Without that call,
    /// the committer still writes them within a second.
    pub async fn publish_deferred(
        &self,
        subject: &str,
        headers: &[(&str, &[u8])],
        payload: &[u8],
        options: &Publish,
    ) -> Result<AckFuture, StoreError> {
        self.publish_inner(subject, headers, payload, options, true)
            .await
    }

    /// Writes what is queued. Under [`Fsync::Every`] and [`Fsync::Never`], when no batch
    /// is being written and the pending operations are only appends, the caller writes
    /// them itself, with one `write`, and the acknowledgements complete before this
    /// returns: no hand-off to the committer thread and back. Otherwise (an fsync is
    /// due with the write, a segment is created or removed, or a batch is being
    /// written) the committer thread is woken to do it.
    pub fn commit_now(&self) {
        let state = self.shared.lock();
        let inline = !state.committing
            && !state.closed
            && state.poison.is_none()
            && !state.force_sync
            && state.config.fsync != Fsync::Always
            && state.log.has_ops()
            && state.log.only_appends();
        // The committer is woken after the lock is let go, so that it does not find the
        // lock held, sleep on it and need a second wake.
        let state = if inline {
            self.shared.commit(state)
        } else {
            state
        };
        // (inline: queued while the batch was written; the committer takes them)
        let wake = state.log.has_ops();
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    async fn publish_inner(
        &self,
        subject: &str,
        headers: &[(&str, &[u8])],
        payload: &[u8],
        options: &Publish,
        deferred: bool,
    ) -> Result<AckFuture, StoreError> {
        let mut healed = false;
        loop {
            match self.enqueue(subject, headers, payload, options, true, deferred) {
                Err(StoreError::Poisoned { .. }) if !healed => {
                    self.heal(false).await?;
                    healed = true;
                }
                Ok((inner, duplicate)) => {
                    return Ok(AckFuture {
                        inner,
                        stream: self.shared.name.clone(),
                        duplicate,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores a message without waiting for it to be durable: what a plain publish on
    /// the bus gets when a stream captures its subject. Returns its sequence, and
    /// whether it was a duplicate (then the sequence is the original's).
    pub fn store(
        &self,
        subject: &str,
        headers: &[(&str, &[u8])],
        payload: &[u8],
    ) -> Result<PubAck, StoreError> {
        match self
            .enqueue(subject, headers, payload, &Publish::default(), false, false)?
            .0
        {
            AckInner::Ready(Some(result)) => result,
            _ => unreachable!("a store without an acknowledgement is answered at once"),
        }
    }

    fn enqueue(
        &self,
        subject: &str,
        headers: &[(&str, &[u8])],
        payload: &[u8],
        options: &Publish,
        acknowledge: bool,
        deferred: bool,
    ) -> Result<(AckInner, bool), StoreError> {
        let shared = &self.shared;
        let name = &shared.name;
        crate::subject::validate_subject(subject)
            .map_err(|e| StoreError::InvalidMessage(e.to_string()))?;
        if let Some((long, _)) = headers
            .iter()
            .find(|(n, _)| n.is_empty() || n.len() > MAX_HEADER_NAME)
        {
            return Err(StoreError::InvalidMessage(format!(
                "a header name must be 1 to {MAX_HEADER_NAME} bytes long, not {}",
                long.len()
            )));
        }
        let from_header = headers
            .iter()
            .find(|(n, _)| *n == MSG_ID_HEADER)
            .map(|(_, v)| *v);
        let msg_id = match (&options.msg_id, from_header) {
            (Some(id), _) => Some(id.as_str()),
            (None, Some(id)) => Some(std::str::from_utf8(id).map_err(|_| {
                StoreError::InvalidMessage(format!("{MSG_ID_HEADER} header is not UTF-8"))
            })?),
            (None, None) => None,
        };
        if let Some(id) = msg_id
            && id.len() > MAX_MSG_ID_LEN
        {
            return Err(StoreError::InvalidMessage(format!(
                "a {MSG_ID_HEADER} may be at most {MAX_MSG_ID_LEN} bytes long, not {}",
                id.len()
            )));
        }
        let deliver_at = match (options.deliver_at, options.delay) {
            (Some(at), _) => Some(at),
            (None, Some(delay)) => Some(shared.clock.now().saturating_add(nanos(delay))),
            (None, None) => None,
        };
        // sized once (an entry is a u16 and a u32 length, its name and its value): the
        // block is built for every publish
        let entry = |name: &str, value: usize| 6 + name.len() + value;
        let capacity = headers
            .iter()
            .filter(|(n, _)| *n != MSG_ID_HEADER)
            .map(|(n, v)| entry(n, v.len()))
            .sum::<usize>()
            + msg_id.map_or(0, |id| entry(MSG_ID_HEADER, id.len()))
            + deliver_at.map_or(0, |_| entry(crate::message::DELIVER_AT_HEADER, 20));
        let mut block = Vec::with_capacity(capacity);
        record::encode_headers(
            &mut block,
            headers.iter().filter(|(n, _)| *n != MSG_ID_HEADER).copied(),
        );
        if let Some(id) = msg_id {
            record::encode_headers(&mut block, [(MSG_ID_HEADER, id.as_bytes())]);
        }
        if let Some(at) = deliver_at {
            record::encode_headers(
                &mut block,
                [(crate::message::DELIVER_AT_HEADER, at.to_string().as_bytes())],
            );
        }
        let mut guard = lock(&shared.state);
        let state = &mut *guard;
        if state.closed {
            return Err(StoreError::Closed(name.to_string()));
        }
        if let Some(poison) = &state.poison {
            let error = StoreError::Poisoned {
                stream: name.to_string(),
                cause: poison.cause.clone(),
            };
            if !acknowledge {
                state.heal_requested = true;
                shared.wake.notify_one();
            }
            return Err(error);
        }
        let config = &state.config;
        let size = subject.len() + block.len() + payload.len();
        if size > config.max_msg_size as usize {
            return Err(limit(name, "max_msg_size", u64::from(config.max_msg_size)));
        }
        let now = shared.clock.now();
        // the id's hash, computed once for the lookup and the insert (the window is
        // not rebuilt while the lock is held)
        let msg_id = msg_id.map(|id| (id, state.log.dedup.key(id)));
        if let Some((id, key)) = msg_id {
            state.log.dedup.expire(now);
            if let Some(seq) = state.log.dedup.get_keyed(id, key, now) {
                let ack = PubAck {
                    stream: String::from(&**name),
                    seq,
                    duplicate: true,
                };
                if seq <= state.visible || !acknowledge {
                    return Ok((AckInner::Ready(Some(Ok(ack))), true));
                }
                let (tx, rx) = oneshot::channel();
                state.waiters.push(Waiter {
                    ticket: state.ticket,
                    ack,
                    tx: Some(tx),
                });
                return Ok((AckInner::Waiting(rx), true));
            }
        }
        check_expectations(name, &state.log, subject, options)?;
        let record_len = record::HEADER_LEN as u64 + size as u64;
        if let Some(max) = config.max_bytes
            && record_len > max
        {
            return Err(limit(name, "max_bytes", max));
        }
        if config.discard == Discard::New {
            let counts = state.log.counts();
            if let Some(max) = config.max_msgs
                && counts.msgs >= max
            {
                return Err(limit(name, "max_msgs", max));
            }
            if let Some(max) = config.max_bytes
                && counts.bytes + record_len > max
            {
                return Err(limit(name, "max_bytes", max));
            }
            if let Some(max) = config.max_msgs_per_subject
                && state.log.msgs_of(subject) >= max
            {
                return Err(limit(name, "max_msgs_per_subject", max));
            }
        }
        if let Some(max_age) = config.max_age
            && now - state.last_expiry >= nanos(Duration::from_secs(1)).min(nanos(max_age))
        {
            state.last_expiry = now;
            if let Err(e) = state
                .log
                .expire(now.saturating_sub(nanos(max_age)), state.visible)
            {
                tracing::warn!(stream = %name, "removing expired messages: {e}");
            }
        }
        let (discard, per_subject) = (config.discard, config.max_msgs_per_subject);
        // The committer takes every pending write once it wakes, and looks again before
        // it waits: only the first write of a batch needs to wake it (a wake is a syscall).
        let wake = !deferred && !state.log.has_ops();
        let seq = state.log.append(subject, &block, payload, now, msg_id)?;
        if discard == Discard::Old {
            state.trim();
            if let Some(max) = per_subject {
                while state.log.msgs_of(subject) > max {
                    let oldest = state.log.first_of(subject).expect("msgs > 0");
                    state.log.delete(oldest);
                }
            }
        }
        state.ticket += 1;
        // Copied, not formatted: `to_string` on an `Arc<str>` goes through `core::fmt`
        // and grows the string from empty. That was about 330 of the broker's
        // instructions per publish; copied, `enqueue` takes 152 fewer (callgrind,
        // `js_pub_async` 1 KiB).
        let ack = PubAck {
            stream: String::from(&**name),
            seq,
            duplicate: false,
        };
        let inner = if acknowledge {
            let (tx, rx) = oneshot::channel();
            state.waiters.push(Waiter {
                ticket: state.ticket,
                ack,
                tx: Some(tx),
            });
            AckInner::Waiting(rx)
        } else {
            AckInner::Ready(Some(Ok(ack)))
        };
        if wake {
            // after the lock is let go: the committer, woken, takes it at once rather
            // than finding it held, sleeping on it and being woken a second time
            drop(guard);
            shared.wake.notify_one();
        }
        Ok((inner, false))
    }

    /// Waits for the committer to recover a poisoned stream.
    /// `force`: attempt it even if the backoff does not allow one yet (a delete,
    /// purge or update; publishes do not force).
    pub(crate) async fn heal(&self, force: bool) -> Result<(), StoreError> {
        let rx = {
            let mut state = lock(&self.shared.state);
            if state.closed {
                return Err(StoreError::Closed(self.shared.name.to_string()));
            }
            if state.poison.is_none() {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            state.heal_waiters.push(tx);
            state.heal_forced |= force;
            self.shared.wake.notify_one();
            rx
        };
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Closed(self.shared.name.to_string())))
    }

    /// Applies `change` to the log now and queues its writes; returns its value and,
    /// if it wrote anything, what [`Stream::settle`] waits on.
    fn change_now<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, StoreError>,
    ) -> Result<(T, Option<Settled>), StoreError> {
        let mut state = lock(&self.shared.state);
        if state.closed {
            return Err(StoreError::Closed(self.shared.name.to_string()));
        }
        if let Some(poison) = &state.poison {
            return Err(StoreError::Poisoned {
                stream: self.shared.name.to_string(),
                cause: poison.cause.clone(),
            });
        }
        let value = change(&mut state)?;
        if !state.log.has_ops() {
            return Ok((value, None));
        }
        state.ticket += 1;
        let (tx, rx) = oneshot::channel();
        let ack = PubAck {
            stream: self.shared.name.to_string(),
            seq: 0,
            duplicate: false,
        };
        let ticket = state.ticket;
        state.waiters.push(Waiter {
            ticket,
            ack,
            tx: Some(tx),
        });
        // after the lock is let go, as in `enqueue`
        drop(state);
        self.shared.wake.notify_one();
        Ok((value, Some(Settled(rx))))
    }

    /// Waits until the writes of a change are durable.
    pub(crate) async fn settle(&self, settled: Option<Settled>) -> Result<(), StoreError> {
        let Some(Settled(rx)) = settled else {
            return Ok(());
        };
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Closed(self.shared.name.to_string())),
        }
    }

    /// Applies `change` and waits until it is durable.
    async fn change<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.heal(true).await?;
        let (value, settled) = self.change_now(change)?;
        self.settle(settled).await?;
        Ok(value)
    }

    /// Removes every message (`None`) or those whose subject matches `filter`;
    /// returns how many. Sequences go on from where they were.
    pub async fn purge(&self, filter: Option<&str>) -> Result<u64, StoreError> {
        if let Some(filter) = filter {
            crate::subject::validate_filter(filter)
                .map_err(|e| StoreError::InvalidConfig(e.to_string()))?;
        }
        self.change(|state| state.log.purge(filter)).await
    }

    /// Removes message `seq`; false if it was not stored.
    pub async fn delete_message(&self, seq: u64) -> Result<bool, StoreError> {
        self.change(|state| Ok(seq <= state.visible && state.log.delete(seq)))
            .await
    }

    /// Replaces the configuration (same name; limits apply at once) and queues its
    /// record; [`Stream::settle`] waits for it.
    pub(crate) fn update_now(&self, config: StreamConfig) -> Result<Option<Settled>, StoreError> {
        let ((), settled) = self.change_now(|state| {
            if state.config.fsync == Fsync::Always && state.log.has_ops() {
                // what was queued under `always` is synced before it is acknowledged
                state.force_sync = true;
            }
            state.log.set_config(&config);
            state.log.dedup.window = nanos(config.duplicate_window);
            state.config = config;
            state.trim(); // lowered limits apply at once, whatever the discard policy
            if let Some(max) = state.config.max_msgs_per_subject {
                for subject in state.log.subjects_over(max) {
                    while state.log.msgs_of(&subject) > max {
                        let oldest = state.log.first_of(&subject).expect("msgs > max");
                        state.log.delete(oldest);
                    }
                }
            }
            Ok(())
        })?;
        Ok(settled)
    }

    /// Raises `flag` whenever recovery changes the configuration (undoing an update
    /// whose write failed).
    pub(crate) fn watch_config(&self, flag: Arc<std::sync::atomic::AtomicBool>) {
        let _ = self.shared.config_changed.set(flag);
    }

    /// Damage that recovery found and skipped when the stream was opened (or last
    /// recovered), each naming its file and offset. Nothing of it is served.
    pub fn damage(&self) -> Vec<StoreError> {
        lock(&self.shared.damage).clone()
    }

    /// The message with sequence `seq`, once durable.
    pub fn get(&self, seq: u64) -> Result<StoredMessage, StoreError> {
        let spans = {
            let state = lock(&self.shared.state);
            if seq == 0 || seq > state.visible {
                return Err(self.no_message(seq));
            }
            state.log.locate(seq, seq, 1, usize::MAX)
        };
        let mut messages = log::read_spans(spans)?;
        match messages.pop() {
            Some(message) if message.seq == seq => Ok(message),
            _ => Err(self.no_message(seq)),
        }
    }

    /// The last durable message on `subject` (a literal subject), found without a scan.
    pub fn last(&self, subject: &str) -> Result<StoredMessage, StoreError> {
        let seq = {
            let state = lock(&self.shared.state);
            state.log.last_of_upto(subject, state.visible)
        };
        match seq {
            Some(seq) => self.get(seq),
            None => Err(StoreError::NoMessageOnSubject {
                stream: self.shared.name.to_string(),
                subject: subject.to_owned(),
            }),
        }
    }

    /// Up to `max_msgs` durable messages from sequence `from` on, at most `max_bytes`
    /// of records (but at least one message), read with one `pread` per segment.
    pub fn range(
        &self,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let spans = {
            let state = lock(&self.shared.state);
            state.log.locate(from, state.visible, max_msgs, max_bytes)
        };
        log::read_spans(spans)
    }

    /// The configuration and counts.
    pub fn info(&self) -> StreamInfo {
        let state = lock(&self.shared.state);
        let counts = state.log.counts();
        StreamInfo {
            config: state.config.clone(),
            state: StreamState {
                msgs: counts.msgs,
                bytes: counts.bytes,
                first_seq: counts.first_seq,
                last_seq: counts.last_seq,
                subjects: counts.subjects,
                deleted: counts.deleted,
                segments: counts.segments,
                last_time: state.log.last_time(),
            },
        }
    }

    /// The configuration.
    pub fn config(&self) -> StreamConfig {
        lock(&self.shared.state).config.clone()
    }

    /// The stream's retention policy ([`StreamConfig::retention`]).
    pub(crate) fn retention(&self) -> crate::config::Retention {
        lock(&self.shared.state).config.retention
    }

    /// Whether `subject` is one this stream captures.
    pub fn captures(&self, subject: &str) -> bool {
        lock(&self.shared.state)
            .config
            .subjects
            .iter()
            .any(|filter| crate::subject::matches(filter, subject))
    }

    /// Stops the committer after it has written (and synced) everything queued.
    pub(crate) fn close(&self) {
        let consumers = std::mem::take(&mut *lock(&self.shared.consumers));
        for consumer in consumers.values() {
            consumer.close();
        }
        lock(&self.shared.state).closed = true;
        self.shared.wake.notify_all();
        let handle = lock(&self.shared.committer).take();
        if let Some(handle) = handle
            && handle.thread().id() != std::thread::current().id()
        {
            let _ = handle.join();
        }
    }

    /// The stream's directory.
    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.shared.dir
    }

    pub(crate) fn fs(&self) -> &Arc<dyn Fs> {
        &self.shared.fs
    }

    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    /// Waits for sequences beyond the last readable one.
    pub(crate) fn arrivals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.arrivals.subscribe()
    }

    /// The last readable sequence.
    pub(crate) fn visible(&self) -> u64 {
        lock(&self.shared.state).visible
    }

    pub(crate) fn consumers(
        &self,
    ) -> MutexGuard<'_, std::collections::BTreeMap<String, crate::consumer::Consumer>> {
        lock(&self.shared.consumers)
    }

    /// The newest readable message whose subject matches one of `filters` (any, when
    /// empty), found from the subject index without a scan of the log.
    pub(crate) fn last_matching(&self, filters: &[String]) -> Option<u64> {
        let state = lock(&self.shared.state);
        if filters.is_empty() {
            return state.log.last_of_any_upto(state.visible);
        }
        state
            .log
            .subject_names()
            .filter(|s| filters.iter().any(|f| crate::subject::matches(f, s)))
            .filter_map(|s| state.log.last_of_upto(s, state.visible))
            .max()
    }

    /// Whether `seq` is the newest message of its subject among sequences up to `upto`.
    pub(crate) fn is_last_of_subject(&self, seq: u64, subject: &str, upto: u64) -> bool {
        let state = lock(&self.shared.state);
        state.log.last_of_upto(subject, upto) == Some(seq)
    }

    /// The first message stored at or after `time` (ns since the epoch), by binary
    /// search over the readable messages.
    pub(crate) fn first_at_or_after(&self, time: i64) -> Result<u64, StoreError> {
        let (mut lo, mut hi) = {
            let state = lock(&self.shared.state);
            (state.log.counts().first_seq, state.visible + 1)
        };
        // invariant: every message below `lo` is older than `time`, and from `hi` on
        // every message is at or after it (messages are stored in time order)
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.range(mid, 1, usize::MAX)?.first() {
                Some(m) if m.seq < hi && m.time < time => lo = m.seq + 1,
                // none in mid..m.seq, and m is at or after `time`; or none from mid on
                _ => hi = mid,
            }
        }
        // `lo` may be a removed sequence; reading from it finds the first message
        Ok(lo)
    }

    /// Removes message `seq` without waiting for the removal to be durable (a consumer's
    /// retention: it was acknowledged); false if it was not stored.
    pub(crate) fn remove_now(&self, seq: u64) -> Result<bool, StoreError> {
        let (removed, _settled) =
            self.change_now(|state| Ok(seq <= state.visible && state.log.delete(seq)))?;
        Ok(removed)
    }

    fn no_message(&self, seq: u64) -> StoreError {
        StoreError::NoMessage {
            stream: self.shared.name.to_string(),
            seq,
        }
    }
}

fn limit(stream: &str, limit: &'static str, value: u64) -> StoreError {
    StoreError::LimitReached {
        stream: stream.to_owned(),
        limit,
        value,
    }
}

fn check_expectations(
    stream: &str,
    log: &Log,
    subject: &str,
    options: &Publish,
) -> Result<(), StoreError> {
    let wrong = |what: String, expected: String, found: String| StoreError::WrongLast {
        stream: stream.to_owned(),
        what,
        expected,
        found,
    };
    if let Some(expected) = options.expected_last_seq {
        let found = log.next_seq() - 1;
        if found != expected {
            return Err(wrong(
                "last sequence".into(),
                expected.to_string(),
                found.to_string(),
            ));
        }
    }
    if let Some(expected) = options.expected_last_subject_seq {
        let found = log.last_of(subject).unwrap_or(0);
        if found != expected {
            return Err(wrong(
                format!("last sequence on `{subject}`"),
                expected.to_string(),
                found.to_string(),
            ));
        }
    }
    if let Some(expected) = &options.expected_last_msg_id {
        let found = log.last_msg_id();
        if found != Some(expected.as_str()) {
            return Err(wrong(
                "last message id".into(),
                format!("`{expected}`"),
                found.map_or_else(|| "none".to_owned(), |id| format!("`{id}`")),
            ));
        }
    }
    Ok(())
}

impl State {
    /// Adds `files` to those the periodic sync or the close will sync, each once.
    fn remember_unsynced(&mut self, files: Vec<Written>) {
        for (file, path) in files {
            if !self.unsynced.iter().any(|(f, _)| Arc::ptr_eq(f, &file)) {
                self.unsynced.push((file, path));
            }
        }
    }

    /// Removes the oldest messages while the stream holds more than its `max_msgs` or
    /// `max_bytes`.
    fn trim(&mut self) {
        let (max_msgs, max_bytes) = (self.config.max_msgs, self.config.max_bytes);
        loop {
            let counts = self.log.counts();
            let over = max_msgs.is_some_and(|max| counts.msgs > max)
                || max_bytes.is_some_and(|max| counts.bytes > max);
            if !over || !self.log.remove_oldest() {
                return;
            }
        }
    }
}

/// What waits for a change's writes to be durable.
#[derive(Debug)]
pub(crate) struct Settled(oneshot::Receiver<Result<PubAck, StoreError>>);

/// A file written to, with its path for errors.
type Written = (Arc<dyn File>, PathBuf);

/// What a batch wrote, to truncate if it fails.
struct Batch {
    first_writes: Vec<(Arc<dyn File>, PathBuf, u64)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Writes the pending operations as one batch (the caller has checked that there
    /// are some, that the stream is not poisoned and that no batch is being written),
    /// then completes the acknowledgements it holds. The lock is let go while the batch
    /// is written and while the waiters are woken.
    fn commit<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.committing = true;
        let ops = state.log.take_ops();
        let ticket = state.ticket;
        let upto = state.log.next_seq() - 1;
        let fsync = if std::mem::take(&mut state.force_sync) {
            Fsync::Always
        } else {
            state.config.fsync
        };
        // Files left unsynced (segments sealed under `Every(d)` or `Never`) are synced
        // with this batch when it is synced (`Always`, after an update to it: what is
        // acknowledged then is never behind an unsynced segment) or removes a segment
        // (what says its messages are gone may sit in one of them).
        let removes = ops.iter().any(|op| matches!(op, Op::Remove { .. }));
        let carried = if fsync == Fsync::Always || removes {
            std::mem::take(&mut state.unsynced)
        } else {
            Vec::new()
        };
        drop(state);
        let mut batch = Batch {
            first_writes: Vec::new(),
        };
        let result = self.execute(ops, fsync, &mut batch, &carried);
        state = self.lock();
        let completed = match result {
            Ok(written) => {
                let visible_before = state.visible;
                state.visible = state.visible.max(upto);
                if upto > visible_before {
                    self.arrivals.send_replace(state.visible);
                }
                state.done = ticket;
                // Messages reached the disk again (not just recovery's own new
                // segment): a later failure is recovered from at once.
                if upto > visible_before {
                    match fsync {
                        Fsync::Every(_) => state.backoff.reset_on_sync = true,
                        Fsync::Always | Fsync::Never => state.backoff = HealBackoff::default(),
                    }
                }
                if fsync != Fsync::Always {
                    state.remember_unsynced(written);
                }
                // taken out in place: the waiting keep the list and its room, and the
                // done are collected once (a partition into two new lists, then a third
                // for the completions, cost three allocations per commit)
                state
                    .waiters
                    .extract_if(.., |w| w.ticket <= ticket)
                    .map(|w| (w, None))
                    .collect::<Vec<_>>()
            }
            Err(error) => {
                // not synced after all: still for the periodic sync or the close
                state.remember_unsynced(carried);
                self.poison(&mut state, error, batch.first_writes)
            }
        };
        state.committing = false;
        drop(state);
        complete(completed);
        self.lock()
    }

    /// The committer thread.
    fn run(self: Arc<Self>) {
        let mut state = self.lock();
        loop {
            if state.committing {
                // a caller is writing a batch (`Stream::commit_now`, microseconds):
                // nothing else happens until it is done
                state = self
                    .wake
                    .wait_timeout(state, Duration::from_millis(1))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            if let Fsync::Every(every) = state.config.fsync
                && !state.unsynced.is_empty()
                && state.last_sync.elapsed() >= every
            {
                state = self.sync_unsynced(state);
            }
            if state.poison.is_none() && state.log.has_ops() {
                state = self.commit(state);
                continue;
            }
            let now = self.clock.now();
            let asked = !state.heal_waiters.is_empty() || state.heal_requested;
            if asked && state.poison.is_some() && (state.backoff.due(now) || state.heal_forced) {
                state.heal_forced = false;
                let started = Instant::now();
                let result = self.heal(&mut state);
                state
                    .backoff
                    .attempted(now, started.elapsed(), self.clock.now());
                let waiters = std::mem::take(&mut state.heal_waiters);
                for tx in waiters {
                    let _ = tx.send(result.clone());
                }
                continue;
            }
            if !state.heal_waiters.is_empty() {
                // Not due (or no longer poisoned): answer at once rather than re-read
                // the log for every caller.
                let result = match &state.poison {
                    Some(poison) => Err(StoreError::Poisoned {
                        stream: self.name.to_string(),
                        cause: format!(
                            "{}; recovery is next tried in {} ms",
                            poison.cause,
                            state.backoff.wait(now).as_millis()
                        ),
                    }),
                    None => Ok(()),
                };
                for tx in std::mem::take(&mut state.heal_waiters) {
                    let _ = tx.send(result.clone());
                }
                continue;
            }
            if state.closed {
                if !state.unsynced.is_empty() {
                    state = self.sync_unsynced(state);
                }
                let closed = StoreError::Closed(self.name.to_string());
                for tx in std::mem::take(&mut state.heal_waiters) {
                    let _ = tx.send(Err(closed.clone()));
                }
                let waiters = std::mem::take(&mut state.waiters);
                drop(state);
                let closed = StoreError::Closed(self.name.to_string());
                complete(
                    waiters
                        .into_iter()
                        .map(|w| (w, Some(closed.clone())))
                        .collect(),
                );
                return;
            }
            // Idle: wait for work or the next timer.
            let mut timeout = Duration::from_secs(1);
            if state.heal_requested && state.poison.is_some() {
                let wait = state.backoff.wait(self.clock.now());
                timeout = timeout.min(wait.max(Duration::from_millis(1)));
            }
            if let Fsync::Every(every) = state.config.fsync
                && !state.unsynced.is_empty()
            {
                let due = state.last_sync + every;
                timeout = timeout.min(due.saturating_duration_since(Instant::now()));
                if timeout.is_zero() {
                    state = self.sync_unsynced(state);
                    continue;
                }
            }
            let (guard, waited) = self
                .wake
                .wait_timeout(state, timeout)
                .unwrap_or_else(PoisonError::into_inner);
            state = guard;
            if waited.timed_out()
                && let Some(max_age) = state.config.max_age
                && state.poison.is_none()
            {
                let now = self.clock.now();
                state.last_expiry = now;
                let visible = state.visible;
                if let Err(e) = state
                    .log
                    .expire(now.saturating_sub(nanos(max_age)), visible)
                {
                    tracing::warn!(stream = %self.name, "removing expired messages: {e}");
                }
            }
        }
    }

    /// Performs a batch's operations: each write, then one `fdatasync` per file under
    /// `Fsync::Always`, then the directory sync. Returns the files written.
    fn execute(
        &self,
        ops: Vec<Op>,
        fsync: Fsync,
        batch: &mut Batch,
        carried: &[Written],
    ) -> Result<Vec<Written>, StoreError> {
        for op in &ops {
            if let Op::Write {
                file, path, offset, ..
            } = op
                && !batch
                    .first_writes
                    .iter()
                    .any(|(f, _, _)| Arc::ptr_eq(f, file))
            {
                batch
                    .first_writes
                    .push((file.clone(), path.clone(), *offset));
            }
        }
        let mut written: Vec<Written> = Vec::new();
        let mut ends: Vec<(Arc<dyn File>, u64)> = Vec::new();
        let mut sync_dir = false;
        // A directory sync is due before the next removal (a segment was created).
        let mut created = false;
        let sync = |written: &[Written]| -> Result<(), StoreError> {
            for (file, path) in written {
                file.sync_data()
                    .map_err(|e| StoreError::io("fsync", path, e))?;
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Write {
                    file,
                    path,
                    offset,
                    bytes,
                } => {
                    file.write_all_at(&bytes, offset)
                        .map_err(|e| StoreError::io("write", &path, e))?;
                    let end = offset + bytes.len() as u64;
                    if let Some(at) = ends.iter_mut().find(|(f, _)| Arc::ptr_eq(f, &file)) {
                        at.1 = at.1.max(end);
                    } else {
                        ends.push((file.clone(), end));
                    }
                    if !written.iter().any(|(f, _)| Arc::ptr_eq(f, &file)) {
                        written.push((file, path));
                    }
                }
                Op::Remove { path } => {
                    // What says the segment's messages are gone must be durable first,
                    // with the name of a segment it was written into (created in this
                    // batch); once it is, a later failure of the batch must not cut it
                    // away.
                    sync(carried)?;
                    sync(&written)?;
                    if std::mem::take(&mut created) {
                        self.fs
                            .sync_dir(&self.dir)
                            .map_err(|e| StoreError::io("sync directory", &self.dir, e))?;
                    }
                    for (file, end) in &ends {
                        if let Some(first) = batch
                            .first_writes
                            .iter_mut()
                            .find(|(f, _, _)| Arc::ptr_eq(f, file))
                        {
                            first.2 = *end;
                        }
                    }
                    match self.fs.remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(StoreError::io("remove", &path, e)),
                    }
                    sync_dir = true;
                }
                Op::Sync { file, path } => {
                    file.sync_data()
                        .map_err(|e| StoreError::io("fsync", &path, e))?;
                }
                Op::SyncDir => {
                    sync_dir = true;
                    created = true;
                }
            }
        }
        if fsync == Fsync::Always {
            sync(carried)?;
            sync(&written)?;
        }
        if sync_dir {
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| StoreError::io("sync directory", &self.dir, e))?;
        }
        Ok(written)
    }

    /// Syncs the files written since the last sync (`Fsync::Every` and `Never` on close).
    fn sync_unsynced<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let files = std::mem::take(&mut state.unsynced);
        drop(state);
        let mut result = Ok(());
        for (file, path) in &files {
            if let Err(e) = file.sync_data() {
                result = Err(StoreError::io("fsync", path, e));
                break;
            }
        }
        let mut state = self.lock();
        state.last_sync = Instant::now();
        if result.is_ok() && state.backoff.reset_on_sync {
            state.backoff = HealBackoff::default();
        }
        if let Err(error) = result {
            // Acknowledged already (that is what this setting means): nothing to cut back.
            tracing::error!(stream = %self.name, "{error}; acknowledged messages may not be on disk");
            let failed = self.poison(&mut state, error, Vec::new());
            drop(state);
            complete(failed);
            state = self.lock();
        }
        state
    }

    /// Fails the batch and everything queued behind it.
    fn poison(
        &self,
        state: &mut State,
        error: StoreError,
        truncate: Vec<(Arc<dyn File>, PathBuf, u64)>,
    ) -> Vec<(Waiter, Option<StoreError>)> {
        tracing::error!(stream = %self.name, "{error}; unacknowledged writes are discarded");
        state.log.discard_ops();
        let unacknowledged = state.log.next_seq() - 1 - state.visible;
        if unacknowledged > 0 {
            tracing::warn!(
                stream = %self.name,
                messages = unacknowledged,
                "messages were not stored (publishers with acknowledgements get the error)"
            );
        }
        // Cut the failed writes off now (shrinking needs no space): nothing of them
        // may be read back, even after a restart. What cannot be cut yet is kept, with
        // what an earlier failure could not cut, for recovery to try again.
        let mut pending: Vec<(Arc<dyn File>, PathBuf, u64)> =
            state.poison.take().map(|p| p.truncate).unwrap_or_default();
        for (file, path, offset) in truncate {
            match pending.iter_mut().find(|(f, _, _)| Arc::ptr_eq(f, &file)) {
                Some(earlier) => earlier.2 = earlier.2.min(offset),
                None => pending.push((file, path, offset)),
            }
        }
        pending.retain(|(file, path, offset)| {
            match file.set_len(*offset).and_then(|()| file.sync_data()) {
                Ok(()) => false,
                Err(e) => {
                    tracing::warn!(file = %path.display(), "cutting off a failed write: {e}; recovery will try again");
                    true
                }
            }
        });
        state.poison = Some(Poison {
            cause: error.to_string(),
            truncate: pending,
        });
        let failed: Vec<(Waiter, Option<StoreError>)> = state
            .waiters
            .drain(..)
            .map(|w| (w, Some(error.clone())))
            .collect();
        // Recovery waits until something asks for it (a publish, or a plain store on
        // the idle timer): retrying at once would spin on a full disk.
        failed
    }

    /// Recovers from a failed write: cuts each file back to the end of what was
    /// acknowledged, reads the log back from disk, starts a new segment.
    fn heal(&self, state: &mut State) -> Result<(), StoreError> {
        let Some(poison) = &state.poison else {
            return Ok(());
        };
        let cause = poison.cause.clone();
        let truncate = poison.truncate.clone();
        state.heal_requested = false;
        let failed = |e: StoreError| StoreError::Poisoned {
            stream: self.name.to_string(),
            cause: format!("{cause}; recovering: {e}"),
        };
        for (file, path, offset) in &truncate {
            file.set_len(*offset)
                .and_then(|()| file.sync_data())
                .map_err(|e| failed(StoreError::io("truncate", path, e)))?;
        }
        let since = self.clock.now().saturating_sub(nanos(MAX_DUPLICATE_WINDOW));
        let recovered = Log::open(self.fs.clone(), &self.dir, since).map_err(failed)?;
        // Whatever the failed batch left undone in the directory (a removal, a new
        // segment's entry) is made durable before anything more is acknowledged.
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| failed(StoreError::io("sync directory", &self.dir, e)))?;
        *lock(&self.damage) = recovered.damage;
        // What is on disk is the state from here on, even if the new segment fails.
        let mut log = recovered.log;
        match recovered.config {
            Some(config) if config != state.config => {
                // an update whose write failed is undone
                state.config = config;
                if let Some(flag) = self.config_changed.get() {
                    flag.store(true, std::sync::atomic::Ordering::Release);
                }
            }
            Some(_) => {}
            None => log.use_config(&state.config),
        }
        log.dedup = Dedup::rebuild(
            nanos(state.config.duplicate_window),
            recovered.msg_ids,
            self.clock.now(),
        );
        if log.next_seq() <= state.visible {
            tracing::error!(
                stream = %self.name,
                "acknowledged messages {}..={} are missing from disk; sequences go on after them",
                log.next_seq(),
                state.visible
            );
            log.continue_from(state.visible + 1);
        }
        state.visible = log.next_seq() - 1;
        self.arrivals.send_replace(state.visible);
        state.log = log;
        state.unsynced.clear();
        if let Some(poison) = &mut state.poison {
            poison.truncate.clear(); // done: the files end where the log does
        }
        state.log.roll().map_err(failed)?;
        state.poison = None;
        tracing::info!(stream = %self.name, "recovered after a failed write; continuing in a new segment");
        Ok(())
    }
}

/// When recovery from a failed write may next be tried, on the stream's clock: at
/// once after a failure, then [`HEAL_INTERVAL`] after that attempt, doubling to
/// [`MAX_HEAL_BACKOFF`], and never sooner than [`HEAL_COST_FACTOR`] times what the last
/// attempt took. Reset (to its default) once messages reach the disk again.
#[derive(Debug)]
struct HealBackoff {
    /// Attempts since the reset.
    attempts: u32,
    /// When the last attempt began (a clock set back before it makes the next due).
    last: i64,
    next: i64,
    /// Messages were written under `Every(d)` since the last attempt: reset once they
    /// are synced.
    reset_on_sync: bool,
}

impl Default for HealBackoff {
    fn default() -> Self {
        HealBackoff {
            attempts: 0,
            last: i64::MIN,
            next: i64::MIN,
            reset_on_sync: false,
        }
    }
}

impl HealBackoff {
    fn due(&self, now: i64) -> bool {
        now >= self.next || now < self.last
    }

    /// An attempt began at `began` and took `took`; it is `now`.
    fn attempted(&mut self, began: i64, took: Duration, now: i64) {
        self.attempts = self.attempts.saturating_add(1);
        let wait = HEAL_INTERVAL
            .saturating_mul(1 << (self.attempts - 1).min(5))
            .min(MAX_HEAL_BACKOFF)
            .max(took.saturating_mul(HEAL_COST_FACTOR));
        self.last = began;
        self.next = now.saturating_add(nanos(wait));
    }

    /// How long from `now` until the next attempt is due.
    fn wait(&self, now: i64) -> Duration {
        Duration::from_nanos(self.next.saturating_sub(now).max(0) as u64)
    }
}

fn complete(waiters: Vec<(Waiter, Option<StoreError>)>) {
    for (mut waiter, error) in waiters {
        if let Some(tx) = waiter.tx.take() {
            let _ = tx.send(match error {
                None => Ok(waiter.ack),
                Some(e) => Err(e),
            });
        }
    }
}
