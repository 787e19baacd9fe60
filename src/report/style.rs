//! The one look of every chart: palette, text sizes, line colours, number formats.

use plotters::style::{FontDesc, FontFamily, FontStyle, RGBColor, TextStyle};

use super::fonts;

/// Tableau 10, a palette whose colours stay apart for most colour-blind readers; groups
/// (models, runs) take its colours in order.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xBA, 0xB0, 0xAC),
];

/// The colour of the `i`-th group (the palette repeats after ten).
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Text, axis labels and whiskers.
pub const INK: RGBColor = RGBColor(0x26, 0x26, 0x26);
/// Tick labels and secondary text.
pub const MUTED: RGBColor = RGBColor(0x55, 0x55, 0x55);
/// Axis lines.
pub const AXIS: RGBColor = RGBColor(0x88, 0x88, 0x88);
/// Grid lines.
pub const GRID: RGBColor = RGBColor(0xE3, 0xE3, 0xE3);

/// Chart titles.
pub const TITLE_SIZE: f64 = 24.0;
/// Axis descriptions, legend entries and category labels.
pub const LABEL_SIZE: f64 = 17.0;
/// Tick labels.
pub const TICK_SIZE: f64 = 15.0;
/// Numbers written on bars.
pub const VALUE_SIZE: f64 = 13.0;

/// Default canvas width in pixels.
pub const WIDTH: u32 = 960;
/// Default canvas height in pixels.
pub const HEIGHT: u32 = 600;
/// Blank space at the canvas edge.
pub const MARGIN: i32 = 16;

/// A regular font of `size` for `text`, in the family that covers its characters.
pub fn font(text: &str, size: f64) -> FontDesc<'static> {
    fonts::register();
    FontDesc::new(
        FontFamily::Name(fonts::family_for(text)),
        size,
        FontStyle::Normal,
    )
}

/// A bold font of `size` for `text` (DejaVu Sans Bold; CJK text stays regular).
pub fn bold(text: &str, size: f64) -> FontDesc<'static> {
    fonts::register();
    FontDesc::new(
        FontFamily::Name(fonts::family_for(text)),
        size,
        FontStyle::Bold,
    )
}

/// A text style of `size` in `color` for `text`.
pub fn text_style(text: &str, size: f64, color: &RGBColor) -> TextStyle<'static> {
    font(text, size).color(color)
}

/// The width and height of `text` drawn in `font`, in pixels.
pub fn measure(text: &str, font: &FontDesc) -> (i32, i32) {
    font.box_size(text)
        .map(|(w, h)| (w as i32, h as i32))
        .unwrap_or((
            text.chars().count() as i32 * font.get_size() as i32 / 2,
            font.get_size() as i32,
        ))
}

/// The number of decimals that shows values of this size well: none for whole numbers
/// (counts), else 3 below 1, 2 below 10, 1 below 100, none above.
pub fn default_digits(values: impl Iterator<Item = f64>) -> usize {
    let values: Vec<f64> = values.collect();
    if values.iter().all(|v| v.fract() == 0.0) {
        return 0;
    }
    let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    match largest {
        m if m < 1.0 => 3,
        m if m < 10.0 => 2,
        m if m < 100.0 => 1,
        _ => 0,
    }
}

/// A tick value written without needless zeros (`0.5`, `10`, `0.25`).
pub fn tick(v: f64) -> String {
    let text = format!("{:.4}", v);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

/// Splits `text` into lines no wider than `width` pixels in `font`, breaking after spaces,
/// underscores, hyphens and slashes, or between CJK characters; a word wider than `width`
/// stays whole. At most `max_lines` lines; the last is cut with an ellipsis if text remains.
pub fn wrap(text: &str, font: &FontDesc, width: i32, max_lines: usize) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if fonts::is_cjk(c) && !current.is_empty() {
            pieces.push(std::mem::take(&mut current));
        }
        current.push(c);
        if matches!(c, ' ' | '_' | '-' | '/') || fonts::is_cjk(c) {
            pieces.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for piece in pieces {
        let candidate = format!("{line}{piece}");
        if line.is_empty() || measure(candidate.trim_end(), font).0 <= width {
            line = candidate;
        } else {
            lines.push(line.trim_end().to_string());
            line = piece;
        }
    }
    if !line.trim_end().is_empty() {
        lines.push(line.trim_end().to_string());
    }
    if lines.len() > max_lines.max(1) {
        let rest = lines.split_off(max_lines.max(1) - 1).join(" ");
        lines.push(ellipsize(&rest, font, width));
    }
    lines
}

/// `text` cut to fit `width` pixels in `font`, ending in an ellipsis when cut.
pub fn ellipsize(text: &str, font: &FontDesc, width: i32) -> String {
    if measure(text, font).0 <= width {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for keep in (1..chars.len()).rev() {
        let candidate: String = chars[..keep].iter().collect::<String>() + "…";
        if measure(&candidate, font).0 <= width {
            return candidate;
        }
    }
    "…".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_follow_the_values() {
        assert_eq!(default_digits([3.0, 12.0].into_iter()), 0);
        assert_eq!(default_digits([0.25, 0.5].into_iter()), 3);
        assert_eq!(default_digits([2.5, 7.25].into_iter()), 2);
        assert_eq!(default_digits([42.5].into_iter()), 1);
    }

    #[test]
    fn ticks_drop_needless_zeros() {
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(10.0), "10");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(-0.0), "0");
    }

    #[test]
    fn long_labels_wrap_at_underscores_and_are_cut_past_the_last_line() {
        let f = font("x", LABEL_SIZE);
        let lines = wrap("high_school_government_and_politics", &f, 120, 3);
        assert!(lines.len() > 1 && lines.len() <= 3, "{lines:?}");
        for line in &lines {
            assert!(
                measure(line, &f).0 <= 120 || !line.contains('_'),
                "{lines:?}"
            );
        }
        let cut = wrap("a b c d e f g h i j k l m n o p", &f, 30, 2);
        assert_eq!(cut.len(), 2);
        assert!(cut[1].ends_with('…'), "{cut:?}");
        assert_eq!(wrap("anatomy", &f, 500, 2), vec!["anatomy".to_string()]);
    }

    #[test]
    fn chinese_wraps_between_characters() {
        let f = font("中", LABEL_SIZE);
        let lines = wrap("高中政治与思想品德教育", &f, 60, 4);
        assert!(lines.len() >= 3, "{lines:?}");
    }
}
