//! What users see from `#[courier::service]`: the forms it accepts, and the compile errors
//! for the forms it rejects (`tests/ui/fail/*.stderr` pin each message).

#[test]
fn service_macro_ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
    cases.pass("tests/ui/pass/*.rs");
}
