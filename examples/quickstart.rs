//! courier in one process, no setup: a service, a server, a client, and what happens when
//! calls succeed, miss their deadline, or name a method that does not exist.
//!
//! Run it with `cargo run --example quickstart`.
//!
//! The service's dispatch is written by hand here (`impl Service`); it is the shape the
//! `#[courier::service]` macro generates.

use std::time::Duration;

use bytes::Bytes;
use courier::transport::TcpConnector;
use courier::{
    Bincode, CallContext, CallFuture, CallOptions, Client, ClientConfig, Format, RpcError, Server,
    ServerConfig, Service, ServiceError,
};
use tokio_util::sync::CancellationToken;

/// `Greeter.greet(name) -> String` and `Greeter.slow(ms) -> ()`.
struct Greeter;

impl Service for Greeter {
    fn name(&self) -> &'static str {
        "Greeter"
    }

    fn call(&self, method: &str, ctx: CallContext, payload: Bytes) -> CallFuture {
        match method {
            "greet" => Box::pin(async move {
                let name: String = Bincode::decode(&payload).map_err(ServiceError::bad_request)?;
                let from = ctx
                    .metadata()
                    .get_str("x-client")
                    .unwrap_or("someone")
                    .to_string();
                Bincode::encode(&format!(
                    "Hello, {name}! (asked by {from} from {})",
                    ctx.peer()
                ))
                .map_err(ServiceError::encode)
            }),
            "slow" => Box::pin(async move {
                let ms: u64 = Bincode::decode(&payload).map_err(ServiceError::bad_request)?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Bincode::encode(&()).map_err(ServiceError::encode)
            }),
            other => ServiceError::unknown_method("Greeter", other).into_future(),
        }
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
    let server = Server::new(ServerConfig::default()).add_service(Greeter);
    let serving = tokio::spawn(server.serve(listener, stop.clone().cancelled_owned()));
    println!("server listening on {addr}");

    // A client with metadata sent on every call.
    let mut config = ClientConfig::default();
    config.metadata.insert("x-client", "quickstart");
    let client = Client::connect(TcpConnector::from(addr), config).await?;

    // 1. A call.
    let answer = client
        .call(
            "Greeter.greet",
            Bincode::encode("courier")?,
            &CallOptions::default(),
        )
        .await?;
    println!("1. greet        -> {}", Bincode::decode::<String>(&answer)?);

    // 2. Many calls in flight on the one connection.
    let calls = (0..1000).map(|i| {
        let client = client.clone();
        async move {
            client
                .call(
                    "Greeter.greet",
                    Bincode::encode(&format!("#{i}"))?,
                    &CallOptions::default(),
                )
                .await
                .map_err(Box::<dyn std::error::Error>::from)
        }
    });
    let answers = futures_util::future::try_join_all(calls).await?;
    println!(
        "2. 1000 calls in flight on one connection -> {} answers",
        answers.len()
    );

    // 3. A deadline: the call gives up after 50 ms and the server aborts the handler.
    let options = CallOptions::default().with_timeout(Duration::from_millis(50));
    match client
        .call("Greeter.slow", Bincode::encode(&5_000u64)?, &options)
        .await
    {
        Err(e @ RpcError::Timeout { .. }) => println!("3. slow (50 ms)  -> {e}"),
        other => println!("3. slow (50 ms)  -> unexpected: {other:?}"),
    }

    // 4. A method that does not exist: an error answer, and the connection stays usable.
    match client
        .call("Greeter.shout", Bytes::new(), &CallOptions::default())
        .await
    {
        Err(e @ RpcError::UnknownMethod { .. }) => println!("4. shout        -> {e}"),
        other => println!("4. shout        -> unexpected: {other:?}"),
    }
    let answer = client
        .call(
            "Greeter.greet",
            Bincode::encode("again")?,
            &CallOptions::default(),
        )
        .await?;
    println!("   greet        -> {}", Bincode::decode::<String>(&answer)?);

    // 5. Graceful shutdown: stop accepting, finish what is in flight, close.
    stop.cancel();
    serving.await??;
    println!("5. server shut down gracefully");
    Ok(())
}
