//! Prompts from a preset, built as lm-evaluation-harness builds them: the description, then
//! each few-shot example as `text + target_delimiter + target + fewshot_delimiter`, then the
//! question's text. Templates are Jinja (minijinja with lm-eval's settings: trailing newlines
//! kept, undefined names an error); each sees the item's fields.

use std::collections::HashMap;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{json, Map, Value};

use super::preset::{Preset, Sampler};
use super::pyrandom::PyRandom;
use super::EvalError;
use crate::data::categories;
use crate::data::items::letter;
use crate::data::question::Question;
use crate::model::chat::Message;
use crate::prompt::{study_question, STUDY_SYSTEM_PROMPT};

/// A question with the extra text columns of its row (e.g. GSM8K's `solution`), as the
/// templates see it.
#[derive(Debug, Clone, Default)]
pub struct Doc {
    /// The Items row.
    pub question: Question,
    /// The row's other text columns.
    pub extra: HashMap<String, String>,
    /// The worked solution or rationale, when the table has one.
    pub rationale: Option<String>,
    /// In the extended medical subset, when the table says.
    pub medical_ext: Option<bool>,
}

impl Doc {
    /// The template variables: `question`, `choices`, `letters`, `answer`, `answer_index`,
    /// `answer_text`, `subject`, `subject_zh` (CMMLU's Chinese name), `category`, `dataset`,
    /// `id`, `rationale`, `study_question`, `study_system_prompt`, and every extra column.
    pub fn fields(&self) -> Value {
        let q = &self.question;
        let mut map = Map::new();
        for (k, v) in &self.extra {
            map.insert(k.clone(), json!(v));
        }
        let letters: Vec<String> = (0..q.choices.len()).map(letter).collect();
        let index = letters.iter().position(|l| *l == q.answer);
        let entries = [
            ("id", json!(q.id)),
            ("dataset", json!(q.dataset)),
            ("subject", json!(q.subject)),
            ("category", json!(q.category)),
            ("question", json!(q.question)),
            ("choices", json!(q.choices)),
            ("letters", json!(letters)),
            ("answer", json!(q.answer)),
            ("answer_index", json!(index)),
            ("answer_text", json!(q.answer_text)),
            ("rationale", json!(self.rationale)),
            (
                "subject_zh",
                json!(categories::cmmlu_chinese_name(&q.subject).unwrap_or(&q.subject)),
            ),
            ("study_question", json!(study_question(q))),
            ("study_system_prompt", json!(STUDY_SYSTEM_PROMPT)),
        ];
        for (k, v) in entries {
            map.insert(k.to_string(), v);
        }
        Value::Object(map)
    }
}

/// A rendered prompt: plain text, or a conversation for the model's chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text to complete or score as it is.
    Text(String),
    /// Messages (system, user) for the chat template, the assistant to answer next.
    Chat(Vec<Message>),
}

impl Prompt {
    /// The prompt as text (a conversation shown as its messages), for the `prompt` hash and
    /// error messages.
    pub fn text(&self) -> String {
        match self {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(messages) => messages
                .iter()
                .map(|m| format!("<{}>\n{}", m.role, m.content))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// Builds the prompts of one preset: its few-shot pool, grouped as the preset says.
pub struct Renderer<'a> {
    preset: &'a Preset,
    shots: usize,
    env: Environment<'static>,
    /// Pool rows' template fields, grouped (one group when the preset has no `group_by`).
    pool: HashMap<String, Vec<(String, Value)>>,
    /// For the `random` sampler: the draws for each test row, made in order.
    draws: Vec<Vec<usize>>,
}

impl<'a> Renderer<'a> {
    /// A renderer for `preset` with `shots` examples from `pool` (ignored when the preset
    /// holds fixed samples). `rows` is the largest test row number that will be asked for
    /// (the `random` sampler draws once per preceding row).
    pub fn new(
        preset: &'a Preset,
        shots: usize,
        pool: &[Doc],
        rows: usize,
    ) -> Result<Self, EvalError> {
        let mut env = Environment::new();
        env.set_keep_trailing_newline(true);
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut groups: HashMap<String, Vec<(String, Value)>> = HashMap::new();
        let mut draws = vec![];
        if shots > 0 {
            let fewshot = preset.fewshot.as_ref().ok_or_else(|| {
                EvalError::Option(format!(
                    "preset `{}` has no few-shot examples; use shots: 0",
                    preset.name
                ))
            })?;
            if !fewshot.samples.is_empty() {
                if shots > fewshot.samples.len() {
                    return Err(EvalError::Option(format!(
                        "preset `{}` holds {} examples; asked for {shots}",
                        preset.name,
                        fewshot.samples.len()
                    )));
                }
                let fixed = fewshot
                    .samples
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("sample {i}"), Value::Object(s.clone())))
                    .collect();
                groups.insert(String::new(), fixed);
            } else {
                if pool.is_empty() {
                    return Err(EvalError::Option(format!(
                        "preset `{}` with {shots} shots needs `fewshot`: the {} split of the \
                         dataset, e.g. load(\"{}\", path, #{{ split: \"{}\" }})",
                        preset.name,
                        fewshot.split.as_deref().unwrap_or("few-shot"),
                        pool_dataset_hint(preset),
                        fewshot.split.as_deref().unwrap_or("dev"),
                    )));
                }
                for doc in pool {
                    let key = group_key(fewshot.group_by.as_deref(), doc);
                    groups
                        .entry(key)
                        .or_default()
                        .push((doc.question.id.clone(), doc.fields()));
                }
                if fewshot.sampler == Sampler::Random {
                    let n = groups.values().next().map_or(0, Vec::len);
                    if shots > n {
                        return Err(EvalError::Option(format!(
                            "the few-shot pool has {n} rows; asked for {shots}"
                        )));
                    }
                    let mut rng = PyRandom::new(fewshot.seed);
                    draws = (0..=rows).map(|_| rng.sample(n, shots)).collect();
                }
            }
        }
        Ok(Renderer {
            preset,
            shots,
            env,
            pool: groups,
            draws,
        })
    }

    fn render(&self, template: &str, fields: &Value, what: &str) -> Result<String, EvalError> {
        self.env.render_str(template, fields).map_err(|e| {
            EvalError::Preset(format!(
                "preset `{}`: {what} template: {e:#}",
                self.preset.name
            ))
        })
    }

    /// The prompt of `doc`, which is row `row` of its split (for the `random` sampler).
    pub fn prompt(&self, doc: &Doc, row: usize) -> Result<Prompt, EvalError> {
        let fields = doc.fields();
        let p = self.preset;
        let text = self.render(&p.text, &fields, "text")?;
        if p.chat {
            let mut messages = vec![];
            if let Some(system) = &p.system {
                messages.push(Message::new(
                    "system",
                    &self.render(system, &fields, "system")?,
                ));
            }
            messages.push(Message::new("user", &text));
            return Ok(Prompt::Chat(messages));
        }
        let mut out = self.render(&p.description, &fields, "description")?;
        for shot in self.shots_for(doc, row)? {
            out.push_str(&self.render(&p.text, shot, "text")?);
            let target = self.render(
                p.target.as_deref().unwrap_or("{{ answer }}"),
                shot,
                "target",
            )?;
            out.push_str(&p.target_delimiter);
            out.push_str(&target);
            out.push_str(&p.fewshot_delimiter);
        }
        out.push_str(&text);
        Ok(Prompt::Text(out))
    }

    /// The few-shot examples' fields for `doc`: the first `shots` of its group (without the
    /// doc itself), or the `random` sampler's draw for its row.
    fn shots_for(&self, doc: &Doc, row: usize) -> Result<Vec<&Value>, EvalError> {
        if self.shots == 0 {
            return Ok(vec![]);
        }
        let fewshot = self.preset.fewshot.as_ref().expect("checked in new");
        let key = if fewshot.samples.is_empty() {
            group_key(fewshot.group_by.as_deref(), doc)
        } else {
            String::new()
        };
        let group = self.pool.get(&key).ok_or_else(|| {
            EvalError::Option(format!(
                "the few-shot pool has no rows for {} `{key}`",
                fewshot.group_by.as_deref().unwrap_or("group")
            ))
        })?;
        if fewshot.sampler == Sampler::Random && fewshot.samples.is_empty() {
            let draw = self.draws.get(row).ok_or_else(|| {
                EvalError::Option(format!("row {row} is past the rows drawn for"))
            })?;
            return Ok(draw.iter().map(|&i| &group[i].1).collect());
        }
        let chosen: Vec<&Value> = group
            .iter()
            .filter(|(id, _)| *id != doc.question.id)
            .take(self.shots)
            .map(|(_, f)| f)
            .collect();
        if chosen.len() < self.shots {
            return Err(EvalError::Option(format!(
                "the few-shot pool has {} rows for `{key}`; asked for {}",
                chosen.len(),
                self.shots
            )));
        }
        Ok(chosen)
    }
}

fn group_key(group_by: Option<&str>, doc: &Doc) -> String {
    match group_by {
        Some("subject") => doc.question.subject.clone(),
        Some("category") => doc.question.category.clone(),
        Some("dataset") => doc.question.dataset.clone(),
        Some(other) => doc.extra.get(other).cloned().unwrap_or_default(),
        None => String::new(),
    }
}

fn pool_dataset_hint(preset: &Preset) -> &str {
    match preset.name.as_str() {
        "gsm8k" | "gsm8k_cot" => "gsm8k",
        other => other,
    }
}

/// The row of a document in its split: the last `/`-separated part of its id when that is
/// a number (`gsm8k/test/17` → 17), else `fallback` (its position in the table).
pub fn row_of(id: &str, fallback: usize) -> usize {
    id.rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, subject: &str, q: &str) -> Doc {
        Doc {
            question: Question {
                id: id.into(),
                subject: subject.into(),
                question: format!(" {q} "),
                choices: vec!["w".into(), "x".into(), "y".into(), "z".into()],
                answer: "B".into(),
                ..Question::default()
            },
            ..Doc::default()
        }
    }

    #[test]
    fn mmlu_prompts_follow_lm_eval() {
        let preset = Preset::get("mmlu").unwrap();
        let pool = [doc("d/0", "anatomy", "Q0"), doc("d/1", "anatomy", "Q1")];
        let r = Renderer::new(&preset, 2, &pool, 0).unwrap();
        let Prompt::Text(text) = r.prompt(&doc("t/0", "anatomy", "Q"), 0).unwrap() else {
            panic!("text prompt expected")
        };
        let block = |q: &str| format!("{q}\nA. w\nB. x\nC. y\nD. z\nAnswer:");
        let want = format!(
            "The following are multiple choice questions (with answers) about anatomy.\n\n{} B\n\n{} B\n\n{}",
            block("Q0"),
            block("Q1"),
            block("Q")
        );
        assert_eq!(text, want);
        let err = r
            .prompt(&doc("t/1", "virology", "Q"), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("virology"), "{err}");
    }

    #[test]
    fn the_study_preset_writes_the_study_prompt() {
        let preset = Preset::get("study").unwrap();
        let r = Renderer::new(&preset, 0, &[], 0).unwrap();
        let d = doc("t/0", "anatomy", "Which?");
        let Prompt::Chat(m) = r.prompt(&d, 0).unwrap() else {
            panic!("chat prompt expected")
        };
        assert_eq!(m[0].content, STUDY_SYSTEM_PROMPT);
        assert_eq!(m[1].content, study_question(&d.question));
    }

    #[test]
    fn shots_without_a_pool_are_explained() {
        let preset = Preset::get("mmlu_pro").unwrap();
        let err = Renderer::new(&preset, 5, &[], 0).err().unwrap().to_string();
        assert!(err.contains("validation"), "{err}");
    }
}
