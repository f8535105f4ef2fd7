//! Generated clients and servers, on every transport.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Event, Probe, Reporter, Transport, probe, serve_and_connect};
use courier::{CallContext, ProtocolError, RpcError, Server, ServerConfig};

on_every_transport!(
    typed_application_errors_round_trip,
    call_metadata_reaches_the_handler,
    a_deadline_or_a_dropped_call_stops_the_handler,
);

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum KvError {
    NotFound(String),
    Forbidden,
}

/// A key-value store.
#[courier::service]
trait Kv {
    /// Stores `value` under `key`; the previous value, if any.
    async fn put(&self, key: String, value: Vec<u8>) -> Option<Vec<u8>>;
    /// The value under `key`, or the service's own error.
    async fn get(&self, ctx: &CallContext, key: String) -> Result<Vec<u8>, KvError>;
    /// Waits until released, watched by the probe.
    async fn wait(&self, tag: u32) -> u32;
    async fn clear(&self);
}

#[derive(Default)]
struct Store {
    map: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    reporter: Reporter,
}

impl Store {
    /// A store whose `wait` handlers the returned probe watches and releases.
    fn watched() -> (Arc<Store>, Probe) {
        let (reporter, probe) = probe();
        let store = Store {
            reporter,
            ..Store::default()
        };
        (Arc::new(store), probe)
    }
}

impl Kv for Arc<Store> {
    async fn put(&self, key: String, value: Vec<u8>) -> Option<Vec<u8>> {
        self.map.lock().unwrap().insert(key, value)
    }

    async fn get(&self, ctx: &CallContext, key: String) -> Result<Vec<u8>, KvError> {
        if ctx.metadata().get_str("role") == Some("guest") {
            return Err(KvError::Forbidden);
        }
        self.map
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .ok_or(KvError::NotFound(key))
    }

    async fn wait(&self, tag: u32) -> u32 {
        let reporter = &self.reporter;
        reporter.watch(tag.into(), reporter.held()).await;
        tag
    }

    async fn clear(&self) {
        self.map.lock().unwrap().clear();
    }
}

/// A Kv client of `service`, served on `transport`.
async fn kv_client(transport: Transport, service: impl courier::Service) -> KvClient {
    let server = Server::new(ServerConfig::default()).add_service(service);
    KvClient::new(serve_and_connect(transport, server).await)
}

async fn typed_application_errors_round_trip(transport: Transport) {
    let kv = kv_client(transport, KvService::new(Arc::default())).await;
    assert_eq!(kv.put("a".into(), b"1".to_vec()).await.unwrap(), None);
    assert_eq!(
        kv.put("a".into(), b"2".to_vec()).await.unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(kv.get("a".into()).await.unwrap(), Ok(b"2".to_vec()));
    // The service's own error arrives as itself, inside Ok: distinct from RpcError.
    assert_eq!(
        kv.get("zz".into()).await.unwrap(),
        Err(KvError::NotFound("zz".into()))
    );
    kv.clear().await.unwrap();
    assert_eq!(
        kv.get("a".into()).await.unwrap(),
        Err(KvError::NotFound("a".into()))
    );
}

async fn call_metadata_reaches_the_handler(transport: Transport) {
    let kv = kv_client(transport, KvService::new(Arc::default())).await;
    kv.put("k".into(), vec![1]).await.unwrap();
    assert_eq!(
        kv.with_metadata("role", "guest")
            .get("k".into())
            .await
            .unwrap(),
        Err(KvError::Forbidden)
    );
    assert_eq!(
        kv.with_metadata("role", "admin")
            .get("k".into())
            .await
            .unwrap(),
        Ok(vec![1])
    );
    assert_eq!(
        kv.get("k".into()).await.unwrap(),
        Ok(vec![1]),
        "options apply to the copy only"
    );
}

async fn a_deadline_or_a_dropped_call_stops_the_handler(transport: Transport) {
    let (store, mut probe) = Store::watched();
    let kv = kv_client(transport, KvService::new(store)).await;

    // A deadline: the call times out and the handler is aborted.
    let err = kv
        .with_timeout(Duration::from_millis(50))
        .wait(1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::Timeout { method, .. } if method == KvClient::WAIT),
        "{err}"
    );
    assert_eq!(probe.next().await, Event::Started(1));
    assert_eq!(probe.next().await, Event::Aborted(1));

    // A dropped call: the cancel reaches the server, which aborts the handler.
    let call = tokio::spawn({
        let kv = kv.clone();
        async move { kv.wait(2).await }
    });
    assert_eq!(probe.next().await, Event::Started(2));
    call.abort();
    assert_eq!(probe.next().await, Event::Aborted(2));

    // And a call let through answers.
    let call = tokio::spawn({
        let kv = kv.clone();
        async move { kv.wait(3).await }
    });
    assert_eq!(probe.next().await, Event::Started(3));
    probe.release(1);
    assert_eq!(call.await.unwrap().unwrap(), 3);
    assert_eq!(probe.next().await, Event::Finished(3));
}

#[tokio::test]
async fn an_answer_of_the_wrong_shape_is_a_protocol_error_not_a_panic() {
    // A hostile "Kv" server that answers every call with bytes of another shape.
    struct Liar;
    impl courier::Service for Liar {
        fn name(&self) -> &'static str {
            "Kv"
        }
        fn call(&self, _: &str, _: CallContext, _: bytes::Bytes) -> courier::CallFuture {
            Box::pin(async {
                Ok(bytes::Bytes::from_static(&[
                    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                ]))
            })
        }
    }
    let kv = kv_client(Transport::Memory, Liar).await;
    let err = kv.get("k".into()).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::Protocol(ProtocolError::InvalidPayload { what: "response", method, .. }) if method == "Kv.get"),
        "{err}"
    );
}

#[tokio::test]
async fn arguments_of_the_wrong_shape_get_a_bad_request_answer() {
    let kv = kv_client(Transport::Memory, KvService::new(Arc::default())).await;
    let raw = kv
        .client()
        .call(
            KvClient::PUT,
            bytes::Bytes::from_static(b"\x01"),
            &Default::default(),
        )
        .await;
    assert!(
        matches!(&raw, Err(RpcError::Remote { status, .. }) if *status == courier::frame::Status::BAD_REQUEST),
        "{raw:?}"
    );
}

#[test]
fn method_name_constants_name_the_wire_methods() {
    assert_eq!(KvClient::SERVICE_NAME, "Kv");
    assert_eq!(KvClient::PUT, "Kv.put");
    assert_eq!(
        KvClient::METHODS,
        &["Kv.put", "Kv.get", "Kv.wait", "Kv.clear"]
    );
    let server = KvService::new(Arc::<Store>::default());
    assert_eq!(
        courier::Service::methods(&server),
        &["put", "get", "wait", "clear"],
        "the server routes these by their whole names"
    );
    assert_eq!(
        courier::Service::method_paths(&server),
        KvClient::METHODS,
        "and names their calls with these"
    );
}

/// Arguments named like the generated dispatch's own variables.
#[courier::service]
trait Shadow {
    async fn join(&self, into: String, inner: String, payload: String) -> String;
    async fn named(&self, context: &CallContext, ctx: String) -> String;
}

struct Joiner;

impl Shadow for Joiner {
    async fn join(&self, into: String, inner: String, payload: String) -> String {
        format!("{into}/{inner}/{payload}")
    }

    async fn named(&self, context: &CallContext, ctx: String) -> String {
        format!("{}:{ctx}", context.method())
    }
}

#[tokio::test]
async fn arguments_named_like_the_dispatchs_variables_reach_the_handler_unchanged() {
    let server = Server::new(ServerConfig::default()).add_service(ShadowService::new(Joiner));
    let shadow = ShadowClient::new(serve_and_connect(Transport::Memory, server).await);
    let joined = shadow.join("a".into(), "b".into(), "c".into()).await;
    assert_eq!(joined.unwrap(), "a/b/c");
    let named = shadow.named("d".into()).await;
    assert_eq!(named.unwrap(), "Shadow.named:d");
}

#[test]
fn a_generated_service_called_directly_runs_its_handler() {
    use courier::{Format, Service};
    use futures_util::FutureExt;

    let service = ShadowService::new(Joiner);
    let args = courier::Bincode::encode(&("x", "y", "z")).unwrap();
    let ctx = CallContext::new("Shadow.join", courier::transport::PeerAddr::Memory(0));
    let answer = service
        .call("join", ctx, args)
        .now_or_never()
        .unwrap()
        .unwrap();
    let joined: String = courier::Bincode::decode(&answer).unwrap();
    assert_eq!(joined, "x/y/z");
}

#[test]
fn a_generated_services_small_answer_is_held_inline_and_a_large_one_in_bytes() {
    use courier::{Format, Service};
    use futures_util::FutureExt;

    let service = ShadowService::new(Joiner);
    let mut into = courier::CallBox::new();
    let mut join = |part: &str| {
        let args = courier::Bincode::encode(&(part, "y", "z")).unwrap();
        let ctx = CallContext::new("Shadow.join", courier::transport::PeerAddr::Memory(0));
        service.call_in("join", ctx, args, &mut into);
        (&mut into).now_or_never().unwrap().unwrap()
    };
    // "x/y/z": a 1-byte length and 5 bytes.
    let small = join("x");
    assert!(small.is_inline());
    assert_eq!(courier::Bincode::decode::<String>(&small).unwrap(), "x/y/z");
    let long = "x".repeat(100);
    let large = join(&long);
    assert!(!large.is_inline());
    let joined = courier::Bincode::decode::<String>(&large).unwrap();
    assert_eq!(joined, format!("{long}/y/z"));
}

#[test]
fn a_generated_services_copies_and_clones_share_its_implementation() {
    use courier::{Format, Service};
    use futures_util::FutureExt;

    let service = KvService::new(Arc::<Store>::default());
    let copy = service
        .local_copy()
        .expect("a generated service makes copies");
    let clone = service.clone();
    let call = |on: &dyn Service, method: &str, args: bytes::Bytes| {
        let ctx = CallContext::new(
            format!("Kv.{method}"),
            courier::transport::PeerAddr::Memory(0),
        );
        on.call(method, ctx, args).now_or_never().unwrap().unwrap()
    };
    let get = |on: &dyn Service, key: &str| {
        let got = call(on, "get", courier::Bincode::encode(&(key,)).unwrap());
        courier::Bincode::decode::<Result<Vec<u8>, KvError>>(&got).unwrap()
    };
    call(
        &*copy,
        "put",
        courier::Bincode::encode(&("k", b"v".to_vec())).unwrap(),
    );
    assert_eq!(
        get(&service, "k").unwrap(),
        b"v",
        "what the copy stored, the original reads"
    );
    call(
        &clone,
        "put",
        courier::Bincode::encode(&("c", b"w".to_vec())).unwrap(),
    );
    assert_eq!(
        get(&*copy, "c").unwrap(),
        b"w",
        "what a clone stored, the copy reads"
    );
}
