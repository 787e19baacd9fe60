//! A user's own dataset: any jsonl / json / csv / parquet file whose columns are named in a
//! [`ColumnMapping`], so it loads into the Items table without code.

use std::path::Path;

use polars::prelude::*;
use serde_json::Value;

use super::error::{DataError, Result};
use super::items::{letter, letter_index, normalize_number, Item, ItemsBuilder};
use super::records::{json_kind, read_records_as, Format, Record};

/// Which source column feeds each Items column. Unset fields use the column of the same
/// name when the file has one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ColumnMapping {
    /// Dataset name written to `dataset` and `id` (default: the file stem).
    pub name: Option<String>,
    /// Question column (default `question`).
    pub question: Option<String>,
    /// Choices: one column holding a list, or several columns holding one option each
    /// (default: a `choices` column when present, else none: open answers).
    pub choices: Option<Vec<String>>,
    /// Answer column (default `answer`): a letter, an option's text or an index (see
    /// [`ColumnMapping::answer_index`]) for multiple choice; a number or text for open
    /// answers.
    pub answer: Option<String>,
    /// How a multiple-choice answer given as a number counts: `0` (0 is the first option)
    /// or `1` (1 is the first option). Required when the answer column holds numbers: a
    /// file that does not say fails rather than guessing.
    pub answer_index: Option<usize>,
    /// Answer-text column (default: the chosen option's text, or the answer).
    pub answer_text: Option<String>,
    /// Subject column (default `subject` when present, else the dataset name).
    pub subject: Option<String>,
    /// Category column (default `category` when present, else the subject).
    pub category: Option<String>,
    /// Rationale column (default `rationale` when present).
    pub rationale: Option<String>,
    /// Column whose value makes the id `name/split/<value>` (default: the row position).
    pub id: Option<String>,
    /// Boolean column for `medical` (and `medical_ext`); default false, or
    /// [`ColumnMapping::all_medical`].
    pub medical: Option<String>,
    /// Marks every row medical (a medical pool such as a MedQA variant).
    pub all_medical: bool,
}

/// Loads `path`, read as `format`, as Items, taking columns per `mapping`; `split` names
/// the split in ids.
pub fn load(
    path: &Path,
    split: &str,
    mapping: &ColumnMapping,
    format: Format,
) -> Result<DataFrame> {
    if let Some(base) = mapping.answer_index.filter(|b| *b > 1) {
        return Err(DataError::Option(format!(
            "answer_index must be 0 or 1, not {base}"
        )));
    }
    let records = read_records_as(path, format)?;
    if records.is_empty() {
        return Err(DataError::file(path, "holds no records"));
    }
    let name = mapping.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("data")
            .to_string()
    });
    let present = |col: &str| records.first().is_some_and(|r| r.fields.contains_key(col));
    let default = |set: &Option<String>, col: &str| {
        set.clone()
            .or_else(|| present(col).then(|| col.to_string()))
    };
    let question_col = mapping.question.clone().unwrap_or("question".into());
    let answer_col = mapping.answer.clone().unwrap_or("answer".into());
    let choices_cols = mapping
        .choices
        .clone()
        .or_else(|| present("choices").then(|| vec!["choices".to_string()]))
        .unwrap_or_default();
    let subject_col = default(&mapping.subject, "subject");
    let category_col = default(&mapping.category, "category");
    let rationale_col = default(&mapping.rationale, "rationale");

    let mut builder = ItemsBuilder::new();
    for (row, record) in records.iter().enumerate() {
        let choices = match choices_cols.as_slice() {
            [] => vec![],
            [one] => record.text_list(path, one)?,
            many => many
                .iter()
                .map(|c| record.text(path, c))
                .collect::<Result<Vec<_>>>()?,
        };
        let (answer, derived_text) =
            answer_of(path, record, &answer_col, &choices, mapping.answer_index)?;
        let answer_text = match &mapping.answer_text {
            Some(col) => record.text(path, col)?,
            None => derived_text,
        };
        let subject = match &subject_col {
            Some(col) => record.text(path, col)?,
            None => name.clone(),
        };
        let category = match &category_col {
            Some(col) => record.text(path, col)?,
            None => subject.clone(),
        };
        let medical = match &mapping.medical {
            Some(col) => flag(path, record, col)?,
            None => mapping.all_medical,
        };
        let key = match &mapping.id {
            Some(col) => record.text(path, col)?,
            None => row.to_string(),
        };
        let question = record.text(path, &question_col)?;
        let rationale = match &rationale_col {
            Some(col) => record.opt_text(path, col)?,
            None => None,
        };
        let choices: Vec<&str> = choices.iter().map(String::as_str).collect();
        builder.push(&Item {
            id: &format!("{name}/{split}/{key}"),
            dataset: &name,
            split,
            subject: &subject,
            category: &category,
            medical,
            medical_ext: medical,
            question: &question,
            choices: &choices,
            answer: &answer,
            answer_text: &answer_text,
            rationale: rationale.as_deref(),
        });
    }
    builder.finish(vec![])
}

/// The answer (letter or normalised value) and its text, from the answer field. For
/// multiple choice: a JSON number is an index counted from `base`; text is a whole number
/// read the same way when `base` is given, else a letter, else an option's text, else a
/// whole number. A number without `base` is an error naming both readings.
fn answer_of(
    path: &Path,
    record: &Record,
    field: &str,
    choices: &[String],
    base: Option<usize>,
) -> Result<(String, String)> {
    let raw = record.text(path, field)?;
    let raw = raw.trim();
    if choices.is_empty() {
        let answer = normalize_number(raw);
        return Ok((answer.clone(), answer));
    }
    let bad = |message: String| DataError::field(path, record.at, field, message);
    let last = letter(choices.len() - 1);
    let by_text = || {
        letter_index(raw)
            .filter(|&i| i < choices.len())
            .or_else(|| choices.iter().position(|c| c.trim() == raw))
    };
    let n = match record.get(path, field)? {
        Value::Number(n) => whole(n).ok_or_else(|| {
            bad(format!(
                "`{raw}` is not a whole number, so no option's index"
            ))
        })?,
        Value::String(_) => match (raw.parse::<i64>().ok(), base, by_text()) {
            (Some(n), Some(_), _) => n,
            (_, _, Some(i)) => return Ok((letter(i), choices[i].clone())),
            (Some(n), None, None) => n,
            (None, _, None) => {
                return Err(bad(format!(
                    "`{raw}` is not an option letter (A–{last}), an option's text or an index"
                )))
            }
        },
        other => {
            return Err(bad(format!(
                "expected a letter, an option's text or an index, found {}",
                json_kind(other)
            )))
        }
    };
    let option = |i: i64| usize::try_from(i).ok().filter(|&i| i < choices.len());
    match base {
        Some(base) => match option(n - base as i64) {
            Some(i) => Ok((letter(i), choices[i].clone())),
            None => Err(bad(format!(
                "index {n} is out of range: the {} options are {base}–{} with answer_index: {base}",
                choices.len(),
                choices.len() - 1 + base
            ))),
        },
        None => {
            let reading = |i: Option<usize>| i.map_or("no option".to_string(), letter);
            Err(bad(format!(
                "answer {n} could mean {} (0-based) or {} (1-based): set answer_index: 0 or 1",
                reading(option(n)),
                reading(option(n - 1)),
            )))
        }
    }
}

/// A JSON number as a whole number (`2` or `2.0`), if it is one.
fn whole(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
            .map(|f| f as i64)
    })
}

fn flag(path: &Path, record: &Record, field: &str) -> Result<bool> {
    match record.get(path, field)? {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") || s == "1" => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") || s == "0" => Ok(false),
        Value::Number(n) => Ok(n.as_f64() != Some(0.0)),
        _ => Err(DataError::field(
            path,
            record.at,
            field,
            "expected true or false",
        )),
    }
}
