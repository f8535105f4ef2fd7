//! The RPC server: hosts services, runs each call as its own task, shuts down gracefully.
//!
//! ```
//! use rpc_core::server::{Server, ServerConfig};
//! # use rpc_core::server::{CallContext, CallFuture, Service, ServiceError};
//! # struct Echo;
//! # impl Service for Echo {
//! #     fn name(&self) -> &'static str { "Echo" }
//! #     fn call(&self, m: &str, _: CallContext, p: bytes::Bytes) -> CallFuture {
//! #         Box::pin(async move { Ok(p) })
//! #     }
//! # }
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let stop = CancellationToken::new();
//! let server = Server::new(ServerConfig::default()).add_service(Echo);
//! let running = tokio::spawn(server.serve(listener, stop.clone().cancelled_owned()));
//! // ... serve until told to stop:
//! stop.cancel();
//! running.await.unwrap()?;
//! # Ok(()) }
//! ```

mod call;
mod connection;
mod service;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::call::{DuplicateCall, InFlight, IncomingCall, Responder, Started};
pub use self::service::{CallBox, CallContext, CallFuture, Service, ServiceError};
use crate::connection::{ConnectionConfig, Io};
use crate::frame::Status;
use crate::sync::CacheLine;
use crate::transport::{Listener, PeerAddr, accept_loop};

/// Server settings. Every default is stated on its field.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Settings of each connection (frame size limit, keepalive).
    pub connection: ConnectionConfig,
    /// Connections served at once. One more is sent a go-away naming this limit and
    /// closed. Default 10,000.
    pub max_connections: usize,
    /// Calls run at once per connection. At the limit the server stops reading from that
    /// connection until a call finishes: backpressure, not errors. Cancels queued behind
    /// are read then too, so a handler stuck without a deadline can hold a full
    /// connection. Default 1,024.
    pub max_calls_in_flight: usize,
    /// On shutdown, how long calls in flight may run before they are aborted.
    /// Default 30 s.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            connection: ConnectionConfig::default(),
            max_connections: 10_000,
            max_calls_in_flight: 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Hosts services and serves them on listeners. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.shared.services.keys().collect();
        names.sort();
        f.debug_struct("Server")
            .field("services", &names)
            .field("config", &self.shared.config)
            .finish()
    }
}

struct Shared {
    config: ServerConfig,
    /// By name. Every call looks its service up here; the keys are the server's own,
    /// fixed before it serves, so a fast unkeyed hash (FxHash) is safe: a caller's name
    /// can only miss or hit one of them, never add to the table.
    services: FxHashMap<&'static str, Arc<dyn Service>>,
    /// Connections answering the requests of a read right now (see
    /// `connection::Working`). On a line of its own: each read of every connection
    /// changes it.
    working: CacheLine<AtomicUsize>,
}

impl Server {
    /// A server with no services yet.
    pub fn new(config: ServerConfig) -> Self {
        Server {
            shared: Arc::new(Shared {
                config,
                services: FxHashMap::default(),
                working: CacheLine::default(),
            }),
        }
    }

    /// Adds a service, routed by [`Service::name`]. A second service with the same name
    /// replaces the first.
    ///
    /// # Panics
    /// When called after the server was cloned (configure first, then serve).
    pub fn add_service(mut self, service: impl Service) -> Self {
        let shared = Arc::get_mut(&mut self.shared)
            .expect("Server::add_service called after the server was cloned");
        shared.services.insert(service.name(), Arc::new(service));
        self
    }

    /// The server's settings.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Serves connections from `listener` until `shutdown` completes, then shuts down
    /// gracefully:
    ///
    /// 1. the listener is dropped: new connections are refused;
    /// 2. every connection is sent a go-away ([`crate::frame::GoAway::SHUTDOWN`]); new
    ///    calls on it are answered with [`Status::SHUTTING_DOWN`], calls in flight run on;
    /// 3. after [`ServerConfig::shutdown_grace`], calls still running are aborted;
    /// 4. connections close once their answers are written; then this returns.
    ///
    /// Accept errors (too many open files, …) are logged and retried after
    /// [`crate::transport::ACCEPT_RETRY`]; they do not end the server.
    pub async fn serve<L: Listener>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "server listening");
        let connections = TaskTracker::new();
        let drain = CancellationToken::new();
        let abort = CancellationToken::new();
        let shared = self.shared.clone();
        let (serve_drain, serve_abort) = (drain.clone(), abort.clone());
        accept_loop(
            listener,
            self.shared.config.max_connections,
            shutdown,
            connections.clone(),
            move |io, peer, slot| {
                let shared = shared.clone();
                // Each connection's own child tokens: a connection polls its drain token
                // whenever it waits for a read, and polling a token takes its locks. On
                // tokens shared by every connection, those locks were contended by the
                // connections of every worker thread.
                let (drain, abort) = (serve_drain.child_token(), serve_abort.child_token());
                async move {
                    connection::serve(io, peer, shared, drain, abort).await;
                    drop(slot);
                }
            },
            {
                let shared = self.shared.clone();
                move |io, peer| connection::refuse(io, peer, shared.clone())
            },
        )
        .await;
        tracing::info!(addr = %local, in_flight_connections = connections.len(), "server shutting down");
        drain.cancel();
        connections.close();
        let grace = self.shared.config.shutdown_grace;
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "shutdown grace period over; aborting calls still running"
            );
            abort.cancel();
            connections.wait().await;
        }
        tracing::info!(addr = %local, "server stopped");
        Ok(())
    }

    /// Serves one already-open connection until it closes (no listener, no shutdown
    /// signal): for streams obtained elsewhere, such as one end of `tokio::io::duplex`.
    pub async fn serve_connection<T: Io>(&self, io: T, peer: PeerAddr) {
        let never = CancellationToken::new();
        connection::serve(io, peer, self.shared.clone(), never.clone(), never).await;
    }
}

impl Shared {
    fn route<'a>(&self, method: &'a str) -> Result<(&Arc<dyn Service>, &'a str), ServiceError> {
        let Some((service, name)) = method.split_once('.') else {
            return Err(ServiceError::new(
                Status::UNKNOWN_METHOD,
                format!("method name `{method}` is not of the form `Service.method`"),
            ));
        };
        match self.services.get(service) {
            Some(s) => Ok((s, name)),
            None => {
                let mut known: Vec<_> = self.services.keys().copied().collect();
                known.sort_unstable();
                Err(ServiceError::new(
                    Status::UNKNOWN_SERVICE,
                    format!(
                        "no service `{service}` on this server (it hosts: {})",
                        known.join(", ")
                    ),
                ))
            }
        }
    }
}
