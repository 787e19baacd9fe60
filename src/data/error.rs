//! Errors of the dataset loaders and table utilities: each names the file and, where it
//! applies, the line (or row) and the field it is about.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in a file a problem sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A 1-based line of a text file (jsonl, csv).
    Line(usize),
    /// A 0-based row of a table file (parquet, a JSON array).
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// A failure to read a dataset or table.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A whole-file problem: empty, not UTF-8, no files found, unknown format.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// A record that cannot be parsed at all (malformed JSON, wrong CSV column count).
    #[error("{}: {at}: {message}", path.display())]
    Record {
        path: PathBuf,
        at: Location,
        message: String,
    },
    /// A record whose field is missing or holds a value that does not fit.
    #[error("{}: {at}: field `{field}`: {message}", path.display())]
    Field {
        path: PathBuf,
        at: Location,
        field: String,
        message: String,
    },
    /// A dataset kind that no loader knows.
    #[error("unknown dataset `{name}`; known: {known}")]
    UnknownDataset { name: String, known: String },
    /// A bad option given to a loader or table function.
    #[error("{0}")]
    Option(String),
    /// An error from polars while building or querying a table.
    #[error("{context}: {source}")]
    Polars {
        context: String,
        source: polars::error::PolarsError,
    },
}

impl DataError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A whole-file problem with `path`.
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        DataError::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// A record of `path` at `at` that cannot be parsed.
    pub fn record(path: &Path, at: Location, message: impl Into<String>) -> Self {
        DataError::Record {
            path: path.to_path_buf(),
            at,
            message: message.into(),
        }
    }

    /// A bad `field` in the record of `path` at `at`.
    pub fn field(path: &Path, at: Location, field: &str, message: impl Into<String>) -> Self {
        DataError::Field {
            path: path.to_path_buf(),
            at,
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// A polars error, with what was being done.
    pub fn polars(context: impl Into<String>, source: polars::error::PolarsError) -> Self {
        DataError::Polars {
            context: context.into(),
            source,
        }
    }
}

/// Result of the data layer.
pub type Result<T> = std::result::Result<T, DataError>;
