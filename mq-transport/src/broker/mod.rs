//! [`Broker`]: courier's own message broker, over TCP or any [`Listener`].
//!
//! Each connection is one task reading frames in order: a publish is routed to its
//! subscribers before the next frame is read, which keeps order per publisher and
//! subject. A `Msg` frame is queued on the subscriber's connection with `try_send`,
//! sharing the payload buffer, and that connection's writer coalesces whatever is queued
//! into one write. A subscriber connection whose queue is at
//! [`ConnectionConfig::max_queued_bytes`](rpc_core::ConnectionConfig::max_queued_bytes)
//! holds up the publisher that wants to add to it, for at most
//! [`BrokerConfig::slow_consumer_grace`] (back-pressure, not loss, for a subscriber
//! briefly behind). Still full after that, it is a slow consumer: cut off with a
//! `SLOW_CONSUMER` go-away and its subscriptions removed, so it holds up nobody longer.
//!
//! Memory per connection is bounded by `max_queued_bytes` (default 64 MiB; every frame
//! the broker sends counts, pongs and refusals included, and bytes count until written)
//! plus one frame being read (at most `max_frame_len`, which defaults to `max_payload` +
//! 64 KiB; a partial frame costs what has arrived).
//!
//! The rooms, one job each:
//!
//! * [`config`]: settings, their validation, counters;
//! * `fanout`: routing a publish to subscriber connections, pacing, the slow-consumer
//!   policy (the place where a stream will capture a publish);
//! * `connection`: one connection's life, from accept to close;
//! * `session`: the protocol, one function per frame kind;
//! * `streams`: durable streams and consumers, served from the broker's store over
//!   the stream API (`crate::streams::wire`).

mod config;
mod connection;
mod fanout;
mod session;
mod streams;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rpc_core::transport::{Listener, PeerAddr, accept_loop};
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::config::{BrokerConfig, BrokerConfigError, BrokerStats};
use self::connection::Conn;
use self::fanout::{BatchPool, Route};
use self::streams::StreamHost;
use crate::embedded::Storage;
use crate::lock;
use crate::sublist::Sublist;

/// A courier broker, running on the current tokio runtime.
///
/// ```
/// use mq_transport::{Broker, Bus};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = Broker::bind("127.0.0.1:0").await?;
/// let bus = Bus::connect(broker.local_addr().to_string()).await?;
/// let mut sub = bus.subscribe("ping").await?;
/// bus.publish("ping", "hello").await?;
/// assert_eq!(&sub.next().await.unwrap().payload[..], b"hello");
/// broker.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Broker {
    listen_addr: PeerAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Broker {
    /// Listens on TCP `addr` with default limits.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Broker> {
        Broker::bind_with(addr, BrokerConfig::default()).await
    }

    /// Listens on TCP `addr`. Fails with `InvalidInput` when the settings do not fit
    /// together ([`BrokerConfig::validate`]), naming both settings.
    pub async fn bind_with(addr: impl ToSocketAddrs, config: BrokerConfig) -> io::Result<Broker> {
        config.validate()?;
        let listener = TcpListener::bind(addr).await?;
        Ok(Broker::serve(listener, config)?)
    }

    /// Serves the connections of `listener`: TCP, a Unix socket, or in-memory pairs
    /// ([`rpc_core::transport::memory::listen`]) for tests without sockets.
    pub fn serve(
        listener: impl Listener,
        config: BrokerConfig,
    ) -> Result<Broker, BrokerConfigError> {
        config.validate()?;
        let store = match &config.storage {
            Storage::Memory => mq_store::Store::memory(),
            Storage::Directory(dir) => {
                crate::embedded::open_store(dir).map_err(|e| BrokerConfigError::Storage {
                    dir: dir.clone(),
                    reason: e.to_string(),
                })?
            }
        };
        let listen_addr = listener.local_addr().unwrap_or(PeerAddr::Unix(None));
        let max_connections = config.max_connections;
        let shared = Arc::new(Shared {
            subs: Sublist::new(),
            streams: StreamHost::new(store, &config),
            config,
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            messages_too_large: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            batch_pool: BatchPool::default(),
        });
        // dead letters reach the broker's subscribers too (a stream capturing their
        // subject has stored them already)
        let observing = Arc::downgrade(&shared);
        shared
            .streams
            .store
            .observe_dead_letters(Arc::new(move |subject, headers, payload| {
                let (Some(shared), Ok(runtime)) =
                    (observing.upgrade(), tokio::runtime::Handle::try_current())
                else {
                    return;
                };
                let mut metadata = rpc_core::Metadata::new();
                for (name, value) in headers {
                    metadata.append(name.to_string(), bytes::Bytes::copy_from_slice(value));
                }
                let publish = rpc_core::frame::Publish {
                    subject: subject.to_owned().into(),
                    reply: rpc_core::Utf8Bytes::default(),
                    headers: metadata,
                    payload: payload.clone(),
                };
                runtime.spawn(async move { shared.route(&publish).await });
            }));
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let serving = shared.clone();
        let stopping = stop.clone();
        let refusing = shared.clone();
        let accepting = accept_loop(
            listener,
            max_connections,
            stop.clone().cancelled_owned(),
            tracker.clone(),
            move |io, peer, slot| {
                // A child token per connection: the connection polls it whenever it
                // wakes, and polling a token takes its locks, which one token shared by
                // every connection made a point of contention between worker threads.
                connection::serve(io, peer, serving.clone(), stopping.child_token(), slot)
            },
            move |io, peer| connection::refuse(io, peer, refusing.clone()),
        );
        let starting = shared.clone();
        tracker.spawn(async move {
            // streams found on disk take the broker's fsync setting before anyone
            // publishes to them
            starting.streams.apply_fsync().await;
            accepting.await
        });
        tracing::info!(addr = %listen_addr, "broker listening");
        Ok(Broker {
            listen_addr,
            shared,
            stop,
            tracker,
        })
    }

    /// The TCP address the broker listens on. A broker serving another kind of listener
    /// ([`Broker::serve`]) reports the unspecified address `0.0.0.0:0`; see
    /// [`Broker::listen_addr`].
    pub fn local_addr(&self) -> SocketAddr {
        match &self.listen_addr {
            PeerAddr::Tcp(addr) => *addr,
            _ => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    /// Where the broker listens, whatever the transport.
    pub fn listen_addr(&self) -> &PeerAddr {
        &self.listen_addr
    }

    /// Current counters.
    pub fn stats(&self) -> BrokerStats {
        let connections = lock(&self.shared.connections);
        let shared = &self.shared;
        BrokerStats {
            connections: connections.len(),
            subscriptions: shared.subs.len(),
            messages_in: shared.messages_in.load(Ordering::Relaxed),
            messages_out: shared.messages_out.load(Ordering::Relaxed),
            messages_too_large: shared.messages_too_large.load(Ordering::Relaxed),
            slow_consumers: shared.slow_consumers.load(Ordering::Relaxed),
            queued_bytes: connections.values().map(|c| c.sender.queued_bytes()).sum(),
        }
    }

    /// Stops: no new connections; every connection gets a `SHUTDOWN` go-away after what
    /// is already queued for it, then closes. Returns when all are closed; a connection
    /// whose peer does not read what is left within 5 s is cut off.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!(addr = %self.listen_addr, "broker stopped");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What every connection of a broker shares.
#[derive(Debug)]
struct Shared {
    subs: Sublist<Route>,
    streams: StreamHost,
    config: BrokerConfig,
    /// Open connections, by id, for the counters.
    connections: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Connection ids and subscription keys.
    next_id: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    messages_too_large: AtomicU64,
    slow_consumers: AtomicU64,
    /// Batches for the sessions' messages of one read ([`fanout::Batches`]).
    batch_pool: BatchPool,
}

impl Shared {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Polls `future` once without waiting: its output if it is ready now. Nothing wakes
/// the caller later; it asks again (or awaits the future) when it wants the answer.
fn poll_now<F: std::future::Future + ?Sized>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}
