//! Batched sampling with a KV cache: many prompts (of any lengths, left-padded) decoded in
//! one batch, each with its own seeded sampler (temperature, top-k, top-p, min-p), stopping
//! on its stop tokens, its stop strings or its token budget. Finished rows leave the batch.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{Input, KvCache, Model, Result};

/// How one request is sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// New tokens at most.
    pub max_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities sum to `top_p` (1: all).
    pub top_p: f64,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f64,
    /// Seed of this request's sampler: the same seed gives the same tokens.
    pub seed: u64,
    /// Tokens that end the completion (included in it).
    pub stop_ids: Vec<u32>,
    /// Texts that end the completion as soon as its decoded text contains one (the ids
    /// keep the token that completed it; [`crate::model::lm::LanguageModel::generate`]
    /// cuts the text before it).
    pub stop_strings: Vec<String>,
    /// Keep the stop string that ended the text in it (vLLM's
    /// `include_stop_str_in_output`): a completion stopped at `</answer>` keeps its tag.
    pub include_stop: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            stop_ids: vec![],
            stop_strings: vec![],
            include_stop: false,
        }
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was produced or a stop string reached.
    Stop,
    /// The token budget ran out.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The new token ids.
    pub ids: Vec<u32>,
    /// Each new token's log-probability under the model (temperature 1, no truncation).
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub finish: Finish,
}

/// The most prompt tokens a prefill runs through the model at once.
pub const PREFILL_CHUNK: usize = 512;

/// Turns token ids into text (the tokenizer's decoding), for stop strings.
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> Result<String>;

/// Generates a completion for every prompt in one batch. `requests[i]` samples
/// `prompts[i]`. Stop strings need `decode`. `on_step(tokens_so_far)` runs after every
/// decoding step (and with 0 after each chunk of a long prompt's prefill); returning false
/// cancels the rest (finished completions are kept, the others end as `Cancelled`).
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    requests: &[Sampling],
    adapters_on: bool,
    decode: Option<Decode>,
    on_step: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<Completion>> {
    generate_until(
        model,
        prompts,
        requests,
        adapters_on,
        decode,
        on_step,
        &mut |_, _| false,
    )
}

/// [`generate`], where `ends(i, ids)` also runs after each new token of request `i` (its
/// tokens so far) and returning true ends that completion there, as [`Finish::Cancelled`]:
/// how a server stops a row once its text holds a stop string. The adapters are read as
/// constants: no graph is recorded.
pub fn generate_until(
    model: &Model,
    prompts: &[Vec<u32>],
    requests: &[Sampling],
    adapters_on: bool,
    decode: Option<Decode>,
    on_step: &mut dyn FnMut(usize) -> bool,
    ends: &mut dyn FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Completion>> {
    super::linear::no_grad(|| {
        generate_batch(model, prompts, requests, adapters_on, decode, on_step, ends)
    })
}

fn generate_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    requests: &[Sampling],
    adapters_on: bool,
    decode: Option<Decode>,
    on_step: &mut dyn FnMut(usize) -> bool,
    ends: &mut dyn FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Completion>> {
    assert_eq!(prompts.len(), requests.len(), "one request per prompt");
    assert!(
        decode.is_some() || requests.iter().all(|r| r.stop_strings.is_empty()),
        "stop strings need a decoder"
    );
    let device = model.device().clone();
    let mut done: Vec<Option<Completion>> = vec![None; prompts.len()];
    let mut partial: Vec<Completion> = prompts
        .iter()
        .map(|_| Completion {
            ids: vec![],
            logprobs: vec![],
            finish: Finish::Length,
        })
        .collect();
    let mut rngs: Vec<ChaCha8Rng> = requests
        .iter()
        .map(|r| ChaCha8Rng::seed_from_u64(r.seed))
        .collect();
    // active[j] = the request in batch row j
    let mut active: Vec<usize> = (0..prompts.len())
        .filter(|&i| requests[i].max_tokens > 0 && !prompts[i].is_empty())
        .collect();
    for (i, slot) in done.iter_mut().enumerate() {
        if !active.contains(&i) {
            *slot = Some(partial[i].clone());
        }
    }
    if active.is_empty() {
        return Ok(done.into_iter().map(|c| c.expect("all done")).collect());
    }

    // Prefill each distinct prompt once (GRPO samples a group of completions per prompt),
    // left-padded to the longest; positions count real tokens only. After the first step
    // the keys, values and logits are copied out to every request's row.
    let mut distinct: Vec<&[u32]> = Vec::new();
    let source: Vec<u32> = active
        .iter()
        .map(|&i| {
            let prompt = prompts[i].as_slice();
            let at = distinct
                .iter()
                .position(|p| *p == prompt)
                .unwrap_or_else(|| {
                    distinct.push(prompt);
                    distinct.len() - 1
                });
            at as u32
        })
        .collect();
    let width = distinct.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut key_valid = Vec::with_capacity(distinct.len());
    let mut ids = Vec::with_capacity(distinct.len() * width);
    let mut positions = Vec::with_capacity(distinct.len() * width);
    for prompt in &distinct {
        let pad = width - prompt.len();
        key_valid.push((0..width).map(|s| s >= pad).collect::<Vec<bool>>());
        ids.extend(std::iter::repeat_n(0u32, pad).chain(prompt.iter().copied()));
        positions.extend((0..width).map(|s| s.saturating_sub(pad) as u32));
    }
    let mut next_position: Vec<u32> = active.iter().map(|&i| prompts[i].len() as u32).collect();
    let mut expand = (distinct.len() < active.len())
        .then(|| Tensor::from_vec(source.clone(), source.len(), &device))
        .transpose()?;
    let b = distinct.len();
    let mut input = Input {
        ids: Tensor::from_vec(ids, (b, width), &device)?,
        positions: Tensor::from_vec(positions, (b, width), &device)?,
        key_valid,
    };
    let mut cache = KvCache::new(model.num_layers());
    // A long prompt is prefilled in chunks: attention then holds the scores of one chunk
    // against the keys so far, never a whole prompt's against itself (an 8,000-token prompt
    // took 4.6 GB at once). Each chunk may cancel; the last one goes through the loop below.
    let mut start = 0;
    while width - start > PREFILL_CHUNK {
        let chunk = Input {
            ids: input.ids.narrow(1, start, PREFILL_CHUNK)?,
            positions: input.positions.narrow(1, start, PREFILL_CHUNK)?,
            key_valid: input
                .key_valid
                .iter()
                .map(|v| v[..start + PREFILL_CHUNK].to_vec())
                .collect(),
        };
        model.forward(&chunk, Some(&mut cache), adapters_on)?;
        start += PREFILL_CHUNK;
        if !on_step(0) {
            for &i in &active {
                partial[i].finish = Finish::Cancelled;
                done[i] = Some(partial[i].clone());
            }
            return Ok(done.into_iter().map(|c| c.expect("all done")).collect());
        }
    }
    if start > 0 {
        input.ids = input.ids.narrow(1, start, width - start)?;
        input.positions = input.positions.narrow(1, start, width - start)?;
    }
    let mut steps = 0;
    loop {
        let hidden = model.forward(&input, Some(&mut cache), adapters_on)?;
        let s = hidden.dim(1)?;
        let last = hidden.narrow(1, s - 1, 1)?.squeeze(1)?; // [b, d]
        let mut logits = model.head_logits(&last)?;
        if let Some(rows) = expand.take() {
            logits = logits.index_select(&rows, 0)?;
            cache.select_rows(&rows)?;
            input.key_valid = source
                .iter()
                .map(|&u| input.key_valid[u as usize].clone())
                .collect();
        }
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        steps += 1;
        // the rows are sampled in parallel (a row of Gemma's logits takes milliseconds),
        // each request from its own generator
        let picks: Vec<(u32, f32, ChaCha8Rng)> = rows
            .par_iter()
            .zip(active.par_iter())
            .map(|(row, &i)| {
                let mut rng = rngs[i].clone();
                let (token, logprob) = sample(row, &requests[i], &mut rng);
                (token, logprob, rng)
            })
            .collect();
        let mut keep = Vec::with_capacity(active.len());
        let mut next_ids = Vec::with_capacity(active.len());
        for (j, (token, logprob, rng)) in picks.into_iter().enumerate() {
            let i = active[j];
            let request = &requests[i];
            rngs[i] = rng;
            let c = &mut partial[i];
            c.ids.push(token);
            c.logprobs.push(logprob);
            let stopped = request.stop_ids.contains(&token)
                || match decode {
                    Some(decode) => reaches_stop_string(&c.ids, &request.stop_strings, decode)?,
                    None => false,
                };
            let ended = !stopped && ends(i, &c.ids);
            if stopped || ended || c.ids.len() >= request.max_tokens {
                c.finish = if stopped {
                    Finish::Stop
                } else if ended {
                    Finish::Cancelled
                } else {
                    Finish::Length
                };
                done[i] = Some(c.clone());
            } else {
                keep.push(j);
                next_ids.push(token);
            }
        }
        let go_on = on_step(steps);
        if keep.is_empty() || !go_on {
            for &j in &keep {
                let i = active[j];
                partial[i].finish = Finish::Cancelled;
                done[i] = Some(partial[i].clone());
            }
            break;
        }
        if keep.len() < active.len() {
            let rows = Tensor::from_vec(
                keep.iter().map(|&j| j as u32).collect::<Vec<u32>>(),
                keep.len(),
                &device,
            )?;
            cache.select_rows(&rows)?;
        }
        let key_valid: Vec<Vec<bool>> = keep
            .iter()
            .map(|&j| {
                let mut v = input.key_valid[j].clone();
                v.push(true);
                v
            })
            .collect();
        let positions: Vec<u32> = keep.iter().map(|&j| next_position[j]).collect();
        next_position = positions.iter().map(|p| p + 1).collect();
        active = keep.iter().map(|&j| active[j]).collect();
        let b = active.len();
        input = Input {
            ids: Tensor::from_vec(next_ids, (b, 1), &device)?,
            positions: Tensor::from_vec(positions, (b, 1), &device)?,
            key_valid,
        };
    }
    Ok(done
        .into_iter()
        .map(|c| c.expect("every request finished"))
        .collect())
}

/// Whether the text of `ids` contains one of `stops`, which it did not before the last
/// token. Only the tail that can hold a stop string ending in the last token is decoded:
/// every token adds at least one byte, so a stop string of `n` bytes spans at most `n`
/// tokens; a few more keep its first token clear of the tail's start (where decoders
/// strip a leading space or meet half a UTF-8 sequence).
fn reaches_stop_string(ids: &[u32], stops: &[String], decode: Decode) -> Result<bool> {
    let Some(longest) = stops.iter().map(String::len).max() else {
        return Ok(false);
    };
    let tail = decode(&ids[ids.len().saturating_sub(longest + 4)..])?;
    Ok(stops
        .iter()
        .any(|s| !s.is_empty() && tail.contains(s.as_str())))
}

/// Where the earliest of `stops` starts in `text`, if any occurs.
pub fn stop_string_cut(text: &str, stops: &[String]) -> Option<usize> {
    stop_string_at(text, stops).map(|(at, _)| at)
}

/// Where the text ends when the stop string is kept: just past the earliest stop string.
pub fn stop_string_end(text: &str, stops: &[String]) -> Option<usize> {
    stop_string_at(text, stops).map(|(at, len)| at + len)
}

/// The byte offset and length of the earliest stop string in `text`.
fn stop_string_at(text: &str, stops: &[String]) -> Option<(usize, usize)> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()).map(|at| (at, s.len())))
        .min()
}

/// Picks the next token from one row of logits and returns it with its log-probability
/// under the unmodified distribution.
fn sample(logits: &[f32], request: &Sampling, rng: &mut ChaCha8Rng) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + super::exp::exp_sum(logits, 1.0, max).ln() as f32;
    let token = if request.temperature <= 0.0 {
        argmax(logits)
    } else {
        draw(logits, request, rng)
    };
    (token as u32, logits[token] - log_z)
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Samples from the tempered distribution truncated by top-k, top-p and min-p: walks the
/// tokens from the most likely down, subtracting their probabilities from a uniform draw.
/// Only as much of the vocabulary is sorted as the walk reaches (Gemma has 262,144 tokens;
/// a full sort per token and row cost more than the model's decoding step).
fn draw(logits: &[f32], request: &Sampling, rng: &mut ChaCha8Rng) -> usize {
    let t = request.temperature;
    let mut order = TopOrder::new(logits);
    let candidates = match request.top_k {
        0 => logits.len(),
        k => k.min(logits.len()),
    };
    let top = logits[order.get(0)] as f64 / t;
    let weight = |i: usize| (logits[i] as f64 / t - top).exp();
    let total: f64 = if candidates == logits.len() {
        logits.iter().map(|&l| (l as f64 / t - top).exp()).sum()
    } else {
        (0..candidates).map(|n| weight(order.get(n))).sum()
    };
    let prob = |order: &mut TopOrder, n: usize| weight(order.get(n)) / total;
    let mut keep = candidates;
    if request.top_p < 1.0 {
        let mut cumulative = 0.0;
        for n in 0..candidates {
            cumulative += prob(&mut order, n);
            if cumulative >= request.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    if request.min_p > 0.0 {
        let floor = request.min_p * prob(&mut order, 0);
        let above = (0..keep)
            .take_while(|&n| prob(&mut order, n) >= floor)
            .count();
        keep = keep.min(above.max(1));
    }
    let kept: f64 = if keep == logits.len() {
        1.0
    } else {
        (0..keep).map(|n| prob(&mut order, n)).sum()
    };
    let mut u = rng.random::<f64>() * kept;
    for n in 0..keep {
        u -= prob(&mut order, n);
        if u <= 0.0 {
            return order.get(n);
        }
    }
    order.get(keep - 1)
}

/// The token ids by falling logit (ties by id), sorted lazily: the first `n` are put in
/// order only when rank `n - 1` is asked for, in growing blocks.
struct TopOrder<'a> {
    logits: &'a [f32],
    ids: Vec<usize>,
    sorted: usize,
}

impl<'a> TopOrder<'a> {
    fn new(logits: &'a [f32]) -> Self {
        TopOrder {
            logits,
            ids: (0..logits.len()).collect(),
            sorted: 0,
        }
    }

    /// The id at rank `n` (0 is the most likely).
    fn get(&mut self, n: usize) -> usize {
        if n >= self.sorted {
            let logits = self.logits;
            let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
            let want = (n + 1).max(2 * self.sorted).max(256).min(self.ids.len());
            let rest = &mut self.ids[self.sorted..];
            let k = want - self.sorted;
            if k < rest.len() {
                rest.select_nth_unstable_by(k - 1, by_logit);
            }
            rest[..k].sort_by(by_logit);
            self.sorted = want;
        }
        self.ids[n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_stop_string_is_cut_before_or_kept() {
        let stops = vec!["</answer>".to_string(), "\n\n".to_string(), String::new()];
        let text = "<think> x </think><answer> B </answer>><answer>\n\n";
        assert_eq!(stop_string_cut(text, &stops), Some(29));
        assert_eq!(
            &text[..stop_string_end(text, &stops).unwrap()],
            "<think> x </think><answer> B </answer>"
        );
        assert_eq!(stop_string_cut("no stop here", &stops), None);
        assert_eq!(stop_string_end("no stop here", &stops), None);
    }

    #[test]
    fn untruncated_sampling_follows_the_tempered_distribution() {
        // p ∝ exp(l / t): at t = 0.5 the logits 0, ln 3 / 2, -inf give 1/4, 3/4, 0
        let logits = [0.0, 3f32.ln() / 2.0, f32::NEG_INFINITY];
        let request = Sampling {
            temperature: 0.5,
            ..Sampling::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 3];
        for _ in 0..8000 {
            counts[draw(&logits, &request, &mut rng)] += 1;
        }
        assert_eq!(counts[2], 0);
        let share = counts[1] as f64 / 8000.0;
        assert!((share - 0.75).abs() < 0.02, "{counts:?}");
    }
}
