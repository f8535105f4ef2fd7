//! What users see from `#[courier::service]`: the forms it accepts, and the compile errors
//! for the forms it rejects (`tests/ui/fail/*.stderr` pin each message).
//!
//! The snapshots are rustc's output with the default features, which the README's test
//! command builds. With `--features nats`, rustc spells `Send` as `std::marker::Send` in
//! one message (another crate in the graph then has an item named `Send`), so the
//! compile-fail cases only run without that feature; the pass cases run always.

#[test]
fn service_macro_ui() {
    let cases = trybuild::TestCases::new();
    if cfg!(not(feature = "nats")) {
        cases.compile_fail("tests/ui/fail/*.rs");
    }
    cases.pass("tests/ui/pass/*.rs");
}
