mod deps {
    pub use ::courier as rpc;
}

#[courier::service(crate = "crate::deps::rpc")]
trait Renamed {
    async fn ping(&self) -> u8;
}

struct Impl;
impl Renamed for Impl {
    async fn ping(&self) -> u8 {
        1
    }
}

fn main() {
    let _ = RenamedService::new(Impl);
}
