//! Where a GRPO step's completions come from: the policy itself, in process ([`Local`]), or
//! a serving engine holding adapters of the policy (`super::served::Served`, with the
//! `http` feature: vLLM, SGLang's vLLM-compatible routes, or `rlvr serve --enable-lora` in
//! another process). Training stays local either way; only sampling moves.
//!
//! The trainer drives a source in four calls: [`Rollouts::publish`] makes the policy as it
//! is after `version` steps available for sampling, [`Rollouts::submit`] asks for a step's
//! completions from a published version, [`Rollouts::take`] waits for them, and
//! [`Rollouts::retire`] says no submitted step needs a version any more. With
//! `max_staleness` s, step n (from 0) is sampled by version max(0, n − s) and submitted as
//! soon as that version exists, so a server samples the next s steps while this one trains.

use std::time::Instant;

use crate::model::generate::{generate, Completion, Sampling};
use crate::model::lm::LanguageModel;
use crate::progress::Job;

use super::GrpoError;

/// One step's completions and the seconds their sampling took.
#[derive(Debug, Clone)]
pub struct Sampled {
    /// One completion per submitted prompt, in order.
    pub completions: Vec<Completion>,
    /// Wall time of the sampling itself (not of waiting for it).
    pub seconds: f64,
}

/// A source of completions for a step.
pub trait Rollouts {
    /// Makes the policy as it is now, after `version` steps, available for sampling.
    fn publish(&mut self, policy: &LanguageModel, version: usize) -> Result<(), GrpoError>;

    /// Asks for step `step`'s completions (0-based), prompt `i` sampled with `requests[i]`
    /// (its seed, budget and stop tokens), from the published `version`.
    fn submit(
        &mut self,
        step: usize,
        version: usize,
        prompts: Vec<Vec<u32>>,
        requests: Vec<Sampling>,
    ) -> Result<(), GrpoError>;

    /// The completions of the submitted `step`, waiting for them; `None` when the job was
    /// cancelled. `policy` is the trainer's policy as it is now.
    fn take(
        &mut self,
        policy: &LanguageModel,
        step: usize,
        job: &Job,
    ) -> Result<Option<Sampled>, GrpoError>;

    /// No submitted step samples with `version` any more.
    fn retire(&mut self, _version: usize) -> Result<(), GrpoError> {
        Ok(())
    }

    /// Stops any sampling still running (the run ended, failed or was interrupted).
    fn stop(&mut self) {}

    /// Whether sampling happens away from the trainer (another engine, possibly behind
    /// the trainer by `max_staleness` steps). Its log-probs are then the model's
    /// distribution at temperature 1, as vLLM's default `raw_logprobs`, and go through the
    /// mismatch correction. Local sampling's are the trainer's own.
    fn sampled_elsewhere(&self) -> bool {
        false
    }
}

/// A step submitted to [`Local`], sampled when taken.
struct Pending {
    step: usize,
    prompts: Vec<Vec<u32>>,
    requests: Vec<Sampling>,
}

/// Sampling in process with the live adapters (one KV-cached batch), when the step is
/// taken: the policy sampling is always the one being trained (`max_staleness` 0).
#[derive(Default)]
pub struct Local {
    pending: Option<Pending>,
}

impl Rollouts for Local {
    fn publish(&mut self, _policy: &LanguageModel, _version: usize) -> Result<(), GrpoError> {
        Ok(())
    }

    fn submit(
        &mut self,
        step: usize,
        version: usize,
        prompts: Vec<Vec<u32>>,
        requests: Vec<Sampling>,
    ) -> Result<(), GrpoError> {
        if version != step {
            return Err(GrpoError::Setup(format!(
                "local rollouts sample with the live policy: step {} cannot be sampled by the \
                 policy of step {version}",
                step + 1
            )));
        }
        self.pending = Some(Pending {
            step,
            prompts,
            requests,
        });
        Ok(())
    }

    fn take(
        &mut self,
        policy: &LanguageModel,
        step: usize,
        job: &Job,
    ) -> Result<Option<Sampled>, GrpoError> {
        let Some(pending) = self.pending.take().filter(|p| p.step == step) else {
            return Err(GrpoError::Setup(format!(
                "step {} was taken before it was submitted",
                step + 1
            )));
        };
        let started = Instant::now();
        let mut cancelled = false;
        let decode = |ids: &[u32]| policy.tokenizer.decode(ids);
        let completions = generate(
            &policy.model,
            &pending.prompts,
            &pending.requests,
            true,
            Some(&decode),
            &mut |_| {
                cancelled = job.cancel.is_cancelled();
                !cancelled
            },
        )?;
        Ok((!cancelled).then(|| Sampled {
            completions,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    fn stop(&mut self) {
        self.pending = None;
    }
}
