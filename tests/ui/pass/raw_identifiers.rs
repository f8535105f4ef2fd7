#[courier::service]
trait r#Keywords {
    async fn r#type(&self, r#in: u8) -> u8;
    async fn r#match(&self);
}

struct Impl;
impl r#Keywords for Impl {
    async fn r#type(&self, r#in: u8) -> u8 {
        r#in
    }
    async fn r#match(&self) {}
}

fn main() {
    assert_eq!(KeywordsClient::TYPE, "Keywords.type");
    assert_eq!(KeywordsClient::MATCH, "Keywords.match");
    let _ = KeywordsService::new(Impl);
}
