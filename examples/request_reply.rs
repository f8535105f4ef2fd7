//! Request/reply: a responder in a queue group, requests with timeouts, and the
//! immediate "no responders" error when nobody listens.
//!
//! `cargo run --example request_reply` (embedded), or with `COURIER_BROKER=host:port`.

#[path = "shared/backend.rs"]
mod backend;

use std::time::Duration;

use courier::bus::Message;

#[tokio::main]
async fn main() -> Result<(), courier::BusError> {
    let bus = backend::bus().await?;

    // Two instances of a "math.square" responder share the load as a queue group.
    for instance in ["a", "b"] {
        let mut requests = bus.queue_subscribe("math.square", "math").await?;
        let bus = bus.clone();
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let Some(reply) = request.reply else { continue };
                let n: i64 = String::from_utf8_lossy(&request.payload)
                    .parse()
                    .unwrap_or(0);
                let answer =
                    Message::new(reply, (n * n).to_string()).with_header("Instance", instance);
                bus.publish_message(answer).await.ok();
            }
        });
    }

    for n in 1..=6 {
        let reply = bus.request("math.square", n.to_string()).await?;
        println!(
            "{n}² = {} (answered by instance {})",
            String::from_utf8_lossy(&reply.payload),
            reply.headers.get_str("Instance").unwrap_or("?")
        );
    }

    // Nobody subscribed: the error is immediate, not the 2 s timeout.
    let started = std::time::Instant::now();
    let err = bus
        .request_message(Message::new("math.cube", "3"), Duration::from_secs(2))
        .await
        .unwrap_err();
    println!("math.cube -> {err} (after {:?})", started.elapsed());
    Ok(())
}
