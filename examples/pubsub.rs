//! Publish/subscribe: wildcard subscriptions, fan-out, headers, order per publisher.
//!
//! `cargo run --example pubsub` (embedded), or against a broker:
//! `cargo run -p courier-cli -- broker` then
//! `COURIER_BROKER=127.0.0.1:7222 cargo run --example pubsub`.

#[path = "shared/backend.rs"]
mod backend;

use courier::bus::Message;

#[tokio::main]
async fn main() -> Result<(), courier::BusError> {
    let bus = backend::bus().await?;

    // Three subscribers with different filters.
    let mut sensors = bus.subscribe("sensors.>").await?;
    let mut kitchen = bus.subscribe("sensors.kitchen.*").await?;
    let mut temperatures = bus.subscribe("sensors.*.temperature").await?;

    let readings = [
        ("sensors.kitchen.temperature", "21.5"),
        ("sensors.kitchen.humidity", "40"),
        ("sensors.garage.temperature", "12.0"),
        ("sensors.garage.door.open", "true"),
    ];
    for (subject, value) in readings {
        let message = Message::new(subject, value).with_header("Unit-System", "metric");
        bus.publish_message(message).await?;
    }
    bus.flush().await?;

    for (name, sub, expected) in [
        ("sensors.>", &mut sensors, 4),
        ("sensors.kitchen.*", &mut kitchen, 2),
        ("sensors.*.temperature", &mut temperatures, 2),
    ] {
        println!("{name}:");
        for _ in 0..expected {
            let m = sub.next().await.expect("subscribed");
            println!(
                "  {:<30} {:>5}  (Unit-System: {})",
                m.subject.as_str(),
                String::from_utf8_lossy(&m.payload),
                m.headers.get_str("Unit-System").unwrap_or("-")
            );
        }
    }
    Ok(())
}
