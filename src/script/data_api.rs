//! Script bindings for datasets and tables: `load`, the DataFrame methods (`len`, `columns`,
//! `head`, `sample`, `sql`, `save`, …) and `concat`.

use std::path::Path;
use std::sync::Arc;

use polars::prelude::DataFrame;
use rhai::plugin::*;
use rhai::{Array, Map};

use super::convert::{
    check_keys, count, error, from_json, strings, text, text_list, to_json, RhaiResult,
};
use super::{Area, Output};
use crate::data::{self, ColumnMapping, LoadOptions};

/// The data area of the reference.
pub const AREA: Area = Area {
    title: "Datasets and tables",
    intro: "Datasets load into the Items table (one row per question: `id`, `dataset`, `split`, \
            `subject`, `category`, `medical`, `medical_ext`, `question`, `choices`, `answer`, \
            `answer_text`, `rationale`). Every table is a polars DataFrame; `sql` queries it \
            with the table named `self`.",
    register,
};

fn register(engine: &mut Engine, _output: &Arc<dyn Output>) {
    engine.register_type_with_name::<DataFrame>("DataFrame");
    engine.register_global_module(exported_module!(data_functions).into());
}

/// The options `load` takes.
const LOAD_OPTIONS: [&str; 14] = [
    "split",
    "subjects",
    "name",
    "question",
    "choices",
    "answer",
    "answer_index",
    "answer_text",
    "subject",
    "category",
    "rationale",
    "id",
    "medical",
    "all_medical",
];

fn load_options(opts: &Map) -> RhaiResult<LoadOptions> {
    check_keys(opts, &LOAD_OPTIONS, "load")?;
    let all_medical = match opts.get("all_medical") {
        None => false,
        Some(v) => v.as_bool().map_err(|t| {
            error(format!(
                "option `all_medical` must be true or false, not {t}"
            ))
        })?,
    };
    let answer_index = match opts.get("answer_index") {
        None => None,
        Some(v) => match v.as_int() {
            Ok(base @ (0 | 1)) => Some(base as usize),
            _ => {
                return Err(error(format!(
                    "option `answer_index` must be 0 or 1 (the index of the first option), not {v}"
                )))
            }
        },
    };
    Ok(LoadOptions {
        split: text(opts, "split")?,
        subjects: text_list(opts, "subjects")?,
        mapping: ColumnMapping {
            name: text(opts, "name")?,
            question: text(opts, "question")?,
            choices: text_list(opts, "choices")?,
            answer: text(opts, "answer")?,
            answer_index,
            answer_text: text(opts, "answer_text")?,
            subject: text(opts, "subject")?,
            category: text(opts, "category")?,
            rationale: text(opts, "rationale")?,
            id: text(opts, "id")?,
            medical: text(opts, "medical")?,
            all_medical,
        },
    })
}

/// The rows of `table(...)` as JSON objects, failing on anything but maps.
fn row_objects(rows: Array) -> RhaiResult<Vec<serde_json::Map<String, serde_json::Value>>> {
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| match to_json(&row) {
            serde_json::Value::Object(fields) if row.is_map() => Ok(fields),
            _ => Err(error(format!(
                "table: row {i} is {}, not a map #{{ column: value, … }}",
                row.type_name()
            ))),
        })
        .collect()
}

#[export_module]
mod data_functions {
    use super::*;

    /// Loads a dataset into the Items table. `kind` is `medqa`, `mmlu`, `cmmlu`, `mmlu_pro`,
    /// `gsm8k`, or `jsonl` / `json` / `csv` / `parquet` for a file of your own (the kind
    /// decides the format, whatever the file's extension; `json` reads a file whose first
    /// line is a complete JSON object and which has more lines as JSON lines, as many
    /// published datasets ship them); `path` is the dataset's root directory (in its
    /// published layout) or one file. The split is `test`.
    #[rhai_fn(name = "load", return_raw)]
    pub fn load_kind(kind: &str, path: &str) -> RhaiResult<DataFrame> {
        data::load(kind, Path::new(path), &LoadOptions::default()).map_err(error)
    }

    /// Loads a dataset with options: `split` (`test`, `train`, `dev`, `val`/`validation`),
    /// `subjects` (array: keep these), and for your own files a column mapping — `question`,
    /// `choices` (a list column, or an array of one column per option), `answer` (letter,
    /// option text or index; a number for open answers), `answer_index` (`0` or `1`: how
    /// a numeric answer counts the options, required when answers are numbers: `1` means
    /// A under `answer_index: 1` and B under `answer_index: 0`; an index out of range is
    /// an error naming the line), `answer_text`, `subject`, `category`, `rationale`, `id`,
    /// `medical` (a boolean column), `all_medical` (true: every row is medical), `name`
    /// (the dataset name; default the file stem).
    #[rhai_fn(name = "load", return_raw)]
    pub fn load_kind_with(kind: &str, path: &str, options: Map) -> RhaiResult<DataFrame> {
        data::load(kind, Path::new(path), &load_options(&options)?).map_err(error)
    }

    /// Reads a table file as it is: `.parquet`, `.csv` (with a header), `.json` (an array of
    /// objects) or `.jsonl`.
    #[rhai_fn(name = "load", return_raw)]
    pub fn load_table(path: &str) -> RhaiResult<DataFrame> {
        data::table::read(Path::new(path)).map_err(error)
    }

    /// A table from an array of maps, one row each: one column per key, in the order the
    /// keys first appear (maps list their keys alphabetically), types inferred from the
    /// values, e.g. `table([#{ q: "2+2", a: 4 }, #{ q: "3+5", a: 8 }])`.
    #[rhai_fn(name = "table", return_raw)]
    pub fn table_of(rows: Array) -> RhaiResult<DataFrame> {
        data::table::from_rows(&row_objects(rows)?, None).map_err(|e| error(format!("table: {e}")))
    }

    /// A table from an array of maps with the columns `columns`, in that order.
    #[rhai_fn(name = "table", return_raw)]
    pub fn table_with(rows: Array, columns: Array) -> RhaiResult<DataFrame> {
        let columns = strings(columns, "columns")?;
        data::table::from_rows(&row_objects(rows)?, Some(&columns))
            .map_err(|e| error(format!("table: {e}")))
    }

    /// The number of rows.
    #[rhai_fn(pure)]
    pub fn len(table: &mut DataFrame) -> i64 {
        table.height() as i64
    }

    /// The column names.
    #[rhai_fn(pure)]
    pub fn columns(table: &mut DataFrame) -> Array {
        table
            .get_column_names()
            .into_iter()
            .map(|n| n.to_string().into())
            .collect()
    }

    /// The first `n` rows.
    #[rhai_fn(pure, return_raw)]
    pub fn head(table: &mut DataFrame, n: i64) -> RhaiResult<DataFrame> {
        Ok(table.head(Some(count(n, "n")?)))
    }

    /// The last `n` rows.
    #[rhai_fn(pure, return_raw)]
    pub fn tail(table: &mut DataFrame, n: i64) -> RhaiResult<DataFrame> {
        Ok(table.tail(Some(count(n, "n")?)))
    }

    /// `n` rows drawn without replacement, in random order; the same `seed` always draws
    /// the same rows.
    #[rhai_fn(pure, return_raw)]
    pub fn sample(table: &mut DataFrame, n: i64, seed: i64) -> RhaiResult<DataFrame> {
        data::table::sample(table, count(n, "n")?, seed as u64).map_err(error)
    }

    /// `n` rows drawn without replacement so that each value of `column` keeps its share of
    /// the table.
    #[rhai_fn(pure, return_raw)]
    pub fn stratified_sample(
        table: &mut DataFrame,
        column: &str,
        n: i64,
        seed: i64,
    ) -> RhaiResult<DataFrame> {
        data::table::stratified_sample(table, column, count(n, "n")?, seed as u64).map_err(error)
    }

    /// At most `n` rows for each value of `column`, drawn without replacement.
    #[rhai_fn(pure, return_raw)]
    pub fn sample_per_group(
        table: &mut DataFrame,
        column: &str,
        n: i64,
        seed: i64,
    ) -> RhaiResult<DataFrame> {
        data::table::sample_per_group(table, column, count(n, "n")?, seed as u64).map_err(error)
    }

    /// Runs a polars SQL query over the table, which the query names `self`, e.g.
    /// `t.sql("SELECT subject, count(*) AS n FROM self GROUP BY subject")`.
    #[rhai_fn(pure, return_raw)]
    pub fn sql(table: &mut DataFrame, query: &str) -> RhaiResult<DataFrame> {
        data::table::sql(table, query).map_err(error)
    }

    /// Stacks an array of tables; a column missing from some is filled with nulls.
    #[rhai_fn(name = "concat", return_raw)]
    pub fn concat_all(tables: Array) -> RhaiResult<DataFrame> {
        let tables = tables
            .into_iter()
            .map(|t| {
                let name = t.type_name();
                t.try_cast::<DataFrame>()
                    .ok_or_else(|| error(format!("concat takes tables, not {name}")))
            })
            .collect::<RhaiResult<Vec<_>>>()?;
        data::table::concat(&tables).map_err(error)
    }

    /// This table with `other`'s rows after it.
    #[rhai_fn(name = "concat", pure, return_raw)]
    pub fn concat_two(table: &mut DataFrame, other: DataFrame) -> RhaiResult<DataFrame> {
        data::table::concat(&[table.clone(), other]).map_err(error)
    }

    /// Writes the table to `path`; the extension picks the format: `.parquet`, `.csv` (list
    /// cells as JSON text), `.json` (an array of row objects) or `.jsonl` (one object per
    /// line). Folders are created. Under `rlvr run` the file is listed in the run's manifest.
    #[rhai_fn(pure, return_raw)]
    pub fn save(table: &mut DataFrame, path: &str) -> RhaiResult<()> {
        data::table::save(table, Path::new(path)).map_err(error)?;
        crate::report::RunRecord::note_file(Path::new(path));
        Ok(())
    }

    /// The values of one column as an array.
    #[rhai_fn(pure, return_raw)]
    pub fn column(table: &mut DataFrame, name: &str) -> RhaiResult<Array> {
        let column = table.column(name).map_err(error)?;
        Ok(column
            .as_materialized_series()
            .iter()
            .map(|v| from_json(data::records::any_to_json(&v)))
            .collect())
    }

    /// Row `i` (0-based) as a map from column name to value.
    #[rhai_fn(pure, return_raw)]
    pub fn row(table: &mut DataFrame, i: i64) -> RhaiResult<Map> {
        let i = count(i, "i")?;
        let values = table.get(i).ok_or_else(|| {
            error(format!(
                "row {i} is out of range for a table of {} rows",
                table.height()
            ))
        })?;
        Ok(table
            .get_column_names()
            .into_iter()
            .zip(values)
            .map(|(name, v)| {
                (
                    name.as_str().into(),
                    from_json(data::records::any_to_json(&v)),
                )
            })
            .collect())
    }

    /// Keeps only the named columns, in the order given.
    #[rhai_fn(pure, return_raw)]
    pub fn select(table: &mut DataFrame, names: Array) -> RhaiResult<DataFrame> {
        table.select(strings(names, "names")?).map_err(error)
    }

    /// The table as text (its first and last rows and its shape).
    #[rhai_fn(global, name = "to_string", pure)]
    pub fn to_string(table: &mut DataFrame) -> String {
        format!("{table}")
    }

    /// The table as text, for `debug`.
    #[rhai_fn(global, name = "to_debug", pure)]
    pub fn to_debug(table: &mut DataFrame) -> String {
        format!("{table}")
    }
}
