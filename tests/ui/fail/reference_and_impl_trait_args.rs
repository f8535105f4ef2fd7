#[courier::service]
trait Text {
    async fn shout(&self, text: &str) -> String;
    async fn sum(&self, values: &[u64]) -> u64;
    async fn show(&self, value: impl std::fmt::Display) -> String;
    async fn leak(&self) -> &'static str;
}

fn main() {}
