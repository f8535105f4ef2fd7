//! Servers on every transport, clients of them, raw framed peers, and the macro that runs
//! one behaviour test on every transport.

use std::future::Future;
use std::net::SocketAddr;

use courier::connection::{self, FrameReader, FrameSender, Split};
use courier::transport::TcpConnector;
use courier::transport::memory::{self, MemoryConnector};
use courier::{Client, ClientConfig, ConnectionConfig, Server, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use super::{Probe, lab};

/// How a test client reaches its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Memory,
    #[cfg(unix)]
    Unix,
}

/// Generates one `#[tokio::test]` per transport for each behaviour `async fn(Transport)`:
/// `over_tcp::behaviour`, `in_memory::behaviour` and (on Unix) `over_a_unix_socket::behaviour`.
#[macro_export]
macro_rules! on_every_transport {
    ($($name:ident),* $(,)?) => {
        mod over_tcp {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::Transport::Tcp).await
                }
            )*
        }
        mod in_memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::Transport::Memory).await
                }
            )*
        }
        #[cfg(unix)]
        mod over_a_unix_socket {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::Transport::Unix).await
                }
            )*
        }
    };
}

/// Where a server started by [`serve`] listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Memory(MemoryConnector),
    #[cfg(unix)]
    Unix(std::sync::Arc<SocketFile>),
}

/// Serves `server` on a new listener of `transport`, in the background, until the test
/// ends.
pub async fn serve(transport: Transport, server: Server) -> Endpoint {
    serve_until(transport, server, std::future::pending())
        .await
        .0
}

/// Serves `server` on a new listener of `transport` until `stop` completes; the task
/// ends when the server has shut down.
pub async fn serve_until(
    transport: Transport,
    server: Server,
    stop: impl Future<Output = ()> + Send + 'static,
) -> (Endpoint, JoinHandle<std::io::Result<()>>) {
    match transport {
        Transport::Tcp => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            (
                Endpoint::Tcp(addr),
                tokio::spawn(server.serve(listener, stop)),
            )
        }
        Transport::Memory => {
            let (listener, connector) = memory::listen();
            (
                Endpoint::Memory(connector),
                tokio::spawn(server.serve(listener, stop)),
            )
        }
        #[cfg(unix)]
        Transport::Unix => {
            let file = SocketFile::new();
            let listener = tokio::net::UnixListener::bind(&file.0).unwrap();
            (
                Endpoint::Unix(std::sync::Arc::new(file)),
                tokio::spawn(server.serve(listener, stop)),
            )
        }
    }
}

/// A client (default configuration) of `server`, served on `transport`.
pub async fn serve_and_connect(transport: Transport, server: Server) -> Client {
    serve(transport, server)
        .await
        .client(ClientConfig::default())
        .await
}

/// The Lab service, served on `transport` with `config`, and its probe.
pub async fn serve_lab(transport: Transport, config: ServerConfig) -> (Endpoint, Probe) {
    let (lab, probe) = lab();
    let endpoint = serve(transport, Server::new(config).add_service(lab)).await;
    (endpoint, probe)
}

/// A client (default configuration) of the Lab service served on `transport` with
/// `config`, and the Lab's probe.
pub async fn lab_client(transport: Transport, config: ServerConfig) -> (Client, Probe) {
    let (lab, probe) = lab();
    let client = serve_and_connect(transport, Server::new(config).add_service(lab)).await;
    (client, probe)
}

impl Endpoint {
    /// A client connected to the server.
    pub async fn client(&self, config: ClientConfig) -> Client {
        match self {
            Endpoint::Tcp(addr) => Client::connect(TcpConnector::from(*addr), config).await,
            Endpoint::Memory(connector) => Client::connect(connector.clone(), config).await,
            #[cfg(unix)]
            Endpoint::Unix(file) => {
                Client::connect(courier::transport::UnixConnector::new(&file.0), config).await
            }
        }
        .expect("the client connects to the test server")
    }

    /// The server's TCP address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Endpoint::Tcp(addr) => *addr,
            other => panic!("not a TCP endpoint: {other:?}"),
        }
    }

    /// A [`raw_peer`] on a new connection to the server.
    pub async fn raw_peer(&self) -> (RawReader, FrameSender) {
        match self {
            Endpoint::Tcp(addr) => raw_peer(tokio::net::TcpStream::connect(addr).await.unwrap()),
            Endpoint::Memory(connector) => {
                use courier::transport::Connector;
                raw_peer(connector.connect().await.unwrap().0)
            }
            #[cfg(unix)]
            Endpoint::Unix(file) => {
                raw_peer(tokio::net::UnixStream::connect(&file.0).await.unwrap())
            }
        }
    }
}

/// A byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The reading side of a [`raw_peer`].
pub type RawReader = FrameReader<tokio::io::ReadHalf<Box<dyn Stream>>>;

/// A peer speaking frames directly on `io`, with no client logic: it sends only the frames
/// the test sends, never a cancel of its own, and reads only when the test reads.
pub fn raw_peer(io: impl Stream) -> (RawReader, FrameSender) {
    let io: Box<dyn Stream> = Box::new(io);
    connection::start(Split(io), &ConnectionConfig::default())
}

/// A socket path of its own in the temporary directory, removed when dropped.
#[cfg(unix)]
#[derive(Debug)]
pub struct SocketFile(std::path::PathBuf);

#[cfg(unix)]
impl SocketFile {
    fn new() -> SocketFile {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("courier-test-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        SocketFile(path)
    }
}

#[cfg(unix)]
impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
