//! Datasets into tables: loaders for the study's five benchmarks and for a user's own
//! files, all producing the Items table ([`items`]); subject maps ([`categories`]); and the
//! table operations scripts use ([`table`]).

pub mod categories;
pub mod error;
mod generic;
mod gsm8k;
pub mod items;
mod medqa;
mod mmlu;
mod mmlu_pro;
pub mod question;
pub mod records;
pub mod table;

use std::path::{Path, PathBuf};

use polars::prelude::DataFrame;

pub use error::{DataError, Location, Result};
pub use generic::ColumnMapping;
use records::Format;

/// The dataset kinds [`load`] knows.
pub const DATASET_KINDS: [&str; 9] = [
    "medqa", "mmlu", "cmmlu", "mmlu_pro", "gsm8k", "jsonl", "json", "csv", "parquet",
];

/// What to load besides the path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// Split name (default `test`; MMLU also takes `dev`, `val`; MMLU-Pro `validation`).
    pub split: Option<String>,
    /// Keep only these subjects (MMLU and CMMLU: file names; others: the `subject` column).
    pub subjects: Option<Vec<String>>,
    /// Column mapping for a user's own file (kinds `jsonl`, `json`, `csv`, `parquet`).
    pub mapping: ColumnMapping,
}

/// Loads a dataset of `kind` (one of [`DATASET_KINDS`]) from `path` into the Items table.
/// For a file of one's own the kind names its format, whatever the extension; kind `json`
/// reads a file whose first line is a complete JSON object and which has more lines as
/// JSON lines.
pub fn load(kind: &str, path: &Path, options: &LoadOptions) -> Result<DataFrame> {
    if !path.exists() {
        return Err(DataError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let inferred = path.is_file().then(|| split_of_file(path)).flatten();
    let split = options.split.as_deref().or(inferred).unwrap_or("test");
    let subjects = options.subjects.as_deref();
    let items = match kind {
        "medqa" => medqa::load(path, split)?,
        "mmlu" => return mmlu::load_mmlu(path, split, subjects),
        "cmmlu" => return mmlu::load_cmmlu(path, split, subjects),
        "mmlu_pro" => mmlu_pro::load(path, split)?,
        "gsm8k" => gsm8k::load(path, split)?,
        other => match Format::of_kind(other) {
            Some(format) => {
                let split = options.split.as_deref().or(inferred).unwrap_or("all");
                generic::load(path, split, &options.mapping, format)?
            }
            None => {
                return Err(DataError::UnknownDataset {
                    name: other.to_string(),
                    known: DATASET_KINDS.join(", "),
                })
            }
        },
    };
    match subjects {
        Some(subjects) => table::filter_in(&items, "subject", subjects),
        None => Ok(items),
    }
}

/// The split a file's name states (`…_train.jsonl` → `train`), if any.
fn split_of_file(path: &Path) -> Option<&'static str> {
    let stem = path.file_stem()?.to_str()?;
    stem.split(['_', '-', '.']).find_map(|part| {
        ["train", "dev", "val", "validation", "test"]
            .into_iter()
            .find(|s| *s == part)
    })
}

/// Finds the file of a split: `root` itself when it is a file, else the first of
/// `candidates` (paths relative to `root`) that exists.
fn resolve_split_file(root: &Path, split: &str, candidates: &[String]) -> Result<PathBuf> {
    if root.is_file() {
        return Ok(root.to_path_buf());
    }
    candidates
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            DataError::file(
                root,
                format!(
                    "no file for split `{split}`; looked for {}",
                    candidates.join(", ")
                ),
            )
        })
}
