//! Messages as a stream returns them, and its acknowledgement of a publish.

use std::sync::Arc;

use bytes::Bytes;

/// A message read back from a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its sequence in the stream, from 1.
    pub seq: u64,
    /// When it was stored, in nanoseconds since the Unix epoch.
    pub time: i64,
    /// The subject it was published to. Shared: the messages of one read that have
    /// the same subject share one allocation of it.
    pub subject: Arc<str>,
    /// Its headers, in order; names keep their case. Names are shared like subjects.
    pub headers: Vec<(Arc<str>, Bytes)>,
    /// Its payload.
    pub payload: Bytes,
}

impl StoredMessage {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v)
    }
}

/// A stream's answer to a durable publish: the message is stored, and durable as the
/// stream's `fsync` setting says.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PubAck {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence.
    pub seq: u64,
    /// True if its `Msg-Id` was seen within the duplicate window: nothing was stored
    /// and `seq` is the original's.
    pub duplicate: bool,
}

/// Conditions a publish must meet, and its deduplication id.
///
/// ```
/// use mq_store::Publish;
/// let publish = Publish { msg_id: Some("order-17".into()), expected_last_seq: Some(41), ..Publish::default() };
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Publish {
    /// Deduplicates retries within the stream's duplicate window; stored as the
    /// `Msg-Id` header.
    pub msg_id: Option<String>,
    /// The stream's last sequence must be this (0: the stream is empty).
    pub expected_last_seq: Option<u64>,
    /// The last sequence on this message's subject must be this (0: none).
    pub expected_last_subject_seq: Option<u64>,
    /// The last message stored must have carried this `Msg-Id`.
    pub expected_last_msg_id: Option<String>,
    /// No consumer gets the message before this time (nanoseconds since the Unix
    /// epoch); stored as the [`DELIVER_AT_HEADER`] header.
    pub deliver_at: Option<i64>,
    /// No consumer gets the message before this long after it is stored; the time is
    /// fixed when the stream takes it (and [`Publish::deliver_at`] wins if both are set).
    pub delay: Option<std::time::Duration>,
}

/// The header holding a message's delivery time: decimal nanoseconds since the Unix
/// epoch. Consumers hold the message back until then; a value that does not parse is
/// ignored (the message is delivered at once).
pub const DELIVER_AT_HEADER: &str = "Courier-Deliver-At";

/// Shared copies of the subjects and header names of a run of messages, as one read
/// returns them: a name equal to the one in the same place of the message before is not
/// allocated again. Streams usually repeat their subjects and header names, so a read
/// of many messages allocates each once.
///
/// ```
/// use mq_store::SharedNames;
///
/// let mut names = SharedNames::default();
/// let a = names.subject("orders.eu");
/// let b = names.subject("orders.eu");
/// assert!(std::sync::Arc::ptr_eq(&a, &b));
/// assert_eq!(&*names.subject("orders.us"), "orders.us");
/// let id = names.header(0, "Msg-Id");
/// assert!(std::sync::Arc::ptr_eq(&id, &names.header(0, "Msg-Id")));
/// ```
#[derive(Debug, Default)]
pub struct SharedNames {
    subject: Option<Arc<str>>,
    headers: Vec<Arc<str>>,
}

impl SharedNames {
    /// `subject`, shared with the previous subject asked for if it is the same.
    pub fn subject(&mut self, subject: &str) -> Arc<str> {
        match &self.subject {
            Some(last) if **last == *subject => last.clone(),
            _ => {
                let fresh: Arc<str> = Arc::from(subject);
                self.subject = Some(fresh.clone());
                fresh
            }
        }
    }

    /// The name of header number `index` of a message, shared with the previous name
    /// asked for at that index if it is the same.
    pub fn header(&mut self, index: usize, name: &str) -> Arc<str> {
        if let Some(last) = self.headers.get(index)
            && **last == *name
        {
            return last.clone();
        }
        let fresh: Arc<str> = Arc::from(name);
        if index < self.headers.len() {
            self.headers[index] = fresh.clone();
        } else if index == self.headers.len() && index < 64 {
            self.headers.push(fresh.clone());
        }
        fresh
    }
}
