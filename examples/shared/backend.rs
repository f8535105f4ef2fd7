//! Which bus the bus examples run on: embedded unless `COURIER_BROKER` names a broker.

use courier::{Bus, BusError};

/// The embedded bus, or a connection to the broker at `$COURIER_BROKER` (for example
/// one started with `cargo run -p courier-cli -- broker`).
pub(crate) async fn bus() -> Result<Bus, BusError> {
    match std::env::var("COURIER_BROKER") {
        Ok(addr) => {
            println!("(on the courier broker at {addr})");
            Bus::connect(addr).await
        }
        Err(_) => {
            println!("(on the embedded bus; set COURIER_BROKER=host:port to use a broker)");
            Ok(Bus::embedded())
        }
    }
}
