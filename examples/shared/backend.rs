//! Which bus the bus examples run on: embedded unless `COURIER_BROKER` names a courier
//! broker or `COURIER_NATS` a NATS server (the latter needs `--features nats`).
//!
//! Switching backends is this one line in an application: `Bus::embedded()`,
//! `Bus::connect(addr)` or `Bus::connect_nats(urls)`; nothing else changes.

use courier::{Bus, BusError};

/// The embedded bus, a connection to the broker at `$COURIER_BROKER` (for example one
/// started with `cargo run -p courier-cli -- broker`), or to NATS at `$COURIER_NATS`.
pub(crate) async fn bus() -> Result<Bus, BusError> {
    if let Ok(urls) = std::env::var("COURIER_NATS") {
        return nats(&urls).await;
    }
    match std::env::var("COURIER_BROKER") {
        Ok(addr) => {
            println!("(on the courier broker at {addr})");
            Bus::connect(addr).await
        }
        Err(_) => {
            println!(
                "(on the embedded bus; set COURIER_BROKER=host:port for a courier broker, \
                 or COURIER_NATS=nats://host:port with --features nats for NATS)"
            );
            Ok(Bus::embedded())
        }
    }
}

#[cfg(feature = "nats")]
async fn nats(urls: &str) -> Result<Bus, BusError> {
    println!("(on NATS at {urls})");
    Bus::connect_nats(urls).await
}

#[cfg(not(feature = "nats"))]
async fn nats(urls: &str) -> Result<Bus, BusError> {
    Err(BusError::Backend {
        operation: "connect to NATS",
        source: format!(
            "{urls}: this build has no NATS backend: run the example with `--features nats`"
        )
        .into(),
    })
}
