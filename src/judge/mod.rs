//! Judge filtering: a judge model answers each question `k` times; each response is checked
//! for the right answer and the required format ([`crate::reward::verdict`]), and the share
//! of responses that are both is the question's pass rate. The study's selection then takes
//! hard and easy questions by pass rate ([`select_by_difficulty`]).
//!
//! Responses are appended to `$RLVR_HOME/cache/judge/<key>.jsonl` as each finishes,
//! keyed by the judge (a local model with its adapter's fingerprint, or a server's model
//! name whatever its address), the sampling settings, the item id, the prompt's hash and the sample
//! index: a rerun, or a run after a crash, only asks for what is missing. Each sample's seed
//! comes from the item id and its index, so the table does not depend on batching or on
//! interruptions.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use polars::prelude::*;
use sha2::{Digest, Sha256};

use crate::data::question::{questions, Question};
use crate::data::table;
use crate::model::chat::Message;
use crate::model::generate::{generate, Sampling};
use crate::model::lm::LanguageModel;
use crate::progress::Job;
use crate::prompt::PromptTemplate;
use crate::reward::verdict;

/// A failure while judging or selecting.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    /// Bad settings or input.
    #[error("judge: {0}")]
    Setup(String),
    /// The judge model failed.
    #[error("judge: {0}")]
    Model(#[from] crate::model::ModelError),
    /// A table failure.
    #[error("judge: {0}")]
    Data(#[from] crate::data::DataError),
    /// The cache could not be read or written.
    #[error("judge: {0}")]
    Cache(String),
    /// Stopped on request; the responses so far are kept.
    #[error(
        "judge: interrupted after {done} of {total} responses; they are kept and a rerun resumes"
    )]
    Interrupted { done: usize, total: usize },
}

/// Something that answers conversations: a local model or a server.
pub trait Responder {
    /// A name for the Judged table.
    fn name(&self) -> String;
    /// What keys the cache: whatever changes the responses. A local model's name with its
    /// adapter's fingerprint; a server's model name (servers of one model share responses,
    /// wherever they run).
    fn cache_name(&self) -> String;
    /// One response per conversation, conversation `i` sampled with `seeds[i]`.
    fn respond(
        &self,
        conversations: &[Vec<Message>],
        seeds: &[u64],
        sampling: &Sampling,
        job: &Job,
    ) -> Result<Vec<String>, JudgeError>;
    /// As [`Responder::respond`], reporting each response as `on_done(i, response)` as it
    /// finishes, so that the judge keeps it at once; by default the batch's responses are
    /// reported when all are done.
    fn respond_each(
        &self,
        conversations: &[Vec<Message>],
        seeds: &[u64],
        sampling: &Sampling,
        job: &Job,
        on_done: &mut dyn FnMut(usize, String),
    ) -> Result<(), JudgeError> {
        let responses = self.respond(conversations, seeds, sampling, job)?;
        for (i, response) in responses.into_iter().enumerate() {
            on_done(i, response);
        }
        Ok(())
    }
}

impl Responder for LanguageModel {
    fn name(&self) -> String {
        let mut name = self.name.clone();
        if self.lora.is_some() {
            name.push_str("+adapter");
        }
        name
    }

    fn cache_name(&self) -> String {
        match self.adapter_fingerprint() {
            Some(adapter) => format!("{}+adapter {adapter}", self.name),
            None => self.name.clone(),
        }
    }

    fn respond(
        &self,
        conversations: &[Vec<Message>],
        seeds: &[u64],
        sampling: &Sampling,
        job: &Job,
    ) -> Result<Vec<String>, JudgeError> {
        let prompts = conversations
            .iter()
            .map(|c| {
                let text = self.tokenizer.chat(c, true)?;
                self.tokenizer.encode(&text)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut stop_ids = sampling.stop_ids.clone();
        stop_ids.extend(self.tokenizer.stop_ids());
        let requests: Vec<Sampling> = seeds
            .iter()
            .map(|&seed| Sampling {
                seed,
                stop_ids: stop_ids.clone(),
                ..sampling.clone()
            })
            .collect();
        let mut cancelled = false;
        let decode = |ids: &[u32]| self.tokenizer.decode(ids);
        let out = generate(
            &self.model,
            &prompts,
            &requests,
            self.lora.is_some(),
            Some(&decode),
            &mut |_| {
                cancelled = job.cancel.is_cancelled();
                !cancelled
            },
        )?;
        if cancelled {
            return Err(JudgeError::Interrupted { done: 0, total: 0 });
        }
        out.into_iter()
            .map(|c| Ok(self.text_of(&c, &stop_ids, sampling)?))
            .collect()
    }
}

#[cfg(feature = "http")]
impl Responder for crate::endpoint::Endpoint {
    fn name(&self) -> String {
        format!("{} at {}", self.model(), self.base_url())
    }

    fn cache_name(&self) -> String {
        // kept apart from a local model of the same name
        format!("served {}", self.model())
    }

    fn respond(
        &self,
        conversations: &[Vec<Message>],
        seeds: &[u64],
        sampling: &Sampling,
        job: &Job,
    ) -> Result<Vec<String>, JudgeError> {
        use crate::endpoint::{ChatRequest, RequestParams};
        if sampling.include_stop {
            return Err(JudgeError::Setup(
                "include_stop needs a local model: an OpenAI-compatible server drops the stop \
                 string from its replies"
                    .into(),
            ));
        }
        let requests: Vec<ChatRequest> = conversations
            .iter()
            .zip(seeds)
            .map(|(messages, &seed)| ChatRequest {
                messages: messages.clone(),
                params: RequestParams {
                    max_tokens: sampling.max_tokens,
                    temperature: sampling.temperature,
                    top_p: sampling.top_p,
                    n: 1,
                    seed: Some(seed),
                    stop: sampling.stop_strings.clone(),
                },
            })
            .collect();
        // the judge reports per batch; the endpoint's own report would restart its bar
        let quiet = Job {
            progress: std::sync::Arc::new(crate::progress::Silent),
            cancel: job.cancel.clone(),
        };
        self.chat(&requests, &quiet, &mut |_, _| {})
            .into_iter()
            .map(|reply| match reply {
                Ok(r) => r
                    .texts
                    .into_iter()
                    .next()
                    .ok_or_else(|| JudgeError::Setup("the server sent no text".into())),
                Err(crate::endpoint::EndpointError::Cancelled) => {
                    Err(JudgeError::Interrupted { done: 0, total: 0 })
                }
                Err(e) => Err(JudgeError::Setup(e.to_string())),
            })
            .collect()
    }
}

/// Servers of one model as one judge: each conversation goes to a server with a free slot,
/// a server that dies hands its conversations to the others, and each response is reported
/// as it arrives. The cache is the one of any server of that model.
#[cfg(feature = "http")]
impl Responder for crate::endpoint::Fleet {
    fn name(&self) -> String {
        let urls: Vec<&str> = self.endpoints().iter().map(|e| e.base_url()).collect();
        format!("{} at {}", self.model(), urls.join(", "))
    }

    fn cache_name(&self) -> String {
        self.endpoints()[0].cache_name()
    }

    fn respond(
        &self,
        conversations: &[Vec<Message>],
        seeds: &[u64],
        sampling: &Sampling,
        job: &Job,
    ) -> Result<Vec<String>, JudgeError> {
        let mut out = vec![String::new(); conversations.len()];
        self.respond_each(conversations, seeds, sampling, job, &mut |i, r| out[i] = r)?;
        Ok(out)
    }

    fn respond_each(
        &self,
        conversations: &[Vec<Message>],
        seeds: &[u64],
        sampling: &Sampling,
        job: &Job,
        on_done: &mut dyn FnMut(usize, String),
    ) -> Result<(), JudgeError> {
        use crate::endpoint::{Endpoint, FleetError};
        let work = |server: &Endpoint, i: usize| {
            let mut one = server.respond(
                std::slice::from_ref(&conversations[i]),
                &seeds[i..=i],
                sampling,
                job,
            )?;
            Ok::<String, JudgeError>(one.remove(0))
        };
        self.spread(conversations.len(), job, &work, on_done)
            .map_err(|e| match e {
                FleetError::Item { error, .. } => error,
                FleetError::Cancelled => JudgeError::Interrupted { done: 0, total: 0 },
                down @ FleetError::Down { .. } => JudgeError::Setup(down.to_string()),
            })
    }
}

/// How to judge.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeConfig {
    /// Responses per question (k).
    pub samples: usize,
    /// How a question becomes a conversation (the study's prompt by default).
    pub template: PromptTemplate,
    /// Sampling of each response.
    pub sampling: Sampling,
    /// Conversations per batch.
    pub batch: usize,
    /// Seed of the samples.
    pub seed: u64,
    /// Where responses are kept (`<cache_dir>/judge/<key>.jsonl`); `$RLVR_HOME/cache` by
    /// default.
    pub cache_dir: PathBuf,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            samples: 1,
            template: PromptTemplate::study(),
            sampling: Sampling {
                max_tokens: 256,
                temperature: 0.7,
                ..Sampling::default()
            },
            batch: 8,
            seed: 0,
            cache_dir: crate::paths::rlvr_home().join("cache"),
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedResponse {
    id: String,
    prompt: String,
    sample: usize,
    response: String,
}

/// Judges every question of `items` (an Items table) with `judge`, returning the Judged
/// table: the items' columns plus `judge`, `samples`, `responses`, `correct`, `format_ok`,
/// `n_correct` (right answers) and `pass_rate` (the share both right and well formatted).
pub fn judge(
    judge: &dyn Responder,
    items: &DataFrame,
    config: &JudgeConfig,
    job: &Job,
) -> Result<DataFrame, JudgeError> {
    if config.samples == 0 || config.batch == 0 {
        return Err(JudgeError::Setup(
            "samples and batch must be at least 1".into(),
        ));
    }
    let qs = questions(items)?;
    let name = judge.name();
    let cache_path = cache_path(&judge.cache_name(), config);
    let mut cache = read_cache(&cache_path)?;

    // what is missing
    let prompts: Vec<Vec<Message>> = qs.iter().map(|q| config.template.messages(q)).collect();
    let prompt_hashes: Vec<String> = prompts.iter().map(|m| hash_messages(m)).collect();
    let mut todo: Vec<(usize, usize)> = vec![];
    for (i, q) in qs.iter().enumerate() {
        for s in 0..config.samples {
            if !cache.contains_key(&(q.id.clone(), prompt_hashes[i].clone(), s)) {
                todo.push((i, s));
            }
        }
    }
    let total = qs.len() * config.samples;
    let mut done = total - todo.len();
    job.progress
        .start(&format!("judging with {name}"), total as u64);
    job.progress.update(done as u64, "");
    for chunk in todo.chunks(config.batch) {
        if job.cancel.is_cancelled() {
            return Err(JudgeError::Interrupted { done, total });
        }
        let conversations: Vec<Vec<Message>> =
            chunk.iter().map(|&(i, _)| prompts[i].clone()).collect();
        let seeds: Vec<u64> = chunk
            .iter()
            .map(|&(i, s)| sample_seed(config.seed, &qs[i].id, s))
            .collect();
        // each response is kept as it arrives: a crash loses only those in flight
        let mut kept: Result<(), JudgeError> = Ok(());
        let answered = judge.respond_each(
            &conversations,
            &seeds,
            &config.sampling,
            job,
            &mut |k, response| {
                let (i, s) = chunk[k];
                let record = CachedResponse {
                    id: qs[i].id.clone(),
                    prompt: prompt_hashes[i].clone(),
                    sample: s,
                    response,
                };
                if kept.is_ok() {
                    kept = append_cache(&cache_path, std::slice::from_ref(&record));
                }
                cache.insert((record.id, record.prompt, record.sample), record.response);
                done += 1;
                job.progress.update(done as u64, "");
            },
        );
        kept?;
        match answered {
            Err(JudgeError::Interrupted { .. }) => {
                return Err(JudgeError::Interrupted { done, total })
            }
            other => other?,
        }
    }
    job.progress
        .finish(&format!("{} questions judged", qs.len()));
    judged_table(items, &qs, &prompt_hashes, &cache, &name, config.samples)
}

fn judged_table(
    items: &DataFrame,
    qs: &[Question],
    prompt_hashes: &[String],
    cache: &HashMap<(String, String, usize), String>,
    name: &str,
    samples: usize,
) -> Result<DataFrame, JudgeError> {
    let mut responses =
        ListStringChunkedBuilder::new("responses".into(), qs.len(), qs.len() * samples);
    let mut correct =
        ListBooleanChunkedBuilder::new("correct".into(), qs.len(), qs.len() * samples);
    let mut format_ok =
        ListBooleanChunkedBuilder::new("format_ok".into(), qs.len(), qs.len() * samples);
    let mut n_correct = Vec::with_capacity(qs.len());
    let mut pass_rate = Vec::with_capacity(qs.len());
    for (i, q) in qs.iter().enumerate() {
        let texts: Vec<&str> = (0..samples)
            .map(|s| cache[&(q.id.clone(), prompt_hashes[i].clone(), s)].as_str())
            .collect();
        let verdicts: Vec<_> = texts.iter().map(|t| verdict(t, q)).collect();
        responses.append_values_iter(texts.iter().copied());
        correct.append_iter(verdicts.iter().map(|v| Some(v.correct)));
        format_ok.append_iter(verdicts.iter().map(|v| Some(v.format_ok)));
        n_correct.push(verdicts.iter().filter(|v| v.correct).count() as u32);
        pass_rate.push(
            verdicts.iter().filter(|v| v.correct && v.format_ok).count() as f64 / samples as f64,
        );
    }
    let polars = |e: PolarsError| JudgeError::Cache(e.to_string());
    let mut df = items.clone();
    let n = qs.len();
    for column in [
        Column::new("judge".into(), vec![name; n]),
        Column::new("samples".into(), vec![samples as u32; n]),
        responses.finish().into_series().into_column(),
        correct.finish().into_series().into_column(),
        format_ok.finish().into_series().into_column(),
        Column::new("n_correct".into(), n_correct),
        Column::new("pass_rate".into(), pass_rate),
    ] {
        df.with_column(column).map_err(polars)?;
    }
    Ok(df)
}

/// How many hard and easy questions to take.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Hard questions (pass rate below `easy_min`, or at most `hard_max` when given).
    pub hard: usize,
    /// Easy questions (pass rate at least `easy_min`).
    pub easy: usize,
    /// The pass rate from which a question is easy (1.0: every response right and well
    /// formatted; the study's rule at k = 1).
    pub easy_min: f64,
    /// The highest pass rate of a hard question, when it should not simply be below
    /// `easy_min` (a band for k > 1).
    pub hard_max: Option<f64>,
    /// Seed of the sampling within each band.
    pub seed: u64,
}

impl Default for Selection {
    /// The study's mix: 400 hard and 100 easy.
    fn default() -> Self {
        Selection {
            hard: 400,
            easy: 100,
            easy_min: 1.0,
            hard_max: None,
            seed: 42,
        }
    }
}

/// Takes `hard` and `easy` questions from a Judged table by pass rate, sampled without
/// replacement, hard first, with a `difficulty` column. Fails when a band has too few.
pub fn select_by_difficulty(judged: &DataFrame, s: &Selection) -> Result<DataFrame, JudgeError> {
    let rates: Vec<f64> = judged
        .column("pass_rate")
        .map_err(|_| {
            JudgeError::Setup("the table has no `pass_rate` column; judge it first".into())
        })?
        .f64()
        .map_err(|e| JudgeError::Setup(format!("column `pass_rate`: {e}")))?
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .collect();
    let is_easy = |r: f64| r >= s.easy_min;
    let is_hard = |r: f64| match s.hard_max {
        Some(max) => r <= max,
        None => r < s.easy_min,
    };
    let band = |keep: &dyn Fn(f64) -> bool,
                n: usize,
                label: &str,
                rule: String|
     -> Result<DataFrame, JudgeError> {
        let mask: BooleanChunked = rates.iter().map(|&r| keep(r)).collect();
        let rows = judged
            .filter(&mask)
            .map_err(|e| JudgeError::Cache(e.to_string()))?;
        if rows.height() < n {
            return Err(JudgeError::Setup(format!(
                "only {} {label} questions ({rule}) but {n} asked; judge more questions or lower `{label}`",
                rows.height()
            )));
        }
        let mut picked = table::sample(&rows, n, s.seed)?;
        picked
            .with_column(Column::new("difficulty".into(), vec![label; n]))
            .map_err(|e| JudgeError::Cache(e.to_string()))?;
        Ok(picked)
    };
    let hard_rule = match s.hard_max {
        Some(max) => format!("pass_rate <= {max}"),
        None => format!("pass_rate < {}", s.easy_min),
    };
    let hard = band(&is_hard, s.hard, "hard", hard_rule)?;
    let easy = band(
        &is_easy,
        s.easy,
        "easy",
        format!("pass_rate >= {}", s.easy_min),
    )?;
    Ok(table::concat(&[hard, easy])?)
}

fn sample_seed(seed: u64, id: &str, sample: usize) -> u64 {
    let digest = Sha256::digest(format!("{seed}\u{0}{id}\u{0}{sample}").as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn hash_messages(messages: &[Message]) -> String {
    let text = serde_json::to_string(messages).expect("JSON");
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn cache_path(name: &str, config: &JudgeConfig) -> PathBuf {
    let s = &config.sampling;
    // the sample count is not part of the key: raising k reuses the responses already there
    let key = format!(
        "{name}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}\u{0}{:?}\u{0}{}",
        s.max_tokens,
        s.temperature,
        s.top_k,
        s.top_p,
        s.min_p,
        config.seed,
        s.stop_ids,
        s.stop_strings,
        s.include_stop
    );
    let digest = Sha256::digest(key.as_bytes());
    let key: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    config.cache_dir.join("judge").join(format!("{key}.jsonl"))
}

type Cache = HashMap<(String, String, usize), String>;

fn read_cache(path: &PathBuf) -> Result<Cache, JudgeError> {
    let mut cache = HashMap::new();
    let Ok(file) = fs::File::open(path) else {
        return Ok(cache);
    };
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| JudgeError::Cache(format!("{}: {e}", path.display())))?;
        // a torn last line from a crash is skipped; its response is asked again
        if let Ok(r) = serde_json::from_str::<CachedResponse>(&line) {
            cache.insert((r.id, r.prompt, r.sample), r.response);
        }
    }
    Ok(cache)
}

fn append_cache(path: &PathBuf, records: &[CachedResponse]) -> Result<(), JudgeError> {
    let err = |e: std::io::Error| JudgeError::Cache(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let mut text = String::new();
    for r in records {
        // a torn line left by a crash ends here, so the next record starts on its own line
        text.push('\n');
        text.push_str(&serde_json::to_string(r).expect("JSON"));
    }
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_data().map_err(err)
}
