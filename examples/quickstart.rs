//! courier in one process, no setup: a service defined as a trait, served, called; then a
//! deadline, a typed application error, metadata and a graceful shutdown.
//!
//! Run it with `cargo run --example quickstart`.

use std::time::Duration;

use courier::transport::TcpConnector;
use courier::{CallContext, Client, ClientConfig, RpcError, Server, ServerConfig};
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
    Ok(())
}
