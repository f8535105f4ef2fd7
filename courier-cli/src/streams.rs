//! `courier stream …`, `courier pub --durable` and `courier consume`: durable streams
//! from the command line, on whatever backend `--server`/`--nats` points at.

use std::time::Duration;

use bytes::Bytes;
use mq_transport::{
    Consumer, ConsumerConfig, Delivery, Discard, ErrorKind, Fsync, Message, Publish, Retention,
    StreamConfig, StreamInfo, Streams,
};

use crate::tools::Target;

/// `courier stream …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum StreamCommand {
    /// Creates a stream capturing SUBJECTS (or checks that it exists as configured).
    Add {
        /// The stream's name: letters, digits, `-` and `_`.
        name: String,
        /// The subjects it captures, wildcards allowed; repeatable or comma-separated.
        #[arg(long = "subjects", required = true, value_delimiter = ',')]
        subjects: Vec<String>,
        /// When publishes are acknowledged: `always` (after fdatasync, the default),
        /// `every=100ms` or `never`.
        #[arg(long, default_value = "always")]
        fsync: Fsync,
        /// Keep at most this many messages.
        #[arg(long)]
        max_msgs: Option<u64>,
        /// Keep at most this many bytes.
        #[arg(long)]
        max_bytes: Option<u64>,
        /// Keep messages at most this many seconds.
        #[arg(long)]
        max_age_secs: Option<u64>,
        /// Keep at most this many messages per subject.
        #[arg(long)]
        max_msgs_per_subject: Option<u64>,
        /// At a limit, refuse new messages instead of removing old ones.
        #[arg(long)]
        discard_new: bool,
        /// `limits` (the default), `work-queue` or `interest`.
        #[arg(long, default_value = "limits", value_parser = parse_retention)]
        retention: Retention,
        #[command(flatten)]
        target: Target,
    },
    /// Lists the streams with their counts.
    Ls {
        #[command(flatten)]
        target: Target,
    },
    /// Shows a stream's configuration, counts and consumers.
    Info {
        /// The stream.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Deletes a stream and its messages.
    Rm {
        /// The stream.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Removes a stream's messages (all, or those on `--subject`).
    Purge {
        /// The stream.
        name: String,
        /// Only messages on subjects matching this filter.
        #[arg(long)]
        subject: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Prints a stream's messages, from `--from` on.
    View {
        /// The stream.
        name: String,
        /// The first sequence to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many messages.
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[command(flatten)]
        target: Target,
    },
}

fn parse_retention(text: &str) -> Result<Retention, String> {
    match text {
        "limits" => Ok(Retention::Limits),
        "work-queue" => Ok(Retention::WorkQueue),
        "interest" => Ok(Retention::Interest),
        _ => Err(format!(
            "retention `{text}`: expected limits, work-queue or interest"
        )),
    }
}

async fn streams(target: &Target) -> Result<Streams, String> {
    target.connect().await?.streams().map_err(|e| e.to_string())
}

pub(crate) async fn run(command: StreamCommand) -> Result<(), String> {
    match command {
        StreamCommand::Add {
            name,
            subjects,
            fsync,
            max_msgs,
            max_bytes,
            max_age_secs,
            max_msgs_per_subject,
            discard_new,
            retention,
            target,
        } => {
            let mut config = StreamConfig::new(name, subjects);
            config.fsync = fsync;
            config.max_msgs = max_msgs;
            config.max_bytes = max_bytes;
            config.max_age = max_age_secs.map(Duration::from_secs);
            config.max_msgs_per_subject = max_msgs_per_subject;
            config.discard = if discard_new {
                Discard::New
            } else {
                Discard::Old
            };
            config.retention = retention;
            let info = streams(&target)
                .await?
                .create(config)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "stream {} captures {} (fsync {}, {} messages)",
                info.config.name,
                info.config.subjects.join(", "),
                info.config.fsync.label(),
                info.state.msgs
            );
            Ok(())
        }
        StreamCommand::Ls { target } => {
            let list = streams(&target)
                .await?
                .list()
                .await
                .map_err(|e| e.to_string())?;
            if list.is_empty() {
                println!("no streams");
            }
            for info in list {
                println!("{}", summary(&info));
            }
            Ok(())
        }
        StreamCommand::Info { name, target } => {
            let streams = streams(&target).await?;
            let info = streams.info(&name).await.map_err(|e| e.to_string())?;
            let c = &info.config;
            let s = &info.state;
            println!("{}", summary(&info));
            println!("  subjects: {}", c.subjects.join(", "));
            println!("  fsync: {}", c.fsync.label());
            println!(
                "  limits: max_msgs {}, max_bytes {}, max_age {}, max_msgs_per_subject {}, discard {:?}, retention {:?}",
                show(c.max_msgs),
                show(c.max_bytes),
                c.max_age.map_or("none".into(), |d| format!("{d:?}")),
                show(c.max_msgs_per_subject),
                c.discard,
                c.retention
            );
            println!(
                "  sequences {}..={}, {} subjects, {} deleted, {} segments",
                s.first_seq, s.last_seq, s.subjects, s.deleted, s.segments
            );
            let consumers = streams.consumers(&name).await.map_err(|e| e.to_string())?;
            for ci in consumers {
                println!(
                    "  consumer {}: ack floor {}, next {}, {} waiting for an ack, {} to redeliver, {} redelivered, {} dead letters",
                    ci.config.name,
                    ci.ack_floor,
                    ci.next_seq,
                    ci.num_ack_pending,
                    ci.num_redelivery_due,
                    ci.num_redelivered,
                    ci.dead_letters
                );
            }
            Ok(())
        }
        StreamCommand::Rm { name, target } => {
            streams(&target)
                .await?
                .delete(&name)
                .await
                .map_err(|e| e.to_string())?;
            println!("stream {name} deleted");
            Ok(())
        }
        StreamCommand::Purge {
            name,
            subject,
            target,
        } => {
            let streams = streams(&target).await?;
            let purged = match &subject {
                Some(filter) => streams.purge_subject(&name, filter).await,
                None => streams.purge(&name).await,
            }
            .map_err(|e| e.to_string())?;
            println!("purged {purged} message(s) from {name}");
            Ok(())
        }
        StreamCommand::View {
            name,
            from,
            count,
            target,
        } => {
            let streams = streams(&target).await?;
            let mut next = from;
            let mut shown = 0;
            while shown < count {
                let batch = match streams.range(&name, next, count - shown, 8 << 20).await {
                    Ok(batch) => batch,
                    Err(e) if e_kind(&e) == Some(ErrorKind::NoMessage) => break,
                    Err(e) => return Err(e.to_string()),
                };
                let Some(last) = batch.last() else { break };
                next = last.seq + 1;
                for m in batch {
                    shown += 1;
                    println!("[{}] {} ({} bytes)", m.seq, m.subject, m.payload.len());
                    for (name, value) in &m.headers {
                        println!("{name}: {}", String::from_utf8_lossy(value));
                    }
                    println!("{}", String::from_utf8_lossy(&m.payload));
                }
            }
            if shown == 0 {
                println!("no messages in {name} from sequence {from}");
            }
            Ok(())
        }
    }
}

fn e_kind(e: &mq_transport::BusError) -> Option<ErrorKind> {
    match e {
        mq_transport::BusError::Stream(e) => Some(e.kind()),
        _ => None,
    }
}

fn show(limit: Option<u64>) -> String {
    limit.map_or("none".into(), |n| n.to_string())
}

fn summary(info: &StreamInfo) -> String {
    format!(
        "{}: {} messages, {} bytes, last sequence {}",
        info.config.name, info.state.msgs, info.state.bytes, info.state.last_seq
    )
}

/// `courier pub --durable`: each publish acknowledged by the stream that captures it.
pub(crate) async fn publish_durable(
    target: &Target,
    subject: String,
    data: String,
    headers: Vec<(String, String)>,
    count: usize,
    msg_id: Option<String>,
) -> Result<(), String> {
    let streams = streams(target).await?;
    let mut acks = Vec::with_capacity(count.min(65_536));
    let mut stored = 0u64;
    let mut duplicates = 0u64;
    for i in 0..count {
        let mut message = Message::new(subject.clone(), Bytes::from(data.clone()));
        for (name, value) in &headers {
            message = message.with_header(name.clone(), Bytes::from(value.clone()));
        }
        let options = Publish {
            // with --count, each message gets its own id: ID-1, ID-2, …
            msg_id: msg_id.as_ref().map(|id| {
                if count == 1 {
                    id.clone()
                } else {
                    format!("{id}-{}", i + 1)
                }
            }),
            ..Publish::default()
        };
        let ack = streams
            .publish_message(message, options)
            .await
            .map_err(|e| format!("publish {} of {count} failed: {e}", i + 1))?;
        acks.push(ack);
        if acks.len() >= 1024 || i + 1 == count {
            for ack in acks.drain(..) {
                let ack = ack.await.map_err(|e| e.to_string())?;
                if ack.duplicate {
                    duplicates += 1;
                    println!("duplicate: already stored in {} as {}", ack.stream, ack.seq);
                } else {
                    stored += 1;
                    if count == 1 {
                        println!("stored in {} as {}", ack.stream, ack.seq);
                    }
                }
            }
        }
    }
    if count > 1 {
        println!("stored {stored} message(s) durably, {duplicates} duplicate(s)");
    }
    Ok(())
}

/// How `courier consume` answers each message.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    Ack,
    Nak,
    Term(String),
}

/// `courier consume STREAM CONSUMER`: prints and answers messages of a durable consumer
/// (made with the defaults if it does not exist), until `count` or nothing came within
/// `wait` (with `--nak`, also when a message comes back: each is refused once).
pub(crate) async fn consume(
    target: &Target,
    stream: String,
    name: String,
    count: Option<usize>,
    wait: Duration,
    answer: Answer,
) -> Result<(), String> {
    let streams = streams(target).await?;
    let consumer: Consumer = match streams.consumer(&stream, &name).await {
        Ok(consumer) => consumer,
        Err(e) if e_kind(&e) == Some(ErrorKind::ConsumerNotFound) => streams
            .create_consumer(&stream, ConsumerConfig::durable(name.clone()))
            .await
            .map_err(|e| e.to_string())?,
        Err(e) => return Err(e.to_string()),
    };
    let mut seen = 0usize;
    // with --nak a message comes straight back: stop when one is seen again
    let mut naked = std::collections::BTreeSet::new();
    'fetching: loop {
        let want = count.map_or(256, |c| (c - seen).min(256));
        let batch = tokio::select! {
            batch = consumer.fetch(want, wait) => batch.map_err(|e| e.to_string())?,
            _ = tokio::signal::ctrl_c() => break,
        };
        if batch.is_empty() {
            break;
        }
        for delivery in batch {
            if matches!(answer, Answer::Nak) && !naked.insert(delivery.info.stream_seq) {
                break 'fetching;
            }
            seen += 1;
            print_delivery(&delivery);
            let answered = match &answer {
                Answer::Ack => delivery.ack_confirmed().await,
                Answer::Nak => delivery.nak(None).await,
                Answer::Term(reason) => delivery.term(reason).await,
            };
            answered.map_err(|e| {
                format!(
                    "could not answer message {} of {stream}: {e}",
                    delivery.info.stream_seq
                )
            })?;
        }
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    let verb = match answer {
        Answer::Ack => "acknowledged",
        Answer::Nak => "refused (nak)",
        Answer::Term(_) => "terminated",
    };
    eprintln!("{verb} {seen} message(s) of {stream} as consumer {name}");
    Ok(())
}

fn print_delivery(d: &Delivery) {
    let m = &d.message;
    println!(
        "[{}] {} ({} bytes, delivery {}, {} pending)",
        m.seq,
        m.subject,
        m.payload.len(),
        d.info.deliveries,
        d.info.pending
    );
    for (name, value) in &m.headers {
        println!("{name}: {}", String::from_utf8_lossy(value));
    }
    println!("{}", String::from_utf8_lossy(&m.payload));
}
