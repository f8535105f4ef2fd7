//! Messages as a stream returns them, and its acknowledgement of a publish.

use bytes::Bytes;

/// A message read back from a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its sequence in the stream, from 1.
    pub seq: u64,
    /// When it was stored, in nanoseconds since the Unix epoch.
    pub time: i64,
    /// The subject it was published to.
    pub subject: String,
    /// Its headers, in order; names keep their case.
    pub headers: Vec<(String, Bytes)>,
    /// Its payload.
    pub payload: Bytes,
}

impl StoredMessage {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
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
