//! courier: an RPC framework and message bus for Rust.
//!
//! Calls travel over one length-prefixed binary framing with many calls in flight per
//! connection, deadlines, cancellation, metadata and graceful shutdown.
//!
//! This crate is the facade users depend on; it re-exports the runtime from `rpc-core`.
//!
//! ```
//! use bytes::Bytes;
//! use courier::{CallContext, CallFuture, CallOptions, Client, ClientConfig, Server, ServerConfig, Service};
//! use courier::transport::memory;
//!
//! struct Echo;
//!
//! impl Service for Echo {
//!     fn name(&self) -> &'static str { "Echo" }
//!     fn call(&self, method: &str, _ctx: CallContext, payload: Bytes) -> CallFuture {
//!         match method {
//!             "echo" => Box::pin(async move { Ok(payload) }),
//!             other => courier::ServiceError::unknown_method("Echo", other).into_future(),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), courier::RpcError> {
//! let (listener, connector) = memory::listen();
//! let server = Server::new(ServerConfig::default()).add_service(Echo);
//! tokio::spawn(server.serve(listener, std::future::pending()));
//!
//! let client = Client::connect(connector, ClientConfig::default()).await?;
//! let answer = client.call("Echo.echo", Bytes::from_static(b"hi"), &CallOptions::default()).await?;
//! assert_eq!(&answer[..], b"hi");
//! # Ok(()) }
//! ```

pub use rpc_core::client::{self, Backoff, CallOptions, Client, ClientConfig};
pub use rpc_core::server::{
    self, CallContext, CallFuture, Server, ServerConfig, Service, ServiceError,
};
pub use rpc_core::{
    Bincode, ConnectionConfig, Format, FormatError, Metadata, ProtocolError, RpcError, Utf8Bytes,
    codec, connection, format, frame, transport,
};

/// What generated code names; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use bytes;
    pub use rpc_core;
}
