use courier::{Client, ClientConfig, Server, ServerConfig};

#[courier::service]
trait Greeter {
    async fn greet(&self, name: String) -> String;
}

#[courier::service]
trait Adder {
    async fn add(&self, a: u32, b: u32) -> u32;
}

struct Both;
impl Greeter for std::sync::Arc<Both> {
    async fn greet(&self, name: String) -> String {
        format!("hello {name}")
    }
}
impl Adder for std::sync::Arc<Both> {
    async fn add(&self, a: u32, b: u32) -> u32 {
        a + b
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let both = std::sync::Arc::new(Both);
    let (listener, connector) = courier::transport::memory::listen();
    let server = Server::new(ServerConfig::default())
        .add_service(GreeterService::new(both.clone()))
        .add_service(AdderService::new(both));
    tokio::spawn(server.serve(listener, std::future::pending()));
    let client = Client::connect(connector, ClientConfig::default()).await.unwrap();
    assert_eq!(GreeterClient::new(client.clone()).greet("ann".into()).await.unwrap(), "hello ann");
    assert_eq!(AdderClient::new(client).add(2, 3).await.unwrap(), 5);
}
