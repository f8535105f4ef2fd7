//! Behaviour of streams on a store: appends, reads, segments, recovery, limits,
//! purge, deduplication, expectations, and what write errors and power loss do.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mq_store::clock::ManualClock;
use mq_store::fault::{SimFs, SimOp};
use mq_store::fs::Fs;
use mq_store::record::{self, HEADER_LEN};
use mq_store::{Discard, Fsync, PubAck, Publish, Store, StoreError, Stream, StreamConfig};

const ROOT: &str = "/data";

fn open(fs: &SimFs, clock: &ManualClock) -> Store {
    Store::open_with(
        Arc::new(fs.clone()),
        Path::new(ROOT),
        Arc::new(clock.clone()),
    )
    .unwrap()
}

fn clock() -> ManualClock {
    ManualClock::new(1_700_000_000_000_000_000)
}

async fn publish(stream: &Stream, subject: &str, payload: &[u8]) -> Result<PubAck, StoreError> {
    publish_with(stream, subject, payload, &Publish::default()).await
}

async fn publish_with(
    stream: &Stream,
    subject: &str,
    payload: &[u8],
    options: &Publish,
) -> Result<PubAck, StoreError> {
    stream.publish(subject, &[], payload, options).await?.await
}

fn with_id(id: &str) -> Publish {
    Publish {
        msg_id: Some(id.to_owned()),
        ..Publish::default()
    }
}

fn segments(fs: &SimFs, stream: &str) -> Vec<String> {
    let mut names = fs
        .list(&Path::new(ROOT).join("streams").join(stream))
        .unwrap();
    names.sort();
    names
}

#[tokio::test]
async fn published_messages_are_read_back_by_sequence_subject_and_range() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("S", ["a.>"])).unwrap();
    for i in 1..=5u64 {
        let subject = if i % 2 == 0 { "a.even" } else { "a.odd" };
        let ack = publish(&stream, subject, format!("m{i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(
            ack,
            PubAck {
                stream: "S".into(),
                seq: i,
                duplicate: false
            }
        );
    }
    let headers: [(&str, &[u8]); 2] = [("k", b"v"), ("k", b"w")];
    let ack = stream
        .publish("a.h", &headers, b"with headers", &Publish::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(stream.get(3).unwrap().payload, &b"m3"[..]);
    assert_eq!(stream.last("a.even").unwrap().seq, 4);
    assert_eq!(stream.last("a.odd").unwrap().payload, &b"m5"[..]);
    let with_headers = stream.get(ack.seq).unwrap();
    assert_eq!(with_headers.headers.len(), 2);
    assert_eq!(with_headers.header("k").unwrap(), &b"v"[..]);
    let range: Vec<u64> = stream
        .range(2, 3, usize::MAX)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(range, [2, 3, 4]);
    assert!(matches!(
        stream.get(99),
        Err(StoreError::NoMessage { seq: 99, .. })
    ));
    assert!(matches!(
        stream.last("a.none"),
        Err(StoreError::NoMessageOnSubject { .. })
    ));
    let info = stream.info();
    assert_eq!(
        (
            info.state.msgs,
            info.state.first_seq,
            info.state.last_seq,
            info.state.subjects
        ),
        (6, 1, 6, 3)
    );
}

#[tokio::test]
async fn the_messages_of_one_read_share_their_repeated_subjects_and_header_names() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("S", ["a.>"])).unwrap();
    for subject in ["a.x", "a.x", "a.y", "a.y"] {
        let headers: [(&str, &[u8]); 1] = [("Region", b"eu")];
        stream
            .publish(subject, &headers, b"m", &Publish::default())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let read = stream.range(1, 4, usize::MAX).unwrap();
    let subjects: Vec<&str> = read.iter().map(|m| &*m.subject).collect();
    assert_eq!(subjects, ["a.x", "a.x", "a.y", "a.y"]);
    assert!(Arc::ptr_eq(&read[0].subject, &read[1].subject));
    assert!(Arc::ptr_eq(&read[2].subject, &read[3].subject));
    assert!(Arc::ptr_eq(&read[0].headers[0].0, &read[3].headers[0].0));
    assert_eq!(&*read[3].headers[0].0, "Region");
    assert_eq!(read[3].header("Region").unwrap(), &b"eu"[..]);
}

#[tokio::test]
async fn a_byte_budget_limits_a_range_read_but_one_message_is_always_returned() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("S", ["a"])).unwrap();
    for _ in 0..10 {
        publish(&stream, "a", &[7; 100]).await.unwrap();
    }
    let record = HEADER_LEN + 1 + 100;
    assert_eq!(stream.range(1, 100, 3 * record).unwrap().len(), 3);
    assert_eq!(stream.range(1, 100, 1).unwrap().len(), 1);
}

#[tokio::test]
async fn segments_roll_at_the_configured_size_and_everything_survives_a_reopen() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let config = StreamConfig {
        segment_size: 4096,
        ..StreamConfig::new("ROLL", ["r.*"])
    };
    let stream = store.create(config).unwrap();
    for i in 0..200u32 {
        publish(
            &stream,
            &format!("r.{}", i % 7),
            &i.to_le_bytes().repeat(25),
        )
        .await
        .unwrap();
    }
    let names = segments(&fs, "ROLL");
    assert!(names.len() > 5, "{names:?}");
    assert_eq!(names[0], "00000000000000000001.log");
    let before: Vec<_> = stream.range(1, 1000, usize::MAX).unwrap();
    assert_eq!(before.len(), 200);
    drop((stream, store));

    let store = open(&fs, &clock);
    let stream = store.stream("ROLL").unwrap();
    assert_eq!(stream.range(1, 1000, usize::MAX).unwrap(), before);
    assert_eq!(stream.last("r.3").unwrap(), before[199]); // the 200th: 199 % 7 == 3
    assert_eq!(publish(&stream, "r.0", b"next").await.unwrap().seq, 201);
    assert_eq!(stream.config().segment_size, 4096);
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_and_the_stream_goes_on_from_the_record_before() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("T", ["t"])).unwrap();
    for i in 0..10u8 {
        publish(&stream, "t", &[i; 50]).await.unwrap();
    }
    drop((stream, store));
    let path = Path::new(ROOT).join("streams/T/00000000000000000001.log");
    let file = fs.open(&path, false).unwrap();
    let len = file.len().unwrap();
    file.set_len(len - 20).unwrap(); // the last record lost its tail

    let store = open(&fs, &clock);
    let stream = store.stream("T").unwrap();
    assert_eq!(stream.info().state.last_seq, 9);
    assert_eq!(stream.get(9).unwrap().payload, &[8; 50][..]);
    assert_eq!(
        file.len().unwrap(),
        len - (HEADER_LEN as u64 + 1 + 50),
        "the partial record is gone from the file"
    );
    assert_eq!(publish(&stream, "t", b"again").await.unwrap().seq, 10);
}

#[tokio::test]
async fn a_flipped_byte_mid_segment_is_reported_with_file_and_offset_and_the_other_records_stay_readable()
 {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("F", ["f"])).unwrap();
    for i in 0..10u8 {
        publish(&stream, "f", &[i; 50]).await.unwrap();
    }
    let path = Path::new(ROOT).join("streams/F/00000000000000000001.log");
    let file = fs.open(&path, false).unwrap();
    // the segment header, then the configuration record
    let config_end = stream.range(1, 1, usize::MAX).map(|_| ()).map(|()| {
        let mut len = [0; 4];
        file.read_exact_at(&mut len, 32).unwrap();
        32 + u32::from_le_bytes(len) as u64
    });
    let record = HEADER_LEN as u64 + 1 + 50;
    let fifth = config_end.unwrap() + 4 * record; // where message 5 starts
    let mut byte = [0; 1];
    file.read_exact_at(&mut byte, fifth + 40).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], fifth + 40).unwrap();

    // A running stream re-verifies what it reads.
    let err = stream.get(5).unwrap_err();
    println!("read: {err}");
    assert!(
        matches!(&err, StoreError::Corrupt { file, offset, .. } if *file == path && *offset == fifth)
    );
    drop((stream, store));

    // Reopened, it reports the damage, skips that record and serves every other one.
    let store = open(&fs, &clock);
    let stream = store.stream("F").unwrap();
    let damage = stream.damage();
    for report in &damage {
        println!("on open: {report}");
    }
    assert_eq!(
        damage.len(),
        2,
        "the bad bytes, and the message lost in them"
    );
    assert!(
        damage[1].to_string().contains("messages 5..=5"),
        "{}",
        damage[1]
    );
    assert!(
        matches!(&damage[0], StoreError::Corrupt { file, offset, .. } if *file == path && *offset == fifth)
    );
    for seq in (1..=10).filter(|&seq| seq != 5) {
        assert_eq!(stream.get(seq).unwrap().payload, &[seq as u8 - 1; 50][..]);
    }
    assert!(stream.get(5).is_err(), "the damaged record is never served");
    assert_eq!(publish(&stream, "f", b"x").await.unwrap().seq, 11);
}

#[tokio::test]
async fn a_full_disk_fails_the_publish_acknowledges_nothing_unwritten_and_recovers_once_there_is_room()
 {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("D", ["d"])).unwrap();
    for _ in 0..5 {
        publish(&stream, "d", &[1; 100]).await.unwrap();
    }
    fs.set_capacity(Some(fs.used() + 150)); // room for one more record, not two
    assert_eq!(publish(&stream, "d", &[2; 100]).await.unwrap().seq, 6);
    let err = publish(&stream, "d", &[3; 100]).await.unwrap_err();
    println!("full: {err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    // Still full: every publish fails, saying why.
    let err = publish(&stream, "d", &[3; 100]).await.unwrap_err();
    assert!(err.to_string().contains("no space left"), "{err}");
    assert_eq!(stream.get(6).unwrap().payload, &[2; 100][..]);

    fs.set_capacity(None);
    // Recovery is tried again once its backoff has passed (1 s, then 2 s, … 30 s).
    let err = publish(&stream, "d", &[4; 100]).await.unwrap_err();
    assert!(
        err.to_string().contains("recovery is next tried in"),
        "{err}"
    );
    clock.advance(Duration::from_secs(30));
    let ack = publish(&stream, "d", &[4; 100]).await.unwrap();
    assert_eq!(ack.seq, 7, "the failed publishes took no sequence");
    assert_eq!(stream.get(7).unwrap().payload, &[4; 100][..]);
    drop((stream, store));
    let store = open(&fs, &clock);
    let stream = store.stream("D").unwrap();
    let payloads: Vec<u8> = stream
        .range(1, 100, usize::MAX)
        .unwrap()
        .iter()
        .map(|m| m.payload[0])
        .collect();
    assert_eq!(payloads, [1, 1, 1, 1, 1, 2, 4]);
}

#[tokio::test]
async fn an_injected_write_error_fails_the_publish_and_the_stream_recovers_once_writes_succeed() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("W", ["w"])).unwrap();
    publish(&stream, "w", b"before").await.unwrap();
    fs.fail_writes(Some(std::io::ErrorKind::Other));
    for _ in 0..3 {
        let err = publish(&stream, "w", b"lost").await.unwrap_err();
        println!("write error: {err}");
        assert!(err.to_string().contains("injected fault"), "{err}");
    }
    assert_eq!(
        stream.info().state.last_seq,
        1,
        "nothing unwritten is counted"
    );
    fs.fail_writes(None);
    clock.advance(Duration::from_secs(30)); // recovery's backoff
    assert_eq!(publish(&stream, "w", b"after").await.unwrap().seq, 2);
    let payloads: Vec<_> = stream
        .range(1, 10, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(payloads, [&b"before"[..], &b"after"[..]]);
}

#[tokio::test]
async fn a_failed_fsync_fails_the_batch_and_is_never_retried_as_if_it_had_worked() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("Y", ["y"])).unwrap();
    publish(&stream, "y", b"durable").await.unwrap();
    fs.fail_syncs(true);
    let err = publish(&stream, "y", b"not durable").await.unwrap_err();
    assert!(err.to_string().contains("fsync"), "{err}");
    assert!(stream.get(2).is_err(), "an unsynced message is not served");
    fs.fail_syncs(false);
    let ack = publish(&stream, "y", b"after").await.unwrap();
    assert_eq!(ack.seq, 2);
    // power loss now: what was acknowledged is there, the failed write is not
    let fs = fs.power_loss(None);
    drop((stream, store));
    let store = open(&fs, &clock);
    let stream = store.stream("Y").unwrap();
    let payloads: Vec<_> = stream
        .range(1, 10, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(payloads, [&b"durable"[..], &b"after"[..]]);
}

#[tokio::test]
async fn group_commit_writes_and_syncs_once_per_batch_of_publishes_in_flight() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("G", ["g"])).unwrap();
    let (writes0, syncs0, _) = fs.counts();
    let mut acks = Vec::new();
    for i in 0..1000u32 {
        acks.push(
            stream
                .publish("g", &[], &i.to_le_bytes(), &Publish::default())
                .await
                .unwrap(),
        );
    }
    for (i, ack) in acks.into_iter().enumerate() {
        assert_eq!(
            ack.await.unwrap().seq,
            i as u64 + 1,
            "acknowledged in order"
        );
    }
    let (writes, syncs, _) = fs.counts();
    let (writes, syncs) = (writes - writes0, syncs - syncs0);
    println!("1000 publishes in flight: {writes} writes, {syncs} fsyncs");
    assert_eq!(writes, syncs, "one fsync per write, one write per batch");
    assert!(writes <= 1000);
}

#[tokio::test]
async fn power_loss_under_fsync_always_keeps_every_acknowledged_message() {
    for seed in 0..8u64 {
        let (fs, clock) = (SimFs::default(), clock());
        let store = open(&fs, &clock);
        let config = StreamConfig {
            segment_size: 8192,
            ..StreamConfig::new("P", ["p.>"])
        };
        let stream = store.create(config).unwrap();
        let mut acked = Vec::new();
        let mut pending = std::collections::VecDeque::new();
        let stop_at = 300 + seed as usize * 37;
        let mut crashed = None;
        for i in 0..2000usize {
            let payload = format!("message {i} {}", "x".repeat(i % 300));
            let ack = stream
                .publish(
                    &format!("p.{}", i % 5),
                    &[],
                    payload.as_bytes(),
                    &Publish::default(),
                )
                .await
                .unwrap();
            pending.push_back((payload, ack));
            while pending.len() > 16 {
                let (payload, ack) = pending.pop_front().unwrap();
                acked.push((ack.await.unwrap().seq, payload));
            }
            if acked.len() >= stop_at {
                crashed = Some(fs.power_loss(Some(seed))); // while 16 are in flight
                break;
            }
        }
        let after = crashed.expect("crashed");
        drop((stream, store));
        let store = open(&after, &clock);
        let stream = store.stream("P").unwrap();
        let stored = stream.range(1, usize::MAX, usize::MAX).unwrap();
        let lost = acked
            .iter()
            .filter(|(seq, payload)| {
                !stored
                    .iter()
                    .any(|m| m.seq == *seq && m.payload == payload.as_bytes())
            })
            .count();
        println!(
            "seed {seed}: acknowledged {}, recovered {}, acknowledged but lost: {lost}",
            acked.len(),
            stored.len()
        );
        assert_eq!(lost, 0);
        for (i, message) in stored.iter().enumerate() {
            assert_eq!(message.seq, i as u64 + 1, "recovered messages are a prefix");
        }
        let next = publish(&stream, "p.0", b"after").await.unwrap();
        assert_eq!(next.seq, stored.len() as u64 + 1);
    }
}

#[tokio::test]
async fn a_msg_id_is_deduplicated_within_the_window_and_after_a_restart_but_not_after_the_window() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("ID", ["id"])).unwrap();
    let first = publish_with(&stream, "id", b"one", &with_id("order-1"))
        .await
        .unwrap();
    let again = publish_with(&stream, "id", b"one", &with_id("order-1"))
        .await
        .unwrap();
    assert_eq!((again.seq, again.duplicate), (first.seq, true));
    assert_eq!(stream.info().state.msgs, 1, "nothing is stored twice");

    clock.advance(Duration::from_secs(60));
    drop((stream, store));
    let store = open(&fs, &clock);
    let stream = store.stream("ID").unwrap();
    let after_restart = publish_with(&stream, "id", b"one", &with_id("order-1"))
        .await
        .unwrap();
    assert_eq!((after_restart.seq, after_restart.duplicate), (1, true));

    clock.advance(Duration::from_secs(61)); // 121 s after the first: outside 2 minutes
    let outside = publish_with(&stream, "id", b"one", &with_id("order-1"))
        .await
        .unwrap();
    assert_eq!((outside.seq, outside.duplicate), (2, false));
    assert_eq!(
        stream.get(2).unwrap().header("Msg-Id").unwrap(),
        &b"order-1"[..]
    );
}

#[tokio::test]
async fn a_duplicate_of_a_publish_still_in_flight_is_acknowledged_once_the_original_is_durable() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("IF", ["if"])).unwrap();
    let original = stream
        .publish("if", &[], b"x", &with_id("a"))
        .await
        .unwrap();
    let duplicate = stream
        .publish("if", &[], b"x", &with_id("a"))
        .await
        .unwrap();
    let (original, duplicate) = (original.await.unwrap(), duplicate.await.unwrap());
    assert_eq!((original.seq, original.duplicate), (1, false));
    assert_eq!((duplicate.seq, duplicate.duplicate), (1, true));
}

#[tokio::test]
async fn a_msg_id_over_its_limit_or_not_utf8_is_refused_naming_the_problem() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("ID", ["id"])).unwrap();
    let long = "x".repeat(mq_store::MAX_MSG_ID_LEN + 1);
    let err = stream
        .publish("id", &[], b"x", &with_id(&long))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidMessage(m) if m.contains("at most 1024 bytes")),
        "{err}"
    );
    let err = stream
        .publish("id", &[("Msg-Id", &[0xFF][..])], b"x", &Publish::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidMessage(m) if m.contains("not UTF-8")),
        "{err}"
    );
    let fits = "y".repeat(mq_store::MAX_MSG_ID_LEN);
    let ack = stream.publish("id", &[], b"x", &with_id(&fits)).await;
    assert_eq!(ack.unwrap().await.unwrap().seq, 1);
}

#[tokio::test]
async fn expectations_that_do_not_hold_are_refused_saying_what_was_expected_and_found() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("E", ["e.*"])).unwrap();
    let empty = Publish {
        expected_last_seq: Some(0),
        ..Publish::default()
    };
    publish_with(&stream, "e.a", b"1", &empty).await.unwrap();
    let err = publish_with(&stream, "e.a", b"2", &empty)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream `E`: expected last sequence 0, found 1"
    );

    let subject = Publish {
        expected_last_subject_seq: Some(1),
        ..Publish::default()
    };
    publish_with(&stream, "e.a", b"2", &subject).await.unwrap();
    let err = publish_with(&stream, "e.a", b"3", &subject)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream `E`: expected last sequence on `e.a` 1, found 2"
    );
    let none_yet = Publish {
        expected_last_subject_seq: Some(0),
        ..Publish::default()
    };
    publish_with(&stream, "e.b", b"1", &none_yet).await.unwrap();

    publish_with(&stream, "e.a", b"4", &with_id("m-4"))
        .await
        .unwrap();
    let after_m4 = Publish {
        expected_last_msg_id: Some("m-4".into()),
        ..Publish::default()
    };
    publish_with(&stream, "e.a", b"5", &after_m4).await.unwrap();
    let err = publish_with(&stream, "e.a", b"6", &after_m4)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream `E`: expected last message id `m-4`, found none"
    );
}

#[tokio::test]
async fn a_full_stream_discards_its_oldest_or_refuses_naming_the_limit() {
    let store = Store::memory();
    let old = store
        .create(StreamConfig {
            max_msgs: Some(3),
            ..StreamConfig::new("OLD", ["old"])
        })
        .unwrap();
    for i in 1..=5u8 {
        publish(&old, "old", &[i]).await.unwrap();
    }
    let info = old.info().state;
    assert_eq!((info.msgs, info.first_seq, info.last_seq), (3, 3, 5));
    assert!(old.get(2).is_err());

    let new = StreamConfig {
        max_msgs: Some(3),
        discard: Discard::New,
        ..StreamConfig::new("NEW", ["new"])
    };
    let new = store.create(new).unwrap();
    for i in 1..=3u8 {
        publish(&new, "new", &[i]).await.unwrap();
    }
    let err = publish(&new, "new", &[4]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream `NEW` refused the message: max_msgs 3 reached"
    );

    let bytes = StreamConfig {
        max_bytes: Some(3 * (HEADER_LEN as u64 + 1 + 10)),
        ..StreamConfig::new("BYTES", ["b"])
    };
    let bytes = store.create(bytes).unwrap();
    for i in 1..=5u8 {
        publish(&bytes, "b", &[i; 10]).await.unwrap();
    }
    assert_eq!(bytes.info().state.msgs, 3);
    let err = publish(&bytes, "b", &[0; 1000]).await.unwrap_err();
    assert!(err.to_string().contains("max_bytes"), "{err}");

    let big = StreamConfig {
        max_msg_size: 16,
        ..StreamConfig::new("SIZE", ["size"])
    };
    let big = store.create(big).unwrap();
    let err = publish(&big, "size", &[0; 16]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream `SIZE` refused the message: max_msg_size 16 reached"
    );
}

#[tokio::test]
async fn a_per_subject_limit_keeps_the_newest_of_each_subject_across_a_restart() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let config = StreamConfig {
        max_msgs_per_subject: Some(2),
        ..StreamConfig::new("KV", ["kv.*"])
    };
    let stream = store.create(config).unwrap();
    for i in 0..10u8 {
        publish(&stream, &format!("kv.{}", i % 3), &[i])
            .await
            .unwrap();
    }
    let kept = |stream: &Stream| -> Vec<u8> {
        stream
            .range(1, 100, usize::MAX)
            .unwrap()
            .iter()
            .map(|m| m.payload[0])
            .collect()
    };
    assert_eq!(kept(&stream), [4, 5, 6, 7, 8, 9]);
    drop((stream, store));
    let store = open(&fs, &clock);
    let stream = store.stream("KV").unwrap();
    assert_eq!(kept(&stream), [4, 5, 6, 7, 8, 9]);
    assert_eq!(stream.last("kv.0").unwrap().payload, &[9][..]);
}

#[tokio::test]
async fn messages_older_than_max_age_are_removed_whole_segments_first() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let config = StreamConfig {
        max_age: Some(Duration::from_secs(60)),
        segment_size: 4096,
        ..StreamConfig::new("AGE", ["age"])
    };
    let stream = store.create(config).unwrap();
    for _ in 0..100 {
        publish(&stream, "age", &[0; 100]).await.unwrap();
    }
    let segments_before = segments(&fs, "AGE").len();
    clock.advance(Duration::from_secs(61));
    publish(&stream, "age", b"fresh").await.unwrap();
    let info = stream.info().state;
    assert_eq!((info.msgs, info.first_seq), (1, 101));
    assert!(
        segments(&fs, "AGE").len() < segments_before,
        "expired segments are deleted"
    );
    drop((stream, store));
    let store = open(&fs, &clock);
    assert_eq!(store.stream("AGE").unwrap().info().state.first_seq, 101);
}

#[tokio::test]
async fn purge_removes_all_or_one_subject_and_sequences_go_on() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store
        .create(StreamConfig {
            segment_size: 4096,
            ..StreamConfig::new("PG", ["pg.>"])
        })
        .unwrap();
    for i in 0..100u8 {
        publish(
            &stream,
            if i % 2 == 0 { "pg.even" } else { "pg.odd" },
            &[i; 60],
        )
        .await
        .unwrap();
    }
    assert_eq!(stream.purge(Some("pg.odd")).await.unwrap(), 50);
    assert!(stream.last("pg.odd").is_err());
    assert_eq!(stream.info().state.msgs, 50);
    drop((stream, store));
    let store = open(&fs, &clock);
    let stream = store.stream("PG").unwrap();
    assert_eq!(stream.info().state.msgs, 50);
    assert_eq!(stream.range(1, 1000, usize::MAX).unwrap().len(), 50);

    assert_eq!(stream.purge(None).await.unwrap(), 50);
    assert_eq!(segments(&fs, "PG").len(), 1, "purged segments are deleted");
    assert_eq!(publish(&stream, "pg.even", b"x").await.unwrap().seq, 101);
    drop((stream, store));
    let store = open(&fs, &clock);
    let info = store.stream("PG").unwrap().info().state;
    assert_eq!((info.msgs, info.first_seq, info.last_seq), (1, 101, 101));
}

#[tokio::test]
async fn streams_are_created_updated_listed_and_deleted_and_may_not_overlap() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    store
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .unwrap();
    store
        .create(StreamConfig::new("ORDERS", ["orders.>"]))
        .unwrap(); // same config: fine
    let err = store
        .create(StreamConfig::new("ORDERS", ["orders.eu"]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "stream `ORDERS` already exists with a different configuration"
    );
    let err = store
        .create(StreamConfig::new("EU", ["orders.eu.*"]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "subject `orders.eu.*` overlaps `orders.>` of stream `ORDERS`"
    );
    let err = store
        .create(StreamConfig::new("bad name", ["x"]))
        .unwrap_err();
    assert!(err.to_string().contains("stream name"), "{err}");
    store
        .create(StreamConfig::new("USERS", ["users.*"]))
        .unwrap();
    assert_eq!(store.stream_for("orders.eu.1").unwrap().name(), "ORDERS");
    assert!(store.stream_for("other").is_none());

    let info = store
        .update(StreamConfig {
            max_msgs: Some(10),
            ..StreamConfig::new("USERS", ["users.*", "people.*"])
        })
        .await
        .unwrap();
    assert_eq!(info.config.max_msgs, Some(10));
    assert_eq!(store.stream_for("people.x").unwrap().name(), "USERS");
    let names: Vec<String> = store.list().into_iter().map(|i| i.config.name).collect();
    assert_eq!(names, ["ORDERS", "USERS"]);

    store.delete("ORDERS").unwrap();
    assert!(matches!(
        store.stream("ORDERS"),
        Err(StoreError::StreamNotFound(_))
    ));
    drop(store);
    let store = open(&fs, &clock);
    let names: Vec<String> = store.list().into_iter().map(|i| i.config.name).collect();
    assert_eq!(names, ["USERS"]);
    assert_eq!(
        store.stream("USERS").unwrap().config().subjects,
        ["users.*", "people.*"]
    );
}

#[tokio::test]
async fn fsync_every_and_never_acknowledge_once_written_and_sync_on_close() {
    for fsync in [Fsync::Every(Duration::from_secs(3600)), Fsync::Never] {
        let (fs, clock) = (SimFs::default(), clock());
        let store = open(&fs, &clock);
        let stream = store
            .create(StreamConfig {
                fsync,
                ..StreamConfig::new("N", ["n"])
            })
            .unwrap();
        let (_, syncs0, _) = fs.counts();
        for _ in 0..10 {
            publish(&stream, "n", b"x").await.unwrap();
        }
        assert_eq!(fs.counts().1, syncs0, "{fsync:?}: no fsync per publish");
        drop((stream, store)); // a clean close syncs
        let after = fs.power_loss(None);
        let store = open(&after, &clock);
        assert_eq!(
            store.stream("N").unwrap().info().state.msgs,
            10,
            "{fsync:?}"
        );
    }
}

/// Creates stream `name` (subject `name` in lower case) in 4 KiB segments under
/// `fsync`; `fill` then publishes 12 messages of 1,000 bytes: three segments or more.
fn small_segments(store: &Store, name: &str, fsync: Fsync) -> (Stream, StreamConfig) {
    let config = StreamConfig {
        fsync,
        segment_size: 4096,
        ..StreamConfig::new(name, [name.to_lowercase().as_str()])
    };
    (store.create(config.clone()).unwrap(), config)
}

async fn fill(stream: &Stream) {
    let subject = stream.config().subjects[0].clone();
    for _ in 0..12 {
        publish(stream, &subject, &[7; 1000]).await.unwrap();
    }
}

/// Opens the disk that `power_loss` left and checks that stream `name` holds `msgs`
/// messages and reports no damage.
fn assert_survived(disk: &SimFs, clock: &ManualClock, name: &str, msgs: u64, case: &str) {
    let store = open(disk, clock);
    let stream = store.stream(name).unwrap();
    assert_eq!(stream.info().state.msgs, msgs, "{case}");
    assert!(stream.damage().is_empty(), "{case}: {:?}", stream.damage());
}

#[tokio::test]
async fn under_fsync_every_and_never_a_new_segment_starts_without_syncing_the_one_before() {
    for fsync in [Fsync::Every(Duration::from_secs(3600)), Fsync::Never] {
        let (fs, clock) = (SimFs::default(), clock());
        let store = open(&fs, &clock);
        let (stream, _) = small_segments(&store, "R", fsync);
        let (_, syncs0, _) = fs.counts();
        fill(&stream).await;
        let segments = stream.info().state.segments;
        assert!(segments >= 3, "{fsync:?}: {segments} segments");
        assert_eq!(
            fs.counts().1,
            syncs0,
            "{fsync:?}: no file synced when {} segments were started",
            segments - 1
        );
        drop((stream, store)); // a clean close syncs them all
        assert_survived(&fs.power_loss(None), &clock, "R", 12, &format!("{fsync:?}"));
    }
}

#[tokio::test]
async fn opening_after_a_killed_process_syncs_every_segment_it_left_unsynced() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let every = Fsync::Every(Duration::from_secs(3600));
    let (stream, _) = small_segments(&store, "K", every);
    fill(&stream).await;
    // Killed: no close, so nothing is synced; the OS still has every byte written.
    std::mem::forget((stream, store));
    let store = open(&fs, &clock);
    assert_eq!(store.stream("K").unwrap().info().state.msgs, 12);
    // Then power goes: what the reopened store serves was made durable when it opened.
    let after = fs.power_loss(None);
    drop(store);
    assert_survived(&after, &clock, "K", 12, "killed, reopened, power lost");
}

#[tokio::test]
async fn an_update_to_fsync_always_syncs_the_segments_sealed_before_it_with_its_first_batch() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let every = Fsync::Every(Duration::from_secs(3600));
    let (stream, config) = small_segments(&store, "U", every);
    fill(&stream).await;
    store
        .update(StreamConfig {
            fsync: Fsync::Always,
            ..config
        })
        .await
        .unwrap();
    let stream = store.stream("U").unwrap();
    let ack = publish(&stream, "u", b"durable").await.unwrap();
    assert_eq!(ack.seq, 13);
    // Power goes before any close: what `always` acknowledged is on disk, and so is
    // everything before it.
    let after = fs.power_loss(None);
    drop((stream, store));
    assert_survived(&after, &clock, "U", 13, "updated to always");
}

#[tokio::test]
async fn deferred_publishes_are_written_by_the_caller_with_one_write_under_fsync_every() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store
        .create(StreamConfig {
            fsync: Fsync::Every(Duration::from_secs(3600)),
            ..StreamConfig::new("D", ["d"])
        })
        .unwrap();
    // the new segment's creation goes through the committer first (not only appends)
    publish(&stream, "d", b"first").await.unwrap();
    // The committer may still take some of a round (it looks for work right after a
    // batch, and at least once a second); then that round does not count. Every round
    // is checked for order and loss; one in which the caller wrote everything must
    // come within a few.
    const ROUNDS: u64 = 20;
    let mut next_seq = 2;
    let mut inline_round = None;
    for round in 0..ROUNDS {
        let (writes0, syncs0, _) = fs.counts();
        let mut acks = Vec::new();
        for i in 0..100u32 {
            let ack = stream
                .publish_deferred("d", &[], &i.to_le_bytes(), &Publish::default())
                .await
                .unwrap();
            acks.push(ack);
        }
        stream.commit_now();
        let (writes, syncs, _) = fs.counts();
        assert_eq!(syncs, syncs0, "no fsync under Every");
        // written and acknowledged by the time commit_now returned?
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut all_ready = true;
        for mut ack in acks {
            let result = match std::pin::Pin::new(&mut ack).poll(&mut cx) {
                std::task::Poll::Ready(result) => result,
                std::task::Poll::Pending => {
                    all_ready = false;
                    ack.await
                }
            };
            assert_eq!(result.unwrap().seq, next_seq, "acknowledged in order");
            next_seq += 1;
        }
        if all_ready && writes - writes0 == 1 {
            inline_round = Some(round);
            break;
        }
    }
    let round = inline_round.expect("in no round did commit_now write the batch itself");
    println!(
        "100 deferred publishes, then commit_now: written with 1 write by the caller, \
         acknowledged before it returned (round {} of up to {ROUNDS})",
        round + 1
    );
    assert_eq!(
        stream.range(1, 100_000, usize::MAX).unwrap().len() as u64,
        next_seq - 1
    );
}

#[tokio::test]
async fn deferred_publishes_under_fsync_always_go_to_the_committer_and_are_synced() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("A", ["a"])).unwrap();
    let (_, syncs0, _) = fs.counts();
    let ack = stream
        .publish_deferred("a", &[], b"x", &Publish::default())
        .await
        .unwrap();
    stream.commit_now();
    assert_eq!(ack.await.unwrap().seq, 1);
    assert!(fs.counts().1 > syncs0, "synced before it was acknowledged");
}

#[tokio::test]
async fn a_deferred_publish_nobody_commits_is_still_written_by_the_committer() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store
        .create(StreamConfig {
            fsync: Fsync::Never,
            ..StreamConfig::new("F", ["f"])
        })
        .unwrap();
    let ack = stream
        .publish_deferred("f", &[], b"x", &Publish::default())
        .await
        .unwrap();
    // the committer looks at least once a second
    let ack = tokio::time::timeout(Duration::from_secs(10), ack)
        .await
        .expect("written without commit_now")
        .unwrap();
    assert_eq!(ack.seq, 1);
}

#[tokio::test]
async fn a_deletion_outlives_the_removal_of_the_segment_that_recorded_it() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let config = StreamConfig {
        segment_size: 4096,
        ..StreamConfig::new("DEL", ["del.*"])
    };
    let stream = store.create(config).unwrap();
    publish(&stream, "del.keep", &[1; 100]).await.unwrap();
    publish(&stream, "del.gone", &[2; 100]).await.unwrap();
    assert!(stream.delete_message(2).await.unwrap()); // recorded in segment 1
    for _ in 0..60 {
        publish(&stream, "del.later", &[3; 100]).await.unwrap(); // segments 2, 3, …
    }
    // Emptying a middle segment removes it; the record of deleting 2 must survive.
    assert_eq!(stream.purge(Some("del.later")).await.unwrap(), 60);
    drop((stream, store));
    let store = open(&fs, &clock);
    let seqs: Vec<u64> = store
        .stream("DEL")
        .unwrap()
        .range(1, 100, usize::MAX)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, [1]);
}

#[tokio::test]
async fn a_power_loss_after_a_segment_roll_under_fsync_never_leaves_the_stream_writable() {
    for seed in 0..160u64 {
        let (fs, clock) = (SimFs::default(), clock());
        let store = open(&fs, &clock);
        let config = StreamConfig {
            segment_size: 4096,
            fsync: Fsync::Never,
            ..StreamConfig::new("NV", ["nv.*"])
        };
        let stream = store.create(config).unwrap();
        for i in 0..(100 + seed % 20 * 7) {
            publish(&stream, "nv.old", &[i as u8; 90]).await.unwrap();
        }
        let after = fs.power_loss(Some(seed));
        drop((stream, store));
        let store = open(&after, &clock);
        let stream = store
            .stream("NV")
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let stored = stream.info().state.last_seq;
        let ack = publish(&stream, "nv.new", b"after")
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(ack.seq, stored + 1);
        // Every segment still starts with the configuration: removing the old ones
        // leaves a stream that opens.
        stream.purge(Some("nv.old")).await.unwrap();
        drop((stream, store));
        let store = open(&after, &clock);
        let stream = store
            .stream("NV")
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(stream.last("nv.new").unwrap().seq, ack.seq, "seed {seed}");
    }
}

#[tokio::test]
async fn age_expiry_never_fails_a_publish_or_reads_what_is_not_written_yet() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let config = StreamConfig {
        max_age: Some(Duration::from_secs(1)),
        ..StreamConfig::new("TTL", ["ttl"])
    };
    let stream = store.create(config).unwrap();
    let mut pending = Vec::new();
    for i in 0..300u32 {
        pending.push(
            stream
                .publish("ttl", &[], &i.to_le_bytes(), &Publish::default())
                .await
                .unwrap(),
        );
        clock.advance(Duration::from_millis(200));
    }
    for ack in pending {
        ack.await.unwrap();
    }
    // Once written, the old ones go at the next check.
    clock.advance(Duration::from_secs(1));
    publish(&stream, "ttl", b"last").await.unwrap();
    let info = stream.info().state;
    assert_eq!((info.msgs, info.first_seq, info.last_seq), (1, 301, 301));
}

#[tokio::test]
async fn a_flipped_byte_in_an_acknowledged_delete_record_is_reported_not_cut_off_as_a_torn_write() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("DR", ["dr"])).unwrap();
    for _ in 0..4 {
        publish(&stream, "dr", b"m").await.unwrap();
    }
    for seq in [2, 3, 4] {
        assert!(stream.delete_message(seq).await.unwrap());
    }
    drop((stream, store));
    let path = Path::new(ROOT).join("streams/DR/00000000000000000001.log");
    let file = fs.open(&path, false).unwrap();
    let len = file.len().unwrap();
    let first_delete = len - 3 * HEADER_LEN as u64;
    file.write_all_at(&[0xFF], first_delete + 20).unwrap(); // inside the first delete's seq
    let store = open(&fs, &clock);
    let stream = store.stream("DR").unwrap();
    let damage = stream.damage();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert!(
        damage[0]
            .to_string()
            .contains(&format!("offset {first_delete}")),
        "{}",
        damage[0]
    );
    assert_eq!(file.len().unwrap(), len, "nothing was cut off");
    // That delete is lost with its record (and reported); the later ones hold.
    let seqs: Vec<u64> = stream
        .range(1, 10, usize::MAX)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, [1, 2]);
}

#[tokio::test]
async fn lowering_the_per_subject_limit_applies_at_once() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("PS", ["ps.*"])).unwrap();
    for i in 0..5u8 {
        publish(&stream, "ps.a", &[i]).await.unwrap();
        publish(&stream, "ps.b", &[i]).await.unwrap();
    }
    let lowered = StreamConfig {
        max_msgs_per_subject: Some(1),
        ..StreamConfig::new("PS", ["ps.*"])
    };
    assert_eq!(store.update(lowered).await.unwrap().state.msgs, 2);
    assert_eq!(stream.last("ps.a").unwrap().payload, &[4][..]);
}

#[tokio::test]
async fn a_stream_that_cannot_be_opened_does_not_keep_the_others_down() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    for name in ["GOOD", "BAD"] {
        let stream = store
            .create(StreamConfig::new(name, [name.to_lowercase()]))
            .unwrap();
        publish(&stream, &name.to_lowercase(), b"m").await.unwrap();
    }
    drop(store);
    // BAD's only segment loses its configuration record (after the 32-byte segment
    // header) but keeps a message
    let path = Path::new(ROOT).join("streams/BAD/00000000000000000001.log");
    let file = fs.open(&path, false).unwrap();
    let mut len = [0; 4];
    file.read_exact_at(&mut len, 32).unwrap();
    let config_end = 32 + u32::from_le_bytes(len) as u64;
    let mut rest = vec![0; (file.len().unwrap() - config_end) as usize];
    file.read_exact_at(&mut rest, config_end).unwrap();
    file.set_len(32).unwrap();
    file.write_all_at(&rest, 32).unwrap();

    let store = open(&fs, &clock);
    assert_eq!(store.stream("GOOD").unwrap().info().state.msgs, 1);
    let err = store.stream("BAD").unwrap_err();
    assert!(err.to_string().contains("no configuration record"), "{err}");
    assert!(
        store.create(StreamConfig::new("BAD", ["bad"])).is_err(),
        "its name stays taken"
    );
    // until an operator deletes it
    store.delete("BAD").unwrap();
    assert!(matches!(
        store.stream("BAD"),
        Err(StoreError::StreamNotFound(_))
    ));
    let stream = store.create(StreamConfig::new("BAD", ["bad"])).unwrap();
    assert_eq!(publish(&stream, "bad", b"new").await.unwrap().seq, 1);
}

#[tokio::test]
async fn restated_deletions_reach_the_disk_before_the_segment_that_recorded_them_goes() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let config = StreamConfig {
        segment_size: 4096,
        fsync: Fsync::Every(Duration::from_secs(3600)),
        ..StreamConfig::new("RS", ["rs.*"])
    };
    let stream = store.create(config).unwrap();
    publish(&stream, "rs.keep", &[1; 100]).await.unwrap();
    publish(&stream, "rs.gone", &[2; 100]).await.unwrap();
    for _ in 0..30 {
        publish(&stream, "rs.filler", &[0; 100]).await.unwrap();
    }
    assert!(stream.delete_message(2).await.unwrap()); // recorded in segment 2
    for _ in 0..60 {
        publish(&stream, "rs.later", &[3; 100]).await.unwrap();
    }
    stream.purge(Some("rs.later")).await.unwrap(); // empties and removes segment 2, 3, …
    let after = fs.power_loss(None);
    drop((stream, store));
    let store = open(&after, &clock);
    let stream = store.stream("RS").unwrap();
    assert!(
        stream.get(2).is_err(),
        "the deletion survived the removal of its segment"
    );
    assert_eq!(stream.get(1).unwrap().payload, &[1; 100][..]);
}

#[tokio::test]
async fn a_disk_that_stays_full_neither_spins_nor_keeps_the_store_from_closing() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("FULL", ["full"])).unwrap();
    publish(&stream, "full", b"one").await.unwrap();
    fs.set_capacity(Some(fs.used() + 10));
    assert!(publish(&stream, "full", &[0; 100]).await.is_err());
    let (writes, _, _) = fs.counts();
    tokio::time::sleep(Duration::from_millis(300)).await; // real time: the committer is a thread
    let (idle_writes, _, _) = fs.counts();
    println!("writes while idle on a full disk: {}", idle_writes - writes);
    assert!(
        idle_writes - writes <= 2,
        "the committer retried {} times",
        idle_writes - writes
    );
    let closing = std::thread::spawn(move || drop((stream, store)));
    for _ in 0..100 {
        if closing.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(closing.is_finished(), "the store closes on a full disk");
}

#[tokio::test]
async fn a_disk_that_stays_full_is_not_read_back_for_every_failed_publish() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("RR", ["rr"])).unwrap();
    for _ in 0..100 {
        publish(&stream, "rr", &[7; 10_000]).await.unwrap();
    }
    fs.set_capacity(Some(fs.used()));
    assert!(publish(&stream, "rr", b"x").await.is_err(), "poisons");
    let before = fs.bytes_read();
    for _ in 0..20 {
        let err = publish(&stream, "rr", b"x").await.unwrap_err();
        assert!(err.to_string().contains("no space left"), "{err}");
    }
    let read = fs.bytes_read() - before;
    println!(
        "20 failed publishes on a full disk read {read} bytes of a {} byte log",
        fs.used()
    );
    assert!(
        read < 2 * fs.used(),
        "recovery re-read the log for each publish"
    );
    // Recovery is tried again after its backoff, and only then.
    clock.advance(Duration::from_secs(1));
    let before = fs.bytes_read();
    assert!(publish(&stream, "rr", b"x").await.is_err());
    assert!(fs.bytes_read() > before, "tried again once due");
}

#[tokio::test]
async fn plain_stores_to_a_poisoned_stream_make_it_recover_once_the_disk_works() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("PL", ["pl"])).unwrap();
    stream.store("pl", &[], b"one").unwrap();
    publish(&stream, "pl", b"two").await.unwrap();
    fs.fail_writes(Some(std::io::ErrorKind::Other));
    stream.store("pl", &[], b"lost").unwrap(); // queued; its batch fails
    assert!(publish(&stream, "pl", b"fails").await.is_err());
    fs.fail_writes(None);
    // Plain stores alone bring it back: each asks the committer to recover, which it
    // tries at most once a second of the stream's clock.
    clock.advance(Duration::from_secs(1));
    let mut stored = None;
    for _ in 0..300 {
        if let Ok(ack) = stream.store("pl", &[], b"back") {
            stored = Some(ack.seq);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stored, Some(3));
}

#[tokio::test]
async fn subjects_and_header_names_that_a_record_cannot_hold_are_refused() {
    let store = Store::memory();
    let stream = store.create(StreamConfig::new("BIG", [">"])).unwrap();
    let long_name = "n".repeat(70_000);
    let err = stream
        .publish("a", &[(long_name.as_str(), b"v")], b"", &Publish::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidMessage(_)), "{err}");
    let long_subject = "s".repeat(70_000);
    let err = stream
        .publish(&long_subject, &[], b"", &Publish::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidMessage(_)), "{err}");
    assert!(
        stream
            .publish("a.*", &[], b"", &Publish::default())
            .await
            .is_err(),
        "no wildcards"
    );
}

/// Appends a well-formed configuration record holding `config`, checksummed with the
/// segment's own salt, to the first segment of `stream`; returns where it starts.
fn append_config_record(fs: &SimFs, stream: &str, config: &StreamConfig) -> u64 {
    let path = Path::new(ROOT).join(format!("streams/{stream}/00000000000000000001.log"));
    let file = fs.open(&path, false).unwrap();
    let mut header = [0; 32];
    file.read_exact_at(&mut header, 0).unwrap();
    let salt = record::decode_segment_header(&header).unwrap().salt;
    let json = serde_json::to_vec(config).unwrap();
    let mut bytes = Vec::new();
    let forged = record::Record {
        kind: record::Kind::Config,
        seq: 1,
        time: 0,
        subject: "",
        headers: &[],
        payload: &json,
    };
    record::encode(&mut bytes, salt, &forged);
    let end = file.len().unwrap();
    file.write_all_at(&bytes, end).unwrap();
    end
}

#[tokio::test]
async fn a_configuration_read_back_that_names_another_stream_is_refused() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    store.create(StreamConfig::new("CFG", ["cfg"])).unwrap();
    drop(store);
    append_config_record(&fs, "CFG", &StreamConfig::new("OTHER", ["cfg"]));
    let store = open(&fs, &clock);
    let err = store.stream("CFG").unwrap_err();
    println!("{err}");
    assert!(
        matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("names stream `OTHER`")),
        "{err}"
    );
    assert!(
        store.stream("OTHER").is_err(),
        "not served under either name"
    );
}

#[tokio::test]
async fn a_configuration_record_read_back_is_validated_like_one_given_to_create() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    store.create(StreamConfig::new("CFG", ["cfg"])).unwrap();
    drop(store);
    // A well-formed record, with the segment's own salt, holding an impossible config.
    let bad = StreamConfig {
        segment_size: 0,
        ..StreamConfig::new("CFG", ["elsewhere"])
    };
    let end = append_config_record(&fs, "CFG", &bad);

    let store = open(&fs, &clock);
    let stream = store.stream("CFG").unwrap();
    let damage = stream.damage();
    println!("{}", damage[0]);
    assert!(
        matches!(&damage[0], StoreError::Corrupt { offset, reason, .. }
            if *offset == end && reason.contains("segment_size")),
        "{damage:?}"
    );
    assert_eq!(stream.config().subjects, ["cfg"], "the valid one stays");
    assert_eq!(publish(&stream, "cfg", b"x").await.unwrap().seq, 1);
}

/// Creates stream `name` (its subject: the name in lower case) with 4 KiB segments,
/// stores `count` messages of 1000 bytes (message `i + 1` is bytes `i`), closes the
/// store and returns the stream's segment files, oldest first.
async fn segments_of(fs: &SimFs, clock: &ManualClock, name: &str, count: u8) -> Vec<PathBuf> {
    let store = open(fs, clock);
    let subject = name.to_lowercase();
    let config = StreamConfig {
        segment_size: 4096,
        ..StreamConfig::new(name, [subject.as_str()])
    };
    let stream = store.create(config).unwrap();
    for i in 0..count {
        publish(&stream, &subject, &[i; 1000]).await.unwrap();
    }
    drop((stream, store));
    let dir = Path::new(ROOT).join("streams").join(name);
    let mut names = fs.list(&dir).unwrap();
    names.sort();
    names.iter().map(|name| dir.join(name)).collect()
}

#[tokio::test]
async fn a_flipped_bit_in_a_segment_header_is_reported_and_its_records_stay_readable() {
    // (segment: first or last, byte, mask): magic, first_seq, salt (a bit, a whole
    // byte), checksum
    let flips = [
        (0, 3, 0x04),
        (0, 14, 0x04),
        (0, 25, 0xFF),
        (1, 3, 0x04),
        (1, 22, 0x10),
        (1, 27, 0xA5),
        (1, 30, 0x04),
    ];
    for (segment, byte, mask) in flips {
        let (fs, clock) = (SimFs::default(), clock());
        let paths = segments_of(&fs, &clock, "HDR", 12).await;
        assert!(paths.len() >= 3, "{paths:?}");
        // the first segment, or the last (written to, where a torn write is possible)
        let path = if segment == 0 {
            paths[0].clone()
        } else {
            paths.last().unwrap().clone()
        };
        let name = path.file_name().unwrap().to_string_lossy();
        let file = fs.open(&path, false).unwrap();
        let mut bit = [0; 1];
        file.read_exact_at(&mut bit, byte).unwrap();
        file.write_all_at(&[bit[0] ^ mask], byte).unwrap();

        let store = open(&fs, &clock);
        let stream = store.stream("HDR").unwrap();
        let damage = stream.damage();
        println!("{name} byte {byte}: {}", damage[0]);
        assert!(
            matches!(&damage[0], StoreError::Corrupt { file, offset: 0, reason }
                if *file == path && reason.contains("segment header")),
            "{damage:?}"
        );
        let payloads: Vec<u8> = stream
            .range(1, 100, usize::MAX)
            .unwrap()
            .iter()
            .map(|m| m.payload[0])
            .collect();
        assert_eq!(payloads, (0..12).collect::<Vec<u8>>(), "nothing lost");
        assert_eq!(publish(&stream, "hdr", b"next").await.unwrap().seq, 13);
    }
}

#[tokio::test]
async fn a_stream_whose_only_segment_is_unreadable_stays_reported_across_restarts() {
    let (fs, clock) = (SimFs::default(), clock());
    let paths = segments_of(&fs, &clock, "ONLY", 1).await;
    assert_eq!(paths.len(), 1);
    // header and configuration record garbage: no salt can be recovered
    let file = fs.open(&paths[0], false).unwrap();
    file.write_all_at(&[0x5A; 200], 0).unwrap();
    for restart in 0..2 {
        let store = open(&fs, &clock);
        let err = store.stream("ONLY").unwrap_err();
        println!("restart {restart}: {err}");
        assert!(
            matches!(&err, StoreError::Corrupt { file, .. }
                if file.to_string_lossy().ends_with(".damaged")),
            "restart {restart}: {err}"
        );
    }
    let dir = Path::new(ROOT).join("streams/ONLY");
    let kept = fs.list(&dir).unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let aside = fs.open(&dir.join(&kept[0]), false).unwrap();
    assert_eq!(aside.len().unwrap(), file.len().unwrap(), "kept whole");
}

#[tokio::test]
async fn a_last_segment_holding_only_its_header_gets_its_configuration_again() {
    let (fs, clock) = (SimFs::default(), clock());
    let paths = segments_of(&fs, &clock, "HO", 6).await;
    let path = paths.last().unwrap();
    // the messages of the segments before it stay
    let name = path.file_name().unwrap().to_str().unwrap();
    let kept = name.trim_end_matches(".log").parse::<u64>().unwrap() - 1;
    let last = fs.open(path, false).unwrap();
    last.set_len(32).unwrap(); // the segment header, and nothing of its first record

    let store = open(&fs, &clock);
    let stream = store.stream("HO").unwrap();
    assert!(stream.damage().is_empty(), "{:?}", stream.damage());
    assert_eq!(stream.info().state.last_seq, kept);
    publish(&stream, "ho", b"after").await.unwrap();
    // every older segment goes: the configuration must be in what is left
    for seq in 1..=kept {
        assert!(stream.delete_message(seq).await.unwrap());
    }
    assert_eq!(stream.info().state.segments, 1);
    drop((stream, store));
    let store = open(&fs, &clock);
    let stream = store.stream("HO").unwrap();
    assert!(stream.damage().is_empty(), "{:?}", stream.damage());
    assert_eq!(stream.config().subjects, ["ho"]);
}

#[tokio::test]
async fn a_store_directory_is_open_in_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let stream = first.create(StreamConfig::new("ONE", ["one"])).unwrap();
    publish(&stream, "one", b"x").await.unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    println!("second open: {err}");
    assert!(
        matches!(&err, StoreError::Locked(path) if path == dir.path()),
        "{err}"
    );
    drop((stream, first));
    let again = Store::open(dir.path()).unwrap();
    assert_eq!(again.stream("ONE").unwrap().info().state.msgs, 1);
}

#[tokio::test]
async fn a_segment_named_past_any_real_sequence_is_reported_not_a_panic() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    store.create(StreamConfig::new("HUGE", ["huge"])).unwrap();
    drop(store);
    let dir = Path::new(ROOT).join("streams/HUGE");
    let real = fs
        .open(&dir.join("00000000000000000001.log"), false)
        .unwrap();
    let mut bytes = vec![0; real.len().unwrap() as usize];
    real.read_exact_at(&mut bytes, 0).unwrap();
    let forged = fs
        .open(&dir.join("18446744073709551615.log"), true)
        .unwrap();
    forged.write_all_at(&bytes, 0).unwrap();
    let store = open(&fs, &clock);
    let stream = store.stream("HUGE").unwrap();
    assert!(
        stream.damage()[0]
            .to_string()
            .contains("18446744073709551615.log")
    );
    assert_eq!(publish(&stream, "huge", b"x").await.unwrap().seq, 1);
}

#[tokio::test]
async fn a_failure_after_a_segment_is_removed_undoes_neither_a_deletion_nor_the_sequence() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let config = StreamConfig {
        segment_size: 4096,
        ..StreamConfig::new("RM", ["rm.*"])
    };
    let stream = store.create(config.clone()).unwrap();
    publish(&stream, "rm.keep", &[1; 100]).await.unwrap();
    publish(&stream, "rm.gone", &[2; 100]).await.unwrap();
    for _ in 0..30 {
        publish(&stream, "rm.x", &[0; 100]).await.unwrap();
    }
    assert!(stream.delete_message(2).await.unwrap()); // recorded in segment 2
    for _ in 0..30 {
        publish(&stream, "rm.x", &[0; 100]).await.unwrap();
    }
    fs.fail_dir_syncs(true); // the segment files go, the directory sync after them fails
    assert!(stream.purge(Some("rm.x")).await.is_err());
    fs.fail_dir_syncs(false);
    let next = publish(&stream, "rm.keep", b"next").await.unwrap();
    assert!(stream.get(2).is_err(), "the deletion of 2 holds");
    assert!(next.seq > 62, "sequences go on: {}", next.seq);

    fs.fail_dir_syncs(true);
    assert!(stream.purge(None).await.is_err());
    fs.fail_dir_syncs(false);
    let after = publish(&stream, "rm.keep", b"after").await.unwrap();
    assert_eq!(after.seq, next.seq + 1);
    drop((stream, store));
    let store = open(&fs, &clock);
    assert_eq!(store.stream("RM").unwrap().config(), config);
}

#[tokio::test]
async fn a_stream_closed_while_poisoned_answers_closed_at_once() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("CL", ["cl"])).unwrap();
    publish(&stream, "cl", b"one").await.unwrap();
    fs.fail_writes(Some(std::io::ErrorKind::Other));
    assert!(publish(&stream, "cl", b"two").await.is_err());
    fs.fail_writes(None);
    store.delete("CL").unwrap();
    let guard = Duration::from_secs(10); // a guard against a hang, not a timing check
    let deleted = tokio::time::timeout(guard, stream.delete_message(1)).await;
    assert!(
        matches!(deleted, Ok(Err(StoreError::Closed(_)))),
        "{deleted:?}"
    );
    let published = tokio::time::timeout(guard, publish(&stream, "cl", b"x")).await;
    assert!(
        matches!(published, Ok(Err(StoreError::Closed(_)))),
        "{published:?}"
    );
}

#[tokio::test]
async fn a_write_whose_fsync_failed_is_not_read_back_after_a_restart() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("FS", ["fs"])).unwrap();
    publish(&stream, "fs", b"durable").await.unwrap();
    fs.fail_syncs(true);
    assert!(publish(&stream, "fs", b"not durable").await.is_err());
    fs.fail_syncs(false);
    drop((stream, store)); // closed while poisoned: no recovery ran
    let store = open(&fs, &clock);
    let payloads: Vec<_> = store
        .stream("FS")
        .unwrap()
        .range(1, 10, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(payloads, [&b"durable"[..]]);
}

#[tokio::test]
async fn a_segment_file_recovery_skipped_is_moved_aside_never_written_into() {
    let dir = tempfile::tempdir().unwrap();
    let config = StreamConfig {
        segment_size: 4096,
        ..StreamConfig::new("SK", ["sk"])
    };
    {
        let store = Store::open(dir.path()).unwrap();
        let stream = store.create(config).unwrap();
        for _ in 0..3 {
            publish(&stream, "sk", &[1; 1200]).await.unwrap();
        }
    }
    // a sparse 5 GiB file where the next segment would go: skipped on open, as too big
    let squatter = dir.path().join("streams/SK/00000000000000000004.log");
    std::fs::File::create(&squatter)
        .unwrap()
        .set_len(5 << 30)
        .unwrap();
    let store = Store::open(dir.path()).unwrap();
    let stream = store.stream("SK").unwrap();
    assert!(stream.damage()[0].to_string().contains("over 4 GiB"));
    // moved aside, whole, so that the segment can be started under its name
    let aside = dir
        .path()
        .join("streams/SK/00000000000000000004.log.skipped.damaged");
    assert_eq!(std::fs::metadata(&aside).unwrap().len(), 5 << 30);
    assert_eq!(publish(&stream, "sk", &[2; 1200]).await.unwrap().seq, 4);
    assert!(std::fs::metadata(&squatter).unwrap().len() < 8192);
    drop((stream, store));
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stream("SK").unwrap().info().state.msgs, 4);
}

#[tokio::test]
async fn a_removal_whose_directory_sync_failed_is_made_durable_before_the_next_ack() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let config = StreamConfig {
        segment_size: 4096,
        ..StreamConfig::new("DR", ["dr"])
    };
    let stream = store.create(config).unwrap();
    for i in 1..=4u8 {
        publish(&stream, "dr", &[i; 1500]).await.unwrap(); // two per segment
    }
    // Removing the first segment's messages removes it; the sync after that fails.
    fs.fail_dir_syncs(true);
    stream.delete_message(1).await.unwrap();
    assert!(stream.delete_message(2).await.is_err());
    fs.fail_dir_syncs(false);
    let ack = publish(&stream, "dr", b"after").await.unwrap();
    assert_eq!(ack.seq, 5);
    let after = fs.power_loss(None);
    drop((stream, store));
    let store = open(&after, &clock);
    let stream = store.stream("DR").unwrap();
    let messages = stream.range(1, 10, usize::MAX).unwrap();
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        [3, 4, 5],
        "the removal held; the acknowledged message is there"
    );
}

#[tokio::test]
async fn a_purge_whose_new_segment_cannot_be_made_durable_removes_nothing() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    let stream = store.create(StreamConfig::new("DS", ["ds"])).unwrap();
    for i in 1..=3u8 {
        publish(&stream, "ds", &[i]).await.unwrap();
    }
    let seqs = |stream: &Stream| -> Vec<u64> {
        let messages = stream.range(1, 10, usize::MAX).unwrap();
        messages.iter().map(|m| m.seq).collect()
    };
    // The purge starts a segment; the directory sync that must make it durable before
    // the old segments go fails: nothing is removed, and the purge fails as a whole.
    fs.fail_dir_syncs(true);
    assert!(stream.purge(None).await.is_err());
    fs.fail_dir_syncs(false);
    let ack = publish(&stream, "ds", b"after").await.unwrap();
    assert_eq!(ack.seq, 4);
    assert_eq!(seqs(&stream), [1, 2, 3, 4], "the failed purge is undone");
    // Once the removal is under way, a failed sync after it cannot undo it.
    fs.fail_writes(None);
    assert!(stream.purge(None).await.is_ok());
    publish(&stream, "ds", b"last").await.unwrap();
    let after = fs.power_loss(None);
    drop((stream, store));
    let store = open(&after, &clock);
    let stream = store.stream("DS").unwrap();
    assert_eq!(
        seqs(&stream),
        [5],
        "the purge held; what was acknowledged is there"
    );
}

#[tokio::test]
async fn an_update_whose_write_failed_is_undone_with_its_routing() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    store.create(StreamConfig::new("U", ["a.>"])).unwrap();
    fs.fail_writes(Some(std::io::ErrorKind::Other));
    assert!(store.update(StreamConfig::new("U", ["b.>"])).await.is_err());
    fs.fail_writes(None);
    let stream = store.stream("U").unwrap();
    publish(&stream, "a.2", b"x").await.unwrap(); // recovers, reading the config back
    assert_eq!(stream.config().subjects, ["a.>"]);
    assert_eq!(
        store.stream_for("a.x").map(|s| s.name().to_owned()),
        Some("U".into())
    );
    assert!(store.stream_for("b.x").is_none());
    assert!(
        store.create(StreamConfig::new("T", ["a.>"])).is_err(),
        "still overlapping"
    );
}

#[tokio::test]
async fn a_create_that_failed_can_be_retried() {
    let (fs, clock) = (SimFs::default(), clock());
    let store = open(&fs, &clock);
    fs.fail_dir_syncs(true);
    assert!(store.create(StreamConfig::new("R", ["r"])).is_err());
    fs.fail_dir_syncs(false);
    let stream = store.create(StreamConfig::new("R", ["r"])).unwrap();
    assert_eq!(publish(&stream, "r", b"x").await.unwrap().seq, 1);
}

#[tokio::test]
async fn an_empty_or_torn_last_segment_past_the_data_keeps_sequences_from_going_back() {
    for tail in [&b""[..], &[0xA5; 10][..]] {
        let (fs, clock) = (SimFs::default(), clock());
        let store = open(&fs, &clock);
        let stream = store.create(StreamConfig::new("G", ["g"])).unwrap();
        for _ in 0..3 {
            publish(&stream, "g", b"m").await.unwrap();
        }
        drop((stream, store));
        // a segment started at 10 (after messages lost to damage, say) whose first
        // write did not survive
        let gap = Path::new(ROOT).join("streams/G/00000000000000000010.log");
        fs.open(&gap, true).unwrap().write_all_at(tail, 0).unwrap();
        let store = open(&fs, &clock);
        let stream = store.stream("G").unwrap();
        let ack = publish(&stream, "g", b"next").await.unwrap();
        assert_eq!(ack.seq, 10, "tail {tail:?}");
        assert_eq!(stream.get(10).unwrap().payload, &b"next"[..]);
        drop((stream, store));
        let store = open(&fs, &clock);
        let stream = store.stream("G").unwrap();
        assert_eq!(stream.get(10).unwrap().payload, &b"next"[..]);
        assert_eq!(stream.info().state.msgs, 4);
    }
}

/// A gate on a disk's writes: while it is closed, a write waits (holding the committer
/// inside its batch).
#[derive(Clone, Debug, Default)]
struct Gate {
    closed: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    held: Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    fn install(&self, fs: &SimFs) {
        let gate = self.clone();
        fs.set_hook(Some(Arc::new(move |_: &SimFs, op: SimOp<'_>| {
            if op != SimOp::Write {
                return;
            }
            let (lock, opened) = &*gate.closed;
            let closed = lock.lock().unwrap();
            if *closed {
                gate.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(opened.wait_while(closed, |closed| *closed).unwrap());
            }
        })));
    }

    fn set(&self, closed: bool) {
        *self.closed.0.lock().unwrap() = closed;
        self.closed.1.notify_all();
    }
}

#[tokio::test]
async fn publishes_queued_under_fsync_always_are_synced_even_if_an_update_lowers_it_meanwhile() {
    let sim = SimFs::default();
    let gated = Gate::default();
    gated.install(&sim);
    let clock = clock();
    let store = open(&sim, &clock);
    let stream = store.create(StreamConfig::new("LOW", ["low"])).unwrap();
    publish(&stream, "low", b"one").await.unwrap();
    gated.set(true);
    let two = stream
        .publish("low", &[], b"two", &Publish::default())
        .await
        .unwrap();
    while gated.held.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await; // until the committer is inside that batch
    }
    let three = stream
        .publish("low", &[], b"three", &Publish::default())
        .await
        .unwrap();
    let lowered = StreamConfig {
        fsync: Fsync::Every(Duration::from_secs(3600)),
        ..StreamConfig::new("LOW", ["low"])
    };
    let update = tokio::spawn({
        let store = store.clone();
        async move { store.update(lowered).await }
    });
    while stream.config().fsync == Fsync::Always {
        tokio::task::yield_now().await; // until the update has been applied
    }
    gated.set(false);
    assert_eq!(two.await.unwrap().seq, 2);
    assert_eq!(three.await.unwrap().seq, 3);
    update.await.unwrap().unwrap();
    let after = sim.power_loss(None);
    drop((stream, store));
    let store = open(&after, &clock);
    assert_eq!(
        store.stream("LOW").unwrap().info().state.msgs,
        3,
        "every acknowledged message survived"
    );
}
