//! A durable consumer's state file: what it has delivered and what is done with.
//!
//! ```text
//! <root>/streams/<stream>/consumers/<consumer>.con
//! ```
//!
//! The file starts with a 16-byte header (magic `COURCON\0`, version 1 as u32 LE,
//! CRC32C of the first 12 bytes as u32 LE), then records: body length (u32 LE),
//! CRC32C of the body (u32 LE), and the body, whose first byte is its kind:
//!
//! | kind | body after the kind byte |
//! | --- | --- |
//! | 1 config | JSON of the consumer's configuration and starting point |
//! | 2 snapshot | floor u64: the state is reset to it (the records after it restate the rest) |
//! | 3 delivered | n u32, n × (seq u64, deliveries u32) |
//! | 4 done | n u32, n × seq u64 |
//! | 5 floor | floor u64 |
//!
//! Replaying records is idempotent (done is a set, deliveries and the floor only
//! grow), so a snapshot may overlap records written after it. A writer thread appends
//! the records of every change queued since its last write in one `write`, followed
//! under [`Fsync::Always`] by one `fdatasync`: group commit again. Once the file holds
//! more than [`COMPACT_AT`] bytes beyond its last snapshot, it is rewritten as a new
//! file (config and snapshot), synced, and renamed over the old one.
//!
//! Every byte read back is checked. A record that does not verify ends the replay; the
//! state up to it is used (acknowledgements after it are forgotten, so those messages
//! are delivered again: never lost), the file is kept aside as `….con.damaged-<offset>`
//! and a fresh file is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::Fsync;
use crate::error::StoreError;
use crate::fs::{File, Fs};

const MAGIC: &[u8; 8] = b"COURCON\0";
const VERSION: u32 = 1;
const FILE_HEADER_LEN: usize = 16;
const RECORD_HEADER_LEN: usize = 8;

/// The largest record body accepted when reading (writers stay far below it).
pub(crate) const MAX_RECORD: usize = 64 * 1024 * 1024;
/// The largest state file read back (compaction keeps files far smaller).
pub(crate) const MAX_FILE: u64 = 1024 * 1024 * 1024;
/// Appended bytes past the last snapshot that make the writer compact the file.
pub(crate) const COMPACT_AT: u64 = 4 * 1024 * 1024;

const KIND_CONFIG: u8 = 1;
const KIND_SNAPSHOT: u8 = 2;
const KIND_DELIVERED: u8 = 3;
const KIND_DONE: u8 = 4;
const KIND_FLOOR: u8 = 5;

/// A consumer's durable state: everything at or below `floor` is done with, and so
/// is every sequence in `done`; `deliveries` counts the deliveries of the others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Persisted {
    pub(crate) floor: u64,
    pub(crate) done: BTreeSet<u64>,
    pub(crate) deliveries: BTreeMap<u64, u32>,
}

impl Persisted {
    fn apply_floor(&mut self, floor: u64) {
        if floor > self.floor {
            self.floor = floor;
            let above = floor.saturating_add(1);
            self.done = self.done.split_off(&above);
            self.deliveries = self.deliveries.split_off(&above);
            if floor == u64::MAX {
                self.done.clear();
                self.deliveries.clear();
            }
        }
    }

    /// Raises the floor to at least `floor`.
    pub(crate) fn raise_floor(&mut self, floor: u64) {
        self.apply_floor(floor);
    }

    fn apply_done(&mut self, seq: u64) {
        if seq > self.floor {
            self.done.insert(seq);
            self.deliveries.remove(&seq);
        }
    }

    fn apply_delivered(&mut self, seq: u64, count: u32) {
        if seq > self.floor && !self.done.contains(&seq) {
            let n = self.deliveries.entry(seq).or_insert(0);
            *n = (*n).max(count);
        }
    }
}

/// What reading a state file found.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) config: Vec<u8>,
    pub(crate) state: Persisted,
    /// Damage that ended the replay early, naming the file and offset.
    pub(crate) damage: Option<StoreError>,
}

fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

fn file_header() -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let c = crc(&h[..12]);
    h[12..].copy_from_slice(&c.to_le_bytes());
    h
}

fn push_record(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(body).to_le_bytes());
    out.extend_from_slice(body);
}

/// Entries per record of a snapshot: its records stay far below [`MAX_RECORD`].
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// How long the writer lets a consumer's changes gather once the first has woken it,
/// when no one waits for them to be durable: a busy consumer's deliveries and answers
/// then cost the writer one wake-up and one write per `GATHER`, and the tasks that
/// queue them no wake-up at all meanwhile, rather than one each per read. A change
/// someone waits for (a confirmed answer) ends the wait at once.
const GATHER: Duration = Duration::from_micros(200);

fn done_body(seqs: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + seqs.len() * 8);
    b.push(KIND_DONE);
    b.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for seq in seqs {
        b.extend_from_slice(&seq.to_le_bytes());
    }
    b
}

fn delivered_body(entries: &[(u64, u32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + entries.len() * 12);
    b.push(KIND_DELIVERED);
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (seq, n) in entries {
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
    }
    b
}

/// A snapshot: one snapshot record with the floor (which resets the state), then the
/// done sequences and delivery counts in records of at most [`SNAPSHOT_CHUNK`] entries.
fn push_snapshot(out: &mut Vec<u8>, state: &Persisted) {
    let mut b = Vec::with_capacity(9);
    b.push(KIND_SNAPSHOT);
    b.extend_from_slice(&state.floor.to_le_bytes());
    push_record(out, &b);
    let done: Vec<u64> = state.done.iter().copied().collect();
    for chunk in done.chunks(SNAPSHOT_CHUNK) {
        push_record(out, &done_body(chunk));
    }
    let deliveries: Vec<(u64, u32)> = state.deliveries.iter().map(|(&s, &n)| (s, n)).collect();
    for chunk in deliveries.chunks(SNAPSHOT_CHUNK) {
        push_record(out, &delivered_body(chunk));
    }
}

/// The bytes of a fresh state file: header, config, snapshot.
pub(crate) fn fresh_file(config: &[u8], state: &Persisted) -> Vec<u8> {
    let mut out = file_header().to_vec();
    let mut body = Vec::with_capacity(1 + config.len());
    body.push(KIND_CONFIG);
    body.extend_from_slice(config);
    push_record(&mut out, &body);
    push_snapshot(&mut out, state);
    out
}

/// A little-endian reader over a record body that fails instead of panicking.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, rest) = self.bytes.split_at_checked(N).ok_or_else(|| {
            format!(
                "record ends inside a field ({} bytes left)",
                self.bytes.len()
            )
        })?;
        self.bytes = rest;
        Ok(head.try_into().expect("split at N"))
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    /// A count of entries of `size` bytes each, checked against what is left.
    fn count(&mut self, size: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(size) > self.bytes.len() {
            return Err(format!(
                "a count of {n} entries does not fit the {} bytes left",
                self.bytes.len()
            ));
        }
        Ok(n)
    }
    fn end(&self) -> Result<(), String> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes after the record's fields",
                self.bytes.len()
            ))
        }
    }
}

fn apply(state: &mut Persisted, body: &[u8]) -> Result<(), String> {
    let (&kind, rest) = body.split_first().ok_or("an empty record")?;
    let mut c = Cursor { bytes: rest };
    match kind {
        KIND_SNAPSHOT => {
            // a reset: the done and delivered records after it restate the rest
            *state = Persisted {
                floor: c.u64()?,
                ..Persisted::default()
            };
            c.end()?;
        }
        KIND_DELIVERED => {
            for _ in 0..c.count(12)? {
                let seq = c.u64()?;
                let n = c.u32()?;
                state.apply_delivered(seq, n);
            }
            c.end()?;
        }
        KIND_DONE => {
            for _ in 0..c.count(8)? {
                state.apply_done(c.u64()?);
            }
            c.end()?;
        }
        KIND_FLOOR => {
            let floor = c.u64()?;
            c.end()?;
            state.apply_floor(floor);
        }
        KIND_CONFIG => return Err("a second configuration record".into()),
        other => return Err(format!("unknown record kind {other}")),
    }
    Ok(())
}

/// Reads a state file; `Ok(None)` if it holds no configuration (a creation that did
/// not complete). Damage after the configuration ends the replay and is reported.
pub(crate) fn load(fs: &dyn Fs, path: &Path) -> Result<Option<Loaded>, StoreError> {
    let file = fs
        .open(path, false)
        .map_err(|e| StoreError::io("open", path, e))?;
    let len = file.len().map_err(|e| StoreError::io("stat", path, e))?;
    if len > MAX_FILE {
        return Err(StoreError::corrupt(
            path,
            0,
            format!("a consumer state file of {len} bytes is over the limit of {MAX_FILE}"),
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| StoreError::io("read", path, e))?;
    if bytes.len() < FILE_HEADER_LEN || bytes[..FILE_HEADER_LEN] != file_header() {
        if bytes.len() < FILE_HEADER_LEN && file_header().starts_with(&bytes) {
            return Ok(None); // a torn first write
        }
        return Err(StoreError::corrupt(
            path,
            0,
            "not a consumer state file (bad header)",
        ));
    }
    let mut offset = FILE_HEADER_LEN;
    let mut config = None;
    let mut state = Persisted::default();
    let mut damage = None;
    while offset < bytes.len() {
        let record = read_record(&bytes, offset);
        let result = record.and_then(|body| {
            if config.is_none() {
                match body.split_first() {
                    Some((&KIND_CONFIG, json)) => {
                        config = Some(json.to_vec());
                        Ok(body.len())
                    }
                    _ => Err("the first record is not the configuration".to_string()),
                }
            } else {
                apply(&mut state, body).map(|()| body.len())
            }
        });
        match result {
            Ok(body_len) => offset += RECORD_HEADER_LEN + body_len,
            Err(reason) => {
                damage = Some(StoreError::corrupt(path, offset as u64, reason));
                break;
            }
        }
    }
    match config {
        Some(config) => Ok(Some(Loaded {
            config,
            state,
            damage,
        })),
        // files are written whole and renamed into place: a header without a readable
        // configuration is damage, not a creation that did not complete
        None => Err(damage.unwrap_or_else(|| {
            StoreError::corrupt(path, FILE_HEADER_LEN as u64, "no configuration record")
        })),
    }
}

fn read_record(bytes: &[u8], offset: usize) -> Result<&[u8], String> {
    let rest = &bytes[offset..];
    if rest.len() < RECORD_HEADER_LEN {
        return Err(format!(
            "{} bytes, too short for a record header",
            rest.len()
        ));
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let want = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len > MAX_RECORD {
        return Err(format!(
            "a record of {len} bytes is over the limit of {MAX_RECORD}"
        ));
    }
    let body = rest[RECORD_HEADER_LEN..]
        .get(..len)
        .ok_or_else(|| format!("a record of {len} bytes, but only {} left", rest.len() - 8))?;
    if crc(body) != want {
        return Err("checksum mismatch".into());
    }
    Ok(body)
}

/// Changes waiting for the writer.
#[derive(Debug, Default)]
struct Queue {
    delivered: Vec<(u64, u32)>,
    done: Vec<u64>,
    floor: Option<u64>,
    waiters: Vec<oneshot::Sender<Result<(), StoreError>>>,
    closed: bool,
    /// A write failed: the next batch rewrites the file whole.
    rewrite: bool,
}

impl Queue {
    /// Whether changes are queued for the file.
    fn has_changes(&self) -> bool {
        !self.delivered.is_empty() || !self.done.is_empty() || self.floor.is_some()
    }

    /// Nothing to write, and nobody waiting for a write.
    fn is_idle(&self) -> bool {
        !self.has_changes() && self.waiters.is_empty()
    }
}

/// Where the writer gets a consistent snapshot to compact into.
pub(crate) trait Snapshot: Send + Sync + 'static {
    fn snapshot(&self) -> Persisted;
}

/// The writer of one consumer's state file.
#[derive(Debug)]
pub(crate) struct Journal {
    shared: Arc<JShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct JShared {
    path: PathBuf,
    dir: PathBuf,
    fs: Arc<dyn Fs>,
    fsync: Mutex<Fsync>,
    config: Vec<u8>,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// When the writer compacts and how long it gathers.
    tuning: Tuning,
    /// The writer is letting changes gather (tests wait for it).
    #[cfg(test)]
    gathering: std::sync::atomic::AtomicBool,
}

/// The writer's thresholds: [`Tuning::DEFAULT`], or others in tests.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    /// Appended bytes past the last snapshot that make the writer compact.
    compact_at: u64,
    /// How long changes nobody waits for gather ([`GATHER`]).
    gather: Duration,
}

impl Tuning {
    const DEFAULT: Tuning = Tuning {
        compact_at: COMPACT_AT,
        gather: GATHER,
    };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Journal {
    /// Writes a fresh state file at `path` (replacing any), syncs it and its directory,
    /// and starts the writer.
    pub(crate) fn create(
        fs: Arc<dyn Fs>,
        path: PathBuf,
        fsync: Fsync,
        config: Vec<u8>,
        state: &Persisted,
        source: std::sync::Weak<dyn Snapshot>,
    ) -> Result<Journal, StoreError> {
        Journal::create_with(fs, path, fsync, config, state, source, Tuning::DEFAULT)
    }

    fn create_with(
        fs: Arc<dyn Fs>,
        path: PathBuf,
        fsync: Fsync,
        config: Vec<u8>,
        state: &Persisted,
        source: std::sync::Weak<dyn Snapshot>,
        tuning: Tuning,
    ) -> Result<Journal, StoreError> {
        let dir = path.parent().map(Path::to_owned).unwrap_or_default();
        fs.create_dir_all(&dir)
            .map_err(|e| StoreError::io("create directory", &dir, e))?;
        // the directory's own entry (the first consumer of a stream creates it)
        if let Some(parent) = dir.parent() {
            fs.sync_dir(parent)
                .map_err(|e| StoreError::io("sync directory", parent, e))?;
        }
        let (file, len) = write_fresh(&*fs, &path, &dir, &config, state)?;
        let shared = Arc::new(JShared {
            path,
            dir,
            fs,
            fsync: Mutex::new(fsync),
            config,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            tuning,
            #[cfg(test)]
            gathering: std::sync::atomic::AtomicBool::new(false),
        });
        let runner = shared.clone();
        let name = format!(
            "courier-consumer-{}",
            shared
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("?")
        );
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || runner.run(file, len, source))
            .map_err(|e| StoreError::io("spawn writer for", &shared.path, e))?;
        Ok(Journal {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues changes; `confirm` gets the result once they are durable (under the
    /// stream's fsync setting).
    pub(crate) fn queue(
        &self,
        delivered: &[(u64, u32)],
        done: &[u64],
        floor: Option<u64>,
        confirm: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) {
        let mut q = lock(&self.shared.queue);
        if q.closed {
            if let Some(tx) = confirm {
                let _ = tx.send(Err(StoreError::Closed(
                    self.shared.path.display().to_string(),
                )));
            }
            return;
        }
        // The writer takes everything queued once it wakes, and looks again before it
        // waits: only the first change of a batch needs to wake it (a wake is a syscall),
        // and one that is waited for (it may be gathering: see GATHER).
        let idle = q.is_idle();
        let waited_for = confirm.is_some();
        q.delivered.extend_from_slice(delivered);
        q.done.extend_from_slice(done);
        if floor.is_some() {
            q.floor = floor;
        }
        if let Some(tx) = confirm {
            q.waiters.push(tx);
        }
        if idle || waited_for {
            // after the lock is let go, so that the writer, woken, does not find it held
            drop(q);
            self.shared.wake.notify_one();
        }
    }

    pub(crate) fn set_fsync(&self, fsync: Fsync) {
        *lock(&self.shared.fsync) = fsync;
    }

    /// Writes what is queued and stops the writer.
    pub(crate) fn close(&self) {
        lock(&self.shared.queue).closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = lock(&self.thread).take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// Writes header, config and snapshot to `<path>.new`, syncs it, renames it over
/// `path` and syncs the directory. Returns the open file and its length.
fn write_fresh(
    fs: &dyn Fs,
    path: &Path,
    dir: &Path,
    config: &[u8],
    state: &Persisted,
) -> Result<(Arc<dyn File>, u64), StoreError> {
    let tmp = path.with_extension("con.new");
    let bytes = fresh_file(config, state);
    let _ = fs.remove_file(&tmp);
    let file = fs
        .open(&tmp, true)
        .map_err(|e| StoreError::io("create", &tmp, e))?;
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| StoreError::io("write", &tmp, e))?;
    fs.rename(&tmp, path)
        .map_err(|e| StoreError::io("rename", &tmp, e))?;
    fs.sync_dir(dir)
        .map_err(|e| StoreError::io("sync directory", dir, e))?;
    Ok((file, bytes.len() as u64))
}

impl JShared {
    /// Waits for a wake-up, or `left` at most.
    fn wait_at_most<'a>(&self, q: MutexGuard<'a, Queue>, left: Duration) -> MutexGuard<'a, Queue> {
        self.wake
            .wait_timeout(q, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    fn run(&self, mut file: Arc<dyn File>, mut len: u64, source: std::sync::Weak<dyn Snapshot>) {
        let mut since_snapshot = 0u64;
        // a large snapshot is not rewritten more often than its own size is appended
        let mut snapshot_len = len;
        let mut last_sync = Instant::now();
        let mut unsynced = false;
        loop {
            let (batch, closed, rewrite) = {
                let mut q = lock(&self.queue);
                loop {
                    let fsync = *lock(&self.fsync);
                    if !q.is_idle() || q.closed {
                        break;
                    }
                    match fsync {
                        Fsync::Every(d) if unsynced => {
                            let left = d.saturating_sub(last_sync.elapsed());
                            if left.is_zero() {
                                break;
                            }
                            q = self.wait_at_most(q, left);
                        }
                        _ => q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner),
                    }
                }
                if q.has_changes() && q.waiters.is_empty() && !q.closed {
                    let until = Instant::now() + self.tuning.gather;
                    #[cfg(test)]
                    self.gathering
                        .store(true, std::sync::atomic::Ordering::Release);
                    loop {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() || !q.waiters.is_empty() || q.closed {
                            break;
                        }
                        q = self.wait_at_most(q, left);
                    }
                    #[cfg(test)]
                    self.gathering
                        .store(false, std::sync::atomic::Ordering::Release);
                }
                let batch = Queue {
                    delivered: std::mem::take(&mut q.delivered),
                    done: std::mem::take(&mut q.done),
                    floor: q.floor.take(),
                    waiters: std::mem::take(&mut q.waiters),
                    closed: false,
                    rewrite: false,
                };
                (batch, q.closed, std::mem::take(&mut q.rewrite))
            };
            let fsync = *lock(&self.fsync);
            let mut bytes = Vec::new();
            for chunk in batch.delivered.chunks(SNAPSHOT_CHUNK) {
                push_record(&mut bytes, &delivered_body(chunk));
            }
            for chunk in batch.done.chunks(SNAPSHOT_CHUNK) {
                push_record(&mut bytes, &done_body(chunk));
            }
            if let Some(floor) = batch.floor {
                let mut b = vec![KIND_FLOOR];
                b.extend_from_slice(&floor.to_le_bytes());
                push_record(&mut bytes, &b);
            }
            let compact = rewrite
                || since_snapshot + bytes.len() as u64 > self.tuning.compact_at.max(snapshot_len);
            let result = match source.upgrade() {
                Some(source) if compact => {
                    let state = source.snapshot();
                    drop(source);
                    write_fresh(&*self.fs, &self.path, &self.dir, &self.config, &state).map(
                        |(f, l)| {
                            file = f;
                            len = l;
                            snapshot_len = l;
                            since_snapshot = 0;
                            unsynced = false;
                            last_sync = Instant::now();
                        },
                    )
                }
                _ if bytes.is_empty() => Ok(()),
                _ => file
                    .write_all_at(&bytes, len)
                    .map_err(|e| StoreError::io("write", &self.path, e))
                    .and_then(|()| {
                        len += bytes.len() as u64;
                        since_snapshot += bytes.len() as u64;
                        unsynced = true;
                        let due = match fsync {
                            Fsync::Always => true,
                            Fsync::Every(d) => closed || last_sync.elapsed() >= d,
                            Fsync::Never => closed,
                        };
                        if due {
                            file.sync_data()
                                .map_err(|e| StoreError::io("fsync", &self.path, e))?;
                            unsynced = false;
                            last_sync = Instant::now();
                        }
                        Ok(())
                    }),
            };
            // an Every(d) wake-up with nothing queued syncs what the last batches wrote
            let result = result.and_then(|()| {
                if unsynced
                    && let Fsync::Every(d) = fsync
                    && last_sync.elapsed() >= d
                {
                    file.sync_data()
                        .map_err(|e| StoreError::io("fsync", &self.path, e))?;
                    unsynced = false;
                    last_sync = Instant::now();
                }
                Ok(())
            });
            // closing: whatever is written reaches the disk, whatever the setting
            let result = result.and_then(|()| {
                if closed && unsynced {
                    file.sync_data()
                        .map_err(|e| StoreError::io("fsync", &self.path, e))?;
                    unsynced = false;
                }
                Ok(())
            });
            let failed = result.is_err();
            if let Err(e) = &result {
                tracing::error!(
                    "consumer state: {e}; the file will be rewritten whole with the next change"
                );
                lock(&self.queue).rewrite = true;
                // not sooner than the next interval either: no retry loop at CPU speed
                last_sync = Instant::now();
            }
            for tx in batch.waiters {
                let _ = tx.send(result.clone());
            }
            if closed {
                return;
            }
            if failed {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::MemFs;

    fn persisted(floor: u64, done: &[u64], deliveries: &[(u64, u32)]) -> Persisted {
        Persisted {
            floor,
            done: done.iter().copied().collect(),
            deliveries: deliveries.iter().copied().collect(),
        }
    }

    #[test]
    fn a_fresh_file_reads_back_as_written() {
        let fs = MemFs::default();
        let path = PathBuf::from("/c/x.con");
        fs.create_dir_all(Path::new("/c")).unwrap();
        let state = persisted(7, &[9, 12], &[(8, 3), (10, 1)]);
        write_fresh(&fs, &path, Path::new("/c"), b"{}", &state).unwrap();
        let loaded = load(&fs, &path).unwrap().unwrap();
        assert_eq!(loaded.config, b"{}");
        assert_eq!(loaded.state, state);
        assert!(loaded.damage.is_none());
    }

    /// Stands in for a consumer: its state is what the test queued.
    struct Model(Mutex<Persisted>);

    impl Snapshot for Model {
        fn snapshot(&self) -> Persisted {
            lock(&self.0).clone()
        }
    }

    /// A journal at `/c/x.con` in memory, an empty state, and the model it snapshots.
    fn test_journal(
        fsync: Fsync,
        compact_at: u64,
        gather: Duration,
    ) -> (Arc<dyn Fs>, PathBuf, Journal, Arc<Model>) {
        let fs: Arc<dyn Fs> = Arc::new(MemFs::default());
        let path = PathBuf::from("/c/x.con");
        let model = Arc::new(Model(Mutex::new(Persisted::default())));
        let weak: std::sync::Weak<dyn Snapshot> = Arc::downgrade(&model) as _;
        let journal = Journal::create_with(
            fs.clone(),
            path.clone(),
            fsync,
            b"{}".to_vec(),
            &Persisted::default(),
            weak,
            Tuning { compact_at, gather },
        )
        .unwrap();
        (fs, path, journal, model)
    }

    #[test]
    fn a_file_past_its_compaction_size_is_rewritten_and_reads_back_the_same() {
        let (fs, path, journal, model) = test_journal(Fsync::Always, 512, GATHER);
        let mut largest = 0;
        for seq in 1..=400u64 {
            let (tx, rx) = oneshot::channel();
            {
                let mut m = lock(&model.0);
                m.apply_delivered(seq, 1);
                if seq % 3 != 0 {
                    m.apply_done(seq);
                }
                let floor = seq.saturating_sub(10) / 3 * 3; // trails behind
                m.apply_floor(floor);
                let done: Vec<u64> = (seq % 3 != 0).then_some(seq).into_iter().collect();
                journal.queue(&[(seq, 1)], &done, Some(floor), Some(tx));
            }
            rx.blocking_recv().unwrap().unwrap();
            largest = largest.max(fs.open(&path, false).unwrap().len().unwrap());
            let loaded = load(&*fs, &path).unwrap().unwrap();
            assert!(loaded.damage.is_none());
            assert_eq!(loaded.state, *lock(&model.0), "after {seq}");
        }
        journal.close();
        // compaction kept the file near its threshold plus one snapshot
        assert!(largest < 512 + 512, "the file grew to {largest} bytes");
        assert!(fs.list(Path::new("/c")).unwrap() == ["x.con"]);
    }

    /// A journal whose writer lets changes gather for an hour, with a change queued
    /// and the writer gathering.
    fn gathering_journal() -> (Arc<dyn Fs>, PathBuf, Journal, Arc<Model>) {
        let hour = Duration::from_secs(3600);
        let (fs, path, journal, model) = test_journal(Fsync::Every(hour), COMPACT_AT, hour);
        journal.queue(&[(1, 1)], &[], None, None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !journal
            .shared
            .gathering
            .load(std::sync::atomic::Ordering::Acquire)
        {
            assert!(
                Instant::now() < deadline,
                "the writer never began to gather"
            );
            std::thread::yield_now();
        }
        (fs, path, journal, model)
    }

    /// Runs `f` on a thread; its result, unless it takes 10 s (the test then fails
    /// rather than hangs).
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("it did not wait out the gather")
    }

    #[test]
    fn a_confirmed_change_ends_the_gather_and_is_written_with_the_changes_before_it() {
        let (fs, path, journal, _model) = gathering_journal();
        let (tx, rx) = oneshot::channel();
        journal.queue(&[(2, 1)], &[], None, Some(tx));
        within_10s(move || rx.blocking_recv()).unwrap().unwrap();
        let loaded = load(&*fs, &path).unwrap().unwrap();
        assert_eq!(loaded.state, persisted(0, &[], &[(1, 1), (2, 1)]));
        journal.close();
    }

    #[test]
    fn closing_ends_the_gather_and_writes_what_was_gathered() {
        let (fs, path, journal, _model) = gathering_journal();
        within_10s(move || journal.close());
        let loaded = load(&*fs, &path).unwrap().unwrap();
        assert_eq!(loaded.state, persisted(0, &[], &[(1, 1)]));
    }

    #[test]
    fn replay_is_idempotent_and_the_floor_prunes() {
        let mut s = persisted(0, &[], &[]);
        apply(
            &mut s,
            &[
                &[KIND_DELIVERED][..],
                &2u32.to_le_bytes(),
                &3u64.to_le_bytes(),
                &1u32.to_le_bytes(),
                &5u64.to_le_bytes(),
                &2u32.to_le_bytes(),
            ]
            .concat(),
        )
        .unwrap();
        let done = [&[KIND_DONE][..], &1u32.to_le_bytes(), &3u64.to_le_bytes()].concat();
        apply(&mut s, &done).unwrap();
        apply(&mut s, &done).unwrap();
        assert_eq!(s, persisted(0, &[3], &[(5, 2)]));
        apply(&mut s, &[&[KIND_FLOOR][..], &4u64.to_le_bytes()].concat()).unwrap();
        assert_eq!(s, persisted(4, &[], &[(5, 2)]));
    }

    #[test]
    fn counts_that_do_not_fit_their_record_are_refused_without_allocating() {
        let mut s = Persisted::default();
        let body = [
            &[KIND_DONE][..],
            &u32::MAX.to_le_bytes(),
            &1u64.to_le_bytes(),
        ]
        .concat();
        let e = apply(&mut s, &body).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        assert!(apply(&mut s, &[KIND_FLOOR, 1, 2]).is_err());
        assert!(
            apply(&mut s, &[99])
                .unwrap_err()
                .contains("unknown record kind 99")
        );
    }

    #[test]
    fn damage_ends_the_replay_and_names_the_offset() {
        let fs = MemFs::default();
        let path = PathBuf::from("/c/x.con");
        fs.create_dir_all(Path::new("/c")).unwrap();
        let (file, len) =
            write_fresh(&fs, &path, Path::new("/c"), b"{}", &persisted(1, &[], &[])).unwrap();
        let mut rec = Vec::new();
        push_record(&mut rec, &[&[KIND_FLOOR][..], &5u64.to_le_bytes()].concat());
        let mut bad = rec.clone();
        bad[10] ^= 1;
        file.write_all_at(&[rec.clone(), bad, rec].concat(), len)
            .unwrap();
        let loaded = load(&fs, &path).unwrap().unwrap();
        assert_eq!(loaded.state.floor, 5);
        match loaded.damage {
            Some(StoreError::Corrupt { offset, reason, .. }) => {
                assert_eq!(offset, len + 17);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
