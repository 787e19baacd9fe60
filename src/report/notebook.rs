//! How tables and plots show in notebooks: a DataFrame as an HTML table (its first and last
//! rows, its shape), a plot's PNG as base64, and evcxr's display convention so that a Rust
//! notebook (evcxr) shows them as richly as the Rhai kernel does.

use std::fmt::Write;

use polars::prelude::{AnyValue, DataFrame};

use super::Plot;

/// Tables up to this many rows show whole; longer ones show their first and last
/// `SHOWN_ROWS / 2` rows.
pub const SHOWN_ROWS: usize = 20;

/// Cells longer than this many characters are cut, with an ellipsis.
const CELL_CHARS: usize = 100;

/// The table as an HTML `<table>`: a header row of column names, a row of their types,
/// the first and last rows (all of them for short tables) and the shape.
pub fn table_html(df: &DataFrame) -> String {
    let (height, width) = df.shape();
    let rows: Vec<Option<usize>> = if height <= SHOWN_ROWS {
        (0..height).map(Some).collect()
    } else {
        let half = SHOWN_ROWS / 2;
        (0..half)
            .map(Some)
            .chain(std::iter::once(None))
            .chain((height - half..height).map(Some))
            .collect()
    };
    let mut html = String::new();
    let _ = write!(
        html,
        "<div><small>shape: ({height}, {width})</small>\
         <table border=\"1\" class=\"dataframe\"><thead><tr>"
    );
    for column in df.columns() {
        let _ = write!(html, "<th>{}</th>", escape(column.name()));
    }
    html.push_str("</tr><tr>");
    for column in df.columns() {
        let _ = write!(
            html,
            "<td><i>{}</i></td>",
            escape(&column.dtype().to_string())
        );
    }
    html.push_str("</tr></thead><tbody>");
    for row in rows {
        html.push_str("<tr>");
        for column in df.columns() {
            let text = match row {
                Some(i) => column.get(i).map(|v| cell_text(&v)).unwrap_or_default(),
                None => "…".to_string(),
            };
            let _ = write!(html, "<td>{}</td>", escape(&text));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table></div>");
    html
}

/// One cell as text: strings unquoted, lists as `[a, b]`, cut at `CELL_CHARS` characters.
fn cell_text(value: &AnyValue) -> String {
    let text = match value {
        AnyValue::Null => "null".to_string(),
        AnyValue::String(s) => s.to_string(),
        AnyValue::StringOwned(s) => s.to_string(),
        AnyValue::List(series) => {
            let items: Vec<String> = series.iter().map(|v| cell_text(&v)).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    };
    if text.chars().count() > CELL_CHARS {
        let cut: String = text.chars().take(CELL_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// `text` with `&`, `<`, `>` and `"` escaped for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (RFC 4648, with padding), as notebooks embed pictures.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Plot {
    /// The PNG picture in base64, as a notebook's `image/png` output carries it.
    pub fn png_base64(&self) -> String {
        base64(self.png())
    }

    /// The picture's width and height in pixels, read from the PNG header.
    pub fn size(&self) -> Option<(u32, u32)> {
        let png = self.png();
        let dim = |at: usize| {
            png.get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        Some((dim(16)?, dim(20)?))
    }

    /// Shows the chart in an evcxr (Rust) notebook, as PNG and SVG.
    pub fn evcxr_display(&self) {
        print!("{}", self.evcxr_text());
    }

    fn evcxr_text(&self) -> String {
        format!(
            "{}{}",
            evcxr_content("image/png", &self.png_base64()),
            evcxr_content("image/svg+xml", self.svg())
        )
    }
}

/// Shows a polars DataFrame in an evcxr (Rust) notebook as an HTML table and as text.
/// Bring the trait into scope (`use rlvr::report::notebook::EvcxrTable;`) and a cell ending
/// in a DataFrame renders as a table.
pub trait EvcxrTable {
    /// Prints the table in evcxr's display convention.
    fn evcxr_display(&self);
}

impl EvcxrTable for DataFrame {
    fn evcxr_display(&self) {
        print!("{}", evcxr_table(self));
    }
}

fn evcxr_table(df: &DataFrame) -> String {
    format!(
        "{}{}",
        evcxr_content("text/html", &table_html(df)),
        evcxr_content("text/plain", &format!("{df}"))
    )
}

/// One block of evcxr's display convention: evcxr turns what a value prints between these
/// markers into an output of that MIME type.
fn evcxr_content(mime: &str, content: &str) -> String {
    format!("EVCXR_BEGIN_CONTENT {mime}\n{content}\nEVCXR_END_CONTENT\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input}");
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn short_tables_show_every_row_with_types_and_shape() {
        let df = df!("subject" => ["anatomy", "<virology>"], "n" => [3i64, 4]).unwrap();
        let html = table_html(&df);
        assert!(html.contains("shape: (2, 2)"), "{html}");
        assert!(html.contains("<th>subject</th><th>n</th>"), "{html}");
        assert!(
            html.contains("<i>str</i>") && html.contains("<i>i64</i>"),
            "{html}"
        );
        assert!(
            html.contains("<td>&lt;virology&gt;</td><td>4</td>"),
            "{html}"
        );
        assert!(!html.contains('…'));
    }

    #[test]
    fn long_tables_show_first_and_last_rows() {
        let df = df!("i" => (0..100i64).collect::<Vec<_>>()).unwrap();
        let html = table_html(&df);
        assert!(html.contains("shape: (100, 1)"));
        assert!(html.contains("<td>0</td>") && html.contains("<td>9</td>"));
        assert!(html.contains("<td>…</td>"));
        assert!(html.contains("<td>90</td>") && html.contains("<td>99</td>"));
        assert!(!html.contains("<td>10</td>") && !html.contains("<td>89</td>"));
    }

    #[test]
    fn list_cells_and_long_text_are_readable() {
        let long = "x".repeat(300);
        let df = df!("q" => [long.as_str()]).unwrap();
        let html = table_html(&df);
        assert!(html.contains(&format!("{}…", "x".repeat(CELL_CHARS - 1))));
        let choices = Series::new("choices".into(), [Series::new("".into(), ["a", "b"])]);
        let df = DataFrame::new(1, vec![choices.into()]).unwrap();
        assert!(table_html(&df).contains("<td>[a, b]</td>"));
    }

    #[test]
    fn evcxr_blocks_carry_each_mime_type() {
        let df = df!("n" => [1i64]).unwrap();
        let text = evcxr_table(&df);
        assert!(
            text.starts_with("EVCXR_BEGIN_CONTENT text/html\n<div>"),
            "{text}"
        );
        assert!(text.contains("EVCXR_END_CONTENT\nEVCXR_BEGIN_CONTENT text/plain\nshape: (1, 1)"));
        assert!(text.ends_with("EVCXR_END_CONTENT\n"));
        let plot = Plot::new(vec![1, 2, 3], "<svg/>".into());
        assert_eq!(
            plot.evcxr_text(),
            "EVCXR_BEGIN_CONTENT image/png\nAQID\nEVCXR_END_CONTENT\n\
             EVCXR_BEGIN_CONTENT image/svg+xml\n<svg/>\nEVCXR_END_CONTENT\n"
        );
    }

    #[test]
    fn plot_reports_its_png_size() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend(800u32.to_be_bytes());
        png.extend(560u32.to_be_bytes());
        let plot = Plot::new(png, "<svg/>".into());
        assert_eq!(plot.size(), Some((800, 560)));
    }
}
