//! A stream's settings: its subjects, durability and limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When appended messages are forced to disk, and so when a publish is acknowledged.
///
/// | setting | acknowledged after | lost on kill -9 | lost on power loss |
/// | --- | --- | --- | --- |
/// | `Always` | write + `fdatasync` | nothing | nothing |
/// | `Every(d)` | write | nothing | up to `d` of acknowledged messages |
/// | `Never` | write | nothing | whatever the OS had not written back |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Group commit: one write and one `fdatasync` per batch of appends; a publish is
    /// acknowledged only after the `fdatasync` that covers it. The default.
    #[default]
    Always,
    /// Acknowledged once written to the OS; an `fdatasync` at most this long after.
    Every(Duration),
    /// Acknowledged once written to the OS, which decides when it reaches the disk.
    Never,
}

impl Fsync {
    /// The label benchmarks and `info` use: `always`, `every=<duration>` or `never`.
    pub fn label(&self) -> String {
        match self {
            Fsync::Always => "always".into(),
            Fsync::Every(d) => format!("every={d:?}"),
            Fsync::Never => "never".into(),
        }
    }
}

impl std::str::FromStr for Fsync {
    type Err = String;

    /// Parses `always`, `never` or `every=<n><unit>` with a unit of `ms`, `s` or `us`
    /// (as `courier broker --fsync` and `courier stream add --fsync` take it).
    ///
    /// ```
    /// use std::time::Duration;
    /// use mq_store::Fsync;
    /// assert_eq!("every=100ms".parse::<Fsync>(), Ok(Fsync::Every(Duration::from_millis(100))));
    /// assert_eq!("always".parse::<Fsync>(), Ok(Fsync::Always));
    /// assert!("sometimes".parse::<Fsync>().is_err());
    /// ```
    fn from_str(text: &str) -> Result<Fsync, String> {
        let every = |d: &str| -> Option<Duration> {
            let split = d.find(|c: char| !c.is_ascii_digit())?;
            let (n, unit) = d.split_at(split);
            let n: u64 = n.parse().ok()?;
            match unit {
                "ms" => Some(Duration::from_millis(n)),
                "s" => Some(Duration::from_secs(n)),
                "us" => Some(Duration::from_micros(n)),
                _ => None,
            }
        };
        match text {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            _ => text
                .strip_prefix("every=")
                .and_then(every)
                .filter(|d| !d.is_zero())
                .map(Fsync::Every)
                .ok_or_else(|| {
                    format!("fsync `{text}`: expected always, never or every=<n>ms|s|us (n > 0)")
                }),
        }
    }
}

/// What a full stream does with a new message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// Remove the oldest messages to make room. The default.
    #[default]
    Old,
    /// Refuse the new message with an error naming the limit.
    New,
}

/// When a stream removes messages, beyond its limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Only the limits remove messages. The default.
    #[default]
    Limits,
    /// A message is removed once a consumer has acknowledged it (or dead-lettered it);
    /// each subject may be bound to one consumer only.
    WorkQueue,
    /// A message is removed once every consumer bound to its subject has acknowledged
    /// it. A message no consumer is bound to stays until the limits remove it.
    Interest,
}

impl Retention {
    fn is_limits(&self) -> bool {
        *self == Retention::Limits
    }
}

/// A stream's configuration.
///
/// ```
/// use std::time::Duration;
/// use mq_store::{Discard, Fsync, StreamConfig};
/// let config = StreamConfig {
///     max_msgs: Some(1_000_000),
///     max_age: Some(Duration::from_secs(24 * 3600)),
///     discard: Discard::New,
///     fsync: Fsync::Every(Duration::from_millis(100)),
///     ..StreamConfig::new("ORDERS", ["orders.>"])
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamConfig {
    /// The stream's name: letters, digits, `-` and `_`, at most 64 bytes.
    pub name: String,
    /// The subjects it captures; wildcards allowed. Streams may not overlap.
    pub subjects: Vec<String>,
    /// Durability; see [`Fsync`]. Default [`Fsync::Always`].
    pub fsync: Fsync,
    /// Messages older than this are removed. Default: no limit.
    pub max_age: Option<Duration>,
    /// The most bytes of messages (their records) kept. Default: no limit.
    pub max_bytes: Option<u64>,
    /// The most messages kept. Default: no limit.
    pub max_msgs: Option<u64>,
    /// The most messages kept per subject. Default: no limit.
    pub max_msgs_per_subject: Option<u64>,
    /// The largest message (subject, headers and payload) accepted. Default 1 MiB.
    pub max_msg_size: u32,
    /// What a full stream does. Default [`Discard::Old`].
    pub discard: Discard,
    /// How long a `Msg-Id` is remembered to refuse duplicates, also across a restart.
    /// Default 2 minutes, at most 24 hours.
    pub duplicate_window: Duration,
    /// A segment file is closed and a new one started past this size. Default 64 MiB.
    pub segment_size: u64,
    /// Whether consumers' acknowledgements remove messages. Default
    /// [`Retention::Limits`]: they do not.
    #[serde(skip_serializing_if = "Retention::is_limits")]
    pub retention: Retention,
}

/// The largest `max_msg_size`: 64 MiB.
pub const MAX_MSG_SIZE: u32 = 64 * 1024 * 1024;
/// The longest `duplicate_window`: 24 hours. Message ids are found again on open by
/// reading the log, as far back as this.
pub const MAX_DUPLICATE_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The largest `segment_size`: 1 GiB (record positions are 32-bit).
pub const MAX_SEGMENT_SIZE: u64 = 1024 * 1024 * 1024;

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: String::new(),
            subjects: Vec::new(),
            fsync: Fsync::Always,
            max_age: None,
            max_bytes: None,
            max_msgs: None,
            max_msgs_per_subject: None,
            max_msg_size: 1024 * 1024,
            discard: Discard::Old,
            duplicate_window: Duration::from_secs(120),
            segment_size: 64 * 1024 * 1024,
            retention: Retention::Limits,
        }
    }
}

impl StreamConfig {
    /// A stream named `name` capturing `subjects`, every other setting its default.
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        StreamConfig {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            ..StreamConfig::default()
        }
    }

    /// Checks the settings, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        if self.subjects.is_empty() {
            return Err(format!("stream `{}` has no subjects", self.name));
        }
        for subject in &self.subjects {
            crate::subject::validate_filter(subject).map_err(|e| e.to_string())?;
        }
        for (i, a) in self.subjects.iter().enumerate() {
            for b in &self.subjects[i + 1..] {
                if crate::subject::overlaps(a, b) {
                    return Err(format!(
                        "subjects `{a}` and `{b}` of stream `{}` overlap",
                        self.name
                    ));
                }
            }
        }
        if self.max_msg_size == 0 || self.max_msg_size > MAX_MSG_SIZE {
            return Err(format!(
                "max_msg_size {} is outside 1..={MAX_MSG_SIZE}",
                self.max_msg_size
            ));
        }
        if !(4096..=MAX_SEGMENT_SIZE).contains(&self.segment_size) {
            return Err(format!(
                "segment_size {} is outside 4096..={MAX_SEGMENT_SIZE}",
                self.segment_size
            ));
        }
        if self.duplicate_window > MAX_DUPLICATE_WINDOW {
            return Err(format!(
                "duplicate_window {:?} is longer than {MAX_DUPLICATE_WINDOW:?}",
                self.duplicate_window
            ));
        }
        if self.fsync == Fsync::Every(Duration::ZERO) {
            return Err("fsync every 0s: use `always`".into());
        }
        Ok(())
    }
}

/// Checks a stream name: 1 to 64 bytes of ASCII letters, digits, `-` and `_`, so that
/// it is a file name, a subject token and a NATS stream name everywhere.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("stream name `{name}` must be 1 to 64 bytes long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "stream name `{name}` may hold only ASCII letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}
