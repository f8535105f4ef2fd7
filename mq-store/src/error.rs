//! What can go wrong in the store, each error naming what it concerns.

use std::path::PathBuf;
use std::sync::Arc;

use crate::record::DecodeError;

/// An error of the store or of one of its streams.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file operation failed.
    #[error("{operation} {}: {source}", path.display())]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A record read back from disk is damaged; nothing of it is served.
    #[error("corrupt record in {} at offset {offset}: {reason}", file.display())]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// An earlier write or fsync failed; the stream refuses publishes until it has
    /// recovered (on the next publish, once the disk works again).
    #[error("stream `{stream}` refuses writes: {cause}")]
    Poisoned {
        /// The stream.
        stream: String,
        /// The failure, and the recovery attempt's if that failed too.
        cause: String,
    },
    /// A message cannot be stored as it is (a malformed subject, a header name too long).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A configuration is invalid.
    #[error("invalid stream configuration: {0}")]
    InvalidConfig(String),
    /// No stream has that name.
    #[error("no stream named `{0}`")]
    StreamNotFound(String),
    /// A stream of that name exists already with another configuration.
    #[error("stream `{0}` already exists with a different configuration")]
    StreamExists(String),
    /// The new stream's subjects overlap an existing stream's.
    #[error("subject `{subject}` overlaps `{other_subject}` of stream `{other}`")]
    SubjectOverlap {
        /// The new subject filter.
        subject: String,
        /// The existing stream.
        other: String,
        /// Its overlapping filter.
        other_subject: String,
    },
    /// No stream captures the subject.
    #[error("no stream captures subject `{0}`")]
    NoStreamForSubject(String),
    /// A limit of the stream refuses the message (with `Discard::New`, or a size limit).
    #[error("stream `{stream}` refused the message: {limit} {value} reached")]
    LimitReached {
        /// The stream.
        stream: String,
        /// The limit's setting, e.g. `max_msgs`.
        limit: &'static str,
        /// Its value.
        value: u64,
    },
    /// An optimistic-concurrency expectation did not hold.
    #[error("stream `{stream}`: expected {what} {expected}, found {found}")]
    WrongLast {
        /// The stream.
        stream: String,
        /// `last sequence`, `last sequence on subject …` or `last message id`.
        what: String,
        /// What the publisher expected.
        expected: String,
        /// What the stream holds.
        found: String,
    },
    /// No message with that sequence (never stored, removed, or not yet durable).
    #[error("stream `{stream}` has no message {seq}")]
    NoMessage {
        /// The stream.
        stream: String,
        /// The sequence asked for.
        seq: u64,
    },
    /// No message on that subject.
    #[error("stream `{stream}` has no message on `{subject}`")]
    NoMessageOnSubject {
        /// The stream.
        stream: String,
        /// The subject asked for.
        subject: String,
    },
    /// The stream was deleted or the store closed.
    #[error("stream `{0}` is closed")]
    Closed(String),
    /// A consumer's configuration is invalid, or conflicts with the stream's.
    #[error("invalid consumer configuration: {0}")]
    InvalidConsumer(String),
    /// The stream has no consumer of that name.
    #[error("stream `{stream}` has no consumer `{consumer}`")]
    ConsumerNotFound {
        /// The stream.
        stream: String,
        /// The consumer asked for.
        consumer: String,
    },
    /// A consumer of that name exists already with another configuration.
    #[error(
        "consumer `{consumer}` of stream `{stream}` already exists with a different configuration"
    )]
    ConsumerExists {
        /// The stream.
        stream: String,
        /// The consumer.
        consumer: String,
    },
    /// The message was acknowledged, terminated or dead-lettered already, or is no
    /// longer waiting for an answer from this delivery.
    #[error("consumer `{consumer}`: message {seq} is not waiting for an acknowledgement")]
    NotPending {
        /// The consumer.
        consumer: String,
        /// The message's stream sequence.
        seq: u64,
    },
    /// Another store has the directory open (in this process or another): one store
    /// per directory.
    #[error("{} is in use by another store (its LOCK file is held)", .0.display())]
    Locked(PathBuf),
}

impl StoreError {
    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        StoreError::Io {
            operation,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn corrupt(file: impl Into<PathBuf>, offset: u64, reason: impl ToString) -> Self {
        StoreError::Corrupt {
            file: file.into(),
            offset,
            reason: reason.to_string(),
        }
    }
}

impl From<(PathBuf, u64, DecodeError)> for StoreError {
    fn from((file, offset, e): (PathBuf, u64, DecodeError)) -> Self {
        StoreError::corrupt(file, offset, e)
    }
}
