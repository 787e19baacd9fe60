//! Reports: charts of results and training runs, and the record of each run.
//!
//! Every chart is a function of a polars table and an options struct that returns a
//! [`Plot`] (PNG and SVG): [`bars`] (grouped bars with interval whiskers, e.g. accuracy per
//! category and model), [`radar`] (categories around a circle, one polygon per model),
//! [`curves`] (training metrics over steps, with exponential smoothing) and [`hist`] (a
//! histogram, e.g. judge pass rates). Fonts are embedded ([`fonts`]); the look is fixed in
//! [`style`]. [`RunRecord`] writes the manifest of a script run.

mod bars;
mod canvas;
mod curves;
pub mod fonts;
mod hist;
mod input;
pub mod notebook;
mod radar;
pub mod record;
pub mod style;

use std::path::{Path, PathBuf};

pub use bars::{bars, BarOptions};
pub use curves::{curves, CurveLayout, CurveOptions};
pub use hist::{hist, HistOptions};
pub use radar::{radar, RadarOptions};
pub use record::{RunRecord, RunStatus};

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

    /// Width and height in pixels, read from the PNG header.
    pub fn dimensions(&self) -> (u32, u32) {
        let word = |at: usize| {
            self.png
                .get(at..at + 4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        (word(16), word(20))
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

/// Title, axis descriptions and canvas size, shared by every chart. `None` picks the
/// chart's default (axis descriptions default to the column names).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    /// The title above the chart; an empty string draws none.
    pub title: Option<String>,
    /// The description of the horizontal axis.
    pub x_label: Option<String>,
    /// The description of the vertical axis.
    pub y_label: Option<String>,
    /// Canvas width in pixels.
    pub width: Option<u32>,
    /// Canvas height in pixels (bar charts with many categories grow taller on their own).
    pub height: Option<u32>,
}

/// Which column splits the rows into groups (one colour each).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Group {
    /// The chart's natural default: `model` when the table has that column (bars, radar),
    /// none for curves and histograms.
    #[default]
    Auto,
    /// One group.
    Off,
    /// This column.
    Column(String),
}

impl Group {
    /// The grouping column, given the chart's default column.
    fn resolve(&self, df: &polars::prelude::DataFrame, default: Option<&str>) -> Option<String> {
        match self {
            Group::Auto => default
                .filter(|name| input::has(df, name))
                .map(str::to_string),
            Group::Off => None,
            Group::Column(name) => Some(name.clone()),
        }
    }
}

/// A chart that cannot be drawn from the input given.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// A column named by the call is not in the table.
    #[error("no column `{column}` in the table; its columns are {available}")]
    MissingColumn {
        /// The missing column.
        column: String,
        /// The columns the table has.
        available: String,
    },
    /// A column that must hold numbers holds something else.
    #[error("column `{column}` must be numeric, not {dtype}")]
    NotNumeric {
        /// The column.
        column: String,
        /// Its type.
        dtype: String,
    },
    /// A column holds no value to plot (all null or NaN).
    #[error("column `{column}` has no values to plot (all null or NaN)")]
    NoValues {
        /// The column.
        column: String,
    },
    /// The table has no rows.
    #[error("nothing to plot: the table has no rows")]
    Empty,
    /// Two rows claim the same bar or point.
    #[error("two rows for `{category}` in group `{group}`; each bar needs one row (summarise the table first)")]
    Duplicate {
        /// The category.
        category: String,
        /// The group.
        group: String,
    },
    /// An option with a value that cannot work.
    #[error("option `{option}`: {message}")]
    Option {
        /// The option.
        option: String,
        /// What is wrong with it.
        message: String,
    },
    /// The drawing backend failed.
    #[error("drawing failed: {0}")]
    Draw(String),
    /// Writing the chart failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}
