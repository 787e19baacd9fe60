//! An OpenAI-compatible server as an evaluation backend: [`Backend`] for [`Endpoint`], so
//! that `evaluate` runs the same presets, cache and Results on vLLM, SGLang or `rlvr serve`
//! as on the local model.
//!
//! - **generate**: a text prompt (the few-shot presets) goes to `/completions` as it is, a
//!   conversation (the `study` preset) to `/chat/completions`, where the server applies the
//!   model's chat template: the prompts the local backend tokenizes, with the same stop
//!   strings, token budget and temperature, prompt `i` of a batch seeded `seed + i`.
//! - **loglik**: lm-eval's `local-completions` scoring. lm-eval splits a request as its
//!   `_encode_pair` does (trailing spaces of the context move to the continuation; the
//!   context is tokenized alone, `context_enc`, and the continuation is what follows
//!   `len(context_enc)` tokens in the tokenization of the whole), sends context +
//!   continuation with `echo: true, logprobs: 1` and sums the echoed `token_logprobs` from
//!   `len(context_enc)` on. Here the server tokenizes: one request per question lists the
//!   context alone and the context followed by each option (`max_tokens: 0`); the context's
//!   token count comes from its own echo, and each option's log-probability is the sum over
//!   the whole's tokens from that count on. The split is lm-eval's (and the local backend's)
//!   with the server's tokenizer, and needs no tokenizer here. Like lm-eval, a token that
//!   straddles the boundary (the whole tokenized so that its first tokens are not the
//!   context's) is still split by the context's count; an option that adds no token is an
//!   error.

use std::sync::Arc;

use super::backend::{cut_at_stop, Backend, Choices, Completed, GenerateOptions, Scored};
use super::render::Prompt;
use super::EvalError;
use crate::endpoint::{
    ChatRequest, CompletionRequest, Endpoint, EndpointError, Fleet, FleetError, Reply,
    RequestParams,
};
use crate::progress::{Cancelled, Job, Silent};

impl Backend for Endpoint {
    fn model_name(&self) -> String {
        self.model().to_string()
    }

    fn adapter(&self) -> Option<String> {
        None
    }

    fn label(&self) -> String {
        self.model().to_string()
    }

    fn served(&self) -> bool {
        true
    }

    fn complete(
        &self,
        prompts: &[Prompt],
        options: &GenerateOptions,
        job: &Job,
    ) -> Result<Vec<Completed>, EvalError> {
        let params = |i: usize| RequestParams {
            max_tokens: options.max_tokens,
            temperature: options.temperature,
            top_p: 1.0,
            n: 1,
            seed: Some(options.seed.wrapping_add(i as u64)),
            stop: options.until.clone(),
        };
        let (mut texts, mut chats) = (vec![], vec![]);
        for (i, prompt) in prompts.iter().enumerate() {
            match prompt {
                Prompt::Text(text) => texts.push((
                    i,
                    CompletionRequest {
                        prompt: text.clone(),
                        params: params(i),
                    },
                )),
                Prompt::Chat(messages) => chats.push((
                    i,
                    ChatRequest {
                        messages: messages.clone(),
                        params: params(i),
                    },
                )),
            }
        }
        let quiet = quiet(job);
        let mut replies: Vec<Option<Result<Reply, EndpointError>>> =
            (0..prompts.len()).map(|_| None).collect();
        if !texts.is_empty() {
            let requests: Vec<CompletionRequest> = texts.iter().map(|(_, r)| r.clone()).collect();
            let results = self.complete(&requests, &quiet, &mut |_, _| {});
            for ((i, _), result) in texts.iter().zip(results) {
                replies[*i] = Some(result);
            }
        }
        if !chats.is_empty() {
            let requests: Vec<ChatRequest> = chats.iter().map(|(_, r)| r.clone()).collect();
            let results = self.chat(&requests, &quiet, &mut |_, _| {});
            for ((i, _), result) in chats.iter().zip(results) {
                replies[*i] = Some(result);
            }
        }
        let replies = first_failure(replies.into_iter().map(|r| r.expect("every prompt sent")))?;
        replies
            .into_iter()
            .map(|reply| {
                let mut text = reply.texts.into_iter().next().ok_or_else(|| {
                    EvalError::Model(format!("{}: a reply without text", self.base_url()))
                })?;
                cut_at_stop(&mut text, &options.until);
                Ok(Completed {
                    text,
                    prompt_tokens: reply.prompt_tokens,
                    tokens: reply.completion_tokens,
                })
            })
            .collect()
    }

    fn loglik(&self, requests: &[Choices], job: &Job) -> Result<Vec<Scored>, EvalError> {
        job.check()?;
        let prompts: Vec<Vec<String>> = requests
            .iter()
            .map(|r| {
                let trimmed = r.context.trim_end();
                let spaces = &r.context[trimmed.len()..];
                std::iter::once(trimmed.to_string())
                    .chain(
                        r.continuations
                            .iter()
                            .map(|c| format!("{trimmed}{spaces}{c}")),
                    )
                    .collect()
            })
            .collect();
        let results = self.score(&prompts, &quiet(job), &mut |_, _| {});
        let unsupported = results.iter().any(|r| {
            matches!(
                r,
                Err(EndpointError::Response { .. })
                    | Err(EndpointError::Http {
                        status: 400 | 404 | 405 | 422 | 501,
                        ..
                    })
            )
        });
        let scored = first_failure(results).map_err(|e| match e {
            EvalError::Model(message) if unsupported => EvalError::Model(format!(
                "{message}\nloglik scores the options through /completions with `echo: true, \
                 logprobs: 1, max_tokens: 0` (as lm-eval's local-completions does); vLLM, \
                 SGLang and `rlvr serve` answer it, llama.cpp's server does not. Evaluate \
                 with mode \"generate\" on a server without it."
            )),
            other => other,
        })?;
        requests
            .iter()
            .zip(scored)
            .map(|(request, echoed)| {
                let (context, wholes) = echoed.split_first().ok_or_else(|| {
                    EvalError::Model(format!("{}: no echo of the context", self.base_url()))
                })?;
                let n = context.tokens.len();
                let logprobs = request
                    .continuations
                    .iter()
                    .zip(wholes)
                    .map(|(continuation, whole)| {
                        let tail = whole.logprobs.get(n..).unwrap_or_default();
                        if tail.is_empty() {
                            return Err(EvalError::Model(format!(
                                "the continuation `{continuation}` adds no token to the context"
                            )));
                        }
                        tail.iter()
                            .map(|v| {
                                v.ok_or_else(|| {
                                    EvalError::Model(format!(
                                        "{}: a continuation token of `{continuation}` has no \
                                         log-probability",
                                        self.base_url()
                                    ))
                                })
                            })
                            .sum::<Result<f64, EvalError>>()
                    })
                    .collect::<Result<Vec<f64>, EvalError>>()?;
                Ok(Scored {
                    logprobs,
                    prompt_tokens: n,
                })
            })
            .collect()
    }
}

/// `job`'s cancellation without its progress: `evaluate` reports per batch, and the
/// endpoint's own report would restart its bar for every batch.
fn quiet(job: &Job) -> Job {
    Job {
        progress: Arc::new(Silent),
        cancel: job.cancel.clone(),
    }
}

/// Every result, or the first failure with how many failed (a cancellation as such).
fn first_failure<T>(
    results: impl IntoIterator<Item = Result<T, EndpointError>>,
) -> Result<Vec<T>, EvalError> {
    let results: Vec<Result<T, EndpointError>> = results.into_iter().collect();
    let total = results.len();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut out = Vec::with_capacity(total);
    for result in results {
        match result {
            Ok(value) => out.push(value),
            Err(EndpointError::Cancelled) => return Err(Cancelled.into()),
            Err(e) if total == 1 => return Err(EvalError::Model(e.to_string())),
            Err(e) => {
                return Err(EvalError::Model(format!(
                    "{failed} of {total} requests failed; the first: {e}"
                )))
            }
        }
    }
    Ok(out)
}

/// Servers of one model as one backend: each prompt of a batch (each question, for
/// loglik) goes to a server with a free slot as [`Endpoint`] would send it, prompt `i`
/// still seeded `seed + i`; a server that dies hands its prompts to the others. Results
/// and the cache are those of any one server of that model.
impl Backend for Fleet {
    fn model_name(&self) -> String {
        self.model().to_string()
    }

    fn adapter(&self) -> Option<String> {
        None
    }

    fn label(&self) -> String {
        self.model().to_string()
    }

    fn served(&self) -> bool {
        true
    }

    fn complete(
        &self,
        prompts: &[Prompt],
        options: &GenerateOptions,
        job: &Job,
    ) -> Result<Vec<Completed>, EvalError> {
        let work = |server: &Endpoint, i: usize| {
            let options = GenerateOptions {
                seed: options.seed.wrapping_add(i as u64),
                ..options.clone()
            };
            let mut one = Backend::complete(server, &prompts[i..=i], &options, job)?;
            Ok::<Completed, EvalError>(one.remove(0))
        };
        gather(self, prompts.len(), job, &work)
    }

    fn loglik(&self, requests: &[Choices], job: &Job) -> Result<Vec<Scored>, EvalError> {
        let work = |server: &Endpoint, i: usize| {
            let mut one = Backend::loglik(server, &requests[i..=i], job)?;
            Ok::<Scored, EvalError>(one.remove(0))
        };
        gather(self, requests.len(), job, &work)
    }
}

/// Every item's result from `fleet`, in order.
fn gather<T: Send>(
    fleet: &Fleet,
    n: usize,
    job: &Job,
    work: &(dyn Fn(&Endpoint, usize) -> Result<T, EvalError> + Sync),
) -> Result<Vec<T>, EvalError> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    fleet
        .spread(n, job, work, &mut |i, value| out[i] = Some(value))
        .map_err(|e| match e {
            FleetError::Item { error, .. } => error,
            FleetError::Cancelled => Cancelled.into(),
            down @ FleetError::Down { .. } => EvalError::Model(down.to_string()),
        })?;
    Ok(out
        .into_iter()
        .map(|v| v.expect("spread reports every item"))
        .collect())
}
