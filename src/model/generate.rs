//! Sampling: many prompts decoded in the continuous batch of [`super::batching`], each with
//! its own seeded sampler (temperature, top-k, top-p, min-p), stopping on its stop tokens,
//! its stop strings or its token budget.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::batching::{Ends, Scheduler};
use super::{Model, Result};

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

/// The most prompt tokens a prefill runs through the model in one step: one block of the
/// prefix cache, so that a prompt's chunks start at the same positions whether or not its
/// first blocks came from the cache, and every number equals the one computed without it.
pub const PREFILL_CHUNK: usize = super::prefix::BLOCK;

/// Turns token ids into text (the tokenizer's decoding), for stop strings.
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> Result<String>;

/// Generates a completion for every prompt through one [`Scheduler`]: `requests[i]`
/// samples `prompts[i]`, each completion the same as if it ran alone. Stop strings need
/// `decode`. `on_step(steps)` runs after every step of the batch (a decoding step, and a
/// chunk of each prompt being prefilled); returning false cancels the rest (finished
/// completions are kept, the others end as `Cancelled`).
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
        &mut |_, _, _| false,
    )
}

/// [`generate`], where `ends(i, ids, logits)` also runs after each new token of request `i`
/// (its tokens so far, and the row of logits it was sampled from) and returning true ends
/// that completion there, as [`Finish::Cancelled`]: how a server stops a row once its text
/// holds a stop string. The adapters are read as constants: no graph is recorded.
pub fn generate_until(
    model: &Model,
    prompts: &[Vec<u32>],
    requests: &[Sampling],
    adapters_on: bool,
    decode: Option<Decode>,
    on_step: &mut dyn FnMut(usize) -> bool,
    ends: Ends,
) -> Result<Vec<Completion>> {
    generate_in(
        &mut Scheduler::new(model, adapters_on, decode),
        prompts,
        requests,
        on_step,
        ends,
    )
}

/// [`generate_until`] on `scheduler` (idle), which then tells what its prefills took from
/// the prefix cache ([`Scheduler::prefill_counts`]).
pub fn generate_in(
    scheduler: &mut Scheduler,
    prompts: &[Vec<u32>],
    requests: &[Sampling],
    on_step: &mut dyn FnMut(usize) -> bool,
    ends: Ends,
) -> Result<Vec<Completion>> {
    assert_eq!(prompts.len(), requests.len(), "one request per prompt");
    super::linear::no_grad(|| {
        for (i, (prompt, request)) in prompts.iter().zip(requests).enumerate() {
            scheduler.submit(i, prompt.clone(), request.clone());
        }
        let mut done: Vec<Option<Completion>> = vec![None; prompts.len()];
        let mut steps = 0;
        while !scheduler.is_idle() {
            for (i, c) in scheduler.step(ends)? {
                done[i] = Some(c);
            }
            steps += 1;
            if !on_step(steps) {
                for (i, c) in scheduler.cancel_all() {
                    done[i] = Some(c);
                }
            }
        }
        Ok(done
            .into_iter()
            .map(|c| c.expect("every request finished"))
            .collect())
    })
}

/// Whether the text of `ids` contains one of `stops`, which it did not before the last
/// token. Only the tail that can hold a stop string ending in the last token is decoded:
/// every token adds at least one byte, so a stop string of `n` bytes spans at most `n`
/// tokens; a few more keep its first token clear of the tail's start (where decoders
/// strip a leading space or meet half a UTF-8 sequence).
pub(super) fn reaches_stop_string(ids: &[u32], stops: &[String], decode: Decode) -> Result<bool> {
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
pub(super) fn sample(logits: &[f32], request: &Sampling, rng: &mut ChaCha8Rng) -> (u32, f32) {
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

/// Samples from the tempered distribution truncated by top-k, top-p and min-p (untruncated,
/// by [`draw_untruncated`]): walks the tokens from the most likely down, subtracting their probabilities from a uniform draw.
/// Only as much of the vocabulary is sorted as the walk reaches (Gemma has 262,144 tokens;
/// a full sort per token and row cost more than the model's decoding step).
fn draw(logits: &[f32], request: &Sampling, rng: &mut ChaCha8Rng) -> usize {
    let t = request.temperature;
    if request.top_k == 0 && request.top_p >= 1.0 && request.min_p <= 0.0 {
        return draw_untruncated(logits, t as f32, rng);
    }
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

/// Samples from the whole tempered distribution, nothing truncated: the weights
/// `exp(l / t − max / t)` (the vector `exp`) walked in id order against a uniform draw of
/// their sum, whole runs of ids skipped by their sums. No order of the vocabulary is needed,
/// so nothing is sorted.
fn draw_untruncated(logits: &[f32], t: f32, rng: &mut ChaCha8Rng) -> usize {
    const RUN: usize = 1024;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut weights = logits.to_vec();
    super::exp::exp_in_place(&mut weights, 1.0 / t, max / t, 1.0);
    let sums: Vec<f64> = weights
        .chunks(RUN)
        .map(|run| run.iter().map(|&w| w as f64).sum())
        .collect();
    let mut u = rng.random::<f64>() * sums.iter().sum::<f64>();
    for (r, (run, sum)) in weights.chunks(RUN).zip(&sums).enumerate() {
        if u > *sum {
            u -= sum;
            continue;
        }
        for (i, &w) in run.iter().enumerate() {
            u -= w as f64;
            if u <= 0.0 && w > 0.0 {
                return r * RUN + i;
            }
        }
    }
    // rounding left a sliver of the draw: the last token with any weight
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
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
    use rand::SeedableRng;

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

    #[test]
    fn untruncated_sampling_reaches_tokens_in_every_run_of_the_vocabulary() {
        // two likely tokens in different runs of 1,024 ids, in a sea of unlikely ones
        let mut logits = vec![-40.0f32; 3000];
        logits[10] = 0.0;
        logits[2500] = 2f32.ln();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..6000 {
            *counts
                .entry(draw_untruncated(&logits, 1.0, &mut rng))
                .or_insert(0usize) += 1;
        }
        let share = counts.get(&2500).copied().unwrap_or(0) as f64 / 6000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.02, "{counts:?}");
        assert!(
            counts.keys().all(|&id| id == 10 || id == 2500),
            "{counts:?}"
        );
    }
}
