#[courier::service]
trait Echo {
    fn echo(&self, text: String) -> String;
}

fn main() {}
