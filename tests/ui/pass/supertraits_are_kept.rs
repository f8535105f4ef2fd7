/// A supertrait written on the service trait stays a supertrait.
#[courier::service]
trait Named: Clone + std::fmt::Debug {
    async fn name(&self) -> String;
}

#[derive(Clone, Debug)]
struct Impl;
impl Named for Impl {
    async fn name(&self) -> String {
        format!("{self:?}")
    }
}

// Compiles only if `Clone` and `Debug` are supertraits of `Named`.
fn copy_of<T: Named>(value: &T) -> (T, String) {
    (value.clone(), format!("{value:?}"))
}

fn main() {
    let _ = copy_of(&Impl);
    let _ = NamedService::new(Impl);
}
