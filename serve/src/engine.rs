//! The generation thread: one continuous batch per model ([`Scheduler`]) runs the rows of
//! every request; a request is answered as soon as its last row ends, its rows scored first
//! when it asks for log-probabilities.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use rlvr::model::batching::Scheduler;
use rlvr::model::generate::{Completion, Sampling};
use rlvr::model::lm::LanguageModel;
use rlvr::model::tokenizer::Tokenizer;
use rlvr::progress::Cancel;

use crate::logprobs::{self, TokenScore};
use crate::lora::Adapter;

/// One HTTP request's rows, sent to the generation thread; the results come back on
/// `reply`.
pub(crate) struct Job {
    pub(crate) rows: Vec<(Vec<u32>, Sampling)>,
    /// Texts that end a row once its decoded completion holds one.
    pub(crate) stop: Vec<String>,
    /// Which tokens to score, when the request asks for log-probabilities.
    pub(crate) scoring: Option<Scoring>,
    /// The adapter the request named (`None`: the served model as loaded).
    pub(crate) adapter: Option<Arc<Adapter>>,
    pub(crate) reply: Sender<Result<Vec<Row>, String>>,
    /// With `stream`: each row's new tokens as they come (scored from the logits they were
    /// sampled from when `scoring` asks); a row ends once the receiver is gone.
    pub(crate) tokens: Option<Sender<Streamed>>,
    /// Set once the client has left: the generation thread ends the request's rows, and
    /// only its own, before its next step.
    pub(crate) cancel: Cancel,
}

/// A new token of a streamed row.
pub(crate) struct Streamed {
    /// The row's index in its request.
    pub(crate) row: usize,
    pub(crate) token: u32,
    /// Its score, when the request asks for log-probabilities.
    pub(crate) score: Option<TokenScore>,
    /// Whether it completes a stop text: its text is not sent as it comes (the last chunk
    /// sends the text before the stop text).
    pub(crate) stop: bool,
}

/// What a request wants scored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scoring {
    /// The prompt's tokens too (`echo`), not only the sample's.
    pub(crate) prompt: bool,
    /// Alternatives listed at each position.
    pub(crate) top: usize,
}

/// One row's result: its completion (empty for `max_tokens: 0`) and, when asked for, the
/// scores of the prompt's tokens after the first (with `echo`) and of the completion's.
pub(crate) struct Row {
    pub(crate) completion: Completion,
    pub(crate) scores: Vec<TokenScore>,
}

/// A request on the generation thread: its job, and its rows' completions as they end.
struct Running {
    job: Job,
    completions: Vec<Option<Completion>>,
}

/// One continuous batch over one model (the served model, or the model with one loaded
/// adapter): its [`Scheduler`], the requests running in it and which request each
/// scheduled row belongs to.
struct Batch<'a> {
    lm: &'a LanguageModel,
    scheduler: Scheduler<'a>,
    running: HashMap<usize, Running>,
    /// each scheduled row's request and its index there
    rows: HashMap<usize, (usize, usize)>,
    next_request: usize,
    next_row: usize,
}

impl<'a> Batch<'a> {
    /// An empty batch of at most `max_batch` rows on `lm`.
    fn new(lm: &'a LanguageModel, max_batch: usize) -> Self {
        Batch {
            lm,
            scheduler: Scheduler::with_rows(&lm.model, lm.lora.is_some(), None, max_batch),
            running: HashMap::new(),
            rows: HashMap::new(),
            next_request: 0,
            next_row: 0,
        }
    }

    /// Whether no row is running or waiting.
    fn is_idle(&self) -> bool {
        self.scheduler.is_idle()
    }

    /// Queues every row of `job`; it joins at the next step.
    fn admit(&mut self, job: Job) {
        for (r, (prompt, sampling)) in job.rows.iter().enumerate() {
            self.rows.insert(self.next_row, (self.next_request, r));
            self.scheduler
                .submit(self.next_row, prompt.clone(), sampling.clone());
            self.next_row += 1;
        }
        let completions = vec![None; job.rows.len()];
        self.running
            .insert(self.next_request, Running { job, completions });
        self.next_request += 1;
    }

    /// Ends the rows of every request whose client has left (the rows of the requests
    /// beside it, a shared prompt's included, run on); it gets no answer.
    fn drop_cancelled(&mut self) {
        let gone: Vec<usize> = (self.running.iter())
            .filter(|(_, request)| request.job.cancel.is_cancelled())
            .map(|(&id, _)| id)
            .collect();
        if gone.is_empty() {
            return;
        }
        let rows = &self.rows;
        let ended = self
            .scheduler
            .cancel(&|row| rows.get(&row).is_some_and(|(id, _)| gone.contains(id)));
        for (row, _) in ended {
            self.rows.remove(&row);
        }
        for id in gone {
            self.running.remove(&id);
        }
    }

    /// One decoding step; answers every request whose last row ended (scored first when
    /// it asks for log-probabilities). A step that fails fails the requests running in it.
    fn step(&mut self) {
        self.drop_cancelled();
        if self.is_idle() {
            return;
        }
        let (lm, running, rows) = (self.lm, &self.running, &self.rows);
        let step = rlvr::model::linear::no_grad(|| {
            self.scheduler.step(&mut |row, ids, logits| {
                let (id, r) = rows[&row];
                let job = &running[&id].job;
                let token = *ids.last().expect("a new token");
                let stop = ends_with_stop(&lm.tokenizer, ids, &job.stop);
                let left = job.tokens.as_ref().is_some_and(|tokens| {
                    let score = job
                        .scoring
                        .map(|s| logprobs::from_logits(logits, token, s.top));
                    let streamed = Streamed {
                        row: r,
                        token,
                        score,
                        stop,
                    };
                    tokens.send(streamed).is_err()
                });
                left || stop
            })
        });
        let ended = match step {
            Ok(ended) => ended,
            Err(e) => {
                self.scheduler.cancel_all();
                self.rows.clear();
                for (_, request) in self.running.drain() {
                    let _ = request.job.reply.send(Err(first_line(&e)));
                }
                return;
            }
        };
        for (row, completion) in ended {
            let (id, r) = self.rows.remove(&row).expect("a scheduled row");
            let request = self.running.get_mut(&id).expect("a running request");
            request.completions[r] = Some(completion);
            if request.completions.iter().all(Option::is_some) {
                let request = self.running.remove(&id).expect("a running request");
                let answer = scored(lm, &request).map_err(|e| first_line(&e));
                let _ = request.job.reply.send(answer);
            }
        }
    }
}

/// The generation thread: one continuous batch of `max_batch` rows on the served model
/// runs the rows of every request; requests that arrive join it at the next step, and each
/// is answered as soon as its last row ends. Requests naming a loaded adapter run, adapter
/// by adapter, in a batch of their own on that adapter's model, between two steps of the
/// served model's batch.
pub(crate) fn run_engine(lm: &LanguageModel, queue: &Receiver<Job>, max_batch: usize) {
    let mut batch = Batch::new(lm, max_batch);
    loop {
        let first = if batch.is_idle() {
            let Ok(job) = queue.recv() else { return };
            Some(job)
        } else {
            None
        };
        let mut with_adapter = Vec::new();
        for job in first
            .into_iter()
            .chain(std::iter::from_fn(|| queue.try_recv().ok()))
        {
            if job.adapter.is_some() {
                with_adapter.push(job);
            } else {
                batch.admit(job);
            }
        }
        for group in by_adapter(with_adapter) {
            let adapter = group[0].adapter.clone().expect("an adapter");
            let mut own = Batch::new(&adapter.lm, max_batch);
            for job in group {
                own.admit(job);
            }
            while !own.is_idle() {
                own.step();
            }
        }
        if !batch.is_idle() {
            batch.step();
        }
    }
}

/// Jobs that name an adapter, grouped by it, in order of first appearance.
fn by_adapter(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        let same = |other: &Job| match (&job.adapter, &other.adapter) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        match groups.iter_mut().find(|g| same(&g[0])) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// The first line of an error (candle appends a backtrace to some).
fn first_line(e: &rlvr::model::ModelError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// A finished request's rows, each with the scores it asks for: the prompt's tokens after
/// the first (with `echo`) and the completion's.
fn scored(lm: &LanguageModel, request: &Running) -> rlvr::model::Result<Vec<Row>> {
    let adapters_on = lm.lora.is_some();
    let job = &request.job;
    job.rows
        .iter()
        .zip(&request.completions)
        .map(|((prompt, _), completion)| {
            let completion = completion.clone().expect("every row ended");
            // a streamed request's tokens were scored as they came
            let scores = match job.scoring.filter(|_| job.tokens.is_none()) {
                Some(scoring) => {
                    let whole: Vec<u32> = prompt.iter().chain(&completion.ids).copied().collect();
                    let from = if scoring.prompt { 1 } else { prompt.len() };
                    logprobs::score(&lm.model, &whole, from, scoring.top, adapters_on)?
                }
                None => vec![],
            };
            Ok(Row { completion, scores })
        })
        .collect()
}

/// Whether the text of `ids` now holds one of the `stop` texts. A stop text that was not
/// there before ends in the newest token, and a text of `b` bytes spans at most `b` tokens
/// (plus one cut across its start), so only the last tokens are decoded.
fn ends_with_stop(tokenizer: &Tokenizer, ids: &[u32], stop: &[String]) -> bool {
    let Some(longest) = stop.iter().map(String::len).max() else {
        return false;
    };
    let tail = &ids[ids.len().saturating_sub(longest + 2)..];
    tokenizer
        .decode(tail)
        .is_ok_and(|text| stop.iter().any(|s| text.contains(s.as_str())))
}
