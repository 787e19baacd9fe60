//! Contamination check: which benchmark rows share long n-grams with a training question.
//!
//! As the GPT-3 paper's and lm-evaluation-harness's decontamination notes do, texts are
//! normalised (lower case, every character that is not a letter or a digit a separator) and
//! cut into word n-grams (13 by default); a benchmark row overlaps a training question when
//! they share at least one n-gram. A question's text is its question followed by its
//! choices, so a copied question with reordered options still overlaps.

use std::collections::{HashMap, HashSet};

use polars::prelude::{Column, DataFrame};

use crate::data::question::Question;

/// The words of `text` after normalisation: lower case, split at every character that is
/// not alphanumeric.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The distinct word n-grams of `text`, each joined by single spaces. A text shorter than
/// `n` words gives none.
pub fn ngrams(text: &str, n: usize) -> HashSet<String> {
    let w = words(text);
    if n == 0 || w.len() < n {
        return HashSet::new();
    }
    w.windows(n).map(|g| g.join(" ")).collect()
}

fn full_text(q: &Question) -> String {
    let mut text = q.question.clone();
    for c in &q.choices {
        text.push('\n');
        text.push_str(c);
    }
    text
}

/// One row per (training question, benchmark row) pair that shares at least one n-gram:
/// `id` (the training question), `benchmark_id`, `benchmark_dataset`, `shared` (how many
/// distinct n-grams they share) and `example` (the first shared n-gram in the training
/// question's word order). Pairs come in training order, then benchmark order.
pub fn overlap(train: &[Question], benchmark: &[Question], n: usize) -> DataFrame {
    // each benchmark n-gram → the benchmark rows holding it
    let mut index: HashMap<String, Vec<usize>> = HashMap::new();
    for (row, q) in benchmark.iter().enumerate() {
        for g in ngrams(&full_text(q), n) {
            index.entry(g).or_default().push(row);
        }
    }
    let (mut id, mut bench_id, mut bench_dataset, mut shared, mut example) =
        (vec![], vec![], vec![], vec![], vec![]);
    for q in train {
        let w = words(&full_text(q));
        if w.len() < n || n == 0 {
            continue;
        }
        // per benchmark row: the count of distinct shared n-grams and the first one
        let mut hits: HashMap<usize, (u32, String)> = HashMap::new();
        let mut seen = HashSet::new();
        for g in w.windows(n).map(|g| g.join(" ")) {
            if !seen.insert(g.clone()) {
                continue;
            }
            for &row in index.get(&g).into_iter().flatten() {
                let hit = hits.entry(row).or_insert_with(|| (0, g.clone()));
                hit.0 += 1;
            }
        }
        let mut rows: Vec<_> = hits.into_iter().collect();
        rows.sort_by_key(|(row, _)| *row);
        for (row, (count, first)) in rows {
            id.push(q.id.clone());
            bench_id.push(benchmark[row].id.clone());
            bench_dataset.push(benchmark[row].dataset.clone());
            shared.push(count);
            example.push(first);
        }
    }
    let height = id.len();
    DataFrame::new(
        height,
        vec![
            Column::new("id".into(), id),
            Column::new("benchmark_id".into(), bench_id),
            Column::new("benchmark_dataset".into(), bench_dataset),
            Column::new("shared".into(), shared),
            Column::new("example".into(), example),
        ],
    )
    .expect("columns of equal length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: &str, text: &str, choices: &[&str]) -> Question {
        Question {
            id: id.into(),
            dataset: "d".into(),
            question: text.into(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
            ..Question::default()
        }
    }

    #[test]
    fn words_are_normalised() {
        assert_eq!(
            words("A 45-year-old MAN, with fever (39°C)."),
            ["a", "45", "year", "old", "man", "with", "fever", "39", "c"]
        );
    }

    #[test]
    fn a_copied_question_overlaps_and_a_different_one_does_not() {
        let long = "A 45-year-old man comes to the emergency department because of chest pain \
                    that began two hours ago while he was shovelling snow";
        let train = [
            q("t/0", long, &["Aspirin", "Heparin"]),
            q("t/1", "What is 2 + 2?", &[]),
        ];
        let bench = [
            q(
                "b/0",
                "Which drug lowers blood pressure in pregnancy?",
                &["Labetalol"],
            ),
            // the same question, other case and punctuation, other options
            q(
                "b/1",
                &long.to_uppercase().replace(' ', "  "),
                &["Morphine"],
            ),
        ];
        let t = overlap(&train, &bench, 13);
        assert_eq!(t.height(), 1);
        let get = |c: &str| t.column(c).unwrap().get(0).unwrap().to_string();
        assert_eq!(get("id"), "\"t/0\"");
        assert_eq!(get("benchmark_id"), "\"b/1\"");
        // 24 words give 12 distinct 13-grams, all shared
        assert_eq!(get("shared"), "12");
        assert_eq!(
            get("example"),
            "\"a 45 year old man comes to the emergency department because of chest\""
        );
        // a 25-gram window is longer than the question: nothing can overlap
        assert_eq!(overlap(&train, &bench, 25).height(), 0);
    }
}
