//! mq-transport: courier's message bus.
//!
//! One API, [`Bus`], over three backends: **embedded** (in this process, the default, no
//! setup), **remote** (a client of courier's own [`Broker`], over TCP or any
//! `rpc_core::transport::Connector`) and **NATS** (feature `nats`). Semantics follow NATS
//! core, so that code written against one backend runs on another:
//!
//! * [`subject`]: `.`-separated tokens, `*` for one token, `>` for one or more trailing
//!   tokens; malformed subjects are refused with the reason;
//! * publish/subscribe with [`Subscriber`] as a `Stream`, queue groups (each message to
//!   one member of each group), request/reply through one inbox per handle, with an
//!   immediate [`BusError::NoResponders`] when nobody listens;
//! * order kept per publisher and subject; at-most-once delivery;
//! * every queue bounded: a publisher is paced to a subscriber that is briefly behind
//!   (embedded bus and broker alike); one that does not catch up within a grace period is
//!   a slow consumer: it loses messages, counted and reported ([`Event::SlowConsumer`]),
//!   or on the broker is cut off with a go-away saying so.
//!
//! The wire frames are rpc-core's (`Connect`, `Pub`, `Sub`, `Unsub`, `Msg`), over its
//! connection engine; `docs/PROTOCOL.md` at the repository root describes them.

#![forbid(unsafe_code)]

mod backend;
mod broker;
mod bus;
mod client;
mod delivery;
mod embedded;
mod error;
mod event;
mod message;
#[cfg(feature = "nats")]
pub mod nats;
mod queue;
pub mod rpc;
pub mod streams;
pub use mq_store::subject;
pub mod sublist;

pub use broker::{Broker, BrokerConfig, BrokerConfigError, BrokerStats};
pub use bus::{Bus, BusOptions};
pub use client::ConnectOptions;
pub use delivery::{Subscriber, new_inbox};
pub use embedded::{EmbeddedConfig, Storage};
pub use error::{BusError, ConnectError};
pub use event::Event;
pub use message::{
    DESCRIPTION_HEADER, Message, NO_RESPONDERS, STATUS_HEADER, SUBSCRIPTION_REFUSED,
};
#[cfg(feature = "nats")]
pub use nats::NatsOptions;
pub use rpc::ServiceInstance;
pub use streams::{
    AckPolicy, Consumer, ConsumerConfig, ConsumerInfo, DeadLetter, DeliverPolicy, Delivery,
    DeliveryInfo, Discard, ErrorKind, Fsync, KeySource, Messages, PubAck, PubAckFuture, Publish,
    Retention, StoredMessage, StreamConfig, StreamInfo, StreamState, Streams,
};

pub(crate) use rpc_core::sync::lock;

/// `prefix` then `n` in decimal, in a string of exactly that capacity, so that it
/// becomes `Bytes` without another allocation (inbox subjects, message ids). The digits
/// come from `itoa`, not `core::fmt`: through `write!` this took 353 instructions per
/// call, with digits written without `core::fmt` 255 (callgrind, `req_seq`).
pub(crate) fn numbered(prefix: &str, n: u64) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n);
    let mut out = String::with_capacity(prefix.len() + digits.len());
    out.push_str(prefix);
    out.push_str(digits);
    out
}

#[cfg(test)]
mod numbered_tests {
    #[test]
    fn a_numbered_string_is_exactly_as_long_as_its_capacity() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX] {
            let s = super::numbered("p.", n);
            assert_eq!(s, format!("p.{n}"));
            assert_eq!(s.len(), s.capacity(), "{s}");
        }
    }
}
