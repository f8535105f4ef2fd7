//! One stream's segmented log: its segments, the in-memory index, recovery, appends,
//! removals and the location of records to read.
//!
//! The log is plain state, owned by its stream under a lock. It performs no writes
//! itself: appends and removals become [`Op`]s, which the stream's committer executes
//! (one write per segment per batch, then one `fdatasync`). Only segment creation
//! (an `open`) and recovery touch the file system directly.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::config::{Fsync, MAX_MSG_SIZE, StreamConfig};
use crate::error::StoreError;
use crate::fs::{File, Fs};
use crate::message::StoredMessage;
use crate::record::{
    self, DecodeError, HEADER_LEN, Kind, Record, SEGMENT_HEADER_LEN, SegmentHeader,
};

/// The largest record recovery or a read accepts: the largest message and its header.
pub(crate) const MAX_RECORD_LEN: u32 = MAX_MSG_SIZE + HEADER_LEN as u32;

/// The payload size at which a `MsgIds` record is closed and another begun.
const MSG_IDS_RECORD: usize = 1 << 20;

/// The header that deduplicates publishes.
pub const MSG_ID_HEADER: &str = "Msg-Id";

/// The longest `Msg-Id`, in bytes. (Ids are kept in memory for the duplicate window,
/// and restated on disk when their messages are removed.)
pub const MAX_MSG_ID_LEN: usize = 1024;

const DELETED: u32 = u32::MAX;

/// The highest sequence a segment may start at: far beyond any real stream, low enough
/// that no sequence arithmetic can overflow.
const MAX_SEQ: u64 = u64::MAX >> 2;

/// The largest segment file recovery reads: record positions are 32-bit.
const MAX_SEGMENT_FILE: u64 = u32::MAX as u64;

/// A message's place in its segment.
#[derive(Clone, Copy, Debug)]
struct Entry {
    pos: u32,
    len: u32,
    /// Index into `Log::names`, or `DELETED`.
    subject: u32,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    /// From the segment's header: part of every record's checksum.
    salt: u64,
    path: PathBuf,
    file: Arc<dyn File>,
    /// Bytes in the file, counting those still queued for writing.
    len: u64,
    /// `entries[i]` is message `first_seq + i`.
    entries: Vec<Entry>,
    live: u64,
    /// The newest message time in the segment.
    max_time: i64,
    /// The sequences whose delete records this segment holds.
    deletes: Vec<u64>,
}

impl Segment {
    fn new(first_seq: u64, salt: u64, path: PathBuf, file: Arc<dyn File>) -> Segment {
        Segment {
            first_seq,
            salt,
            path,
            file,
            len: 0,
            entries: Vec::new(),
            live: 0,
            max_time: i64::MIN,
            deletes: Vec::new(),
        }
    }

    fn end_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }
}

#[derive(Clone, Debug)]
struct SubjectState {
    id: u32,
    msgs: u64,
    first: u64,
    last: u64,
}

/// A file operation the committer performs, in order.
#[derive(Debug)]
pub(crate) enum Op {
    /// Write `bytes` at `offset`.
    Write {
        file: Arc<dyn File>,
        path: PathBuf,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Remove a segment file (after syncing what was written before it).
    Remove { path: PathBuf },
    /// Sync a segment that is sealed, under `Fsync::Always`: a power loss may then tear
    /// only the last segment, where recovery can tell a torn write from damage. (Under
    /// `Every(d)` and `Never` the periodic sync or the close syncs it.)
    Sync { file: Arc<dyn File>, path: PathBuf },
    /// Sync the stream's directory.
    SyncDir,
}

/// Where a read finds its records: one segment's span, read with one `pread`.
#[derive(Debug)]
pub(crate) struct Span {
    pub(crate) file: Arc<dyn File>,
    pub(crate) path: PathBuf,
    pub(crate) salt: u64,
    pub(crate) start: u64,
    pub(crate) len: usize,
    /// (seq, position relative to `start`, record length)
    pub(crate) records: Vec<(u64, usize, usize)>,
}

/// A `Msg-Id` read back by recovery: (id, sequence, time, first sequence of the
/// segment whose record states it).
pub(crate) type SeenId = (String, u64, i64, u64);

/// Where a `Msg-Id` was seen.
#[derive(Clone, Copy, Debug)]
struct Seen {
    seq: u64,
    time: i64,
    /// The first sequence of the segment holding the newest record that states the id
    /// (its message, or a restatement): the id must be restated before it goes.
    holder: u64,
}

/// The `Msg-Id`s seen within the duplicate window.
///
/// Ids are indexed by a 64-bit keyed hash (SipHash with a key random per process, so
/// a publisher cannot aim at collisions), computed once per id: the table grows and
/// rehashes without reading the ids again. An id whose hash is already taken by another
/// id goes to `collided`, looked at only when the first table does not have the id.
///
/// Numbered ids, `<prefix>.<n>` with `n` in plain decimal, as a courier client gives
/// every durable publish that has no id of its own, are kept as runs instead: one per
/// prefix, an entry per number, in order. A publisher that numbers its messages thus
/// costs no allocation and no table entry per message. A number that does not extend
/// its prefix's run (further than [`MAX_RUN_GAP`] past its end, or before its start),
/// and a prefix past [`MAX_RUNS`], go to the table like any other id.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    /// The window, in nanoseconds.
    pub(crate) window: i64,
    /// Each id is allocated once, shared by the table and the order.
    ids: HashMap<u64, (Arc<str>, Seen), BuildHasherDefault<Prehashed>>,
    collided: HashMap<Arc<str>, Seen>,
    hasher: std::hash::RandomState,
    /// Ids by time, oldest first, to expire them.
    order: VecDeque<(i64, Arc<str>)>,
    /// Runs of numbered ids, by the keyed hash of their prefix.
    runs: HashMap<u64, Run, BuildHasherDefault<Prehashed>>,
    /// When the runs are next looked through for expired entries.
    next_sweep: i64,
}

/// How many prefixes may have a run: numbered ids of further prefixes go to the table.
pub(crate) const MAX_RUNS: usize = 1024;

/// How far past the end of its run a number may come (publishes racing on one
/// connection, or one that failed) and still extend the run, its skipped numbers
/// left empty; and only while a run's empty entries are no more than its ids, so
/// that a publisher skipping numbers cannot make an id cost more than a few entries.
pub(crate) const MAX_RUN_GAP: u64 = 64;

/// The ids `<prefix>.<first>`, `<prefix>.<first + 1>`, … in the window.
#[derive(Debug)]
struct Run {
    prefix: Arc<str>,
    /// The number of the first entry.
    first: u64,
    /// Entry `i` is id `<prefix>.<first + i>`; `seq == 0` marks a number not seen
    /// (sequences start at 1).
    entries: VecDeque<Seen>,
    /// How many entries are empty: never more than those seen, so that numbers with
    /// gaps between them cost at most twice the entries they fill.
    empty: usize,
}

impl Run {
    fn get(&self, n: u64) -> Option<&Seen> {
        let i = usize::try_from(n.checked_sub(self.first)?).ok()?;
        self.entries.get(i).filter(|seen| seen.seq != 0)
    }

    fn get_mut(&mut self, n: u64) -> Option<&mut Seen> {
        let i = usize::try_from(n.checked_sub(self.first)?).ok()?;
        self.entries.get_mut(i).filter(|seen| seen.seq != 0)
    }

    /// Drops the entries before `cutoff` from the front (an empty one carries the time
    /// of the number after it that was seen).
    fn expire(&mut self, cutoff: i64) {
        while let Some(front) = self.entries.front() {
            if front.time >= cutoff {
                break;
            }
            if self.entries.pop_front().is_some_and(|seen| seen.seq == 0) {
                self.empty -= 1;
            }
            self.first += 1;
        }
    }
}

/// Splits a numbered id into its prefix and number: `n` is plain decimal (no sign, no
/// leading zero), so that the pair gives back the id exactly.
fn numbered_id(id: &str) -> Option<(&str, u64)> {
    let (prefix, digits) = id.rsplit_once('.')?;
    let plain = !prefix.is_empty()
        && (1..=19).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits.len() == 1 || !digits.starts_with('0'));
    if !plain {
        return None;
    }
    digits.parse().ok().map(|n| (prefix, n))
}

/// Where an id is looked for and kept: computed once per publish, for the duplicate
/// lookup and then the insert.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IdKey {
    /// The keyed hash of the whole id (the table's key).
    hash: u64,
    /// For a numbered id: the keyed hash of its prefix, its number, and the prefix's
    /// length.
    numbered: Option<(u64, u64, usize)>,
}

/// The hasher of a table keyed by a hash already computed: it passes it through.
#[derive(Debug, Default)]
pub(crate) struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // only u64 keys are hashed here; any other input still hashes deterministically
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Dedup {
    /// An empty window of `window` nanoseconds.
    pub(crate) fn new(window: i64) -> Dedup {
        Dedup {
            window,
            ..Dedup::default()
        }
    }

    /// Where `id` is looked for and kept.
    pub(crate) fn key(&self, id: &str) -> IdKey {
        IdKey {
            hash: self.hasher.hash_one(id),
            numbered: numbered_id(id)
                .map(|(prefix, n)| (self.hasher.hash_one(prefix), n, prefix.len())),
        }
    }

    /// The run that holds (or would hold) numbered id `id`, if its prefix has one.
    /// (Two prefixes with one hash: the run is the first's, and the second's ids go to
    /// the table.)
    fn run_of(&self, id: &str, key: IdKey) -> Option<(&Run, u64)> {
        let (prefix_hash, n, prefix_len) = key.numbered?;
        let run = self.runs.get(&prefix_hash)?;
        (*run.prefix == id[..prefix_len]).then_some((run, n))
    }

    fn seen_keyed(&self, id: &str, key: IdKey) -> Option<&Seen> {
        if let Some((run, n)) = self.run_of(id, key)
            && let Some(seen) = run.get(n)
        {
            return Some(seen);
        }
        match self.ids.get(&key.hash) {
            Some((stored, seen)) if &**stored == id => Some(seen),
            _ if self.collided.is_empty() => None,
            _ => self.collided.get(id),
        }
    }

    fn seen_mut(&mut self, id: &str) -> Option<&mut Seen> {
        let key = self.key(id);
        if let Some((prefix_hash, n, _)) = key.numbered
            && self
                .run_of(id, key)
                .is_some_and(|(run, n)| run.get(n).is_some())
        {
            return self.runs.get_mut(&prefix_hash)?.get_mut(n);
        }
        match self.ids.get_mut(&key.hash) {
            Some((stored, seen)) if &**stored == id => Some(seen),
            _ => self.collided.get_mut(id),
        }
    }

    /// Removes `id` from the table (not from the runs).
    fn remove_from_table(&mut self, id: &str, hash: u64) {
        if self
            .ids
            .get(&hash)
            .is_some_and(|(stored, _)| &**stored == id)
        {
            self.ids.remove(&hash);
        } else {
            self.collided.remove(id);
        }
    }

    /// Forgets the ids older than the window at `now`.
    pub(crate) fn expire(&mut self, now: i64) {
        let cutoff = now.saturating_sub(self.window);
        while let Some((time, _)) = self.order.front() {
            if *time >= cutoff {
                break;
            }
            let (time, id) = self.order.pop_front().expect("checked");
            let hash = self.hasher.hash_one(&*id);
            let in_table = match self.ids.get(&hash) {
                Some((stored, seen)) if *stored == id => Some(seen),
                _ => self.collided.get(&*id),
            };
            if in_table.is_some_and(|seen| seen.time == time) {
                self.remove_from_table(&id, hash);
            }
        }
        // the runs, at most once a second (or once a window, if shorter)
        if now >= self.next_sweep && !self.runs.is_empty() {
            self.next_sweep = now.saturating_add(self.window.clamp(1, 1_000_000_000));
            self.runs.retain(|_, run| {
                run.expire(cutoff);
                !run.entries.is_empty()
            });
        }
    }

    /// [`Dedup::get_keyed`], keying `id` itself.
    #[cfg(test)]
    pub(crate) fn get(&self, id: &str, now: i64) -> Option<u64> {
        self.get_keyed(id, self.key(id), now)
    }

    /// The sequence of the message stored with `id` (whose [`Dedup::key`] is `key`), if
    /// within the window at `now`.
    pub(crate) fn get_keyed(&self, id: &str, key: IdKey, now: i64) -> Option<u64> {
        let seen = self.seen_keyed(id, key)?;
        (seen.time >= now.saturating_sub(self.window)).then_some(seen.seq)
    }

    /// Remembers `id` for message `seq` stored at `time`, stated by a record in the
    /// segment starting at `holder`. Ids must come in time order.
    fn insert(&mut self, id: &str, seq: u64, time: i64, holder: u64) {
        let key = self.key(id);
        self.insert_keyed(id, key, seq, time, holder);
    }

    /// [`Dedup::insert`] with the id's [`Dedup::key`].
    pub(crate) fn insert_keyed(&mut self, id: &str, key: IdKey, seq: u64, time: i64, holder: u64) {
        let seen = Seen { seq, time, holder };
        if self.insert_into_run(id, key, seen) {
            // stated again: the newest statement wins
            if !self.ids.is_empty() || !self.collided.is_empty() {
                self.remove_from_table(id, key.hash);
            }
            return;
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back((time, id.clone()));
        if !self.collided.is_empty() {
            self.collided.remove(&*id);
        }
        match self.ids.entry(key.hash) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert((id, seen));
            }
            std::collections::hash_map::Entry::Occupied(mut slot) if *slot.get().0 == *id => {
                slot.insert((id, seen));
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(id, seen);
            }
        }
    }

    /// Keeps a numbered id in its prefix's run, starting one if there is room; false
    /// if it goes to the table instead.
    fn insert_into_run(&mut self, id: &str, key: IdKey, seen: Seen) -> bool {
        let Some((prefix_hash, n, prefix_len)) = key.numbered else {
            return false;
        };
        let room = self.runs.len() < MAX_RUNS;
        let run = match self.runs.entry(prefix_hash) {
            std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) if room => slot.insert(Run {
                prefix: Arc::from(&id[..prefix_len]),
                first: n,
                entries: VecDeque::new(),
                empty: 0,
            }),
            std::collections::hash_map::Entry::Vacant(_) => return false,
        };
        if *run.prefix != id[..prefix_len] {
            return false; // two prefixes with one hash: the second goes to the table
        }
        let cutoff = seen.time.saturating_sub(self.window);
        run.expire(cutoff);
        if run.entries.is_empty() {
            run.first = n;
        }
        let Some(i) = n.checked_sub(run.first) else {
            return false;
        };
        let end = run.entries.len() as u64;
        if i < end {
            let slot = &mut run.entries[i as usize];
            if slot.seq == 0 {
                run.empty -= 1;
            }
            *slot = seen;
            return true;
        }
        let gap = i - end;
        let seen_entries = run.entries.len() - run.empty;
        if gap > MAX_RUN_GAP || run.empty + gap as usize > seen_entries {
            return false;
        }
        run.empty += gap as usize;
        let empty = Seen {
            seq: 0,
            time: seen.time,
            holder: seen.holder,
        };
        run.entries.extend((end..i).map(|_| empty));
        run.entries.push_back(seen);
        true
    }

    /// Builds the window from ids read back (in any order), as of `now`.
    pub(crate) fn rebuild(window: i64, mut ids: Vec<SeenId>, now: i64) -> Dedup {
        // the newest statement of an id wins
        ids.sort_by_key(|(_, seq, time, holder)| (*time, *seq, *holder));
        let mut dedup = Dedup::new(window);
        for (id, seq, time, holder) in ids {
            dedup.insert(&id, seq, time, holder);
        }
        dedup.expire(now);
        dedup
    }

    /// The ids stored at or after `since` whose holder is in `going`, sorted.
    fn held_by(&self, since: i64, going: &[u64]) -> Vec<(u64, i64, String)> {
        let held =
            |seen: &Seen| seen.seq != 0 && seen.time >= since && going.contains(&seen.holder);
        let mut out: Vec<_> = self
            .ids
            .values()
            .map(|(id, seen)| (id, seen))
            .chain(self.collided.iter())
            .filter(|(_, seen)| held(seen))
            .map(|(id, seen)| (seen.seq, seen.time, id.to_string()))
            .collect();
        for run in self.runs.values() {
            for (n, seen) in (run.first..).zip(&run.entries) {
                if held(seen) {
                    out.push((seen.seq, seen.time, format!("{}.{n}", run.prefix)));
                }
            }
        }
        out.sort_unstable();
        out
    }
}

/// What recovery found besides the log itself.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) log: Log,
    /// The last configuration record, if any.
    pub(crate) config: Option<StreamConfig>,
    /// `Msg-Id`s stated by message and message ids records younger than `since`.
    pub(crate) msg_ids: Vec<SeenId>,
    /// Damage found and skipped: each names the file and offset.
    pub(crate) damage: Vec<StoreError>,
    /// Files kept aside (`….damaged`), by this recovery or an earlier one: bytes cut
    /// off, torn first writes, skipped segments.
    pub(crate) set_aside: Vec<PathBuf>,
}

/// A stream's log. See the module documentation.
#[derive(Debug)]
pub(crate) struct Log {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    segment_size: u64,
    /// Whether [`Log::roll`] syncs the segment it seals: under [`Fsync::Always`] only.
    /// Under `Every(d)` and `Never` the sealed segment is left to the stream's periodic
    /// sync (or the close), as the last one is.
    sync_sealed: bool,
    config_json: Vec<u8>,
    segments: VecDeque<Segment>,
    next_seq: u64,
    /// Every message below is gone; messages at and above may be deleted one by one.
    first_seq: u64,
    msgs: u64,
    bytes: u64,
    subjects: HashMap<Arc<str>, SubjectState>,
    names: Vec<Option<Arc<str>>>,
    free: Vec<u32>,
    ops: Vec<Op>,
    /// Messages were removed from the front since the last batch: a purge record with
    /// the new floor goes at the end of the batch (one per batch, not one per removal).
    purge_pending: bool,
    last_time: i64,
    last_msg_id: Option<String>,
    /// The duplicate window. Recovery rebuilds it from message records and from the
    /// `MsgIds` records that restate the ids of removed messages.
    pub(crate) dedup: Dedup,
}

/// Counts describing a log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) msgs: u64,
    pub(crate) bytes: u64,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    pub(crate) subjects: u64,
    pub(crate) deleted: u64,
    pub(crate) segments: u64,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl Log {
    /// Creates the log of a new stream: its directory and first segment, starting
    /// with the configuration record, synced, with the directory.
    pub(crate) fn create(
        fs: Arc<dyn Fs>,
        dir: &Path,
        config: &StreamConfig,
    ) -> Result<Log, StoreError> {
        fs.create_dir_all(dir)
            .map_err(|e| StoreError::io("create directory", dir, e))?;
        let mut log = Log::empty(fs, dir, config);
        log.roll()?;
        Ok(log)
    }

    fn empty(fs: Arc<dyn Fs>, dir: &Path, config: &StreamConfig) -> Log {
        Log {
            fs,
            dir: dir.to_owned(),
            segment_size: config.segment_size,
            sync_sealed: config.fsync == Fsync::Always,
            config_json: serde_json::to_vec(config).expect("a config serializes"),
            segments: VecDeque::new(),
            next_seq: 1,
            first_seq: 1,
            msgs: 0,
            bytes: 0,
            subjects: HashMap::new(),
            names: Vec::new(),
            free: Vec::new(),
            ops: Vec::new(),
            purge_pending: false,
            last_time: 0,
            last_msg_id: None,
            dedup: Dedup::default(),
        }
    }

    /// Opens an existing log: reads and verifies every segment.
    ///
    /// * Empty segment files at the end (a segment whose first write was lost) hold
    ///   nothing: they are removed, except that the newest is kept (and gets its
    ///   configuration record again) where it is the only trace of where sequences went
    ///   on. The segment before them counts as the last.
    /// * A bad record at the end of the last segment, with nothing valid after it, is a
    ///   torn write: the file is cut there, and a warning says how many bytes went.
    /// * Any other bad record is damage: reported (file and offset) and skipped up to
    ///   the next valid record of its segment, or to the segment's end; a record that
    ///   is valid but does not fit (a message out of sequence, …) is reported and
    ///   skipped too. A segment that cannot be read at all is reported and moved aside
    ///   (renamed `….damaged`). Nothing damaged is served, and the stream goes on.
    pub(crate) fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        ids_since: i64,
    ) -> Result<Recovered, StoreError> {
        let names = fs.list(dir).map_err(|e| StoreError::io("list", dir, e))?;
        let mut firsts: Vec<u64> = Vec::new();
        let mut set_aside = Vec::new();
        for name in &names {
            match parse_segment_name(name) {
                Some(first) => firsts.push(first),
                // kept by an earlier recovery: the stream is not an empty one
                None if name.ends_with(".damaged") => set_aside.push(dir.join(name)),
                None if name == "consumers" => {} // their state files
                None => {
                    tracing::warn!(dir = %dir.display(), name, "ignoring a file that is not a segment")
                }
            }
        }
        firsts.sort_unstable();
        let mut segments = Vec::with_capacity(firsts.len());
        for first in firsts {
            let path = dir.join(segment_name(first));
            let file = fs
                .open(&path, false)
                .map_err(|e| StoreError::io("open", &path, e))?;
            let len = file.len().map_err(|e| StoreError::io("stat", &path, e))?;
            segments.push((first, path, file, len));
        }
        // the segments holding data; the empty ones after them are dealt with at the end
        let data_count = segments
            .iter()
            .rposition(|(_, _, _, len)| *len > 0)
            .map_or(0, |i| i + 1);
        let nexts: Vec<Option<u64>> = (0..segments.len())
            .map(|i| segments.get(i + 1).map(|s| s.0))
            .collect();
        let mut log = Log::empty(fs.clone(), dir, &StreamConfig::default());
        let mut config: Option<StreamConfig> = None;
        let mut msg_ids = Vec::new();
        let mut damage = Vec::new();
        let mut dir_changed = false;
        for (i, (first, path, file, len)) in segments.iter().take(data_count).enumerate() {
            let (first, len) = (*first, *len);
            let skip = if len > MAX_SEGMENT_FILE {
                Some(format!("a segment of {len} bytes is over 4 GiB"))
            } else if first > MAX_SEQ {
                Some(format!("a segment may not start at sequence {first}"))
            } else if first < log.next_seq {
                Some(format!(
                    "the segment starts at sequence {first}, below the previous segment's end {}",
                    log.next_seq
                ))
            } else {
                None
            };
            if let Some(reason) = skip {
                dir_changed |= move_aside(fs.as_ref(), path, reason, &mut damage);
                continue;
            }
            if len == 0 {
                // Not the last (that one holds data): an empty file says nothing a later
                // segment's name does not.
                fs.remove_file(path)
                    .map_err(|e| StoreError::io("remove", path, e))?;
                dir_changed = true;
                continue;
            }
            let last = i + 1 == data_count;
            let mut data = vec![0; len as usize];
            file.read_exact_at(&mut data, 0)
                .map_err(|e| StoreError::io("read", path, e))?;
            let prev_end = log.next_seq;
            let header = record::decode_segment_header(&data).and_then(|header| {
                if header.first_seq == first {
                    Ok(header)
                } else {
                    Err(DecodeError::Malformed(
                        "the header's first sequence is not the file name's",
                    ))
                }
            });
            // Damage to the header alone leaves the records readable with the salt it
            // names, if that survived.
            let salt = match &header {
                Ok(header) => Ok(header.salt),
                Err(e) => recover_salt(&data).ok_or_else(|| e.clone()),
            };
            let salt = match salt {
                Ok(salt) => salt,
                Err(e) if !last => {
                    let reason = format!("segment header: {e}");
                    dir_changed |= move_aside(fs.as_ref(), path, reason, &mut damage);
                    continue;
                }
                Err(e) => {
                    // The header goes out in the segment's first write, synced before
                    // anything in the segment is acknowledged: a torn write. Moved aside
                    // (kept whole, in case it is not).
                    set_aside.push(set_aside_torn(fs.as_ref(), path, &e, data.len())?);
                    dir_changed = true;
                    if first != prev_end {
                        // its name is the only trace that sequences went on from there:
                        // an empty segment takes it
                        let file = fs
                            .open(path, true)
                            .map_err(|e| StoreError::io("create segment", path, e))?;
                        log.next_seq = first;
                        let salt = new_salt(path)?;
                        log.segments
                            .push_back(Segment::new(first, salt, path.clone(), file));
                    }
                    continue;
                }
            };
            if let Err(e) = header {
                damage.push(StoreError::corrupt(
                    path,
                    0,
                    format!("segment header: {e}; its records are read with the salt they were written with"),
                ));
            }
            log.next_seq = first;
            let mut segment = Segment::new(first, salt, path.clone(), file.clone());
            segment.len = SEGMENT_HEADER_LEN as u64;
            log.segments.push_back(segment);
            let mut offset = SEGMENT_HEADER_LEN;
            let mut skipped = 0usize; // bytes skipped since the last message read
            // where the last segment is cut: a torn write (or nothing after the header)
            let mut torn = (last && data.len() == SEGMENT_HEADER_LEN).then_some(offset);
            while offset < data.len() {
                let record = match record::decode_at_boundary(&data[offset..], salt, MAX_RECORD_LEN)
                {
                    Ok(record) => record,
                    Err(e) => {
                        if let Some(at) = resync(&data, offset + 1, salt) {
                            damage.push(StoreError::corrupt(
                                path,
                                offset as u64,
                                format!("{e}; skipped to the valid record at offset {at}"),
                            ));
                            skipped += at - offset;
                            offset = at;
                            continue;
                        }
                        if !last {
                            damage.push(StoreError::corrupt(
                                path,
                                offset as u64,
                                format!("{e}; the rest of the segment is skipped"),
                            ));
                            break;
                        }
                        tracing::warn!(
                            file = %path.display(),
                            offset,
                            bytes = data.len() - offset,
                            "truncating a torn write at the end of the log: {e}"
                        );
                        torn = Some(offset);
                        break;
                    }
                };
                let len = record::peek_len(&data[offset..]).expect("decoded") as usize;
                if record.kind == Kind::Message && record.seq > log.next_seq {
                    // messages lost in the bytes skipped: at most one per record header
                    let missing = record.seq - log.next_seq;
                    let below_next_segment = nexts[i].is_none_or(|next| record.seq < next);
                    if missing <= (skipped / HEADER_LEN) as u64 && below_next_segment {
                        damage.push(StoreError::corrupt(
                            path,
                            offset as u64,
                            format!(
                                "messages {}..={} were in the damaged bytes before this record",
                                log.next_seq,
                                record.seq - 1
                            ),
                        ));
                        log.skip_to(record.seq);
                    }
                }
                match log.replay(&record, offset, len, &mut config, &mut msg_ids, ids_since) {
                    Ok(()) => {
                        if record.kind == Kind::Message {
                            skipped = 0;
                        }
                    }
                    Err(reason) => {
                        damage.push(StoreError::corrupt(
                            path,
                            offset as u64,
                            format!("{reason}; the record is skipped"),
                        ));
                        skipped += len;
                    }
                }
                offset += len;
                log.segments.back_mut().expect("pushed").len = offset as u64;
            }
            if let Some(offset) = torn {
                // Nothing but the header left: the segment is empty again, and gets its
                // header and configuration anew if it stays.
                let cut = if offset == SEGMENT_HEADER_LEN {
                    0
                } else {
                    offset
                };
                // Most likely a torn write, whose bytes were never acknowledged; but
                // damage at the very end looks the same, so the bytes are kept aside.
                if offset < data.len() {
                    let aside = keep_aside(fs.as_ref(), path, offset, &data[offset..])?;
                    tracing::warn!(file = %path.display(), "the bytes cut off are kept in {}", aside.display());
                    // the copy's name is durable before the bytes leave the segment
                    fs.sync_dir(dir)
                        .map_err(|e| StoreError::io("sync directory", dir, e))?;
                    set_aside.push(aside);
                }
                file.set_len(cut as u64)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| StoreError::io("truncate", path, e))?;
                log.segments.back_mut().expect("pushed").len = cut as u64;
                if cut == 0 && first == prev_end {
                    // nothing of it was whole, and its name says nothing the segment
                    // before does not: it goes
                    log.segments.pop_back();
                    fs.remove_file(path)
                        .map_err(|e| StoreError::io("remove", path, e))?;
                    dir_changed = true;
                }
            }
        }
        // Empty segments at the end: only the newest can say something (that sequences
        // go on from its name, past the end of the data); the rest go.
        let empties = &segments[data_count..];
        let keep = empties
            .last()
            .filter(|(first, _, _, _)| *first > log.next_seq && *first <= MAX_SEQ);
        for (first, path, _, _) in empties {
            if keep.is_some_and(|k| k.0 == *first) {
                continue;
            }
            fs.remove_file(path)
                .map_err(|e| StoreError::io("remove", path, e))?;
            dir_changed = true;
        }
        if let Some((first, path, file, _)) = keep {
            if let Some(empty) = log.segments.back().filter(|s| s.len == 0) {
                // a newer empty segment carries the sequence further
                fs.remove_file(&empty.path)
                    .map_err(|e| StoreError::io("remove", &empty.path, e))?;
                log.segments.pop_back();
                dir_changed = true;
            }
            log.next_seq = *first;
            let salt = new_salt(path)?;
            log.segments
                .push_back(Segment::new(*first, salt, path.clone(), file.clone()));
        }
        // What a killed process wrote but never synced is about to be served and
        // counted on: make it durable first, with the directory entries. Under
        // `Every(d)` and `Never` that can be in any segment. Under `Always` only the
        // last is synced here: a sealed segment was synced when the next one started,
        // or with the first batch after an update to `Always` (a kill inside that
        // batch can leave older segments unsynced, holding what the setting before
        // acknowledged, within what that setting may lose).
        let always = config.as_ref().is_some_and(|c| c.fsync == Fsync::Always);
        let synced = if always {
            log.segments.len().saturating_sub(1)
        } else {
            0
        };
        for segment in log.segments.iter().skip(synced) {
            segment
                .file
                .sync_data()
                .map_err(|e| StoreError::io("fsync", &segment.path, e))?;
        }
        if dir_changed || !log.segments.is_empty() {
            fs.sync_dir(dir)
                .map_err(|e| StoreError::io("sync directory", dir, e))?;
        }
        for report in &damage {
            tracing::error!("{report}");
        }
        if let Some(config) = &config {
            log.use_config(config);
        }
        log.advance_first();
        Ok(Recovered {
            log,
            config,
            msg_ids,
            damage,
            set_aside,
        })
    }

    /// Writes the segment header and the configuration into the last segment if it is
    /// empty (its first write was lost): every segment starts with both.
    pub(crate) fn ensure_config(&mut self) {
        if self.segments.back().is_some_and(|s| s.len == 0) {
            self.begin_segment();
        }
    }

    /// Writes the header and the configuration record into the last segment, which is
    /// empty.
    fn begin_segment(&mut self) {
        let segment = self.segments.back_mut().expect("a log has a segment");
        debug_assert_eq!(segment.len, 0);
        let header = SegmentHeader {
            first_seq: segment.first_seq,
            salt: segment.salt,
        };
        record::encode_segment_header(write_buffer(&mut self.ops, segment), &header);
        segment.len += SEGMENT_HEADER_LEN as u64;
        let json = std::mem::take(&mut self.config_json);
        self.append_record(Kind::Config, self.next_seq, 0, "", &[], &json);
        self.config_json = json;
    }

    /// Marks messages `next_seq..seq` of the last segment as lost (recovery, after
    /// damaged bytes).
    fn skip_to(&mut self, seq: u64) {
        let segment = self.segments.back_mut().expect("a log has a segment");
        while self.next_seq < seq {
            segment.entries.push(Entry {
                pos: 0,
                len: 0,
                subject: DELETED,
            });
            self.next_seq += 1;
        }
    }

    /// Applies one record read back during recovery.
    fn replay(
        &mut self,
        record: &Record<'_>,
        offset: usize,
        len: usize,
        config: &mut Option<StreamConfig>,
        msg_ids: &mut Vec<SeenId>,
        ids_since: i64,
    ) -> Result<(), String> {
        match record.kind {
            Kind::Message => {
                if record.seq != self.next_seq {
                    return Err(format!(
                        "message has sequence {}, expected {}",
                        record.seq, self.next_seq
                    ));
                }
                let id = msg_id_of(record)?;
                if let Some(id) = &id
                    && record.time >= ids_since
                {
                    msg_ids.push((id.clone(), record.seq, record.time, self.writing()));
                }
                self.last_msg_id = id;
                self.index(record.subject, offset as u32, len as u32, record.time);
            }
            Kind::Delete => {
                self.remove(record.seq);
                let segment = self.segments.back_mut().expect("a log has a segment");
                segment.deletes.push(record.seq);
            }
            Kind::Purge => {
                if record.seq > self.next_seq {
                    return Err(format!(
                        "purge up to {} is past the next sequence {}",
                        record.seq, self.next_seq
                    ));
                }
                let id = msg_id_of(record)?;
                self.remove_below(record.seq);
                self.last_time = record.time;
                self.last_msg_id = id;
            }
            Kind::MsgIds => {
                let ids = record::msg_ids(record.payload).map_err(|e| e.to_string())?;
                let holder = self.writing();
                msg_ids.extend(
                    ids.into_iter()
                        .filter(|(_, time, _)| *time >= ids_since)
                        .map(|(seq, time, id)| (id.to_owned(), seq, time, holder)),
                );
            }
            Kind::Config => {
                let parsed: StreamConfig = serde_json::from_slice(record.payload)
                    .map_err(|e| format!("configuration record: {e}"))?;
                parsed
                    .validate()
                    .map_err(|e| format!("configuration record: {e}"))?;
                *config = Some(parsed);
            }
            #[allow(unreachable_patterns)]
            _ => return Err("unknown record kind".into()),
        }
        Ok(())
    }

    /// Adds a message at `pos` of the last segment to the index.
    fn index(&mut self, subject: &str, pos: u32, len: u32, time: i64) {
        let seq = self.next_seq;
        let id = match self.subjects.get_mut(subject) {
            Some(state) => {
                state.msgs += 1;
                state.last = seq;
                state.id
            }
            None => {
                let name: Arc<str> = Arc::from(subject);
                let id = match self.free.pop() {
                    Some(id) => {
                        self.names[id as usize] = Some(name.clone());
                        id
                    }
                    None => {
                        self.names.push(Some(name.clone()));
                        (self.names.len() - 1) as u32
                    }
                };
                self.subjects.insert(
                    name,
                    SubjectState {
                        id,
                        msgs: 1,
                        first: seq,
                        last: seq,
                    },
                );
                id
            }
        };
        let segment = self.segments.back_mut().expect("a log has a segment");
        segment.entries.push(Entry {
            pos,
            len,
            subject: id,
        });
        segment.live += 1;
        segment.max_time = segment.max_time.max(time);
        self.msgs += 1;
        self.bytes += u64::from(len);
        self.next_seq += 1;
        self.last_time = time;
    }

    /// Takes `config` as the one written at the start of every new segment, without
    /// writing it now (recovery found none on disk).
    pub(crate) fn use_config(&mut self, config: &StreamConfig) {
        self.segment_size = config.segment_size;
        self.sync_sealed = config.fsync == Fsync::Always;
        self.config_json = serde_json::to_vec(config).expect("a config serializes");
    }

    /// Makes the next message get `seq` at least: messages below it are missing. The
    /// next [`Log::roll`] starts a segment named after it, which makes that durable.
    pub(crate) fn continue_from(&mut self, seq: u64) {
        if seq <= self.next_seq {
            return;
        }
        if self.segments.is_empty() {
            self.next_seq = seq;
            self.first_seq = seq;
        } else {
            self.skip_to(seq);
            self.advance_first();
        }
    }

    /// Replaces the configuration written at the start of every segment; appends it.
    pub(crate) fn set_config(&mut self, config: &StreamConfig) {
        self.use_config(config);
        // a clone: the append may roll, and the new segment starts with this config too
        let json = self.config_json.clone();
        self.append_record(Kind::Config, self.next_seq, 0, "", &[], &json);
    }

    /// Starts a new segment at `next_seq`, beginning with the configuration.
    pub(crate) fn roll(&mut self) -> Result<(), StoreError> {
        let first = self.next_seq;
        if let Some(last) = self.segments.back()
            && last.first_seq == first
        {
            // The last segment holds no message yet: nothing to roll. It must still
            // start with its header and configuration (it is empty after a failed
            // first write).
            if last.len == 0 {
                self.begin_segment();
            }
            return Ok(());
        }
        let path = self.dir.join(segment_name(first));
        let salt = new_salt(&path)?;
        // created new: a file of that name (one recovery skipped) is never written into
        let file = self
            .fs
            .open(&path, true)
            .map_err(|e| StoreError::io("create segment", &path, e))?;
        if self.sync_sealed
            && let Some(sealed) = self.segments.back()
            && sealed.len > 0
        {
            self.ops.push(Op::Sync {
                file: sealed.file.clone(),
                path: sealed.path.clone(),
            });
        }
        self.segments
            .push_back(Segment::new(first, salt, path, file));
        self.ops.push(Op::SyncDir);
        self.begin_segment();
        Ok(())
    }

    /// Appends a record to the last segment's pending write; returns its position.
    fn append_record(
        &mut self,
        kind: Kind,
        seq: u64,
        time: i64,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> u64 {
        let len = record::encoded_len(subject, headers, payload) as u64;
        let last = self.segments.back().expect("a log has a segment");
        if !matches!(kind, Kind::Message | Kind::MsgIds)
            && last.len > 0
            && last.len + len > self.segment_size
        {
            // Deletes and purges roll segments too, so that no file outgrows the 32-bit
            // positions of the index; if the new file cannot be made, the old one grows.
            // (Restated ids do not: a segment of them alone would hold no message, go at
            // the next removal and restate them all again.)
            if let Err(e) = self.roll() {
                tracing::warn!("{e}; the segment grows past segment_size");
            }
        }
        let segment = self.segments.back_mut().expect("a log has a segment");
        let pos = segment.len;
        let record = Record {
            kind,
            seq,
            time,
            subject,
            headers,
            payload,
        };
        let len = record::encode(write_buffer(&mut self.ops, segment), segment.salt, &record);
        segment.len += len as u64;
        pos
    }

    /// Appends a message; rolls the segment first when it would pass its size.
    /// Returns the message's sequence. `msg_id` comes with its [`Dedup::hash`].
    pub(crate) fn append(
        &mut self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
        time: i64,
        msg_id: Option<(&str, IdKey)>,
    ) -> Result<u64, StoreError> {
        let len = record::encoded_len(subject, headers, payload) as u64;
        let last = self.segments.back().expect("a log has a segment");
        if last.len + len > self.segment_size && !last.entries.is_empty() {
            self.roll()?;
        }
        let seq = self.next_seq;
        let pos = self.append_record(Kind::Message, seq, time, subject, headers, payload);
        self.index(subject, pos as u32, len as u32, time);
        if let Some((id, key)) = msg_id {
            let holder = self.writing();
            self.dedup.insert_keyed(id, key, seq, time, holder);
        }
        // the buffer is reused: no allocation per publish
        match (&mut self.last_msg_id, msg_id) {
            (Some(last), Some((id, _))) => {
                last.clear();
                last.push_str(id);
            }
            (last, id) => *last = id.map(|(id, _)| id.to_owned()),
        }
        Ok(seq)
    }

    /// Removes message `seq` from the index; true if it was there. Does not write.
    fn remove(&mut self, seq: u64) -> bool {
        let Some(i) = self.segment_index(seq) else {
            return false;
        };
        let segment = &mut self.segments[i];
        let entry = &mut segment.entries[(seq - segment.first_seq) as usize];
        if entry.subject == DELETED {
            return false;
        }
        let id = std::mem::replace(&mut entry.subject, DELETED);
        let len = entry.len;
        segment.live -= 1;
        self.msgs -= 1;
        self.bytes -= u64::from(len);
        let name = self.names[id as usize]
            .clone()
            .expect("a live subject is named");
        let state = self
            .subjects
            .get_mut(&name)
            .expect("a live subject has state");
        state.msgs -= 1;
        if state.msgs == 0 {
            self.subjects.remove(&name);
            self.names[id as usize] = None;
            self.free.push(id);
        } else if state.first == seq {
            let (from, last) = (seq + 1, state.last);
            let next = self.find_subject(id, from..=last, false).expect("msgs > 0");
            self.subjects.get_mut(&name).expect("above").first = next;
        } else if state.last == seq {
            let (first, to) = (state.first, seq - 1);
            let prev = self.find_subject(id, first..=to, true).expect("msgs > 0");
            self.subjects.get_mut(&name).expect("above").last = prev;
        }
        if seq == self.first_seq {
            self.advance_first();
        }
        true
    }

    /// The first (or last) live message of subject `id` in `range`.
    fn find_subject(
        &self,
        id: u32,
        range: std::ops::RangeInclusive<u64>,
        backwards: bool,
    ) -> Option<u64> {
        let check = |seq: u64| self.entry(seq).is_some_and(|e| e.subject == id);
        if backwards {
            range.rev().find(|&seq| check(seq))
        } else {
            range.into_iter().find(|&seq| check(seq))
        }
    }

    fn segment_index(&self, seq: u64) -> Option<usize> {
        let i = match self.segments.binary_search_by_key(&seq, |s| s.first_seq) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        (seq < self.segments[i].end_seq()).then_some(i)
    }

    fn entry(&self, seq: u64) -> Option<Entry> {
        let segment = &self.segments[self.segment_index(seq)?];
        let entry = segment.entries[(seq - segment.first_seq) as usize];
        (entry.subject != DELETED).then_some(entry)
    }

    /// Moves `first_seq` past deleted messages.
    fn advance_first(&mut self) {
        while self.first_seq < self.next_seq && self.entry(self.first_seq).is_none() {
            match self.segment_index(self.first_seq) {
                Some(_) => self.first_seq += 1,
                None => {
                    // in a gap between segments, or below the first: jump to the next one
                    let next = self
                        .segments
                        .iter()
                        .map(|s| s.first_seq)
                        .find(|&f| f > self.first_seq)
                        .unwrap_or(self.next_seq);
                    self.first_seq = next;
                }
            }
        }
    }

    /// Removes every message below `seq` from the index. Does not write.
    fn remove_below(&mut self, seq: u64) -> u64 {
        let mut removed = 0;
        while self.first_seq < seq.min(self.next_seq) {
            let first = self.first_seq;
            if self.remove(first) {
                removed += 1;
            }
            if self.first_seq == first {
                self.first_seq += 1;
                self.advance_first();
            }
        }
        removed
    }

    /// Removes the oldest message, recording the new floor. False if the log is empty.
    pub(crate) fn remove_oldest(&mut self) -> bool {
        if self.msgs == 0 {
            return false;
        }
        let first = self.first_seq;
        self.remove_below(first + 1);
        self.purge_pending = true;
        self.drop_empty_segments();
        true
    }

    /// Removes message `seq`, writing a delete record. False if it was not there.
    pub(crate) fn delete(&mut self, seq: u64) -> bool {
        if !self.remove(seq) {
            return false;
        }
        if seq < self.first_seq {
            self.purge_pending = true;
        } else {
            self.write_delete(seq);
        }
        self.drop_empty_segments();
        true
    }

    /// The oldest message of `subject`, if any.
    pub(crate) fn first_of(&self, subject: &str) -> Option<u64> {
        self.subjects.get(subject).map(|s| s.first)
    }

    /// Messages stored on `subject`.
    pub(crate) fn msgs_of(&self, subject: &str) -> u64 {
        self.subjects.get(subject).map_or(0, |s| s.msgs)
    }

    /// The newest message of `subject`, durable or not, if any.
    pub(crate) fn last_of(&self, subject: &str) -> Option<u64> {
        self.subjects.get(subject).map(|s| s.last)
    }

    /// Every subject with a message stored.
    pub(crate) fn subject_names(&self) -> impl Iterator<Item = &str> {
        self.subjects.keys().map(|s| &**s)
    }

    /// The newest message at or below `upto`, if any (a walk back over removed ones).
    pub(crate) fn last_of_any_upto(&self, upto: u64) -> Option<u64> {
        let mut seq = upto.min(self.next_seq.saturating_sub(1));
        while seq >= self.first_seq && seq > 0 {
            if self.entry(seq).is_some() {
                return Some(seq);
            }
            seq -= 1;
        }
        None
    }

    /// The subjects holding more than `max` messages.
    pub(crate) fn subjects_over(&self, max: u64) -> Vec<Arc<str>> {
        self.subjects
            .iter()
            .filter(|(_, s)| s.msgs > max)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The newest message of `subject` at or below `upto`, if any.
    pub(crate) fn last_of_upto(&self, subject: &str, upto: u64) -> Option<u64> {
        let state = self.subjects.get(subject)?;
        if state.last <= upto {
            return Some(state.last);
        }
        if state.first > upto {
            return None;
        }
        self.find_subject(state.id, state.first..=upto, true)
    }

    /// Removes every message whose subject matches `filter` (all with `None`).
    /// Returns how many were removed.
    pub(crate) fn purge(&mut self, filter: Option<&str>) -> Result<u64, StoreError> {
        let Some(filter) = filter else {
            let removed = self.msgs;
            if self.segments.back().is_some_and(|s| !s.entries.is_empty()) {
                self.roll()?;
            }
            let next = self.next_seq;
            self.remove_below(next);
            self.write_purge(next);
            self.drop_empty_segments();
            return Ok(removed);
        };
        let ids: Vec<(u32, u64, u64)> = self
            .subjects
            .iter()
            .filter(|(name, _)| crate::subject::matches(filter, name))
            .map(|(_, s)| (s.id, s.first, s.last))
            .collect();
        let mut seqs = Vec::new();
        for (id, first, last) in ids {
            seqs.extend(
                (first..=last).filter(|&seq| self.entry(seq).is_some_and(|e| e.subject == id)),
            );
        }
        seqs.sort_unstable();
        for &seq in &seqs {
            self.remove(seq);
            self.write_delete(seq);
        }
        self.drop_empty_segments();
        Ok(seqs.len() as u64)
    }

    /// Appends a purge record: every message below `floor` is gone. It repeats the
    /// newest message's time and `Msg-Id`, which a restart would otherwise lose with
    /// the message.
    fn write_purge(&mut self, floor: u64) {
        let mut headers = Vec::new();
        if let Some(id) = &self.last_msg_id {
            record::encode_headers(&mut headers, [(MSG_ID_HEADER, id.as_bytes())]);
        }
        let time = self.last_time;
        self.append_record(Kind::Purge, floor, time, "", &headers, &[]);
    }

    /// Appends `MsgIds` records restating the ids still in the duplicate window whose
    /// newest statement (their message, or a restatement) is in a segment of `going`,
    /// about to be removed; they are held by the segment written to from then on.
    fn restate_msg_ids(&mut self, going: &[u64]) {
        let since = self.last_time.saturating_sub(self.dedup.window);
        let ids = self.dedup.held_by(since, going);
        let mut payload = Vec::new();
        for (seq, time, id) in &ids {
            if !payload.is_empty() && payload.len() + 20 + id.len() > MSG_IDS_RECORD {
                self.append_record(Kind::MsgIds, 0, 0, "", &[], &payload);
                payload.clear();
            }
            record::encode_msg_id(&mut payload, *seq, *time, id);
        }
        if !payload.is_empty() {
            self.append_record(Kind::MsgIds, 0, 0, "", &[], &payload);
        }
        // (these records never roll the segment: all went into the one written to)
        let holder = self.writing();
        for (_, _, id) in &ids {
            if let Some(seen) = self.dedup.seen_mut(id) {
                seen.holder = holder;
            }
        }
    }

    /// The first sequence of the segment being written to (the last).
    fn writing(&self) -> u64 {
        self.segments.back().expect("a log has a segment").first_seq
    }

    /// Appends a delete record for `seq`, remembered by the segment that holds it.
    fn write_delete(&mut self, seq: u64) {
        self.append_record(Kind::Delete, seq, 0, "", &[], &[]);
        let segment = self.segments.back_mut().expect("a log has a segment");
        segment.deletes.push(seq);
    }

    /// Removes whole segments that hold no live message, except the last.
    ///
    /// A delete record concerns a message of its own segment or an older one, so
    /// removing a segment could take with it the record of a deletion in an older
    /// segment that stays. Before any segment goes, such deletions are written again
    /// into the last segment, with a purge record for the floor and the `Msg-Id`s of
    /// its messages that are still inside the duplicate window, and the removals are
    /// queued after those writes: the committer syncs what was written before it
    /// removes a file.
    fn drop_empty_segments(&mut self) {
        let last = self.segments.len() - 1;
        let going: Vec<usize> = (0..last).filter(|&i| self.segments[i].live == 0).collect();
        if going.is_empty() {
            return;
        }
        let mut restate: Vec<u64> = going
            .iter()
            .flat_map(|&i| self.segments[i].deletes.iter().copied())
            .filter(|&seq| {
                seq >= self.first_seq
                    && self
                        .segment_index(seq)
                        .is_some_and(|j| j < last && !going.contains(&j))
            })
            .collect();
        restate.sort_unstable();
        restate.dedup();
        let going_firsts: Vec<u64> = going.iter().map(|&i| self.segments[i].first_seq).collect();
        self.purge_pending = false;
        self.write_purge(self.first_seq);
        for seq in restate {
            self.write_delete(seq);
        }
        self.restate_msg_ids(&going_firsts);
        for &i in going.iter().rev() {
            let segment = self.segments.remove(i).expect("in range");
            self.ops.push(Op::Remove { path: segment.path });
        }
        self.ops.push(Op::SyncDir);
    }

    /// Removes messages older than `cutoff` (whole segments first), looking only at
    /// messages up to `upto` (those written to their files). True if any were removed.
    pub(crate) fn expire(&mut self, cutoff: i64, upto: u64) -> Result<bool, StoreError> {
        let mut removed = false;
        let mut result = Ok(());
        while self.msgs > 0 && self.first_seq <= upto {
            let i = self
                .segment_index(self.first_seq)
                .expect("a live first message");
            let segment = &self.segments[i];
            let to = if segment.max_time < cutoff && i + 1 < self.segments.len() {
                segment.end_seq().min(upto + 1)
            } else {
                let entry = self.entry(self.first_seq).expect("live");
                let mut header = [0; HEADER_LEN];
                if let Err(e) = segment
                    .file
                    .read_exact_at(&mut header, u64::from(entry.pos))
                {
                    result = Err(StoreError::io("read", &segment.path, e));
                    break;
                }
                let time = i64::from_le_bytes(header[24..32].try_into().expect("8"));
                if time >= cutoff {
                    break;
                }
                self.first_seq + 1
            };
            self.remove_below(to);
            removed = true;
        }
        if removed {
            self.purge_pending = true;
            self.drop_empty_segments();
        }
        result.map(|()| removed)
    }

    /// The operations queued since the last call, ending with the purge record of
    /// front removals made meanwhile.
    pub(crate) fn take_ops(&mut self) -> Vec<Op> {
        if std::mem::take(&mut self.purge_pending) {
            self.write_purge(self.first_seq);
        }
        std::mem::take(&mut self.ops)
    }

    /// Forgets queued operations (their batch failed; the log is read back from disk).
    pub(crate) fn discard_ops(&mut self) {
        self.purge_pending = false;
        self.ops.clear();
    }

    /// Whether operations are queued.
    /// Whether the pending operations only append to files (no segment created or
    /// removed, nothing to sync): a batch a caller may write itself.
    pub(crate) fn only_appends(&self) -> bool {
        self.ops.iter().all(|op| matches!(op, Op::Write { .. }))
    }

    pub(crate) fn has_ops(&self) -> bool {
        !self.ops.is_empty() || self.purge_pending
    }

    /// The stream's counts.
    pub(crate) fn counts(&self) -> Counts {
        let last_seq = self.next_seq - 1;
        Counts {
            msgs: self.msgs,
            bytes: self.bytes,
            first_seq: self.first_seq,
            last_seq,
            subjects: self.subjects.len() as u64,
            deleted: (last_seq + 1 - self.first_seq) - self.msgs,
            segments: self.segments.len() as u64,
        }
    }

    /// The sequence the next message gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The time of the last message appended.
    pub(crate) fn last_time(&self) -> i64 {
        self.last_time
    }

    /// The `Msg-Id` of the last message appended.
    pub(crate) fn last_msg_id(&self) -> Option<&str> {
        self.last_msg_id.as_deref()
    }

    /// Where to read up to `max_msgs` live messages from `from` to `upto` inclusive,
    /// at most `max_bytes` of records (at least one message).
    pub(crate) fn locate(
        &self,
        from: u64,
        upto: u64,
        max_msgs: usize,
        max_bytes: usize,
    ) -> Vec<Span> {
        let mut spans: Vec<Span> = Vec::new();
        let (mut msgs, mut bytes) = (0usize, 0usize);
        let mut seq = from.max(self.first_seq);
        let upto = upto.min(self.next_seq.saturating_sub(1));
        while seq <= upto && msgs < max_msgs {
            let i = match self.segment_index(seq) {
                Some(i) => i,
                None => match self.segments.iter().position(|s| s.first_seq > seq) {
                    Some(i) => {
                        seq = self.segments[i].first_seq;
                        continue;
                    }
                    None => break,
                },
            };
            let segment = &self.segments[i];
            let mut span: Option<Span> = None;
            while seq < segment.end_seq() && seq <= upto && msgs < max_msgs {
                let entry = segment.entries[(seq - segment.first_seq) as usize];
                if entry.subject != DELETED {
                    if msgs > 0 && bytes + entry.len as usize > max_bytes {
                        break;
                    }
                    let span = span.get_or_insert_with(|| Span {
                        file: segment.file.clone(),
                        path: segment.path.clone(),
                        salt: segment.salt,
                        start: u64::from(entry.pos),
                        len: 0,
                        // sized once (growing it entry by entry showed in profiles), and
                        // never past what this segment holds
                        records: Vec::with_capacity(
                            (max_msgs - msgs)
                                .min(segment.end_seq().saturating_sub(seq) as usize)
                                .min(8192),
                        ),
                    });
                    let rel = (u64::from(entry.pos) - span.start) as usize;
                    span.records.push((seq, rel, entry.len as usize));
                    span.len = rel + entry.len as usize;
                    msgs += 1;
                    bytes += entry.len as usize;
                }
                seq += 1;
            }
            spans.extend(span);
            if msgs > 0 && seq < segment.end_seq() && seq <= upto {
                break; // stopped by a limit
            }
        }
        spans
    }
}

/// The offset of the first valid record at or after `from`: evidence that damage at
/// `from - 1` is not a torn tail. (A torn write leaves nothing valid behind it: the
/// bytes after the tear were never written.)
///
/// Only a record of this segment (checksummed with its `salt`) counts: records written
/// into a message's payload by a publisher do not, as the salt is never revealed.
fn resync(data: &[u8], from: usize, salt: u64) -> Option<usize> {
    (from..data.len().saturating_sub(HEADER_LEN - 1)).find(|&at| {
        let header = &data[at..at + HEADER_LEN];
        let plausible = Kind::from_byte(header[8]).is_some() && header[9] == 0;
        plausible && record::decode(&data[at..], salt, MAX_RECORD_LEN).is_ok()
    })
}

/// The pending write to `segment`'s end, the last of `ops` (a new one if the last op
/// is anything else).
/// The capacity a batch's write buffer starts with.
const WRITE_BUFFER: usize = 64 * 1024;

fn write_buffer<'a>(ops: &'a mut Vec<Op>, segment: &Segment) -> &'a mut Vec<u8> {
    let pos = segment.len;
    let extend = matches!(
        ops.last(),
        Some(Op::Write { file, offset, bytes, .. })
            if Arc::ptr_eq(file, &segment.file) && offset + bytes.len() as u64 == pos
    );
    if !extend {
        ops.push(Op::Write {
            file: segment.file.clone(),
            path: segment.path.clone(),
            offset: pos,
            // a batch of small publishes fills tens of KiB: room for it from the start
            // rather than reallocations (and copies) as it grows
            bytes: Vec::with_capacity(WRITE_BUFFER),
        });
    }
    let Some(Op::Write { bytes, .. }) = ops.last_mut() else {
        unreachable!("a write was pushed above")
    };
    bytes
}

/// A new segment's salt, from the operating system's random source.
fn new_salt(path: &Path) -> Result<u64, StoreError> {
    getrandom::u64().map_err(|e| {
        StoreError::io(
            "draw a random salt for",
            path,
            std::io::Error::other(e.to_string()),
        )
    })
}

/// Writes `bytes`, cut from `path` at `offset`, to a file beside it
/// (`….log.cut-<offset>.damaged`), synced; returns its path.
fn keep_aside(
    fs: &dyn Fs,
    path: &Path,
    offset: usize,
    bytes: &[u8],
) -> Result<PathBuf, StoreError> {
    let aside = aside_path(fs, path, &format!("cut-{offset}"))?;
    let file = fs
        .open(&aside, true)
        .map_err(|e| StoreError::io("create", &aside, e))?;
    file.write_all_at(bytes, 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| StoreError::io("write", &aside, e))?;
    Ok(aside)
}

/// Moves a last segment whose header is torn (`error`) aside, whole; returns where.
fn set_aside_torn(
    fs: &dyn Fs,
    path: &Path,
    error: &DecodeError,
    bytes: usize,
) -> Result<PathBuf, StoreError> {
    let aside = aside_path(fs, path, "torn")?;
    tracing::warn!(
        file = %path.display(),
        bytes,
        "a segment whose first write is torn ({error}) is moved to {}",
        aside.display()
    );
    fs.rename(path, &aside)
        .map_err(|e| StoreError::io("rename", path, e))?;
    Ok(aside)
}

/// A name for keeping `path` (or bytes of it) aside that no file has:
/// `….log.<tag>.damaged`, then `….log.<tag>.2.damaged`, ….
fn aside_path(fs: &dyn Fs, path: &Path, tag: &str) -> Result<PathBuf, StoreError> {
    let dir = path.parent().unwrap_or(Path::new(""));
    let names = fs.list(dir).map_err(|e| StoreError::io("list", dir, e))?;
    let base = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = (1..)
        .map(|n| match n {
            1 => format!("{base}.{tag}.damaged"),
            n => format!("{base}.{tag}.{n}.damaged"),
        })
        .find(|name| !names.contains(name))
        .expect("an unused name");
    Ok(dir.join(name))
}

/// The salt a segment whose header is damaged was written with: the one its header
/// names, or that one with one bit or one byte changed, if the first record (its
/// configuration, at the same place in every segment) verifies with it.
fn recover_salt(data: &[u8]) -> Option<u64> {
    let named = u64::from_le_bytes(data.get(20..28)?.try_into().ok()?);
    if resync(data, SEGMENT_HEADER_LEN, named).is_some() {
        return Some(named);
    }
    let first = data.get(SEGMENT_HEADER_LEN..)?;
    let verifies = |salt: u64| record::decode(first, salt, MAX_RECORD_LEN).is_ok();
    let bits = (0..64).map(|bit| named ^ (1 << bit));
    let bytes =
        (0..8).flat_map(|byte| (1..=255u64).map(move |value| named ^ (value << (8 * byte))));
    bits.chain(bytes).find(|&salt| verifies(salt))
}

/// Moves a segment that cannot be read at all aside (`….log.damaged`), so that no
/// segment is ever started under its name, and reports it. True if it was moved.
fn move_aside(fs: &dyn Fs, path: &Path, reason: String, damage: &mut Vec<StoreError>) -> bool {
    let aside =
        aside_path(fs, path, "skipped").unwrap_or_else(|_| path.with_extension("log.damaged"));
    let moved = fs.rename(path, &aside).is_ok();
    let whereto = if moved {
        format!("; moved to {}", aside.display())
    } else {
        String::new()
    };
    damage.push(StoreError::corrupt(
        path,
        0,
        format!("{reason}; skipped whole{whereto}"),
    ));
    moved
}

/// The `Msg-Id` header of a record read back, if any.
fn msg_id_of(record: &Record<'_>) -> Result<Option<String>, String> {
    let id = record::find_header(record.headers, MSG_ID_HEADER).map_err(|e| e.to_string())?;
    id.map(|id| std::str::from_utf8(id).map(str::to_owned))
        .transpose()
        .map_err(|_| format!("{MSG_ID_HEADER} is not UTF-8"))
}

/// Reads the messages of `spans`, verifying each record.
pub(crate) fn read_spans(spans: Vec<Span>) -> Result<Vec<StoredMessage>, StoreError> {
    let mut out = Vec::with_capacity(spans.iter().map(|s| s.records.len()).sum());
    let mut names = crate::SharedNames::default();
    for span in spans {
        let mut buf = vec![0; span.len];
        span.file
            .read_exact_at(&mut buf, span.start)
            .map_err(|e| StoreError::io("read", &span.path, e))?;
        let buf = Bytes::from(buf);
        for (seq, rel, len) in span.records {
            let at = span.start + rel as u64;
            let bytes = buf.slice(rel..rel + len);
            out.push(message_from(
                &span.path, span.salt, at, seq, &bytes, &mut names,
            )?);
        }
    }
    Ok(out)
}

fn message_from(
    path: &Path,
    salt: u64,
    at: u64,
    seq: u64,
    bytes: &Bytes,
    names: &mut crate::SharedNames,
) -> Result<StoredMessage, StoreError> {
    let record = record::decode_at_boundary(bytes, salt, MAX_RECORD_LEN)
        .map_err(|e| StoreError::corrupt(path, at, e))?;
    if record.kind != Kind::Message || record.seq != seq {
        return Err(StoreError::corrupt(
            path,
            at,
            format!(
                "expected message {seq}, found {:?} {}",
                record.kind, record.seq
            ),
        ));
    }
    let subject_at = HEADER_LEN;
    let headers_at = subject_at + record.subject.len();
    let payload_at = headers_at + record.headers.len();
    let headers = bytes.slice(headers_at..payload_at);
    let headers = record::headers(&headers, names)
        .map_err(|e: DecodeError| StoreError::corrupt(path, at, e))?;
    Ok(StoredMessage {
        seq,
        time: record.time,
        subject: names.subject(record.subject),
        headers,
        payload: bytes.slice(payload_at..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_whose_hashes_collide_are_both_kept_found_and_expired() {
        let mut dedup = Dedup::new(100);
        // another id already holds the slot of `b`'s hash: a 64-bit collision
        let hash_b = dedup.key("b").hash;
        let other = Seen {
            seq: 1,
            time: 10,
            holder: 1,
        };
        dedup.ids.insert(hash_b, (Arc::from("other"), other));
        dedup.order.push_back((10, Arc::from("other")));
        dedup.insert("b", 2, 20, 1);
        dedup.insert("a", 3, 30, 1);
        assert_eq!(dedup.collided.len(), 1, "`b` went aside");
        assert_eq!(dedup.get("b", 50), Some(2));
        assert_eq!(dedup.get("a", 50), Some(3));
        assert_eq!(dedup.get("c", 50), None);
        let held: Vec<u64> = dedup.held_by(0, &[1]).iter().map(|h| h.0).collect();
        assert_eq!(held, vec![1, 2, 3]);
        dedup.seen_mut("b").unwrap().holder = 7;
        assert_eq!(dedup.held_by(0, &[7]).len(), 1);
        // past the window of `b` (time 20), not of `a`
        dedup.expire(125);
        assert_eq!(dedup.get("b", 125), None);
        assert_eq!(dedup.get("a", 125), Some(3));
        assert!(dedup.collided.is_empty());
    }

    #[test]
    fn numbered_ids_split_only_when_the_pair_gives_the_id_back() {
        assert_eq!(numbered_id("courier-x.17"), Some(("courier-x", 17)));
        assert_eq!(numbered_id("a.b.0"), Some(("a.b", 0)));
        for other in [
            "x.017",
            "x.",
            ".5",
            "x.+5",
            "x.-5",
            "x.5a",
            "x5",
            "x.99999999999999999999",
        ] {
            assert_eq!(numbered_id(other), None, "{other}");
        }
    }

    #[test]
    fn a_publisher_numbering_its_ids_costs_one_run_and_no_table_entries() {
        let mut dedup = Dedup::new(1_000);
        for n in 1..=500u64 {
            dedup.insert(&format!("p.{n}"), n, n as i64, 1);
        }
        assert_eq!(dedup.runs.len(), 1);
        assert!(dedup.ids.is_empty() && dedup.order.is_empty());
        for n in 1..=500u64 {
            assert_eq!(dedup.get(&format!("p.{n}"), 600), Some(n));
        }
        for absent in ["p.0", "p.501", "p.0001", "q.1", "p"] {
            assert_eq!(dedup.get(absent, 600), None, "{absent}");
        }
        // restated ids keep their place; the holder moves
        dedup.seen_mut("p.7").unwrap().holder = 9;
        let held = dedup.held_by(0, &[9]);
        assert_eq!(held, vec![(7, 7, "p.7".to_string())]);
        // the window moves past the first 199 (checked at once, forgotten at the sweep)
        assert_eq!(dedup.get("p.199", 1_200), None);
        assert_eq!(dedup.get("p.200", 1_200), Some(200));
        dedup.expire(1_200);
        assert_eq!(dedup.runs.values().next().unwrap().first, 200);
        dedup.expire(3_000);
        assert!(dedup.runs.is_empty(), "a run whose ids all expired goes");
    }

    #[test]
    fn numbers_out_of_order_fill_their_gap_and_far_ones_go_to_the_table() {
        let mut dedup = Dedup::new(1_000);
        dedup.insert("p.1", 1, 10, 1);
        dedup.insert("p.3", 2, 11, 1); // p.2 raced behind it
        assert_eq!(dedup.get("p.2", 12), None);
        dedup.insert("p.2", 3, 12, 1);
        assert_eq!(dedup.get("p.2", 12), Some(3));
        assert!(dedup.ids.is_empty());
        // far past the end, and before the start: the table
        let far = 3 + MAX_RUN_GAP + 2;
        dedup.insert(&format!("p.{far}"), 4, 13, 1);
        dedup.insert("p.0", 5, 14, 1);
        assert_eq!(dedup.ids.len(), 2);
        assert_eq!(dedup.get(&format!("p.{far}"), 15), Some(4));
        assert_eq!(dedup.get("p.0", 15), Some(5));
        assert_eq!(dedup.get("p.4", 15), None);
        // a table entry stated again in its run: the run's statement wins, once
        let mut more = Dedup::new(1_000);
        more.insert("q.50", 1, 10, 1);
        more.insert("q.1", 2, 11, 1); // starts q's run? no: q.50 began it
        assert_eq!(more.ids.len(), 1, "q.1 is before the run of q (from 50)");
        more.insert("q.1", 3, 12, 2);
        assert_eq!(more.get("q.1", 13), Some(3));
        assert_eq!(more.held_by(0, &[1, 2]).len(), 2);
    }

    #[test]
    fn a_publisher_skipping_numbers_leaves_at_most_as_many_empty_entries_as_ids() {
        let mut dedup = Dedup::new(1_000_000);
        for k in 0..1_000u64 {
            let n = k * MAX_RUN_GAP; // every id 63 numbers past the last
            dedup.insert(&format!("p.{n}"), k + 1, k as i64, 1);
        }
        let run = dedup.runs.values().next().unwrap();
        let ids = run.entries.len() - run.empty;
        let empty = run.entries.iter().filter(|seen| seen.seq == 0).count();
        println!(
            "run: {ids} ids, {empty} empty entries; table: {} ids",
            dedup.ids.len()
        );
        assert_eq!(empty, run.empty);
        assert!(run.empty <= ids, "{} empty for {ids} ids", run.empty);
        assert_eq!(ids + dedup.ids.len(), 1_000);
        for k in 0..1_000u64 {
            assert_eq!(
                dedup.get(&format!("p.{}", k * MAX_RUN_GAP), 2_000),
                Some(k + 1)
            );
        }
    }

    #[test]
    fn prefixes_past_the_limit_of_runs_are_kept_in_the_table() {
        let mut dedup = Dedup::new(1_000);
        for p in 0..MAX_RUNS + 10 {
            dedup.insert(&format!("p{p}.1"), p as u64 + 1, 5, 1);
        }
        assert_eq!(dedup.runs.len(), MAX_RUNS);
        assert_eq!(dedup.ids.len(), 10);
        for p in 0..MAX_RUNS + 10 {
            assert_eq!(dedup.get(&format!("p{p}.1"), 6), Some(p as u64 + 1));
        }
    }

    proptest::proptest! {
        /// The window answers as a plain map of every id to its newest statement would,
        /// whichever ids go to runs and which to the table.
        #[test]
        fn the_window_answers_as_a_map_of_newest_statements(
            ops in proptest::collection::vec((0u8..4, 0u64..200, 0u8..3, 0i64..30), 1..300),
        ) {
            let window = 100;
            let mut dedup = Dedup::new(window);
            let mut model: HashMap<String, Seen> = HashMap::new();
            let mut now = 0i64;
            for (i, (prefix, n, what, step)) in ops.into_iter().enumerate() {
                now += step;
                let id = match prefix {
                    0 => format!("a.{n}"),
                    1 => format!("b.{}", n % 8),
                    2 => format!("c.0{n}"),
                    _ => format!("plain-{}", n % 16),
                };
                match what {
                    0 | 1 => {
                        let seq = i as u64 + 1;
                        let holder = u64::from(what) + 1;
                        dedup.expire(now);
                        dedup.insert(&id, seq, now, holder);
                        model.insert(id, Seen { seq, time: now, holder });
                    }
                    _ => {
                        dedup.expire(now);
                        let want = model
                            .get(&id)
                            .filter(|seen| seen.time >= now - window)
                            .map(|seen| seen.seq);
                        proptest::prop_assert_eq!(dedup.get(&id, now), want, "{}", id);
                    }
                }
            }
            let since = now - window;
            let mut want: Vec<(u64, i64, String)> = model
                .iter()
                .filter(|(_, seen)| seen.time >= since && seen.holder == 1)
                .map(|(id, seen)| (seen.seq, seen.time, id.clone()))
                .collect();
            want.sort_unstable();
            proptest::prop_assert_eq!(dedup.held_by(since, &[1]), want);
        }
    }

    use crate::fs::MemFs;

    fn log() -> Log {
        let config = StreamConfig {
            segment_size: 4096,
            ..StreamConfig::new("L", ["l.*"])
        };
        Log::create(Arc::new(MemFs::default()), Path::new("/l"), &config).unwrap()
    }

    #[test]
    fn segment_names_are_twenty_digits_and_nothing_else_parses() {
        assert_eq!(segment_name(42), "00000000000000000042.log");
        assert_eq!(parse_segment_name("00000000000000000042.log"), Some(42));
        for bad in [
            "42.log",
            "0000000000000000004x.log",
            "00000000000000000042.tmp",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn appends_roll_segments_and_locate_spans_each_segment_once() {
        let mut log = log();
        for i in 0..100u64 {
            let seq = log
                .append(
                    if i % 2 == 0 { "l.a" } else { "l.b" },
                    &[],
                    &[0; 100],
                    0,
                    None,
                )
                .unwrap();
            assert_eq!(seq, i + 1);
        }
        let counts = log.counts();
        assert!(counts.segments >= 3, "{counts:?}");
        let spans = log.locate(1, 100, usize::MAX, usize::MAX);
        assert_eq!(spans.len() as u64, counts.segments);
        assert_eq!(spans.iter().map(|s| s.records.len()).sum::<usize>(), 100);
        assert_eq!(log.locate(5, 100, 3, usize::MAX)[0].records.len(), 3);
    }

    #[test]
    fn removing_a_subjects_first_or_last_message_moves_its_bounds() {
        let mut log = log();
        for subject in ["l.a", "l.b", "l.a", "l.b", "l.a"] {
            log.append(subject, &[], b"x", 0, None).unwrap();
        }
        assert_eq!(
            (log.first_of("l.a"), log.last_of("l.a")),
            (Some(1), Some(5))
        );
        assert!(log.delete(5));
        assert_eq!(log.last_of("l.a"), Some(3));
        assert!(log.delete(1));
        assert_eq!((log.first_of("l.a"), log.msgs_of("l.a")), (Some(3), 1));
        assert_eq!(log.counts().first_seq, 2);
        assert!(!log.delete(1), "already gone");
        assert!(log.delete(3));
        assert_eq!(log.first_of("l.a"), None);
        assert_eq!(log.last_of_upto("l.b", 3), Some(2));
    }

    #[test]
    fn removing_every_message_of_a_segment_removes_the_segment_file() {
        let mut log = log();
        for _ in 0..100 {
            log.append("l.a", &[], &[0; 100], 0, None).unwrap();
        }
        let before = log.counts().segments;
        log.take_ops();
        while log.counts().first_seq < 60 {
            log.remove_oldest();
        }
        let ops = log.take_ops();
        let removed = ops
            .iter()
            .filter(|op| matches!(op, Op::Remove { .. }))
            .count() as u64;
        assert!(removed >= 1);
        assert_eq!(log.counts().segments, before - removed);
        let first_remove = ops.iter().position(|op| matches!(op, Op::Remove { .. }));
        let last_sync = ops.iter().rposition(|op| matches!(op, Op::SyncDir));
        assert!(
            first_remove < last_sync,
            "the directory is synced after a removal"
        );
    }
}
