//! courier: an RPC framework and message bus for Rust.
//!
//! Annotate a trait with [`service`] and get a typed client and a server dispatch. Calls
//! travel over one length-prefixed binary framing with many calls in flight per
//! connection, deadlines, cancellation, metadata, typed application errors and graceful
//! shutdown.
//!
//! The same framing drives a message bus ([`bus`]): subjects with wildcards,
//! publish/subscribe, queue groups and request/reply, embedded in the process by default
//! ([`Bus::embedded`]) or through courier's broker ([`Bus::connect`], [`Broker`]).
//!
//! This crate is the facade users depend on; it re-exports the runtime from `rpc-core`,
//! the macro from `rpc-macros` and the bus from `mq-transport`.

#![forbid(unsafe_code)]

/// Turns a trait of `async fn` methods into a courier service.
///
/// ```
/// use std::time::Duration;
/// use courier::{CallContext, Client, ClientConfig, RpcError, Server, ServerConfig};
/// use courier::transport::memory;
///
/// #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
/// pub enum MathError {
///     DivideByZero,
/// }
///
/// /// Arithmetic over the network.
/// #[courier::service]
/// pub trait Calculator {
///     /// Adds two numbers.
///     async fn add(&self, a: i64, b: i64) -> i64;
///     /// Divides; dividing by zero is the service's own, typed error.
///     async fn div(&self, a: i64, b: i64) -> Result<i64, MathError>;
///     /// A first argument of type `CallContext` is filled in by the server.
///     async fn whoami(&self, ctx: &CallContext) -> String;
/// }
///
/// struct Calc;
///
/// impl Calculator for Calc {
///     async fn add(&self, a: i64, b: i64) -> i64 {
///         a + b
///     }
///     async fn div(&self, a: i64, b: i64) -> Result<i64, MathError> {
///         if b == 0 { Err(MathError::DivideByZero) } else { Ok(a / b) }
///     }
///     async fn whoami(&self, ctx: &CallContext) -> String {
///         ctx.metadata().get_str("user").unwrap_or("anonymous").to_string()
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), RpcError> {
/// let (listener, connector) = memory::listen();
/// let server = Server::new(ServerConfig::default()).add_service(Calc.into_service());
/// tokio::spawn(server.serve(listener, std::future::pending()));
///
/// let calc = CalculatorClient::new(Client::connect(connector, ClientConfig::default()).await?);
/// assert_eq!(calc.add(2, 3).await?, 5);
///
/// // Two layers: `Err` is courier's (`RpcError`), `Ok(Err(_))` the service's own error.
/// assert_eq!(calc.div(1, 0).await?, Err(MathError::DivideByZero));
///
/// // Per-call options without changing the method's signature.
/// let who = calc.with_metadata("user", "ada").with_timeout(Duration::from_secs(1)).whoami().await?;
/// assert_eq!(who, "ada");
///
/// assert_eq!(CalculatorClient::ADD, "Calculator.add");
/// # Ok(()) }
/// ```
///
/// # What it generates
///
/// For `trait Calculator`:
///
/// * **the trait**, each `async fn m(&self, …) -> T` becoming
///   `fn m(&self, …) -> impl Future<Output = T> + Send` (implementations may still use
///   `async fn`; their futures must be `Send`, as handlers run on a multi-threaded
///   runtime), plus a provided `into_service(self)`;
/// * **`CalculatorClient<F = Bincode>`**: one `async fn` per method, same name and
///   arguments, returning `Result<T, RpcError>`; `with_timeout`, `with_metadata` and
///   `with_options` return a copy whose calls use those options; `SERVICE_NAME`,
///   `METHODS` and one constant per method (`CalculatorClient::ADD == "Calculator.add"`);
/// * **`CalculatorService<S, F = Bincode>`**: the server dispatch for an implementation
///   `S`, registered with `Server::add_service(CalculatorService::new(imp))` (or
///   `imp.into_service()`).
///
/// Doc comments and `#[cfg]` attributes of trait methods are carried to the client methods.
///
/// # Errors: courier's and the service's
///
/// A client method returns `Result<T, RpcError>` where `T` is exactly the trait method's
/// return type. `Err(RpcError)` means the call failed in transit or on the server
/// (timeout, connection lost, unknown method, a panic…). A method declared
/// `-> Result<T, E>` returns `Ok(Err(e))` with the service's own `E` when the handler
/// returned `Err(e)`: match on `Ok(Ok(_))`, `Ok(Err(app_error))` and `Err(rpc_error)`.
///
/// # The call context
///
/// A first argument (after `&self`) whose type is `CallContext` or `&CallContext` is
/// filled in by the server: deadline, metadata, peer address, request id. It is not part
/// of the client method.
///
/// # Byte buffers
///
/// An argument or return type written `Vec<u8>` travels as one byte string rather than
/// as serde's sequence of `u8`: the same bytes on the wire with bincode and postcard, one
/// copy instead of a serde call per byte. `bytes::Bytes` (with the `bytes` crate's `serde`
/// feature) gets the same treatment from serde itself.
///
/// # Rules, checked at compile time
///
/// Methods are `async fn` taking `&self`; not generic; arguments are plain `name: Type`
/// with owned, serde-serializable types (no references, no `impl Trait`); no default
/// bodies; names must not collide with the client's generated items (`new`, `with_*`,
/// `options`, `client`, `into_service`, `service_name`, `methods`). Each violation is
/// reported at the offending tokens with what to write instead.
///
/// # A renamed dependency
///
/// Generated code names courier as `::courier`; with the dependency under another name,
/// say so: `#[courier_rpc::service(crate = "courier_rpc")]`.
pub use rpc_macros::service;

pub use rpc_core::client::{self, Backoff, CallOptions, Client, ClientConfig};
pub use rpc_core::server::{
    self, CallBox, CallContext, CallFuture, Server, ServerConfig, Service, ServiceError,
};
pub use rpc_core::{
    Bincode, ConnectionConfig, ConnectionError, Format, FormatError, Metadata, ProtocolError,
    RpcError, Utf8Bytes, codec, connection, format, frame, transport,
};

/// The message bus: subjects, publish/subscribe, queue groups, request/reply; see
/// [`Bus`].
pub mod bus {
    pub use mq_transport::*;
}
pub use mq_transport::{Broker, BrokerConfig, Bus, BusError, ConnectOptions, Message, Subscriber};

/// What generated code names; not a public API and not covered by semver.
#[doc(hidden)]
pub mod __private {
    pub use bytes;
    pub use rpc_core;
    pub use rpc_core::client::{CallOptions, Client};
    pub use rpc_core::format::{Bincode, Format, FormatError};
    pub use rpc_core::server::{CallBox, CallContext, CallFuture, Service, ServiceError};
    pub use rpc_core::{ProtocolError, RpcError, Utf8Bytes};

    /// Arguments and return values of service methods cross the network.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be an argument or return type of a courier service method",
        label = "must implement serde's `Serialize` and `DeserializeOwned`, and be `Send + 'static`",
        note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`"
    )]
    pub trait Wire: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}

    impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> Wire for T {}

    /// Compiles only for types that can cross the network (see [`Wire`]).
    pub fn assert_wire_type<T: Wire>() {}

    /// How generated code sends a `Vec<u8>` argument or return value: as one byte string
    /// (`serialize_bytes`), not as serde's sequence of `u8` with a call per byte. In
    /// bincode and postcard both are a length and the raw bytes, so the wire is the same;
    /// only the cost differs (a 4 KiB payload is one copy instead of 4,096 calls).
    #[derive(Debug)]
    pub struct AsBytes<'a, T: ?Sized>(pub &'a T);

    impl<T: AsRef<[u8]> + ?Sized> serde::Serialize for AsBytes<'_, T> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0.as_ref())
        }
    }

    /// The receiving side of [`AsBytes`]: a `Vec<u8>` read as one byte string (or, from
    /// formats that send one, as a sequence of `u8`).
    ///
    /// It asks for the bytes borrowed (`deserialize_bytes`) and copies them into a `Vec` of
    /// their length. Asked for an owned buffer instead (`deserialize_byte_buf`), bincode
    /// allocates it zeroed and then reads into it: glibc's `calloc` skips its per-thread
    /// cache, and it cost ~250 instructions a call at 16 B (issue 16). A decoder that
    /// cannot lend its bytes hands over a buffer instead, which is kept as it is.
    #[derive(Debug)]
    pub struct ByteVec(pub Vec<u8>);

    impl<'de> serde::Deserialize<'de> for ByteVec {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visitor;

            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = ByteVec;

                fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                    f.write_str("a byte string")
                }

                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteVec, E> {
                    Ok(ByteVec(v.to_vec()))
                }

                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<ByteVec, E> {
                    Ok(ByteVec(v))
                }

                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<ByteVec, A::Error> {
                    let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                    while let Some(b) = seq.next_element()? {
                        bytes.push(b);
                    }
                    Ok(ByteVec(bytes))
                }
            }

            deserializer.deserialize_bytes(Visitor)
        }
    }
}
