//! Streams on NATS JetStream (cargo feature `nats`), through async-nats's `jetstream`.
//!
//! What maps directly: streams and their limits, retention and duplicate window; durable
//! publishes with `Nats-Msg-Id` and the expectations; get, last and range; pull
//! consumers with ack, nak with a delay, in-progress, term, ack wait, backoff and max
//! ack pending.
//!
//! What courier adds on the client, and how:
//!
//! * **Dead letters.** The JetStream consumer has no delivery limit; courier's
//!   `max_deliver` and `dead_letter` travel in the consumer's description. A message
//!   fetched more than `max_deliver` times, or answered with `term`, is published to
//!   `$DLQ.<stream>.<consumer>` (with `Nats-Msg-Id` `dlq.<stream>.<consumer>.<seq>`, so
//!   a retry lands once) before it is terminated on the server; the application never
//!   sees it again. A crash in between leaves it pending, and it is dead-lettered again
//!   on its next delivery (deduplicated).
//! * **Delayed delivery.** A delayed publish carries `Courier-Deliver-At`; a message
//!   fetched before its time is given back with a nak delayed until then, not handed
//!   to the application (it counts as a delivery on the server).
//! * **Per-key order** is refused: without a per-key in-flight limit on the server, a
//!   group of clients cannot keep it.
//! * **Fsync.** JetStream syncs as its server is configured (`sync_interval`, every 2
//!   minutes by default), not per stream: see [`Js::create`].
//!
//! Courier's stream settings JetStream has no field for (`fsync`) travel in the stream's
//! description, so that they read back as they were set.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::TryStreamExt;
use mq_store::{
    AckPolicy, Answer, ConsumerConfig, ConsumerInfo, DeadLetter, DeliverPolicy, DeliveryInfo,
    Discard, ErrorKind, Fsync, PubAck, Publish, Retention, StoreError, StoredMessage, StreamConfig,
    StreamInfo, StreamState,
};
use serde::{Deserialize, Serialize};

use super::{Delivery, PubAckFuture};
use crate::error::BusError;
use crate::message::Message;

/// Where courier keeps its own settings in a stream's or consumer's description.
const DESCRIPTION_PREFIX: &str = "courier:";

/// The JetStream of the NATS server a bus is connected to.
#[derive(Clone, Debug)]
pub(crate) struct Js {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The server's version, for the features that depend on it.
    version: (u32, u32, u32),
    replicas: usize,
}

/// Courier's stream settings that JetStream has no field for.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StreamExtra {
    fsync: Fsync,
    #[serde(default)]
    segment_size: u64,
}

/// Courier's consumer settings that the JetStream consumer does not carry.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ConsumerExtra {
    #[serde(default)]
    max_deliver: Option<u32>,
    #[serde(default)]
    dead_letter: DeadLetter,
    /// The consumer's JetStream `max_deliver` was left unlimited by courier.
    #[serde(default)]
    durable: bool,
}

fn describe<T: Serialize>(extra: &T) -> Option<String> {
    Some(format!(
        "{DESCRIPTION_PREFIX}{}",
        serde_json::to_string(extra).expect("settings serialize")
    ))
}

fn extra<T: for<'de> Deserialize<'de> + Default>(description: &Option<String>) -> T {
    description
        .as_deref()
        .and_then(|d| d.strip_prefix(DESCRIPTION_PREFIX))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default()
}

/// A JetStream error's server code, status and text, if `e` carries one: as a
/// `jetstream::Error` in its chain, or in its text (`… (code 400, error code 10058)`,
/// as async-nats writes the errors it keeps in its kinds), or as one of the kinds
/// async-nats reports without the server's error.
fn server_error(e: &(dyn std::error::Error + 'static)) -> Option<(u64, usize, String)> {
    let mut current = Some(e);
    while let Some(error) = current {
        if let Some(js) = error.downcast_ref::<jetstream::Error>() {
            return Some((js.error_code().0, js.code(), js.to_string()));
        }
        current = error.source();
    }
    let text = e.to_string();
    if let Some(at) = text.rfind("error code ") {
        let digits: String = text[at + 11..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let status = text
            .rfind("(code ")
            .and_then(|s| {
                text[s + 6..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        if let Ok(code) = digits.parse() {
            return Some((code, status, text));
        }
    }
    let known = [
        ("consumer not found", 10014, 404),
        ("no message found", 10037, 404),
        ("stream not found", 10059, 404),
    ];
    known
        .iter()
        .find(|(words, ..)| text.contains(words))
        .map(|&(_, code, status)| (code, status, text.clone()))
}

/// An async-nats error as a store error of the right kind; `context` says what was
/// being done (and names the stream or consumer).
fn reported(e: &(dyn std::error::Error + 'static), context: &str) -> BusError {
    let (kind, text) = match server_error(e) {
        Some((code, status, text)) => {
            let kind = match code {
                10059 => ErrorKind::StreamNotFound,
                10058 => ErrorKind::StreamExists,
                10065 => ErrorKind::SubjectOverlap,
                10070 | 10071 => ErrorKind::WrongLast,
                10037 => ErrorKind::NoMessage,
                10014 => ErrorKind::ConsumerNotFound,
                10148 | 10013 => ErrorKind::ConsumerExists,
                10077 | 10054 | 10027 | 10028 => ErrorKind::LimitReached,
                _ if status == 404 => ErrorKind::StreamNotFound,
                _ if status == 400 => ErrorKind::InvalidConfig,
                _ => ErrorKind::Other,
            };
            (kind, text)
        }
        None => (ErrorKind::Other, e.to_string()),
    };
    BusError::Stream(StoreError::Reported {
        kind,
        message: format!("{context}: {text}"),
    })
}

/// [`reported`], except that a missing consumer is [`StoreError::ConsumerNotFound`]
/// naming the stream and the consumer, as on the other backends.
fn consumer_error(
    e: &(dyn std::error::Error + 'static),
    stream: &str,
    name: &str,
    context: &str,
) -> BusError {
    if server_error(e).is_some_and(|(code, ..)| code == 10014) {
        return BusError::Stream(StoreError::ConsumerNotFound {
            stream: stream.to_owned(),
            consumer: name.to_owned(),
        });
    }
    reported(e, context)
}

fn unsupported(feature: &'static str, reason: &'static str) -> BusError {
    BusError::Unsupported {
        feature,
        backend: "NATS",
        reason,
    }
}

fn limit(value: Option<u64>) -> i64 {
    value.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn unlimit(value: i64) -> Option<u64> {
    u64::try_from(value).ok().filter(|&v| v > 0)
}

fn parse_version(version: &str) -> (u32, u32, u32) {
    let mut parts = version
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

impl Js {
    pub(crate) fn new(client: async_nats::Client, replicas: usize) -> Js {
        let version = parse_version(&client.server_info().version);
        Js {
            js: jetstream::new(client.clone()),
            client,
            version,
            replicas,
        }
    }

    fn at_least(&self, version: (u32, u32, u32)) -> bool {
        self.version >= version
    }

    fn to_js(&self, config: &StreamConfig) -> stream::Config {
        stream::Config {
            name: config.name.clone(),
            subjects: config.subjects.clone(),
            max_messages: limit(config.max_msgs),
            max_bytes: limit(config.max_bytes),
            max_messages_per_subject: limit(config.max_msgs_per_subject),
            max_age: config.max_age.unwrap_or(Duration::ZERO),
            max_message_size: i32::try_from(config.max_msg_size).unwrap_or(i32::MAX),
            discard: match config.discard {
                Discard::Old => stream::DiscardPolicy::Old,
                Discard::New => stream::DiscardPolicy::New,
            },
            retention: match config.retention {
                Retention::Limits => stream::RetentionPolicy::Limits,
                Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
                Retention::Interest => stream::RetentionPolicy::Interest,
            },
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: config.duplicate_window,
            description: describe(&StreamExtra {
                fsync: config.fsync,
                segment_size: config.segment_size,
            }),
            ..stream::Config::default()
        }
    }

    fn from_js(info: &stream::Info) -> StreamInfo {
        let c = &info.config;
        let extra: StreamExtra = extra(&c.description);
        let mut config = StreamConfig::new(c.name.clone(), c.subjects.clone());
        config.max_msgs = unlimit(c.max_messages);
        config.max_bytes = unlimit(c.max_bytes);
        config.max_msgs_per_subject = unlimit(c.max_messages_per_subject);
        config.max_age = (!c.max_age.is_zero()).then_some(c.max_age);
        if let Ok(size) = u32::try_from(c.max_message_size)
            && size > 0
        {
            config.max_msg_size = size;
        }
        config.discard = match c.discard {
            stream::DiscardPolicy::New => Discard::New,
            _ => Discard::Old,
        };
        config.retention = match c.retention {
            stream::RetentionPolicy::WorkQueue => Retention::WorkQueue,
            stream::RetentionPolicy::Interest => Retention::Interest,
            _ => Retention::Limits,
        };
        config.duplicate_window = c.duplicate_window;
        config.fsync = extra.fsync;
        if extra.segment_size > 0 {
            config.segment_size = extra.segment_size;
        }
        let s = &info.state;
        let mut state = StreamState::default();
        state.msgs = s.messages;
        state.bytes = s.bytes;
        state.first_seq = s.first_sequence;
        state.last_seq = s.last_sequence;
        state.subjects = s.subjects_count;
        state.deleted = s.deleted_count.unwrap_or(0);
        state.last_time = if s.last_sequence == 0 {
            0
        } else {
            i64::try_from(s.last_timestamp.unix_timestamp_nanos()).unwrap_or(0)
        };
        StreamInfo::new(config, state)
    }

    /// Creates a stream. JetStream fsyncs as the server is set up, not per stream: a
    /// stream asking for `Fsync::Always` gets a warning in the log, saying so. On a
    /// server older than 2.10, which cannot fsync each write at all, the warning says
    /// that; from 2.10 on it says how to set `sync_interval: always`, which courier
    /// cannot see from a client connection.
    pub(crate) async fn create(&self, config: StreamConfig) -> Result<StreamInfo, BusError> {
        config.validate().map_err(StoreError::InvalidConfig)?;
        self.warn_fsync(&config);
        let context = format!("creating stream `{}`", config.name);
        let mut created = self
            .js
            .create_stream(self.to_js(&config))
            .await
            .map_err(|e| reported(&e, &context))?;
        let info = created.info().await.map_err(|e| reported(&e, &context))?;
        Ok(Js::from_js(info))
    }

    fn warn_fsync(&self, config: &StreamConfig) {
        if config.fsync != Fsync::Always {
            return;
        }
        let (major, minor, patch) = self.version;
        if self.at_least((2, 10, 0)) {
            tracing::warn!(
                stream = %config.name,
                "fsync = always: on NATS, JetStream syncs as the server is configured, not per \
                 stream; acknowledged means fsynced only if nats-server {major}.{minor}.{patch} \
                 runs with `jetstream {{ sync_interval: always }}` (its default syncs every 2 minutes)"
            );
        } else {
            tracing::warn!(
                stream = %config.name,
                "fsync = always cannot hold on nats-server {major}.{minor}.{patch}: servers before \
                 2.10 sync every 2 minutes and have no per-write fsync; acknowledged messages \
                 survive a process crash, not a power loss"
            );
        }
    }

    pub(crate) async fn update(&self, config: StreamConfig) -> Result<StreamInfo, BusError> {
        config.validate().map_err(StoreError::InvalidConfig)?;
        let context = format!("updating stream `{}`", config.name);
        let info = self
            .js
            .update_stream(self.to_js(&config))
            .await
            .map_err(|e| reported(&e, &context))?;
        Ok(Js::from_js(&info))
    }

    async fn stream(&self, name: &str) -> Result<jetstream::stream::Stream, BusError> {
        self.js
            .get_stream(name)
            .await
            .map_err(|e| reported(&e, &format!("stream `{name}`")))
    }

    pub(crate) async fn info(&self, name: &str) -> Result<StreamInfo, BusError> {
        let mut stream = self.stream(name).await?;
        let info = stream
            .info()
            .await
            .map_err(|e| reported(&e, &format!("stream `{name}`")))?;
        Ok(Js::from_js(info))
    }

    pub(crate) async fn list(&self) -> Result<Vec<StreamInfo>, BusError> {
        let mut streams = self.js.streams();
        let mut out = Vec::new();
        while let Some(info) = streams
            .try_next()
            .await
            .map_err(|e| reported(&e, "listing streams"))?
        {
            out.push(Js::from_js(&info));
        }
        out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        Ok(out)
    }

    pub(crate) async fn delete(&self, name: &str) -> Result<(), BusError> {
        self.js
            .delete_stream(name)
            .await
            .map_err(|e| reported(&e, &format!("deleting stream `{name}`")))?;
        Ok(())
    }

    pub(crate) async fn purge(&self, name: &str, filter: Option<&str>) -> Result<u64, BusError> {
        let stream = self.stream(name).await?;
        let context = format!("purging stream `{name}`");
        let purged = match filter {
            Some(filter) => stream.purge().filter(filter).await,
            None => stream.purge().await,
        }
        .map_err(|e| reported(&e, &context))?;
        Ok(purged.purged)
    }

    /// A durable publish: the options as JetStream headers; `delay` and `deliver_at`
    /// as `Courier-Deliver-At`, which courier's consumers honour.
    pub(crate) async fn publish(
        &self,
        message: Message,
        options: &Publish,
    ) -> Result<PubAckFuture, BusError> {
        let mut headers = crate::nats::to_nats(&message.headers)?;
        let deliver_at = options.deliver_at.or_else(|| {
            options.delay.map(|d| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                i64::try_from((now + d).as_nanos()).unwrap_or(i64::MAX)
            })
        });
        if let Some(at) = deliver_at {
            headers.insert(mq_store::DELIVER_AT_HEADER, at.to_string().as_str());
        }
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(message.payload)
            .headers(headers);
        if let Some(id) = &options.msg_id {
            publish = publish.message_id(id);
        }
        if let Some(seq) = options.expected_last_seq {
            publish = publish.expected_last_sequence(seq);
        }
        if let Some(seq) = options.expected_last_subject_seq {
            publish = publish.expected_last_subject_sequence(seq);
        }
        if let Some(id) = &options.expected_last_msg_id {
            publish = publish.expected_last_message_id(id);
        }
        let subject = message.subject.to_string();
        let expectation = expectation(options);
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| publish_error(&e, &subject, &expectation))?;
        let js = self.js.clone();
        Ok(PubAckFuture::boxed(async move {
            let ack = match ack.await {
                Ok(ack) => ack,
                Err(e) => {
                    let error = publish_error(&e, &subject, &expectation);
                    // name the stream, as the other backends do
                    return Err(match error {
                        BusError::Stream(StoreError::Reported {
                            kind: ErrorKind::WrongLast,
                            message,
                        }) => {
                            let stream = js
                                .stream_by_subject(subject.clone())
                                .await
                                .unwrap_or_default();
                            BusError::Stream(StoreError::Reported {
                                kind: ErrorKind::WrongLast,
                                message: format!("stream `{stream}`: {message}"),
                            })
                        }
                        other => other,
                    });
                }
            };
            Ok(PubAck {
                stream: ack.stream,
                seq: ack.sequence,
                duplicate: ack.duplicate,
            })
        }))
    }

    pub(crate) async fn get(&self, name: &str, seq: u64) -> Result<StoredMessage, BusError> {
        let stream = self.stream(name).await?;
        let mut attempt = 1;
        loop {
            match stream.get_raw_message(seq).await {
                Ok(message) => return Ok(stored(message)),
                // a read is safe to ask again: a replicated stream electing its leader
                // (just restarted, or a node gone) times requests out meanwhile
                Err(e) if attempt < READ_ATTEMPTS && e.to_string().contains("timed out") => {
                    tracing::debug!(stream = name, seq, attempt, "get timed out; asking again");
                    attempt += 1;
                }
                Err(e) => {
                    return Err(reported(
                        &e,
                        &format!("stream `{name}` has no message {seq}"),
                    ));
                }
            }
        }
    }

    pub(crate) async fn last(&self, name: &str, subject: &str) -> Result<StoredMessage, BusError> {
        let stream = self.stream(name).await?;
        let message = stream
            .get_last_raw_message_by_subject(subject)
            .await
            .map_err(|e| {
                reported(
                    &e,
                    &format!("stream `{name}` has no message on `{subject}`"),
                )
            })?;
        Ok(stored(message))
    }

    /// Up to `max_msgs` messages from `from` on: one get per sequence, skipping the
    /// removed ones, up to the stream's last sequence.
    pub(crate) async fn range(
        &self,
        name: &str,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, BusError> {
        let mut stream = self.stream(name).await?;
        let last = stream
            .info()
            .await
            .map_err(|e| reported(&e, &format!("stream `{name}`")))?
            .state
            .last_sequence;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut seq = from.max(1);
        while seq <= last && out.len() < max_msgs {
            match stream.get_raw_message(seq).await {
                Ok(message) => {
                    let m = stored(message);
                    bytes += m.payload.len();
                    if !out.is_empty() && bytes > max_bytes {
                        break;
                    }
                    out.push(m);
                }
                Err(e) if server_error(&e).is_some_and(|(code, ..)| code == 10037) => {}
                Err(e) => return Err(reported(&e, &format!("reading stream `{name}`"))),
            }
            seq += 1;
        }
        if out.is_empty() && max_msgs > 0 {
            return Err(BusError::Stream(StoreError::NoMessage {
                stream: name.to_owned(),
                seq: from,
            }));
        }
        Ok(out)
    }

    fn to_js_consumer(&self, config: &ConsumerConfig) -> Result<consumer::pull::Config, BusError> {
        if config.key.is_some() {
            return Err(unsupported(
                "per-key order (ConsumerConfig::key)",
                "JetStream has no per-key in-flight limit, and a group of clients cannot keep \
                 one among themselves; use the embedded bus or the courier broker, or one consumer \
                 per key subject with max_ack_pending 1",
            ));
        }
        if config.filter_subjects.len() > 1 && !self.at_least((2, 10, 0)) {
            return Err(unsupported(
                "several filter subjects",
                "nats-server before 2.10 takes one filter subject per consumer (and would \
                 silently ignore the list)",
            ));
        }
        let (filter_subject, filter_subjects) = match config.filter_subjects.as_slice() {
            [] => (String::new(), Vec::new()),
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        let start_time = |ns: i64| async_nats::jetstream::consumer::DeliverPolicy::ByStartTime {
            start_time: time_from_nanos(ns),
        };
        Ok(consumer::pull::Config {
            durable_name: config.durable.then(|| config.name.clone()),
            name: (!config.name.is_empty()).then(|| config.name.clone()),
            description: describe(&ConsumerExtra {
                max_deliver: config.max_deliver,
                dead_letter: config.dead_letter.clone(),
                durable: config.durable,
            }),
            filter_subject,
            filter_subjects,
            deliver_policy: match config.deliver_policy {
                DeliverPolicy::All => consumer::DeliverPolicy::All,
                DeliverPolicy::New => consumer::DeliverPolicy::New,
                DeliverPolicy::Last => consumer::DeliverPolicy::Last,
                DeliverPolicy::LastPerSubject => consumer::DeliverPolicy::LastPerSubject,
                DeliverPolicy::ByStartSequence(seq) => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                },
                DeliverPolicy::ByStartTime(ns) => start_time(ns),
            },
            ack_policy: match config.ack_policy {
                AckPolicy::Explicit => consumer::AckPolicy::Explicit,
                AckPolicy::All => consumer::AckPolicy::All,
                AckPolicy::None => consumer::AckPolicy::None,
            },
            ack_wait: config.ack_wait,
            // courier's max_deliver is kept by the client, which dead-letters
            max_deliver: -1,
            backoff: config.backoff.clone(),
            max_ack_pending: i64::from(config.max_ack_pending),
            inactive_threshold: if config.durable {
                Duration::ZERO
            } else {
                Duration::from_secs(300)
            },
            ..consumer::pull::Config::default()
        })
    }

    fn consumer_config(info: &consumer::Info) -> ConsumerConfig {
        let c = &info.config;
        let extra: ConsumerExtra = extra(&c.description);
        let mut config = ConsumerConfig::durable(info.name.clone());
        config.durable = c.durable_name.is_some();
        config.filter_subjects = if c.filter_subjects.is_empty() {
            if c.filter_subject.is_empty() {
                Vec::new()
            } else {
                vec![c.filter_subject.clone()]
            }
        } else {
            c.filter_subjects.clone()
        };
        config.deliver_policy = match c.deliver_policy {
            consumer::DeliverPolicy::New => DeliverPolicy::New,
            consumer::DeliverPolicy::Last => DeliverPolicy::Last,
            consumer::DeliverPolicy::LastPerSubject => DeliverPolicy::LastPerSubject,
            consumer::DeliverPolicy::ByStartSequence { start_sequence } => {
                DeliverPolicy::ByStartSequence(start_sequence)
            }
            consumer::DeliverPolicy::ByStartTime { start_time } => DeliverPolicy::ByStartTime(
                i64::try_from(start_time.unix_timestamp_nanos()).unwrap_or(0),
            ),
            _ => DeliverPolicy::All,
        };
        config.ack_policy = match c.ack_policy {
            consumer::AckPolicy::All => AckPolicy::All,
            consumer::AckPolicy::None => AckPolicy::None,
            _ => AckPolicy::Explicit,
        };
        config.ack_wait = c.ack_wait;
        config.max_deliver = extra.max_deliver;
        config.backoff = c.backoff.clone();
        config.max_ack_pending = u32::try_from(c.max_ack_pending).unwrap_or(u32::MAX);
        config.dead_letter = extra.dead_letter;
        config
    }

    fn consumer_info(info: &consumer::Info) -> ConsumerInfo {
        let mut out = ConsumerInfo::new(info.stream_name.clone(), Js::consumer_config(info));
        out.ack_floor = info.ack_floor.stream_sequence;
        out.next_seq = info.delivered.stream_sequence + 1;
        out.delivered = info.delivered.consumer_sequence;
        out.num_ack_pending = info.num_ack_pending as u64;
        out.num_pending = info.num_pending;
        out.num_redelivered = info.num_redelivered as u64;
        out
    }

    async fn js_consumer_info(&self, stream: &str, name: &str) -> Result<consumer::Info, BusError> {
        let s = self.stream(stream).await?;
        s.consumer_info(name).await.map_err(|e| {
            consumer_error(
                &e,
                stream,
                name,
                &format!("consumer `{name}` of stream `{stream}`"),
            )
        })
    }

    pub(crate) async fn create_consumer(
        &self,
        stream: &str,
        config: ConsumerConfig,
    ) -> Result<JsConsumer, BusError> {
        config.validate().map_err(StoreError::InvalidConsumer)?;
        let js_config = self.to_js_consumer(&config)?;
        let s = self.stream(stream).await?;
        if config.durable {
            // JetStream updates a consumer created again with other settings: courier
            // refuses, as its other backends do
            match self.js_consumer_info(stream, &config.name).await {
                Ok(existing) => {
                    if Js::consumer_config(&existing) != config {
                        return Err(BusError::Stream(StoreError::ConsumerExists {
                            stream: stream.to_owned(),
                            consumer: config.name.clone(),
                        }));
                    }
                }
                Err(BusError::Stream(StoreError::ConsumerNotFound { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        let context = format!("creating consumer `{}` of stream `{stream}`", config.name);
        let created: consumer::PullConsumer = s
            .create_consumer(js_config)
            .await
            .map_err(|e| reported(&e, &context))?;
        let info = created.cached_info().clone();
        Ok(JsConsumer::new(self.clone(), created, &info))
    }

    pub(crate) async fn consumer(&self, stream: &str, name: &str) -> Result<JsConsumer, BusError> {
        let info = self.js_consumer_info(stream, name).await?;
        let s = self.stream(stream).await?;
        let consumer: consumer::PullConsumer = s.get_consumer(name).await.map_err(|e| {
            reported(
                e.as_ref(),
                &format!("consumer `{name}` of stream `{stream}`"),
            )
        })?;
        Ok(JsConsumer::new(self.clone(), consumer, &info))
    }

    pub(crate) async fn consumers(&self, stream: &str) -> Result<Vec<ConsumerInfo>, BusError> {
        let s = self.stream(stream).await?;
        let mut list = s.consumers();
        let mut out = Vec::new();
        while let Some(info) = list
            .try_next()
            .await
            .map_err(|e| reported(&e, &format!("listing consumers of `{stream}`")))?
        {
            if info.config.durable_name.is_some() {
                out.push(Js::consumer_info(&info));
            }
        }
        out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        Ok(out)
    }

    pub(crate) async fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), BusError> {
        let s = self.stream(stream).await?;
        s.delete_consumer(name).await.map_err(|e| {
            let context = format!("deleting consumer `{name}` of stream `{stream}`");
            consumer_error(&e, stream, name, &context)
        })?;
        Ok(())
    }

    /// Publishes a dead letter of `message` (fetched by `consumer` of `stream`, after
    /// `deliveries` deliveries) for `reason`: to `$DLQ.<stream>.<consumer>`, stored by
    /// the stream that captures it (or the one `dead_letter` names), once.
    async fn dead_letter(
        &self,
        consumer: &JsConsumerShared,
        message: &StoredMessage,
        deliveries: u32,
        reason: &str,
    ) -> Result<(), BusError> {
        let subject = format!("$DLQ.{}.{}", consumer.stream, consumer.name);
        let mut letter = Message::new(subject.clone(), message.payload.clone());
        for (name, value) in &message.headers {
            if &**name != mq_store::MSG_ID_HEADER {
                letter.headers.append(name.to_string(), value.clone());
            }
        }
        let [
            stream_h,
            consumer_h,
            seq_h,
            subject_h,
            deliveries_h,
            reason_h,
        ] = mq_store::dead_letter_headers();
        letter.headers.insert(stream_h, consumer.stream.to_string());
        letter.headers.insert(consumer_h, consumer.name.to_string());
        letter.headers.insert(seq_h, message.seq.to_string());
        letter
            .headers
            .insert(subject_h, message.subject.to_string());
        letter.headers.insert(deliveries_h, deliveries.to_string());
        letter.headers.insert(reason_h, reason.to_owned());
        let once = Publish {
            msg_id: Some(format!(
                "dlq.{}.{}.{}",
                consumer.stream, consumer.name, message.seq
            )),
            ..Publish::default()
        };
        // (a JetStream publish to a subject no stream captures but someone subscribes
        // to would wait for an answer that never comes: ask first)
        let capturing = self.js.stream_by_subject(subject.clone()).await.ok();
        match (&consumer.dead_letter, capturing) {
            (DeadLetter::Stream(name), Some(found)) if *name != found => {
                Err(BusError::Stream(StoreError::Reported {
                    kind: ErrorKind::InvalidConsumer,
                    message: format!(
                        "dead letters of `{}` go to stream `{name}`, but `{subject}` is captured by `{found}`",
                        consumer.name
                    ),
                }))
            }
            (_, Some(_)) => {
                self.publish(letter, &once).await?.await?;
                Ok(())
            }
            (DeadLetter::Stream(name), None) => Err(BusError::Stream(StoreError::Reported {
                kind: ErrorKind::InvalidConsumer,
                message: format!(
                    "dead letters of `{}` go to stream `{name}`, which does not capture `{subject}`",
                    consumer.name
                ),
            })),
            (DeadLetter::Subject, None) => {
                let headers = crate::nats::to_nats(&letter.headers)?;
                self.client
                    .publish_with_headers(subject.clone(), headers, letter.payload)
                    .await
                    .map_err(|e| BusError::Backend {
                        operation: "publish a dead letter",
                        source: Box::new(e),
                    })?;
                // subscribers got it; no stream keeps it
                tracing::error!(
                    stream = %consumer.stream,
                    consumer = %consumer.name,
                    seq = message.seq,
                    reason,
                    "dead letter published to `{subject}`, which no stream stores: create a stream capturing it to keep dead letters"
                );
                Ok(())
            }
        }
    }
}

fn time_from_nanos(ns: i64) -> async_nats::datetime::DateTime {
    async_nats::datetime::from_nanos(i128::from(ns)).unwrap_or_else(|_| async_nats::datetime::now())
}

/// What a publish expected, for its error message.
fn expectation(options: &Publish) -> String {
    let mut parts = Vec::new();
    if let Some(seq) = options.expected_last_seq {
        parts.push(format!("expected last sequence {seq}"));
    }
    if let Some(seq) = options.expected_last_subject_seq {
        parts.push(format!("expected last sequence on the subject {seq}"));
    }
    if let Some(id) = &options.expected_last_msg_id {
        parts.push(format!("expected last message id `{id}`"));
    }
    parts.join(", ")
}

fn publish_error(
    e: &(dyn std::error::Error + 'static),
    subject: &str,
    expectation: &str,
) -> BusError {
    use async_nats::jetstream::context::PublishErrorKind;
    if let Some(publish) = e.downcast_ref::<async_nats::jetstream::context::PublishError>()
        && publish.kind() == PublishErrorKind::StreamNotFound
    {
        // NATS answers "no responders" both when no stream captures the subject and
        // when the stream that does has no leader (a cluster electing one)
        return BusError::Stream(StoreError::Reported {
            kind: ErrorKind::NoStreamForSubject,
            message: format!(
                "no stream captures subject `{subject}`, or the stream that does has no leader \
                 right now (NATS answers both with no responders)"
            ),
        });
    }
    let context = if expectation.is_empty() {
        format!("publish to `{subject}`")
    } else {
        format!("publish to `{subject}` ({expectation})")
    };
    reported(e, &context)
}

/// A message read back from JetStream, with `Nats-Msg-Id` as courier's `Msg-Id`.
fn stored(message: jetstream::message::StreamMessage) -> StoredMessage {
    StoredMessage {
        seq: message.sequence,
        time: i64::try_from(message.time.unix_timestamp_nanos()).unwrap_or(0),
        subject: Arc::from(message.subject.as_str()),
        headers: stored_headers(Some(&message.headers)),
        payload: message.payload,
    }
}

/// NATS headers as a stored message's, with `Nats-Msg-Id` as courier's `Msg-Id`.
fn stored_headers(headers: Option<&async_nats::HeaderMap>) -> Vec<(Arc<str>, bytes::Bytes)> {
    let mut out = Vec::new();
    for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
        let name: Arc<str> = match name.as_ref() {
            "Nats-Msg-Id" => Arc::from(mq_store::MSG_ID_HEADER),
            n => Arc::from(n),
        };
        for value in values {
            out.push((name.clone(), bytes::Bytes::from(value.to_string())));
        }
    }
    out
}

/// A pull consumer on JetStream.
#[derive(Debug)]
pub(crate) struct JsConsumer {
    shared: Arc<JsConsumerShared>,
    consumer: consumer::PullConsumer,
    pub(crate) config: ConsumerConfig,
}

#[derive(Debug)]
pub(crate) struct JsConsumerShared {
    js: Js,
    stream: Arc<str>,
    name: Arc<str>,
    max_deliver: Option<u32>,
    dead_letter: DeadLetter,
    ack_none: bool,
}

impl JsConsumer {
    fn new(js: Js, consumer: consumer::PullConsumer, info: &consumer::Info) -> JsConsumer {
        let config = Js::consumer_config(info);
        JsConsumer {
            shared: Arc::new(JsConsumerShared {
                js,
                stream: Arc::from(info.stream_name.as_str()),
                name: Arc::from(info.name.as_str()),
                max_deliver: config.max_deliver,
                dead_letter: config.dead_letter.clone(),
                ack_none: config.ack_policy == AckPolicy::None,
            }),
            consumer,
            config,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.shared.name
    }

    pub(crate) async fn info(&self) -> Result<ConsumerInfo, BusError> {
        let info = self
            .shared
            .js
            .js_consumer_info(&self.shared.stream, &self.shared.name)
            .await?;
        Ok(Js::consumer_info(&info))
    }

    /// Up to `batch` messages, as soon as one is there or once `max_wait` passed.
    /// Messages before their delivery time are given back (nak with that delay), and
    /// messages past `max_deliver` are dead-lettered: neither is returned.
    ///
    /// The wait is pulled in slices of at most [`PULL_SLICE`]. A pull that ends
    /// without the consumer's leader (none elected yet, or the leader changed while it
    /// held the pull) is pulled again. One the server never ends (its holder gone
    /// without a word) ends by async-nats's own timer, 5 s past its expiry: the slices
    /// keep that to one slice and 5 s, not the whole wait and 5 s.
    pub(crate) async fn fetch(
        &self,
        batch: usize,
        max_wait: Duration,
    ) -> Result<Vec<Delivery>, BusError> {
        let deadline = tokio::time::Instant::now() + max_wait.min(mq_store::MAX_WAIT);
        let context = || format!("fetching from consumer `{}`", self.shared.name);
        loop {
            let wait = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(1))
                .min(PULL_SLICE);
            let mut messages = self
                .consumer
                .fetch()
                .max_messages(batch.max(1))
                .expires(wait)
                .messages()
                .await
                .map_err(|e| reported(&e, &context()))?;
            let mut out = Vec::new();
            let mut leaderless = None;
            loop {
                match messages.try_next().await {
                    Ok(Some(message)) => {
                        if let Some(delivery) = self.admit(message).await? {
                            out.push(delivery);
                        }
                    }
                    Ok(None) => break,
                    // the messages that came are the application's: they are returned,
                    // and the next fetch meets the error again if it lasts
                    Err(e) if !out.is_empty() => {
                        tracing::debug!(consumer = %self.shared.name, error = %e, "fetch: a pull ended in an error after messages");
                        break;
                    }
                    // The consumer has no leader yet, or its leader changed: pulled
                    // again until the fetch's own deadline.
                    Err(e) => match leaderless_pull(e.as_ref()) {
                        Some(why) if tokio::time::Instant::now() < deadline => {
                            leaderless = Some(why);
                            break;
                        }
                        _ => return Err(reported(e.as_ref(), &context())),
                    },
                }
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            if let Some(why) = leaderless {
                tracing::debug!(consumer = %self.shared.name, "fetch: {why}, pulling again");
                let pause = Duration::from_millis(100)
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// A fetched message as a delivery, or `None` if it was given back or dead-lettered.
    async fn admit(&self, message: jetstream::Message) -> Result<Option<Delivery>, BusError> {
        let shared = &self.shared;
        let (seq, consumer_seq, deliveries, pending, time) = {
            let info = message
                .info()
                .map_err(|e| reported(e.as_ref(), "a fetched message without its ack subject"))?;
            (
                info.stream_sequence,
                info.consumer_sequence,
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
                info.pending,
                i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
            )
        };
        let reply = message
            .reply
            .clone()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let stored_message = StoredMessage {
            seq,
            time,
            subject: Arc::from(message.subject.as_str()),
            headers: stored_headers(message.headers.as_ref()),
            payload: message.payload.clone(),
        };
        let answer = JsAnswer {
            shared: shared.clone(),
            reply,
        };
        if !shared.ack_none {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
            let due = stored_message
                .header(mq_store::DELIVER_AT_HEADER)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
                .filter(|&at| at > now);
            if let Some(at) = due {
                let wait = Duration::from_nanos(u64::try_from(at - now).unwrap_or(0));
                answer.send(Answer::Nak(Some(wait)), false).await?;
                return Ok(None);
            }
            // a delayed message fetched early was given back once (above): that
            // delivery is not the application's
            let held = u32::from(stored_message.header(mq_store::DELIVER_AT_HEADER).is_some());
            if shared
                .max_deliver
                .is_some_and(|m| deliveries > m.saturating_add(held))
            {
                shared
                    .js
                    .dead_letter(shared, &stored_message, deliveries - 1, "max_deliver")
                    .await?;
                answer.terminate("max_deliver").await?;
                return Ok(None);
            }
        }
        let info = DeliveryInfo::new(
            shared.stream.clone(),
            shared.name.clone(),
            seq,
            consumer_seq,
            deliveries,
            pending,
        );
        Ok(Some(Delivery::nats(stored_message, info, answer)))
    }
}

/// Where a message fetched from JetStream is answered.
#[derive(Debug)]
pub(crate) struct JsAnswer {
    shared: Arc<JsConsumerShared>,
    reply: String,
}

impl JsAnswer {
    /// Sends `answer`; with `confirm` (or for a term), waits for the server to have it.
    pub(crate) async fn send(&self, answer: Answer, confirm: bool) -> Result<(), BusError> {
        let payload = match &answer {
            Answer::Ack => bytes::Bytes::from_static(b"+ACK"),
            Answer::Nak(None) => bytes::Bytes::from_static(b"-NAK"),
            Answer::Nak(Some(delay)) => {
                bytes::Bytes::from(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
            }
            Answer::InProgress => bytes::Bytes::from_static(b"+WPI"),
            Answer::Term(_) => unreachable!("terms go through JsAnswer::term"),
        };
        let client = &self.shared.js.client;
        if confirm {
            return self.confirmed(payload, "confirm an acknowledgement").await;
        }
        client
            .publish(self.reply.clone(), payload)
            .await
            .map_err(|e| BusError::Backend {
                operation: "answer a message",
                source: Box::new(e),
            })
    }

    /// Tells the server to stop delivering the message (with the reason from 2.10.4 on).
    /// Returns once the server has processed it (it answers a term sent with a reply
    /// subject), so that the consumer's state says so when this returns.
    async fn terminate(&self, reason: &str) -> Result<(), BusError> {
        let payload = if self.shared.js.at_least((2, 10, 4)) && !reason.is_empty() {
            bytes::Bytes::from(format!("+TERM {reason}"))
        } else {
            bytes::Bytes::from_static(b"+TERM")
        };
        self.confirmed(payload, "terminate a message").await
    }

    /// Publishes `payload` to the message's ack subject with a reply subject, and waits
    /// for the server's answer (sent once it has processed it).
    async fn confirmed(
        &self,
        payload: bytes::Bytes,
        operation: &'static str,
    ) -> Result<(), BusError> {
        let timeout = Duration::from_secs(5);
        let request = self.shared.js.client.request(self.reply.clone(), payload);
        tokio::time::timeout(timeout, request)
            .await
            .map_err(|_| BusError::Timeout {
                subject: self.reply.clone(),
                timeout,
            })?
            .map_err(|e| BusError::Backend {
                operation,
                source: Box::new(e),
            })?;
        Ok(())
    }

    /// A term from the application, or a nak on the last delivery: the message goes to
    /// the dead letters, then is terminated on the server.
    pub(crate) async fn dead_letter(
        &self,
        message: &StoredMessage,
        deliveries: u32,
        reason: &str,
    ) -> Result<(), BusError> {
        self.shared
            .js
            .dead_letter(&self.shared, message, deliveries, reason)
            .await?;
        self.terminate(reason).await
    }

    /// Whether a nak of a message delivered `deliveries` times is its last.
    pub(crate) fn nak_is_last(&self, deliveries: u32) -> bool {
        self.shared.max_deliver.is_some_and(|m| deliveries >= m)
    }
}

/// How many times a read (a get) that timed out is asked in all.
const READ_ATTEMPTS: u32 = 3;

/// The longest one pull of a fetch waits on the server (see [`JsConsumer::fetch`]).
const PULL_SLICE: Duration = Duration::from_secs(2);

/// Why a pull ended without its consumer's leader, if it did: status 503 ("no
/// responders": a replicated consumer just made, or one whose leader's node went away,
/// has none yet) or 409 "Leadership Change" (the leader holding the pull stepped down,
/// or its node went away: nats-server 2.9.10 and 2.15.1 send it for both).
/// async-nats reports both only as text (`error while processing messages from the
/// stream: 409, Some("Leadership Change")`).
fn leaderless_pull(error: &(dyn std::error::Error + Send + Sync)) -> Option<&'static str> {
    let text = error.to_string();
    if text.contains(&format!(": {}, ", async_nats::StatusCode::NO_RESPONDERS)) {
        return Some("no consumer leader yet");
    }
    let terminated = format!(": {}, ", async_nats::StatusCode::REQUEST_TERMINATED);
    (text.contains(&terminated) && text.contains("Leadership Change"))
        .then_some("the consumer's leader changed")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pull_ended_without_a_consumer_leader_is_told_apart_from_other_statuses() {
        let error = |status: &str, description: &str| {
            std::io::Error::other(format!(
                "error while processing messages from the stream: {status}, {description}"
            ))
        };
        let leaderless = |e: std::io::Error| super::leaderless_pull(&e);
        assert_eq!(
            leaderless(error("503", "None")),
            Some("no consumer leader yet")
        );
        assert_eq!(
            leaderless(error("409", "Some(\"Leadership Change\")")),
            Some("the consumer's leader changed")
        );
        assert_eq!(leaderless(error("409", "Some(\"Consumer Deleted\")")), None);
        assert_eq!(leaderless(error("409", "None")), None);
        assert_eq!(leaderless(std::io::Error::other("timed out")), None);
    }
}
