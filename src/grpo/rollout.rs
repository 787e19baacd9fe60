//! Where a GRPO step's completions come from: the policy itself, in process ([`Local`]), or
//! a serving engine holding the policy's current adapter ([`Served`]: vLLM, SGLang's
//! vLLM-compatible routes, or `rlvr serve --enable-lora` in another process). Training stays
//! local either way; only sampling moves.

use std::path::PathBuf;

use crate::endpoint::{Endpoint, EndpointError, TokenRequest};
use crate::model::generate::{generate, Completion, Finish, Sampling};
use crate::model::lm::LanguageModel;
use crate::progress::{Job, Silent};

use super::GrpoError;

/// A source of completions for a step.
pub trait Rollouts {
    /// One completion per prompt, prompt `i` sampled with `requests[i]` (its seed, budget
    /// and stop tokens), from the policy as it is at `step` (0-based); `None` when the job
    /// was cancelled.
    fn sample(
        &mut self,
        policy: &LanguageModel,
        prompts: &[Vec<u32>],
        requests: &[Sampling],
        step: usize,
        job: &Job,
    ) -> Result<Option<Vec<Completion>>, GrpoError>;

    /// Whether the completions' log-probs come from another engine (the model's
    /// distribution at temperature 1, as vLLM's default `raw_logprobs`): they then go
    /// through the mismatch correction. Local sampling's are the trainer's own.
    fn sampled_elsewhere(&self) -> bool {
        false
    }
}

/// Sampling in process with the live adapters (one KV-cached batch).
pub struct Local;

impl Rollouts for Local {
    fn sample(
        &mut self,
        policy: &LanguageModel,
        prompts: &[Vec<u32>],
        requests: &[Sampling],
        _step: usize,
        job: &Job,
    ) -> Result<Option<Vec<Completion>>, GrpoError> {
        let mut cancelled = false;
        let decode = |ids: &[u32]| policy.tokenizer.decode(ids);
        let completions = generate(
            &policy.model,
            prompts,
            requests,
            true,
            Some(&decode),
            &mut |_| {
                cancelled = job.cancel.is_cancelled();
                !cancelled
            },
        )?;
        Ok((!cancelled).then_some(completions))
    }
}

/// The log-probability mismatch of one step's served rollouts: the server's log-probability
/// of each sampled token against the trainer's own (both under the model's distribution,
/// temperature 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mismatch {
    /// 1-based step.
    pub step: usize,
    /// Mean of |server − trainer| over the sampled tokens.
    pub mean_abs: f64,
    /// The largest |server − trainer|.
    pub max_abs: f64,
    /// Tokens compared.
    pub tokens: usize,
}

/// Sampling on a server: before each step the policy's adapter is written in PEFT's format
/// under `dir`, loaded into the server as `<prefix>-step<n>` through vLLM's
/// `/v1/load_lora_adapter` (the previous step's unloaded), and every prompt is sampled
/// there by token ids with the adapter's name as the model, each generated token's id and
/// log-probability returned. The server must read `dir` (the same machine, or a shared
/// file system).
pub struct Served {
    endpoint: Endpoint,
    dir: PathBuf,
    prefix: String,
    loaded: Option<String>,
    /// Each step's measured mismatch, in order.
    pub mismatch: Vec<Mismatch>,
}

impl Served {
    /// Rollouts from `endpoint`'s server, adapters written under `dir` and named
    /// `<prefix>-step<n>`.
    pub fn new(endpoint: Endpoint, dir: PathBuf, prefix: &str) -> Self {
        Served {
            endpoint,
            dir,
            prefix: prefix.to_string(),
            loaded: None,
            mismatch: vec![],
        }
    }

    /// Unloads the last adapter from the server (called when training ends).
    pub fn finish(&mut self) -> Result<(), GrpoError> {
        if let Some(name) = self.loaded.take() {
            self.endpoint.unload_lora_adapter(&name).map_err(served)?;
        }
        Ok(())
    }
}

fn served(e: EndpointError) -> GrpoError {
    GrpoError::Setup(format!("rollout server: {e}"))
}

impl Rollouts for Served {
    fn sampled_elsewhere(&self) -> bool {
        true
    }

    fn sample(
        &mut self,
        policy: &LanguageModel,
        prompts: &[Vec<u32>],
        requests: &[Sampling],
        step: usize,
        job: &Job,
    ) -> Result<Option<Vec<Completion>>, GrpoError> {
        // 1. the adapter as it is now, on the server
        let name = format!("{}-step{step}", self.prefix);
        let dir = self.dir.join(&name);
        let mut copy = policy.clone();
        copy.save_adapter(&dir)?;
        let dir = dir.canonicalize().unwrap_or(dir);
        self.endpoint
            .load_lora_adapter(&name, &dir, true)
            .map_err(served)?;
        if let Some(previous) = self.loaded.replace(name.clone()) {
            if previous != name {
                self.endpoint
                    .unload_lora_adapter(&previous)
                    .map_err(served)?;
            }
        }

        // 2. every prompt sampled there by token ids
        let token_requests: Vec<TokenRequest> = prompts
            .iter()
            .zip(requests)
            .map(|(prompt, s)| TokenRequest {
                prompt: prompt.clone(),
                max_tokens: s.max_tokens,
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                min_p: s.min_p,
                seed: s.seed,
                stop: s.stop_strings.clone(),
            })
            .collect();
        let quiet = Job {
            progress: std::sync::Arc::new(Silent),
            cancel: job.cancel.clone(),
        };
        let mut samples = Vec::with_capacity(prompts.len());
        for result in self.endpoint.sample_tokens(&name, &token_requests, &quiet) {
            match result {
                Ok(sample) => samples.push(sample),
                Err(EndpointError::Cancelled) => return Ok(None),
                Err(e) => return Err(served(e)),
            }
        }

        // 3. the trainer's own log-probabilities of the same tokens, against the server's
        let pairs: Vec<(&[u32], &[u32])> = prompts
            .iter()
            .zip(&samples)
            .map(|(p, s)| (p.as_slice(), s.ids.as_slice()))
            .collect();
        let local: Vec<Vec<f32>> = crate::model::linear::no_grad(|| {
            let logprobs = policy.model.pair_logprobs(&pairs, true, 1.0)?;
            crate::model::Result::Ok(logprobs.to_vec2::<f32>()?)
        })?;
        let (mut sum, mut max, mut tokens) = (0.0, 0.0f64, 0);
        for (sample, row) in samples.iter().zip(&local) {
            for (served, trainer) in sample.logprobs.iter().zip(row) {
                let d = (served - *trainer as f64).abs();
                sum += d;
                max = max.max(d);
                tokens += 1;
            }
        }
        self.mismatch.push(Mismatch {
            step: step + 1,
            mean_abs: if tokens > 0 { sum / tokens as f64 } else { 0.0 },
            max_abs: max,
            tokens,
        });

        // the completions keep the sampler's log-probabilities, as local sampling does
        let completions = samples
            .into_iter()
            .map(|s| Completion {
                logprobs: s.logprobs.iter().map(|&v| v as f32).collect(),
                finish: if s.finish == "stop" {
                    Finish::Stop
                } else {
                    Finish::Length
                },
                ids: s.ids,
            })
            .collect();
        Ok(Some(completions))
    }
}
