//! The fonts embedded in the binary: DejaVu Sans for Latin text, a subset of WenQuanYi Micro
//! Hei for labels with Chinese, Japanese or Korean characters (CMMLU subject names). Nothing
//! is read from the system at run time. `assets/fonts/README.md` says where the files come
//! from, how the CJK subset is made, and why every glyph carries a dot at its origin
//! (plotters' rasteriser ignores left side bearings).

use std::sync::Once;

use plotters::style::{register_font, FontStyle};

/// The family name of DejaVu Sans. SVG output writes it as the `font-family` list, so a
/// viewer without DejaVu falls back to its own sans-serif.
pub const LATIN: &str = "DejaVu Sans, sans-serif";

/// The family name of the CJK font, also a CSS list for SVG viewers.
pub const CJK: &str =
    "WenQuanYi Micro Hei, Noto Sans CJK SC, Microsoft YaHei, PingFang SC, sans-serif";

const DEJAVU: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const DEJAVU_BOLD: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-Bold.ttf");
const WENQUANYI: &[u8] = include_bytes!("../../assets/fonts/WenQuanYiMicroHei-subset.ttf");

/// Registers the embedded fonts with plotters; later calls do nothing.
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fonts = [
            (LATIN, FontStyle::Normal, DEJAVU),
            (LATIN, FontStyle::Bold, DEJAVU_BOLD),
            (CJK, FontStyle::Normal, WENQUANYI),
        ];
        for (family, style, bytes) in fonts {
            if register_font(family, style, bytes).is_err() {
                panic!("the embedded font {family} is not a valid TrueType file");
            }
        }
    });
}

/// The family that draws `text`: the CJK font when it holds a character DejaVu Sans lacks
/// (Han, kana, hangul, full-width forms), else DejaVu Sans. The CJK font also has Latin
/// letters, so mixed labels such as "解剖学 (anatomy)" draw in one font.
pub fn family_for(text: &str) -> &'static str {
    if text.chars().any(is_cjk) {
        CJK
    } else {
        LATIN
    }
}

/// Characters of the CJK blocks, which DejaVu Sans does not cover.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF      // Hangul Jamo
        | 0x2E80..=0x2FDF    // CJK radicals, Kangxi radicals
        | 0x3000..=0x9FFF    // CJK punctuation, kana, CJK unified ideographs and extension A
        | 0xA960..=0xA97F    // Hangul Jamo extended
        | 0xAC00..=0xD7FF    // Hangul syllables
        | 0xF900..=0xFAFF    // CJK compatibility ideographs
        | 0xFE30..=0xFE4F    // CJK compatibility forms
        | 0xFF00..=0xFFEF    // half-width and full-width forms
        | 0x20000..=0x3FFFF) // CJK extensions B and later
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_labels_use_the_cjk_font_and_latin_ones_dejavu() {
        assert_eq!(family_for("解剖学"), CJK);
        assert_eq!(family_for("解剖学 (anatomy)"), CJK);
        assert_eq!(family_for("professional_medicine ± 0.5"), LATIN);
        assert_eq!(family_for("Ä – ü"), LATIN);
    }
}
