//! Benchmark evaluation: Items in, Results out. A preset ([`preset`]) says how a benchmark
//! is prompted and scored, as lm-evaluation-harness does it; a [`Backend`] (the local model,
//! or an endpoint) answers; a resumable cache keeps every finished item; [`summary`] and
//! [`compare`] turn Results into tables with intervals and paired tests.
//!
//! Results columns: `id`, `dataset`, `subject`, `category`, `medical`, `medical_ext`,
//! `model`, `adapter`, `preset`, `mode`, `shots`, `seed`, `pred`, `correct`, `response`,
//! `prompt_tokens`, `tokens`, then `logprobs` (loglik: one per option) or `rule` (generate:
//! which extraction step fired) and `pred_<filter>` / `correct_<filter>` for a preset's
//! further filters.

pub mod backend;
pub mod cache;
#[cfg(feature = "http")]
pub mod endpoint_backend;
pub mod extract;
pub mod overlap;
pub mod preset;
pub mod pyrandom;
pub mod render;
pub mod seeds;
pub mod stats;
pub mod summary;

use std::collections::HashMap;
use std::path::PathBuf;

use polars::prelude::*;

pub use backend::{Backend, Choices, Completed, GenerateOptions, LocalModel, Scored};
use cache::{Cache, Record};
use preset::{Mode, Preset};
use render::{row_of, Doc, Prompt, Renderer};
pub use summary::{compare, summary, Average};

use crate::data::items::letter;
use crate::data::question::{questions, Question};
use crate::progress::{Cancelled, Job};

/// An evaluation failure.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A bad option or input table.
    #[error("{0}")]
    Option(String),
    /// A preset that cannot be read or rendered.
    #[error("{0}")]
    Preset(String),
    /// The model failed.
    #[error("model: {0}")]
    Model(String),
    /// The cache could not be read or written.
    #[error("evaluation cache: {0}")]
    Cache(String),
    /// A table operation failed.
    #[error("{0}")]
    Table(String),
    /// Stopped on request; finished items are in the cache.
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
}

impl From<crate::data::DataError> for EvalError {
    fn from(e: crate::data::DataError) -> Self {
        EvalError::Option(e.to_string())
    }
}

impl From<PolarsError> for EvalError {
    fn from(e: PolarsError) -> Self {
        EvalError::Table(e.to_string())
    }
}

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// `loglik` or `generate`; default: the preset's.
    pub mode: Option<Mode>,
    /// A built-in preset name or a preset file; default: the dataset's (see
    /// [`Preset::default_for`]).
    pub preset: Option<String>,
    /// Few-shot examples; default: the preset's.
    pub shots: Option<usize>,
    /// The few-shot pool (an Items table, e.g. MMLU's `dev` split).
    pub fewshot: Option<DataFrame>,
    /// New tokens at most (generate); default: the preset's.
    pub max_tokens: Option<usize>,
    /// Sampling temperature (generate); 0 is greedy.
    pub temperature: f64,
    /// Questions per batch; default [`LOGLIK_BATCH`] for `loglik`, [`GENERATE_BATCH`] for
    /// `generate`. A batch is also what a crash loses at most.
    pub batch: Option<usize>,
    /// Seed of sampling and of random fallbacks.
    pub seed: u64,
    /// The `model` column's value; default: the model file's name (with the adapter's
    /// fingerprint when one is attached).
    pub label: Option<String>,
    /// Where the resumable cache lives (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
}

/// Questions per scoring batch by default: a local model scores a batch's contexts in
/// sub-batches of about one length, so a larger batch pads less (200 MMLU questions: 37 s in
/// batches of 16, 30 s in batches of 64).
pub const LOGLIK_BATCH: usize = 64;
/// Questions decoded together by default.
pub const GENERATE_BATCH: usize = 8;

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            mode: None,
            preset: None,
            shots: None,
            fewshot: None,
            max_tokens: None,
            temperature: 0.0,
            batch: None,
            seed: 0,
            label: None,
            cache_dir: Some(crate::paths::rlvr_home().join("cache").join("eval")),
        }
    }
}

/// The text columns every Items table has, not passed to templates as extras.
const ITEM_TEXT: [&str; 9] = [
    "id",
    "dataset",
    "split",
    "subject",
    "category",
    "question",
    "answer",
    "answer_text",
    "rationale",
];

/// The rows of an Items table as template documents (extra text columns included).
pub fn docs(items: &DataFrame) -> Result<Vec<Doc>, EvalError> {
    let qs = questions(items)?;
    let mut extras: Vec<(String, Vec<Option<String>>)> = vec![];
    for col in items.columns() {
        let name = col.name().to_string();
        if col.dtype() == &DataType::String && !ITEM_TEXT.contains(&name.as_str()) {
            let values = col.str()?.iter().map(|v| v.map(str::to_string)).collect();
            extras.push((name, values));
        }
    }
    let rationale: Option<Vec<Option<String>>> = match items.column("rationale") {
        Ok(c) => Some(
            c.cast(&DataType::String)?
                .str()?
                .iter()
                .map(|v| v.map(str::to_string))
                .collect(),
        ),
        Err(_) => None,
    };
    let medical_ext: Option<Vec<bool>> = match items.column("medical_ext") {
        Ok(c) => Some(c.bool()?.iter().map(|v| v.unwrap_or(false)).collect()),
        Err(_) => None,
    };
    Ok(qs
        .into_iter()
        .enumerate()
        .map(|(i, question)| Doc {
            medical_ext: medical_ext.as_ref().map(|m| m[i]),
            question,
            extra: extras
                .iter()
                .filter_map(|(k, v)| v[i].clone().map(|s| (k.clone(), s)))
                .collect(),
            rationale: rationale.as_ref().and_then(|r| r[i].clone()),
        })
        .collect())
}

/// The preset and mode `options` ask for on `docs`.
fn resolve(docs: &[Doc], options: &EvalOptions) -> Result<Preset, EvalError> {
    let preset = match &options.preset {
        Some(name) => Preset::get(name)?,
        None => {
            let first = docs
                .first()
                .ok_or_else(|| EvalError::Option("the Items table is empty".into()))?;
            let mode = options
                .mode
                .unwrap_or(if first.question.choices.is_empty() {
                    Mode::Generate
                } else {
                    Mode::Loglik
                });
            Preset::get(Preset::default_for(&first.question.dataset, mode)?)?
        }
    };
    if let Some(mode) = options.mode {
        if mode != preset.mode {
            return Err(EvalError::Option(format!(
                "preset `{}` scores in mode `{}`, not `{}` ({})",
                preset.name,
                preset.mode.name(),
                mode.name(),
                preset.about
            )));
        }
    }
    if preset.mode == Mode::Loglik {
        if let Some(d) = docs.iter().find(|d| d.question.choices.is_empty()) {
            return Err(EvalError::Option(format!(
                "`{}` has no options to score; loglik needs multiple-choice items",
                d.question.id
            )));
        }
    }
    Ok(preset)
}

/// Evaluates `backend` on the `items` table (Items schema) and returns the Results table,
/// in the items' order. Finished items are cached; a rerun with the same setting only asks
/// for the rest. Progress goes to `job.progress`; `job.cancel` stops between batches (the
/// finished batches stay cached).
pub fn evaluate(
    backend: &dyn Backend,
    items: &DataFrame,
    options: &EvalOptions,
    job: &Job,
) -> Result<DataFrame, EvalError> {
    let docs = docs(items)?;
    let preset = resolve(&docs, options)?;
    let shots = options.shots.unwrap_or(preset.shots);
    let prompts = render_prompts(&docs, &preset, shots, options)?;
    let generation = GenerateOptions {
        max_tokens: options.max_tokens.unwrap_or(preset.generation.max_tokens),
        temperature: options.temperature,
        until: preset.generation.until.clone(),
        seed: options.seed,
    };
    let adapter = backend.adapter();
    let setting = cache_setting(
        backend,
        adapter.as_deref(),
        &preset,
        shots,
        &generation,
        options,
    );
    let mut cache = match &options.cache_dir {
        Some(dir) => Cache::open(dir, &setting)?,
        None => Cache::disabled(),
    };
    let hashes = prompt_hashes(&docs, &prompts, preset.mode);
    let todo = pending(&docs, &prompts, &hashes, &cache, shots);
    let label = format!(
        "evaluate {} ({} of {} to do)",
        preset.name,
        todo.len(),
        docs.len()
    );
    job.progress.start(&label, todo.len() as u64);
    let batch = options
        .batch
        .unwrap_or(match preset.mode {
            Mode::Loglik => LOGLIK_BATCH,
            Mode::Generate => GENERATE_BATCH,
        })
        .max(1);
    let asked = Asked {
        docs: &docs,
        prompts: &prompts,
        hashes: &hashes,
    };
    let mut done = 0;
    for chunk in todo.chunks(batch) {
        job.check()?;
        let records = match preset.mode {
            Mode::Loglik => asked.by_loglik(backend, chunk, &preset.target_delimiter, job)?,
            Mode::Generate => asked.by_generation(backend, chunk, &generation, job)?,
        };
        cache.append(&records)?;
        done += chunk.len();
        job.progress.update(done as u64, "");
    }
    let label = options.label.clone().unwrap_or_else(|| backend.label());
    let table = results(
        &docs, &hashes, &cache, &preset, shots, options, &label, adapter,
    )?;
    let accuracy = table
        .column("correct")
        .ok()
        .and_then(|c| c.as_materialized_series().mean())
        .unwrap_or(f64::NAN);
    job.progress
        .finish(&format!("{} questions, accuracy {accuracy:.3}", docs.len()));
    Ok(table)
}

/// Each document's prompt as the preset renders it, with `shots` examples from the
/// options' few-shot pool.
fn render_prompts(
    docs: &[Doc],
    preset: &Preset,
    shots: usize,
    options: &EvalOptions,
) -> Result<Vec<Prompt>, EvalError> {
    let pool = match &options.fewshot {
        Some(df) => self::docs(df)?,
        None => vec![],
    };
    let rows: Vec<usize> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| row_of(&d.question.id, i))
        .collect();
    let renderer = Renderer::new(
        preset,
        shots,
        &pool,
        rows.iter().copied().max().unwrap_or(0),
    )?;
    docs.iter()
        .zip(&rows)
        .map(|(d, &r)| renderer.prompt(d, r))
        .collect()
}

/// The setting the cache keeps its records under: everything that changes an answer.
fn cache_setting(
    backend: &dyn Backend,
    adapter: Option<&str>,
    preset: &Preset,
    shots: usize,
    generation: &GenerateOptions,
    options: &EvalOptions,
) -> String {
    let model_name = backend.model_name();
    let mut setting = serde_json::json!({
        "model": model_name, "adapter": adapter, "preset": preset.name,
        "mode": preset.mode.name(), "shots": shots,
        "max_tokens": generation.max_tokens, "temperature": generation.temperature,
        "seed": if generation.temperature > 0.0 { options.seed } else { 0 },
        "until": generation.until, "target_delimiter": preset.target_delimiter,
    });
    if backend.served() {
        // a server's answers are kept by its model name, whatever its address
        setting["served"] = serde_json::json!(true);
    }
    setting.to_string()
}

/// Each item's record hash: an item's record holds for the prompt it was asked with and,
/// scored, its number of options (the continuations).
fn prompt_hashes(docs: &[Doc], prompts: &[Prompt], mode: Mode) -> Vec<String> {
    prompts
        .iter()
        .zip(docs)
        .map(|(p, d)| match mode {
            Mode::Loglik => cache::hash(&format!("{}\u{0}{}", p.text(), d.question.choices.len())),
            Mode::Generate => cache::hash(&p.text()),
        })
        .collect()
}

/// The items the cache has no record of, in the order they are asked.
fn pending(
    docs: &[Doc],
    prompts: &[Prompt],
    hashes: &[String],
    cache: &Cache,
    shots: usize,
) -> Vec<usize> {
    let mut todo: Vec<usize> = (0..docs.len())
        .filter(|&i| cache.get(&docs[i].question.id, &hashes[i]).is_none())
        .collect();
    // longest first, so that a batch holds prompts of about one length (little padding);
    // with few-shot examples, one subject's questions together (they share that prefix)
    todo.sort_by_key(|&i| {
        let q = &docs[i].question;
        (
            q.dataset.clone(),
            if shots > 0 {
                q.subject.clone()
            } else {
                String::new()
            },
            std::cmp::Reverse(prompts[i].text().len()),
        )
    });
    todo
}

/// The items as asked: documents, their prompts and their records' hashes, by item.
struct Asked<'a> {
    docs: &'a [Doc],
    prompts: &'a [Prompt],
    hashes: &'a [String],
}

impl Asked<'_> {
    /// The records of one batch scored by log-likelihood: each option's letter after
    /// `delimiter`, as a continuation of the prompt.
    fn by_loglik(
        &self,
        backend: &dyn Backend,
        chunk: &[usize],
        delimiter: &str,
        job: &Job,
    ) -> Result<Vec<Record>, EvalError> {
        let requests: Vec<Choices> = chunk
            .iter()
            .map(|&i| Choices {
                context: self.prompts[i].text(),
                continuations: (0..self.docs[i].question.choices.len())
                    .map(|k| format!("{}{}", delimiter, letter(k)))
                    .collect(),
            })
            .collect();
        Ok(backend
            .loglik(&requests, job)?
            .into_iter()
            .zip(chunk)
            .map(|(s, &i)| Record {
                id: self.docs[i].question.id.clone(),
                prompt_hash: self.hashes[i].clone(),
                response: None,
                logprobs: Some(s.logprobs),
                prompt_tokens: s.prompt_tokens,
                tokens: 0,
            })
            .collect())
    }

    /// The records of one batch answered by generation.
    fn by_generation(
        &self,
        backend: &dyn Backend,
        chunk: &[usize],
        generation: &GenerateOptions,
        job: &Job,
    ) -> Result<Vec<Record>, EvalError> {
        let batch_prompts: Vec<Prompt> = chunk.iter().map(|&i| self.prompts[i].clone()).collect();
        let completed = backend.complete(&batch_prompts, generation, job)?;
        // a cancelled batch is cut short: keep none of it
        job.check()?;
        Ok(completed
            .into_iter()
            .zip(chunk)
            .map(|(c, &i)| Record {
                id: self.docs[i].question.id.clone(),
                prompt_hash: self.hashes[i].clone(),
                response: Some(c.text),
                logprobs: None,
                prompt_tokens: c.prompt_tokens,
                tokens: c.tokens,
            })
            .collect())
    }
}

/// The default `model` label: the model file's stem, with the adapter's fingerprint.
pub(crate) fn default_label(model_name: &str, adapter: Option<&str>) -> String {
    let path = std::path::Path::new(model_name.trim_end_matches('/'));
    let stem = path.file_stem().map_or_else(
        || model_name.to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    match adapter {
        Some(a) => format!("{stem}+lora:{a}"),
        None => stem,
    }
}

/// One Results row's scored fields.
struct Scoring {
    pred: Option<String>,
    correct: bool,
    rule: Option<String>,
    others: Vec<(Option<String>, bool)>,
}

fn score(preset: &Preset, record: &Record, q: &Question, seed: u64) -> Scoring {
    match (&record.logprobs, &record.response) {
        (Some(lp), _) => {
            // the first most likely option, as numpy's argmax
            let best = lp
                .iter()
                .enumerate()
                .fold(None, |best: Option<(usize, f64)>, (i, &v)| match best {
                    Some((_, b)) if b >= v => best,
                    _ => Some((i, v)),
                })
                .map(|(i, _)| letter(i));
            let correct = best.as_deref() == Some(q.answer.trim());
            Scoring {
                pred: best,
                correct,
                rule: None,
                others: vec![],
            }
        }
        (None, response) => {
            let response = response.as_deref().unwrap_or("");
            let mut outcomes = preset.filters.iter().map(|f| {
                let e = extract::apply(f, response, q, seed);
                let ok = extract::is_correct(&preset.metric, e.pred.as_deref(), response, q);
                (e, ok)
            });
            let (first, correct) = outcomes.next().expect("presets have a filter");
            Scoring {
                pred: first.pred,
                correct,
                rule: first.rule,
                others: outcomes.map(|(e, ok)| (e.pred, ok)).collect(),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn results(
    docs: &[Doc],
    hashes: &[String],
    cache: &Cache,
    preset: &Preset,
    shots: usize,
    options: &EvalOptions,
    label: &str,
    adapter: Option<String>,
) -> Result<DataFrame, EvalError> {
    let n = docs.len();
    let mut cols: HashMap<&str, Vec<Option<String>>> = HashMap::new();
    let mut correct = Vec::with_capacity(n);
    let mut medical = Vec::with_capacity(n);
    let mut prompt_tokens = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut logprobs: Vec<Option<Series>> = Vec::with_capacity(n);
    let mut others: Vec<(Vec<Option<String>>, Vec<bool>)> =
        vec![(vec![], vec![]); preset.filters.len().saturating_sub(1)];
    for (d, h) in docs.iter().zip(hashes) {
        let q = &d.question;
        let record = cache
            .get(&q.id, h)
            .ok_or_else(|| EvalError::Cache(format!("no result for `{}`", q.id)))?;
        let s = score(preset, record, q, options.seed);
        for (name, value) in [
            ("id", Some(q.id.clone())),
            ("dataset", Some(q.dataset.clone())),
            ("subject", Some(q.subject.clone())),
            ("category", Some(q.category.clone())),
            ("pred", s.pred),
            ("response", record.response.clone()),
            ("rule", s.rule),
        ] {
            cols.entry(name).or_default().push(value);
        }
        correct.push(s.correct);
        medical.push(q.medical);
        prompt_tokens.push(record.prompt_tokens as u64);
        tokens.push(record.tokens as u64);
        logprobs.push(record.logprobs.as_ref().map(|v| Series::new("".into(), v)));
        for (slot, (p, ok)) in others.iter_mut().zip(s.others) {
            slot.0.push(p);
            slot.1.push(ok);
        }
    }
    let mut text = |name: &str| Column::new(name.into(), cols.remove(name).unwrap_or_default());
    let constant = |name: &str, value: Option<String>| Column::new(name.into(), vec![value; n]);
    let mut columns = vec![
        text("id"),
        text("dataset"),
        text("subject"),
        text("category"),
        Column::new("medical".into(), medical),
    ];
    if let Some(ext) = docs
        .iter()
        .map(|d| d.medical_ext)
        .collect::<Option<Vec<bool>>>()
    {
        columns.push(Column::new("medical_ext".into(), ext));
    }
    columns.extend([
        constant("model", Some(label.to_string())),
        constant("adapter", adapter),
        constant("preset", Some(preset.name.clone())),
        constant("mode", Some(preset.mode.name().into())),
        Column::new("shots".into(), vec![shots as u64; n]),
        Column::new("seed".into(), vec![options.seed; n]),
        text("pred"),
        Column::new("correct".into(), correct),
        text("response"),
        Column::new("prompt_tokens".into(), prompt_tokens),
        Column::new("tokens".into(), tokens),
    ]);
    match preset.mode {
        Mode::Loglik => {
            let list: ListChunked = logprobs.into_iter().collect();
            columns.push(list.with_name("logprobs".into()).into_column());
        }
        Mode::Generate => {
            columns.push(text("rule"));
            for (filter, (preds, oks)) in preset.filters.iter().skip(1).zip(others) {
                let name = filter.name.replace('-', "_");
                columns.push(Column::new(format!("pred_{name}").into(), preds));
                columns.push(Column::new(format!("correct_{name}").into(), oks));
            }
        }
    }
    Ok(DataFrame::new(n, columns)?)
}
