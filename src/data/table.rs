//! Table operations on any DataFrame: seeded sampling (plain and stratified), polars SQL,
//! concatenation, and saving / reading parquet, csv, json and jsonl (format from the
//! extension).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Cursor;
use std::path::Path;

use polars::prelude::*;
use polars::sql::SQLContext;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::error::{DataError, Result};
use super::records::{
    any_to_json, extension, is_json_lines, read_jsonl, read_parquet_frame, read_records, read_text,
};

/// The random generator behind every seeded choice in the data layer: ChaCha8, whose
/// stream is fixed by its specification, so a seed picks the same rows on every platform.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` rows drawn without replacement, in random order; the same `seed` gives the same rows.
pub fn sample(df: &DataFrame, n: usize, seed: u64) -> Result<DataFrame> {
    if n > df.height() {
        return Err(DataError::Option(format!(
            "cannot sample {n} rows without replacement from a table of {}",
            df.height()
        )));
    }
    let mut rows: Vec<usize> = (0..df.height()).collect();
    rows.shuffle(&mut rng(seed));
    rows.truncate(n);
    take(df, &rows)
}

/// `n` rows drawn without replacement so that each value of `column` keeps its share of the
/// table (largest-remainder rounding), in random order.
pub fn stratified_sample(df: &DataFrame, column: &str, n: usize, seed: u64) -> Result<DataFrame> {
    if n > df.height() {
        return Err(DataError::Option(format!(
            "cannot sample {n} rows without replacement from a table of {}",
            df.height()
        )));
    }
    let groups = group_rows(df, column)?;
    let total = df.height() as f64;
    let mut quotas: Vec<(usize, f64)> = groups
        .values()
        .map(|rows| {
            let exact = n as f64 * rows.len() as f64 / total;
            (exact.floor() as usize, exact - exact.floor())
        })
        .collect();
    let assigned: usize = quotas.iter().map(|q| q.0).sum();
    let mut by_remainder: Vec<usize> = (0..quotas.len()).collect();
    by_remainder.sort_by(|&a, &b| quotas[b].1.total_cmp(&quotas[a].1));
    for &g in by_remainder.iter().take(n - assigned) {
        quotas[g].0 += 1;
    }
    let mut rng = rng(seed);
    let mut chosen = Vec::with_capacity(n);
    for (rows, (quota, _)) in groups.values().zip(&quotas) {
        let mut rows = rows.clone();
        rows.shuffle(&mut rng);
        chosen.extend_from_slice(&rows[..*quota]);
    }
    chosen.shuffle(&mut rng);
    take(df, &chosen)
}

/// At most `n` rows per value of `column`, drawn without replacement, in random order.
pub fn sample_per_group(df: &DataFrame, column: &str, n: usize, seed: u64) -> Result<DataFrame> {
    let mut rng = rng(seed);
    let mut chosen = Vec::new();
    for rows in group_rows(df, column)?.values() {
        let mut rows = rows.clone();
        rows.shuffle(&mut rng);
        chosen.extend(rows.into_iter().take(n));
    }
    chosen.shuffle(&mut rng);
    take(df, &chosen)
}

/// Row positions by the text of `column`'s value, groups in sorted order.
fn group_rows(df: &DataFrame, column: &str) -> Result<BTreeMap<String, Vec<usize>>> {
    let values = df
        .column(column)
        .map_err(|e| DataError::polars(format!("grouping by `{column}`"), e))?
        .as_materialized_series()
        .clone();
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, value) in values.iter().enumerate() {
        let key = match value {
            AnyValue::String(s) => s.to_string(),
            other => other.to_string(),
        };
        groups.entry(key).or_default().push(i);
    }
    Ok(groups)
}

fn take(df: &DataFrame, rows: &[usize]) -> Result<DataFrame> {
    let idx = IdxCa::from_vec("idx".into(), rows.iter().map(|&i| i as IdxSize).collect());
    df.take(&idx)
        .map_err(|e| DataError::polars("selecting rows", e))
}

/// Rows whose `column` holds one of `values`.
pub fn filter_in(df: &DataFrame, column: &str, values: &[String]) -> Result<DataFrame> {
    // `is_in` takes the values as one list (a one-row list column applies to every row)
    let wanted = Series::new("wanted".into(), values)
        .implode()
        .map_err(|e| DataError::polars(format!("filtering `{column}`"), e))?
        .into_series();
    let mask = df
        .column(column)
        .and_then(|c| is_in(c.as_materialized_series(), &wanted, false))
        .map_err(|e| DataError::polars(format!("filtering `{column}`"), e))?;
    df.filter(&mask)
        .map_err(|e| DataError::polars(format!("filtering `{column}`"), e))
}

/// Runs a polars SQL query in which the table is named `self`.
pub fn sql(df: &DataFrame, query: &str) -> Result<DataFrame> {
    let mut ctx = SQLContext::new();
    ctx.register("self", df.clone().lazy());
    ctx.execute(query)
        .and_then(|lf| lf.collect())
        .map_err(|e| DataError::polars(format!("SQL `{query}`"), e))
}

/// Stacks tables; columns missing from some are filled with nulls.
pub fn concat(tables: &[DataFrame]) -> Result<DataFrame> {
    polars::functions::concat_df_diagonal(tables)
        .map_err(|e| DataError::polars("concatenating tables", e))
}

/// A table from rows given as JSON objects (e.g. script maps): one column per key, in
/// `columns`' order when given (keys outside it are dropped, a column no row has is an
/// error), else in the order the keys first appear. Column types are inferred from the
/// values (whole numbers mixed with fractions become floats; a missing key is null).
pub fn from_rows(
    rows: &[serde_json::Map<String, serde_json::Value>],
    columns: Option<&[String]>,
) -> Result<DataFrame> {
    if rows.is_empty() {
        return Err(DataError::Option(
            "a table needs at least one row".to_string(),
        ));
    }
    let mut order: Vec<String> = Vec::new();
    for row in rows {
        for key in row.keys() {
            if !order.contains(key) {
                order.push(key.clone());
            }
        }
    }
    if let Some(wanted) = columns {
        if let Some(missing) = wanted.iter().find(|c| !order.contains(c)) {
            return Err(DataError::Option(format!(
                "no row has the column `{missing}`; the rows have {}",
                order.join(", ")
            )));
        }
        order = wanted.to_vec();
    }
    let text = serde_json::Value::Array(
        rows.iter()
            .map(|row| serde_json::Value::Object(row.clone()))
            .collect(),
    )
    .to_string();
    let schema_rows = rows.len();
    let df = JsonReader::new(Cursor::new(text.into_bytes()))
        .with_json_format(JsonFormat::Json)
        .infer_schema_len(std::num::NonZeroUsize::new(schema_rows))
        .finish()
        .map_err(|e| DataError::polars("building a table from rows", e))?;
    df.select(order)
        .map_err(|e| DataError::polars("ordering the table's columns", e))
}

/// Writes `df` to `path` as parquet, csv, json (an array of row objects) or jsonl (one
/// object per line), by extension. List cells go to csv as JSON text. Parent directories
/// are created.
pub fn save(df: &DataFrame, path: &Path) -> Result<()> {
    let ext = extension(path);
    if !["parquet", "csv", "json", "jsonl", "ndjson"].contains(&ext.as_str()) {
        return Err(DataError::file(
            path,
            "cannot tell the format: use .parquet, .csv, .json or .jsonl",
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    let file = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut df = df.clone();
    let written = match ext.as_str() {
        "parquet" => ParquetWriter::new(file).finish(&mut df).map(|_| ()),
        "csv" => {
            let mut df = lists_as_json_text(&df)?;
            CsvWriter::new(file).include_header(true).finish(&mut df)
        }
        "json" => JsonWriter::new(file)
            .with_json_format(JsonFormat::Json)
            .finish(&mut df),
        _ => JsonWriter::new(file)
            .with_json_format(JsonFormat::JsonLines)
            .finish(&mut df),
    };
    written.map_err(|e| DataError::polars(format!("writing {}", path.display()), e))
}

/// Reads a table file as it is (no Items mapping), by extension: parquet, csv (with a
/// header), json (an array of objects, or JSON lines) or jsonl.
pub fn read(path: &Path) -> Result<DataFrame> {
    let context = || format!("reading {}", path.display());
    match extension(path).as_str() {
        "parquet" => read_parquet_frame(path),
        "csv" => {
            read_records(path)?; // names the line of a malformed row
            CsvReadOptions::default()
                .with_has_header(true)
                .try_into_reader_with_file_path(Some(path.to_path_buf()))
                .and_then(|r| r.finish())
                .map_err(|e| DataError::polars(context(), e))
        }
        "json" | "jsonl" | "ndjson" => {
            let lines = extension(path) != "json" || is_json_lines(&read_text(path)?);
            if lines {
                read_jsonl(path)?; // names the line of a malformed record
            } else {
                read_records(path)?;
            }
            let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
            let format = if lines {
                JsonFormat::JsonLines
            } else {
                JsonFormat::Json
            };
            JsonReader::new(Cursor::new(bytes))
                .with_json_format(format)
                .finish()
                .map_err(|e| DataError::polars(context(), e))
        }
        other => Err(DataError::file(
            path,
            format!("unknown format `.{other}`; expected .parquet, .csv, .json or .jsonl"),
        )),
    }
}

/// A copy of `df` whose list columns hold their values as JSON text.
fn lists_as_json_text(df: &DataFrame) -> Result<DataFrame> {
    let mut out = df.clone();
    for column in df.columns() {
        if matches!(column.dtype(), DataType::List(_)) {
            let texts: Vec<Option<String>> = column
                .as_materialized_series()
                .iter()
                .map(|v| match v {
                    AnyValue::Null => None,
                    v => Some(any_to_json(&v).to_string()),
                })
                .collect();
            out.replace(column.name(), Column::new(column.name().clone(), texts))
                .map_err(|e| DataError::polars("writing list cells as JSON", e))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn rows_become_columns_with_inferred_types() {
        let rows = [
            object(serde_json::json!({"q": "2+2", "a": 4, "ok": true})),
            object(serde_json::json!({"q": "3+5", "a": 8.5})),
        ];
        let df = from_rows(&rows, None).unwrap();
        assert_eq!(df.shape(), (2, 3));
        let a: Vec<Option<f64>> = df.column("a").unwrap().f64().unwrap().to_vec();
        assert_eq!(a, [Some(4.0), Some(8.5)]);
        let ok: Vec<Option<bool>> = df.column("ok").unwrap().bool().unwrap().iter().collect();
        assert_eq!(ok, [Some(true), None]);
        let chosen = from_rows(&rows, Some(&["q".to_string(), "a".to_string()])).unwrap();
        assert_eq!(chosen.get_column_names(), ["q", "a"]);
        let err = from_rows(&rows, Some(&["b".to_string()])).unwrap_err();
        assert!(err.to_string().contains("`b`"), "{err}");
        assert!(from_rows(&[], None).is_err());
    }

    #[test]
    fn filter_in_keeps_the_rows_holding_a_listed_value() {
        let df = numbers(10);
        let kept = filter_in(&df, "g", &["a".to_string()]).unwrap();
        assert_eq!(xs(&kept), [0, 4, 8]);
        let both = filter_in(&df, "g", &["a".to_string(), "b".to_string()]).unwrap();
        assert_eq!(both.height(), 10);
        assert_eq!(filter_in(&df, "g", &["c".to_string()]).unwrap().height(), 0);
    }

    fn numbers(n: usize) -> DataFrame {
        let groups: Vec<&str> = (0..n).map(|i| if i % 4 == 0 { "a" } else { "b" }).collect();
        df!("x" => (0..n as i64).collect::<Vec<_>>(), "g" => groups).unwrap()
    }

    fn xs(df: &DataFrame) -> Vec<i64> {
        df.column("x")
            .unwrap()
            .i64()
            .unwrap()
            .iter()
            .map(|v| v.unwrap())
            .collect()
    }

    #[test]
    fn sample_is_seeded_and_without_replacement() {
        let df = numbers(100);
        let a = xs(&sample(&df, 30, 7).unwrap());
        let b = xs(&sample(&df, 30, 7).unwrap());
        let c = xs(&sample(&df, 30, 8).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut unique = a.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 30);
        assert!(sample(&df, 101, 1).is_err());
    }

    #[test]
    fn stratified_sample_keeps_group_shares() {
        let df = numbers(100); // 25 "a", 75 "b"
        let s = stratified_sample(&df, "g", 20, 3).unwrap();
        let a = s
            .column("g")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .filter(|v| *v == Some("a"))
            .count();
        assert_eq!((s.height(), a), (20, 5));
    }

    #[test]
    fn sample_per_group_caps_each_group() {
        let s = sample_per_group(&numbers(10), "g", 2, 1).unwrap();
        assert_eq!(s.height(), 4);
    }

    #[test]
    fn sql_sees_the_table_as_self() {
        let out = sql(
            &numbers(8),
            "SELECT g, count(*) AS n FROM self GROUP BY g ORDER BY g",
        )
        .unwrap();
        assert_eq!(out.height(), 2);
    }

    #[test]
    fn concat_fills_missing_columns() {
        let a = df!("x" => [1i64]).unwrap();
        let b = df!("x" => [2i64], "y" => ["b"]).unwrap();
        let c = concat(&[a, b]).unwrap();
        assert_eq!(c.shape(), (2, 2));
        assert_eq!(c.column("y").unwrap().null_count(), 1);
    }
}
