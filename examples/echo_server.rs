//! An `Echo` server over TCP. Run: `cargo run --example echo_server -- 127.0.0.1:7000`,
//! then `cargo run --example echo_client -- 127.0.0.1:7000` in another terminal.
//! Ctrl-C shuts it down gracefully.

#[path = "echo/service.rs"]
mod echo_service;

use courier::{Server, ServerConfig};
use echo_service::{Echo, EchoError};

struct EchoImpl;

impl Echo for EchoImpl {
    async fn echo(&self, text: String) -> String {
        text
    }

    async fn shout(&self, text: String) -> Result<String, EchoError> {
        if text.is_empty() {
            Err(EchoError::Empty)
        } else {
            Ok(text.to_uppercase())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("echo server listening on {}", listener.local_addr()?);
    let server = Server::new(ServerConfig::default()).add_service(EchoImpl.into_service());
    server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
