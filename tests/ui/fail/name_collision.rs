#[courier::service]
trait Factory {
    async fn new(&self) -> u64;
    async fn with_timeout(&self, ms: u64);
}

fn main() {}
