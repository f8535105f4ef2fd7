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
    /// An error reported by a store elsewhere (a broker's), with its kind and its
    /// message as that store wrote it.
    #[error("{message}")]
    Reported {
        /// What kind of error it was.
        kind: ErrorKind,
        /// The store's message, naming what it concerns.
        message: String,
    },
}

/// The kind of a [`StoreError`], the same wherever the store runs: what a program
/// branches on, and what a broker sends its clients with the error's message.
///
/// ```
/// use mq_store::{ErrorKind, StoreError};
/// let e = StoreError::StreamNotFound("ORDERS".into());
/// assert_eq!(e.kind(), ErrorKind::StreamNotFound);
/// let remote = StoreError::Reported { kind: e.kind(), message: e.to_string() };
/// assert_eq!((remote.kind(), remote.to_string()), (e.kind(), e.to_string()));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`StoreError::Io`].
    Io,
    /// [`StoreError::Corrupt`].
    Corrupt,
    /// [`StoreError::Poisoned`].
    Poisoned,
    /// [`StoreError::InvalidMessage`].
    InvalidMessage,
    /// [`StoreError::InvalidConfig`].
    InvalidConfig,
    /// [`StoreError::StreamNotFound`].
    StreamNotFound,
    /// [`StoreError::StreamExists`].
    StreamExists,
    /// [`StoreError::SubjectOverlap`].
    SubjectOverlap,
    /// [`StoreError::NoStreamForSubject`].
    NoStreamForSubject,
    /// [`StoreError::LimitReached`].
    LimitReached,
    /// [`StoreError::WrongLast`].
    WrongLast,
    /// [`StoreError::NoMessage`] and [`StoreError::NoMessageOnSubject`].
    NoMessage,
    /// [`StoreError::Closed`].
    Closed,
    /// [`StoreError::InvalidConsumer`].
    InvalidConsumer,
    /// [`StoreError::ConsumerNotFound`].
    ConsumerNotFound,
    /// [`StoreError::ConsumerExists`].
    ConsumerExists,
    /// [`StoreError::NotPending`].
    NotPending,
    /// [`StoreError::Locked`].
    Locked,
    /// A request a broker could not understand (only in [`StoreError::Reported`]).
    BadRequest,
    /// A kind this version does not know (sent by a newer store).
    #[serde(other)]
    Other,
}

impl StoreError {
    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Io { .. } => ErrorKind::Io,
            StoreError::Corrupt { .. } => ErrorKind::Corrupt,
            StoreError::Poisoned { .. } => ErrorKind::Poisoned,
            StoreError::InvalidMessage(_) => ErrorKind::InvalidMessage,
            StoreError::InvalidConfig(_) => ErrorKind::InvalidConfig,
            StoreError::StreamNotFound(_) => ErrorKind::StreamNotFound,
            StoreError::StreamExists(_) => ErrorKind::StreamExists,
            StoreError::SubjectOverlap { .. } => ErrorKind::SubjectOverlap,
            StoreError::NoStreamForSubject(_) => ErrorKind::NoStreamForSubject,
            StoreError::LimitReached { .. } => ErrorKind::LimitReached,
            StoreError::WrongLast { .. } => ErrorKind::WrongLast,
            StoreError::NoMessage { .. } | StoreError::NoMessageOnSubject { .. } => {
                ErrorKind::NoMessage
            }
            StoreError::Closed(_) => ErrorKind::Closed,
            StoreError::InvalidConsumer(_) => ErrorKind::InvalidConsumer,
            StoreError::ConsumerNotFound { .. } => ErrorKind::ConsumerNotFound,
            StoreError::ConsumerExists { .. } => ErrorKind::ConsumerExists,
            StoreError::NotPending { .. } => ErrorKind::NotPending,
            StoreError::Locked(_) => ErrorKind::Locked,
            StoreError::Reported { kind, .. } => *kind,
        }
    }
}

/// An error as it travels: its kind and its message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireError {
    /// [`StoreError::kind`].
    pub kind: ErrorKind,
    /// The error's message.
    pub message: String,
}

impl From<&StoreError> for WireError {
    fn from(e: &StoreError) -> Self {
        WireError {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl From<WireError> for StoreError {
    fn from(e: WireError) -> Self {
        StoreError::Reported {
            kind: e.kind,
            message: e.message,
        }
    }
}

/// Serde for an `Option<StoreError>` field: as an optional [`WireError`], read back as
/// [`StoreError::Reported`].
pub(crate) mod optional_wire {
    use super::{StoreError, WireError};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        e: &Option<StoreError>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        e.as_ref().map(WireError::from).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<StoreError>, D::Error> {
        Ok(Option::<WireError>::deserialize(d)?.map(StoreError::from))
    }
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
