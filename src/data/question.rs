//! Items rows read back as owned values, for engines that work question by question
//! (judging, training, evaluation).

use polars::prelude::*;

use super::error::{DataError, Result};

/// One row of an Items table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Question {
    /// Stable identifier.
    pub id: String,
    /// Dataset name.
    pub dataset: String,
    /// Subject.
    pub subject: String,
    /// Primary group of the subject.
    pub category: String,
    /// In the core medical subset.
    pub medical: bool,
    /// The question text.
    pub question: String,
    /// Option texts in letter order; empty for open answers.
    pub choices: Vec<String>,
    /// A letter, or a normalised number.
    pub answer: String,
    /// The text of the answer.
    pub answer_text: String,
}

/// Every row of an Items table (any table with its columns: `id`, `question`, `choices`,
/// `answer` are required; `dataset`, `subject`, `category`, `medical`, `answer_text` are
/// read when present). Fails naming the first missing or mistyped column.
pub fn questions(df: &DataFrame) -> Result<Vec<Question>> {
    let text = |name: &str, required: bool| -> Result<Option<Vec<Option<String>>>> {
        match df.column(name) {
            Ok(c) => {
                let s = c
                    .cast(&DataType::String)
                    .map_err(|e| column_error(name, e))?;
                let ca = s.str().map_err(|e| column_error(name, e))?;
                Ok(Some(ca.iter().map(|v| v.map(str::to_string)).collect()))
            }
            Err(_) if !required => Ok(None),
            Err(_) => Err(missing(df, name)),
        }
    };
    let ids = text("id", true)?.expect("required");
    let question = text("question", true)?.expect("required");
    let answer = text("answer", true)?.expect("required");
    let dataset = text("dataset", false)?;
    let subject = text("subject", false)?;
    let category = text("category", false)?;
    let answer_text = text("answer_text", false)?;
    let medical: Option<Vec<bool>> = match df.column("medical") {
        Ok(c) => Some(
            c.bool()
                .map_err(|e| column_error("medical", e))?
                .iter()
                .map(|v| v.unwrap_or(false))
                .collect(),
        ),
        Err(_) => None,
    };
    let choices_col = df.column("choices").map_err(|_| missing(df, "choices"))?;
    let choices_list = choices_col.list().map_err(|e| column_error("choices", e))?;
    let mut choices = Vec::with_capacity(df.height());
    for row in choices_list.amortized_iter() {
        let options = match row {
            Some(series) => series
                .as_ref()
                .str()
                .map_err(|e| column_error("choices", e))?
                .iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect(),
            None => vec![],
        };
        choices.push(options);
    }
    let get = |col: &Option<Vec<Option<String>>>, i: usize| -> String {
        col.as_ref().and_then(|c| c[i].clone()).unwrap_or_default()
    };
    Ok((0..df.height())
        .zip(choices)
        .map(|(i, choices)| Question {
            id: ids[i].clone().unwrap_or_default(),
            dataset: get(&dataset, i),
            subject: get(&subject, i),
            category: get(&category, i),
            medical: medical.as_ref().is_some_and(|m| m[i]),
            question: question[i].clone().unwrap_or_default(),
            choices,
            answer: answer[i].clone().unwrap_or_default(),
            answer_text: get(&answer_text, i),
        })
        .collect())
}

fn missing(df: &DataFrame, name: &str) -> DataError {
    let have: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    DataError::Option(format!(
        "the table has no `{name}` column (an Items table is needed; it has: {})",
        have.join(", ")
    ))
}

fn column_error(name: &str, e: PolarsError) -> DataError {
    DataError::Option(format!("column `{name}`: {e}"))
}
