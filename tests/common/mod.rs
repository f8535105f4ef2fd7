//! A hand-written service for behaviour tests, in the shape `#[courier::service]` generates,
//! with probes that let a test see handlers start, finish and be aborted.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier::{Bincode, CallContext, CallFuture, Format, Service, ServiceError};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{Semaphore, mpsc};

/// What a handler did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Started(u64),
    Finished(u64),
    /// Dropped before it finished: aborted by a cancel, a deadline or a shutdown.
    Aborted(u64),
}

/// The service. Methods:
/// * `echo(Bytes) -> Bytes` (raw payload, no format)
/// * `double(u64) -> u64`
/// * `hold(tag) -> tag`: waits for a permit of the probe's gate
/// * `sleep((tag, ms)) -> tag`
/// * `whoami() -> Whoami`
/// * `panic()`
/// * `big(n) -> Bytes` of n bytes (raw)
#[derive(Clone)]
pub struct Lab {
    events: mpsc::UnboundedSender<Event>,
    gate: Arc<Semaphore>,
}

/// The test's side of a [`Lab`].
pub struct Probe {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub gate: Arc<Semaphore>,
}

impl Probe {
    pub async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(30), self.events.recv())
            .await
            .expect("no handler event within 30 s")
            .expect("lab dropped")
    }

    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }
}

pub fn lab() -> (Lab, Probe) {
    let (tx, rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    (
        Lab {
            events: tx,
            gate: gate.clone(),
        },
        Probe { events: rx, gate },
    )
}

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Whoami {
    pub metadata: Vec<(String, Vec<u8>)>,
    pub peer: String,
    pub request_id: u64,
    pub time_left_ms: Option<u64>,
}

/// Reports `Aborted` when dropped before `finish`.
struct Watch {
    tag: u64,
    events: mpsc::UnboundedSender<Event>,
    done: bool,
}

impl Watch {
    fn start(tag: u64, events: &mpsc::UnboundedSender<Event>) -> Self {
        let _ = events.send(Event::Started(tag));
        Watch {
            tag,
            events: events.clone(),
            done: false,
        }
    }
    fn finish(mut self) {
        self.done = true;
        let _ = self.events.send(Event::Finished(self.tag));
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.events.send(Event::Aborted(self.tag));
        }
    }
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
        let events = self.events.clone();
        let gate = self.gate.clone();
        match method {
            "echo" => Box::pin(async move { Ok(payload) }),
            "double" => typed(payload, |n: u64| async move { n * 2 }),
            "hold" => typed(payload, move |tag: u64| async move {
                let watch = Watch::start(tag, &events);
                gate.acquire().await.expect("gate closed").forget();
                watch.finish();
                tag
            }),
            "sleep" => typed(payload, move |(tag, ms): (u64, u64)| async move {
                let watch = Watch::start(tag, &events);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                watch.finish();
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
