//! Generated clients and servers, over TCP and in memory.

use std::sync::Arc;
use std::time::Duration;

use courier::transport::{TcpConnector, memory};
use courier::{CallContext, Client, ClientConfig, ProtocolError, RpcError, Server, ServerConfig};
use tokio::sync::{Notify, mpsc};

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
    /// Waits until released or aborted, reporting both.
    async fn wait(&self, tag: u32) -> u32;
    async fn clear(&self);
}

#[derive(Default)]
struct Store {
    map: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    release: Notify,
    events: Option<mpsc::UnboundedSender<&'static str>>,
}

struct OnDrop(Option<mpsc::UnboundedSender<&'static str>>);
impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(tx) = &self.0 {
            let _ = tx.send("dropped");
        }
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
        let _guard = OnDrop(self.events.clone());
        if let Some(tx) = &self.events {
            let _ = tx.send("started");
        }
        self.release.notified().await;
        tag
    }

    async fn clear(&self) {
        self.map.lock().unwrap().clear();
    }
}

enum Transport {
    Tcp,
    Memory,
}

async fn start(transport: Transport, store: Arc<Store>) -> KvClient {
    let server = Server::new(ServerConfig::default()).add_service(KvService::new(store));
    let client = match transport {
        Transport::Tcp => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(server.serve(listener, std::future::pending()));
            Client::connect(TcpConnector::from(addr), ClientConfig::default())
                .await
                .unwrap()
        }
        Transport::Memory => {
            let (listener, connector) = memory::listen();
            tokio::spawn(server.serve(listener, std::future::pending()));
            Client::connect(connector, ClientConfig::default())
                .await
                .unwrap()
        }
    };
    KvClient::new(client)
}

async fn typed_errors_round_trip(transport: Transport) {
    let kv = start(transport, Arc::default()).await;
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

#[tokio::test]
async fn typed_application_errors_round_trip_over_tcp() {
    typed_errors_round_trip(Transport::Tcp).await;
}

#[tokio::test]
async fn typed_application_errors_round_trip_in_memory() {
    typed_errors_round_trip(Transport::Memory).await;
}

async fn metadata_reaches_the_handler(transport: Transport) {
    let kv = start(transport, Arc::default()).await;
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

#[tokio::test]
async fn call_metadata_reaches_the_handler_over_tcp() {
    metadata_reaches_the_handler(Transport::Tcp).await;
}

#[tokio::test]
async fn call_metadata_reaches_the_handler_in_memory() {
    metadata_reaches_the_handler(Transport::Memory).await;
}

async fn deadline_and_cancel(transport: Transport) {
    let (tx, mut events) = mpsc::unbounded_channel();
    let store = Arc::new(Store {
        events: Some(tx),
        ..Store::default()
    });
    let kv = start(transport, store.clone()).await;

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
    assert_eq!(events.recv().await, Some("started"));
    assert_eq!(events.recv().await, Some("dropped"));

    // A dropped call: the cancel reaches the server, which aborts the handler.
    let call = tokio::spawn({
        let kv = kv.clone();
        async move { kv.wait(2).await }
    });
    assert_eq!(events.recv().await, Some("started"));
    call.abort();
    assert_eq!(events.recv().await, Some("dropped"));

    // And a call let through answers.
    let call = tokio::spawn({
        let kv = kv.clone();
        async move { kv.wait(3).await }
    });
    assert_eq!(events.recv().await, Some("started"));
    store.release.notify_one();
    assert_eq!(call.await.unwrap().unwrap(), 3);
}

#[tokio::test]
async fn deadline_and_cancel_on_drop_stop_the_handler_over_tcp() {
    deadline_and_cancel(Transport::Tcp).await;
}

#[tokio::test]
async fn deadline_and_cancel_on_drop_stop_the_handler_in_memory() {
    deadline_and_cancel(Transport::Memory).await;
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
    let (listener, connector) = memory::listen();
    tokio::spawn(
        Server::new(ServerConfig::default())
            .add_service(Liar)
            .serve(listener, std::future::pending()),
    );
    let kv = KvClient::new(
        Client::connect(connector, ClientConfig::default())
            .await
            .unwrap(),
    );
    let err = kv.get("k".into()).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::Protocol(ProtocolError::InvalidPayload { what: "response", method, .. }) if method == "Kv.get"),
        "{err}"
    );
}

#[tokio::test]
async fn arguments_of_the_wrong_shape_get_a_bad_request_answer() {
    let kv = start(Transport::Memory, Arc::default()).await;
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
}
