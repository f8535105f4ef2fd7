#[courier::service]
trait Messy<T> {
    fn sync(&self);
    async fn mutate(&mut self, x: &u8);
    const LIMIT: u32;
}

fn main() {}
