#[courier::service]
trait Forty {
    async fn m00(&self, x: u64) -> u64;
    async fn m01(&self, x: u64) -> u64;
    async fn m02(&self, x: u64) -> u64;
    async fn m03(&self, x: u64) -> u64;
    async fn m04(&self, x: u64) -> u64;
    async fn m05(&self, x: u64) -> u64;
    async fn m06(&self, x: u64) -> u64;
    async fn m07(&self, x: u64) -> u64;
    async fn m08(&self, x: u64) -> u64;
    async fn m09(&self, x: u64) -> u64;
    async fn m10(&self, x: u64) -> u64;
    async fn m11(&self, x: u64) -> u64;
    async fn m12(&self, x: u64) -> u64;
    async fn m13(&self, x: u64) -> u64;
    async fn m14(&self, x: u64) -> u64;
    async fn m15(&self, x: u64) -> u64;
    async fn m16(&self, x: u64) -> u64;
    async fn m17(&self, x: u64) -> u64;
    async fn m18(&self, x: u64) -> u64;
    async fn m19(&self, x: u64) -> u64;
    async fn m20(&self, x: u64) -> u64;
    async fn m21(&self, x: u64) -> u64;
    async fn m22(&self, x: u64) -> u64;
    async fn m23(&self, x: u64) -> u64;
    async fn m24(&self, x: u64) -> u64;
    async fn m25(&self, x: u64) -> u64;
    async fn m26(&self, x: u64) -> u64;
    async fn m27(&self, x: u64) -> u64;
    async fn m28(&self, x: u64) -> u64;
    async fn m29(&self, x: u64) -> u64;
    async fn m30(&self, x: u64) -> u64;
    async fn m31(&self, x: u64) -> u64;
    async fn m32(&self, x: u64) -> u64;
    async fn m33(&self, x: u64) -> u64;
    async fn m34(&self, x: u64) -> u64;
    async fn m35(&self, x: u64) -> u64;
    async fn m36(&self, x: u64) -> u64;
    async fn m37(&self, x: u64) -> u64;
    async fn m38(&self, x: u64) -> u64;
    async fn m39(&self, x: u64) -> u64;
}

struct Impl;
impl Forty for Impl {
    async fn m00(&self, x: u64) -> u64 { x + 0 }
    async fn m01(&self, x: u64) -> u64 { x + 1 }
    async fn m02(&self, x: u64) -> u64 { x + 2 }
    async fn m03(&self, x: u64) -> u64 { x + 3 }
    async fn m04(&self, x: u64) -> u64 { x + 4 }
    async fn m05(&self, x: u64) -> u64 { x + 5 }
    async fn m06(&self, x: u64) -> u64 { x + 6 }
    async fn m07(&self, x: u64) -> u64 { x + 7 }
    async fn m08(&self, x: u64) -> u64 { x + 8 }
    async fn m09(&self, x: u64) -> u64 { x + 9 }
    async fn m10(&self, x: u64) -> u64 { x + 10 }
    async fn m11(&self, x: u64) -> u64 { x + 11 }
    async fn m12(&self, x: u64) -> u64 { x + 12 }
    async fn m13(&self, x: u64) -> u64 { x + 13 }
    async fn m14(&self, x: u64) -> u64 { x + 14 }
    async fn m15(&self, x: u64) -> u64 { x + 15 }
    async fn m16(&self, x: u64) -> u64 { x + 16 }
    async fn m17(&self, x: u64) -> u64 { x + 17 }
    async fn m18(&self, x: u64) -> u64 { x + 18 }
    async fn m19(&self, x: u64) -> u64 { x + 19 }
    async fn m20(&self, x: u64) -> u64 { x + 20 }
    async fn m21(&self, x: u64) -> u64 { x + 21 }
    async fn m22(&self, x: u64) -> u64 { x + 22 }
    async fn m23(&self, x: u64) -> u64 { x + 23 }
    async fn m24(&self, x: u64) -> u64 { x + 24 }
    async fn m25(&self, x: u64) -> u64 { x + 25 }
    async fn m26(&self, x: u64) -> u64 { x + 26 }
    async fn m27(&self, x: u64) -> u64 { x + 27 }
    async fn m28(&self, x: u64) -> u64 { x + 28 }
    async fn m29(&self, x: u64) -> u64 { x + 29 }
    async fn m30(&self, x: u64) -> u64 { x + 30 }
    async fn m31(&self, x: u64) -> u64 { x + 31 }
    async fn m32(&self, x: u64) -> u64 { x + 32 }
    async fn m33(&self, x: u64) -> u64 { x + 33 }
    async fn m34(&self, x: u64) -> u64 { x + 34 }
    async fn m35(&self, x: u64) -> u64 { x + 35 }
    async fn m36(&self, x: u64) -> u64 { x + 36 }
    async fn m37(&self, x: u64) -> u64 { x + 37 }
    async fn m38(&self, x: u64) -> u64 { x + 38 }
    async fn m39(&self, x: u64) -> u64 { x + 39 }
}

fn main() {
    assert_eq!(FortyClient::METHODS.len(), 40);
    assert_eq!(FortyClient::M39, "Forty.m39");
    let _ = FortyService::new(Impl);
}
