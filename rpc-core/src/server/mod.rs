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
    /// Every listed method ([`Service::methods`]) by its whole name, `"Service.method"`:
    /// a call is routed with one lookup, and its method named by the service's own
    /// `&'static str` (the name need not be split off the call's). Same hash, same
    /// reason.
    methods: FxHashMap<Box<str>, Method>,
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
                methods: FxHashMap::default(),
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
        let name = service.name();
        let service: Arc<dyn Service> = Arc::new(service);
        if let Some(replaced) = shared.services.insert(name, service.clone()) {
            // Its methods go with it: the new service answers for the name alone.
            shared
                .methods
                .retain(|_, method| !Arc::ptr_eq(&method.service, &replaced));
        }
        for &method in service.methods() {
            let route = Method {
                service: service.clone(),
                name: method,
            };
            shared
                .methods
                .insert(format!("{name}.{method}").into(), route);
        }
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

/// Where a listed method's calls go.
struct Method {
    service: Arc<dyn Service>,
    /// The method's name as the service listed it (the part after the dot).
    name: &'static str,
}

impl Shared {
    /// Starts the call of `ctx`'s method, its future put in `into`: a service's error
    /// answer when nothing here answers that name.
    fn dispatch(&self, ctx: CallContext, payload: bytes::Bytes, into: &mut CallBox) {
        // A listed method (every method of a generated service) comes with a name of its
        // own; another is named by a slice of the call's.
        if let Some((service, name)) = self.listed(ctx.method.as_str()) {
            return service.call_in(name, ctx, payload, into);
        }
        let method = ctx.method.clone(); // shares the frame's buffer; no copy
        match self.route(method.as_str()) {
            Ok((service, name)) => service.call_in(name, ctx, payload, into),
            Err(e) => into.put_error(e),
        }
    }

    /// The service and method name of a listed method ([`Shared::methods`]).
    fn listed(&self, method: &str) -> Option<(&Arc<dyn Service>, &'static str)> {
        let route = self.methods.get(method)?;
        Some((&route.service, route.name))
    }

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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// A service named `Echo` that lists `methods` and answers every call with `tag`
    /// and the method name it was given.
    struct Tagged {
        tag: &'static str,
        methods: &'static [&'static str],
    }

    impl Service for Tagged {
        fn name(&self) -> &'static str {
            "Echo"
        }

        fn call(&self, method: &str, _ctx: CallContext, _payload: Bytes) -> CallFuture {
            let answer = Bytes::from(format!("{}:{method}", self.tag));
            Box::pin(async move { Ok(answer) })
        }

        fn methods(&self) -> &'static [&'static str] {
            self.methods
        }
    }

    /// What a call of `method` gets through the server's dispatch: `"<tag>:<name>"`, the
    /// tag of the service it reached and the method name that service was given.
    fn routed(server: &Server, method: &str) -> String {
        let ctx = CallContext::new(method.to_owned(), PeerAddr::Memory(0));
        let mut into = CallBox::new();
        server.shared.dispatch(ctx, Bytes::new(), &mut into);
        let answer = futures_util::FutureExt::now_or_never(into)
            .unwrap()
            .unwrap();
        String::from_utf8(answer.to_vec()).unwrap()
    }

    #[test]
    fn a_listed_method_is_routed_by_its_whole_name_and_others_by_splitting_it() {
        let server = Server::new(ServerConfig::default()).add_service(Tagged {
            tag: "first",
            methods: &["listed"],
        });
        assert!(server.shared.listed("Echo.listed").is_some());
        assert!(server.shared.listed("Echo.other").is_none());
        assert_eq!(routed(&server, "Echo.listed"), "first:listed");
        assert_eq!(routed(&server, "Echo.other"), "first:other");
    }

    #[test]
    fn a_service_that_replaces_another_of_its_name_takes_its_methods_too() {
        let server = Server::new(ServerConfig::default())
            .add_service(Tagged {
                tag: "first",
                methods: &["a", "both"],
            })
            .add_service(Tagged {
                tag: "second",
                methods: &["both"],
            });
        assert!(
            server.shared.listed("Echo.a").is_none(),
            "the replaced service's methods are gone"
        );
        assert_eq!(routed(&server, "Echo.a"), "second:a");
        assert_eq!(routed(&server, "Echo.both"), "second:both");
    }
}
