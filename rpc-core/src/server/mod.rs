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
use std::sync::atomic::AtomicU64;
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
    services: FxHashMap<&'static str, Hosted>,
    /// Every listed method ([`Service::methods`]) by its whole name, `"Service.method"`:
    /// a call is routed with one lookup, and its method named by the service's own
    /// `&'static str` (the name need not be split off the call's). Same hash, same
    /// reason.
    methods: FxHashMap<Box<[u8]>, Method>,
    /// The connection whose read the server began last (see `connection::Reads`). On a
    /// line of its own: reads of connections taking turns change it.
    last_reader: CacheLine<AtomicU64>,
}

impl Server {
    /// A server with no services yet.
    pub fn new(config: ServerConfig) -> Self {
        Server {
            shared: Arc::new(Shared {
                config,
                services: FxHashMap::default(),
                methods: FxHashMap::default(),
                last_reader: CacheLine::default(),
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
        // A service that replaces another takes its slot (no connection holds copies
        // yet: the server has not been cloned to serve); a new one takes the next.
        let slot = shared
            .services
            .get(name)
            .map_or(shared.services.len(), |replaced| replaced.slot);
        let hosted = Hosted {
            service: Arc::new(service),
            slot,
        };
        if shared.services.insert(name, hosted.clone()).is_some() {
            // Its methods go with it: the new service answers for the name alone.
            shared
                .methods
                .retain(|_, method| method.hosted.slot != slot);
        }
        let paths = hosted.service.method_paths();
        for (i, &method) in hosted.service.methods().iter().enumerate() {
            let whole = format!("{name}.{method}");
            let route = Method {
                hosted: hosted.clone(),
                name: method,
                path: paths.get(i).copied().filter(|&path| path == whole),
            };
            shared.methods.insert(whole.into_bytes().into(), route);
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

/// A service as the server hosts it.
#[derive(Clone)]
struct Hosted {
    /// Shared by every connection until it makes its copy ([`Service::local_copy`]).
    service: Arc<dyn Service>,
    /// Where each connection keeps its copy ([`Copies`]): the order in which the
    /// services' names were added.
    slot: usize,
}

/// Where a listed method's calls go.
struct Method {
    hosted: Hosted,
    /// The method's name as the service listed it (the part after the dot).
    name: &'static str,
    /// Its whole name as the service gave it ([`Service::method_paths`]), if it did.
    path: Option<&'static str>,
}

/// A listed method, as [`Shared::listed`] found it. Two thin pointers: the read loop
/// moves it with every request.
#[derive(Clone, Copy)]
struct Listed<'a> {
    /// Its whole name, `"Service.method"` (UTF-8: it was made of strings). The map's
    /// key itself: one word, where `&[u8]` takes two.
    #[allow(clippy::borrowed_box)]
    name: &'a Box<[u8]>,
    route: &'a Method,
}

impl Listed<'_> {
    fn hosted(&self) -> &Hosted {
        &self.route.hosted
    }

    /// The method's name as the service listed it.
    fn method(&self) -> &'static str {
        self.route.name
    }

    /// Its whole name as the service's own string, if it gave one.
    fn path(&self) -> Option<&'static str> {
        self.route.path
    }
}

/// One connection's copies of the services it has called ([`Service::local_copy`]), by
/// slot, each made at its service's first call. A service without copies is kept here
/// as the shared one. Allocates nothing until the connection's first call.
#[derive(Default)]
struct Copies(Vec<Option<Box<dyn Service>>>);

impl Copies {
    /// The connection's copy of `hosted`, made now if this is its first call.
    fn of(&mut self, hosted: &Hosted) -> &dyn Service {
        if self.0.len() <= hosted.slot {
            self.0.resize_with(hosted.slot + 1, || None);
        }
        let copy = self.0[hosted.slot].get_or_insert_with(|| {
            hosted
                .service
                .local_copy()
                .unwrap_or_else(|| Box::new(hosted.service.clone()))
        });
        &**copy
    }
}

impl Shared {
    /// Starts the call of `ctx`'s method on the connection's copy of its service in
    /// `copies`, its future put in `into`: a service's error answer when nothing here
    /// answers that name.
    fn dispatch(
        &self,
        ctx: CallContext,
        payload: bytes::Bytes,
        into: &mut CallBox,
        copies: &mut Copies,
    ) {
        // A listed method (every method of a generated service) comes with a name of its
        // own; another is named by a slice of the call's.
        if let Some(listed) = self.listed(ctx.method.as_bytes()) {
            return copies
                .of(listed.hosted())
                .call_in(listed.method(), ctx, payload, into);
        }
        let method = ctx.method.clone(); // shares the frame's buffer; no copy
        match self.route(method.as_str()) {
            Ok((hosted, name)) => copies.of(hosted).call_in(name, ctx, payload, into),
            Err(e) => into.put_error(e),
        }
    }

    /// Where the calls of a listed method ([`Shared::methods`]) go, by the method's
    /// whole name (its bytes, which need not be UTF-8: a name that is not misses).
    fn listed(&self, method: &[u8]) -> Option<Listed<'_>> {
        let (name, route) = self.methods.get_key_value(method)?;
        Some(Listed { name, route })
    }

    fn route<'a>(&self, method: &'a str) -> Result<(&Hosted, &'a str), ServiceError> {
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
        routed_on(server, method, &mut Copies::default())
    }

    /// [`routed`], on a connection whose copies of the services are `copies`.
    fn routed_on(server: &Server, method: &str, copies: &mut Copies) -> String {
        let ctx = CallContext::new(method.to_owned(), PeerAddr::Memory(0));
        let mut into = CallBox::new();
        server.shared.dispatch(ctx, Bytes::new(), &mut into, copies);
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
        assert!(server.shared.listed(b"Echo.listed").is_some());
        assert!(server.shared.listed(b"Echo.other").is_none());
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
            server.shared.listed(b"Echo.a").is_none(),
            "the replaced service's methods are gone"
        );
        assert_eq!(routed(&server, "Echo.a"), "second:a");
        assert_eq!(routed(&server, "Echo.both"), "second:both");
    }

    /// A service named `Echo` listing `a`, `b` and `c`, with a path for `a`, a wrong one
    /// for `b` and none for `c`.
    struct Pathed;

    impl Service for Pathed {
        fn name(&self) -> &'static str {
            "Echo"
        }

        fn call(&self, _method: &str, _ctx: CallContext, _payload: Bytes) -> CallFuture {
            Box::pin(async move { Ok(Bytes::new()) })
        }

        fn methods(&self) -> &'static [&'static str] {
            &["a", "b", "c"]
        }

        fn method_paths(&self) -> &'static [&'static str] {
            &["Echo.a", "Other.b"]
        }
    }

    #[test]
    fn a_listed_method_keeps_the_path_its_service_gave_only_when_it_is_the_whole_name() {
        let server = Server::new(ServerConfig::default()).add_service(Pathed);
        let path = |name: &[u8]| server.shared.listed(name).unwrap().path();
        assert_eq!(path(b"Echo.a"), Some("Echo.a"));
        assert_eq!(path(b"Echo.b"), None, "not its whole name");
        assert_eq!(path(b"Echo.c"), None, "none given");
    }

    /// A service named `Copied` whose copies count themselves and answer with their
    /// number; the original answers `0`.
    struct Copied {
        number: usize,
        made: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Service for Copied {
        fn name(&self) -> &'static str {
            "Copied"
        }

        fn call(&self, _method: &str, _ctx: CallContext, _payload: Bytes) -> CallFuture {
            let answer = Bytes::from(self.number.to_string());
            Box::pin(async move { Ok(answer) })
        }

        fn methods(&self) -> &'static [&'static str] {
            &["listed"]
        }

        fn local_copy(&self) -> Option<Box<dyn Service>> {
            let number = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            Some(Box::new(Copied {
                number,
                made: self.made.clone(),
            }))
        }
    }

    #[test]
    fn each_connection_calls_its_own_copy_of_a_service_made_at_its_first_call() {
        let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = Server::new(ServerConfig::default())
            .add_service(Tagged {
                tag: "shared",
                methods: &["listed"],
            })
            .add_service(Copied {
                number: 0,
                made: made.clone(),
            });
        let (mut first, mut second) = (Copies::default(), Copies::default());
        assert_eq!(routed_on(&server, "Copied.listed", &mut first), "1");
        assert_eq!(routed_on(&server, "Copied.listed", &mut first), "1");
        assert_eq!(routed_on(&server, "Copied.other", &mut first), "1");
        assert_eq!(routed_on(&server, "Copied.other", &mut second), "2");
        assert_eq!(routed_on(&server, "Copied.listed", &mut second), "2");
        assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 2);
        // A service without copies is called as it is, on every connection.
        assert_eq!(
            routed_on(&server, "Echo.listed", &mut first),
            "shared:listed"
        );
        assert_eq!(
            routed_on(&server, "Echo.listed", &mut second),
            "shared:listed"
        );
    }
}
