//! `courier bench rpc`: tarpc-bench's workload on a `#[courier::service]` echo.

use std::fmt;
use std::future::Future;

use bytes::Bytes;
use courier::transport::TcpConnector;
use courier::{Client, ClientConfig, RpcError, Server, ServerConfig};
use serde_json::json;

use super::{Caller, Measured, Report, RpcFlags, RpcScenario, fields, progress, whole};

/// The peers' service: `echo(Vec<u8>) -> Vec<u8>`.
#[courier::service(crate = "courier")]
pub trait Echo {
    /// Returns `data`.
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
}

/// The same with a `Bytes` argument, which serde encodes as one byte string.
#[courier::service(crate = "courier")]
pub trait EchoBytes {
    /// Returns `data`.
    async fn echo(&self, data: Bytes) -> Bytes;
}

#[derive(Clone, Copy)]
struct Echoer;

impl Echo for Echoer {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

impl EchoBytes for Echoer {
    async fn echo(&self, data: Bytes) -> Bytes {
        data
    }
}

/// `courier bench serve-rpc ADDR`: the server, in its own process. Prints
/// `LISTENING <addr>`, serves until killed or until stdin closes.
pub(crate) async fn serve(addr: &str) -> Result<(), String> {
    let listener = super::child_listener(addr).await?;
    let server = Server::new(ServerConfig::default())
        .add_service(Echo::into_service(Echoer))
        .add_service(EchoBytes::into_service(Echoer));
    server
        .serve(listener, std::future::pending())
        .await
        .map_err(|e| format!("server failed: {e}"))
}

/// The argument type `bench rpc` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Argument {
    /// `Echo`: `Vec<u8>`.
    Vec,
    /// `EchoBytes`: `Bytes`.
    Bytes,
}

impl Argument {
    const ALL: [Argument; 2] = [Argument::Vec, Argument::Bytes];

    /// Its name in `--arguments`.
    fn flag(self) -> &'static str {
        match self {
            Argument::Vec => "vec",
            Argument::Bytes => "bytes",
        }
    }

    /// Its name in the `"argument"` field and in the table.
    fn as_str(self) -> &'static str {
        match self {
            Argument::Vec => "Vec<u8>",
            Argument::Bytes => "Bytes",
        }
    }
}

impl fmt::Display for Argument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A generated echo client: [`EchoClient`] (`Vec<u8>`) or [`EchoBytesClient`] (`Bytes`).
trait EchoStub: Clone + Send + Sync + 'static {
    /// What its `echo` takes and returns.
    type Data: From<Vec<u8>> + AsRef<[u8]> + Clone + Send + Sync + 'static;

    /// The client calling over `client`.
    fn over(client: Client) -> Self;

    /// Its `echo` call.
    fn send_echo(
        &self,
        data: Self::Data,
    ) -> impl Future<Output = Result<Self::Data, RpcError>> + Send;
}

impl EchoStub for EchoClient {
    type Data = Vec<u8>;

    fn over(client: Client) -> Self {
        EchoClient::new(client)
    }

    fn send_echo(&self, data: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, RpcError>> + Send {
        self.echo(data)
    }
}

impl EchoStub for EchoBytesClient {
    type Data = Bytes;

    fn over(client: Client) -> Self {
        EchoBytesClient::new(client)
    }

    fn send_echo(&self, data: Bytes) -> impl Future<Output = Result<Bytes, RpcError>> + Send {
        self.echo(data)
    }
}

/// Echoes a fixed payload through a generated client.
#[derive(Clone)]
struct EchoCaller<S: EchoStub> {
    client: S,
    payload: S::Data,
}

impl<S: EchoStub> EchoCaller<S> {
    /// One caller per client, each with its own payload of `size` bytes.
    fn each(clients: &[Client], size: usize) -> Vec<EchoCaller<S>> {
        clients
            .iter()
            .map(|c| EchoCaller {
                client: S::over(c.clone()),
                payload: vec![0xAB; size].into(),
            })
            .collect()
    }
}

impl<S: EchoStub> Caller for EchoCaller<S> {
    async fn call(&self) -> Result<(), String> {
        let echo = self
            .client
            .send_echo(self.payload.clone())
            .await
            .map_err(|e| e.to_string())?;
        check(echo.as_ref().len(), self.payload.as_ref().len())
    }
}

/// The `Vec<u8>` echo as a service, for `bench bus`'s `rpc_over_bus`.
pub(crate) fn echo_service() -> impl courier::Service {
    Echo::into_service(Echoer)
}

/// A caller of the `Vec<u8>` echo through `client`, sending `size` bytes.
pub(crate) fn echo_caller(client: Client, size: usize) -> impl Caller {
    EchoCaller::<EchoClient> {
        client: EchoClient::new(client),
        payload: vec![0xAB; size],
    }
}

pub(crate) fn check(got: usize, sent: usize) -> Result<(), String> {
    if got == sent {
        Ok(())
    } else {
        Err(format!("echo of {sent} bytes came back with {got}"))
    }
}

async fn connect(addr: &str) -> Result<Client, String> {
    Client::connect(TcpConnector::new(addr), ClientConfig::default())
        .await
        .map_err(|e| e.to_string())
}

pub(crate) async fn run(flags: RpcFlags) -> Result<(), String> {
    let (_server, addr) = super::server_or(&flags.connect, &["bench", "serve-rpc", "127.0.0.1:0"])?;
    let mut report = Report::new(flags.json);
    let mut clients = Vec::with_capacity(flags.conns.max(1));
    for _ in 0..flags.conns.max(1) {
        clients.push(connect(&addr).await?);
    }
    for argument in Argument::ALL {
        if !flags.arguments.iter().any(|a| a == argument.flag()) {
            continue;
        }
        for scenario in RpcScenario::ALL {
            if !flags.wants(scenario) {
                continue;
            }
            for &size in &flags.sizes {
                let conns = flags.connections(scenario);
                let clients = &clients[..conns];
                let bar = progress(format!("rpc {scenario} {size} B {argument}"));
                let measured = match argument {
                    Argument::Vec => {
                        let callers = EchoCaller::<EchoClient>::each(clients, size);
                        measure(&flags, scenario, &callers, &bar).await?
                    }
                    Argument::Bytes => {
                        let callers = EchoCaller::<EchoBytesClient>::each(clients, size);
                        measure(&flags, scenario, &callers, &bar).await?
                    }
                };
                bar.finish_and_clear();
                report.line(
                    line(
                        System::Courier,
                        scenario,
                        size,
                        conns,
                        &flags,
                        measured,
                        Some(argument.as_str()),
                    ),
                    "calls_per_s",
                );
            }
        }
    }
    Ok(())
}

pub(crate) async fn measure<C: Caller>(
    flags: &RpcFlags,
    scenario: RpcScenario,
    callers: &[C],
    bar: &indicatif::ProgressBar,
) -> Result<Measured, String> {
    let secs = std::time::Duration::from_secs_f64;
    match scenario {
        RpcScenario::Seq => {
            super::sequential(&callers[0], flags.seq_warmup, flags.seq_calls, bar).await
        }
        RpcScenario::Concurrent | RpcScenario::MultiConn => {
            super::concurrent(
                callers,
                flags.inflight,
                secs(flags.warmup_s),
                secs(flags.duration_s),
                bar,
            )
            .await
        }
    }
}

/// What an RPC bench line measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum System {
    /// `bench rpc`.
    Courier,
    /// `bench raw`.
    Raw,
}

impl System {
    /// The `"system"` field.
    fn as_str(self) -> &'static str {
        match self {
            System::Courier => "courier",
            System::Raw => "courier-raw",
        }
    }

    /// The `"transport"` field.
    fn transport(self) -> &'static str {
        match self {
            System::Courier => "tcp (TCP_NODELAY) + courier frames + bincode 2 (serde)",
            System::Raw => {
                "tcp (TCP_NODELAY) + LengthDelimitedCodec, 8-byte id + payload, echoed as is"
            }
        }
    }
}

/// One result line in tarpc-bench's fields.
pub(crate) fn line(
    system: System,
    scenario: RpcScenario,
    size: usize,
    conns: usize,
    flags: &RpcFlags,
    mut m: Measured,
    argument: Option<&str>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut line = fields(json!({
        "system": system.as_str(),
        "scenario": scenario.as_str(),
        "payload_bytes": size,
        "calls": m.calls,
        "calls_per_s": whole(m.rate()),
        "elapsed_s": (m.elapsed.as_secs_f64() * 10_000.0).round() / 10_000.0,
        "p50_us": m.percentile_us(50.0),
        "p99_us": m.percentile_us(99.0),
        "connections": conns,
        "in_flight_per_conn": flags.in_flight_per_conn(scenario),
        "transport": system.transport(),
        "version": env!("CARGO_PKG_VERSION"),
    }));
    if let Some(argument) = argument {
        line.insert("argument".into(), argument.into());
    }
    line
}
