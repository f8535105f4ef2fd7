//! rpc-core: the foundation of courier.
//!
//! * [`frame`]: the one wire format of RPC, bus and control frames, as pure functions;
//! * [`codec`]: length-prefixed framing with a maximum frame length;
//! * [`connection`]: the engine that runs frames over any byte stream (a reader, a
//!   coalescing writer, keepalive);
//! * [`format`](mod@format): payload serialization ([`format::Bincode`] by default);
//! * [`client`] and [`server`]: the RPC runtime;
//! * [`transport`]: TCP, Unix sockets and in-memory pairs, the accept loop and reconnects;
//! * [`sync`]: a one-way flag ([`sync::Latch`]) and poison-tolerant locks.
//!
//! Most users depend on the `courier` facade crate instead and never name this one.

#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod connection;
mod error;
pub mod format;
pub mod frame;
mod metadata;
pub mod server;
pub mod sync;
mod text;
pub mod transport;

pub use connection::ConnectionConfig;
pub use error::{ConnectionError, ProtocolError, RpcError};
pub use format::{Bincode, BincodeWithLimit, Format, FormatError};
pub use metadata::Metadata;
pub use text::Utf8Bytes;
