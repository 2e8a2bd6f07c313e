//! What users see when intervention code is wrong: each `tests/ui/*.rs` must fail to compile
//! with the message and span in its `.stderr` (read them as a user would).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
