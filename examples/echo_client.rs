//! An `Echo` client. Run `echo_server` first, then
//! `cargo run --example echo_client -- 127.0.0.1:7000 [text]`.

#[path = "echo/service.rs"]
mod echo_service;

use courier::transport::TcpConnector;
use courier::{Client, ClientConfig};
use echo_service::EchoClient;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7000".to_string());
    let text = args.next().unwrap_or_else(|| "hello".to_string());

    let client = Client::connect(TcpConnector::new(addr.as_str()), ClientConfig::default()).await?;
    let echo = EchoClient::new(client);
    println!("echo({text:?})  -> {:?}", echo.echo(text.clone()).await?);
    match echo.shout(text).await? {
        Ok(loud) => println!("shout         -> {loud:?}"),
        Err(e) => println!("shout         -> service error {e:?}"),
    }
    match echo.shout(String::new()).await? {
        Ok(loud) => println!("shout(\"\")     -> {loud:?}"),
        Err(e) => println!("shout(\"\")     -> service error {e:?}"),
    }
    Ok(())
}
