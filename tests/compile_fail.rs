//! What users see when intervention code is wrong: each `tests/ui/*.rs` must fail to compile
//! with the message and span in its `.stderr` (read them as a user would).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}

/// The messages speak of the user's code only: no item the macro generates or the runtime
/// keeps for it appears in any expected `.stderr`.
#[test]
fn ui_messages_name_no_internal_items() {
    let internal = ["CapturedRef", "CapturedCopy", "__nn_", "__private", "private::", "At<", "Param<", "Owned<", "Own<", "IndexPart"];
    let mut checked = 0;
    for entry in std::fs::read_dir("tests/ui").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "stderr") {
            let text = std::fs::read_to_string(&path).unwrap();
            for word in internal {
                assert!(!text.contains(word), "{} names the internal `{word}`:\n{text}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} .stderr files");
}
