//! Answer extraction and comparison as lm-evaluation-harness does them: its `regex` filter
//! (Python's `findall`, a chosen match, its first non-empty group, stripped), its
//! `exact_match` metric (patterns removed, case and punctuation optionally ignored), plus
//! the study's verifier from `rlvr::reward` and a seeded random fallback.
//!
//! Patterns run on the `regex` crate (through polars' compiled-pattern cache), whose syntax
//! and leftmost-first semantics agree with Python's `re` on the patterns the presets use;
//! look-around is not supported and is refused when a preset is read.

use polars::polars_utils::regex_cache::compile_regex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::preset::{Fallback, Filter, Metric, MetricKind, Step};
use crate::data::items::letter;
use crate::data::question::Question;
use crate::reward;

/// Fails with the compiler's message when `pattern` is not a valid pattern.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    compile_regex(pattern)
        .map(|_| ())
        .map_err(|e| format!("bad pattern `{pattern}`: {e}"))
}

/// lm-eval's `regex` filter on one response: the `select`-th of all non-overlapping
/// matches (negative counts from the end), its first non-empty capture group (the whole
/// match when the pattern has no group), stripped; `None` when nothing matches.
pub fn regex_select(pattern: &str, select: i64, text: &str) -> Option<String> {
    let re = compile_regex(pattern).ok()?;
    let groups = re.captures_len() > 1;
    let matches: Vec<_> = re.captures_iter(text).collect();
    let index = if select < 0 {
        matches.len().checked_sub(select.unsigned_abs() as usize)?
    } else {
        select as usize
    };
    let caps = matches.get(index)?;
    let found = if groups {
        // findall gives the tuple of groups; lm-eval keeps the first non-empty one and
        // falls back when all are empty; a single group is returned as it is (even empty)
        if re.captures_len() == 2 {
            caps.get(1).map_or("", |m| m.as_str()).to_string()
        } else {
            match (1..re.captures_len())
                .find_map(|g| caps.get(g).filter(|m| !m.as_str().is_empty()))
            {
                Some(m) => m.as_str().to_string(),
                None => return None,
            }
        }
    } else {
        caps.get(0).map_or("", |m| m.as_str()).to_string()
    };
    Some(python_strip(&found).to_string())
}

/// Python's `str.strip()`: drops leading and trailing characters that Python counts as
/// whitespace.
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
}

/// What a filter found in one response.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The answer found (`None`: nothing matched and there is no fallback).
    pub pred: Option<String>,
    /// Which step found it: `<filter>:<step number>`, `random`, or `None`.
    pub rule: Option<String>,
}

/// Runs `filter` on `response` to `question`; `seed` drives the random fallback.
pub fn apply(filter: &Filter, response: &str, question: &Question, seed: u64) -> Extracted {
    for (n, step) in filter.steps.iter().enumerate() {
        let found = match step {
            Step::Regex { regex, select } => regex_select(regex, *select, response),
            Step::Study { .. } => study_answer(response, question),
        };
        if let Some(pred) = found {
            return Extracted {
                pred: Some(pred),
                rule: Some(format!("{}:{}", filter.name, n + 1)),
            };
        }
    }
    match filter.fallback {
        Fallback::Random if !question.choices.is_empty() => Extracted {
            pred: Some(random_letter(question, seed)),
            rule: Some("random".into()),
        },
        _ => Extracted {
            pred: None,
            rule: None,
        },
    }
}

/// The study's reading of a response: the option letter (`rlvr::reward::answer_letter`) for
/// multiple choice, else the number (inside `<answer>` tags, after `####`, or the last one).
pub fn study_answer(response: &str, question: &Question) -> Option<String> {
    if question.choices.is_empty() {
        let source = reward::answer_tag(response)
            .or_else(|| response.rsplit_once("####").map(|(_, after)| after))
            .unwrap_or(response);
        reward::last_number(source)
    } else {
        reward::answer_letter(response, question.choices.len()).map(String::from)
    }
}

/// A letter among the question's options, drawn from `seed` and the item id (so a rerun or
/// a resumed run draws the same letter).
pub fn random_letter(question: &Question, seed: u64) -> String {
    let digest = Sha256::digest(format!("{seed}\n{}", question.id).as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    let mut rng = ChaCha8Rng::seed_from_u64(u64::from_le_bytes(bytes));
    letter(rng.random_range(0..question.choices.len().max(1)))
}

/// Whether `pred` answers `question` under `metric`; `response` is the whole completion
/// (the study's metric reads it itself).
pub fn is_correct(
    metric: &Metric,
    pred: Option<&str>,
    response: &str,
    question: &Question,
) -> bool {
    match metric.kind {
        MetricKind::Study => reward::is_correct(response, question),
        MetricKind::Letter => pred.is_some_and(|p| p == question.answer.trim()),
        MetricKind::ExactMatch => match pred {
            None => false,
            Some(p) => normalise(metric, p) == normalise(metric, &question.answer),
        },
    }
}

/// lm-eval's `exact_match` preprocessing of one side: each ignored pattern removed (in
/// order), then lower case, then ASCII punctuation dropped.
pub fn normalise(metric: &Metric, text: &str) -> String {
    let mut text = text.to_string();
    for pattern in &metric.ignore {
        if let Ok(re) = compile_regex(pattern) {
            text = re.replace_all(&text, "").into_owned();
        }
    }
    if metric.ignore_case {
        text = text.to_lowercase();
    }
    if metric.ignore_punctuation {
        text.retain(|c| !c.is_ascii_punctuation());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findall_semantics() {
        let strict = r"#### (\-?[0-9\.\,]+)";
        assert_eq!(
            regex_select(strict, 0, "so #### 1,234.\n"),
            Some("1,234.".into())
        );
        assert_eq!(regex_select(strict, 0, "no answer"), None);
        let flexible = r"(-?[$0-9.,]{2,})|(-?[0-9]+)";
        assert_eq!(
            regex_select(flexible, -1, "3 apples cost $12.50, 7"),
            Some("7".into())
        );
        assert_eq!(
            regex_select(flexible, -1, "it is $1,000."),
            Some("$1,000.".into())
        );
        assert_eq!(
            regex_select(r"(?s)\b[A-J]\b", -1, "A or\nB"),
            Some("B".into())
        );
        assert_eq!(
            regex_select(r"answer is \(?([A-J])\)?", 0, "the answer is (C)."),
            Some("C".into())
        );
    }

    #[test]
    fn exact_match_follows_lm_eval() {
        let gsm = Metric {
            kind: MetricKind::ExactMatch,
            ignore_case: true,
            ignore_punctuation: false,
            ignore: vec![
                ",".into(),
                "\\$".into(),
                "(?s).*#### ".into(),
                "\\.$".into(),
            ],
        };
        assert_eq!(normalise(&gsm, "$1,234."), "1234");
        assert_eq!(normalise(&gsm, "work\n#### 72"), "72");
        let q = Question {
            answer: "1234".into(),
            ..Question::default()
        };
        assert!(is_correct(&gsm, Some("$1,234."), "", &q));
        assert!(!is_correct(&gsm, Some("1234.0"), "", &q));
        assert!(!is_correct(&gsm, None, "", &q));
    }

    #[test]
    fn random_fallback_is_seeded_by_item() {
        let q = Question {
            id: "mmlu_pro/test/7".into(),
            choices: vec!["a".into(); 10],
            ..Question::default()
        };
        assert_eq!(random_letter(&q, 1), random_letter(&q, 1));
        let letters: std::collections::HashSet<String> =
            (0..50).map(|s| random_letter(&q, s)).collect();
        assert!(letters.len() > 5);
    }
}
