//! MedQA (USMLE): JSON Lines with `question`, `options` (an object keyed `A`, `B`, …),
//! `answer_idx` (the letter), `answer` (the option text) and `meta_info` (`step1`,
//! `step2&3`), as in `US/4_options/phrases_no_exclude_<split>.jsonl` of the publisher.

use std::path::Path;

use polars::prelude::*;
use serde_json::Value;

use super::error::{DataError, Result};
use super::items::{letter, letter_index, Item, ItemsBuilder};
use super::records::{json_kind, read_jsonl};
use super::resolve_split_file;

/// Loads MedQA's `split` from `root`: a jsonl file, or the dataset root holding
/// `US/4_options/phrases_no_exclude_<split>.jsonl` (or `<split>.jsonl`).
pub fn load(root: &Path, split: &str) -> Result<DataFrame> {
    let path = resolve_split_file(
        root,
        split,
        &[
            format!("US/4_options/phrases_no_exclude_{split}.jsonl"),
            format!("4_options/phrases_no_exclude_{split}.jsonl"),
            format!("phrases_no_exclude_{split}.jsonl"),
            format!("{split}.jsonl"),
        ],
    )?;
    let mut builder = ItemsBuilder::new();
    for (row, record) in read_jsonl(&path)?.into_iter().enumerate() {
        let at = record.at;
        let question = record.text(&path, "question")?;
        let Value::Object(options) = record.get(&path, "options")? else {
            return Err(DataError::field(
                &path,
                at,
                "options",
                "expected an object keyed by option letters",
            ));
        };
        let mut choices = Vec::with_capacity(options.len());
        for i in 0..options.len() {
            let key = letter(i);
            match options.get(&key) {
                Some(Value::String(text)) => choices.push(text.clone()),
                Some(other) => {
                    return Err(DataError::field(
                        &path,
                        at,
                        &format!("options.{key}"),
                        format!("expected text, found {}", json_kind(other)),
                    ))
                }
                None => {
                    return Err(DataError::field(
                        &path,
                        at,
                        "options",
                        format!("option letters must run A, B, C, …; `{key}` is missing"),
                    ))
                }
            }
        }
        let answer = record.text(&path, "answer_idx")?.trim().to_string();
        let index = letter_index(&answer)
            .filter(|&i| i < choices.len())
            .ok_or_else(|| {
                DataError::field(
                    &path,
                    at,
                    "answer_idx",
                    format!(
                        "`{answer}` is not one of the option letters A–{}",
                        letter(choices.len().saturating_sub(1))
                    ),
                )
            })?;
        let subject = record
            .opt_text(&path, "meta_info")?
            .unwrap_or_else(|| "medqa".to_string());
        let choices: Vec<&str> = choices.iter().map(String::as_str).collect();
        builder.push(&Item {
            id: &format!("medqa/{split}/{row}"),
            dataset: "medqa",
            split,
            subject: &subject,
            category: "medicine",
            medical: true,
            medical_ext: true,
            question: &question,
            choices: &choices,
            answer: &answer,
            answer_text: choices[index],
            rationale: None,
        });
    }
    builder.finish(vec![])
}
