//! A client for OpenAI-compatible servers (vLLM, SGLang, llama.cpp, `rlvr serve`, OpenAI):
//! `/chat/completions`, `/completions` and `/models`, with bounded concurrency, per-request
//! timeouts, retries with backoff, and `n` samples per request whether or not the server
//! supports `n`; prompts scored token by token through `/completions` with `echo` and
//! `logprobs`.
//!
//! The API is blocking: [`Endpoint::chat`], [`Endpoint::complete`] and [`Endpoint::score`]
//! take a list of requests, run them on the endpoint's own async runtime, and report each result to the
//! caller's thread as it finishes, so a caller can persist results as they come and lose
//! nothing when the server dies halfway.

pub mod adapters;
mod error;
pub mod fleet;
mod retry;
mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::Semaphore;

pub use adapters::{TokenRequest, TokenSample};
pub use error::EndpointError;
pub use fleet::{Fleet, FleetError};
use wire::{Input, Route};

use crate::model::chat::Message;
use crate::progress::Job;

/// How an [`Endpoint`] talks to its server.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointOptions {
    /// The environment variable holding the API key, which must then be set. `None` reads
    /// `OPENAI_API_KEY` when it is set and sends no key otherwise (local servers need none).
    /// The key is sent as `Authorization: Bearer …` and never printed.
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How long one HTTP request may take, from connecting to the end of the reply.
    pub timeout: Duration,
    /// Retries after the first attempt, on 408, 429, 5xx, failed or dropped connections
    /// and timeouts.
    pub retries: usize,
    /// The wait before the first retry; it doubles with each retry (with jitter), unless the
    /// server sends `Retry-After`.
    pub backoff: Duration,
    /// The longest wait between two attempts of the backoff.
    pub backoff_max: Duration,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            api_key_env: None,
            concurrency: 8,
            timeout: Duration::from_secs(300),
            retries: 6,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// How one request is sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestParams {
    /// New tokens at most per sample.
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1: off).
    pub top_p: f64,
    /// Samples of this request.
    pub n: usize,
    /// Seed of the first sample; where the server takes no `n`, sample `j` is requested
    /// alone with seed `seed + j`.
    pub seed: Option<u64>,
    /// Texts that end a sample (not included in it).
    pub stop: Vec<String>,
}

impl Default for RequestParams {
    fn default() -> Self {
        RequestParams {
            max_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            n: 1,
            seed: None,
            stop: vec![],
        }
    }
}

/// A conversation to continue with the assistant's next turn.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The turns so far.
    pub messages: Vec<Message>,
    /// Sampling.
    pub params: RequestParams,
}

/// A prompt to continue as plain text (no chat template).
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The text to continue.
    pub prompt: String,
    /// Sampling.
    pub params: RequestParams,
}

/// A server's answer to one request: `n` samples and their token counts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    /// One text per sample, in order.
    pub texts: Vec<String>,
    /// Why each sample ended, as the server says (`stop`, `length`, or empty when it
    /// does not say).
    pub finish_reasons: Vec<String>,
    /// Tokens of the prompt, counted once (as the server reports them; 0 when it does not).
    pub prompt_tokens: usize,
    /// Tokens of all samples together.
    pub completion_tokens: usize,
}

/// An echoed prompt: its tokens as the server splits it, each with its log-probability after
/// the tokens before it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptLogprobs {
    /// Each token's text, as the server gives it.
    pub tokens: Vec<String>,
    /// Each token's log-probability; `None` where the server gives none (the first token,
    /// which has no context).
    pub logprobs: Vec<Option<f64>>,
}

/// The result of one scoring request: each of its prompts echoed with log-probabilities.
pub type Scored = Result<Vec<PromptLogprobs>, EndpointError>;

/// What an endpoint has sent and received since it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Of those, retries.
    pub retries: u64,
    /// Prompt tokens over every successful reply.
    pub prompt_tokens: u64,
    /// Completion tokens over every successful reply.
    pub completion_tokens: u64,
}

/// An OpenAI-compatible server and a model on it. Cheap to clone: clones share the
/// connection pool, the runtime and the usage counters.
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &self.shared.base)
            .field("model", &self.shared.model)
            .field("api_key", &self.shared.api_key.as_ref().map(|_| "(set)"))
            .field("options", &self.shared.options)
            .finish()
    }
}

/// Whether the server honours `n`, learnt from its first replies.
const N_UNKNOWN: u8 = 0;
const N_SUPPORTED: u8 = 1;
const N_UNSUPPORTED: u8 = 2;

/// What every request task needs.
struct Shared {
    client: reqwest::Client,
    base: String,
    model: String,
    api_key: Option<String>,
    options: EndpointOptions,
    n_support: AtomicU8,
    requests: AtomicU64,
    retries: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// The endpoint's async runtime, shut down without blocking when the last clone goes (so
/// an endpoint may be dropped anywhere, even inside another runtime).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Runtime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Endpoint {
    /// An endpoint for `model` on the server at `base_url`. The base URL is the one before
    /// `/chat/completions` (`http://127.0.0.1:8000/v1`); a bare host gets `/v1`, and a full
    /// route (`…/v1/chat/completions`, as lm-eval takes it) is cut back to its base. Nothing
    /// is sent until the first request.
    pub fn new(
        base_url: &str,
        model: &str,
        options: EndpointOptions,
    ) -> Result<Self, EndpointError> {
        let config = |message: String| EndpointError::Config {
            url: base_url.to_string(),
            message,
        };
        let base = normalize_base(base_url).map_err(config)?;
        if options.concurrency == 0 {
            return Err(config("concurrency must be at least 1".into()));
        }
        let api_key = match &options.api_key_env {
            Some(name) => Some(
                std::env::var(name)
                    .ok()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| config(format!("the API key variable `{name}` is not set")))?,
            ),
            None => std::env::var("OPENAI_API_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(options.timeout.min(Duration::from_secs(30)))
            .user_agent(concat!("rlvr-lab/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| config(format!("cannot build the HTTP client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rlvr-endpoint")
            .enable_all()
            .build()
            .map_err(|e| config(format!("cannot start the async runtime: {e}")))?;
        Ok(Endpoint {
            shared: Arc::new(Shared {
                client,
                base,
                model: model.to_string(),
                api_key,
                options,
                n_support: AtomicU8::new(N_UNKNOWN),
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                prompt_tokens: AtomicU64::new(0),
                completion_tokens: AtomicU64::new(0),
            }),
            runtime: Arc::new(Runtime(Some(runtime))),
        })
    }

    /// The base URL requests go to (`…/v1`).
    pub fn base_url(&self) -> &str {
        &self.shared.base
    }

    /// The model named in every request.
    pub fn model(&self) -> &str {
        &self.shared.model
    }

    /// The options it was made with.
    pub fn options(&self) -> &EndpointOptions {
        &self.shared.options
    }

    /// Requests and tokens so far, over every clone.
    pub fn usage(&self) -> Usage {
        let s = &self.shared;
        Usage {
            requests: s.requests.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: s.completion_tokens.load(Ordering::Relaxed),
        }
    }

    /// The ids of the models the server serves (`GET /models`), with retries.
    pub fn models(&self) -> Result<Vec<String>, EndpointError> {
        let url = format!("{}/models", self.shared.base);
        let (shared, target) = (self.shared.clone(), url.clone());
        let value = self.wait(async move { shared.send(&target, None).await })?;
        let unexpected = |message: &str| EndpointError::Response {
            url: url.clone(),
            message: message.to_string(),
        };
        let data = value
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| unexpected("no `data` array"))?;
        data.iter()
            .map(|m| {
                m.get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| unexpected("a model without an `id`"))
            })
            .collect()
    }

    /// Whether the server answers `GET /models` now: one try, within 10 s (less when the
    /// endpoint's `timeout` is shorter), without retries. A fleet asks after a failed
    /// request, to tell a server that died from a request that failed.
    pub fn alive(&self) -> bool {
        let shared = self.shared.clone();
        let url = format!("{}/models", shared.base);
        let timeout = shared.options.timeout.min(Duration::from_secs(10));
        self.wait(async move {
            let mut request = shared.client.get(&url).timeout(timeout);
            if let Some(key) = &shared.api_key {
                request = request.bearer_auth(key);
            }
            request.send().await.is_ok_and(|r| r.status().is_success())
        })
    }

    /// Sends every chat request, at most `concurrency` at a time, and returns their results
    /// in order. `on_done(i, &result)` runs on the caller's thread exactly once per request,
    /// as each finishes (failures and cancellations included), so the caller can persist
    /// results as they come. Once `job.cancel` is set no request starts, those in flight are
    /// abandoned, and their results are [`EndpointError::Cancelled`].
    pub fn chat(
        &self,
        requests: &[ChatRequest],
        job: &Job,
        on_done: &mut dyn FnMut(usize, &Result<Reply, EndpointError>),
    ) -> Vec<Result<Reply, EndpointError>> {
        let inputs = requests
            .iter()
            .map(|r| (Input::Messages(r.messages.clone()), r.params.clone()))
            .collect();
        self.run(inputs, job, on_done, sample)
    }

    /// Sends every completion request (plain text, no chat template), as [`Endpoint::chat`]
    /// does.
    pub fn complete(
        &self,
        requests: &[CompletionRequest],
        job: &Job,
        on_done: &mut dyn FnMut(usize, &Result<Reply, EndpointError>),
    ) -> Vec<Result<Reply, EndpointError>> {
        let inputs = requests
            .iter()
            .map(|r| (Input::Prompt(r.prompt.clone()), r.params.clone()))
            .collect();
        self.run(inputs, job, on_done, sample)
    }

    /// Scores prompts token by token: each request is a list of prompts sent together to
    /// `/completions` with `echo: true, logprobs: 1, max_tokens: 0` (as lm-eval's
    /// `local-completions` scores), and its result holds each prompt's tokens with their
    /// log-probabilities, in order. Requests run as [`Endpoint::chat`] runs them. A server
    /// that ignores `echo` or `logprobs`, or generates after the prompt, gives
    /// [`EndpointError::Response`] saying so.
    pub fn score(
        &self,
        requests: &[Vec<String>],
        job: &Job,
        on_done: &mut dyn FnMut(usize, &Scored),
    ) -> Vec<Scored> {
        self.run(requests.to_vec(), job, on_done, |shared, prompts| {
            Box::pin(async move { shared.score(&prompts).await })
        })
    }

    /// Runs `work` on every input, at most `concurrency` at a time, reporting each result
    /// to `on_done` on this thread as it finishes.
    fn run<Q: Send + 'static, R: Send + 'static>(
        &self,
        inputs: Vec<Q>,
        job: &Job,
        on_done: &mut dyn FnMut(usize, &Result<R, EndpointError>),
        work: fn(Arc<Shared>, Q) -> Task<R>,
    ) -> Vec<Result<R, EndpointError>> {
        let total = inputs.len();
        job.progress.start(
            &format!("{} at {}", self.shared.model, self.shared.base),
            total as u64,
        );
        let (sender, receiver) = std::sync::mpsc::channel();
        let shared = self.shared.clone();
        let cancel = job.cancel.clone();
        self.runtime.handle().spawn(async move {
            let slots = Arc::new(Semaphore::new(shared.options.concurrency));
            for (i, input) in inputs.into_iter().enumerate() {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                if cancel.is_cancelled() {
                    let _ = sender.send((i, Err(EndpointError::Cancelled)));
                    continue;
                }
                let (sender, shared, cancel) = (sender.clone(), shared.clone(), cancel.clone());
                tokio::spawn(async move {
                    let result = tokio::select! {
                        result = work(shared, input) => result,
                        () = cancel.cancelled() => Err(EndpointError::Cancelled),
                    };
                    drop(slot);
                    let _ = sender.send((i, result));
                });
            }
        });
        let mut results: Vec<Option<Result<R, EndpointError>>> = (0..total).map(|_| None).collect();
        let (mut finished, mut failed) = (0, 0);
        while finished < total {
            let Ok((i, result)) = receiver.recv() else {
                break; // a task panicked and took its sender with it
            };
            on_done(i, &result);
            failed += usize::from(result.is_err());
            results[i] = Some(result);
            finished += 1;
            let note = if failed > 0 {
                format!("{failed} failed")
            } else {
                String::new()
            };
            job.progress.update(finished as u64, &note);
        }
        job.progress
            .finish(&format!("{} replies, {failed} failed", finished - failed));
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(EndpointError::Response {
                        url: self.shared.base.clone(),
                        message: "the request's task ended without a result".into(),
                    })
                })
            })
            .collect()
    }

    /// Runs `future` on the endpoint's runtime and waits for it on this thread (which may
    /// itself belong to another runtime).
    fn wait<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> T {
        let (sender, receiver) = std::sync::mpsc::channel();
        self.runtime.handle().spawn(async move {
            let _ = sender.send(future.await);
        });
        receiver.recv().expect("the endpoint's task finished")
    }
}

/// One request's work on the endpoint's runtime.
type Task<R> = Pin<Box<dyn Future<Output = Result<R, EndpointError>> + Send>>;

/// The samples of one chat or completion request.
fn sample(shared: Arc<Shared>, (input, params): (Input, RequestParams)) -> Task<Reply> {
    Box::pin(async move { shared.sample(&input, &params).await })
}

/// The base URL without a trailing slash or route; `/v1` added to a bare host.
fn normalize_base(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(trimmed).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "expected an http:// or https:// URL, not {}://",
            parsed.scheme()
        ));
    }
    let mut base = trimmed.to_string();
    for route in ["/chat/completions", "/completions", "/models"] {
        if let Some(stripped) = base.strip_suffix(route) {
            base = stripped.to_string();
            break;
        }
    }
    if matches!(parsed.path(), "" | "/") {
        base.push_str("/v1");
    }
    Ok(base)
}

/// Why one attempt failed.
struct Failure {
    /// The status and the server's message, or no status when no reply came.
    status: Option<u16>,
    message: String,
    /// Whether another attempt may succeed.
    retryable: bool,
    /// What the server asked for in `Retry-After`.
    retry_after: Option<Duration>,
}

impl Failure {
    fn into_error(self, url: &str, attempts: usize) -> EndpointError {
        let url = url.to_string();
        match self.status {
            Some(200) => EndpointError::Response {
                url,
                message: self.message,
            },
            Some(status) => EndpointError::Http {
                url,
                status,
                message: self.message,
                attempts,
            },
            None => EndpointError::Connection {
                url,
                message: self.message,
                attempts,
            },
        }
    }
}

impl Shared {
    /// The `n` samples of one request: in one call where the server honours `n`, else one
    /// call per sample with seeds `seed, seed + 1, …`.
    async fn sample(&self, input: &Input, params: &RequestParams) -> Result<Reply, EndpointError> {
        let n = params.n.max(1);
        if n > 1 && self.n_support.load(Ordering::Relaxed) == N_UNSUPPORTED {
            return self.one_by_one(input, params, 0, n).await;
        }
        let body = wire::body(&self.model, input, params, n, params.seed);
        match self.generate(input.route(), &body).await {
            Ok(mut reply) if reply.texts.len() >= n => {
                if n > 1 {
                    self.n_support.store(N_SUPPORTED, Ordering::Relaxed);
                }
                reply.texts.truncate(n);
                reply.finish_reasons.truncate(n);
                Ok(reply)
            }
            Ok(reply) if reply.texts.is_empty() => Err(EndpointError::Response {
                url: format!("{}{}", self.base, input.route().path()),
                message: "a reply without choices".into(),
            }),
            Ok(first) => {
                // The server ignored `n`: keep its sample, ask for the rest one by one.
                self.n_support.store(N_UNSUPPORTED, Ordering::Relaxed);
                let rest = self.one_by_one(input, params, first.texts.len(), n).await?;
                Ok(merge(first, rest))
            }
            Err(EndpointError::Http {
                status: 400 | 422, ..
            }) if n > 1 && self.n_support.load(Ordering::Relaxed) != N_SUPPORTED => {
                // The server rejected `n`, or the request: asking without `n` tells which.
                let reply = self.one_by_one(input, params, 0, n).await?;
                self.n_support.store(N_UNSUPPORTED, Ordering::Relaxed);
                Ok(reply)
            }
            Err(e) => Err(e),
        }
    }

    /// Samples `from..n`, one request each, sample `j` with seed `seed + j`.
    async fn one_by_one(
        &self,
        input: &Input,
        params: &RequestParams,
        from: usize,
        n: usize,
    ) -> Result<Reply, EndpointError> {
        let mut all = Reply::default();
        for j in from..n {
            let seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let body = wire::body(&self.model, input, params, 1, seed);
            let mut reply = self.generate(input.route(), &body).await?;
            reply.texts.truncate(1);
            reply.finish_reasons.truncate(1);
            if reply.texts.is_empty() {
                return Err(EndpointError::Response {
                    url: format!("{}{}", self.base, input.route().path()),
                    message: "a reply without choices".into(),
                });
            }
            all = merge(all, reply);
        }
        Ok(all)
    }

    /// One scoring call (the prompts echoed with their log-probabilities), with retries.
    async fn score(&self, prompts: &[String]) -> Result<Vec<PromptLogprobs>, EndpointError> {
        let url = format!("{}{}", self.base, Route::Completion.path());
        let value = self
            .send(&url, Some(&wire::score_body(&self.model, prompts)))
            .await?;
        let scored = wire::parse_scores(&value, prompts)
            .map_err(|message| EndpointError::Response { url, message })?;
        let tokens: usize = scored.iter().map(|p| p.tokens.len()).sum();
        self.prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        Ok(scored)
    }

    /// One generation call, with retries, read as a [`Reply`].
    async fn generate(&self, route: Route, body: &Value) -> Result<Reply, EndpointError> {
        let url = format!("{}{}", self.base, route.path());
        let value = self.send(&url, Some(body)).await?;
        let reply = wire::parse_reply(route, &value)
            .map_err(|message| EndpointError::Response { url, message })?;
        self.prompt_tokens
            .fetch_add(reply.prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(reply.completion_tokens as u64, Ordering::Relaxed);
        Ok(reply)
    }

    /// A GET (no body) or POST of JSON, retried on failures worth retrying until the
    /// retries run out.
    async fn send(&self, url: &str, body: Option<&Value>) -> Result<Value, EndpointError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let failure = match self.send_once(url, body).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            if !failure.retryable || attempts > self.options.retries {
                return Err(failure.into_error(url, attempts));
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            let wait = failure.retry_after.unwrap_or_else(|| {
                retry::backoff(
                    self.options.backoff,
                    self.options.backoff_max,
                    attempts,
                    rand::random::<f64>(),
                )
            });
            tokio::time::sleep(wait).await;
        }
    }

    async fn send_once(&self, url: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let mut request = match body {
            Some(body) => self.client.post(url).json(body),
            None => self.client.get(url),
        };
        request = request.timeout(self.options.timeout);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(|e| self.transport(e))?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| Failure {
                status: Some(200),
                message: format!("not JSON ({e}): {}", wire::cut(&text, 200)),
                retryable: false,
                retry_after: None,
            });
        }
        let retryable =
            status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error();
        Err(Failure {
            status: Some(status.as_u16()),
            message: wire::server_message(&text),
            retryable,
            retry_after: retryable
                .then(|| retry::retry_after(&headers, SystemTime::now()))
                .flatten(),
        })
    }

    /// A request that got no reply: refused, dropped, timed out (all worth retrying), or
    /// one that could not be built (not).
    fn transport(&self, e: reqwest::Error) -> Failure {
        let message = if e.is_timeout() {
            format!(
                "no complete reply within {} s",
                self.options.timeout.as_secs_f64()
            )
        } else {
            error_chain(&e)
        };
        Failure {
            status: None,
            message,
            retryable: !e.is_builder() && !e.is_redirect(),
            retry_after: None,
        }
    }
}

/// `e` and its sources, outermost first, without repeats and without the URL (which the
/// error names anyway).
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = vec![];
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let top = e.to_string();
    parts.push(top.split(" for url (").next().unwrap_or(&top).to_string());
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Two partial replies of one request as one: samples appended, completion tokens added,
/// the prompt counted once.
fn merge(mut a: Reply, b: Reply) -> Reply {
    a.texts.extend(b.texts);
    a.finish_reasons.extend(b.finish_reasons);
    a.prompt_tokens = a.prompt_tokens.max(b.prompt_tokens);
    a.completion_tokens += b.completion_tokens;
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised() {
        for (given, expected) in [
            ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
            ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
            ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
            ("http://h:1/v1/chat/completions", "http://h:1/v1"),
            ("http://h:1/v1/completions", "http://h:1/v1"),
            (
                "https://api.example.org/openai/v1",
                "https://api.example.org/openai/v1",
            ),
        ] {
            assert_eq!(normalize_base(given).unwrap(), expected, "{given}");
        }
        assert!(normalize_base("127.0.0.1:8000").is_err());
        assert!(normalize_base("ftp://h/v1").unwrap_err().contains("http"));
    }

    #[test]
    fn a_named_key_variable_must_be_set_and_is_never_shown() {
        let options = EndpointOptions {
            api_key_env: Some("RLVR_TEST_UNSET_KEY_VARIABLE".into()),
            ..EndpointOptions::default()
        };
        let err = Endpoint::new("http://127.0.0.1:9/v1", "m", options).unwrap_err();
        assert!(
            err.to_string().contains("RLVR_TEST_UNSET_KEY_VARIABLE"),
            "{err}"
        );
        let ep = Endpoint::new("http://127.0.0.1:9", "m", EndpointOptions::default()).unwrap();
        let shown = format!("{ep:?}");
        assert!(
            shown.contains("http://127.0.0.1:9/v1") && !shown.contains("Bearer"),
            "{shown}"
        );
    }

    #[test]
    fn merged_replies_count_the_prompt_once() {
        let one = |t: &str| Reply {
            texts: vec![t.into()],
            finish_reasons: vec!["stop".into()],
            prompt_tokens: 5,
            completion_tokens: 3,
        };
        let m = merge(merge(Reply::default(), one("a")), one("b"));
        assert_eq!(m.texts, ["a", "b"]);
        assert_eq!((m.prompt_tokens, m.completion_tokens), (5, 6));
    }
}
