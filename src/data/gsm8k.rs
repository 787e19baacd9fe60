//! GSM8K: JSON Lines with `question` and `answer`, the answer a worked solution ending in a
//! line `#### <number>`.

use std::path::Path;

use polars::prelude::*;

use super::error::{DataError, Result};
use super::items::{normalize_number, Item, ItemsBuilder};
use super::records::read_jsonl;
use super::resolve_split_file;

/// Loads GSM8K's `split` from `root`: a jsonl file, or a directory holding `<split>.jsonl`.
/// `answer` is the normalised number after `####`; `rationale` the solution before it;
/// `solution` the published answer text whole (lm-evaluation-harness's few-shot target).
pub fn load(root: &Path, split: &str) -> Result<DataFrame> {
    let path = resolve_split_file(root, split, &[format!("{split}.jsonl")])?;
    let mut builder = ItemsBuilder::new();
    let mut solutions = Vec::new();
    for (row, record) in read_jsonl(&path)?.into_iter().enumerate() {
        let question = record.text(&path, "question")?;
        let solution = record.text(&path, "answer")?;
        let (rationale, number) = solution.rsplit_once("####").ok_or_else(|| {
            DataError::field(
                &path,
                record.at,
                "answer",
                "has no final `#### <number>` line",
            )
        })?;
        let answer = normalize_number(number);
        if answer.is_empty() {
            return Err(DataError::field(
                &path,
                record.at,
                "answer",
                "the `####` line holds no number",
            ));
        }
        builder.push(&Item {
            id: &format!("gsm8k/{split}/{row}"),
            dataset: "gsm8k",
            split,
            subject: "math",
            category: "math",
            medical: false,
            medical_ext: false,
            question: &question,
            choices: &[],
            answer: &answer,
            answer_text: &answer,
            rationale: Some(rationale.trim_end()),
        });
        solutions.push(solution);
    }
    builder.finish(vec![Column::new("solution".into(), solutions)])
}
