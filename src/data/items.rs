//! The Items table: one row per question, the same columns whatever the dataset.
//!
//! Columns (in this order): `id` (stable across runs, from position:
//! `dataset/split/subject/row` for per-subject files, `dataset/split/row` for single-file
//! datasets, MMLU-Pro's `mmlu_pro/split/question_id`), `dataset`, `split`, `subject`,
//! `category`, `medical`, `medical_ext`, `question`, `choices` (list of text; empty for open
//! answers), `answer` (always text: a letter, or a normalised number), `answer_text`,
//! `rationale` (nullable). Loaders may add columns after these (CMMLU's `china_specific`).

use polars::prelude::*;

use super::error::{DataError, Result};

/// The Items columns every loader writes, in order.
pub const ITEMS_COLUMNS: [&str; 12] = [
    "id",
    "dataset",
    "split",
    "subject",
    "category",
    "medical",
    "medical_ext",
    "question",
    "choices",
    "answer",
    "answer_text",
    "rationale",
];

/// One question, as a loader reads it (borrowed: the builder copies it into columns).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Item<'a> {
    /// Stable identifier (see the module docs).
    pub id: &'a str,
    /// Dataset name, e.g. `mmlu`.
    pub dataset: &'a str,
    /// Split name, e.g. `test`.
    pub split: &'a str,
    /// Subject (MMLU/CMMLU file name, MedQA `meta_info`, MMLU-Pro category, `math`).
    pub subject: &'a str,
    /// Primary group of the subject.
    pub category: &'a str,
    /// In the core medical subset.
    pub medical: bool,
    /// In the extended medical subset.
    pub medical_ext: bool,
    /// The question text.
    pub question: &'a str,
    /// Option texts, in letter order; empty for open answers.
    pub choices: &'a [&'a str],
    /// The answer: a letter for multiple choice, a normalised number or text otherwise.
    pub answer: &'a str,
    /// The text of the answer.
    pub answer_text: &'a str,
    /// A worked solution, when the dataset has one.
    pub rationale: Option<&'a str>,
}

/// Builds the Items DataFrame column by column as items arrive.
pub struct ItemsBuilder {
    text: [StringChunkedBuilder; 8],
    medical: Vec<bool>,
    medical_ext: Vec<bool>,
    choices: ListStringChunkedBuilder,
    rationale: StringChunkedBuilder,
    len: usize,
}

/// The text columns, in the order of [`ItemsBuilder`]'s builders.
const TEXT_COLUMNS: [&str; 8] = [
    "id",
    "dataset",
    "split",
    "subject",
    "category",
    "question",
    "answer",
    "answer_text",
];

impl Default for ItemsBuilder {
    fn default() -> Self {
        ItemsBuilder {
            text: TEXT_COLUMNS.map(|name| StringChunkedBuilder::new(name.into(), 1024)),
            medical: Vec::new(),
            medical_ext: Vec::new(),
            choices: ListStringChunkedBuilder::new("choices".into(), 1024, 4096),
            rationale: StringChunkedBuilder::new("rationale".into(), 1024),
            len: 0,
        }
    }
}

impl ItemsBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one item.
    pub fn push(&mut self, item: &Item) {
        let texts = [
            item.id,
            item.dataset,
            item.split,
            item.subject,
            item.category,
            item.question,
            item.answer,
            item.answer_text,
        ];
        for (builder, value) in self.text.iter_mut().zip(texts) {
            builder.append_value(value);
        }
        self.medical.push(item.medical);
        self.medical_ext.push(item.medical_ext);
        self.choices
            .append_values_iter(item.choices.iter().copied());
        self.rationale.append_option(item.rationale);
        self.len += 1;
    }

    /// Builds the table, with `extra` columns (of the same length) after the Items columns.
    pub fn finish(self, extra: Vec<Column>) -> Result<DataFrame> {
        let [id, dataset, split, subject, category, question, answer, answer_text] =
            self.text.map(|b| b.finish().into_column());
        let mut choices = self.choices;
        let mut columns = vec![
            id,
            dataset,
            split,
            subject,
            category,
            Column::new("medical".into(), self.medical),
            Column::new("medical_ext".into(), self.medical_ext),
            question,
            choices.finish().into_column(),
            answer,
            answer_text,
            self.rationale.finish().into_column(),
        ];
        columns.extend(extra);
        DataFrame::new(self.len, columns)
            .map_err(|e| DataError::polars("building the Items table", e))
    }
}

/// The letter of the `i`-th option: 0 → `A`.
pub fn letter(i: usize) -> String {
    char::from(b'A' + i as u8).to_string()
}

/// The 0-based option index of a letter (`A` → 0), if it is one upper-case letter.
pub fn letter_index(letter: &str) -> Option<usize> {
    match letter.as_bytes() {
        [b] if b.is_ascii_uppercase() => Some((b - b'A') as usize),
        _ => None,
    }
}

/// Normalises a numeric answer as GSM8K scoring does: drops thousands separators, a
/// currency sign and a trailing full stop, and writes `18.00` as `18`. Text that is not a
/// number comes back trimmed.
pub fn normalize_number(text: &str) -> String {
    let cleaned: String = text
        .trim()
        .chars()
        .filter(|c| *c != ',' && *c != '$')
        .collect();
    let cleaned = cleaned.trim_end_matches('.').to_string();
    match cleaned.parse::<f64>() {
        Ok(v) if v.is_finite() && cleaned.contains('.') && v.fract() == 0.0 => {
            format!("{}", v as i64)
        }
        _ => cleaned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_round_trip() {
        assert_eq!(letter(0), "A");
        assert_eq!(letter(9), "J");
        assert_eq!(letter_index("J"), Some(9));
        assert_eq!(letter_index("a"), None);
        assert_eq!(letter_index("AB"), None);
    }

    #[test]
    fn numbers_normalise_like_gsm8k_scoring() {
        assert_eq!(normalize_number(" 1,000 "), "1000");
        assert_eq!(normalize_number("$18."), "18");
        assert_eq!(normalize_number("18.00"), "18");
        assert_eq!(normalize_number("-3.5"), "-3.5");
        assert_eq!(normalize_number("n/a"), "n/a");
    }

    #[test]
    fn builder_writes_the_items_columns_in_order() {
        let mut b = ItemsBuilder::new();
        b.push(&Item {
            id: "x/test/0",
            choices: &["a", "b"],
            answer: "B",
            ..Item::default()
        });
        let df = b.finish(vec![]).unwrap();
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(names, ITEMS_COLUMNS);
        assert_eq!(df.height(), 1);
    }
}
