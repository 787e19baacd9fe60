//! Batched sampling with a KV cache: many prompts (of any lengths, left-padded) decoded in
//! one batch, each with its own seeded sampler (temperature, top-k, top-p, min-p), stopping
//! on its stop tokens or its token budget. Finished rows leave the batch.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::logprob::logits_of;
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
        }
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was produced.
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

/// Generates a completion for every prompt in one batch. `requests[i]` samples
/// `prompts[i]`. `on_step(tokens_so_far)` runs after every decoding step; returning false
/// cancels the rest (finished completions are kept, the others end as `Cancelled`).
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    requests: &[Sampling],
    adapters_on: bool,
    on_step: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<Completion>> {
    generate_until(
        model,
        prompts,
        requests,
        adapters_on,
        &mut |_, _| false,
        on_step,
    )
}

/// [`generate`], where request `i` also ends (as [`Finish::Stop`]) as soon as
/// `stop(i, ids_so_far)` is true, e.g. when a stop string appears in its text.
pub fn generate_until(
    model: &Model,
    prompts: &[Vec<u32>],
    requests: &[Sampling],
    adapters_on: bool,
    stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    on_step: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<Completion>> {
    assert_eq!(prompts.len(), requests.len(), "one request per prompt");
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

    // Prefill: left-pad to the longest prompt; positions count real tokens only.
    let width = active.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
    let mut key_valid = Vec::with_capacity(active.len());
    let mut ids = Vec::with_capacity(active.len() * width);
    let mut positions = Vec::with_capacity(active.len() * width);
    let mut next_position = Vec::with_capacity(active.len());
    for &i in &active {
        let pad = width - prompts[i].len();
        key_valid.push((0..width).map(|s| s >= pad).collect::<Vec<bool>>());
        ids.extend(std::iter::repeat_n(0u32, pad).chain(prompts[i].iter().copied()));
        positions.extend((0..width).map(|s| s.saturating_sub(pad) as u32));
        next_position.push(prompts[i].len() as u32);
    }
    let b = active.len();
    let mut input = Input {
        ids: Tensor::from_vec(ids, (b, width), &device)?,
        positions: Tensor::from_vec(positions, (b, width), &device)?,
        key_valid,
    };
    let mut cache = KvCache::new(model.num_layers());
    let mut steps = 0;
    loop {
        let hidden = model.forward(&input, Some(&mut cache), adapters_on)?;
        let s = hidden.dim(1)?;
        let last = hidden.narrow(1, s - 1, 1)?.squeeze(1)?; // [b, d]
        let logits = logits_of(&last, model.lm_head(), model.logit_softcap())?;
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        steps += 1;
        let mut keep = Vec::with_capacity(active.len());
        let mut next_ids = Vec::with_capacity(active.len());
        for (j, row) in rows.iter().enumerate() {
            let i = active[j];
            let request = &requests[i];
            let (token, logprob) = sample(row, request, &mut rngs[i]);
            let c = &mut partial[i];
            c.ids.push(token);
            c.logprobs.push(logprob);
            let stopped = request.stop_ids.contains(&token) || stop(i, &c.ids);
            if stopped || c.ids.len() >= request.max_tokens {
                c.finish = if stopped {
                    Finish::Stop
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

/// Picks the next token from one row of logits and returns it with its log-probability
/// under the unmodified distribution.
fn sample(logits: &[f32], request: &Sampling, rng: &mut ChaCha8Rng) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
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

/// Samples from the tempered distribution truncated by top-k, top-p and min-p.
fn draw(logits: &[f32], request: &Sampling, rng: &mut ChaCha8Rng) -> usize {
    let t = request.temperature;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if request.top_k > 0 {
        order.truncate(request.top_k);
    }
    let top = logits[order[0]] as f64 / t;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (logits[i] as f64 / t - top).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if request.top_p < 1.0 {
        let mut cumulative = 0.0;
        for (n, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= request.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    if request.min_p > 0.0 {
        let floor = request.min_p * probs[0];
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    let kept: f64 = probs[..keep].iter().sum();
    let mut u = rng.random::<f64>() * kept;
    for (n, p) in probs[..keep].iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return order[n];
        }
    }
    order[keep - 1]
}
