//! Verifiable rewards: answer extraction and the checks shared by judging, GRPO training and
//! evaluation.
//!
//! The `open-medical-r1` preset reproduces that study's `rewards.py` literally, including its
//! regular-expression semantics: `accuracy` (the greedy `<answer>(.*)</answer>`: 2 when the
//! answer is the letter or `(letter)`, 1 when it starts with the answer text, ignoring case,
//! else 0), `format` (1 for `<think>…</think>\s?<answer>…</answer>` matched from the start,
//! plus 1 when it also reaches the end, a final newline allowed as Python's `$` does) and
//! `xmlcount` (0.25 for each of the four tags occurring exactly once).

use crate::data::items::{letter_index, normalize_number};
use crate::data::question::Question;

/// The reward names of the study's preset, in its order.
pub const STUDY_REWARDS: [&str; 3] = ["accuracy", "format", "xmlcount"];

/// The built-in rewards, by the name scripts use.
pub const BUILTIN_REWARDS: [&str; 6] = [
    "accuracy", "format", "xmlcount", "binary", "numeric", "length",
];

/// What a reward function sees of one completion.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    /// The completion's text (without the stop token).
    pub completion: &'a str,
    /// The question it answers.
    pub question: &'a Question,
    /// Its length in tokens.
    pub tokens: usize,
    /// The token budget it was sampled with.
    pub max_tokens: usize,
    /// Whether it ran out of budget instead of ending.
    pub truncated: bool,
}

/// A built-in reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// The study's accuracy: 2 (letter), 1 (answer text), 0.
    Accuracy,
    /// The study's format: soft + strict, 0 to 2.
    Format,
    /// The study's tag count: 0.25 per tag occurring once, 0 to 1.
    XmlCount,
    /// 1 when the answer (in `<answer>` tags, else the whole text) is the right letter or
    /// number, else 0.
    Binary,
    /// 1 when the final number (GSM8K style) equals the answer, else 0.
    Numeric,
    /// DAPO's soft overlong penalty: 0 up to the last fifth of the budget, then falling
    /// linearly to -1 at the budget.
    Length,
}

impl Builtin {
    /// The reward called `name` (`xmlcount_reward_func` is accepted for `xmlcount`).
    pub fn by_name(name: &str) -> Option<Builtin> {
        Some(match name {
            "accuracy" => Builtin::Accuracy,
            "format" => Builtin::Format,
            "xmlcount" | "xmlcount_reward_func" => Builtin::XmlCount,
            "binary" => Builtin::Binary,
            "numeric" => Builtin::Numeric,
            "length" => Builtin::Length,
            _ => return None,
        })
    }

    /// Its name in tables (a Metrics column is `reward_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Accuracy => "accuracy",
            Builtin::Format => "format",
            Builtin::XmlCount => "xmlcount",
            Builtin::Binary => "binary",
            Builtin::Numeric => "numeric",
            Builtin::Length => "length",
        }
    }

    /// The reward of one completion.
    pub fn score(self, s: &Scored) -> f64 {
        match self {
            Builtin::Accuracy => study_accuracy(
                s.completion,
                &s.question.answer,
                Some(&s.question.answer_text),
            ),
            Builtin::Format => study_format(s.completion),
            Builtin::XmlCount => xml_count(s.completion),
            Builtin::Binary => f64::from(u8::from(is_correct(s.completion, s.question))),
            Builtin::Numeric => {
                f64::from(u8::from(numeric_match(s.completion, &s.question.answer)))
            }
            Builtin::Length => overlong_penalty(s.tokens, s.max_tokens, s.max_tokens / 5),
        }
    }
}

/// A reward function: the score of one completion, or why it could not be scored.
pub type RewardFn<'a> = Box<dyn Fn(&Scored) -> Result<f64, String> + 'a>;

/// A reward function and its weight in the total.
pub struct Reward<'a> {
    /// Its name (a Metrics column is `reward_<name>`).
    pub name: String,
    /// Its weight in the summed reward.
    pub weight: f64,
    /// What identifies the function in a training run's key: a built-in's name, or what the
    /// caller gave (for a script closure, a digest of its code and captured values).
    identity: String,
    func: RewardFn<'a>,
}

impl<'a> Reward<'a> {
    /// A built-in reward.
    pub fn builtin(builtin: Builtin, weight: f64) -> Self {
        Reward {
            name: builtin.name().to_string(),
            weight,
            identity: format!("builtin:{}", builtin.name()),
            func: Box::new(move |s| Ok(builtin.score(s))),
        }
    }

    /// A reward of the caller's own, e.g. a script closure. Its name stands for the function
    /// in a training run's key until [`Reward::identified_by`] gives more: two different
    /// functions under one name would resume each other's runs.
    pub fn custom(
        name: &str,
        weight: f64,
        func: impl Fn(&Scored) -> Result<f64, String> + 'a,
    ) -> Self {
        Reward {
            name: name.to_string(),
            weight,
            identity: format!("custom:{name}"),
            func: Box::new(func),
        }
    }

    /// The same reward, identified in a training run's key by `identity` (anything that
    /// changes whenever the function's results can change, e.g. a digest of its code).
    pub fn identified_by(mut self, identity: impl Into<String>) -> Self {
        self.identity = format!("custom:{}:{}", self.name, identity.into());
        self
    }

    /// What identifies the function in a training run's key.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The built-in rewards called `names`, weight 1 each; fails naming an unknown one.
    pub fn named(names: &[&str]) -> Result<Vec<Reward<'a>>, String> {
        names
            .iter()
            .map(|n| {
                Builtin::by_name(n)
                    .map(|b| Reward::builtin(b, 1.0))
                    .ok_or_else(|| {
                        format!(
                            "unknown reward `{n}`; built-in rewards: {}",
                            BUILTIN_REWARDS.join(", ")
                        )
                    })
            })
            .collect()
    }

    /// Scores one completion; a function's failure names the reward.
    pub fn score(&self, s: &Scored) -> Result<f64, String> {
        let value = (self.func)(s).map_err(|e| format!("reward `{}`: {e}", self.name))?;
        if value.is_finite() {
            Ok(value)
        } else {
            Err(format!("reward `{}` returned {value}", self.name))
        }
    }
}

/// The content of the study's greedy `<answer>(.*)</answer>` match: from the first
/// `<answer>` to the last `</answer>` after it.
pub fn answer_tag(text: &str) -> Option<&str> {
    let start = text.find("<answer>")? + "<answer>".len();
    let end = text.rfind("</answer>")?;
    (end >= start).then(|| &text[start..end])
}

/// The study's accuracy reward: 2 when the stripped `<answer>` content is `letter` or
/// `(letter)`; 1 when it starts with `answer_text` (ignoring case); else 0.
pub fn study_accuracy(completion: &str, letter: &str, answer_text: Option<&str>) -> f64 {
    let Some(answer) = answer_tag(completion) else {
        return 0.0;
    };
    let answer = answer.trim();
    let letter = letter.trim();
    if answer == letter || answer == format!("({letter})") {
        return 2.0;
    }
    match answer_text {
        Some(text) if starts_with_ignoring_case(answer, text) => 1.0,
        _ => 0.0,
    }
}

/// Whether `text` starts with `prefix`, comparing characters case-insensitively.
fn starts_with_ignoring_case(text: &str, prefix: &str) -> bool {
    let mut chars = text.chars().flat_map(char::to_lowercase);
    prefix
        .chars()
        .flat_map(char::to_lowercase)
        .all(|p| chars.next() == Some(p))
}

/// The byte offsets just past each `<answer>` that follows a `</think>` (and at most one
/// whitespace character) in a text starting with `<think>`: where the study's format
/// pattern can continue.
fn answer_starts(text: &str) -> Vec<usize> {
    if !text.starts_with("<think>") {
        return vec![];
    }
    let mut starts = vec![];
    let mut from = "<think>".len();
    while let Some(k) = text[from..].find("</think>") {
        let after = from + k + "</think>".len();
        let rest = &text[after..];
        if rest.starts_with("<answer>") {
            starts.push(after + "<answer>".len());
        } else if let Some(c) = rest.chars().next().filter(|c| c.is_whitespace()) {
            if rest[c.len_utf8()..].starts_with("<answer>") {
                starts.push(after + c.len_utf8() + "<answer>".len());
            }
        }
        from = from + k + 1;
    }
    starts
}

/// The soft format: `<think>.*?</think>\s?<answer>.*?</answer>` matched at the start.
pub fn format_soft(text: &str) -> bool {
    answer_starts(text)
        .iter()
        .any(|&a| text[a..].contains("</answer>"))
}

/// The strict format: the same pattern covering the whole text (a final newline allowed).
pub fn format_strict(text: &str) -> bool {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let Some(end) = body.strip_suffix("</answer>").map(str::len) else {
        return false;
    };
    answer_starts(text).iter().any(|&a| a <= end)
}

/// The study's format reward: soft (1) + strict (1).
pub fn study_format(text: &str) -> f64 {
    f64::from(u8::from(format_soft(text))) + f64::from(u8::from(format_strict(text)))
}

/// The study's tag count: 0.25 for each of the four tags occurring exactly once.
pub fn xml_count(text: &str) -> f64 {
    ["<think>", "</think>", "<answer>", "</answer>"]
        .iter()
        .filter(|tag| text.matches(*tag).count() == 1)
        .count() as f64
        * 0.25
}

/// The last number in `text` (digits with optional sign, thousands separators and
/// decimals), normalised as GSM8K scoring does.
pub fn last_number(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut last = None;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let mut start = i;
            if start > 0 && bytes[start - 1] == b'-' {
                start -= 1;
            }
            let mut j = i;
            while j < bytes.len()
                && (bytes[j].is_ascii_digit()
                    || ((bytes[j] == b',' || bytes[j] == b'.')
                        && j + 1 < bytes.len()
                        && bytes[j + 1].is_ascii_digit()))
            {
                j += 1;
            }
            last = Some(normalize_number(&text[start..j]));
            i = j;
        } else {
            i += 1;
        }
    }
    last
}

/// Whether the completion's number equals `answer`: the number inside `<answer>` tags when
/// there are some, else after `####`, else the last number in the text.
pub fn numeric_match(completion: &str, answer: &str) -> bool {
    let source = answer_tag(completion)
        .or_else(|| completion.rsplit_once("####").map(|(_, after)| after))
        .unwrap_or(completion);
    let Some(found) = last_number(source) else {
        return false;
    };
    let expected = normalize_number(answer);
    found == expected
        || matches!((found.parse::<f64>(), expected.parse::<f64>()),
            (Ok(a), Ok(b)) if (a - b).abs() <= 1e-9 * b.abs().max(1.0))
}

/// The option letter a completion answers with: the `<answer>` content (or the whole text)
/// when it is a letter, `(X)`, `X.`, `X)` or `X: …` within the question's options.
pub fn answer_letter(completion: &str, n_choices: usize) -> Option<char> {
    let answer = answer_tag(completion).unwrap_or(completion).trim();
    let answer = answer.strip_prefix('(').unwrap_or(answer);
    let mut chars = answer.chars();
    let first = chars.next()?;
    let next = chars.next();
    let is_option = first.is_ascii_uppercase()
        && letter_index(&first.to_string()).is_some_and(|i| i < n_choices);
    let ends_word = match next {
        None => true,
        Some(c) => !c.is_alphanumeric(),
    };
    (is_option && ends_word).then_some(first)
}

/// Whether a completion answers `question` correctly: the right letter (multiple choice) or
/// number (open answers); the study's answer-text match counts as right too.
pub fn is_correct(completion: &str, question: &Question) -> bool {
    if question.choices.is_empty() {
        return numeric_match(completion, &question.answer);
    }
    answer_letter(completion, question.choices.len())
        .is_some_and(|l| l.to_string() == question.answer.trim())
        || study_accuracy(completion, &question.answer, Some(&question.answer_text)) > 0.0
}

/// DAPO's soft overlong penalty for a completion of `tokens` out of `max_tokens`: 0 up to
/// `max_tokens - buffer`, then linear down to -1 at `max_tokens` and beyond.
pub fn overlong_penalty(tokens: usize, max_tokens: usize, buffer: usize) -> f64 {
    let safe = max_tokens.saturating_sub(buffer);
    if tokens <= safe || buffer == 0 {
        0.0
    } else if tokens >= max_tokens {
        -1.0
    } else {
        -((tokens - safe) as f64) / buffer as f64
    }
}

/// A judge's verdict on one response: answered correctly, and in the required format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The answer is right ([`is_correct`]).
    pub correct: bool,
    /// The response follows the `<think>…</think><answer>…</answer>` format (the soft
    /// pattern, as the study's format reward first checks).
    pub format_ok: bool,
}

/// Judges one response to `question`.
pub fn verdict(response: &str, question: &Question) -> Verdict {
    Verdict {
        correct: is_correct(response, question),
        format_ok: format_soft(response),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mcq() -> Question {
        Question {
            id: "q".into(),
            choices: vec!["Aspirin".into(), "Heparin".into(), "Warfarin".into()],
            answer: "B".into(),
            answer_text: "Heparin".into(),
            ..Question::default()
        }
    }

    #[test]
    fn accuracy_follows_the_study() {
        let q = mcq();
        let r = |c: &str| study_accuracy(c, &q.answer, Some(&q.answer_text));
        assert_eq!(r("<think>x</think><answer> B </answer>"), 2.0);
        assert_eq!(r("<answer>(B)</answer>"), 2.0);
        assert_eq!(r("<answer>heparin, because</answer>"), 1.0);
        assert_eq!(r("<answer>B) Heparin</answer>"), 0.0);
        assert_eq!(r("<answer>A</answer>"), 0.0);
        assert_eq!(r("B"), 0.0);
        // greedy: from the first <answer> to the last </answer>
        assert_eq!(r("<answer>B</answer> and <answer>B</answer>"), 0.0);
        assert_eq!(
            answer_tag("<answer>B</answer>x</answer>"),
            Some("B</answer>x")
        );
        assert_eq!(answer_tag("</answer><answer>"), None);
    }

    #[test]
    fn format_follows_the_study_regexes() {
        assert_eq!(study_format("<think>a</think><answer>B</answer>"), 2.0);
        assert_eq!(study_format("<think>a</think>\n<answer>B</answer>\n"), 2.0);
        assert_eq!(
            study_format("<think>a</think> <answer>B</answer> done"),
            1.0
        );
        assert_eq!(study_format("<think>a</think>\n\n<answer>B</answer>"), 0.0);
        assert_eq!(study_format(" <think>a</think><answer>B</answer>"), 0.0);
        assert_eq!(study_format("<think></think><answer></answer>"), 2.0);
        assert_eq!(study_format("<think>a</think><answer>B</answer>\n\n"), 1.0);
        // the lazy think part may stretch over an earlier </think>
        assert_eq!(
            study_format("<think>a</think>b</think><answer>B</answer>"),
            2.0
        );
        assert_eq!(xml_count("<think>a</think><answer>B</answer>"), 1.0);
        assert_eq!(xml_count("<think><think></think>"), 0.25);
    }

    #[test]
    fn numbers_and_letters_are_extracted() {
        assert_eq!(
            last_number("so 1,234.50 dollars, then 72."),
            Some("72".into())
        );
        assert_eq!(last_number("it costs $1,000"), Some("1000".into()));
        assert_eq!(last_number("-5 degrees"), Some("-5".into()));
        assert!(numeric_match("#### 1,000", "1000"));
        assert!(numeric_match("<answer>18.0</answer> then 3", "18"));
        assert!(!numeric_match("no number", "3"));
        assert_eq!(answer_letter("<answer>(C)</answer>", 3), Some('C'));
        assert_eq!(answer_letter("B. Heparin", 3), Some('B'));
        assert_eq!(answer_letter("D", 3), None);
        assert_eq!(answer_letter("Because", 3), None);
    }

    #[test]
    fn verdicts_need_the_right_answer_and_the_format() {
        let q = mcq();
        let v = verdict("<think>clots</think><answer>B</answer>", &q);
        assert!(v.correct && v.format_ok);
        let v = verdict("The answer is B", &q);
        assert!(!v.correct && !v.format_ok);
        let v = verdict("<think>x</think><answer>A</answer>", &q);
        assert!(!v.correct && v.format_ok);
    }

    #[test]
    fn overlong_penalty_is_soft() {
        assert_eq!(overlong_penalty(10, 100, 20), 0.0);
        assert_eq!(overlong_penalty(90, 100, 20), -0.5);
        assert_eq!(overlong_penalty(100, 100, 20), -1.0);
    }
}
