//! Bytes read back from disk are untrusted: whatever a segment file holds, opening and
//! reading never panics, and nothing is served as a message that was not stored as one.

use std::path::Path;
use std::sync::Arc;

use mq_store::clock::SystemClock;
use mq_store::fault::SimFs;
use mq_store::fs::Fs;
use mq_store::{Publish, Store, StoreError, StreamConfig};
use proptest::prelude::*;

fn run<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn open(fs: &SimFs) -> Store {
    Store::open_with(Arc::new(fs.clone()), Path::new("/u"), Arc::new(SystemClock)).unwrap()
}

#[derive(Clone, Debug)]
enum Damage {
    Flip {
        at: prop::sample::Index,
        mask: u8,
    },
    Overwrite {
        at: prop::sample::Index,
        bytes: Vec<u8>,
    },
    Insert {
        at: prop::sample::Index,
        bytes: Vec<u8>,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1u8..).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(at, bytes)| Damage::Overwrite { at, bytes }),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn damaged_segments_never_panic_and_never_serve_what_was_not_stored(
        sizes in prop::collection::vec(0usize..300, 1..60),
        damages in prop::collection::vec((any::<prop::sample::Index>(), damage()), 1..4),
        deletes in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
    ) {
        run(async {
            let fs = SimFs::default();
            let store = open(&fs);
            let config = StreamConfig { segment_size: 4096, ..StreamConfig::new("U", ["u.*"]) };
            let stream = store.create(config).unwrap();
            let mut stored = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                let payload = vec![i as u8; *size];
                let ack = stream.publish(&format!("u.{}", i % 3), &[("k", b"v")], &payload, &Publish::default()).await.unwrap().await.unwrap();
                stored.push((ack.seq, format!("u.{}", i % 3), payload));
            }
            for at in &deletes {
                let seq = stored[at.index(stored.len())].0;
                stream.delete_message(seq).await.unwrap();
            }
            drop((stream, store));

            let dir = Path::new("/u/streams/U");
            let mut names = fs.list(dir).unwrap();
            names.sort();
            for (which, damage) in &damages {
                let file = fs.open(&dir.join(&names[which.index(names.len())]), false).unwrap();
                let len = file.len().unwrap() as usize;
                let mut data = vec![0; len];
                file.read_exact_at(&mut data, 0).unwrap();
                match damage {
                    Damage::Flip { at, mask } if len > 0 => data[at.index(len)] ^= mask,
                    Damage::Overwrite { at, bytes } if len > 0 => {
                        let at = at.index(len);
                        let end = (at + bytes.len()).min(len);
                        data[at..end].copy_from_slice(&bytes[..end - at]);
                    }
                    Damage::Insert { at, bytes } => {
                        let at = at.index(len + 1);
                        data.splice(at..at, bytes.iter().copied());
                    }
                    _ => {}
                }
                file.set_len(0).unwrap();
                file.write_all_at(&data, 0).unwrap();
            }

            let store = Store::open_with(Arc::new(fs.clone()), Path::new("/u"), Arc::new(SystemClock));
            let Ok(store) = store else { return Ok(()) };
            let stream = match store.stream("U") {
                Ok(stream) => stream,
                Err(StoreError::StreamNotFound(_)) => {
                    return Err(TestCaseError::fail("a damaged stream was removed, not reported"));
                }
                Err(_) => return Ok(()), // reported: it cannot be opened
            };
            let info = stream.info();
            let last = info.state.last_seq;
            for seq in 1..=last + 1 {
                if let Ok(message) = stream.get(seq) {
                    let original = stored.iter().find(|(s, _, _)| *s == seq);
                    prop_assert!(original.is_some(), "served {seq}, never stored");
                    let (_, subject, payload) = original.unwrap();
                    prop_assert_eq!(&*message.subject, subject.as_str());
                    prop_assert_eq!(&message.payload[..], &payload[..]);
                }
            }
            if let Ok(messages) = stream.range(1, usize::MAX, usize::MAX) {
                for message in messages {
                    let original = stored.iter().find(|(s, _, _)| *s == message.seq);
                    prop_assert!(original.is_some());
                    prop_assert_eq!(&message.payload[..], &original.unwrap().2[..]);
                }
            }
            for subject in ["u.0", "u.1", "u.2"] {
                if let Ok(message) = stream.last(subject) {
                    prop_assert_eq!(&*message.subject, subject);
                }
            }
            if let Ok(ack) = stream.publish("u.0", &[], b"after", &Publish::default()).await {
                let _ = ack.await; // a damaged stream refuses; a healthy one stores it
            }
            Ok(())
        })?;
    }
}
