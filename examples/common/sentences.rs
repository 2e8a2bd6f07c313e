//! Sentences shared by `examples/memory_report.rs` and `benches/interleave.rs`.
#![allow(dead_code)]

/// The two reference sentences of `tests/fixtures/minilm.json`.
pub const PARIS: &str = "The Eiffel Tower is in the city of Paris.";
pub const ROME: &str = "The Colosseum is in the city of Rome.";

/// 32 sentences: the two reference sentences first, then landmark/city sentences of varied
/// length (so the batch is padded, as real batches are).
pub fn sentences32() -> Vec<String> {
    const PAIRS: [(&str, &str); 16] = [
        ("Eiffel Tower", "Paris"),
        ("Colosseum", "Rome"),
        ("Brandenburg Gate", "Berlin"),
        ("Sagrada Familia", "Barcelona"),
        ("Big Ben", "London"),
        ("Statue of Liberty", "New York"),
        ("Golden Gate Bridge", "San Francisco"),
        ("Forbidden City", "Beijing"),
        ("Acropolis", "Athens"),
        ("Hagia Sophia", "Istanbul"),
        ("Kremlin", "Moscow"),
        ("Sydney Opera House", "Sydney"),
        ("CN Tower", "Toronto"),
        ("Space Needle", "Seattle"),
        ("Alhambra", "Granada"),
        ("Atomium", "Brussels"),
    ];
    let mut v: Vec<String> = PAIRS.iter().map(|(a, b)| format!("The {a} is in the city of {b}.")).collect();
    v.extend(PAIRS.iter().map(|(a, b)| format!("Every summer many people visit the {a} when they travel to {b}.")));
    assert_eq!((v[0].as_str(), v[1].as_str()), (PARIS, ROME));
    v
}
