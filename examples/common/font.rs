//! Text for the examples' PNG heatmaps: plotters' pure-Rust `ab_glyph` backend needs a font
//! file registered at run time (no fontconfig, so the examples build everywhere).

use std::path::PathBuf;

use plotters::style::FontStyle;

/// Registers a TrueType font as "sans-serif" for plotters' ab_glyph text; false when none found.
pub fn load_font() -> bool {
    let mut candidates: Vec<PathBuf> = std::env::var_os("NNSIGHT_FONT").map(PathBuf::from).into_iter().collect();
    candidates.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "/Library/Fonts/Arial.ttf",
        ]
        .map(PathBuf::from),
    );
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            // plotters keeps fonts for the whole program: leak the bytes once.
            if plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok() {
                return true;
            }
        }
    }
    false
}
