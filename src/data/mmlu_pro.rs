//! MMLU-Pro: the published parquet (`data/<split>-00000-of-00001.parquet`) or the same
//! records as JSON / JSON Lines: `question_id`, `question`, `options` (3–10 texts),
//! `answer` (letter), `answer_index`, `cot_content`, `category`, `src`.

use std::path::Path;

use polars::prelude::*;

use super::categories;
use super::error::{DataError, Location, Result};
use super::items::{letter, letter_index, Item, ItemsBuilder};
use super::records::{self, read_records};
use super::resolve_split_file;

/// Loads MMLU-Pro's `split` (`test` or `validation`) from `root`: a parquet/json/jsonl file,
/// or the dataset root holding `data/<split>-00000-of-00001.parquet`. Keeps `src`.
pub fn load(root: &Path, split: &str) -> Result<DataFrame> {
    let split = match split {
        "val" => "validation",
        other => other,
    };
    let path = resolve_split_file(
        root,
        split,
        &[
            format!("data/{split}-00000-of-00001.parquet"),
            format!("{split}-00000-of-00001.parquet"),
            format!("{split}.parquet"),
            format!("{split}.json"),
            format!("{split}.jsonl"),
        ],
    )?;
    let rows = if records::extension(&path) == "parquet" {
        parquet_rows(&path)?
    } else {
        json_rows(&path)?
    };
    let mut builder = ItemsBuilder::new();
    let mut sources = Vec::with_capacity(rows.len());
    for row in rows {
        let at = row.at;
        let info = categories::mmlu_pro(&row.category).ok_or_else(|| {
            DataError::field(
                &path,
                at,
                "category",
                format!("unknown MMLU-Pro category `{}`", row.category),
            )
        })?;
        let answer = row.answer.trim().to_string();
        let index = letter_index(&answer)
            .filter(|&i| i < row.options.len())
            .ok_or_else(|| {
                DataError::field(
                    &path,
                    at,
                    "answer",
                    format!(
                        "`{answer}` is not one of the option letters A–{}",
                        letter(row.options.len().saturating_sub(1))
                    ),
                )
            })?;
        let choices: Vec<&str> = row.options.iter().map(String::as_str).collect();
        builder.push(&Item {
            id: &format!("mmlu_pro/{split}/{}", row.question_id),
            dataset: "mmlu_pro",
            split,
            subject: &row.category,
            category: &row.category,
            medical: info.medical,
            medical_ext: info.medical_ext,
            question: &row.question,
            choices: &choices,
            answer: &answer,
            answer_text: choices[index],
            rationale: row.cot_content.as_deref().filter(|c| !c.is_empty()),
        });
        sources.push(row.src);
    }
    builder.finish(vec![Column::new("src".into(), sources)])
}

/// One MMLU-Pro record, whatever file it came from.
struct ProRow {
    at: Location,
    question_id: String,
    question: String,
    options: Vec<String>,
    answer: String,
    cot_content: Option<String>,
    category: String,
    src: Option<String>,
}

fn json_rows(path: &Path) -> Result<Vec<ProRow>> {
    read_records(path)?
        .into_iter()
        .map(|r| {
            Ok(ProRow {
                at: r.at,
                question_id: r.text(path, "question_id")?,
                question: r.text(path, "question")?,
                options: r.text_list(path, "options")?,
                answer: r.text(path, "answer")?,
                cot_content: r.opt_text(path, "cot_content")?,
                category: r.text(path, "category")?,
                src: r.opt_text(path, "src")?,
            })
        })
        .collect()
}

/// The rows of the published parquet, read column by column.
fn parquet_rows(path: &Path) -> Result<Vec<ProRow>> {
    let df = records::read_parquet_frame(path)?;
    let column = |name: &str| {
        df.column(name)
            .map(|c| c.as_materialized_series().clone())
            .map_err(|_| DataError::field(path, Location::Row(0), name, "missing column"))
    };
    let texts = |name: &str| -> Result<Vec<Option<String>>> {
        let s = column(name)?;
        let s = s
            .cast(&DataType::String)
            .map_err(|e| DataError::polars(format!("{}: column `{name}`", path.display()), e))?;
        Ok(s.str()
            .expect("cast to String")
            .iter()
            .map(|v| v.map(str::to_string))
            .collect())
    };
    let required = |name: &str| -> Result<Vec<String>> {
        texts(name)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                v.ok_or_else(|| DataError::field(path, Location::Row(i), name, "is null"))
            })
            .collect()
    };
    let options_column = column("options")?;
    let options = options_column.list().map_err(|_| {
        DataError::field(
            path,
            Location::Row(0),
            "options",
            "expected a list of texts",
        )
    })?;
    let mut option_lists = Vec::with_capacity(df.height());
    for (i, item) in options.amortized_iter().enumerate() {
        let item =
            item.ok_or_else(|| DataError::field(path, Location::Row(i), "options", "is null"))?;
        let values = item.as_ref().str().map_err(|_| {
            DataError::field(
                path,
                Location::Row(i),
                "options",
                "expected a list of texts",
            )
        })?;
        option_lists.push(
            values
                .iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect(),
        );
    }
    let ids = required("question_id")?;
    let questions = required("question")?;
    let answers = required("answer")?;
    let categories = required("category")?;
    let cots = texts("cot_content")?;
    let srcs = texts("src")?;
    Ok((0..df.height())
        .zip(option_lists)
        .map(|(i, options)| ProRow {
            at: Location::Row(i),
            question_id: ids[i].clone(),
            question: questions[i].clone(),
            options,
            answer: answers[i].clone(),
            cot_content: cots[i].clone(),
            category: categories[i].clone(),
            src: srcs[i].clone(),
        })
        .collect())
}
