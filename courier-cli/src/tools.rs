//! `courier pub | sub | req | reply`: the bus from the command line, as the `nats` CLI.

use std::time::Duration;

use bytes::Bytes;
use mq_transport::{Bus, Message, Subscriber};

/// Where the bus is.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Target {
    /// The courier broker to connect to.
    #[arg(
        long,
        short = 's',
        default_value = "127.0.0.1:7222",
        env = "COURIER_BROKER"
    )]
    server: String,
    /// Connect to NATS at these URLs (comma-separated) instead of a courier broker.
    #[cfg(feature = "nats")]
    #[arg(long, env = "COURIER_NATS")]
    nats: Option<String>,
}

impl Target {
    pub(crate) async fn connect(&self) -> Result<Bus, String> {
        #[cfg(feature = "nats")]
        if let Some(urls) = &self.nats {
            return Bus::connect_nats(urls).await.map_err(|e| e.to_string());
        }
        Bus::connect(self.server.clone())
            .await
            .map_err(|e| e.to_string())
    }
}

/// A subscription to `subject`, in queue group `queue` if one is given.
async fn subscribe_to(bus: &Bus, subject: &str, queue: Option<&str>) -> Result<Subscriber, String> {
    match queue {
        Some(queue) => {
            bus.queue_subscribe(subject.to_owned(), queue.to_owned())
                .await
        }
        None => bus.subscribe(subject.to_owned()).await,
    }
    .map_err(|e| e.to_string())
}

/// Headers given as `Name:value`.
pub(crate) fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("header `{text}` is not `Name:value`")),
    }
}

/// `courier pub SUBJECT DATA`.
pub(crate) async fn publish(
    target: &Target,
    subject: String,
    data: String,
    headers: Vec<(String, String)>,
    count: usize,
) -> Result<(), String> {
    let bus = target.connect().await?;
    for i in 0..count {
        let mut message = Message::new(subject.clone(), Bytes::from(data.clone()));
        for (name, value) in &headers {
            message = message.with_header(name.clone(), Bytes::from(value.clone()));
        }
        bus.publish_message(message)
            .await
            .map_err(|e| format!("publish {} of {count} failed: {e}", i + 1))?;
    }
    bus.flush().await.map_err(|e| e.to_string())?;
    eprintln!("published {count} message(s) to `{subject}`");
    Ok(())
}

/// `courier sub SUBJECT [--queue G]`: prints messages until Ctrl-C (or `count`).
pub(crate) async fn subscribe(
    target: &Target,
    subject: String,
    queue: Option<String>,
    count: Option<usize>,
) -> Result<(), String> {
    let bus = target.connect().await?;
    let mut sub = subscribe_to(&bus, &subject, queue.as_deref()).await?;
    eprintln!(
        "listening on `{subject}`{}",
        queue
            .map(|q| format!(" in queue group `{q}`"))
            .unwrap_or_default()
    );
    let mut seen = 0;
    loop {
        let message = tokio::select! {
            message = sub.next() => message,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(message) = message else {
            return Err("the subscription ended".into());
        };
        seen += 1;
        print_message(seen, &message);
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    if sub.dropped() > 0 {
        eprintln!(
            "{} message(s) dropped: this subscriber was too slow",
            sub.dropped()
        );
    }
    Ok(())
}

fn print_message(n: usize, message: &Message) {
    let reply = message
        .reply
        .as_ref()
        .map(|r| format!(" reply={r}"))
        .unwrap_or_default();
    println!(
        "[#{n}] {}{reply} ({} bytes)",
        message.subject,
        message.payload.len()
    );
    for (name, value) in message.headers.iter() {
        println!("{name}: {}", String::from_utf8_lossy(value));
    }
    println!("{}", String::from_utf8_lossy(&message.payload));
}

/// `courier req SUBJECT DATA`: prints the reply.
pub(crate) async fn request(
    target: &Target,
    subject: String,
    data: String,
    timeout: Duration,
) -> Result<(), String> {
    let bus = target.connect().await?;
    let reply = bus
        .request_message(Message::new(subject, Bytes::from(data)), timeout)
        .await
        .map_err(|e| e.to_string())?;
    print_message(1, &reply);
    Ok(())
}

/// `courier reply SUBJECT`: answers every request with its own payload (or `--echo-prefix`
/// + payload), until Ctrl-C.
pub(crate) async fn reply(
    target: &Target,
    subject: String,
    queue: Option<String>,
) -> Result<(), String> {
    let bus = target.connect().await?;
    let mut sub = subscribe_to(&bus, &subject, queue.as_deref()).await?;
    eprintln!("echoing requests on `{subject}`");
    let mut answered = 0u64;
    loop {
        let request = tokio::select! {
            request = sub.next() => request,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(request) = request else {
            return Err("the subscription ended".into());
        };
        let Some(to) = request.reply else {
            continue; // a plain publish: nothing to answer
        };
        let mut answer = Message::new(to, request.payload);
        answer.headers = request.headers;
        bus.publish_message(answer)
            .await
            .map_err(|e| format!("could not answer: {e}"))?;
        answered += 1;
    }
    eprintln!("answered {answered} request(s)");
    Ok(())
}
