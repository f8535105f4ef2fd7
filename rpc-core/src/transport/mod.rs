//! Transports: where byte streams come from.
//!
//! A server accepts streams from a [`Listener`]; a client opens them with a [`Connector`],
//! and opens a new one each time it reconnects. Provided: TCP ([`TcpConnector`],
//! `tokio::net::TcpListener`), Unix sockets ([`UnixConnector`], `tokio::net::UnixListener`)
//! and in-process pairs ([`memory::listen`]). Every server accepts through
//! [`accept_loop`]; every client reconnects through [`reconnect`] with a [`Backoff`].

mod accept;
pub mod memory;
mod reconnect;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpStream;

pub use self::accept::{ACCEPT_RETRY, ConnectionSlot, accept_loop};
pub use self::reconnect::{Backoff, Reconnected, reconnect};
use crate::connection::Io;

/// Who is on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerAddr {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A Unix socket peer (its path, when it has one).
    Unix(Option<PathBuf>),
    /// The n-th in-memory connection of a [`memory::MemoryListener`].
    Memory(u64),
    /// A caller over a message bus, known by the subject its answer goes to.
    Bus(std::sync::Arc<str>),
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(addr) => write!(f, "tcp://{addr}"),
            PeerAddr::Unix(Some(path)) => write!(f, "unix://{}", path.display()),
            PeerAddr::Unix(None) => f.write_str("unix://(unnamed)"),
            PeerAddr::Memory(n) => write!(f, "memory://{n}"),
            PeerAddr::Bus(reply) => write!(f, "bus://{reply}"),
        }
    }
}

/// A source of incoming connections for a server.
pub trait Listener: Send + 'static {
    /// The streams it yields.
    type Io: Io;
    /// Waits for the next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, PeerAddr)>> + Send;
    /// Where this listener listens.
    fn local_addr(&self) -> io::Result<PeerAddr>;
}

impl Listener for tokio::net::TcpListener {
    type Io = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, PeerAddr)> {
        let (stream, addr) = tokio::net::TcpListener::accept(self).await?;
        // Frames are coalesced by the writer; Nagle would only add latency.
        stream.set_nodelay(true)?;
        Ok((stream, PeerAddr::Tcp(addr)))
    }

    fn local_addr(&self) -> io::Result<PeerAddr> {
        tokio::net::TcpListener::local_addr(self).map(PeerAddr::Tcp)
    }
}

#[cfg(unix)]
impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    async fn accept(&mut self) -> io::Result<(tokio::net::UnixStream, PeerAddr)> {
        let (stream, addr) = tokio::net::UnixListener::accept(self).await?;
        Ok((stream, PeerAddr::Unix(addr.as_pathname().map(Into::into))))
    }

    fn local_addr(&self) -> io::Result<PeerAddr> {
        let addr = tokio::net::UnixListener::local_addr(self)?;
        Ok(PeerAddr::Unix(addr.as_pathname().map(Into::into)))
    }
}

/// Opens connections for a client: once at first, again on every reconnect.
pub trait Connector: Send + Sync + 'static {
    /// The streams it opens.
    type Io: Io;
    /// Opens a connection.
    fn connect(&self) -> impl Future<Output = io::Result<(Self::Io, PeerAddr)>> + Send;
    /// Where it connects, for error messages.
    fn describe(&self) -> String;
}

/// Connects over TCP, with `TCP_NODELAY` set.
///
/// ```no_run
/// use rpc_core::transport::TcpConnector;
/// let connector = TcpConnector::new("127.0.0.1:7000");
/// ```
#[derive(Clone, Debug)]
pub struct TcpConnector {
    addr: String,
}

impl TcpConnector {
    /// Connects to `addr` (`host:port`; resolved again on every connect).
    pub fn new(addr: impl Into<String>) -> Self {
        TcpConnector { addr: addr.into() }
    }
}

impl From<SocketAddr> for TcpConnector {
    fn from(addr: SocketAddr) -> Self {
        TcpConnector::new(addr.to_string())
    }
}

impl Connector for TcpConnector {
    type Io = TcpStream;

    async fn connect(&self) -> io::Result<(TcpStream, PeerAddr)> {
        let stream = TcpStream::connect(&self.addr).await?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        Ok((stream, PeerAddr::Tcp(peer)))
    }

    fn describe(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

/// Connects to a Unix socket.
#[cfg(unix)]
#[derive(Clone, Debug)]
pub struct UnixConnector {
    path: PathBuf,
}

#[cfg(unix)]
impl UnixConnector {
    /// Connects to the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UnixConnector { path: path.into() }
    }
}

#[cfg(unix)]
impl Connector for UnixConnector {
    type Io = tokio::net::UnixStream;

    async fn connect(&self) -> io::Result<(tokio::net::UnixStream, PeerAddr)> {
        let stream = tokio::net::UnixStream::connect(&self.path).await?;
        Ok((stream, PeerAddr::Unix(Some(self.path.clone()))))
    }

    fn describe(&self) -> String {
        format!("unix://{}", self.path.display())
    }
}
