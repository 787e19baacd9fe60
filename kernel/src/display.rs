//! MIME bundles: what a value looks like in a notebook, chosen by its kind — a table as HTML
//! and text, a plot as PNG and SVG (with a text stand-in), anything else as text.

use jupyter_protocol::{Media, MediaType};

use rlvr::report::notebook::table_html;
use rlvr::script::Shown;

/// The bundle for a value, or `None` when there is nothing to show (the unit value).
pub fn bundle(shown: Shown) -> Option<Media> {
    let content = match shown {
        Shown::Nothing => return None,
        Shown::Table(df) => vec![
            MediaType::Plain(format!("{df}")),
            MediaType::Html(table_html(&df)),
        ],
        Shown::Plot(plot) => {
            let text = match plot.size() {
                Some((w, h)) => format!("Plot ({w}×{h} px)"),
                None => "Plot".to_string(),
            };
            vec![
                MediaType::Plain(text),
                MediaType::Png(plot.png_base64()),
                MediaType::Svg(plot.svg().to_string()),
            ]
        }
        Shown::Text(text) => vec![MediaType::Plain(text)],
    };
    Some(Media::new(content))
}

/// The `text/plain` entry of a bundle, as history keeps outputs.
pub fn plain_text(media: &Media) -> Option<&str> {
    media.content.iter().find_map(|m| match m {
        MediaType::Plain(text) => Some(text.as_str()),
        _ => None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use plotters::prelude::*;
    use polars::prelude::*;
    use rlvr::report::Plot;

    /// A real chart drawn with plotters, as PNG and SVG.
    pub(crate) fn test_plot() -> Plot {
        let path =
            std::env::temp_dir().join(format!("rlvr-kernel-plot-{}.png", std::process::id()));
        {
            let root = BitMapBackend::new(&path, (120, 80)).into_drawing_area();
            root.fill(&WHITE).unwrap();
            root.draw(&Rectangle::new([(10, 10), (60, 70)], BLUE.filled()))
                .unwrap();
            root.present().unwrap();
        }
        let png = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (120, 80)).into_drawing_area();
            root.draw(&Rectangle::new([(10, 10), (60, 70)], BLUE.filled()))
                .unwrap();
            root.present().unwrap();
        }
        Plot::new(png, svg)
    }

    fn mimes(media: &Media) -> Vec<&str> {
        media.content.iter().map(|m| m.mime_type()).collect()
    }

    #[test]
    fn tables_show_as_html_and_text() {
        let df = df!("subject" => ["anatomy", "virology"], "n" => [3i64, 4]).unwrap();
        let media = bundle(Shown::Table(df)).unwrap();
        assert_eq!(mimes(&media), ["text/plain", "text/html"]);
        assert!(plain_text(&media).unwrap().contains("shape: (2, 2)"));
        let html = match &media.content[1] {
            MediaType::Html(html) => html,
            _ => unreachable!(),
        };
        assert!(html.contains("<table") && html.contains("<td>virology</td>"));
    }

    #[test]
    fn plots_show_as_png_and_svg() {
        let plot = test_plot();
        let media = bundle(Shown::Plot(plot.clone())).unwrap();
        assert_eq!(mimes(&media), ["text/plain", "image/png", "image/svg+xml"]);
        assert_eq!(plain_text(&media), Some("Plot (120×80 px)"));
        match (&media.content[1], &media.content[2]) {
            (MediaType::Png(b64), MediaType::Svg(svg)) => {
                assert!(b64.starts_with("iVBORw0KGgo"), "PNG magic in base64");
                assert_eq!(b64, &plot.png_base64());
                assert!(svg.contains("<svg") && svg.contains("<rect"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unit_shows_nothing_and_text_shows_as_text() {
        assert!(bundle(Shown::Nothing).is_none());
        let media = bundle(Shown::Text("42".into())).unwrap();
        assert_eq!(plain_text(&media), Some("42"));
    }
}
