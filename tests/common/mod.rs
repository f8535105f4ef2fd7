//! What the behaviour tests share: a hand-written service in the shape
//! `#[courier::service]` generates (the Lab), the probe that lets a test see handlers
//! start, finish and be aborted ([`probe`]), servers and clients on every transport and
//! raw framed peers ([`transport`]), and small call helpers.

#![allow(dead_code, unreachable_pub)]

pub mod probe;
pub mod transport;

use std::time::Duration;

use bytes::Bytes;
use courier::{Bincode, CallContext, CallFuture, CallOptions, Format, Service, ServiceError};
use serde::{Serialize, de::DeserializeOwned};

// What each test crate uses of these differs; the rest is unused there.
#[allow(unused_imports)]
pub use probe::{Event, Probe, Reporter, probe};
#[allow(unused_imports)]
pub use transport::{
    Endpoint, RawReader, Transport, lab_client, raw_peer, serve, serve_and_connect, serve_lab,
    serve_until,
};

/// The service. Methods:
/// * `echo(Bytes) -> Bytes` (raw payload, no format)
/// * `double(u64) -> u64`
/// * `hold(tag) -> tag`: waits for a permit of the probe's gate, watched by the probe
/// * `sleep((tag, ms)) -> tag`: watched by the probe
/// * `whoami() -> Whoami`
/// * `panic()`
/// * `big(n) -> Bytes` of n bytes (raw)
#[derive(Clone)]
pub struct Lab {
    reporter: Reporter,
}

pub fn lab() -> (Lab, Probe) {
    let (reporter, probe) = probe();
    (Lab { reporter }, probe)
}

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Whoami {
    pub metadata: Vec<(String, Vec<u8>)>,
    pub peer: String,
    pub request_id: u64,
    pub time_left_ms: Option<u64>,
}

fn typed<A, R, Fut>(payload: Bytes, f: impl FnOnce(A) -> Fut + Send + 'static) -> CallFuture
where
    A: DeserializeOwned + Send + 'static,
    R: Serialize,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let args: A = match Bincode::decode(&payload) {
        Ok(a) => a,
        Err(e) => return ServiceError::bad_request(e).into_future(),
    };
    Box::pin(async move {
        let out = f(args).await;
        Bincode::encode(&out).map_err(ServiceError::encode)
    })
}

impl Service for Lab {
    fn name(&self) -> &'static str {
        "Lab"
    }

    fn call(&self, method: &str, ctx: CallContext, payload: Bytes) -> CallFuture {
        let reporter = self.reporter.clone();
        match method {
            "echo" => Box::pin(async move { Ok(payload) }),
            "double" => typed(payload, |n: u64| async move { n * 2 }),
            "hold" => typed(payload, move |tag: u64| async move {
                reporter.watch(tag, reporter.held()).await;
                tag
            }),
            "sleep" => typed(payload, move |(tag, ms): (u64, u64)| async move {
                reporter
                    .watch(tag, tokio::time::sleep(Duration::from_millis(ms)))
                    .await;
                tag
            }),
            "whoami" => typed(payload, move |(): ()| async move {
                Whoami {
                    metadata: ctx
                        .metadata()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_vec()))
                        .collect(),
                    peer: ctx.peer().to_string(),
                    request_id: ctx.request_id(),
                    time_left_ms: ctx.deadline().map(|d| {
                        d.saturating_duration_since(tokio::time::Instant::now())
                            .as_millis() as u64
                    }),
                }
            }),
            "panic" => Box::pin(async move { panic!("the panic method panics") }),
            "panic_later" => Box::pin(async move {
                tokio::task::yield_now().await;
                panic!("the panic_later method panics after waiting")
            }),
            "big" => typed(payload, |n: usize| async move { serde_bytes_vec(n) }),
            other => ServiceError::unknown_method("Lab", other).into_future(),
        }
    }
}

fn serde_bytes_vec(n: usize) -> Vec<u8> {
    vec![0xAB; n]
}

/// Encodes arguments as the Lab service expects them.
pub fn args<T: Serialize>(value: &T) -> Bytes {
    Bincode::encode(value).unwrap()
}

/// Decodes a Lab answer.
pub fn answer<T: DeserializeOwned>(bytes: &Bytes) -> T {
    Bincode::decode(bytes).unwrap()
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Call options with no deadline of their own (the client's default applies).
pub fn no_options() -> CallOptions {
    CallOptions::default()
}

/// Call options with a deadline `d` from now.
pub fn timeout(d: Duration) -> CallOptions {
    CallOptions::default().with_timeout(d)
}

/// Waits until `condition` holds, checking every 5 ms; fails naming `what` after 10 s.
pub async fn wait_for(what: &str, condition: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}
