#[courier::service]
trait Once {
    async fn consume(self) -> u64;
    async fn nothing() -> u64;
}

fn main() {}
