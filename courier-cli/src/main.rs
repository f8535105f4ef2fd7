//! `courier`: the command-line tool of the courier RPC framework and message bus.
//!
//! ```text
//! courier broker --listen 127.0.0.1:7222 --token s3cret
//! ```
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`).

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mq_transport::{Broker, BrokerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "courier",
    version,
    about = "courier RPC framework and message bus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a message broker until Ctrl-C, then shuts down gracefully.
    Broker(BrokerArgs),
}

#[derive(Debug, Args)]
struct BrokerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7222")]
    listen: SocketAddr,
    /// Largest payload a publish may carry, in bytes.
    #[arg(long, default_value_t = BrokerConfig::default().max_payload)]
    max_payload: usize,
    /// Connections served at once.
    #[arg(long, default_value_t = BrokerConfig::default().max_connections)]
    max_connections: usize,
    /// Subscriptions per connection.
    #[arg(long, default_value_t = BrokerConfig::default().max_subscriptions)]
    max_subscriptions: usize,
    /// Bytes queued for one connection before it is cut off as a slow consumer.
    #[arg(long, default_value_t = BrokerConfig::default().connection.max_queued_bytes)]
    max_queued_bytes: usize,
    /// Require this token from clients.
    #[arg(long)]
    token: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Broker(args) => broker(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("courier: error: {message}");
    ExitCode::FAILURE
}

async fn broker(args: BrokerArgs) -> Result<(), String> {
    let mut config = BrokerConfig::default();
    config.max_payload = args.max_payload;
    config.max_connections = args.max_connections;
    config.max_subscriptions = args.max_subscriptions;
    config.connection.max_queued_bytes = args.max_queued_bytes;
    config.token = args.token;
    if config.max_payload + 64 * 1024 > config.connection.max_frame_len {
        config.connection.max_frame_len = config.max_payload + 64 * 1024;
    }
    let broker = Broker::bind_with(args.listen, config)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    println!("courier broker listening on {}", broker.local_addr());
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| format!("cannot wait for Ctrl-C: {e}"))?;
    tracing::info!("Ctrl-C: shutting down");
    broker.shutdown().await;
    Ok(())
}
