//! What evaluation needs from a model, as a small trait: complete prompts, and score
//! continuations. The local candle model implements it here ([`LocalModel`]); an
//! OpenAI-compatible endpoint (`rlvr::endpoint::Endpoint`: chat and completions, with `echo`
//! and `logprobs` for scoring) implements it in `endpoint_backend.rs` beside this file.

use std::collections::HashMap;

use super::render::Prompt;
use super::EvalError;
use crate::model::generate::{generate, Sampling};
use crate::model::lm::LanguageModel;
use crate::model::padded::{self, PaddedRows};
use crate::model::{Input, KvCache};
use crate::progress::Job;

/// How completions are sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// New tokens at most.
    pub max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// The completion ends before the first of these strings.
    pub until: Vec<String>,
    /// Seed of the first prompt's sampler (prompt `i` uses `seed + i`).
    pub seed: u64,
}

/// One completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// The text, cut before the first stop string.
    pub text: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub tokens: usize,
}

/// One multiple-choice scoring request: a context and the continuations to score.
#[derive(Debug, Clone, PartialEq)]
pub struct Choices {
    /// The prompt.
    pub context: String,
    /// What may follow it (` A`, ` B`, …).
    pub continuations: Vec<String>,
}

/// The scores of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// `log p(continuation | context)` for each continuation.
    pub logprobs: Vec<f64>,
    /// Tokens of the context.
    pub prompt_tokens: usize,
}

/// A model evaluation can run on.
pub trait Backend {
    /// The model's name in Results and cache keys.
    fn model_name(&self) -> String;
    /// A fingerprint of the adapter (`None`: the model as loaded).
    fn adapter(&self) -> Option<String>;
    /// The `model` column's value when the options name none: the model file's stem, with
    /// the adapter's fingerprint.
    fn label(&self) -> String {
        super::default_label(&self.model_name(), self.adapter().as_deref())
    }
    /// Whether a server answers (its cache is kept apart from a local model's of the same
    /// name).
    fn served(&self) -> bool {
        false
    }
    /// Completes every prompt (one batch).
    fn complete(
        &self,
        prompts: &[Prompt],
        options: &GenerateOptions,
        job: &Job,
    ) -> Result<Vec<Completed>, EvalError>;
    /// Scores every request's continuations (one batch).
    fn loglik(&self, requests: &[Choices], job: &Job) -> Result<Vec<Scored>, EvalError>;
}

/// Rows × width² of one scoring forward at most (per attention head: 16 M scores, 64 MB).
const ATTENTION_BUDGET: usize = 1 << 24;
/// Rows × width of one scoring forward on a CPU at most: a forward of a few hundred
/// positions already keeps its matrix kernels busy, and more rows of uneven length only add
/// padding. A GPU takes the whole batch (within the attention budget).
const CPU_TOKEN_BUDGET: usize = 1024;

fn model_error(e: impl std::fmt::Display) -> EvalError {
    EvalError::Model(e.to_string())
}

/// The local model as an evaluation backend. Adapters are folded into the weights
/// (`W + scale · B A`) once: inference needs no gradients, and candle records the graph of
/// every operation that touches a trainable tensor, which would keep a whole batch's
/// activations alive. The adapter's fingerprint is kept for Results and the cache.
pub struct LocalModel {
    lm: LanguageModel,
    adapter: Option<String>,
}

impl LocalModel {
    /// The backend for `lm` (its adapter, if any, merged into a copy of the weights).
    pub fn new(lm: &LanguageModel) -> Result<Self, EvalError> {
        let adapter = lm.adapter_fingerprint();
        let mut merged = lm.clone();
        if merged.lora.is_some() {
            for (_, linear) in merged.model.linears_mut() {
                if linear.lora.is_some() {
                    linear.weight = linear.merged_weight().map_err(model_error)?.detach();
                    linear.lora = None;
                }
            }
            merged.lora = None;
        }
        Ok(LocalModel {
            lm: merged,
            adapter,
        })
    }
}

impl Backend for LocalModel {
    fn model_name(&self) -> String {
        self.lm.name.clone()
    }

    fn adapter(&self) -> Option<String> {
        self.adapter.clone()
    }

    fn complete(
        &self,
        prompts: &[Prompt],
        options: &GenerateOptions,
        job: &Job,
    ) -> Result<Vec<Completed>, EvalError> {
        let texts = prompts
            .iter()
            .map(|p| match p {
                Prompt::Text(t) => Ok(t.clone()),
                Prompt::Chat(messages) => self.lm.tokenizer.chat(messages, true),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(model_error)?;
        let ids = texts
            .iter()
            .map(|t| self.lm.tokenizer.encode(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(model_error)?;
        let stop_ids = self.lm.tokenizer.stop_ids();
        let requests: Vec<Sampling> = (0..prompts.len())
            .map(|i| Sampling {
                max_tokens: options.max_tokens,
                temperature: options.temperature,
                seed: options.seed.wrapping_add(i as u64),
                stop_ids: stop_ids.clone(),
                stop_strings: options.until.clone(),
                ..Sampling::default()
            })
            .collect();
        // a row stops at a stop token or once a stop string appears in its text
        let decode = |ids: &[u32]| self.lm.tokenizer.decode(ids);
        let completions = generate(
            &self.lm.model,
            &ids,
            &requests,
            self.lm.lora.is_some(),
            Some(&decode),
            &mut |_| !job.cancel.is_cancelled(),
        )
        .map_err(model_error)?;
        completions
            .into_iter()
            .zip(&ids)
            .zip(&requests)
            .map(|((c, prompt), request)| {
                let text = self
                    .lm
                    .text_of(&c, &stop_ids, request)
                    .map_err(model_error)?;
                Ok(Completed {
                    text,
                    prompt_tokens: prompt.len(),
                    tokens: c.ids.len(),
                })
            })
            .collect()
    }

    fn loglik(&self, requests: &[Choices], job: &Job) -> Result<Vec<Scored>, EvalError> {
        job.check()?;
        let encoded = requests
            .iter()
            .map(|r| encode_pair(&self.lm, r))
            .collect::<Result<Vec<_>, _>>()?;
        let adapters_on = false;
        let token_budget = if self.lm.model.device().is_cpu() {
            CPU_TOKEN_BUDGET
        } else {
            usize::MAX
        };
        let order = scoring_order(&encoded);
        let mut slots: Vec<Option<Encoded>> = encoded.into_iter().map(Some).collect();
        let encoded: Vec<Encoded> = order.iter().filter_map(|&i| slots[i].take()).collect();
        // sub-batches whose attention blocks (rows × width²) and positions (rows × width)
        // stay within budgets
        let lengths: Vec<usize> = encoded.iter().map(|e| e.context.len()).collect();
        let batches = padded::batches_within(&lengths, |rows, width| {
            rows * width * width <= ATTENTION_BUDGET && rows * width <= token_budget
        });
        let mut scored = Vec::with_capacity(encoded.len());
        for batch in batches {
            job.check()?;
            scored.extend(
                score_batch(&self.lm.model, &encoded[batch], adapters_on).map_err(model_error)?,
            );
        }
        let mut in_request_order: Vec<Option<Scored>> = vec![None; scored.len()];
        for (&i, s) in order.iter().zip(scored) {
            in_request_order[i] = Some(s);
        }
        Ok(in_request_order.into_iter().flatten().collect())
    }
}

/// Contexts that begin alike for this many tokens are taken to share a few-shot prefix.
const SHARED_HEAD: usize = 32;

/// The order to score contexts in: those sharing their first [`SHARED_HEAD`] tokens with
/// another together (one prefix forward for them), the rest by falling token count, so
/// that a sub-batch holds contexts of about one length (little padding).
fn scoring_order(encoded: &[Encoded]) -> Vec<usize> {
    fn head(e: &Encoded) -> &[u32] {
        &e.context[..e.context.len().min(SHARED_HEAD)]
    }
    let mut heads: HashMap<&[u32], usize> = HashMap::new();
    for e in encoded {
        *heads.entry(head(e)).or_default() += 1;
    }
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| {
        let e = &encoded[i];
        let shared = heads[head(e)] > 1 && e.context.len() > SHARED_HEAD;
        (
            !shared,
            if shared { head(e).to_vec() } else { Vec::new() },
            std::cmp::Reverse(e.context.len()),
        )
    });
    order
}

/// Cuts `text` before the first occurrence of any of `until` (lm-eval splits on each stop
/// string in turn and keeps the first part).
pub fn cut_at_stop(text: &mut String, until: &[String]) {
    for stop in until.iter().filter(|s| !s.is_empty()) {
        if let Some(at) = text.find(stop.as_str()) {
            text.truncate(at);
        }
    }
}

/// A request as token ids, split as lm-eval's `_encode_pair` splits it: trailing spaces of
/// the context move to the continuation, the context is tokenized alone (BOS added) and the
/// continuation is what follows it in the tokenization of the whole text.
struct Encoded {
    context: Vec<u32>,
    continuations: Vec<Vec<u32>>,
}

fn encode_pair(lm: &LanguageModel, request: &Choices) -> Result<Encoded, EvalError> {
    let trimmed = request.context.trim_end();
    let spaces = &request.context[trimmed.len()..];
    let context = lm.tokenizer.encode(trimmed).map_err(model_error)?;
    let continuations = request
        .continuations
        .iter()
        .map(|c| {
            let whole = lm
                .tokenizer
                .encode(&format!("{trimmed}{spaces}{c}"))
                .map_err(model_error)?;
            let tail = whole.get(context.len()..).unwrap_or_default().to_vec();
            if tail.is_empty() {
                return Err(EvalError::Model(format!(
                    "the continuation `{c}` adds no token to the context"
                )));
            }
            Ok(tail)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if context.is_empty() {
        return Err(EvalError::Model("an empty context cannot be scored".into()));
    }
    Ok(Encoded {
        context,
        continuations,
    })
}

/// Scores a batch: one forward of the left-padded contexts gives every continuation's first
/// token; continuations of several tokens go on from a copy of the contexts' KV cache, one
/// row per continuation.
fn score_batch(
    model: &crate::model::Model,
    batch: &[Encoded],
    adapters_on: bool,
) -> crate::model::Result<Vec<Scored>> {
    use candle_core::D;
    let single = batch
        .iter()
        .all(|e| e.continuations.iter().all(|c| c.len() == 1));
    let shared = shared_prefix(batch);
    if batch.len() > 1 && single && shared >= MIN_SHARED_PREFIX {
        return score_after_prefix(model, batch, shared, adapters_on);
    }
    let contexts: Vec<&[u32]> = batch.iter().map(|e| e.context.as_slice()).collect();
    let contexts = PaddedRows::left(&contexts);
    let width = contexts.width();
    let input = contexts.input(model.device())?;
    let longer = batch
        .iter()
        .any(|e| e.continuations.iter().any(|c| c.len() > 1));
    let mut cache = longer.then(|| KvCache::new(model.num_layers()));
    let hidden = model.forward(&input, cache.as_mut(), adapters_on)?;
    let last = hidden.narrow(1, width - 1, 1)?.squeeze(1)?; // [b, d]
    let logits = model.head_logits(&last)?;
    let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
    let mut scores: Vec<Vec<f64>> = batch
        .iter()
        .zip(&logprobs)
        .map(|(e, row)| {
            e.continuations
                .iter()
                .map(|c| row[c[0] as usize] as f64)
                .collect()
        })
        .collect();
    if let Some(cache) = cache {
        add_later_tokens(
            model,
            batch,
            cache,
            &input.key_valid,
            &mut scores,
            adapters_on,
        )?;
    }
    Ok(batch
        .iter()
        .zip(scores)
        .map(|(e, logprobs)| Scored {
            logprobs,
            prompt_tokens: e.context.len(),
        })
        .collect())
}

/// Adds to `scores` the log-probabilities of the continuations' tokens after their first:
/// one row per continuation of several tokens, from a copy of its context's rows of `cache`
/// (whose keys `key_valid` marks).
fn add_later_tokens(
    model: &crate::model::Model,
    batch: &[Encoded],
    mut cache: KvCache,
    key_valid: &[Vec<bool>],
    scores: &mut [Vec<f64>],
    adapters_on: bool,
) -> crate::model::Result<()> {
    use crate::model::logprob::gather_logprobs;
    use candle_core::Tensor;
    let device = model.device().clone();
    // rows: (request, continuation) pairs with more than one token
    let rows: Vec<(usize, usize)> = batch
        .iter()
        .enumerate()
        .flat_map(|(i, e)| {
            e.continuations
                .iter()
                .enumerate()
                .filter(|(_, c)| c.len() > 1)
                .map(move |(j, _)| (i, j))
        })
        .collect();
    let index: Vec<u32> = rows.iter().map(|&(i, _)| i as u32).collect();
    cache.select_rows(&Tensor::from_vec(index, rows.len(), &device)?)?;
    // each continuation but its last token, after its context's keys
    let fed: Vec<&[u32]> = rows
        .iter()
        .map(|&(i, j)| {
            let c = &batch[i].continuations[j];
            &c[..c.len() - 1]
        })
        .collect();
    let cached = rows.iter().map(|&(i, _)| key_valid[i].clone()).collect();
    let fed = PaddedRows::right_after(&fed, cached);
    let steps = fed.width();
    let mut targets = Vec::new();
    let mut picks = Vec::new(); // (row, step) whose state predicts a scored token
    for (r, &(i, j)) in rows.iter().enumerate() {
        let c = &batch[i].continuations[j];
        for s in 0..c.len() - 1 {
            targets.push(c[s + 1]);
            picks.push((r * steps + s) as u32);
        }
    }
    let input = fed.input(&device)?;
    let hidden = model.forward(&input, Some(&mut cache), adapters_on)?;
    let d = hidden.dim(2)?;
    let flat = hidden.reshape((rows.len() * steps, d))?;
    let picked = flat.index_select(&Tensor::new(picks.as_slice(), &device)?, 0)?;
    let targets = Tensor::new(targets.as_slice(), &device)?;
    let lp = gather_logprobs(
        &picked,
        model.lm_head(),
        &targets,
        model.logit_softcap(),
        1.0,
    )?
    .to_vec1::<f32>()?;
    let mut k = 0;
    for &(i, j) in &rows {
        let extra = batch[i].continuations[j].len() - 1;
        scores[i][j] += lp[k..k + extra].iter().map(|&x| x as f64).sum::<f64>();
        k += extra;
    }
    Ok(())
}

/// Shared prefixes shorter than this are not worth a separate forward.
const MIN_SHARED_PREFIX: usize = 16;

/// The number of leading tokens every context of the batch shares, leaving each context
/// at least one token of its own.
fn shared_prefix(batch: &[Encoded]) -> usize {
    let Some(first) = batch.first() else {
        return 0;
    };
    let shortest = batch.iter().map(|e| e.context.len()).min().unwrap_or(0);
    let mut n = 0;
    while n + 1 < shortest && batch.iter().all(|e| e.context[n] == first.context[n]) {
        n += 1;
    }
    n
}

/// Scores single-token continuations of contexts that share their first `shared` tokens
/// (a few-shot prefix): the prefix is run once, its KV cache copied to every row, and only
/// each context's own tokens follow, right-padded so that every real token sits right after
/// the prefix (sliding windows count slots).
fn score_after_prefix(
    model: &crate::model::Model,
    batch: &[Encoded],
    shared: usize,
    adapters_on: bool,
) -> crate::model::Result<Vec<Scored>> {
    use candle_core::{Tensor, D};
    let device = model.device().clone();
    let b = batch.len();
    let mut cache = KvCache::new(model.num_layers());
    let prefix = Input::unpadded(&[batch[0].context[..shared].to_vec()], 0, &device)?;
    model.forward(&prefix, Some(&mut cache), adapters_on)?;
    cache.select_rows(&Tensor::from_vec(vec![0u32; b], b, &device)?)?;
    let own: Vec<&[u32]> = batch.iter().map(|e| &e.context[shared..]).collect();
    let own_rows = PaddedRows::right_after(&own, vec![vec![true; shared]; b]);
    let width = own_rows.width();
    // the state of each context's last token
    let last: Vec<u32> = own
        .iter()
        .enumerate()
        .map(|(r, own)| (r * width + own.len() - 1) as u32)
        .collect();
    let input = own_rows.input(&device)?;
    let hidden = model.forward(&input, Some(&mut cache), adapters_on)?;
    let d = hidden.dim(2)?;
    let states = hidden
        .reshape((b * width, d))?
        .index_select(&Tensor::new(last.as_slice(), &device)?, 0)?;
    let logits = model.head_logits(&states)?;
    let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
    Ok(batch
        .iter()
        .zip(logprobs)
        .map(|(e, row)| Scored {
            logprobs: e
                .continuations
                .iter()
                .map(|c| row[c[0] as usize] as f64)
                .collect(),
            prompt_tokens: e.context.len(),
        })
        .collect())
}
