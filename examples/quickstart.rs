//! courier in one process, no setup: a service defined as a trait, served, called; then a
//! deadline, a typed application error, metadata and a graceful shutdown. Then the
//! message bus, embedded in the process: publish/subscribe with wildcards, a queue group
//! sharing work, and request/reply.
//!
//! Run it with `cargo run --example quickstart`.

use std::time::Duration;

use courier::transport::TcpConnector;
use courier::{Bus, BusError, CallContext, Client, ClientConfig, RpcError, Server, ServerConfig};
use tokio_util::sync::CancellationToken;

/// The service's own error type: it reaches the caller as itself.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum GreetError {
    /// Nobody to greet.
    EmptyName,
}

/// Greets people.
#[courier::service]
trait Greeter {
    /// A greeting for `name`, or `GreetError::EmptyName`.
    async fn greet(&self, ctx: &CallContext, name: String) -> Result<String, GreetError>;
    /// Sleeps for `ms` milliseconds.
    async fn slow(&self, ms: u64);
}

struct Hello;

impl Greeter for Hello {
    async fn greet(&self, ctx: &CallContext, name: String) -> Result<String, GreetError> {
        if name.is_empty() {
            return Err(GreetError::EmptyName);
        }
        let from = ctx.metadata().get_str("x-client").unwrap_or("someone");
        Ok(format!(
            "Hello, {name}! (asked by {from} from {})",
            ctx.peer()
        ))
    }

    async fn slow(&self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    // A server on a free loopback port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = Server::new(ServerConfig::default()).add_service(Hello.into_service());
    let serving = tokio::spawn(server.serve(listener, stop.clone().cancelled_owned()));
    println!("server listening on {addr}");

    // A typed client, with metadata sent on every call.
    let mut config = ClientConfig::default();
    config.metadata.insert("x-client", "quickstart");
    let greeter = GreeterClient::new(Client::connect(TcpConnector::from(addr), config).await?);

    // 1. A call. `?` takes off courier's error layer; the service's own Result is left.
    let greeting = greeter.greet("courier".into()).await?;
    println!("1. greet(\"courier\")       -> {greeting:?}");

    // 2. The service's typed error arrives as itself, distinct from RpcError.
    let empty = greeter.greet(String::new()).await?;
    println!("2. greet(\"\")              -> {empty:?}");

    // 3. Many calls in flight on the one connection.
    let calls = (0..1000).map(|i| {
        let greeter = greeter.clone();
        async move { greeter.greet(format!("#{i}")).await }
    });
    let answers = futures_util::future::try_join_all(calls).await?;
    println!(
        "3. 1000 calls in flight on one connection -> {} answers",
        answers.len()
    );

    // 4. A deadline: the call gives up after 50 ms and the server aborts the handler.
    match greeter
        .with_timeout(Duration::from_millis(50))
        .slow(5_000)
        .await
    {
        Err(e @ RpcError::Timeout { .. }) => println!("4. slow(5000) within 50 ms -> {e}"),
        other => println!("4. slow(5000) within 50 ms -> unexpected: {other:?}"),
    }

    // 5. Graceful shutdown: stop accepting, finish what is in flight, close.
    stop.cancel();
    serving.await??;
    println!("5. server shut down gracefully");

    bus_tour().await?;
    Ok(())
}

/// The message bus, embedded in this process (the default backend: no broker to run).
async fn bus_tour() -> Result<(), BusError> {
    let bus = Bus::embedded();

    // 6. Publish/subscribe: `*` matches one token, `>` the rest.
    let mut eu = bus.subscribe("orders.eu.*").await?;
    let mut all = bus.subscribe("orders.>").await?;
    bus.publish("orders.eu.created", "order 1").await?;
    bus.publish("orders.us.created", "order 2").await?;
    let first = eu.next().await.expect("subscribed");
    let (a, b) = (
        all.next().await.expect("subscribed"),
        all.next().await.expect("subscribed"),
    );
    println!(
        "6. orders.eu.* got {:?}; orders.> got {:?} and {:?}",
        first.subject, a.subject, b.subject
    );

    // 7. A queue group: each message goes to one of its three members.
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(bus.queue_subscribe("jobs", "workers").await?);
    }
    for i in 0..300 {
        bus.publish("jobs", format!("job {i}")).await?;
    }
    let mut shares = Vec::new();
    for worker in &mut workers {
        let mut n = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), worker.next()).await
        {
            n += 1;
        }
        shares.push(n);
    }
    println!("7. 300 jobs over a queue group of 3 -> {shares:?} (each job once)");

    // 8. Request/reply, and "no responders" at once when nobody listens.
    let mut service = bus.subscribe("time.now").await?;
    let responder = bus.clone();
    tokio::spawn(async move {
        while let Some(request) = service.next().await {
            if let Some(reply) = request.reply {
                responder.publish(reply, "it is noon").await.ok();
            }
        }
    });
    let answer = bus.request("time.now", "").await?;
    println!(
        "8. request time.now -> {:?}",
        String::from_utf8_lossy(&answer.payload)
    );
    let nobody = bus.request("time.later", "").await.unwrap_err();
    println!("   request time.later -> {nobody}");
    Ok(())
}
