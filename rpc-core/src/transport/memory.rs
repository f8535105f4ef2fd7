//! In-process connections: a listener and a connector joined by a channel, each connection
//! a [`tokio::io::duplex`] pair. No sockets, no ports; works under a paused clock.
//!
//! ```
//! use rpc_core::transport::{memory, Connector, Listener};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! let (mut listener, connector) = memory::listen();
//! let (client_side, _) = connector.connect().await?;
//! let (server_side, peer) = listener.accept().await?;
//! assert_eq!(peer.to_string(), "memory://1");
//! # drop((client_side, server_side)); Ok(()) }
//! ```

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::DuplexStream;
use tokio::sync::mpsc;

use super::{Connector, Listener, PeerAddr};

/// Bytes buffered in each direction of an in-memory connection.
pub const BUFFER: usize = 64 * 1024;

/// A listener and a connector for in-memory connections.
pub fn listen() -> (MemoryListener, MemoryConnector) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        MemoryListener { rx },
        MemoryConnector {
            tx,
            next: Arc::new(AtomicU64::new(1)),
        },
    )
}

/// Accepts connections opened by its [`MemoryConnector`]s.
#[derive(Debug)]
pub struct MemoryListener {
    rx: mpsc::UnboundedReceiver<(DuplexStream, u64)>,
}

impl Listener for MemoryListener {
    type Io = DuplexStream;

    async fn accept(&mut self) -> io::Result<(DuplexStream, PeerAddr)> {
        match self.rx.recv().await {
            Some((stream, n)) => Ok((stream, PeerAddr::Memory(n))),
            None => std::future::pending().await, // no connector left: nothing will come
        }
    }

    fn local_addr(&self) -> io::Result<PeerAddr> {
        Ok(PeerAddr::Memory(0))
    }
}

/// Opens connections to its [`MemoryListener`]; fails with `ConnectionRefused` once the
/// listener is gone, like a TCP connect to a closed port.
#[derive(Clone, Debug)]
pub struct MemoryConnector {
    tx: mpsc::UnboundedSender<(DuplexStream, u64)>,
    next: Arc<AtomicU64>,
}

impl Connector for MemoryConnector {
    type Io = DuplexStream;

    async fn connect(&self) -> io::Result<(DuplexStream, PeerAddr)> {
        let (ours, theirs) = tokio::io::duplex(BUFFER);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.tx.send((theirs, n)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "in-memory listener is gone",
            )
        })?;
        Ok((ours, PeerAddr::Memory(n)))
    }

    fn describe(&self) -> String {
        "memory://0".to_string()
    }
}
