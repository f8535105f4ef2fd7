//! [`Event`]: what a bus reports about itself, besides messages.

/// Connection changes and slow-consumer drops, observable through
/// [`crate::Bus::events`] (a broadcast channel: a receiver that falls behind loses the
/// oldest events, and learns how many from `RecvError::Lagged`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Connected (or reconnected) to a broker; subscriptions are restored.
    Connected {
        /// The broker's address.
        server: String,
    },
    /// The connection to the broker ended; the client reconnects with backoff.
    Disconnected {
        /// Why, including the broker's go-away message when it sent one (for example
        /// when it cut this client off as a slow consumer).
        reason: String,
    },
    /// Reconnected after publishes were made while disconnected: they were kept (up to
    /// `ConnectOptions::reconnect_buffer`) and have now been sent, after this client's
    /// subscriptions were restored. Delivery is at-most-once: a subscriber that had not
    /// reconnected to the broker by then did not get them. Durable streams keep messages
    /// for subscribers that come back.
    PublishedWhileDisconnected {
        /// How many publishes.
        publishes: u64,
        /// Their size in frames.
        bytes: usize,
    },
    /// A subscription's queue was full, so messages for it were dropped. Reported when
    /// a subscription starts dropping; `dropped` counts every message it has dropped
    /// since it was created (also available from [`crate::Subscriber::dropped`]).
    SlowConsumer {
        /// The subscription's filter.
        subject: String,
        /// Messages dropped so far.
        dropped: u64,
    },
}
