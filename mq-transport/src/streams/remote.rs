//! Streams served by a courier broker, over the stream API ([`super::wire`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mq_store::{
    Answer, ConsumerConfig, ConsumerInfo, DeliveryInfo, ErrorKind, PubAck, Publish, StoreError,
    StoredMessage, StreamConfig, StreamInfo,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::wire::{
    self, ACKS_PREFIX, API_PREFIX, AckSubject, END_OF_BATCH, MAX_ACKS, MAX_BATCH, PACKED_HEADER,
    Place,
};
use super::{Delivery, PubAckFuture};
use crate::bus::Bus;
use crate::error::BusError;
use crate::message::{Message, NO_RESPONDERS};

/// The longest a remote fetch waits in one request; longer waits are several.
const MAX_REMOTE_WAIT: Duration = Duration::from_secs(30);

/// How many times a durable publish is sent before its acknowledgement is given up
/// on: once, and again after each lost connection or timeout.
const PUBLISH_ATTEMPTS: u32 = 10;

/// The acknowledgement of a durable publish to a broker: its answer, awaited for the
/// bus's request timeout, and the publish sent again (same message id) after a lost
/// connection or a timeout, up to [`PUBLISH_ATTEMPTS`] sends in all.
///
/// A plain struct, not an `async` block: it is built for every publish, and a boxed
/// `async` block holding the resend's future too was a large allocation and copy each.
pub(crate) struct RemoteAck {
    bus: Bus,
    /// Kept to be sent again.
    message: Message,
    waiting: crate::delivery::Waiting,
    timeout: Duration,
    /// The current attempt's timer, started when the answer is first waited for.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    attempt: u32,
    /// A send again under way.
    resend: Option<super::BoxFuture<Result<crate::delivery::Waiting, BusError>>>,
}

impl Future for RemoteAck {
    type Output = Result<PubAck, BusError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            if let Some(resend) = &mut this.resend {
                this.waiting = std::task::ready!(resend.as_mut().poll(cx))?;
                this.resend = None;
                this.deadline = None;
            }
            let subject = &this.message.subject;
            let failure = match Pin::new(&mut this.waiting.rx).poll(cx) {
                Poll::Ready(Ok(reply)) => {
                    return Poll::Ready(check(subject, &reply).and_then(|()| {
                        parse_pub_ack(&reply.payload).map_err(|e| malformed(subject, e))
                    }));
                }
                Poll::Ready(Err(_)) => BusError::ConnectionLost {
                    subject: subject.to_string(),
                    reason: this.bus.disconnect_reason(),
                },
                Poll::Pending => {
                    let timeout = this.timeout;
                    let deadline = this
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    std::task::ready!(deadline.as_mut().poll(cx));
                    BusError::Timeout {
                        subject: subject.to_string(),
                        timeout,
                    }
                }
            };
            if this.attempt >= PUBLISH_ATTEMPTS {
                return Poll::Ready(Err(failure));
            }
            // sent again with the same id: the stream stores it once
            tracing::debug!(%subject, attempt = this.attempt, "durable publish sent again: {failure}");
            this.attempt += 1;
            let bus = this.bus.clone();
            let message = this.message.clone();
            this.resend = Some(Box::pin(async move {
                bus.send_request(message, None)
                    .await
                    .map(|(_, waiting)| waiting)
            }));
        }
    }
}

/// A publish acknowledgement as the broker writes it
/// (`{"stream":"…","seq":…,"duplicate":…}`), read without the general JSON parser;
/// any other form, still valid JSON, goes through it.
fn parse_pub_ack(payload: &[u8]) -> Result<PubAck, serde_json::Error> {
    let fast = (|| {
        let rest = payload.strip_prefix(br#"{"stream":""#)?;
        let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
        if rest[end] != b'"' || rest[..end].iter().any(|&b| b < 0x20) {
            return None; // an escape or a control character: the general parser
        }
        let stream = std::str::from_utf8(&rest[..end]).ok()?;
        let rest = rest[end..].strip_prefix(br#"","seq":"#)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || (digits > 1 && rest[0] == b'0') {
            return None;
        }
        let seq: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        let duplicate = match &rest[digits..] {
            br#","duplicate":false}"# => false,
            br#","duplicate":true}"# => true,
            _ => return None,
        };
        Some(PubAck {
            stream: stream.to_owned(),
            seq,
            duplicate,
        })
    })();
    match fast {
        Some(ack) => Ok(ack),
        None => serde_json::from_slice(payload),
    }
}

/// The streams of the broker a [`Bus`] is connected to.
#[derive(Clone, Debug)]
pub(crate) struct Remote {
    bus: Bus,
    /// Message ids given to durable publishes that have none: this handle's prefix and
    /// a counter.
    ids: Arc<(String, std::sync::atomic::AtomicU64)>,
}

fn malformed(subject: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Stream(StoreError::Reported {
        kind: ErrorKind::Other,
        message: format!("malformed answer from the broker to `{subject}`: {e}"),
    })
}

/// The error an answer carries, if any.
fn check(subject: &str, reply: &Message) -> Result<(), BusError> {
    if let Some(e) = wire::reply_error(&reply.headers, &reply.payload) {
        return Err(BusError::Stream(e));
    }
    if reply.status() == Some(NO_RESPONDERS) {
        return Err(BusError::NoResponders {
            subject: subject.to_owned(),
        });
    }
    Ok(())
}

impl Remote {
    pub(crate) fn new(bus: Bus) -> Remote {
        // the inbox's random part: unique per handle, and a valid header value
        let prefix = crate::delivery::new_inbox().replacen("_INBOX.", "courier-", 1) + ".";
        Remote {
            bus,
            ids: Arc::new((prefix, std::sync::atomic::AtomicU64::new(1))),
        }
    }

    fn timeout(&self) -> Duration {
        self.bus.request_timeout()
    }

    /// One request of the stream API and its answer (checked for an error).
    async fn call(&self, op: &str, body: Vec<u8>) -> Result<Message, BusError> {
        let subject = format!("{API_PREFIX}{op}");
        let reply = self
            .bus
            .request_message(Message::new(subject.clone(), body), self.timeout())
            .await?;
        check(&subject, &reply)?;
        Ok(reply)
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        op: &str,
        body: &impl Serialize,
    ) -> Result<T, BusError> {
        let body = serde_json::to_vec(body).expect("API requests serialize");
        let reply = self.call(op, body).await?;
        serde_json::from_slice(&reply.payload).map_err(|e| malformed(op, e))
    }

    /// A request answered by a batch of messages and an end of batch. Waits up to
    /// `wait` plus the request timeout; a batch cut short by a lost connection returns
    /// what arrived.
    async fn batch(
        &self,
        op: &str,
        body: &impl Serialize,
        wait: Duration,
    ) -> Result<Vec<Message>, BusError> {
        let subject = format!("{API_PREFIX}{op}");
        let inbox = self.bus.new_inbox();
        // the broker reads a connection's frames in order: this subscription is in
        // place before it reads the request
        let mut sub = self.bus.subscribe_unconfirmed(inbox.clone()).await?;
        let body = serde_json::to_vec(body).expect("API requests serialize");
        self.bus
            .publish_message(Message::new(subject.clone(), body).with_reply(inbox))
            .await?;
        let limit = (wait + self.timeout()).min(mq_store::MAX_WAIT);
        let deadline = tokio::time::Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(m)) if m.status() == Some(END_OF_BATCH) => return Ok(out),
                Ok(Some(m)) if m.status().is_some() => {
                    check(&subject, &m)?;
                    return Err(malformed(&subject, format!("status {:?}", m.status())));
                }
                Ok(Some(m)) => out.push(m),
                Ok(None) | Err(_) if !out.is_empty() => return Ok(out),
                Ok(None) => {
                    return Err(BusError::ConnectionLost {
                        subject,
                        reason: self.bus.disconnect_reason(),
                    });
                }
                Err(_) => {
                    return Err(BusError::Timeout {
                        subject,
                        timeout: limit,
                    });
                }
            }
        }
    }

    pub(crate) async fn create(&self, config: StreamConfig) -> Result<StreamInfo, BusError> {
        self.call_json("STREAM.CREATE", &config).await
    }

    pub(crate) async fn update(&self, config: StreamConfig) -> Result<StreamInfo, BusError> {
        self.call_json("STREAM.UPDATE", &config).await
    }

    pub(crate) async fn info(&self, stream: &str) -> Result<StreamInfo, BusError> {
        self.call_json(&format!("STREAM.INFO.{}", token(stream)?), &())
            .await
    }

    pub(crate) async fn list(&self) -> Result<Vec<StreamInfo>, BusError> {
        self.call_json("STREAM.LIST", &()).await
    }

    pub(crate) async fn delete(&self, stream: &str) -> Result<(), BusError> {
        let _: bool = self
            .call_json(&format!("STREAM.DELETE.{}", token(stream)?), &())
            .await?;
        Ok(())
    }

    pub(crate) async fn purge(&self, stream: &str, filter: Option<&str>) -> Result<u64, BusError> {
        let request = wire::PurgeRequest {
            filter: filter.map(str::to_owned),
        };
        self.call_json(&format!("STREAM.PURGE.{}", token(stream)?), &request)
            .await
    }

    pub(crate) async fn get(
        &self,
        stream: &str,
        request: wire::GetRequest,
    ) -> Result<StoredMessage, BusError> {
        let op = format!("STREAM.GET.{}", token(stream)?);
        let body = serde_json::to_vec(&request).expect("API requests serialize");
        let reply = self.call(&op, body).await?;
        wire::stored_message(&reply.headers, reply.payload).map_err(|e| malformed(&op, e))
    }

    pub(crate) async fn range(
        &self,
        stream: &str,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, BusError> {
        let op = format!("STREAM.RANGE.{}", token(stream)?);
        let request = wire::RangeRequest {
            from,
            max_msgs: max_msgs.min(MAX_BATCH),
            max_bytes,
            packed: true,
        };
        let messages = self.batch(&op, &request, Duration::ZERO).await?;
        let mut out = Vec::with_capacity(request.max_msgs);
        for (message, _) in unpacked(&op, messages, false)? {
            out.push(message);
        }
        Ok(out)
    }

    /// A durable publish: sent now, answered later. One without a message id gets one
    /// (`courier-<random>.<n>`), so that when the connection is lost before the answer
    /// comes, the publish can be sent again and land once: the answer future does so
    /// after a lost connection or a timeout, up to [`PUBLISH_ATTEMPTS`] sends in all.
    pub(crate) async fn publish(
        &self,
        mut message: Message,
        options: &Publish,
    ) -> Result<PubAckFuture, BusError> {
        wire::option_headers(&mut message.headers, options);
        if options.msg_id.is_none() {
            let (prefix, next) = &*self.ids;
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = crate::numbered(prefix, n);
            message.headers.insert(mq_store::MSG_ID_HEADER, id);
        }
        let (_reply, waiting) = self.bus.send_request(message.clone(), None).await?;
        Ok(PubAckFuture::remote(RemoteAck {
            bus: self.bus.clone(),
            message,
            waiting,
            timeout: self.timeout(),
            deadline: None,
            attempt: 1,
            resend: None,
        }))
    }

    pub(crate) async fn create_consumer(
        &self,
        stream: &str,
        config: ConsumerConfig,
    ) -> Result<RemoteConsumer, BusError> {
        let info: ConsumerInfo = self
            .call_json(&format!("CONSUMER.CREATE.{}", token(stream)?), &config)
            .await?;
        Ok(RemoteConsumer::new(self.clone(), info))
    }

    pub(crate) async fn consumer(
        &self,
        stream: &str,
        name: &str,
    ) -> Result<RemoteConsumer, BusError> {
        let info = self.consumer_info(stream, name).await?;
        Ok(RemoteConsumer::new(self.clone(), info))
    }

    async fn consumer_info(&self, stream: &str, name: &str) -> Result<ConsumerInfo, BusError> {
        let op = format!("CONSUMER.INFO.{}.{}", token(stream)?, token(name)?);
        self.call_json(&op, &()).await
    }

    pub(crate) async fn consumers(&self, stream: &str) -> Result<Vec<ConsumerInfo>, BusError> {
        self.call_json(&format!("CONSUMER.LIST.{}", token(stream)?), &())
            .await
    }

    pub(crate) async fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), BusError> {
        let op = format!("CONSUMER.DELETE.{}.{}", token(stream)?, token(name)?);
        let _: bool = self.call_json(&op, &()).await?;
        Ok(())
    }
}

/// A stream or consumer name as a subject token: refused here if it could not be one
/// (the broker would not find it anyway).
fn token(name: &str) -> Result<&str, BusError> {
    mq_store::validate_name(name)
        .map(|()| name)
        .map_err(|e| BusError::Stream(StoreError::InvalidConfig(e)))
}

/// A consumer on a broker.
#[derive(Debug)]
pub(crate) struct RemoteConsumer {
    remote: Remote,
    stream: Arc<str>,
    name: Arc<str>,
    pub(crate) config: ConsumerConfig,
}

impl RemoteConsumer {
    fn new(remote: Remote, info: ConsumerInfo) -> RemoteConsumer {
        RemoteConsumer {
            remote,
            stream: Arc::from(info.stream.as_str()),
            name: Arc::from(info.config.name.as_str()),
            config: info.config,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) async fn info(&self) -> Result<ConsumerInfo, BusError> {
        self.remote.consumer_info(&self.stream, &self.name).await
    }

    /// Up to `batch` messages (at most [`MAX_BATCH`], and at most what a subscription
    /// queues), as soon as one is there or once `max_wait` has passed.
    pub(crate) async fn fetch(
        &self,
        batch: usize,
        max_wait: Duration,
    ) -> Result<Vec<Delivery>, BusError> {
        let capacity = self.remote.bus.subscription_capacity();
        let request = wire::FetchRequest {
            batch: batch.clamp(1, MAX_BATCH.min(capacity.max(1))),
            max_wait_ms: u64::try_from(max_wait.min(MAX_REMOTE_WAIT).as_millis()).unwrap_or(0),
            packed: true,
        };
        let op = format!("CONSUMER.FETCH.{}.{}", self.stream, self.name);
        let wait = Duration::from_millis(request.max_wait_ms);
        let messages = self.remote.batch(&op, &request, wait).await?;
        let mut out = Vec::with_capacity(request.batch);
        for (message, place) in unpacked(&op, messages, true)? {
            let place =
                place.ok_or_else(|| malformed(&op, "a fetched message without its place"))?;
            let ack = AckSubject {
                stream: self.stream.to_string(),
                consumer: self.name.to_string(),
                deliveries: place.deliveries,
                stream_seq: message.seq,
                consumer_seq: place.consumer_seq,
                pending: place.pending,
            };
            let info = DeliveryInfo::new(
                self.stream.clone(),
                self.name.clone(),
                ack.stream_seq,
                ack.consumer_seq,
                ack.deliveries,
                ack.pending,
            );
            let answer = RemoteAnswer {
                bus: self.remote.bus.clone(),
                ack,
                stream: self.stream.clone(),
                consumer: self.name.clone(),
            };
            out.push(Delivery::remote(message, info, answer));
        }
        Ok(out)
    }
}

/// The messages of a range or fetch answer: packed ones unpacked, the others read from
/// their headers (and, `fetched`, their ack subjects).
fn unpacked(
    op: &str,
    messages: Vec<Message>,
    fetched: bool,
) -> Result<Vec<(StoredMessage, Option<Place>)>, BusError> {
    let mut out = Vec::new();
    for m in messages {
        if let Some(count) = m.headers.get_str(PACKED_HEADER) {
            let count: usize = count
                .parse()
                .map_err(|_| malformed(op, format!("{PACKED_HEADER}: {count:?}")))?;
            out.extend(wire::unpack(m.payload, count, fetched).map_err(|e| malformed(op, e))?);
            continue;
        }
        let ack = m.reply.as_deref().and_then(AckSubject::parse);
        let message = wire::stored_message(&m.headers, m.payload).map_err(|e| malformed(op, e))?;
        let place = match ack {
            _ if !fetched => None,
            Some(ack) if ack.stream_seq == message.seq => Some(Place {
                deliveries: ack.deliveries,
                consumer_seq: ack.consumer_seq,
                pending: ack.pending,
            }),
            _ => {
                return Err(malformed(
                    op,
                    "a fetched message without an ack subject for its sequence",
                ));
            }
        };
        out.push((message, place));
    }
    Ok(out)
}

/// A run of plain acks for one consumer: stream, consumer, stream sequences.
type AckRun = (Arc<str>, Arc<str>, Vec<u64>);

/// Plain acks of a bus waiting to go out to the broker: runs of acks for one consumer
/// become one `$CR.ACKS.<stream>.<consumer>` message each ([`Bus::queue_ack`]).
#[derive(Debug, Default)]
pub(crate) struct AckBatch {
    waiting: std::sync::atomic::AtomicBool,
    queue: std::sync::Mutex<Vec<AckRun>>,
}

impl AckBatch {
    /// Queues an ack; true if the queue was empty (a flush is to be arranged).
    pub(crate) fn push(&self, stream: &Arc<str>, consumer: &Arc<str>, seq: u64) -> bool {
        let mut queue = crate::lock(&self.queue);
        let was_empty = queue.is_empty();
        match queue.last_mut() {
            Some((s, c, seqs)) if s == stream && c == consumer && seqs.len() < MAX_ACKS => {
                seqs.push(seq);
            }
            _ => queue.push((stream.clone(), consumer.clone(), vec![seq])),
        }
        self.waiting
            .store(true, std::sync::atomic::Ordering::Release);
        was_empty
    }

    pub(crate) fn is_waiting(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// What is queued, as the messages that carry it, in order; the queue is left empty.
    pub(crate) fn take(&self) -> Vec<Message> {
        let runs = {
            let mut queue = crate::lock(&self.queue);
            self.waiting
                .store(false, std::sync::atomic::Ordering::Release);
            std::mem::take(&mut *queue)
        };
        runs.into_iter()
            .map(|(stream, consumer, seqs)| {
                let mut payload = Vec::with_capacity(seqs.len() * 8);
                for seq in seqs {
                    payload.extend_from_slice(&seq.to_be_bytes());
                }
                Message::new(format!("{ACKS_PREFIX}{stream}.{consumer}"), payload)
            })
            .collect()
    }
}

/// Where a fetched message is answered.
#[derive(Debug)]
pub(crate) struct RemoteAnswer {
    bus: Bus,
    /// What its ack subject says.
    ack: AckSubject,
    stream: Arc<str>,
    consumer: Arc<str>,
}

impl RemoteAnswer {
    /// A plain ack is queued on the bus and sent, packed with the acks around it,
    /// before the bus's next publish or on the scheduler's next turn; it is not waited
    /// for. The other answers, and a confirmed ack, go to the message's ack subject at
    /// once and wait for the broker to apply them (and the ack to be durable). A
    /// confirmed ack whose answer was lost with the connection, or did not come in
    /// time, is sent again (an ack is idempotent), up to [`PUBLISH_ATTEMPTS`] times; the
    /// other answers are not, and such an error leaves it open whether the broker
    /// applied them.
    pub(crate) async fn send(&self, answer: Answer, confirm: bool) -> Result<(), BusError> {
        let ack = matches!(answer, Answer::Ack);
        if ack && !confirm {
            self.bus
                .queue_ack(&self.stream, &self.consumer, self.ack.stream_seq);
            return Ok(());
        }
        let payload = wire::encode_answer(&answer);
        let subject = self.ack.encode();
        let message = Message::new(subject.clone(), payload);
        let mut attempt = 1;
        loop {
            match self
                .bus
                .request_message(message.clone(), self.bus.request_timeout())
                .await
            {
                Ok(reply) => return check(&subject, &reply),
                Err(BusError::ConnectionLost { .. } | BusError::Timeout { .. })
                    if ack && attempt < PUBLISH_ATTEMPTS =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The short way reads every acknowledgement serde writes as serde reads it.
        #[test]
        fn a_pub_ack_reads_back_as_written(stream in ".{0,40}", seq: u64, duplicate: bool) {
            let ack = PubAck { stream, seq, duplicate };
            let bytes = serde_json::to_vec(&ack).unwrap();
            proptest::prop_assert_eq!(parse_pub_ack(&bytes).unwrap(), ack);
        }

        /// Cut anywhere, or with a byte changed, it is refused or read as serde reads
        /// it; never anything else, and never a panic.
        #[test]
        fn a_damaged_pub_ack_is_read_as_serde_reads_it(cut in 0usize..60, at in 0usize..60, byte: u8) {
            let good = br#"{"stream":"S\u0041","seq":120,"duplicate":false}"#.to_vec();
            let good2 = br#"{"stream":"ORDERS","seq":7,"duplicate":true}"#.to_vec();
            for bytes in [good, good2] {
                let mut damaged = bytes.clone();
                if at < damaged.len() {
                    damaged[at] = byte;
                }
                for input in [&bytes[..cut.min(bytes.len())], &damaged[..]] {
                    let serde: Result<PubAck, _> = serde_json::from_slice(input);
                    proptest::prop_assert_eq!(parse_pub_ack(input).ok(), serde.ok());
                }
            }
        }
    }

    #[test]
    fn pub_acks_in_other_forms_go_through_the_general_parser() {
        let want = PubAck {
            stream: "S".into(),
            seq: 5,
            duplicate: false,
        };
        for form in [
            r#"{"seq":5,"stream":"S","duplicate":false}"#,
            r#"{ "stream": "S", "seq": 5, "duplicate": false }"#,
            r#"{"stream":"\u0053","seq":5,"duplicate":false}"#,
        ] {
            assert_eq!(parse_pub_ack(form.as_bytes()).unwrap(), want, "{form}");
        }
        for bad in [
            r#"{"stream":"S","seq":05,"duplicate":false}"#,
            r#"{"stream":"S","seq":99999999999999999999,"duplicate":false}"#,
            r#"{"stream":"S","seq":5,"duplicate":false}x"#,
            r#"{"stream":"S","seq":-5,"duplicate":false}"#,
        ] {
            assert!(parse_pub_ack(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn queued_acks_go_out_in_order_one_message_per_run_of_a_consumer() {
        let batch = AckBatch::default();
        let (s, a, b): (Arc<str>, Arc<str>, Arc<str>) = ("S".into(), "a".into(), "b".into());
        assert!(!batch.is_waiting());
        assert!(batch.push(&s, &a, 1), "the first ack asks for a flush");
        assert!(!batch.push(&s, &a, 2));
        assert!(!batch.push(&s, &b, 7));
        assert!(!batch.push(&s, &a, 3));
        assert!(batch.is_waiting());
        let sent: Vec<(String, Vec<u8>)> = batch
            .take()
            .into_iter()
            .map(|m| (m.subject.to_string(), m.payload.to_vec()))
            .collect();
        let seqs = |s: &[u64]| s.iter().flat_map(|n| n.to_be_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            sent,
            vec![
                ("$CR.ACKS.S.a".to_owned(), seqs(&[1, 2])),
                ("$CR.ACKS.S.b".to_owned(), seqs(&[7])),
                ("$CR.ACKS.S.a".to_owned(), seqs(&[3])),
            ]
        );
        assert!(!batch.is_waiting());
        assert!(batch.take().is_empty());
    }

    #[test]
    fn a_long_run_of_acks_is_split_at_max_acks() {
        let batch = AckBatch::default();
        let (s, c): (Arc<str>, Arc<str>) = ("S".into(), "c".into());
        for seq in 0..(MAX_ACKS as u64 + 1) {
            batch.push(&s, &c, seq);
        }
        let sizes: Vec<usize> = batch.take().iter().map(|m| m.payload.len() / 8).collect();
        assert_eq!(sizes, vec![MAX_ACKS, 1]);
    }
}
