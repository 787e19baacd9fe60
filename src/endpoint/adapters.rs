//! A serving engine's runtime LoRA adapters from the client's side, as vLLM exposes them
//! (`POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`; `rlvr serve
//! --enable-lora` the same), and sampling by token ids with each generated token's id and
//! log-probability returned (vLLM's `return_tokens_as_token_ids`), which a trainer needs to
//! learn from completions another process sampled.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::{wire, Endpoint, EndpointError, Shared, Task};
use crate::progress::Job;

/// One prompt, as token ids, to sample once.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRequest {
    /// The prompt's token ids (sent as they are: no template, no BOS added).
    pub prompt: Vec<u32>,
    /// New tokens at most.
    pub max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus mass (1: off).
    pub top_p: f64,
    /// Keep the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f64,
    /// The sample's seed.
    pub seed: u64,
    /// Texts that end the sample.
    pub stop: Vec<String>,
}

/// A sampled completion by token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSample {
    /// Every generated token, the one that ended the sample included.
    pub ids: Vec<u32>,
    /// Each one's log-probability as the server computed it (vLLM and `rlvr serve`: under
    /// the model's own distribution).
    pub logprobs: Vec<f64>,
    /// `stop` or `length`.
    pub finish: String,
}

impl Endpoint {
    /// Loads the PEFT adapter folder `path` (as the server's machine sees it) into the
    /// server as `name` (`POST /load_lora_adapter` under the base URL, vLLM's route);
    /// `inplace` replaces an adapter of that name.
    pub fn load_lora_adapter(
        &self,
        name: &str,
        path: &Path,
        inplace: bool,
    ) -> Result<(), EndpointError> {
        let body = json!({"lora_name": name, "lora_path": path, "load_inplace": inplace});
        self.post_text("/load_lora_adapter", body)
    }

    /// Unloads the adapter `name` (`POST /unload_lora_adapter`).
    pub fn unload_lora_adapter(&self, name: &str) -> Result<(), EndpointError> {
        self.post_text("/unload_lora_adapter", json!({"lora_name": name}))
    }

    /// Samples each request once from `model` (the served model, or a loaded adapter's
    /// name) through `/completions`, `concurrency` at a time, returning each generated
    /// token's id and log-probability. A server that does not return token ids (it ignores
    /// `return_tokens_as_token_ids`) gives [`EndpointError::Response`] saying so.
    pub fn sample_tokens(
        &self,
        model: &str,
        requests: &[TokenRequest],
        job: &Job,
    ) -> Vec<Result<TokenSample, EndpointError>> {
        let inputs = requests
            .iter()
            .map(|r| (model.to_string(), r.clone()))
            .collect();
        self.run(inputs, job, &mut |_, _| {}, sample_tokens)
    }

    /// A POST whose success is a plain-text body (vLLM's LoRA routes), tried once.
    fn post_text(&self, route: &str, body: Value) -> Result<(), EndpointError> {
        let shared = self.shared.clone();
        let url = format!("{}{route}", shared.base);
        self.wait(async move {
            let mut request = shared
                .client
                .post(&url)
                .json(&body)
                .timeout(shared.options.timeout);
            if let Some(key) = &shared.api_key {
                request = request.bearer_auth(key);
            }
            let response = request
                .send()
                .await
                .map_err(|e| EndpointError::Connection {
                    url: url.clone(),
                    message: e.to_string(),
                    attempts: 1,
                })?;
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if status.is_success() {
                return Ok(());
            }
            Err(EndpointError::Http {
                url,
                status: status.as_u16(),
                message: wire::server_message(&text),
                attempts: 1,
            })
        })
    }
}

fn sample_tokens(
    shared: Arc<Shared>,
    (model, request): (String, TokenRequest),
) -> Task<TokenSample> {
    Box::pin(async move {
        let url = format!("{}/completions", shared.base);
        let mut body = json!({
            "model": model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "logprobs": 0,
            "return_tokens_as_token_ids": true,
        });
        if request.top_k > 0 {
            body["top_k"] = json!(request.top_k);
        }
        if request.min_p > 0.0 {
            body["min_p"] = json!(request.min_p);
        }
        if !request.stop.is_empty() {
            body["stop"] = json!(request.stop);
        }
        let reply = shared.send(&url, Some(&body)).await?;
        token_sample(&reply).map_err(|message| EndpointError::Response { url, message })
    })
}

/// The first choice of a `/completions` reply with token ids for tokens.
fn token_sample(reply: &Value) -> Result<TokenSample, String> {
    let choice = &reply["choices"][0];
    let logprobs = &choice["logprobs"];
    let tokens = logprobs["tokens"]
        .as_array()
        .ok_or("a reply without `logprobs.tokens`")?;
    let ids = tokens
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(|t| t.strip_prefix("token_id:"))
                .and_then(|id| id.parse().ok())
                .ok_or_else(|| {
                    format!(
                        "a token {t} that is not `token_id:<id>`: the server ignores \
                         `return_tokens_as_token_ids` (vLLM and `rlvr serve` honour it)"
                    )
                })
        })
        .collect::<Result<Vec<u32>, String>>()?;
    let values = logprobs["token_logprobs"]
        .as_array()
        .ok_or("a reply without `logprobs.token_logprobs`")?
        .iter()
        .map(|v| {
            v.as_f64()
                .ok_or("a generated token without a log-probability")
        })
        .collect::<Result<Vec<f64>, &str>>()?;
    if values.len() != ids.len() {
        return Err(format!(
            "{} tokens but {} log-probabilities",
            ids.len(),
            values.len()
        ));
    }
    Ok(TokenSample {
        ids,
        logprobs: values,
        finish: choice["finish_reason"].as_str().unwrap_or("").to_string(),
    })
}
