//! Fixtures shared by the bus tests: one behaviour test runs on every backend.

#![allow(dead_code)]

#[cfg(feature = "nats")]
pub(crate) mod nats_server;

use std::time::Duration;

use courier::bus::{
    Broker, BrokerConfig, Bus, ConnectOptions, EmbeddedConfig, Message, Subscriber,
};
use courier::transport::memory::{self, MemoryConnector};

/// A bus backend under test: every `bus()` is a separate participant (a clone of the
/// embedded bus, or its own connection to the broker).
pub(crate) enum Fixture {
    Embedded(EmbeddedConfig, Bus),
    Broker(Broker),
    /// A broker in this process, reached over in-memory connections (no sockets).
    BrokerInMemory(Broker, MemoryConnector),
    #[cfg(feature = "nats")]
    Nats(nats_server::NatsServer),
}

impl Fixture {
    pub(crate) fn embedded() -> Fixture {
        Fixture::Embedded(EmbeddedConfig::default(), Bus::embedded())
    }

    pub(crate) async fn broker() -> Fixture {
        Fixture::broker_with(BrokerConfig::default()).await
    }

    pub(crate) async fn broker_with(config: BrokerConfig) -> Fixture {
        Fixture::Broker(
            Broker::bind_with("127.0.0.1:0", config)
                .await
                .expect("broker binds"),
        )
    }

    pub(crate) fn broker_in_memory() -> Fixture {
        let (listener, connector) = memory::listen();
        let broker = Broker::serve(listener, BrokerConfig::default()).expect("broker serves");
        Fixture::BrokerInMemory(broker, connector)
    }

    /// A nats-server of its own, on a free loopback port.
    #[cfg(feature = "nats")]
    pub(crate) async fn nats() -> Fixture {
        Fixture::Nats(nats_server::NatsServer::start())
    }

    pub(crate) async fn bus(&self) -> Bus {
        self.bus_with_capacity(65_536).await
    }

    /// A participant whose subscriptions queue at most `capacity` messages.
    pub(crate) async fn bus_with_capacity(&self, capacity: usize) -> Bus {
        match self {
            Fixture::Embedded(_, bus) if capacity == 65_536 => bus.clone(),
            Fixture::Embedded(config, _) => {
                // Another embedded bus would not share subscriptions; the capacity is
                // per bus, so tests that need it use one bus for everything.
                let mut config = config.clone();
                config.bus.subscription_capacity = capacity;
                Bus::embedded_with(config)
            }
            Fixture::Broker(broker) => {
                let mut options = ConnectOptions::default();
                options.bus.subscription_capacity = capacity;
                Bus::connect_with(broker.local_addr().to_string(), options)
                    .await
                    .expect("connects to the broker")
            }
            Fixture::BrokerInMemory(_, connector) => {
                let mut options = ConnectOptions::default();
                options.bus.subscription_capacity = capacity;
                Bus::connect_via(connector.clone(), options)
                    .await
                    .expect("connects to the in-memory broker")
            }
            #[cfg(feature = "nats")]
            Fixture::Nats(server) => {
                let mut options = courier::bus::NatsOptions::default();
                options.bus.subscription_capacity = capacity;
                Bus::connect_nats_with(&server.url(), options)
                    .await
                    .expect("connects to nats-server")
            }
        }
    }

    pub(crate) fn is_embedded(&self) -> bool {
        matches!(self, Fixture::Embedded(..))
    }

    /// Whether the backend is NATS (whose core makes fewer promises: no pacing).
    pub(crate) fn is_nats(&self) -> bool {
        #[cfg(feature = "nats")]
        if matches!(self, Fixture::Nats(_)) {
            return true;
        }
        false
    }

    /// Whether draining a subscription keeps every message already on its way to it.
    /// Not on NATS: async-nats forgets the subscription as soon as it has written the
    /// UNSUB, so messages the server sent before reading it are dropped (a known limit,
    /// documented in the README).
    pub(crate) fn drains_losslessly(&self) -> bool {
        #[cfg(feature = "nats")]
        if matches!(self, Fixture::Nats(_)) {
            return false;
        }
        true
    }
}

/// The next message, or a failure naming what was awaited after 10 s.
pub(crate) async fn next(sub: &mut Subscriber) -> Message {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap_or_else(|_| panic!("no message on `{}` within 10 s", sub.subject()))
        .unwrap_or_else(|| panic!("subscription to `{}` ended", sub.subject()))
}

/// Generates one `#[tokio::test]` per backend for each behaviour `async fn(Fixture)`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::bus::Fixture::embedded()).await
                }
            )*
        }
        mod broker {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::bus::Fixture::broker().await).await
                }
            )*
        }
        mod broker_in_memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::bus::Fixture::broker_in_memory()).await
                }
            )*
        }
        #[cfg(feature = "nats")]
        mod nats {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::bus::Fixture::nats().await).await
                }
            )*
        }
    };
}
