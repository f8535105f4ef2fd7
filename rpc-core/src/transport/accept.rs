//! [`accept_loop`]: the one accept loop of every server (the RPC server, the broker).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use super::{Listener, PeerAddr};

/// How long the loop pauses after a failed accept (out of file descriptors, say) before
/// it tries again, rather than spinning.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A place under a server's connection limit, held for as long as the connection is
/// served; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// Accepts connections from `listener` until `stop` resolves, then drops the listener.
///
/// Each connection runs as a task of `tasks`: `serve(io, peer, slot)` while fewer than
/// `max_connections` are served, `refuse(io, peer)` (which should tell the peer why,
/// naming the limit) once they are all taken. Accept errors are logged and retried after
/// [`ACCEPT_RETRY`]; they do not end the loop.
///
/// ```
/// use rpc_core::transport::{accept_loop, memory, Connector};
/// use tokio_util::task::TaskTracker;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (listener, connector) = memory::listen();
/// let tasks = TaskTracker::new();
/// let stop = tokio_util::sync::CancellationToken::new();
/// let server = tokio::spawn(accept_loop(
///     listener,
///     1,
///     stop.clone().cancelled_owned(),
///     tasks.clone(),
///     |_io, peer, _slot| async move { println!("serving {peer}") },
///     |_io, peer| async move { println!("refusing {peer}") },
/// ));
/// let _client = connector.connect().await.unwrap();
/// stop.cancel();
/// server.await.unwrap();
/// tasks.close();
/// tasks.wait().await;
/// # }
/// ```
pub async fn accept_loop<L, S, SF, R, RF>(
    mut listener: L,
    max_connections: usize,
    stop: impl Future<Output = ()> + Send,
    tasks: TaskTracker,
    mut serve: S,
    mut refuse: R,
) where
    L: Listener,
    S: FnMut(L::Io, PeerAddr, ConnectionSlot) -> SF + Send,
    SF: Future<Output = ()> + Send + 'static,
    R: FnMut(L::Io, PeerAddr) -> RF + Send,
    RF: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((io, peer)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    tasks.spawn(serve(io, peer, ConnectionSlot(slot)));
                }
                Err(_) => {
                    tasks.spawn(refuse(io, peer));
                }
            },
            Err(error) => {
                tracing::warn!(%error, retry_in = ?ACCEPT_RETRY, "accept failed");
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(ACCEPT_RETRY) => {}
                }
            }
        }
    }
    drop(listener);
}
