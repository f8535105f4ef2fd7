#[courier::service]
trait Many {
    async fn eight(&self, a: u8, b: u16, c: u32, d: u64, e: i64, f: String, g: Vec<u8>, h: (bool, char)) -> String;
}

struct Impl;
impl Many for Impl {
    async fn eight(&self, a: u8, b: u16, c: u32, d: u64, e: i64, f: String, g: Vec<u8>, h: (bool, char)) -> String {
        format!("{a}{b}{c}{d}{e}{f}{g:?}{h:?}")
    }
}

fn main() {
    let _ = ManyService::new(Impl);
}
