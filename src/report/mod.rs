//! Reports: charts of results and training runs.

use std::path::Path;

/// A finished chart, held both as a PNG picture and as an SVG drawing, so a notebook can
/// show either and a script can save either.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    png: Vec<u8>,
    svg: String,
}

impl Plot {
    /// A chart from its two renderings.
    pub fn new(png: Vec<u8>, svg: String) -> Self {
        Plot { png, svg }
    }

    /// The PNG file's bytes.
    pub fn png(&self) -> &[u8] {
        &self.png
    }

    /// The SVG document.
    pub fn svg(&self) -> &str {
        &self.svg
    }

    /// Writes the chart to `path`: SVG when the extension is `.svg`, else PNG.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("svg"))
        {
            std::fs::write(path, &self.svg)
        } else {
            std::fs::write(path, &self.png)
        }
    }
}
