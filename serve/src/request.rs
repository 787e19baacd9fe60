//! Reading the JSON body of `/v1/chat/completions` and `/v1/completions`, with an error
//! naming the field at fault for anything the server cannot honour.

use serde_json::{Map, Value};

use rlvr::model::chat::Message;

/// New tokens per sample when a request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// The most samples one request may ask for.
pub const MAX_N: usize = 128;

/// The most alternatives `logprobs` may ask for at each position (vLLM's default limit).
pub const MAX_LOGPROBS: usize = 20;

/// A request the server refuses (HTTP 400), naming the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    /// The field, as OpenAI's `param`.
    pub param: Option<String>,
    /// What is wrong with it.
    pub message: String,
}

impl BadRequest {
    /// A fault in field `param`.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        BadRequest {
            param: Some(param.to_string()),
            message: format!("`{param}`: {}", message.into()),
        }
    }
}

/// What to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Text, tokenized as the model's tokenizer does (BOS added).
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
}

/// A generation request: one or more prompts, each sampled `n` times.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// The prompts (one for chat; `/v1/completions` takes a list).
    pub prompts: Vec<Prompt>,
    /// New tokens at most per sample.
    pub max_tokens: usize,
    /// Whether the request named `max_tokens` (else it is [`DEFAULT_MAX_TOKENS`], cut to
    /// what the model's context leaves).
    pub max_tokens_given: bool,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus mass (1: off).
    pub top_p: f64,
    /// Keep the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: f64,
    /// Samples per prompt.
    pub n: usize,
    /// Seed of sample 0; sample `j` uses `seed + j`.
    pub seed: Option<u64>,
    /// Whether the reply comes as server-sent events, a chunk per new token (OpenAI's
    /// `stream`).
    pub stream: bool,
    /// With `stream`: a last chunk before `[DONE]` carries the request's `usage` (OpenAI's
    /// `stream_options: {"include_usage": true}`).
    pub include_usage: bool,
    /// Texts that end a sample.
    pub stop: Vec<String>,
    /// `/v1/completions`: the prompt is returned before each sample (and with `max_tokens:
    /// 0` alone, scored but not continued).
    pub echo: bool,
    /// Log-probabilities are returned, with this many most likely alternatives at each
    /// position (`None`: no log-probabilities): `/v1/completions`' `logprobs: k`, chat's
    /// `logprobs: true` with `top_logprobs: k`.
    pub logprobs: Option<usize>,
}

/// Reads a `/v1/chat/completions` body.
pub fn chat(body: &Value) -> Result<GenerationRequest, BadRequest> {
    let fields = object(body)?;
    let messages = match fields.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => return Err(BadRequest::field("messages", "is empty")),
        Some(_) => {
            return Err(BadRequest::field(
                "messages",
                "must be an array of messages",
            ))
        }
        None => return Err(BadRequest::field("messages", "is required")),
    };
    let logprobs = match fields.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(BadRequest::field(
                "logprobs",
                format!("{v} is not true or false"),
            ))
        }
    };
    let top = match fields.get("top_logprobs") {
        None | Some(Value::Null) => 0,
        Some(_) if !logprobs => {
            return Err(BadRequest::field("top_logprobs", "needs `logprobs: true`"))
        }
        Some(v) => count(v, "top_logprobs", 0, MAX_LOGPROBS)?,
    };
    let mut request = sampling(fields, vec![Prompt::Chat(messages)], 1)?;
    request.logprobs = logprobs.then_some(top);
    Ok(request)
}

/// Reads a `/v1/completions` body: `prompt` is text, a list of texts, token ids, or a list
/// of lists of token ids.
pub fn completion(body: &Value) -> Result<GenerationRequest, BadRequest> {
    let fields = object(body)?;
    let prompts = match fields.get("prompt") {
        Some(Value::String(text)) => vec![Prompt::Text(text.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(BadRequest::field("prompt", "is empty"))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .map(|t| Prompt::Text(t.as_str().unwrap_or_default().to_string()))
            .collect(),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![Prompt::Ids(token_ids(items, "prompt")?)]
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_array) => items
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let row = row.as_array().map(Vec::as_slice).unwrap_or_default();
                token_ids(row, &format!("prompt[{i}]")).map(Prompt::Ids)
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(BadRequest::field(
                "prompt",
                "must be text, a list of texts, token ids, or a list of lists of token ids",
            ))
        }
        None => return Err(BadRequest::field("prompt", "is required")),
    };
    let echo = match fields.get("echo") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(BadRequest::field(
                "echo",
                format!("{v} is not true or false"),
            ))
        }
    };
    let logprobs = match fields.get("logprobs") {
        None | Some(Value::Null) => None,
        Some(v) => Some(count(v, "logprobs", 0, MAX_LOGPROBS)?),
    };
    if fields.get("suffix").is_some_and(|v| !v.is_null()) {
        return Err(BadRequest::field("suffix", "is not supported"));
    }
    // OpenAI's legacy convention: `max_tokens: 0` with `echo` scores the prompt alone
    let mut request = sampling(fields, prompts, if echo { 0 } else { 1 })?;
    if request.stream && echo {
        return Err(BadRequest::field(
            "stream",
            "cannot be combined with `echo`",
        ));
    }
    request.echo = echo;
    request.logprobs = logprobs;
    Ok(request)
}

fn object(body: &Value) -> Result<&Map<String, Value>, BadRequest> {
    body.as_object().ok_or(BadRequest {
        param: None,
        message: "the request body must be a JSON object".into(),
    })
}

/// One message: `role` text, `content` text or a list of `{type: "text", text}` parts.
fn message(i: usize, value: &Value) -> Result<Message, BadRequest> {
    let param = format!("messages[{i}]");
    let fields = value
        .as_object()
        .ok_or_else(|| BadRequest::field(&param, "must be an object with `role` and `content`"))?;
    let role = fields
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest::field(&format!("{param}.role"), "must be text"))?;
    let content = match fields.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(
                |(j, part)| match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(text))) => Ok(text.as_str()),
                    _ => Err(BadRequest::field(
                        &format!("{param}.content[{j}]"),
                        "only text parts (`{\"type\": \"text\", \"text\": …}`) are supported",
                    )),
                },
            )
            .collect::<Result<String, _>>()?,
        _ => {
            return Err(BadRequest::field(
                &format!("{param}.content"),
                "must be text or a list of text parts",
            ))
        }
    };
    Ok(Message::new(role, &content))
}

fn token_ids(items: &[Value], param: &str) -> Result<Vec<u32>, BadRequest> {
    if items.is_empty() {
        return Err(BadRequest::field(param, "is empty"));
    }
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| BadRequest::field(param, format!("{v} is not a token id")))
        })
        .collect()
}

/// The sampling fields shared by both routes; `max_tokens` must be at least `min_tokens`.
fn sampling(
    fields: &Map<String, Value>,
    prompts: Vec<Prompt>,
    min_tokens: usize,
) -> Result<GenerationRequest, BadRequest> {
    let stream = match fields.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(BadRequest::field(
                "stream",
                format!("{v} is not true or false"),
            ))
        }
    };
    let present = |key: &str| fields.get(key).filter(|v| !v.is_null());
    let include_usage = include_usage(present("stream_options"), stream)?;
    let max_tokens = match (present("max_tokens"), present("max_completion_tokens")) {
        (Some(v), _) => count(v, "max_tokens", min_tokens, usize::MAX)?,
        (None, Some(v)) => count(v, "max_completion_tokens", min_tokens, usize::MAX)?,
        (None, None) => DEFAULT_MAX_TOKENS,
    };
    let temperature = number(
        present("temperature"),
        "temperature",
        1.0,
        |t| t >= 0.0,
        "must be 0 or more",
    )?;
    let top_p = number(
        present("top_p"),
        "top_p",
        1.0,
        |p| p > 0.0 && p <= 1.0,
        "must be in (0, 1]",
    )?;
    let min_p = number(
        present("min_p"),
        "min_p",
        0.0,
        |p| (0.0..=1.0).contains(&p),
        "must be in [0, 1]",
    )?;
    let top_k = match present("top_k") {
        // vLLM's convention: -1 (and 0) switch top-k off
        Some(v) if v.as_i64() == Some(-1) => 0,
        Some(v) => count(v, "top_k", 0, usize::MAX)?,
        None => 0,
    };
    let n = match present("n") {
        Some(v) => count(v, "n", 1, MAX_N)?,
        None => 1,
    };
    if let Some(v) =
        present("best_of").filter(|v| v.as_u64() != Some(1) && v.as_u64() != Some(n as u64))
    {
        return Err(BadRequest::field(
            "best_of",
            format!("{v} is not supported; leave it out"),
        ));
    }
    let seed = match present("seed") {
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| BadRequest::field("seed", format!("{v} is not an integer")))?,
        ),
        None => None,
    };
    let stop = stop_texts(present("stop"))?;
    Ok(GenerationRequest {
        prompts,
        max_tokens,
        max_tokens_given: present("max_tokens").is_some()
            || present("max_completion_tokens").is_some(),
        temperature,
        top_p,
        top_k,
        min_p,
        n,
        seed,
        stream,
        include_usage,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        echo: false,
        logprobs: None,
    })
}

/// `stream_options.include_usage` (false when absent); the options are allowed only when
/// streaming.
fn include_usage(options: Option<&Value>, stream: bool) -> Result<bool, BadRequest> {
    match options {
        None => Ok(false),
        Some(_) if !stream => Err(BadRequest::field(
            "stream_options",
            "is allowed only with `stream: true`",
        )),
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(BadRequest::field(
                "stream_options.include_usage",
                format!("{v} is not true or false"),
            )),
        },
        Some(v) => Err(BadRequest::field(
            "stream_options",
            format!("{v} is not an object"),
        )),
    }
}

/// `stop`: one text or a list of texts (none when absent).
fn stop_texts(stop: Option<&Value>) -> Result<Vec<String>, BadRequest> {
    match stop {
        None => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| BadRequest::field("stop", format!("{s} is not text")))
            })
            .collect(),
        Some(v) => Err(BadRequest::field(
            "stop",
            format!("{v} is neither text nor a list of texts"),
        )),
    }
}

fn count(value: &Value, param: &str, min: usize, max: usize) -> Result<usize, BadRequest> {
    value
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| {
            let range = if max == usize::MAX {
                format!("an integer ≥ {min}")
            } else {
                format!("an integer from {min} to {max}")
            };
            BadRequest::field(param, format!("{value} is not {range}"))
        })
}

fn number(
    value: Option<&Value>,
    param: &str,
    default: f64,
    valid: impl Fn(f64) -> bool,
    rule: &str,
) -> Result<f64, BadRequest> {
    let Some(value) = value else {
        return Ok(default);
    };
    let x = value
        .as_f64()
        .ok_or_else(|| BadRequest::field(param, format!("{value} is not a number")))?;
    if valid(x) {
        Ok(x)
    } else {
        Err(BadRequest::field(param, format!("{rule}, not {x}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn param_of(result: Result<GenerationRequest, BadRequest>) -> String {
        result.unwrap_err().param.unwrap_or_default()
    }

    #[test]
    fn lm_eval_chat_payloads_are_read() {
        // as lm-eval's local-chat-completions sends them
        let body = json!({"messages": [{"role": "user", "content": "Q: 2+2?\nA:"}],
                          "model": "m", "max_tokens": 256, "temperature": 0, "stop": ["Q:"],
                          "seed": 1234});
        let r = chat(&body).unwrap();
        assert_eq!(
            r.prompts,
            [Prompt::Chat(vec![Message::new("user", "Q: 2+2?\nA:")])]
        );
        assert_eq!(
            (r.max_tokens, r.temperature, r.n, r.seed),
            (256, 0.0, 1, Some(1234))
        );
        assert_eq!(r.stop, ["Q:"]);
    }

    #[test]
    fn completion_prompts_take_every_openai_form() {
        let r =
            completion(&json!({"prompt": ["a", "b"], "n": 2, "stop": "\n", "top_k": -1})).unwrap();
        assert_eq!(
            r.prompts,
            [Prompt::Text("a".into()), Prompt::Text("b".into())]
        );
        assert_eq!(
            (r.n, r.top_k, r.stop.clone()),
            (2, 0, vec!["\n".to_string()])
        );
        let r = completion(&json!({"prompt": [2, 17, 301]})).unwrap();
        assert_eq!(r.prompts, [Prompt::Ids(vec![2, 17, 301])]);
        let r = completion(&json!({"prompt": [[2, 5], [2]], "max_completion_tokens": 3})).unwrap();
        assert_eq!(r.prompts.len(), 2);
        assert_eq!(r.max_tokens, 3);
        let r = chat(
            &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
        );
        assert_eq!(
            r.unwrap().prompts,
            [Prompt::Chat(vec![Message::new("user", "Hi")])]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let m = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            param_of(chat(&json!({"messages": m, "temperature": -1}))),
            "temperature"
        );
        assert_eq!(param_of(chat(&json!({"messages": m, "top_p": 0}))), "top_p");
        assert_eq!(param_of(chat(&json!({"messages": m, "n": 0}))), "n");
        assert_eq!(param_of(chat(&json!({"messages": m, "n": 1000}))), "n");
        assert_eq!(
            param_of(chat(&json!({"messages": m, "max_tokens": "ten"}))),
            "max_tokens"
        );
        assert_eq!(param_of(chat(&json!({"messages": m, "seed": 1.5}))), "seed");
        assert_eq!(param_of(chat(&json!({"messages": m, "stop": [1]}))), "stop");
        assert_eq!(
            param_of(chat(&json!({"messages": m, "stream": "yes"}))),
            "stream"
        );
        assert_eq!(
            param_of(chat(&json!({"messages": m, "logprobs": 1}))),
            "logprobs"
        );
        assert_eq!(
            param_of(chat(&json!({"messages": m, "top_logprobs": 2}))),
            "top_logprobs"
        );
        assert_eq!(
            param_of(chat(
                &json!({"messages": m, "logprobs": true, "top_logprobs": 21})
            )),
            "top_logprobs"
        );
        assert_eq!(
            param_of(chat(
                &json!({"messages": m, "stream_options": {"include_usage": true}})
            )),
            "stream_options"
        );
        assert_eq!(
            param_of(completion(
                &json!({"prompt": "x", "stream": true, "echo": true})
            )),
            "stream"
        );
        let r = chat(
            &json!({"messages": m, "logprobs": true, "top_logprobs": 3, "stream": true,
                             "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert_eq!(
            (r.logprobs, r.stream, r.include_usage),
            (Some(3), true, true)
        );
        let r = completion(&json!({"prompt": "x", "stream": true, "logprobs": 2})).unwrap();
        assert_eq!((r.logprobs, r.include_usage), (Some(2), false));
        assert_eq!(param_of(chat(&json!({"messages": []}))), "messages");
        assert_eq!(param_of(chat(&json!({"prompt": "x"}))), "messages");
        assert_eq!(
            param_of(chat(&json!({"messages": [{"role": "user"}]}))),
            "messages[0].content"
        );
        assert_eq!(param_of(completion(&json!({"prompt": [2, -1]}))), "prompt");
        assert_eq!(
            param_of(completion(&json!({"prompt": "x", "echo": "yes"}))),
            "echo"
        );
        assert_eq!(
            param_of(completion(&json!({"prompt": "x", "logprobs": 21}))),
            "logprobs"
        );
        assert_eq!(
            param_of(completion(&json!({"prompt": "x", "logprobs": true}))),
            "logprobs"
        );
        assert_eq!(
            param_of(completion(&json!({"prompt": "x", "max_tokens": 0}))),
            "max_tokens"
        );
        let err = chat(&json!({"messages": m, "temperature": "hot"})).unwrap_err();
        assert_eq!(err.message, "`temperature`: \"hot\" is not a number");
        assert!(chat(&json!([1])).unwrap_err().param.is_none());
    }

    #[test]
    fn lm_eval_scoring_payloads_are_read() {
        // as lm-eval's local-completions sends a log-likelihood request
        let body = json!({"model": "m", "prompt": [[2, 17, 301]], "temperature": 0,
                          "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true});
        let r = completion(&body).unwrap();
        assert_eq!(r.prompts, [Prompt::Ids(vec![2, 17, 301])]);
        assert_eq!((r.echo, r.logprobs, r.max_tokens), (true, Some(1), 1));
        // OpenAI's score-only form: the prompt echoed, nothing generated
        let r = completion(&json!({"prompt": "x", "echo": true, "logprobs": 0, "max_tokens": 0}))
            .unwrap();
        assert_eq!((r.echo, r.logprobs, r.max_tokens), (true, Some(0), 0));
        let r = completion(&json!({"prompt": "x", "echo": false, "logprobs": null})).unwrap();
        assert_eq!((r.echo, r.logprobs), (false, None));
    }

    #[test]
    fn absent_and_null_fields_take_defaults() {
        let r = completion(&json!({"prompt": "x", "temperature": null, "stop": null, "n": null}))
            .unwrap();
        assert_eq!(
            (r.max_tokens, r.temperature, r.top_p, r.n, r.seed),
            (DEFAULT_MAX_TOKENS, 1.0, 1.0, 1, None)
        );
        assert!(r.stop.is_empty());
    }
}
