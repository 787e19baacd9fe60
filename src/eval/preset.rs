//! Benchmark presets as data: one JSON file per benchmark under `presets/` (embedded in the
//! binary), shaped after lm-evaluation-harness's task YAML — prompt templates (Jinja, as
//! lm-eval writes them), the few-shot source, generation limits, answer filters and the
//! metric. Adding a benchmark means adding a file; a script may also name a file of its own.

use std::path::Path;

use serde::Deserialize;

use super::EvalError;

/// The presets shipped with rlvr, by name.
const BUILTIN: [(&str, &str); 7] = [
    ("mmlu", include_str!("../../presets/mmlu.json")),
    ("cmmlu", include_str!("../../presets/cmmlu.json")),
    ("mmlu_pro", include_str!("../../presets/mmlu_pro.json")),
    ("gsm8k", include_str!("../../presets/gsm8k.json")),
    ("gsm8k_cot", include_str!("../../presets/gsm8k_cot.json")),
    ("medqa", include_str!("../../presets/medqa.json")),
    ("study", include_str!("../../presets/study.json")),
];

/// How a preset scores a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The option letters are scored as continuations of the prompt; the most likely wins.
    Loglik,
    /// The model writes an answer (chain of thought), and filters extract it.
    Generate,
}

impl Mode {
    /// Its name in options and tables.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Loglik => "loglik",
            Mode::Generate => "generate",
        }
    }

    /// The mode called `name`.
    pub fn by_name(name: &str) -> Result<Mode, EvalError> {
        match name {
            "loglik" => Ok(Mode::Loglik),
            "generate" => Ok(Mode::Generate),
            other => Err(EvalError::Option(format!(
                "unknown mode `{other}`; modes: loglik, generate"
            ))),
        }
    }
}

/// A benchmark's prompt, few-shot source, generation and scoring.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Its name (`preset` column of Results).
    pub name: String,
    /// What it reproduces, for the reference and error messages.
    pub about: String,
    /// How it scores.
    pub mode: Mode,
    /// Few-shot examples by default.
    #[serde(default)]
    pub shots: usize,
    /// Where few-shot examples come from.
    #[serde(default)]
    pub fewshot: Option<FewShot>,
    /// Template of the text before everything (lm-eval's `description`).
    #[serde(default)]
    pub description: String,
    /// Template of a question (lm-eval's `doc_to_text`).
    pub text: String,
    /// Template of a few-shot example's answer (lm-eval's `doc_to_target`).
    #[serde(default)]
    pub target: Option<String>,
    /// Between a question and its answer in few-shot examples, and before a scored letter.
    #[serde(default = "default_target_delimiter")]
    pub target_delimiter: String,
    /// After each few-shot example.
    #[serde(default = "default_fewshot_delimiter")]
    pub fewshot_delimiter: String,
    /// Render `system` + `text` with the model's chat template instead of plain text.
    #[serde(default)]
    pub chat: bool,
    /// Template of the system message (chat presets).
    #[serde(default)]
    pub system: Option<String>,
    /// Generation limits (generate mode).
    #[serde(default)]
    pub generation: Generation,
    /// Answer filters (generate mode): the first fills `pred`, the others `pred_<name>`.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// How an extracted answer is compared with the item's.
    #[serde(default)]
    pub metric: Metric,
}

fn default_target_delimiter() -> String {
    " ".into()
}

fn default_fewshot_delimiter() -> String {
    "\n\n".into()
}

/// Where few-shot examples come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewShot {
    /// The split to pass as the few-shot pool (documentation and error messages).
    #[serde(default)]
    pub split: Option<String>,
    /// How examples are picked from the pool.
    #[serde(default)]
    pub sampler: Sampler,
    /// Seed of the `random` sampler (lm-eval's default 1234).
    #[serde(default = "default_fewshot_seed")]
    pub seed: u64,
    /// Take examples only from pool rows with the same value of this column (`subject`).
    #[serde(default)]
    pub group_by: Option<String>,
    /// Fixed examples held in the preset (fields for the templates, e.g. `question`,
    /// `target`); used instead of a pool.
    #[serde(default)]
    pub samples: Vec<serde_json::Map<String, serde_json::Value>>,
}

fn default_fewshot_seed() -> u64 {
    1234
}

/// How few-shot examples are picked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// The first `n` of the pool (lm-eval's `first_n`).
    #[default]
    FirstN,
    /// `random.Random(seed).sample(pool, n)`, one draw per test document in order
    /// (lm-eval's `default` sampler).
    Random,
}

/// Generation limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    /// The completion ends before the first of these strings.
    #[serde(default)]
    pub until: Vec<String>,
    /// New tokens at most.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
}

impl Default for Generation {
    fn default() -> Self {
        Generation {
            until: vec![],
            max_tokens: default_max_tokens(),
        }
    }
}

fn default_max_tokens() -> usize {
    256
}

/// An answer filter: steps tried in order, the first that finds something wins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Its name (`pred_<name>` and `correct_<name>` columns for all but the first filter).
    pub name: String,
    /// The extraction steps.
    pub steps: Vec<Step>,
    /// What an unmatched response gets.
    #[serde(default)]
    pub fallback: Fallback,
}

/// One extraction step.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Step {
    /// lm-eval's `regex` filter: all non-overlapping matches (Python's `findall`), the
    /// `select`-th one (negative counts from the end), its first non-empty group (or the
    /// whole match when the pattern has no group), stripped.
    Regex {
        /// The pattern (Rust `regex` syntax, which agrees with Python's `re` on the patterns
        /// lm-eval uses).
        regex: String,
        /// Which match (0 the first, -1 the last).
        #[serde(default)]
        select: i64,
    },
    /// The study's answer: `rlvr::reward`'s letter (multiple choice) or number (open).
    Study {
        /// Always true.
        study: bool,
    },
}

/// What an unmatched response gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// No prediction; scored wrong (lm-eval's `[invalid]`).
    #[default]
    Invalid,
    /// A letter drawn at random among the options, seeded by the run's seed and the item
    /// id (the official MMLU-Pro and CMMLU scripts' rule).
    Random,
}

/// How an extracted answer is compared with the item's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    /// `exact_match` (lm-eval's, with the options below), `study` (`rlvr::reward::is_correct`
    /// on the whole response) or `letter` (the predicted letter equals the answer).
    #[serde(default)]
    pub kind: MetricKind,
    /// Compare lower-cased.
    #[serde(default)]
    pub ignore_case: bool,
    /// Drop ASCII punctuation before comparing.
    #[serde(default)]
    pub ignore_punctuation: bool,
    /// Patterns removed (in order) from both sides before comparing.
    #[serde(default)]
    pub ignore: Vec<String>,
}

/// The comparison rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// The predicted letter equals the answer.
    #[default]
    Letter,
    /// lm-eval's `exact_match`.
    ExactMatch,
    /// `rlvr::reward::is_correct`.
    Study,
}

impl Preset {
    /// A built-in preset by name, or a preset file (`.json`) by path.
    pub fn get(name_or_path: &str) -> Result<Preset, EvalError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Preset::parse(text, name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(path)
                .map_err(|e| EvalError::Preset(format!("{}: {e}", path.display())))?;
            return Preset::parse(&text, &path.display().to_string());
        }
        Err(EvalError::Preset(format!(
            "unknown preset `{name_or_path}`; presets: {} (or a .json file)",
            Preset::names().join(", ")
        )))
    }

    /// The built-in presets' names.
    pub fn names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// Reads a preset from JSON text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Preset, EvalError> {
        let preset: Preset =
            serde_json::from_str(text).map_err(|e| EvalError::Preset(format!("{source}: {e}")))?;
        preset.check(source)?;
        Ok(preset)
    }

    fn check(&self, source: &str) -> Result<(), EvalError> {
        let bad = |m: String| Err(EvalError::Preset(format!("{source}: {m}")));
        if self.mode == Mode::Generate && self.filters.is_empty() {
            return bad("a generate preset needs at least one filter".into());
        }
        for filter in &self.filters {
            if filter.steps.is_empty() {
                return bad(format!("filter `{}` has no steps", filter.name));
            }
            for step in &filter.steps {
                if let Step::Regex { regex, .. } = step {
                    super::extract::check_pattern(regex).map_err(|e| {
                        EvalError::Preset(format!("{source}: filter `{}`: {e}", filter.name))
                    })?;
                }
            }
        }
        for pattern in &self.metric.ignore {
            super::extract::check_pattern(pattern)
                .map_err(|e| EvalError::Preset(format!("{source}: metric: {e}")))?;
        }
        Ok(())
    }

    /// The default preset for a dataset and mode: the lm-eval task of the dataset, or for
    /// generation on multiple-choice datasets without a chain-of-thought task, `study`.
    pub fn default_for(dataset: &str, mode: Mode) -> Result<&'static str, EvalError> {
        Ok(match (dataset, mode) {
            ("mmlu", Mode::Loglik) => "mmlu",
            ("cmmlu", Mode::Loglik) => "cmmlu",
            ("medqa", Mode::Loglik) => "medqa",
            ("mmlu_pro", Mode::Generate) => "mmlu_pro",
            ("gsm8k", Mode::Generate) => "gsm8k",
            (_, Mode::Generate) => "study",
            (other, Mode::Loglik) => {
                return Err(EvalError::Option(format!(
                    "no log-likelihood preset for dataset `{other}`; give `preset` \
                     (one of {}) or use mode \"generate\"",
                    Preset::names().join(", ")
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_preset_parses() {
        for name in Preset::names() {
            let p = Preset::get(name).unwrap();
            assert_eq!(p.name, name);
        }
        let gsm = Preset::get("gsm8k_cot").unwrap();
        assert_eq!(gsm.fewshot.unwrap().samples.len(), 8);
    }

    #[test]
    fn bad_presets_are_named() {
        let err = Preset::parse("{\"name\": \"x\", \"mode\": \"loglik\"}", "mine.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mine.json") && err.contains("about"), "{err}");
        let err = Preset::get("nope").unwrap_err().to_string();
        assert!(err.contains("mmlu_pro"), "{err}");
        let bad = r#"{"name":"x","about":"","mode":"generate","text":"q",
            "filters":[{"name":"f","steps":[{"regex":"(unclosed"}]}]}"#;
        let err = Preset::parse(bad, "bad.json").unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains("filter `f`"),
            "{err}"
        );
    }
}
