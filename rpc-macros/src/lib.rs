//! The `#[service]` attribute of courier. Use it through the facade, as
//! `#[courier::service]`; the documentation with a complete example is there.
//!
//! The macro works in three steps, one module each:
//! 1. `parse`: the attribute's arguments and the trait, as syn sees them;
//! 2. `validate`: checks every rule, collecting all errors (each pointing at the offending
//!    tokens and saying what to write instead), and builds the `model`;
//! 3. `expand`: generates the trait, the client stub and the server dispatch from the model.

#![forbid(unsafe_code)]

mod expand;
mod model;
mod parse;
mod validate;

use proc_macro::TokenStream;

/// Turns a trait of `async fn` methods into a courier service: the trait (with `Send`
/// futures), a typed `<Trait>Client` and a `<Trait>Service` server dispatch. See
/// `courier::service` for the documentation.
#[proc_macro_attribute]
pub fn service(args: TokenStream, input: TokenStream) -> TokenStream {
    let parsed = match parse::parse(args.into(), input.into()) {
        Ok(parsed) => parsed,
        Err(e) => return e.to_compile_error().into(),
    };
    match validate::validate(parsed) {
        Ok(model) => expand::expand(&model).into(),
        Err(e) => e.to_compile_error().into(),
    }
}
