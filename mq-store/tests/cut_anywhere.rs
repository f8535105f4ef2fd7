//! A property of recovery: whatever byte the log is cut at, reopening it yields exactly
//! a prefix of what was appended, every record intact, and the stream goes on from there.

use std::path::Path;
use std::sync::Arc;

use mq_store::clock::SystemClock;
use mq_store::fault::SimFs;
use mq_store::fs::Fs;
use mq_store::{Publish, Store, StreamConfig};
use proptest::prelude::*;

fn run<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn open(fs: &SimFs) -> Store {
    Store::open_with(Arc::new(fs.clone()), Path::new("/p"), Arc::new(SystemClock)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_log_cut_at_any_byte_reopens_as_an_intact_prefix(
        messages in prop::collection::vec((0u8..4, prop::collection::vec(any::<u8>(), 0..600), any::<bool>()), 1..80),
        cut in any::<prop::sample::Index>(),
    ) {
        run(async {
            let fs = SimFs::default();
            let store = open(&fs);
            let config = StreamConfig { segment_size: 4096, ..StreamConfig::new("P", ["p.*"]) };
            let stream = store.create(config).unwrap();
            let mut appended = Vec::new();
            for (i, (subject, payload, id)) in messages.iter().enumerate() {
                let subject = format!("p.{subject}");
                let options = Publish { msg_id: id.then(|| format!("id-{i}")), ..Publish::default() };
                let ack = stream.publish(&subject, &[("h", &payload[..payload.len().min(3)])], payload, &options).await.unwrap().await.unwrap();
                prop_assert_eq!(ack.seq, i as u64 + 1);
                appended.push((subject, payload.clone()));
            }
            drop((stream, store));

            // Cut the concatenated segments at one byte: later segments go, that one is cut.
            let dir = Path::new("/p/streams/P");
            let mut names = fs.list(dir).unwrap();
            names.sort();
            let files: Vec<_> = names.iter().map(|n| fs.open(&dir.join(n), false).unwrap()).collect();
            let lens: Vec<u64> = files.iter().map(|f| f.len().unwrap()).collect();
            let total: u64 = lens.iter().sum();
            let mut at = cut.index(total as usize + 1) as u64;
            let mut keep = names.len();
            for (i, len) in lens.iter().enumerate() {
                if at <= *len {
                    files[i].set_len(at).unwrap();
                    keep = i + 1;
                    break;
                }
                at -= len;
            }
            for name in &names[keep..] {
                fs.remove_file(&dir.join(name)).unwrap();
            }

            let store = open(&fs);
            let recovered = match store.stream("P") {
                Ok(stream) => stream.range(1, usize::MAX, usize::MAX).unwrap(),
                Err(_) => Vec::new(), // cut inside the first configuration record
            };
            prop_assert!(recovered.len() <= appended.len());
            for (i, message) in recovered.iter().enumerate() {
                prop_assert_eq!(message.seq, i as u64 + 1);
                prop_assert_eq!(&*message.subject, appended[i].0.as_str());
                prop_assert_eq!(&message.payload[..], &appended[i].1[..]);
            }
            if let Ok(stream) = store.stream("P") {
                let next = stream.publish("p.0", &[], b"next", &Publish::default()).await.unwrap().await.unwrap();
                prop_assert_eq!(next.seq, recovered.len() as u64 + 1);
            }
            Ok(())
        })?;
    }
}
