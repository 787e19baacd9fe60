//! MMLU (Hendrycks et al.) and CMMLU: one csv file per subject and split.
//!
//! MMLU: `<root>/<split>/<subject>_<split>.csv`, no header, six columns
//! `question,A,B,C,D,answer` (splits `dev`, `val`, `test`).
//! CMMLU: `<root>/<split>/<subject>.csv`, header `,Question,A,B,C,D,Answer` with a leading
//! row-index column (splits `dev`, `test`).

use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::categories::{self, SubjectInfo};
use super::error::{DataError, Location, Result};
use super::items::{letter_index, Item, ItemsBuilder};
use super::records::{csv_error, read_text};

const OPTION_FIELDS: [&str; 4] = ["A", "B", "C", "D"];

/// Loads MMLU's `split` from `root` (a dataset root, a split directory or one csv file),
/// keeping only `subjects` when given.
pub fn load_mmlu(root: &Path, split: &str, subjects: Option<&[String]>) -> Result<DataFrame> {
    let split = match split {
        "validation" => "val",
        other => other,
    };
    let suffix = format!("_{split}.csv");
    let files = subject_files(root, split, |name| name.strip_suffix(&suffix))?;
    let mut builder = ItemsBuilder::new();
    for (subject, path) in select(files, subjects, root)? {
        let info = categories::mmlu(&subject)
            .ok_or_else(|| DataError::file(&path, format!("unknown MMLU subject `{subject}`")))?;
        let file = SubjectFile {
            path: &path,
            dataset: "mmlu",
            split,
            subject: &subject,
            info,
        };
        let text = read_text(&path)?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(text.as_bytes());
        let mut record = csv::StringRecord::new();
        let mut row = 0;
        while reader
            .read_record(&mut record)
            .map_err(|e| csv_error(&path, e))?
        {
            let at = Location::Line(record.position().map_or(0, |p| p.line() as usize));
            let cells: Vec<&str> = record.iter().collect();
            if cells.len() != 6 {
                return Err(DataError::record(
                    &path,
                    at,
                    format!("expected 6 columns, found {}", cells.len()),
                ));
            }
            let fields = ["question", "A", "B", "C", "D", "answer"];
            push_item(&mut builder, &file, at, row, &cells, &fields)?;
            row += 1;
        }
    }
    builder.finish(vec![])
}

/// Loads CMMLU's `split` from `root` (a dataset root, a split directory or one csv file),
/// keeping only `subjects` when given. Adds the `china_specific` column.
pub fn load_cmmlu(root: &Path, split: &str, subjects: Option<&[String]>) -> Result<DataFrame> {
    let files = subject_files(root, split, |name| name.strip_suffix(".csv"))?;
    let mut builder = ItemsBuilder::new();
    let mut china_specific = Vec::new();
    for (subject, path) in select(files, subjects, root)? {
        let info = categories::cmmlu(&subject)
            .ok_or_else(|| DataError::file(&path, format!("unknown CMMLU subject `{subject}`")))?;
        let file = SubjectFile {
            path: &path,
            dataset: "cmmlu",
            split,
            subject: &subject,
            info,
        };
        let text = read_text(&path)?;
        let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
        let header = reader.headers().map_err(|e| csv_error(&path, e))?.clone();
        let wanted = ["Question", "A", "B", "C", "D", "Answer"];
        let mut columns = Vec::with_capacity(wanted.len());
        for name in wanted {
            let index = header.iter().position(|h| h == name).ok_or_else(|| {
                DataError::field(
                    &path,
                    Location::Line(1),
                    name,
                    "missing column in the header",
                )
            })?;
            columns.push(index);
        }
        let mut record = csv::StringRecord::new();
        let mut row = 0;
        while reader
            .read_record(&mut record)
            .map_err(|e| csv_error(&path, e))?
        {
            let at = Location::Line(record.position().map_or(0, |p| p.line() as usize));
            let cells: Vec<&str> = columns.iter().map(|&i| &record[i]).collect();
            push_item(&mut builder, &file, at, row, &cells, &wanted)?;
            china_specific.push(info.china_specific);
            row += 1;
        }
    }
    builder.finish(vec![Column::new("china_specific".into(), china_specific)])
}

/// One subject file being read.
struct SubjectFile<'a> {
    path: &'a Path,
    dataset: &'a str,
    split: &'a str,
    subject: &'a str,
    info: SubjectInfo,
}

/// Checks the six cells question, A–D, answer (named `fields` in messages) of `row` and
/// adds them as an item.
fn push_item(
    builder: &mut ItemsBuilder,
    file: &SubjectFile,
    at: Location,
    row: usize,
    cells: &[&str],
    fields: &[&str],
) -> Result<()> {
    let SubjectFile {
        path,
        dataset,
        split,
        subject,
        info,
    } = *file;
    if cells[0].trim().is_empty() {
        return Err(DataError::field(path, at, fields[0], "is empty"));
    }
    let answer = cells[5].trim();
    let index = letter_index(answer)
        .filter(|&i| i < OPTION_FIELDS.len())
        .ok_or_else(|| {
            DataError::field(
                path,
                at,
                fields[5],
                format!("`{answer}` is not one of the option letters A, B, C, D"),
            )
        })?;
    builder.push(&Item {
        id: &format!("{dataset}/{split}/{subject}/{row}"),
        dataset,
        split,
        subject,
        category: info.category,
        medical: info.medical,
        medical_ext: info.medical_ext,
        question: cells[0],
        choices: &cells[1..5],
        answer,
        answer_text: cells[1 + index],
        rationale: None,
    });
    Ok(())
}

/// The (subject, file) pairs of a split, sorted by subject. `root` may be the dataset root
/// (holding `<split>/`), the split directory itself, or a single file.
fn subject_files(
    root: &Path,
    split: &str,
    subject_of: impl Fn(&str) -> Option<&str>,
) -> Result<Vec<(String, PathBuf)>> {
    if root.is_file() {
        let name = root.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let subject = subject_of(name)
            .ok_or_else(|| DataError::file(root, "not a subject file of this dataset's layout"))?;
        return Ok(vec![(subject.to_string(), root.to_path_buf())]);
    }
    let split_dir = root.join(split);
    let dir = if split_dir.is_dir() {
        split_dir
    } else {
        root.to_path_buf()
    };
    let entries = std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| DataError::io(&dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(subject) = subject_of(name) {
            files.push((subject.to_string(), path.clone()));
        }
    }
    if files.is_empty() {
        return Err(DataError::file(
            &dir,
            format!("no csv files of split `{split}` found"),
        ));
    }
    files.sort();
    Ok(files)
}

/// Keeps the files of the requested subjects, failing on a subject that has no file.
fn select(
    files: Vec<(String, PathBuf)>,
    subjects: Option<&[String]>,
    root: &Path,
) -> Result<Vec<(String, PathBuf)>> {
    let Some(wanted) = subjects else {
        return Ok(files);
    };
    for subject in wanted {
        if !files.iter().any(|(s, _)| s == subject) {
            return Err(DataError::file(
                root,
                format!("no file for subject `{subject}`"),
            ));
        }
    }
    Ok(files
        .into_iter()
        .filter(|(s, _)| wanted.contains(s))
        .collect())
}
