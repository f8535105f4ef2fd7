#[courier::service]
trait Gated {
    /// Always there.
    async fn shown(&self) -> u8;
    /// Compiled out: no trait method, no client method, no dispatch arm, no constant.
    #[cfg(any())]
    async fn hidden(&self) -> u8;
}

struct Impl;
impl Gated for Impl {
    async fn shown(&self) -> u8 {
        1
    }
}

fn main() {
    assert_eq!(GatedClient::METHODS, &["Gated.shown"]);
    let _ = GatedService::new(Impl);
}
