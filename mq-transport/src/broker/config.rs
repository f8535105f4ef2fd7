//! [`BrokerConfig`], its validation, and [`BrokerStats`].

use std::time::Duration;

use rpc_core::ConnectionConfig;

use crate::embedded::Storage;

/// Limits and settings of a [`crate::Broker`].
///
/// ```
/// use mq_transport::BrokerConfig;
///
/// let mut config = BrokerConfig::default();
/// config.max_payload = 64 * 1024;
/// config.token = Some("s3cret".into());
/// assert_eq!(config.max_connections, 10_000);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// The largest payload a publish may carry; stated to clients when they connect, so
    /// that they refuse larger publishes themselves. A client that sends one anyway is
    /// disconnected with a go-away naming the limit. Must leave
    /// [`BrokerConfig::FRAME_HEADROOM`] bytes below `connection.max_frame_len` (see
    /// [`BrokerConfig::validate`]). Default 1 MiB.
    pub max_payload: usize,
    /// Connections served at once; one more is refused with a go-away. Default 10,000.
    pub max_connections: usize,
    /// Subscriptions per connection; one more is refused (the subscribe call fails with
    /// the limit named). Default 65,536.
    pub max_subscriptions: usize,
    /// When set, clients must present this token on connect.
    pub token: Option<String>,
    /// How long a new connection has to send its connect frame. Default 5 s.
    pub handshake_timeout: Duration,
    /// Frame size, keepalive and queue limits of every connection. `max_queued_bytes`
    /// (default 64 MiB) is the slow-consumer threshold. `send_queue` defaults to 4 Mi
    /// frames here (the queue allocates as it fills), so that the byte limit, not a frame
    /// count, decides who is slow: 1,024 frames of small messages are only ~40 KiB.
    /// `max_frame_len` defaults to `max_payload + FRAME_HEADROOM` (1 MiB + 64 KiB); it is
    /// stated to clients, which send no larger frame, and the broker sends each client no
    /// frame larger than the limit that client states.
    pub connection: ConnectionConfig,
    /// The broker's name, sent to clients. Default `"courier-broker"`.
    pub name: String,
    /// How long a publisher waits for room on a subscriber connection that is at
    /// `max_queued_bytes` before that subscriber is cut off as a slow consumer. While it
    /// waits, the broker reads nothing more from that publisher (back-pressure through
    /// TCP). Zero cuts at once. Default 2 s.
    pub slow_consumer_grace: Duration,
    /// Bytes queued for a subscriber connection past which the broker paces the
    /// publishers adding to it: after routing a message there, a publisher waits until
    /// that queue is down to half of this. Queues stay short (cache-friendly, low
    /// latency) instead of filling to `max_queued_bytes` when publishers outrun
    /// subscribers. A queue that does not get there within `slow_consumer_grace` belongs
    /// to a subscriber that is not reading: it is cut off as a slow consumer. No pacing
    /// with a zero grace. Default 1 MiB.
    pub pace_queued_bytes: usize,
    /// Where the broker keeps its durable streams and consumers
    /// ([`crate::Streams`] on a connected bus; `courier broker --store DIR`). Default
    /// [`Storage::Memory`]: they last as long as the broker.
    pub storage: Storage,
    /// When set, every stream on this broker uses this fsync setting, whatever its
    /// configuration asked for (`courier broker --fsync`): streams created or updated
    /// get it, and streams found in `storage` are updated to it before the broker
    /// accepts connections. A stream's info reports the setting in force. Default
    /// `None`: each stream's own setting (by default [`mq_store::Fsync::Always`]).
    pub fsync: Option<mq_store::Fsync>,
    /// Streams the broker holds; creating one more is refused, naming this limit.
    /// Default 1,000.
    pub max_streams: usize,
    /// Durable consumers per stream; creating one more is refused, naming this limit.
    /// (Ephemeral ones are limited per connection: 64.) Default 1,000.
    pub max_consumers: usize,
}

impl BrokerConfig {
    /// Room a message frame needs besides its payload and headers (which count against
    /// `max_payload` together): the frame's preamble, the subscription id, and subject
    /// and reply subject (at most 4,096 bytes each). `max_payload + FRAME_HEADROOM` must
    /// fit in `connection.max_frame_len`; then every publish the broker accepts can be
    /// delivered. 64 KiB.
    pub const FRAME_HEADROOM: usize = 64 * 1024;

    /// The most a `Msg` frame carries besides payload and headers: preamble (2),
    /// subscription id (8), subject and reply (2 + 4,096 each), the header count (2).
    const MAX_ENVELOPE: usize = 2 + 8 + 2 * (2 + crate::subject::MAX_SUBJECT_LEN) + 2;

    /// The same settings with `max_payload` set and the frame limit sized to it:
    /// `max_payload + FRAME_HEADROOM` (what `courier broker --max-payload` does).
    ///
    /// ```
    /// use mq_transport::BrokerConfig;
    ///
    /// let config = BrokerConfig::default().with_max_payload(16 * 1024 * 1024);
    /// assert_eq!(config.connection.max_frame_len, 16 * 1024 * 1024 + BrokerConfig::FRAME_HEADROOM);
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn with_max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload;
        self.connection.max_frame_len = max_payload.saturating_add(Self::FRAME_HEADROOM);
        self
    }

    /// Checks that the settings fit together: a publish of `max_payload` bytes must fit
    /// in a frame of `connection.max_frame_len` with [`BrokerConfig::FRAME_HEADROOM`] to
    /// spare, or the broker would accept payloads its own connections refuse to carry.
    pub fn validate(&self) -> Result<(), BrokerConfigError> {
        let needed = self.max_payload.saturating_add(Self::FRAME_HEADROOM);
        if needed > self.connection.max_frame_len {
            return Err(BrokerConfigError::FrameTooSmallForPayload {
                max_payload: self.max_payload,
                max_frame_len: self.connection.max_frame_len,
                headroom: Self::FRAME_HEADROOM,
            });
        }
        Ok(())
    }
}

// Every publish the broker accepts can be delivered.
const _: () = assert!(BrokerConfig::MAX_ENVELOPE <= BrokerConfig::FRAME_HEADROOM);

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_payload: 1024 * 1024,
            max_connections: 10_000,
            max_subscriptions: 65_536,
            token: None,
            handshake_timeout: Duration::from_secs(5),
            slow_consumer_grace: Duration::from_secs(2),
            pace_queued_bytes: 1024 * 1024,
            connection: {
                let mut connection = ConnectionConfig::default();
                connection.send_queue = 4 * 1024 * 1024;
                // Sized to the payload limit: a connection holding a partial frame, or a
                // frame being read, costs at most this.
                connection.max_frame_len = 1024 * 1024 + Self::FRAME_HEADROOM;
                connection
            },
            name: "courier-broker".into(),
            storage: Storage::Memory,
            fsync: None,
            max_streams: 1000,
            max_consumers: 1000,
        }
    }
}

/// Settings of a [`BrokerConfig`] that do not fit together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerConfigError {
    /// `max_payload` plus the headroom does not fit in the frame limit.
    #[error(
        "BrokerConfig::max_payload ({max_payload} bytes) plus {headroom} bytes of headroom \
         for subject, reply and headers exceeds BrokerConfig::connection.max_frame_len \
         ({max_frame_len} bytes): raise max_frame_len, lower max_payload, or use \
         BrokerConfig::with_max_payload, which sizes both"
    )]
    FrameTooSmallForPayload {
        /// The payload limit.
        max_payload: usize,
        /// The frame limit.
        max_frame_len: usize,
        /// [`BrokerConfig::FRAME_HEADROOM`].
        headroom: usize,
    },
    /// The storage directory could not be opened.
    #[error("the broker's storage directory {} cannot be used: {reason}", dir.display())]
    Storage {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        reason: String,
    },
}

impl From<BrokerConfigError> for std::io::Error {
    fn from(error: BrokerConfigError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, error)
    }
}

/// Counters of a running broker; see [`crate::Broker::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Connections open now.
    pub connections: usize,
    /// Subscriptions held now.
    pub subscriptions: usize,
    /// Publishes received.
    pub messages_in: u64,
    /// Messages queued to subscribers.
    pub messages_out: u64,
    /// Messages not delivered to a subscriber because the frame exceeded the limit that
    /// subscriber's connection stated (each is logged).
    pub messages_too_large: u64,
    /// Connections cut off for not keeping up.
    pub slow_consumers: u64,
    /// Bytes queued to all connections and not yet written, now.
    pub queued_bytes: usize,
}
