//! Reading files as records: one JSON object per record with its line or row, whatever
//! the format (jsonl, json, csv with a header, parquet). Loaders take fields from records
//! through [`Record`]'s accessors, which name the file, line and field on failure.

use std::fs::File;
use std::path::Path;

use polars::prelude::*;
use serde_json::{Map, Value};

use super::error::{DataError, Location, Result};

/// One record of a file: its fields and where it came from.
#[derive(Debug, Clone)]
pub struct Record {
    /// Line (text formats) or row (table formats) of the record.
    pub at: Location,
    /// The record's fields by name.
    pub fields: Map<String, Value>,
}

/// Reads a whole text file as UTF-8, failing clearly on an empty file or invalid bytes
/// (naming the line of the first bad byte). A leading byte-order mark is dropped.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DataError::file(path, "the file is empty"));
    }
    match String::from_utf8(bytes) {
        Ok(mut text) => {
            if text.starts_with('\u{feff}') {
                text.drain(..3);
            }
            Ok(text)
        }
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..valid]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            Err(DataError::record(
                path,
                Location::Line(line),
                format!("not valid UTF-8 (byte {valid})"),
            ))
        }
    }
}

/// How a file lays out its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    JsonLines,
    /// A JSON array of objects, or JSON lines (see [`is_json_lines`]).
    Json,
    /// CSV with a header.
    Csv,
    /// Parquet.
    Parquet,
}

impl Format {
    /// The format a dataset kind names: `jsonl`, `json`, `csv` or `parquet`.
    pub fn of_kind(kind: &str) -> Option<Format> {
        match kind {
            "jsonl" => Some(Format::JsonLines),
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    /// The format a file's extension names.
    pub fn of_path(path: &Path) -> Result<Format> {
        let ext = extension(path);
        let kind = if ext == "ndjson" { "jsonl" } else { &ext };
        Format::of_kind(kind).ok_or_else(|| {
            DataError::file(
                path,
                format!("unknown format `.{ext}`; expected .jsonl, .json, .csv or .parquet"),
            )
        })
    }
}

/// Reads the records of a file, the format taken from its extension:
/// `.jsonl` / `.ndjson`, `.json` (an array of objects, or JSON lines), `.csv` (with a
/// header), `.parquet`.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    read_records_as(path, Format::of_path(path)?)
}

/// Reads the records of a file in `format`, whatever its extension.
pub fn read_records_as(path: &Path, format: Format) -> Result<Vec<Record>> {
    match format {
        Format::JsonLines => read_jsonl(path),
        Format::Json => read_json(path),
        Format::Csv => read_csv(path),
        Format::Parquet => read_parquet(path),
    }
}

/// The lower-case extension of a path ("" when it has none).
pub fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// JSON Lines: one object per non-blank line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    jsonl_records(path, &read_text(path)?)
}

fn jsonl_records(path: &Path, text: &str) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = Location::Line(i + 1);
        let value: Value = serde_json::from_str(line)
            .map_err(|e| DataError::record(path, at, format!("malformed JSON: {e}")))?;
        match value {
            Value::Object(fields) => records.push(Record { at, fields }),
            other => {
                return Err(DataError::record(
                    path,
                    at,
                    format!("expected a JSON object, found {}", json_kind(&other)),
                ))
            }
        }
    }
    Ok(records)
}

/// Whether JSON text holds JSON lines rather than one document: its first non-blank line
/// is a complete JSON object and more non-blank lines follow (many published datasets
/// ship JSON lines in `.json` files).
pub fn is_json_lines(text: &str) -> bool {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first_is_object = lines
        .next()
        .is_some_and(|l| matches!(serde_json::from_str::<Value>(l), Ok(Value::Object(_))));
    first_is_object && lines.next().is_some()
}

/// A `.json` file: JSON lines when [`is_json_lines`] says so, else an array of objects.
fn read_json(path: &Path) -> Result<Vec<Record>> {
    let text = read_text(path)?;
    if is_json_lines(&text) {
        return jsonl_records(path, &text);
    }
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        DataError::record(
            path,
            Location::Line(e.line()),
            format!("malformed JSON: {e}"),
        )
    })?;
    let Value::Array(rows) = value else {
        return Err(DataError::file(
            path,
            format!(
                "expected a JSON array of objects (or one object per line), found {}",
                json_kind(&value)
            ),
        ));
    };
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| match row {
            Value::Object(fields) => Ok(Record {
                at: Location::Row(i),
                fields,
            }),
            other => Err(DataError::record(
                path,
                Location::Row(i),
                format!("expected a JSON object, found {}", json_kind(&other)),
            )),
        })
        .collect()
}

fn read_csv(path: &Path) -> Result<Vec<Record>> {
    let text = read_text(path)?;
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| csv_error(path, e))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut records = Vec::new();
    for row in reader.records() {
        let row = row.map_err(|e| csv_error(path, e))?;
        let at = Location::Line(row.position().map_or(0, |p| p.line() as usize));
        let fields = header
            .iter()
            .zip(row.iter())
            .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
            .collect();
        records.push(Record { at, fields });
    }
    Ok(records)
}

/// Turns a csv crate error into one that names the file and line.
pub fn csv_error(path: &Path, e: csv::Error) -> DataError {
    let line = e.position().map(|p| p.line() as usize);
    let message = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("expected {expected_len} columns, found {len}"),
        csv::ErrorKind::Utf8 { err, .. } => {
            format!("not valid UTF-8 in column {}", err.field() + 1)
        }
        _ => e.to_string(),
    };
    match line {
        Some(line) => DataError::record(path, Location::Line(line), message),
        None => DataError::file(path, message),
    }
}

fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    let df = read_parquet_frame(path)?;
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut records: Vec<Record> = (0..df.height())
        .map(|i| Record {
            at: Location::Row(i),
            fields: Map::new(),
        })
        .collect();
    for (name, column) in names.iter().zip(df.columns()) {
        let values = column_to_json(column.as_materialized_series())
            .map_err(|e| DataError::polars(format!("{}: column `{name}`", path.display()), e))?;
        for (record, value) in records.iter_mut().zip(values) {
            record.fields.insert(name.clone(), value);
        }
    }
    Ok(records)
}

/// A column's values as JSON, with typed fast paths for text, integers, floats, booleans
/// and lists of text (the common cases), and [`any_to_json`] for the rest.
fn column_to_json(series: &Series) -> PolarsResult<Vec<Value>> {
    let text = |v: Option<&str>| v.map_or(Value::Null, |s| Value::String(s.to_string()));
    Ok(match series.dtype() {
        DataType::String => series.str()?.iter().map(text).collect(),
        DataType::Boolean => series
            .bool()?
            .iter()
            .map(|v| v.map_or(Value::Null, Value::Bool))
            .collect(),
        dt if dt.is_integer() => series
            .cast(&DataType::Int64)?
            .i64()?
            .iter()
            .map(|v| v.map_or(Value::Null, Value::from))
            .collect(),
        dt if dt.is_float() => series
            .cast(&DataType::Float64)?
            .f64()?
            .iter()
            .map(|v| v.map_or(Value::Null, Value::from))
            .collect(),
        DataType::List(inner) if **inner == DataType::String => {
            let lists = series.list()?;
            let mut out = Vec::with_capacity(lists.len());
            for item in lists.amortized_iter() {
                out.push(match item {
                    None => Value::Null,
                    Some(s) => Value::Array(s.as_ref().str()?.iter().map(text).collect()),
                });
            }
            out
        }
        _ => series.iter().map(|v| any_to_json(&v)).collect(),
    })
}

/// Reads a parquet file into a DataFrame.
pub fn read_parquet_frame(path: &Path) -> Result<DataFrame> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    ParquetReader::new(file)
        .finish()
        .map_err(|e| DataError::polars(format!("{}", path.display()), e))
}

/// A polars value as JSON.
pub fn any_to_json(value: &AnyValue) -> Value {
    match value {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(*b),
        AnyValue::String(s) => Value::String(s.to_string()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::Int8(v) => Value::from(*v),
        AnyValue::Int16(v) => Value::from(*v),
        AnyValue::Int32(v) => Value::from(*v),
        AnyValue::Int64(v) => Value::from(*v),
        AnyValue::UInt8(v) => Value::from(*v),
        AnyValue::UInt16(v) => Value::from(*v),
        AnyValue::UInt32(v) => Value::from(*v),
        AnyValue::UInt64(v) => Value::from(*v),
        AnyValue::Float32(v) => Value::from(*v as f64),
        AnyValue::Float64(v) => Value::from(*v),
        AnyValue::List(series) => Value::Array(series.iter().map(|v| any_to_json(&v)).collect()),
        other => Value::String(other.to_string()),
    }
}

/// A short name of a JSON value's type, for messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Record {
    /// The field's value, or an error naming it when absent or null.
    pub fn get(&self, path: &Path, field: &str) -> Result<&Value> {
        match self.fields.get(field) {
            None => Err(DataError::field(
                path,
                self.at,
                field,
                "missing required field",
            )),
            Some(Value::Null) => Err(DataError::field(path, self.at, field, "is null")),
            Some(v) => Ok(v),
        }
    }

    /// A required, non-empty text field. Numbers are accepted and written as text.
    pub fn text(&self, path: &Path, field: &str) -> Result<String> {
        let text = match self.get(path, field)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => {
                return Err(DataError::field(
                    path,
                    self.at,
                    field,
                    format!("expected text, found {}", json_kind(other)),
                ))
            }
        };
        if text.trim().is_empty() {
            return Err(DataError::field(path, self.at, field, "is empty"));
        }
        Ok(text)
    }

    /// An optional text field: `None` when absent, null or empty.
    pub fn opt_text(&self, path: &Path, field: &str) -> Result<Option<String>> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(_) => self.text(path, field).map(Some),
        }
    }

    /// A required list of texts: a JSON array, or (from csv) a string holding one.
    pub fn text_list(&self, path: &Path, field: &str) -> Result<Vec<String>> {
        let value = self.get(path, field)?;
        let parsed;
        let items = match value {
            Value::Array(items) => items,
            Value::String(s) => {
                parsed = serde_json::from_str::<Value>(s).ok();
                match &parsed {
                    Some(Value::Array(items)) => items,
                    _ => {
                        return Err(DataError::field(
                            path,
                            self.at,
                            field,
                            "expected a list of texts (a JSON array)",
                        ))
                    }
                }
            }
            other => {
                return Err(DataError::field(
                    path,
                    self.at,
                    field,
                    format!("expected a list of texts, found {}", json_kind(other)),
                ))
            }
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(DataError::field(
                    path,
                    self.at,
                    &format!("{field}[{i}]"),
                    format!("expected text, found {}", json_kind(other)),
                )),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rlvr-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        path
    }

    #[test]
    fn jsonl_lines_are_numbered_from_one_and_blank_lines_skipped() {
        let path = temp_file("a.jsonl", b"{\"q\": 1}\n\n{\"q\": 2}\n");
        let records = read_jsonl(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].at, Location::Line(3));
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let path = temp_file("b.jsonl", b"{\"q\": 1}\n{\"q\": \"\xff\"}\n");
        let err = read_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("UTF-8"), "{err}");
    }

    #[test]
    fn json_lines_in_a_json_file_are_read_as_lines() {
        let path = temp_file("d.json", b"{\"q\": 1}\n{\"q\": 2}\n");
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].at, Location::Line(2));
        let array = temp_file("e.json", b"[\n{\"q\": 1},\n{\"q\": 2}\n]\n");
        assert_eq!(read_records(&array).unwrap()[1].at, Location::Row(1));
        let one = temp_file("f.json", b"{\"q\": 1}\n");
        let err = read_records(&one).unwrap_err().to_string();
        assert!(
            err.contains("f.json") && err.contains("found an object"),
            "{err}"
        );
    }

    #[test]
    fn the_format_given_wins_over_the_extension() {
        let path = temp_file("g.json", b"{\"q\": 1}\n");
        let records = read_records_as(&path, Format::JsonLines).unwrap();
        assert_eq!(records.len(), 1);
        let csv = temp_file("h.json", b"q,a\nx,1\n");
        assert_eq!(
            read_records_as(&csv, Format::Csv).unwrap()[0]
                .text(&csv, "a")
                .unwrap(),
            "1"
        );
    }

    #[test]
    fn csv_records_carry_header_names_and_lines() {
        let path = temp_file("c.csv", b"q,a\n\"multi\nline\",1\nx,2\n");
        let records = read_records(&path).unwrap();
        assert_eq!(records[1].at, Location::Line(4));
        assert_eq!(records[0].text(&path, "q").unwrap(), "multi\nline");
        assert_eq!(records[1].text(&path, "a").unwrap(), "2");
    }
}
