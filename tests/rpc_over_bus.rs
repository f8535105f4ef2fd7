//! Services called over the bus, written once and run on every backend.

mod bus;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bus::Fixture;
use courier::bus::rpc::{MESSAGE_HEADER, STATUS_HEADER, TIMEOUT_HEADER};
use courier::bus::{Bus, Message, ServiceInstance};
use courier::frame::{Frame, Request, Status};
use courier::{CallContext, CallOptions, RpcError, Server, ServerConfig};
use tokio::sync::{Notify, mpsc};

on_every_backend!(
    calls_spread_across_three_instances_in_one_queue_group,
    typed_errors_metadata_and_deadlines_travel_with_the_call,
    an_unknown_method_is_reported_by_the_instance,
    a_gracefully_stopped_instance_answers_what_it_took_and_the_rest_take_over,
    calls_in_flight_to_a_dead_instance_fail_at_their_deadline_and_new_calls_fail_over,
    a_call_waits_for_an_instance_until_its_deadline,
    without_waiting_a_call_nobody_serves_fails_at_once_with_no_responders,
    dropping_a_call_aborts_its_handler_on_the_instance,
    the_deadline_aborts_the_handler_on_the_instance,
    handlers_see_a_request_id_unique_on_their_instance,
);

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum MathError {
    DivideByZero,
}

#[courier::service]
trait Calc {
    /// Which instance answered.
    async fn whoami(&self) -> u32;
    async fn divide(&self, a: i64, b: i64) -> Result<i64, MathError>;
    /// The first value of metadata `key`, and the time the handler had left (ms).
    async fn inspect(&self, ctx: &CallContext, key: String) -> (Option<String>, Option<u64>);
    /// Reports "started", waits until released, reports "dropped" when it ends or aborts.
    async fn hang(&self) -> u32;
    /// The call's request id.
    async fn request_id(&self, ctx: &CallContext) -> u64;
}

#[derive(Default)]
struct Node {
    id: u32,
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

impl Calc for Arc<Node> {
    async fn whoami(&self) -> u32 {
        self.id
    }

    async fn divide(&self, a: i64, b: i64) -> Result<i64, MathError> {
        a.checked_div(b).ok_or(MathError::DivideByZero)
    }

    async fn inspect(&self, ctx: &CallContext, key: String) -> (Option<String>, Option<u64>) {
        let left = ctx.deadline().map(|d| {
            d.saturating_duration_since(tokio::time::Instant::now())
                .as_millis() as u64
        });
        (ctx.metadata().get_str(&key).map(str::to_owned), left)
    }

    async fn hang(&self) -> u32 {
        let _guard = OnDrop(self.events.clone());
        if let Some(tx) = &self.events {
            let _ = tx.send("started");
        }
        self.release.notified().await;
        self.id
    }

    async fn request_id(&self, ctx: &CallContext) -> u64 {
        ctx.request_id()
    }
}

/// Instance `id` of the service on its own bus participant.
async fn instance(fixture: &Fixture, node: Node) -> (Arc<Node>, ServiceInstance) {
    let node = Arc::new(node);
    let bus = fixture.bus().await;
    let instance = bus
        .serve(node.clone().into_service())
        .await
        .expect("instance subscribes");
    (node, instance)
}

/// Instance `id` whose `hang` handler reports "started" and "dropped" on the receiver.
async fn reporting_instance(
    fixture: &Fixture,
    id: u32,
) -> (
    Arc<Node>,
    ServiceInstance,
    mpsc::UnboundedReceiver<&'static str>,
) {
    let (events_tx, events) = mpsc::unbounded_channel();
    let (node, instance) = instance(
        fixture,
        Node {
            id,
            events: Some(events_tx),
            ..Node::default()
        },
    )
    .await;
    (node, instance, events)
}

fn node(id: u32) -> Node {
    Node {
        id,
        ..Node::default()
    }
}

async fn client(fixture: &Fixture) -> CalcClient {
    CalcClient::new(fixture.bus().await.rpc_client())
}

async fn calls_spread_across_three_instances_in_one_queue_group(fixture: Fixture) {
    let mut instances = Vec::new();
    for id in 0..3 {
        instances.push(instance(&fixture, node(id)).await);
    }
    let client = client(&fixture).await;
    let served: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (client, served) = (client.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                let id = client.whoami().await.expect("call succeeds");
                served[id as usize].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let counts: Vec<u64> = served.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(counts.iter().sum::<u64>(), 3_000, "{counts:?}");
    for (id, n) in counts.iter().enumerate() {
        assert!(
            *n >= 600,
            "instance {id} served {n} of 3,000 (< 20%): {counts:?}"
        );
        assert_eq!(instances[id].1.served(), *n, "the instance's own count");
    }
}

async fn typed_errors_metadata_and_deadlines_travel_with_the_call(fixture: Fixture) {
    let _instance = instance(&fixture, node(0)).await;
    let client = client(&fixture).await;

    assert_eq!(client.divide(7, 2).await.unwrap(), Ok(3));
    assert_eq!(
        client.divide(1, 0).await.unwrap(),
        Err(MathError::DivideByZero)
    );

    let client = client
        .with_metadata("tenant", "acme")
        .with_timeout(Duration::from_secs(30));
    let (tenant, left) = client.inspect("tenant".into()).await.unwrap();
    assert_eq!(tenant.as_deref(), Some("acme"));
    let left = left.expect("the handler sees a deadline");
    assert!(
        (20_000..=30_000).contains(&left),
        "the handler had {left} ms of a 30 s deadline"
    );
    let (reserved, _) = client.inspect("Courier-Rpc-Timeout".into()).await.unwrap();
    assert_eq!(reserved, None, "courier's own headers are not metadata");
}

async fn an_unknown_method_is_reported_by_the_instance(fixture: Fixture) {
    let _instance = instance(&fixture, node(0)).await;
    let client = fixture.bus().await.rpc_client();
    let error = client
        .call("Calc.nope", bytes::Bytes::new(), &CallOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RpcError::UnknownMethod { message } if message.contains("nope")),
        "{error:?}"
    );
}

async fn a_gracefully_stopped_instance_answers_what_it_took_and_the_rest_take_over(
    fixture: Fixture,
) {
    let (stopping_node, stopping, mut events) = reporting_instance(&fixture, 0).await;
    let client = client(&fixture).await;
    // A call in progress on the instance that is about to stop.
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.hang().await }
    });
    assert_eq!(events.recv().await, Some("started"));
    let (_, survivor) = instance(&fixture, node(1)).await;

    let shutdown = tokio::spawn(stopping.shutdown());
    // Calls made while it drains are all answered: by the stopping instance if it had
    // already taken them, by the survivor otherwise.
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let client = client.clone().with_timeout(Duration::from_secs(3));
            tokio::spawn(async move { client.whoami().await })
        })
        .collect();
    let mut lost = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => {}
            Err(RpcError::Timeout { .. }) if !fixture.drains_losslessly() => lost += 1,
            Err(e) => panic!("no call is lost while an instance drains: {e}"),
        }
    }
    if lost > 0 {
        eprintln!("{lost} of 200 calls were lost in flight as the instance drained (NATS)");
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the call in progress"
    );
    stopping_node.release.notify_one();
    assert_eq!(
        held.await.unwrap().unwrap(),
        0,
        "the call it took is answered"
    );
    shutdown.await.unwrap();
    // Once it has stopped, every call goes to the survivor.
    let before = survivor.served();
    for _ in 0..50 {
        assert_eq!(client.whoami().await.unwrap(), 1);
    }
    assert_eq!(survivor.served(), before + 50);
}

async fn calls_in_flight_to_a_dead_instance_fail_at_their_deadline_and_new_calls_fail_over(
    fixture: Fixture,
) {
    let (_, doomed, mut events) = reporting_instance(&fixture, 0).await;
    let client = client(&fixture)
        .await
        .with_timeout(Duration::from_millis(500));
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.hang().await }
    });
    assert_eq!(events.recv().await, Some("started"));
    let (_, _survivor) = instance(&fixture, node(1)).await;

    drop(doomed); // dies: unsubscribes and aborts what it was running
    assert_eq!(events.recv().await, Some("dropped"));
    let error = in_flight.await.unwrap().unwrap_err();
    assert!(matches!(error, RpcError::Timeout { .. }), "{error:?}");

    // Each new call succeeds within its deadline, on the survivor.
    for _ in 0..20 {
        assert_eq!(client.whoami().await.unwrap(), 1);
    }
}

async fn a_call_waits_for_an_instance_until_its_deadline(fixture: Fixture) {
    // Nobody serves `Calc`: the call retries until its deadline, then says why.
    let client = client_with_deadline(&fixture, Duration::from_millis(100)).await;
    let error = client.whoami().await.unwrap_err();
    assert!(
        matches!(&error, RpcError::NotConnected { reason, .. }
            if reason.contains("no responders") && reason.contains("deadline")),
        "{error:?}"
    );

    let client = client_with_deadline(&fixture, Duration::from_secs(10)).await;
    let call = tokio::spawn(async move { client.whoami().await });
    // Not a timing assertion: gives the call time to meet "no responders" at least once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, _instance) = instance(&fixture, node(7)).await;
    assert_eq!(call.await.unwrap().unwrap(), 7);
}

async fn client_with_deadline(fixture: &Fixture, deadline: Duration) -> CalcClient {
    CalcClient::new(fixture.bus().await.rpc_client()).with_timeout(deadline)
}

async fn without_waiting_a_call_nobody_serves_fails_at_once_with_no_responders(fixture: Fixture) {
    let mut config = courier::ClientConfig::default();
    config.wait_for_connection = false;
    let client = CalcClient::new(fixture.bus().await.rpc_client_with(config));
    let started = Instant::now();
    let error = client.whoami().await.unwrap_err();
    assert!(
        matches!(&error, RpcError::NotConnected { reason, .. } if reason.contains("no responders")),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed at once, not at the 10 s deadline"
    );
}

async fn dropping_a_call_aborts_its_handler_on_the_instance(fixture: Fixture) {
    let (_, instance, mut events) = reporting_instance(&fixture, 0).await;
    let client = client(&fixture).await;
    let call = tokio::spawn(async move { client.hang().await });
    assert_eq!(events.recv().await, Some("started"));
    call.abort();
    assert_eq!(
        events.recv().await,
        Some("dropped"),
        "the handler was aborted"
    );
    assert_eq!(instance.served(), 0, "nothing was answered");
}

async fn the_deadline_aborts_the_handler_on_the_instance(fixture: Fixture) {
    let (_, _instance, mut events) = reporting_instance(&fixture, 0).await;
    let client = client_with_deadline(&fixture, Duration::from_millis(200)).await;
    let error = client.hang().await.unwrap_err();
    assert!(matches!(error, RpcError::Timeout { .. }), "{error:?}");
    assert_eq!(events.recv().await, Some("started"));
    assert_eq!(
        events.recv().await,
        Some("dropped"),
        "the handler was aborted"
    );
}

#[tokio::test]
async fn a_call_over_the_bus_names_its_method_in_its_error() {
    let client = Bus::embedded().rpc_client();
    assert!(client.is_connected());
    let error = CalcClient::new(client)
        .with_timeout(Duration::from_millis(1))
        .whoami()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("Calc.whoami"), "{error}");
}

async fn handlers_see_a_request_id_unique_on_their_instance(fixture: Fixture) {
    let (_, _instance) = instance(&fixture, node(0)).await;
    let client = client(&fixture).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(client.request_id().await.unwrap());
    }
    assert!(ids.iter().all(|&id| id != 0), "{ids:?}");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct ids: {ids:?}");
}

/// The same handler past the same deadline, asked over TCP and over the bus without a
/// client of courier's (whose own deadline would hide the server's answer): both answer
/// `DEADLINE_EXCEEDED` with the same explanation.
#[tokio::test]
async fn a_missed_deadline_is_answered_the_same_over_tcp_and_over_the_bus() {
    const DEADLINE: Duration = Duration::from_millis(50);
    let no_args = bytes::Bytes::new(); // `hang` takes none

    // Over the bus: a request with the deadline header, answered on our inbox.
    let bus = Bus::embedded();
    let _instance = bus.serve(Arc::new(node(0)).into_service()).await.unwrap();
    let answer = bus
        .request_message(
            Message::new("rpc.Calc.hang", no_args.clone())
                .with_header(TIMEOUT_HEADER, DEADLINE.as_micros().to_string()),
            Duration::from_secs(10),
        )
        .await
        .expect("the instance answers");
    let over_bus = (
        answer.headers.get_str(STATUS_HEADER).map(str::to_owned),
        answer.headers.get_str(MESSAGE_HEADER).map(str::to_owned),
    );

    // Over TCP: a request frame with the same deadline, from a raw connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(ServerConfig::default()).add_service(Arc::new(node(0)).into_service());
    tokio::spawn(server.serve(listener, std::future::pending()));
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, sender) =
        courier::connection::start(stream, &courier::ConnectionConfig::default());
    sender
        .send(Frame::Request(Request {
            id: 1,
            timeout: Some(DEADLINE),
            method: "Calc.hang".into(),
            metadata: Default::default(),
            payload: no_args,
        }))
        .await
        .unwrap();
    let Some(Ok(Frame::Response(response))) = reader.next().await else {
        panic!("no response over TCP");
    };
    let over_tcp = (
        Some(response.status.0.to_string()),
        Some(response.message.to_string()),
    );

    assert_eq!(
        over_tcp.0.as_deref(),
        Some(Status::DEADLINE_EXCEEDED.0.to_string().as_str())
    );
    assert_eq!(
        over_bus, over_tcp,
        "same status and explanation on both transports"
    );
}
