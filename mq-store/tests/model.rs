//! A stream against a model: random operations (publishes, pipelined bursts, deletes,
//! purges, updates, restarts) on a simulated disk, with injected write, fsync and
//! directory-sync errors, full disks, power losses with torn pages, and a crash before
//! any single file operation. After every step the stream must agree with the model:
//! the same messages, sequences, subjects and duplicates, no damage, and nothing
//! acknowledged lost. Then targeted cases found by the same review.
//!
//! Knobs (environment): CASES (more cases, from a random seed), FAULTS, BURSTS,
//! TARGET_MAX (how far into a case the crash point may fall), VERBOSE, TRACE.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mq_store::clock::{Clock, ManualClock};
use mq_store::fault::{SimFs, SimOp};
use mq_store::record::HEADER_LEN;
use mq_store::{Discard, Publish, Store, StoreError, Stream, StreamConfig};
use proptest::prelude::*;

const ROOT: &str = "/m";
const SUBJECTS: [&str; 4] = ["s.a", "s.b", "s.c.x", "s.c.y"];
const FILTERS: [&str; 5] = ["s.a", "s.c.*", "s.>", "s.b", "s.*"];
const WINDOW_SECS: u64 = 8;
const SEC: i64 = 1_000_000_000;

#[derive(Clone, Debug)]
enum Fault {
    Write,
    Sync,
    DirSync,
    Full(u16),
}

#[derive(Clone, Debug)]
enum Op {
    Publish {
        subject: usize,
        size: usize,
        msg_id: Option<u8>,
        advance: u8,
    },
    Delete(prop::sample::Index, bool),
    PurgeAll,
    PurgeSubject(usize),
    Update {
        max_msgs: Option<u64>,
        max_bytes: Option<u64>,
        per_subject: Option<u64>,
        segment_size: u64,
    },
    Reopen,
    PowerLoss(Option<u64>),
    Burst {
        items: Vec<(usize, usize, Option<u8>)>,
        mid: Option<(usize, Box<Op>)>,
    },
    Faulty {
        fault: Fault,
        inner: Box<Op>,
        power_loss: Option<Option<u64>>,
    },
}

fn plain_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..SUBJECTS.len(), 0usize..1200, prop::option::weighted(0.4, 0u8..6), 0u8..3)
            .prop_map(|(subject, size, msg_id, advance)| Op::Publish { subject, size, msg_id, advance }),
        3 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(i, b)| Op::Delete(i, b)),
        1 => Just(Op::PurgeAll),
        1 => (0..FILTERS.len()).prop_map(Op::PurgeSubject),
        1 => (
            prop::option::weighted(0.3, 1u64..20),
            prop::option::weighted(0.2, 2000u64..20000),
            prop::option::weighted(0.3, 1u64..5),
            prop_oneof![Just(4096u64), Just(8192u64), Just(1 << 20)],
        )
            .prop_map(|(max_msgs, max_bytes, per_subject, segment_size)| Op::Update {
                max_msgs,
                max_bytes,
                per_subject,
                segment_size
            }),
    ]
}

fn burst() -> impl Strategy<Value = Op> {
    (
        prop::collection::vec(
            (
                0..SUBJECTS.len(),
                0usize..1200,
                prop::option::weighted(0.4, 0u8..6),
            ),
            2..12,
        ),
        prop::option::weighted(
            0.5,
            (
                any::<usize>(),
                prop_oneof![
                    Just(Op::PurgeAll),
                    (0..FILTERS.len()).prop_map(Op::PurgeSubject),
                    any::<prop::sample::Index>().prop_map(|i| Op::Delete(i, true)),
                    (
                        prop::option::weighted(0.3, 1u64..20),
                        prop::option::weighted(0.2, 2000u64..20000),
                        prop::option::weighted(0.3, 1u64..5),
                        prop_oneof![Just(4096u64), Just(8192u64), Just(1 << 20)],
                    )
                        .prop_map(
                            |(max_msgs, max_bytes, per_subject, segment_size)| Op::Update {
                                max_msgs,
                                max_bytes,
                                per_subject,
                                segment_size
                            }
                        ),
                ]
                .prop_map(Box::new),
            ),
        ),
    )
        .prop_map(|(items, mid)| Op::Burst { items, mid })
}

fn op() -> impl Strategy<Value = Op> {
    let faults = std::env::var("FAULTS").map_or(1, |f| f.parse().unwrap());
    let bursts = std::env::var("BURSTS").map_or(2, |f| f.parse().unwrap());
    prop_oneof![
        bursts => burst(),
        16 => plain_op(),
        1 => Just(Op::Reopen),
        1 => prop::option::of(any::<u64>()).prop_map(Op::PowerLoss),
        faults => (
            prop_oneof![Just(Fault::Write), Just(Fault::Sync), Just(Fault::DirSync), any::<u16>().prop_map(Fault::Full)],
            plain_op(),
            prop::option::weighted(0.4, prop::option::of(any::<u64>())),
        )
            .prop_map(|(fault, inner, power_loss)| Op::Faulty { fault, inner: Box::new(inner), power_loss }),
    ]
}

#[derive(Clone, Debug, PartialEq)]
struct Msg {
    subject: String,
    payload: Vec<u8>,
    time: i64,
    msg_id: Option<String>,
    len: u64,
}

#[derive(Clone, Debug)]
struct Model {
    msgs: BTreeMap<u64, Msg>,
    last_seq: u64,
    /// id -> (seq, time, certain to be remembered)
    dedup: HashMap<String, (u64, i64, bool)>,
    config: StreamConfig,
    last_expiry: i64,
    /// every message ever acknowledged or in flight, by sequence
    published: BTreeMap<u64, Msg>,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.msgs.values().map(|m| m.len).sum()
    }
    fn trim(&mut self) {
        loop {
            let over = self
                .config
                .max_msgs
                .is_some_and(|m| self.msgs.len() as u64 > m)
                || self.config.max_bytes.is_some_and(|m| self.bytes() > m);
            if !over || self.msgs.is_empty() {
                return;
            }
            let first = *self.msgs.keys().next().unwrap();
            self.msgs.remove(&first);
        }
    }
    fn per_subject(&mut self, subject: &str) {
        if let Some(max) = self.config.max_msgs_per_subject {
            loop {
                let of: Vec<u64> = self
                    .msgs
                    .iter()
                    .filter(|(_, m)| m.subject == subject)
                    .map(|(s, _)| *s)
                    .collect();
                if of.len() as u64 <= max {
                    return;
                }
                self.msgs.remove(&of[0]);
            }
        }
    }
    /// Applies an acknowledged, stored publish: the next sequence, limits, its id.
    fn store(&mut self, msg: Msg) -> u64 {
        self.last_seq += 1;
        let (subject, msg_id, time) = (msg.subject.clone(), msg.msg_id.clone(), msg.time);
        self.published.insert(self.last_seq, msg.clone());
        self.msgs.insert(self.last_seq, msg);
        self.trim();
        self.per_subject(&subject);
        if let Some(id) = msg_id {
            self.dedup.insert(id, (self.last_seq, time, true));
        }
        self.last_seq
    }

    fn forget_unsure(&mut self) {
        for e in self.dedup.values_mut() {
            if !self.msgs.contains_key(&e.0) {
                e.2 = false;
            }
        }
    }
}

/// Takes a power-loss snapshot of the disk just before the operation number `target`
/// that changes it.
#[derive(Debug, Clone)]
struct CrashPoint {
    counter: Arc<std::sync::atomic::AtomicU64>,
    target: u64,
    tear: Option<u64>,
    slot: Arc<Mutex<Option<SimFs>>>,
}

impl CrashPoint {
    fn tick(&self, fs: &SimFs) {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if std::env::var("TRACE").is_ok() {
            eprintln!(
                "TICK {n} {}",
                std::backtrace::Backtrace::force_capture()
                    .to_string()
                    .lines()
                    .filter(|l| l.contains("mq_store::") && !l.contains("fault::"))
                    .take(3)
                    .map(|l| l.trim())
                    .collect::<Vec<_>>()
                    .join(" <- ")
            );
        }
        if n == self.target {
            *self.slot.lock().unwrap() = Some(fs.power_loss(self.tear));
        }
    }

    /// Counts every operation that changes `fs` from now on.
    fn arm(&self, fs: &SimFs) {
        let point = self.clone();
        fs.set_hook(Some(Arc::new(move |fs: &SimFs, _: SimOp<'_>| {
            point.tick(fs)
        })));
    }
}

fn hdr_len(id: &Option<String>) -> usize {
    id.as_ref().map_or(0, |id| 2 + 6 + 4 + id.len())
}

struct H {
    crash: Option<CrashPoint>,
    fs: SimFs,
    clock: ManualClock,
    store: Option<Store>,
    stream: Option<Stream>,
    model: Model,
}

fn real_msgs(stream: &Stream) -> BTreeMap<u64, Msg> {
    stream
        .range(1, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|m| {
            let id = m
                .header("Msg-Id")
                .map(|v| String::from_utf8(v.to_vec()).unwrap());
            let len = (HEADER_LEN + m.subject.len() + hdr_len(&id) + m.payload.len()) as u64;
            (
                m.seq,
                Msg {
                    subject: m.subject.to_string(),
                    payload: m.payload.to_vec(),
                    time: m.time,
                    msg_id: id,
                    len,
                },
            )
        })
        .collect()
}

/// Checks that the stream's counts, subject index and reads agree with `msgs`/`last_seq`.
fn check_consistent(
    stream: &Stream,
    msgs: &BTreeMap<u64, Msg>,
    last_seq: u64,
    when: &str,
) -> Result<(), TestCaseError> {
    let state = stream.info().state;
    let first = msgs.keys().next().copied().unwrap_or(last_seq + 1);
    let deleted = if msgs.is_empty() {
        0
    } else {
        last_seq + 1 - first - msgs.len() as u64
    };
    let subjects = SUBJECTS
        .iter()
        .filter(|s| msgs.values().any(|m| m.subject == **s))
        .count() as u64;
    let bytes: u64 = msgs.values().map(|m| m.len).sum();
    prop_assert_eq!(
        (
            state.msgs,
            state.bytes,
            state.first_seq,
            state.last_seq,
            state.subjects,
            state.deleted
        ),
        (msgs.len() as u64, bytes, first, last_seq, subjects, deleted),
        "{}: state",
        when
    );
    for subject in SUBJECTS {
        let want = msgs
            .iter()
            .rev()
            .find(|(_, m)| m.subject == subject)
            .map(|(s, _)| *s);
        let got = match stream.last(subject) {
            Ok(m) => Some(m.seq),
            Err(StoreError::NoMessageOnSubject { .. }) => None,
            Err(e) => panic!("{e}"),
        };
        prop_assert_eq!(got, want, "{}: last({})", when, subject);
    }
    for seq in 0..=last_seq + 1 {
        let got = stream.get(seq).ok().map(|m| m.seq);
        let want = msgs.contains_key(&seq).then_some(seq);
        prop_assert_eq!(got, want, "{}: get({})", when, seq);
    }
    let damage: Vec<_> = stream.damage().into_iter().collect();
    prop_assert!(damage.is_empty(), "{}: damage {:?}", when, damage);
    Ok(())
}

fn check(stream: &Stream, model: &Model, when: &str) -> Result<(), TestCaseError> {
    let got = real_msgs(stream);
    let gs: Vec<u64> = got.keys().copied().collect();
    let ws: Vec<u64> = model.msgs.keys().copied().collect();
    prop_assert_eq!(&gs, &ws, "{}: sequences", when);
    prop_assert!(got == model.msgs, "{}: contents differ", when);
    check_consistent(stream, &model.msgs, model.last_seq, when)
}

/// What an op did on the stream.
#[derive(Debug)]
enum Outcome {
    Acked,
    Failed(StoreError),
}

impl H {
    fn stream(&self) -> &Stream {
        self.stream.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.stream = None;
        self.store = None;
        if let Some(crash) = &self.crash {
            crash.arm(&self.fs); // a disk after a power loss is a new one
        }
        let fs = Arc::new(self.fs.clone());
        let store = Store::open_with(fs, Path::new(ROOT), Arc::new(self.clock.clone())).unwrap();
        self.stream = Some(store.stream("M").unwrap());
        self.store = Some(store);
        self.model.last_expiry = self.clock.now();
    }

    /// Applies `op` to the stream and, if it was acknowledged, to the model.
    /// `faulty`: clock may not move (no expiry), and a failure is allowed.
    async fn apply(
        &mut self,
        op: &Op,
        step: usize,
        faulty: bool,
        when: &str,
    ) -> Result<Outcome, TestCaseError> {
        let model = &mut self.model;
        let stream = self.stream.as_ref().unwrap();
        match op {
            Op::Publish {
                subject,
                size,
                msg_id,
                advance,
            } => {
                let advance = if faulty { 0 } else { *advance };
                let subject = SUBJECTS[*subject];
                let msg_id = msg_id.map(|i| format!("id{i}"));
                let payload = vec![(step % 251) as u8; *size];
                let window = (WINDOW_SECS as i64) * SEC;
                let record_len = (HEADER_LEN + subject.len() + hdr_len(&msg_id) + size) as u64;
                let now_if = self.clock.now() + i64::from(advance) * SEC;
                let entry = msg_id
                    .as_ref()
                    .and_then(|id| model.dedup.get(id))
                    .filter(|(_, t, _)| *t >= now_if - window)
                    .copied();
                let uncertain = entry.is_some_and(|e| !e.2);
                let mut dup = entry.map(|(s, _, _)| s);
                let refused = model.config.max_bytes.is_some_and(|m| record_len > m);
                if dup.is_none() && !refused {
                    self.clock.advance(Duration::from_secs(u64::from(advance)));
                }
                let now = self.clock.now();
                let options = Publish {
                    msg_id: msg_id.clone(),
                    ..Publish::default()
                };
                let result = match stream.publish(subject, &[], &payload, &options).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                if uncertain && !result.as_ref().is_ok_and(|a| a.duplicate) {
                    dup = None;
                    model.dedup.remove(msg_id.as_ref().unwrap());
                }
                let refused = dup.is_none() && refused;
                if let Some(seq) = dup {
                    let ack = result.unwrap();
                    prop_assert_eq!((ack.seq, ack.duplicate), (seq, true), "{}", when);
                    return Ok(Outcome::Acked);
                }
                if refused {
                    prop_assert!(
                        matches!(result, Err(StoreError::LimitReached { .. })),
                        "{}: {:?}",
                        when,
                        result
                    );
                    return Ok(Outcome::Acked);
                }
                let ack = match result {
                    Ok(ack) => ack,
                    Err(e) if faulty => return Ok(Outcome::Failed(e)),
                    Err(e) => panic!("{when}: {e}"),
                };
                prop_assert!(!ack.duplicate, "{}", when);
                if let Some(age) = model.config.max_age
                    && now - model.last_expiry >= SEC.min(age.as_nanos() as i64)
                {
                    model.last_expiry = now;
                    let cutoff = now - age.as_nanos() as i64;
                    model.msgs.retain(|_, m| m.time >= cutoff);
                }
                let seq = model.store(Msg {
                    subject: subject.to_owned(),
                    payload,
                    time: now,
                    msg_id,
                    len: record_len,
                });
                prop_assert_eq!(ack.seq, seq, "{}", when);
            }
            Op::Delete(at, existing) => {
                let seq = if *existing && !model.msgs.is_empty() {
                    *model.msgs.keys().nth(at.index(model.msgs.len())).unwrap()
                } else {
                    at.index(model.last_seq as usize + 3) as u64
                };
                let got = match stream.delete_message(seq).await {
                    Ok(got) => got,
                    Err(e) if faulty => return Ok(Outcome::Failed(e)),
                    Err(e) => panic!("{when}: {e}"),
                };
                let want = model.msgs.remove(&seq).is_some();
                prop_assert_eq!(got, want, "{}", when);
            }
            Op::PurgeAll => {
                let got = match stream.purge(None).await {
                    Ok(got) => got,
                    Err(e) if faulty => return Ok(Outcome::Failed(e)),
                    Err(e) => panic!("{when}: {e}"),
                };
                let want = model.msgs.len() as u64;
                model.msgs.clear();
                prop_assert_eq!(got, want, "{}", when);
            }
            Op::PurgeSubject(f) => {
                let filter = FILTERS[*f];
                let got = match stream.purge(Some(filter)).await {
                    Ok(got) => got,
                    Err(e) if faulty => return Ok(Outcome::Failed(e)),
                    Err(e) => panic!("{when}: {e}"),
                };
                let before = model.msgs.len();
                model
                    .msgs
                    .retain(|_, m| !mq_store::subject::matches(filter, &m.subject));
                prop_assert_eq!(got, (before - model.msgs.len()) as u64, "{}", when);
            }
            Op::Update {
                max_msgs,
                max_bytes,
                per_subject,
                segment_size,
            } => {
                let config = StreamConfig {
                    max_msgs: *max_msgs,
                    max_bytes: *max_bytes,
                    max_msgs_per_subject: *per_subject,
                    segment_size: *segment_size,
                    ..model.config.clone()
                };
                match self.store.as_ref().unwrap().update(config.clone()).await {
                    Ok(_) => {}
                    Err(e) if faulty => return Ok(Outcome::Failed(e)),
                    Err(e) => panic!("{when}: {e}"),
                }
                model.config = config;
                model.trim();
                for s in SUBJECTS {
                    model.per_subject(s);
                }
            }
            _ => unreachable!(),
        }
        Ok(Outcome::Acked)
    }
}

/// Opens the snapshot taken at the crash point and checks it against the model before
/// and after the op that was in flight.
fn verify_crash(
    snapshot: &SimFs,
    clock: &ManualClock,
    before: &Model,
    after: &Model,
    when: &str,
) -> Result<(), TestCaseError> {
    if std::env::var("VERBOSE").is_ok() {
        eprintln!(
            "CRASH-VERIFY {}",
            when.split(' ').take(3).collect::<Vec<_>>().join(" ")
        );
    }
    CRASHES_VERIFIED.fetch_add(1, Ordering::SeqCst);
    for round in 0..2 {
        let when = format!("{when} crash snapshot, open {round}");
        let store = Store::open_with(
            Arc::new(snapshot.clone()),
            Path::new(ROOT),
            Arc::new(clock.clone()),
        );
        let store = match store {
            Ok(s) => s,
            Err(e) => return Err(TestCaseError::fail(format!("{when}: open: {e}"))),
        };
        let stream = match store.stream("M") {
            Ok(s) => s,
            Err(e) => return Err(TestCaseError::fail(format!("{when}: stream: {e}"))),
        };
        // in flight when it crashed: may be there or not
        let in_flight =
            |seq: u64, m: &Msg| seq > before.last_seq && after.published.get(&seq) == Some(m);
        check_survivors(&stream, before, after, in_flight, &when)?;
    }
    Ok(())
}

/// Checks what `stream` holds after a crash or a failed operation, between the model
/// `before` it and what it would be had it completed (`after`): sequences never go
/// back; every message served is one of either (or one `also` allows); every
/// acknowledged message `after` still holds is there. Returns what it holds and its
/// last sequence.
fn check_survivors(
    stream: &Stream,
    before: &Model,
    after: &Model,
    also: impl Fn(u64, &Msg) -> bool,
    when: &str,
) -> Result<(BTreeMap<u64, Msg>, u64), TestCaseError> {
    let real = real_msgs(stream);
    let last_seq = stream.info().state.last_seq;
    prop_assert!(
        last_seq >= before.last_seq,
        "{}: last_seq went back {} < {}",
        when,
        last_seq,
        before.last_seq
    );
    for (seq, m) in &real {
        let ok = before.msgs.get(seq) == Some(m) || after.msgs.get(seq) == Some(m) || also(*seq, m);
        prop_assert!(
            ok,
            "{}: served {} which was never stored or was deleted ({:?})",
            when,
            seq,
            m
        );
    }
    for (seq, m) in &before.msgs {
        let ok = real.get(seq) == Some(m) || !after.msgs.contains_key(seq);
        prop_assert!(ok, "{}: acknowledged {} lost", when, seq);
    }
    check_consistent(stream, &real, last_seq, when)?;
    Ok((real, last_seq))
}

fn run_case(max_age: Option<u64>, initial_segment: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    run_case_crash(max_age, initial_segment, ops, None)
}

thread_local! {
    static FSYNC: std::cell::Cell<mq_store::Fsync> = const { std::cell::Cell::new(mq_store::Fsync::Always) };
}

fn run_case_crash(
    max_age: Option<u64>,
    initial_segment: u64,
    ops: Vec<Op>,
    crash: Option<(u64, Option<u64>)>,
) -> Result<(), TestCaseError> {
    let fsync = FSYNC.with(|f| f.get());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let fs = SimFs::default();
        let clock = ManualClock::new(1_700_000_000_000_000_000);
        let config = StreamConfig {
            segment_size: initial_segment,
            max_age: max_age.map(Duration::from_secs),
            duplicate_window: Duration::from_secs(WINDOW_SECS),
            discard: Discard::Old,
            fsync,
            ..StreamConfig::new("M", ["s.>"])
        };
        let crash = crash.map(|(target, tear)| CrashPoint {
            counter: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            target,
            tear,
            slot: Arc::new(Mutex::new(None)),
        });
        if let Some(crash) = &crash {
            crash.arm(&fs);
        }
        let root_fs = Arc::new(fs.clone());
        let store = Store::open_with(root_fs, Path::new(ROOT), Arc::new(clock.clone())).unwrap();
        let stream = store.create(config.clone()).unwrap();
        let mut h = H {
            crash,
            fs,
            model: Model {
                msgs: BTreeMap::new(),
                last_seq: 0,
                dedup: HashMap::new(),
                config,
                last_expiry: clock.now(),
                published: BTreeMap::new(),
            },
            clock,
            store: Some(store),
            stream: Some(stream),
        };
        // a crash during create: nothing to check
        let mut crash_checked = h
            .crash
            .as_ref()
            .is_some_and(|c| c.slot.lock().unwrap().is_some());
        for (step, op) in ops.into_iter().enumerate() {
            let when = format!("step {step} {op:?}");
            let model_before = h.model.clone();
            let crash_before = h
                .crash
                .as_ref()
                .is_some_and(|c| c.slot.lock().unwrap().is_some());
            if crash_before && !crash_checked {
                // taken between ops (background activity)
                crash_checked = true;
                let snap = h
                    .crash
                    .as_ref()
                    .unwrap()
                    .slot
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap();
                verify_crash(
                    &snap,
                    &h.clock,
                    &h.model,
                    &h.model,
                    &format!("{when} (between ops)"),
                )?;
            }
            let faulty_step = matches!(op, Op::Faulty { .. });
            if std::env::var("TRACE").is_ok() {
                eprintln!("STEP {when}");
            }
            match &op {
                Op::Reopen => {
                    check(h.stream(), &h.model, &format!("{when} before"))?;
                    h.reopen();
                }
                Op::PowerLoss(tear) => {
                    check(h.stream(), &h.model, &format!("{when} before"))?;
                    let after = if fsync == mq_store::Fsync::Always {
                        h.fs.power_loss(*tear)
                    } else {
                        h.fs.clone()
                    };
                    h.stream = None;
                    h.store = None;
                    h.fs = after;
                    h.reopen();
                }
                Op::Faulty { inner, .. } if fsync != mq_store::Fsync::Always => {
                    // background fsyncs under `every` make faults nondeterministic
                    h.apply(inner, step, false, &when).await?;
                }
                Op::Faulty {
                    fault,
                    inner,
                    power_loss,
                } => {
                    match fault {
                        Fault::Write => h.fs.fail_writes(Some(std::io::ErrorKind::Other)),
                        Fault::Sync => h.fs.fail_syncs(true),
                        Fault::DirSync => h.fs.fail_dir_syncs(true),
                        Fault::Full(extra) => {
                            h.fs.set_capacity(Some(h.fs.used() + u64::from(*extra % 2000)))
                        }
                    }
                    let before = h.model.clone();
                    let outcome = h.apply(inner, step, true, &when).await?;
                    // what the failed op would have done to the model
                    let mut would = before.clone();
                    if matches!(outcome, Outcome::Failed(_)) {
                        let mut shadow = H {
                            crash: None,
                            fs: SimFs::default(),
                            clock: ManualClock::new(0),
                            store: None,
                            stream: None,
                            model: before.clone(),
                        };
                        let _ = &mut shadow;
                        // replay on the model only
                        would = model_only(&before, inner, step, h.clock.now());
                    }
                    let lost_power = power_loss.is_some() && fsync == mq_store::Fsync::Always;
                    let power_loss = if lost_power { power_loss } else { &None };
                    if let Some(tear) = power_loss {
                        let after = h.fs.power_loss(*tear);
                        h.stream = None;
                        h.store = None;
                        h.fs = after;
                        h.reopen();
                    } else {
                        h.fs.fail_writes(None);
                        h.fs.fail_syncs(false);
                        h.fs.fail_dir_syncs(false);
                        h.fs.set_capacity(None);
                    }
                    if let Outcome::Failed(e) = outcome {
                        if std::env::var("VERBOSE").is_ok() {
                            eprintln!(
                                "FAILED-OP {fault:?} {} pl={lost_power}",
                                format!("{e}").chars().take(60).collect::<String>()
                            );
                        }
                        // heal (no-op change)
                        if !lost_power {
                            let healed = h.stream().delete_message(0).await;
                            prop_assert!(healed.is_ok(), "{}: heal {:?}", when, healed);
                        }
                        let when = format!("{when} after {e}");
                        let (real, last_seq) =
                            check_survivors(h.stream(), &before, &would, |_, _| false, &when)?;
                        // adopt
                        for (seq, m) in &real {
                            if !before.msgs.contains_key(seq)
                                && let Some(id) = &m.msg_id
                            {
                                h.model.dedup.insert(id.clone(), (*seq, m.time, true));
                            }
                        }
                        h.model.msgs = real;
                        h.model.last_seq = last_seq;
                        h.model.config = h.stream().config();
                        h.model.forget_unsure();
                        if h.crash
                            .as_ref()
                            .is_some_and(|c| c.slot.lock().unwrap().is_some())
                        {
                            crash_checked = true;
                        }
                        continue;
                    }
                    if lost_power {
                        check(
                            h.stream(),
                            &h.model,
                            &format!("{when} (acked, then power loss)"),
                        )?;
                    }
                }
                Op::Burst { items, mid } => {
                    let pre: Vec<u64> = h.model.msgs.keys().copied().collect();
                    let mut pending = Vec::new();
                    for (i, (subject, size, msg_id)) in items.iter().enumerate() {
                        if let Some((at, mid_op)) = mid
                            && at % items.len() == i
                        {
                            let mid_op = match &**mid_op {
                                Op::Delete(idx, _) => {
                                    // a message from before the burst (visible)
                                    if pre.is_empty() {
                                        continue;
                                    }
                                    let seq = pre[idx.index(pre.len())];
                                    let got = h.stream().delete_message(seq).await.unwrap();
                                    let want = h.model.msgs.remove(&seq).is_some();
                                    prop_assert_eq!(got, want, "{} mid delete {}", when, seq);
                                    None
                                }
                                other => Some(other.clone()),
                            };
                            if let Some(mid_op) = mid_op {
                                h.apply(&mid_op, step, false, &when).await?;
                            }
                        }
                        let subject = SUBJECTS[*subject];
                        let mut msg_id = msg_id.map(|i| format!("id{i}"));
                        let model = &mut h.model;
                        let now = h.clock.now();
                        let window = (WINDOW_SECS as i64) * SEC;
                        if let Some(id) = &msg_id
                            && model
                                .dedup
                                .get(id)
                                .is_some_and(|e| !e.2 && e.1 >= now - window)
                        {
                            msg_id = None; // uncertain: keep the burst deterministic
                        }
                        let payload = vec![((step + i) % 251) as u8; *size];
                        let record_len =
                            (HEADER_LEN + subject.len() + hdr_len(&msg_id) + size) as u64;
                        let dup = msg_id
                            .as_ref()
                            .and_then(|id| model.dedup.get(id))
                            .filter(|(_, t, _)| *t >= now - window)
                            .map(|e| e.0);
                        let refused =
                            dup.is_none() && model.config.max_bytes.is_some_and(|m| record_len > m);
                        let options = Publish {
                            msg_id: msg_id.clone(),
                            ..Publish::default()
                        };
                        let result = h
                            .stream
                            .as_ref()
                            .unwrap()
                            .publish(subject, &[], &payload, &options)
                            .await;
                        if refused {
                            prop_assert!(
                                matches!(result, Err(StoreError::LimitReached { .. })),
                                "{}: {:?}",
                                when,
                                result.map(|_| ())
                            );
                            continue;
                        }
                        let ack = result.unwrap();
                        let expected = match dup {
                            Some(seq) => (seq, true),
                            None => {
                                let msg = Msg {
                                    subject: subject.to_owned(),
                                    payload,
                                    time: now,
                                    msg_id,
                                    len: record_len,
                                };
                                (model.store(msg), false)
                            }
                        };
                        pending.push((ack, expected));
                    }
                    for (ack, expected) in pending {
                        let ack = ack.await.unwrap();
                        prop_assert_eq!((ack.seq, ack.duplicate), expected, "{}", when);
                    }
                }
                op => {
                    h.apply(op, step, false, &when).await?;
                }
            }
            if !crash_checked && let Some(c) = &h.crash {
                let snap = c.slot.lock().unwrap().clone();
                if let Some(snap) = snap {
                    crash_checked = true;
                    if !faulty_step {
                        verify_crash(&snap, &h.clock, &model_before, &h.model, &when)?;
                    }
                }
            }
            check(h.stream(), &h.model, &when)?;
        }
        h.reopen();
        check(h.stream(), &h.model, "final reopen")?;
        Ok(())
    })
}

/// `op` applied to a copy of `model` as if it succeeded (publish: not a duplicate,
/// clock not moved).
fn model_only(model: &Model, op: &Op, step: usize, now: i64) -> Model {
    let mut m = model.clone();
    match op {
        Op::Publish {
            subject,
            size,
            msg_id,
            ..
        } => {
            let subject = SUBJECTS[*subject];
            let msg_id = msg_id.map(|i| format!("id{i}"));
            let record_len = (HEADER_LEN + subject.len() + hdr_len(&msg_id) + size) as u64;
            m.last_seq += 1;
            m.msgs.insert(
                m.last_seq,
                Msg {
                    subject: subject.to_owned(),
                    payload: vec![(step % 251) as u8; *size],
                    time: now,
                    msg_id,
                    len: record_len,
                },
            );
            // time unknown here: match on the rest
            m.trim();
            m.per_subject(subject);
        }
        Op::Delete(..) | Op::PurgeAll | Op::PurgeSubject(_) => {
            // any message may go
            m.msgs.clear();
        }
        Op::Update {
            max_msgs,
            max_bytes,
            per_subject,
            segment_size,
        } => {
            m.config.max_msgs = *max_msgs;
            m.config.max_bytes = *max_bytes;
            m.config.max_msgs_per_subject = *per_subject;
            m.config.segment_size = *segment_size;
            m.trim();
            for s in SUBJECTS {
                m.per_subject(s);
            }
        }
        _ => {}
    }
    m
}

fn model_config() -> ProptestConfig {
    let cases = std::env::var("CASES").ok().and_then(|c| c.parse().ok());
    ProptestConfig {
        cases: cases.unwrap_or(96),
        failure_persistence: None,
        rng_seed: match cases {
            Some(_) => proptest::test_runner::RngSeed::Random,
            None => proptest::test_runner::RngSeed::Fixed(0x5eed_2025),
        },
        max_shrink_iters: 4000,
        ..ProptestConfig::default()
    }
}

/// Crash snapshots compared with the model, in all cases run.
static CRASHES_VERIFIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[test]
fn a_power_loss_before_any_file_operation_loses_nothing_acknowledged() {
    let target_max = std::env::var("TARGET_MAX")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(200u64);
    let case = (
        prop::option::weighted(0.3, 2u64..6),
        prop_oneof![Just(4096u64), Just(1u64 << 20)],
        prop::collection::vec(op(), 1..60),
        0..target_max,
        prop::option::of(any::<u64>()),
    );
    let mut runner = proptest::test_runner::TestRunner::new(model_config());
    let result = runner.run(&case, |(max_age, initial_segment, ops, target, tear)| {
        run_case_crash(max_age, initial_segment, ops, Some((target, tear)))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let verified = CRASHES_VERIFIED.load(Ordering::SeqCst);
    println!("crash snapshots checked against the model: {verified}");
    assert!(verified > 0, "no case reached its crash point");
}

proptest! {
    #![proptest_config(model_config())]

    #[test]
    fn a_stream_agrees_with_a_model_through_faults_restarts_and_pipelined_bursts(
        max_age in prop::option::weighted(0.3, 2u64..6),
        initial_segment in prop_oneof![Just(4096u64), Just(1u64 << 20)],
        ops in prop::collection::vec(op(), 1..60),
        fsync in prop_oneof![3 => Just(mq_store::Fsync::Always), 1 => Just(mq_store::Fsync::Never), 1 => Just(mq_store::Fsync::Every(Duration::from_millis(1)))],
    ) {
        FSYNC.with(|f| f.set(fsync));
        run_case(max_age, initial_segment, ops)?;
    }
}

// ---------------------------------------------------------------------------------
// Targeted repros
// ---------------------------------------------------------------------------------

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn open_plain(fs: &SimFs, clock: &ManualClock) -> Store {
    Store::open_with(
        Arc::new(fs.clone()),
        Path::new(ROOT),
        Arc::new(clock.clone()),
    )
    .unwrap()
}

async fn pubw(
    stream: &Stream,
    subject: &str,
    payload: &[u8],
    id: Option<&str>,
) -> Result<mq_store::PubAck, StoreError> {
    let options = Publish {
        msg_id: id.map(str::to_owned),
        ..Publish::default()
    };
    stream.publish(subject, &[], payload, &options).await?.await
}

/// An update whose configuration record does not fit in the current segment rolls it,
/// and the new segment starts with the whole configuration.
#[test]
fn an_update_whose_configuration_rolls_the_segment_writes_it_whole() {
    rt().block_on(async {
        let fs = SimFs::default();
        let clock = ManualClock::new(1_700_000_000_000_000_000);
        let store = open_plain(&fs, &clock);
        let config = StreamConfig {
            segment_size: 4096,
            ..StreamConfig::new("M", ["s.>"])
        };
        let stream = store.create(config.clone()).unwrap();
        for _ in 0..3 {
            pubw(&stream, "s.a", &[1; 1200], None).await.unwrap();
        }
        store
            .update(StreamConfig {
                max_msgs: Some(100),
                ..config
            })
            .await
            .unwrap();
        drop((stream, store));
        let store = open_plain(&fs, &clock);
        let stream = store.stream("M").unwrap();
        assert!(
            stream.damage().is_empty(),
            "spurious damage: {:?}",
            stream.damage()
        );
    });
}

/// A message removed by a limit takes its segment with it, but not its `Msg-Id`: a
/// retry inside the window is a duplicate before and after a restart.
#[test]
fn a_msg_id_whose_segment_a_limit_removed_is_still_a_duplicate_after_a_restart() {
    rt().block_on(async {
        let fs = SimFs::default();
        let clock = ManualClock::new(1_700_000_000_000_000_000);
        let store = open_plain(&fs, &clock);
        let config = StreamConfig {
            segment_size: 4096,
            max_msgs: Some(1),
            ..StreamConfig::new("M", ["s.>"])
        };
        let stream = store.create(config).unwrap();
        let a = pubw(&stream, "s.a", &[1; 3000], Some("a")).await.unwrap();
        pubw(&stream, "s.a", &[2; 3000], Some("b")).await.unwrap();
        let retry = pubw(&stream, "s.a", &[1; 3000], Some("a")).await.unwrap();
        assert!(retry.duplicate && retry.seq == a.seq);
        drop((stream, store));
        let store = open_plain(&fs, &clock);
        let stream = store.stream("M").unwrap();
        let retry = pubw(&stream, "s.a", &[1; 3000], Some("a")).await.unwrap();
        assert!(
            retry.duplicate,
            "after restart the retry was stored again as {}",
            retry.seq
        );
    });
}

/// A store on `fs` with stream `M` (`s.>`) in 4 KiB segments.
fn small_segments(fs: &SimFs, clock: &ManualClock) -> (Store, Stream) {
    let store = open_plain(fs, clock);
    let config = StreamConfig {
        segment_size: 4096,
        ..StreamConfig::new("M", ["s.>"])
    };
    let stream = store.create(config).unwrap();
    (store, stream)
}

/// Every `Msg-Id` restated in the stream's segments, in file order.
fn restated_ids(fs: &SimFs) -> Vec<String> {
    use mq_store::fs::Fs;
    use mq_store::record::{self, Kind};
    let dir = Path::new(ROOT).join("streams/M");
    let mut names = fs.list(&dir).unwrap();
    names.sort();
    let mut ids = Vec::new();
    for name in names {
        let file = fs.open(&dir.join(name), false).unwrap();
        let mut data = vec![0; file.len().unwrap() as usize];
        file.read_exact_at(&mut data, 0).unwrap();
        let salt = record::decode_segment_header(&data).unwrap().salt;
        let mut at = record::SEGMENT_HEADER_LEN;
        while at < data.len() {
            let rec = record::decode(&data[at..], salt, u32::MAX).unwrap();
            if rec.kind == Kind::MsgIds {
                for (_, _, id) in record::msg_ids(rec.payload).unwrap() {
                    ids.push(id.to_owned());
                }
            }
            at += record::peek_len(&data[at..]).unwrap() as usize;
        }
    }
    ids
}

/// Only the ids whose newest statement goes with a removed segment are written again:
/// not those of segments that stay, nor those already restated in one that stays.
#[test]
fn msg_ids_are_restated_only_when_the_segment_stating_them_goes() {
    rt().block_on(async {
        let (fs, clock) = (
            SimFs::default(),
            ManualClock::new(1_700_000_000_000_000_000),
        );
        let (store, stream) = small_segments(&fs, &clock);
        // two messages (about 1.5 KiB each) per segment: a b | c d | e f
        for id in ["a", "b", "c", "d", "e", "f"] {
            pubw(&stream, "s.a", &[0; 1500], Some(id)).await.unwrap();
        }
        assert_eq!(stream.info().state.segments, 3);
        for seq in [1, 2] {
            stream.delete_message(seq).await.unwrap();
        }
        assert_eq!(restated_ids(&fs), ["a", "b"], "the first segment went");
        for seq in [3, 4] {
            stream.delete_message(seq).await.unwrap();
        }
        assert_eq!(
            restated_ids(&fs),
            ["a", "b", "c", "d"],
            "the second went; a and b are stated in the last segment, which stays"
        );
        drop((stream, store));
        let store = open_plain(&fs, &clock);
        let stream = store.stream("M").unwrap();
        for (id, seq) in [("a", 1), ("c", 3), ("f", 6)] {
            let retry = pubw(&stream, "s.a", &[0; 1500], Some(id)).await.unwrap();
            assert_eq!((retry.duplicate, retry.seq), (true, seq), "{id}");
        }
    });
}

/// The last message's time and `Msg-Id` (which `expected_last_msg_id` checks) survive
/// a purge of everything and a restart.
#[test]
fn the_last_message_time_and_msg_id_survive_a_purge_and_a_restart() {
    rt().block_on(async {
        let fs = SimFs::default();
        let clock = ManualClock::new(1_700_000_000_000_000_000);
        let store = open_plain(&fs, &clock);
        let stream = store.create(StreamConfig::new("M", ["s.>"])).unwrap();
        pubw(&stream, "s.a", b"x", Some("x")).await.unwrap();
        stream.purge(None).await.unwrap();
        let before = stream.info().state.last_time;
        let expect = Publish {
            expected_last_msg_id: Some("x".into()),
            ..Publish::default()
        };
        assert!(
            stream.publish("s.a", &[], b"y", &expect).await.is_ok(),
            "before restart: accepted"
        );
        // (undo: that one was stored; use a fresh store for the restart check)
        drop((stream, store));
        let fs = SimFs::default();
        let store = open_plain(&fs, &clock);
        let stream = store.create(StreamConfig::new("M", ["s.>"])).unwrap();
        pubw(&stream, "s.a", b"x", Some("x")).await.unwrap();
        stream.purge(None).await.unwrap();
        drop((stream, store));
        let store = open_plain(&fs, &clock);
        let stream = store.stream("M").unwrap();
        let after = stream.info().state.last_time;
        let r = stream.publish("s.a", &[], b"y", &expect).await;
        assert!(
            r.is_ok() && after == before,
            "after restart: last_time {after} (was {before}), expected_last_msg_id: {:?}",
            r.err()
        );
    });
}

/// Builds the disk as a process killed now leaves it: what was written is there (the
/// page cache), but only what was synced is durable.
fn kill_image(fs: &SimFs, dirs: &[&str]) -> SimFs {
    use mq_store::fs::Fs;
    let durable = fs.power_loss(None);
    let out = SimFs::default();
    for dir in dirs {
        out.create_dir_all(Path::new(dir)).unwrap();
        for name in fs.list(Path::new(dir)).unwrap() {
            let path = Path::new(dir).join(&name);
            if dirs.iter().any(|d| Path::new(d) == path) {
                continue;
            }
            let read = |fs: &SimFs| -> Option<Vec<u8>> {
                let f = fs.open(&path, false).ok()?;
                let mut b = vec![0; f.len().unwrap() as usize];
                f.read_exact_at(&mut b, 0).unwrap();
                Some(b)
            };
            let current = read(fs).unwrap();
            let synced = read(&durable).unwrap_or_default();
            assert!(current.starts_with(&synced));
            let f = out.open(&path, true).unwrap();
            f.write_all_at(&synced, 0).unwrap();
            f.sync_data().unwrap();
            f.write_all_at(&current[synced.len()..], synced.len() as u64)
                .unwrap();
        }
        out.sync_dir(Path::new(dir)).unwrap();
    }
    out
}

/// Takes `image` of `fs` (into the returned slot) at its first fsync after `armed` is
/// set.
fn snapshot_at_next_fsync(
    fs: &SimFs,
    armed: &Arc<AtomicBool>,
    image: impl Fn(&SimFs) -> SimFs + Send + Sync + 'static,
) -> Arc<Mutex<Option<SimFs>>> {
    let slot: Arc<Mutex<Option<SimFs>>> = Arc::default();
    let (armed, taken) = (armed.clone(), slot.clone());
    fs.set_hook(Some(Arc::new(move |fs: &SimFs, op: SimOp<'_>| {
        if op == SimOp::Sync && armed.swap(false, Ordering::SeqCst) {
            *taken.lock().unwrap() = Some(image(fs));
        }
    })));
    slot
}

/// kill -9 between a batch's write and its fsync (fsync=always): on restart, recovery
/// syncs what it finds before serving it, so a retry acknowledged as its duplicate
/// survives a power loss that follows.
#[test]
fn a_record_a_killed_process_never_synced_is_synced_before_its_retry_is_acknowledged() {
    rt().block_on(async {
        let fs = SimFs::default();
        let clock = ManualClock::new(1_700_000_000_000_000_000);
        let armed = Arc::new(AtomicBool::new(false));
        let slot = snapshot_at_next_fsync(&fs, &armed, |fs| {
            kill_image(fs, &["/m", "/m/streams", "/m/streams/M"])
        });
        let store = open_plain(&fs, &clock);
        let stream = store.create(StreamConfig::new("M", ["s.>"])).unwrap();
        pubw(&stream, "s.a", b"first", Some("one")).await.unwrap();
        armed.store(true, Ordering::SeqCst);
        // the process is "killed" at this batch's fsync: the publisher never gets its ack
        let _ = pubw(&stream, "s.a", b"second", Some("two")).await;
        drop((stream, store));
        let killed = slot.lock().unwrap().clone().expect("kill image taken");

        // restart after the kill; the publisher retries its unacknowledged publish
        let store = open_plain(&killed, &clock);
        let stream = store.stream("M").unwrap();
        let served = stream.get(2).map(|m| m.payload.to_vec());
        let retry = pubw(&stream, "s.a", b"second", Some("two")).await.unwrap();
        eprintln!("after kill: get(2) = {served:?}; retry acked {retry:?}");
        let after_power_loss = killed.power_loss(None);
        drop((stream, store));
        let store = open_plain(&after_power_loss, &clock);
        let stream = store.stream("M").unwrap();
        assert!(
            stream.get(retry.seq).is_ok(),
            "acknowledged publish (seq {}, duplicate={}) lost after power loss",
            retry.seq,
            retry.duplicate
        );
    });
}

/// A purge of everything starts a segment and removes the others in one batch: the new
/// segment's directory entry is synced before any removal, so that no crash can leave
/// the directory without a segment holding the configuration.
#[test]
fn a_segment_created_in_a_batch_is_synced_into_its_directory_before_any_removal() {
    rt().block_on(async {
        let (fs, clock) = (
            SimFs::default(),
            ManualClock::new(1_700_000_000_000_000_000),
        );
        let (_store, stream) = small_segments(&fs, &clock);
        for _ in 0..6 {
            pubw(&stream, "s.a", &[0; 1500], None).await.unwrap();
        }
        let recorded: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = recorded.clone();
        fs.set_hook(Some(Arc::new(move |_: &SimFs, op: SimOp<'_>| {
            let op = match op {
                SimOp::Create(path) => format!("create {}", path.display()),
                SimOp::Remove(path) => format!("remove {}", path.display()),
                SimOp::SyncDir(_) => "sync_dir".to_owned(),
                _ => return,
            };
            record.lock().unwrap().push(op);
        })));
        stream.purge(None).await.unwrap();
        let ops = recorded.lock().unwrap().clone();
        println!("{ops:?}");
        let created = ops.iter().position(|op| op.starts_with("create")).unwrap();
        let removed = ops.iter().position(|op| op.starts_with("remove")).unwrap();
        assert!(created < removed, "{ops:?}");
        assert!(
            ops[created..removed].iter().any(|op| op == "sync_dir"),
            "no directory sync between {} and {}",
            ops[created],
            ops[removed]
        );
    });
}

/// A publisher's payload holding bytes that form valid records (purges, a
/// configuration), checksummed with guessed salts: when power is lost while that
/// message is being written and the write is torn, recovery's search for the next valid
/// record does not take them for the store's own (64 tear patterns).
#[test]
fn records_a_publisher_writes_into_a_payload_are_never_replayed_after_a_torn_write() {
    use mq_store::record::{Kind, Record, encode};
    let rec = |kind, seq, payload: &'static [u8]| Record {
        kind,
        seq,
        time: 0,
        subject: "",
        headers: &[],
        payload,
    };
    let mut lost_in = Vec::new();
    let mut config_in = Vec::new();
    for seed in 0..64u64 {
        rt().block_on(async {
            let fs = SimFs::default();
            let clock = ManualClock::new(1_700_000_000_000_000_000);
            let armed = Arc::new(AtomicBool::new(false));
            let slot = snapshot_at_next_fsync(&fs, &armed, move |fs| fs.power_loss(Some(seed)));
            let store = open_plain(&fs, &clock);
            let stream = store.create(StreamConfig::new("M", ["s.>"])).unwrap();
            for i in 0..3u8 {
                pubw(&stream, "s.a", &[i; 10], None).await.unwrap();
            }
            // the crafted payload: purge records for 2^k and a configuration record
            let mut payload = Vec::new();
            for k in 0..8 {
                for salt in [0, 1, u64::MAX] {
                    encode(&mut payload, salt, &rec(Kind::Purge, 1 << k, &[]));
                }
            }
            let evil = StreamConfig {
                max_msgs: Some(0),
                ..StreamConfig::new("M", ["evil.>"])
            };
            let json: &'static [u8] = serde_json::to_vec(&evil).unwrap().leak();
            encode(&mut payload, 0, &rec(Kind::Config, 0, json));
            payload.resize(20_000, 0xEE);
            armed.store(true, Ordering::SeqCst);
            let _ = pubw(&stream, "s.a", &payload, None).await; // power is lost before its fsync
            drop((stream, store));
            let after = slot.lock().unwrap().clone().unwrap();
            let store = open_plain(&after, &clock);
            let stream = store.stream("M").unwrap();
            let have: Vec<u64> = stream
                .range(1, usize::MAX, usize::MAX)
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect();
            if have != [1, 2, 3] {
                lost_in.push((seed, have));
            }
            if stream.config().subjects != ["s.>"] {
                config_in.push((seed, stream.config().subjects));
            }
        });
    }
    println!(
        "64 torn writes of a payload holding forged records: acknowledged but lost in {} runs, configuration replaced in {}",
        lost_in.len(),
        config_in.len()
    );
    assert!(
        lost_in.is_empty() && config_in.is_empty(),
        "acked messages lost: {lost_in:?}; config replaced: {config_in:?}"
    );
}
