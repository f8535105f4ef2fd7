#![no_implicit_prelude]

#[::courier::service]
trait Hygienic {
    async fn echo(&self, text: ::std::string::String) -> ::std::string::String;
    async fn count(&self, ctx: &::courier::CallContext, items: ::std::vec::Vec<u8>) -> ::core::result::Result<u64, ::std::string::String>;
    async fn unit(&self);
}

struct Impl;
impl Hygienic for Impl {
    async fn echo(&self, text: ::std::string::String) -> ::std::string::String {
        text
    }
    async fn count(&self, _ctx: &::courier::CallContext, items: ::std::vec::Vec<u8>) -> ::core::result::Result<u64, ::std::string::String> {
        ::core::result::Result::Ok(items.len() as u64)
    }
    async fn unit(&self) {}
}

fn main() {
    let _ = HygienicService::new(Impl);
}
