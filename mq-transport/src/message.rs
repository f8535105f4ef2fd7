//! [`Message`]: what travels on the bus.

use bytes::Bytes;
use rpc_core::{Metadata, Utf8Bytes};

/// The header a bus sets on messages it generates itself, holding a status code.
pub const STATUS_HEADER: &str = "Courier-Status";
/// The header explaining a status, in words.
pub const DESCRIPTION_HEADER: &str = "Courier-Description";
/// [`STATUS_HEADER`] value of the answer to a request that reached no subscriber.
pub const NO_RESPONDERS: &str = "503";
/// [`STATUS_HEADER`] value of a subscription the broker refused (it names the reason in
/// [`DESCRIPTION_HEADER`]).
pub const SUBSCRIPTION_REFUSED: &str = "400";

/// A message: a subject, an optional reply subject, headers and an opaque payload.
///
/// Cloning shares the payload (it is [`Bytes`]): fan-out to many subscribers never copies
/// it.
///
/// ```
/// use mq_transport::Message;
///
/// let m = Message::new("orders.created", "order 42")
///     .with_reply("orders.replies")
///     .with_header("Trace-Id", "abc");
/// assert_eq!(m.subject, "orders.created");
/// assert_eq!(m.headers.get_str("Trace-Id"), Some("abc"));
/// assert_eq!(&m.payload[..], b"order 42");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// The subject it was published to.
    pub subject: Utf8Bytes,
    /// Where an answer should go, if anywhere.
    pub reply: Option<Utf8Bytes>,
    /// Headers: multi-valued, names keep their case.
    pub headers: Metadata,
    /// The body.
    pub payload: Bytes,
}

impl Message {
    /// A message to `subject` carrying `payload`.
    pub fn new(subject: impl Into<Utf8Bytes>, payload: impl Into<Bytes>) -> Self {
        Message {
            subject: subject.into(),
            reply: None,
            headers: Metadata::new(),
            payload: payload.into(),
        }
    }

    /// Sets the reply subject.
    pub fn with_reply(mut self, reply: impl Into<Utf8Bytes>) -> Self {
        self.reply = Some(reply.into());
        self
    }

    /// Adds a header value (keeping earlier values under the same name).
    pub fn with_header(mut self, name: impl Into<Utf8Bytes>, value: impl Into<Bytes>) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The bus status of a message the bus generated itself (for example
    /// [`NO_RESPONDERS`]); `None` for messages published by users.
    pub fn status(&self) -> Option<&str> {
        self.headers.get_str(STATUS_HEADER)
    }

    /// A message the bus itself sends to `to`, with a status and a description.
    pub(crate) fn status_message(to: Utf8Bytes, status: &'static str, description: String) -> Self {
        Message {
            headers: status_headers(status, description),
            ..Message::new(to, Bytes::new())
        }
    }
}

/// The headers of a message the bus generates itself.
pub(crate) fn status_headers(status: &'static str, description: String) -> Metadata {
    let mut headers = Metadata::new();
    headers.insert(STATUS_HEADER, status);
    headers.insert(DESCRIPTION_HEADER, description);
    headers
}

/// What a message counts against a maximum payload: its payload and its headers (as
/// NATS counts them), the headers as they take room in a frame.
pub(crate) fn counted_size(headers: &Metadata, payload: &Bytes) -> usize {
    let headers = if headers.is_empty() {
        0
    } else {
        headers.wire_len()
    };
    payload.len().saturating_add(headers)
}
