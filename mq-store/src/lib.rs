//! mq-store: courier's storage engine.
//!
//! A [`Store`] holds streams; a [`Stream`] is an append-only log of messages, kept in
//! segment files of checksummed [`record`]s, indexed in memory by sequence and by
//! subject, and recovered on open: a torn write at the end is cut off and logged, and
//! damage anywhere else is an error naming the file and offset, never a message.
//!
//! * **Durability** per stream ([`Fsync`]): `Always` (the default) acknowledges a
//!   publish only after the `fdatasync` that covers it, one per batch of publishes
//!   (group commit); `Every(d)` and `Never` acknowledge once written.
//! * **Limits** ([`StreamConfig`]): age, bytes, messages, messages per subject; a full
//!   stream discards its oldest messages or refuses new ones ([`Discard`]).
//! * **Deduplication** by `Msg-Id` within a window that survives a restart, and
//!   optimistic concurrency ([`Publish`]).
//! * **Files** go through [`fs::Fs`], so that [`fault::SimFs`] can fail writes and
//!   fsyncs, fill up, and lose power in tests; [`Store::memory`] runs the same engine
//!   over memory.
//!
//! No networking: the bus (`mq-transport`) serves streams from it. `docs/STORAGE.md`
//! describes the files byte by byte.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use mq_store::{Publish, Store, StreamConfig};
//! let dir = std::env::temp_dir().join(format!("mq-store-doc-{}", std::process::id()));
//! let store = Store::open(&dir).unwrap();
//! let stream = store.create(StreamConfig::new("EVENTS", ["events.>"])).unwrap();
//! let pending = stream.publish("events.a", &[], b"hello", &Publish::default()).await.unwrap();
//! let ack = pending.await.unwrap(); // written and fsynced
//! assert_eq!(stream.last("events.a").unwrap().seq, ack.seq);
//! # drop(store); std::fs::remove_dir_all(&dir).unwrap();
//! # });
//! ```

#![forbid(unsafe_code)]

pub mod clock;
mod config;
mod consumer;
mod error;
pub mod fault;
pub mod fs;
mod journal;
mod log;
mod message;
pub mod record;
mod store;
mod stream;
pub mod subject;

pub use config::{
    Discard, Fsync, MAX_DUPLICATE_WINDOW, MAX_MSG_SIZE, MAX_SEGMENT_SIZE, Retention, StreamConfig,
    validate_name,
};
pub use consumer::{
    AckPolicy, Answer, Consumer, ConsumerConfig, ConsumerInfo, DeadLetter, DeliverPolicy, Delivery,
    DeliveryInfo, KeySource, MAX_WAIT, Messages, dead_letter_headers,
};
pub use error::{ErrorKind, StoreError, WireError};
pub use log::{MAX_MSG_ID_LEN, MSG_ID_HEADER};
pub use message::{DELIVER_AT_HEADER, PubAck, Publish, SharedNames, StoredMessage};
pub use store::{DeadLetterObserver, LOCK_FILE, Store};
pub use stream::{AckFuture, Stream, StreamInfo, StreamState};
