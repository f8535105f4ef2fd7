//! A service called over the bus: three instances behind one queue group, calls spread
//! across them, one instance stopped gracefully mid-run while calls keep flowing.
//!
//! ```sh
//! cargo run --example rpc_over_bus                                  # embedded bus
//! COURIER_BROKER=127.0.0.1:7222 cargo run --example rpc_over_bus    # a courier broker
//! COURIER_NATS=nats://127.0.0.1:4222 cargo run --features nats --example rpc_over_bus
//! ```
//!
//! Exits non-zero if a call fails or an instance serves less than a fifth of its share.

#[path = "shared/backend.rs"]
mod backend;

use std::collections::BTreeMap;
use std::time::Duration;

use courier::CallContext;

/// The service's own error, returned to callers as a typed value.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum InventoryError {
    /// No such item in the catalogue.
    UnknownItem(String),
}

/// Stock levels of a warehouse.
#[courier::service]
pub trait Inventory {
    /// Units in stock of `item`, and which instance answered.
    async fn stock(&self, ctx: &CallContext, item: String)
    -> Result<(u32, String), InventoryError>;
}

struct Warehouse {
    instance: String,
}

impl Inventory for Warehouse {
    async fn stock(
        &self,
        _ctx: &CallContext,
        item: String,
    ) -> Result<(u32, String), InventoryError> {
        let units = match item.as_str() {
            "bolts" => 1200,
            "nuts" => 800,
            _ => return Err(InventoryError::UnknownItem(item)),
        };
        Ok((units, self.instance.clone()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = backend::bus().await?;

    // Three instances: each subscribes to `rpc.Inventory.*` in queue group `Inventory`.
    let mut instances = Vec::new();
    for name in ["inventory-1", "inventory-2", "inventory-3"] {
        let service = Warehouse {
            instance: name.into(),
        };
        instances.push(bus.serve(service.into_service()).await?);
    }
    let client = InventoryClient::new(bus.rpc_client()).with_timeout(Duration::from_secs(2));

    println!("bolts: {:?}", client.stock("bolts".into()).await?);
    match client.stock("gears".into()).await? {
        Ok((units, _)) => println!("gears: {units}"),
        Err(InventoryError::UnknownItem(item)) => {
            println!("gears: the service does not know `{item}`")
        }
    }

    // 3,000 calls from 30 concurrent callers; instance 3 stops gracefully after 1,500.
    let mut answered: BTreeMap<String, u32> = BTreeMap::new();
    let mut stopped = None;
    for round in 0..100 {
        if round == 50 {
            let leaving = instances.pop().expect("three instances");
            println!("stopping inventory-3 gracefully (it answers what it took, then leaves)");
            stopped = Some(tokio::spawn(leaving.shutdown()));
        }
        let calls: Vec<_> = (0..30)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.stock("nuts".into()).await })
            })
            .collect();
        for call in calls {
            let (_, instance) = call.await??.map_err(|e| format!("{e:?}"))?;
            *answered.entry(instance).or_default() += 1;
        }
    }
    if let Some(stopped) = stopped {
        stopped.await?;
    }
    println!("3,000 calls, answered per instance: {answered:?}");
    for (instance, n) in &answered {
        // 1,500 calls over 3 instances, then 1,500 over 2: every instance's fair share is
        // at least 500; fewer than a fifth of that means the load is not spread.
        if *n < 100 {
            return Err(format!("{instance} answered only {n} calls").into());
        }
    }
    if answered.values().sum::<u32>() != 3_000 || answered.len() != 3 {
        return Err(format!("expected 3,000 calls over 3 instances: {answered:?}").into());
    }
    for instance in instances {
        instance.shutdown().await;
    }
    Ok(())
}
