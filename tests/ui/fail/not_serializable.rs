struct Opaque;

#[courier::service]
trait Vault {
    async fn store(&self, item: Opaque) -> u64;
    async fn fetch(&self, id: u64) -> std::rc::Rc<u64>;
}

fn main() {}
