//! One connection's life: accepted (or refused at the limit), registered, served by its
//! [`Session`], then its subscriptions removed and its writer given a bounded time to
//! finish.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rpc_core::ConnectionError;
use rpc_core::connection::{self, FrameSender, Io};
use rpc_core::frame::GoAway;
use rpc_core::transport::{ConnectionSlot, PeerAddr};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::session::Session;
use crate::lock;

/// How long a closing connection's writer may take to write what is left.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection as the rest of the broker sees it.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) peer: PeerAddr,
    pub(super) name: Mutex<String>,
    pub(super) sender: FrameSender,
    /// Cut off as a slow consumer: nothing more is queued for it.
    pub(super) slow: AtomicBool,
}

impl Conn {
    pub(super) fn name(&self) -> String {
        lock(&self.name).clone()
    }
}

/// Answers a connection over `max_connections` with a go-away naming the limit.
pub(super) async fn refuse<T: Io>(io: T, peer: PeerAddr, shared: Arc<Shared>) {
    let config = &shared.config;
    let message = format!(
        "too many connections: the broker's limit is {} (max_connections)",
        config.max_connections
    );
    tracing::warn!(%peer, "{message}");
    let go_away = GoAway::new(GoAway::TOO_MANY_CONNECTIONS, message);
    connection::refuse(io, &config.connection, go_away).await;
}

/// Serves one connection from handshake to close; `stop` is the broker's shutdown.
pub(super) async fn serve<T: Io>(
    io: T,
    peer: PeerAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    slot: ConnectionSlot,
) {
    let (mut reader, sender) = connection::start(io, &shared.config.connection);
    let id = shared.next_id();
    let conn = Arc::new(Conn {
        peer: peer.clone(),
        name: Mutex::new(String::new()),
        sender: sender.clone(),
        slow: AtomicBool::new(false),
    });
    lock(&shared.connections).insert(id, conn.clone());
    let mut session = Session::new(&shared, &conn, id);
    let outcome = tokio::select! {
        outcome = session.run(&mut reader) => outcome,
        _ = stop.cancelled() => {
            sender.close_with(
                GoAway::new(GoAway::SHUTDOWN, "the broker is shutting down"),
                &ConnectionError::Closed { reason: "broker shutdown".into() },
            );
            Ok(())
        }
    };
    match outcome {
        Ok(()) => tracing::debug!(%peer, "connection closed"),
        Err(e) => tracing::info!(%peer, error = %e, "connection ended"),
    }
    session.remove_all().await;
    lock(&shared.connections).remove(&id);
    // A peer that stopped reading would keep the writer from finishing, and a shutdown
    // from returning: give the writer a bounded time, then cut it off.
    sender.close_within(CLOSE_TIMEOUT).await;
    drop(slot);
}
