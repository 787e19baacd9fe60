//! The HTTP routes: `answer` maps a method and path to its route, each route builds its reply
//! in OpenAI's shape (vLLM's for the LoRA routes), and the errors a request may get.

use std::io::Read;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Instant;

use rlvr::model::generate::{Completion, Finish, Sampling};
use rlvr::model::tokenizer::Tokenizer;
use rlvr::progress::Cancel;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tiny_http::{Header, Method, Response};

use crate::engine::{Job, Scoring};
use crate::logprobs::{self, Entry, TokenScore};
use crate::lora::{self, Adapter};
use crate::peer::Peer;
use crate::request::{self, BadRequest, GenerationRequest, Prompt};
use crate::stream::{start_stream, stream_events, Events};
use crate::{unix_time, Context, MAX_BODY};

/// An HTTP answer: status and JSON body.
pub(crate) type Answer = (u16, Value);

pub(crate) fn handle(mut request: tiny_http::Request, context: &Context, jobs: &Sender<Job>) {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let mut events = None;
    let answered = answer(&mut request, &method, &path, context, jobs, &mut events);
    if let (Ok(_), Some(events)) = (&answered, events) {
        let note = stream_events(request, events);
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("{method} {path} 200 {seconds:.2} s {note}");
        return;
    }
    let (status, body, note) = match answered {
        Ok((status, body)) => {
            let note = usage_note(&body);
            (status, body, note)
        }
        Err((status, body)) => {
            let note = body["error"]["message"].as_str().unwrap_or("").to_string();
            (status, body, note)
        }
    };
    eprintln!(
        "{method} {path} {status} {:.2} s {note}",
        started.elapsed().as_secs_f64()
    );
    // vLLM's LoRA routes answer a success in plain text
    let (kind, text) = match body {
        Value::String(text) => ("text/plain; charset=utf-8", text),
        body => ("application/json", body.to_string()),
    };
    let header = Header::from_bytes("Content-Type", kind).expect("a valid header");
    let response = Response::from_string(text)
        .with_status_code(status)
        .with_header(header);
    let _ = request.respond(response);
}

fn usage_note(body: &Value) -> String {
    match body.get("usage") {
        Some(u) => format!(
            "({} choices, {} prompt + {} completion tokens)",
            body["choices"].as_array().map_or(0, Vec::len),
            u["prompt_tokens"],
            u["completion_tokens"]
        ),
        None => String::new(),
    }
}

fn answer(
    request: &mut tiny_http::Request,
    method: &Method,
    path: &str,
    context: &Context,
    jobs: &Sender<Job>,
    events: &mut Option<Events>,
) -> Result<Answer, Answer> {
    if let Some(key) = &context.api_key {
        let given = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .map(|h| h.value.as_str());
        if !given.is_some_and(|given| key_matches(given, key)) {
            return Err(error(
                401,
                "authentication_error",
                None,
                "a valid `Authorization: Bearer` API key is required",
            ));
        }
    }
    let route = path.trim_end_matches('/');
    match (method, route) {
        (Method::Get, "/v1/models") => Ok((200, models(context))),
        (Method::Get, "/health" | "/v1/health") => Ok((200, json!({"status": "ok"}))),
        (Method::Post, "/v1/chat/completions" | "/v1/completions") => {
            let body = read_json(request)?;
            let chat = route == "/v1/chat/completions";
            let parsed = if chat {
                request::chat(&body)
            } else {
                request::completion(&body)
            };
            let parsed = parsed.map_err(|e| bad_request(&e))?;
            let adapter = requested_adapter(context, &body);
            let token_ids = body
                .get("return_tokens_as_token_ids")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let peer = Peer::of(request, context);
            if parsed.stream {
                *events = Some(start_stream(context, jobs, &parsed, chat, adapter, peer)?);
                return Ok((200, Value::Null));
            }
            complete(context, jobs, &parsed, chat, adapter, token_ids, peer)
        }
        (Method::Post, "/v1/load_lora_adapter" | "/v1/unload_lora_adapter") => {
            lora_route(request, route, context)
        }
        (
            _,
            "/v1/models"
            | "/health"
            | "/v1/health"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/load_lora_adapter"
            | "/v1/unload_lora_adapter",
        ) => Err(error(
            405,
            "invalid_request_error",
            None,
            &format!("{method} is not allowed on {route}"),
        )),
        _ => Err(error(
            404,
            "not_found_error",
            None,
            &format!(
                "no route {method} {path}; routes: GET /v1/models, POST /v1/chat/completions, \
                 POST /v1/completions, POST /v1/load_lora_adapter and POST \
                 /v1/unload_lora_adapter (with --enable-lora)"
            ),
        )),
    }
}

/// Whether an `Authorization` header value is `Bearer <key>`. The SHA-256 digests of both
/// are compared in constant time, so the time taken tells nothing about how much of a
/// guessed key was right (the digest hides the key's length too).
fn key_matches(given: &str, key: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(format!("Bearer {key}").as_bytes());
    given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

fn models(context: &Context) -> Value {
    let mut data = vec![json!({
        "id": context.name,
        "object": "model",
        "created": context.created,
        "owned_by": "rlvr",
    })];
    if let Some(adapters) = &context.adapters {
        data.extend(adapters.cards());
    }
    json!({"object": "list", "data": data})
}

/// The loaded adapter a completion request names as its `model`, when LoRA is on (any
/// other name runs the served model).
fn requested_adapter(context: &Context, body: &Value) -> Option<Arc<Adapter>> {
    let name = body.get("model").and_then(Value::as_str)?;
    context.adapters.as_ref()?.get(name)
}

/// `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`, as vLLM answers them.
fn lora_route(
    request: &mut tiny_http::Request,
    route: &str,
    context: &Context,
) -> Result<Answer, Answer> {
    let Some(adapters) = &context.adapters else {
        return Err(lora::disabled(route));
    };
    let body = read_json(request)?;
    let (status, body) = if route == "/v1/load_lora_adapter" {
        adapters.load(&body)
    } else {
        adapters.unload(&body)
    };
    if status == 200 {
        Ok((status, body))
    } else {
        Err((status, body))
    }
}

/// The request's body as JSON: at most [`MAX_BODY`] bytes, refused unread when its
/// `Content-Length` says more.
fn read_json(request: &mut tiny_http::Request) -> Result<Value, Answer> {
    let too_large = || {
        error(
            413,
            "invalid_request_error",
            None,
            &format!("the body is larger than {MAX_BODY} bytes"),
        )
    };
    if request.body_length().is_some_and(|n| n as u64 > MAX_BODY) {
        return Err(too_large());
    }
    let mut text = String::new();
    let read = request
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_string(&mut text);
    if let Err(e) = read {
        return Err(error(
            400,
            "invalid_request_error",
            None,
            &format!("cannot read the body: {e}"),
        ));
    }
    if text.len() as u64 > MAX_BODY {
        return Err(too_large());
    }
    serde_json::from_str(&text).map_err(|e| {
        error(
            400,
            "invalid_request_error",
            None,
            &format!("the body is not valid JSON: {e}"),
        )
    })
}

/// Tokenizes the prompts, queues their rows for the generation thread, waits, and builds
/// OpenAI's reply.
fn complete(
    context: &Context,
    jobs: &Sender<Job>,
    request: &GenerationRequest,
    chat: bool,
    adapter: Option<Arc<Adapter>>,
    token_ids: bool,
    mut peer: Peer,
) -> Result<Answer, Answer> {
    let (prompt_ids, rows) = request_rows(context, request)?;
    let tokenizer = &context.tokenizer;
    let (reply, results) = mpsc::channel();
    let server_error = |message: String| error(500, "server_error", None, &message);
    let stop = request.stop.clone();
    let scoring = request.logprobs.map(|top| Scoring {
        prompt: request.echo,
        top,
    });
    let model = adapter.as_ref().map_or(&context.name, |a| &a.name).clone();
    let cancel = Cancel::new();
    jobs.send(Job {
        rows,
        stop,
        scoring,
        adapter,
        reply,
        tokens: None,
        cancel: cancel.clone(),
    })
    .map_err(|_| server_error("the generation thread has stopped".into()))?;
    let results = loop {
        match results.recv_timeout(Peer::POLL) {
            Ok(results) => break results,
            Err(mpsc::RecvTimeoutError::Timeout) if peer.left() => {
                cancel.cancel();
                return Err(error(
                    499,
                    "client_closed_request",
                    None,
                    "the client closed the connection; its rows were stopped",
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(server_error("the generation thread has stopped".into()))
            }
        }
    }
    .map_err(|e| server_error(format!("generation failed: {e}")))?;
    let mut choices = Vec::with_capacity(results.len());
    let mut completion_tokens = 0;
    for (index, row) in results.iter().enumerate() {
        let decoding = |e: rlvr::model::ModelError| server_error(format!("decoding failed: {e}"));
        let (text, finish, tokens, shown) =
            finish_text(tokenizer, &row.completion, &request.stop).map_err(decoding)?;
        completion_tokens += tokens;
        if chat {
            let logprobs = match request.logprobs {
                Some(_) => json!({"content": chat_logprobs(tokenizer, shown, &text, &row.scores)
                    .map_err(decoding)?}),
                None => Value::Null,
            };
            choices.push(
                json!({"index": index, "message": {"role": "assistant", "content": text},
                   "finish_reason": finish, "logprobs": logprobs}),
            );
            continue;
        }
        let prompt = &prompt_ids[index / request.n];
        let logprobs = match request.logprobs {
            Some(_) if token_ids => {
                token_id_logprobs(prompt, &row.completion, &row.scores, request.echo)
            }
            Some(_) => choice_logprobs(tokenizer, prompt, shown, &text, &row.scores, request.echo)
                .map_err(decoding)?,
            None => Value::Null,
        };
        let text = if request.echo {
            let echoed = match &request.prompts[index / request.n] {
                Prompt::Text(prompt) => prompt.clone(),
                _ => tokenizer.decode(prompt).map_err(decoding)?,
            };
            echoed + text.as_str()
        } else {
            text
        };
        choices.push(
            json!({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}),
        );
    }
    let prompt_tokens: usize = prompt_ids.iter().map(Vec::len).sum();
    let (id_prefix, object) = if chat {
        ("chatcmpl", "chat.completion")
    } else {
        ("cmpl", "text_completion")
    };
    Ok((
        200,
        json!({
            "id": format!("{id_prefix}-{:016x}", rand::random::<u64>()),
            "object": object,
            "created": unix_time(),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }),
    ))
}

/// A row to generate: its prompt's tokens and its sampling.
type Scheduled = (Vec<u32>, Sampling);

/// The prompts' token ids and the rows (prompt × `n`, each with its sampling) of a
/// request, or the HTTP error that refuses it.
pub(crate) fn request_rows(
    context: &Context,
    request: &GenerationRequest,
) -> Result<(Vec<Vec<u32>>, Vec<Scheduled>), Answer> {
    let tokenizer = &context.tokenizer;
    let mut prompt_ids = Vec::with_capacity(request.prompts.len());
    for (i, prompt) in request.prompts.iter().enumerate() {
        let param = if request.prompts.len() > 1 {
            format!("prompt[{i}]")
        } else {
            "prompt".to_string()
        };
        let ids = match prompt {
            Prompt::Chat(messages) => {
                let field = |e: rlvr::model::ModelError| {
                    bad_request(&BadRequest::field("messages", e.to_string()))
                };
                let text = tokenizer.chat(messages, true).map_err(field)?;
                fits_unread(context, &text, "messages")?;
                tokenizer.encode(&text).map_err(field)?
            }
            Prompt::Text(text) => {
                fits_unread(context, text, &param)?;
                tokenizer
                    .encode(text)
                    .map_err(|e| bad_request(&BadRequest::field("prompt", e.to_string())))?
            }
            Prompt::Ids(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(bad_request(&BadRequest::field(&param, "has no tokens")));
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= context.vocab) {
            let message = format!(
                "token id {id} is outside the vocabulary of {}",
                context.vocab
            );
            return Err(bad_request(&BadRequest::field(&param, message)));
        }
        prompt_ids.push(ids);
    }
    let max_tokens = within_limit(context.max_tokens, request)?;
    let max_tokens = fit_context(context.context, &prompt_ids, max_tokens, request)?;
    let mut stop_ids = tokenizer.stop_ids();
    // A stop text that is one token of its own stops generation at once; others are found
    // in the decoded text.
    stop_ids.extend(request.stop.iter().filter_map(|s| {
        let id = tokenizer.token_id(s)?;
        (tokenizer.decode(&[id]).ok()? == *s).then_some(id)
    }));
    let seed = request.seed.unwrap_or_else(rand::random);
    let rows: Vec<(Vec<u32>, Sampling)> = prompt_ids
        .iter()
        .flat_map(|ids| {
            (0..request.n).map(|j| {
                let sampling = Sampling {
                    stop_strings: vec![],
                    include_stop: false,
                    max_tokens,
                    temperature: request.temperature,
                    top_k: request.top_k,
                    top_p: request.top_p,
                    min_p: request.min_p,
                    seed: seed.wrapping_add(j as u64),
                    stop_ids: stop_ids.clone(),
                };
                (ids.clone(), sampling)
            })
        })
        .collect();
    Ok((prompt_ids, rows))
}

/// Refuses (HTTP 400, `context_length_exceeded`) a prompt's `text` (named `param`) that
/// cannot fit in the context whatever its tokens: each token of the vocabulary stands for at
/// most [`Context::longest_token`] bytes, so a text of more than the context times that
/// many bytes has more tokens than the context holds. The check reads only the text's
/// length, so an oversized prompt costs no tokenizing. (The bound holds for tokenizers that
/// do not shorten the text before splitting it and have no unknown token standing for a
/// run of characters: byte-level BPE and SentencePiece BPE with byte fallback, as Gemma,
/// SmolLM2, Llama and Qwen use.)
fn fits_unread(context: &Context, text: &str, param: &str) -> Result<(), Answer> {
    let Some(tokens) = context.context else {
        return Ok(());
    };
    let limit = tokens.saturating_mul(context.longest_token.max(1));
    if text.len() <= limit {
        return Ok(());
    }
    Err(context_exceeded(
        param,
        &format!(
            "This model's maximum context length is {tokens} tokens; the prompt has {} bytes, \
             more than {tokens} tokens can hold (no token stands for more than {} bytes). \
             Shorten the prompt.",
            text.len(),
            context.longest_token
        ),
    ))
}

/// A 400 with OpenAI's `context_length_exceeded` code.
fn context_exceeded(param: &str, message: &str) -> Answer {
    let (status, mut body) = error(400, "invalid_request_error", Some(param), message);
    body["error"]["code"] = json!("context_length_exceeded");
    (status, body)
}

/// The request's `max_tokens` within the server's `--max-tokens` `limit`: an HTTP 400 past
/// it, and the default cut to it when the request names none.
fn within_limit(limit: Option<usize>, request: &GenerationRequest) -> Result<usize, Answer> {
    match limit {
        Some(limit) if request.max_tokens > limit && request.max_tokens_given => Err(error(
            400,
            "invalid_request_error",
            Some("max_tokens"),
            &format!(
                "max_tokens is {}, more than this server's limit of {limit} new tokens \
                 (--max-tokens)",
                request.max_tokens
            ),
        )),
        Some(limit) => Ok(request.max_tokens.min(limit)),
        None => Ok(request.max_tokens),
    }
}

/// The new tokens each sample may take: `max_tokens` (the request's, within the server's
/// limit) when the longest prompt and it fit the model's context (else an HTTP 400, as
/// OpenAI answers), or, when the request named none, the default cut to what the context
/// leaves.
fn fit_context(
    context: Option<usize>,
    prompt_ids: &[Vec<u32>],
    max_tokens: usize,
    request: &GenerationRequest,
) -> Result<usize, Answer> {
    let Some(context) = context else {
        return Ok(max_tokens);
    };
    let longest = prompt_ids.iter().map(Vec::len).max().unwrap_or(0);
    let left = context.saturating_sub(longest);
    let too_long = |message: String| context_exceeded("max_tokens", &message);
    if longest + usize::from(max_tokens > 0) > context {
        return Err(too_long(format!(
            "This model's maximum context length is {context} tokens; the prompt has {longest} \
             tokens and leaves no room for new ones. Shorten the prompt."
        )));
    }
    if !request.max_tokens_given {
        return Ok(max_tokens.min(left));
    }
    if longest + max_tokens > context {
        return Err(too_long(format!(
            "This model's maximum context length is {context} tokens. However, you requested \
             {} tokens ({longest} in the prompt, {} in the completion). Ask for at most {left} \
             new tokens (`max_tokens`) or shorten the prompt.",
            longest + max_tokens,
            max_tokens
        )));
    }
    Ok(max_tokens)
}

/// A completion's text, finish reason, token count and the tokens its text comes from:
/// the stop token left out of the text, the text cut before its first stop text
/// (generation ended at the token that completed it).
pub(crate) fn finish_text<'a>(
    tokenizer: &Tokenizer,
    completion: &'a Completion,
    stop: &[String],
) -> rlvr::model::Result<(String, &'static str, usize, &'a [u32])> {
    let tokens = completion.ids.len();
    let (shown, finish) = match completion.finish {
        Finish::Stop => (&completion.ids[..tokens - 1], "stop"),
        Finish::Length | Finish::Cancelled => (&completion.ids[..], "length"),
    };
    let text = tokenizer.decode(shown)?;
    Ok(
        match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            Some(cut) => (text[..cut].to_string(), "stop", tokens, shown),
            None => (text, finish, tokens, shown),
        },
    )
}

/// The `logprobs` of one `/v1/completions` choice: with `echo` the prompt's tokens (the
/// first without a score), then the tokens of the sample's text (those that start before a
/// stop text cut it). `scores` covers the prompt's tokens after the first when `echo`, then
/// the completion's.
fn choice_logprobs(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    shown: &[u32],
    text: &str,
    scores: &[TokenScore],
    echo: bool,
) -> rlvr::model::Result<Value> {
    let mut entries = Vec::new();
    if echo {
        for (i, (id, piece)) in prompt
            .iter()
            .zip(logprobs::pieces(tokenizer, prompt)?)
            .enumerate()
        {
            let score = i.checked_sub(1).map(|s| &scores[s]);
            entries.push(Entry {
                id: *id,
                piece,
                score,
            });
        }
    }
    let first = if echo { prompt.len() - 1 } else { 0 };
    let pieces = logprobs::pieces(tokenizer, shown)?;
    let cut = pieces.iter().map(String::len).sum::<usize>() > text.len();
    let mut start = 0;
    for (t, (id, piece)) in shown.iter().zip(pieces).enumerate() {
        if cut && start >= text.len() {
            break;
        }
        start += piece.len();
        entries.push(Entry {
            id: *id,
            piece,
            score: Some(&scores[first + t]),
        });
    }
    logprobs::legacy(tokenizer, &entries)
}

/// The `logprobs.content` of a chat choice: an entry per token of the sample's text (those
/// that start before a stop text cut it), scored by `scores`.
fn chat_logprobs(
    tokenizer: &Tokenizer,
    shown: &[u32],
    text: &str,
    scores: &[TokenScore],
) -> rlvr::model::Result<Vec<Value>> {
    let pieces = logprobs::pieces(tokenizer, shown)?;
    let cut = pieces.iter().map(String::len).sum::<usize>() > text.len();
    let mut entries = Vec::new();
    let mut start = 0;
    for (piece, score) in pieces.iter().zip(scores) {
        if cut && start >= text.len() {
            break;
        }
        start += piece.len();
        entries.push(logprobs::chat_entry(tokenizer, piece, score)?);
    }
    Ok(entries)
}

/// vLLM's `return_tokens_as_token_ids`: the `logprobs` of a `/v1/completions` choice with
/// each token written `token_id:<id>` (in `tokens` and as the keys of `top_logprobs`), and
/// every generated token listed, the stop token that ended the sample included, so that a
/// trainer gets exactly the tokens that were sampled. With `echo` the prompt's come first.
fn token_id_logprobs(
    prompt: &[u32],
    completion: &Completion,
    scores: &[TokenScore],
    echo: bool,
) -> Value {
    let mut listed: Vec<(u32, Option<&TokenScore>)> = Vec::new();
    if echo {
        listed.extend(
            prompt
                .iter()
                .enumerate()
                .map(|(i, &id)| (id, i.checked_sub(1).map(|s| &scores[s]))),
        );
    }
    let first = if echo { prompt.len() - 1 } else { 0 };
    listed.extend(
        completion
            .ids
            .iter()
            .enumerate()
            .map(|(t, &id)| (id, Some(&scores[first + t]))),
    );
    let name = |id: u32| format!("token_id:{id}");
    let mut tokens = Vec::with_capacity(listed.len());
    let mut values = Vec::with_capacity(listed.len());
    let mut top = Vec::with_capacity(listed.len());
    for (id, score) in listed {
        tokens.push(json!(name(id)));
        match score {
            None => {
                values.push(Value::Null);
                top.push(Value::Null);
            }
            Some(score) => {
                values.push(json!(score.logprob));
                let mut alternatives = serde_json::Map::new();
                for (alt, logprob) in score.top.iter().copied().chain([(id, score.logprob)]) {
                    alternatives.entry(name(alt)).or_insert(json!(logprob));
                }
                top.push(Value::Object(alternatives));
            }
        }
    }
    let offsets = vec![0; tokens.len()];
    json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets})
}

fn bad_request(e: &BadRequest) -> Answer {
    error(400, "invalid_request_error", e.param.as_deref(), &e.message)
}

/// OpenAI's error shape.
pub(crate) fn error(status: u16, kind: &str, param: Option<&str>, message: &str) -> Answer {
    (
        status,
        json!({"error": {"message": message, "type": kind, "param": param, "code": null}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_key_matches() {
        assert!(key_matches("Bearer sk-abc", "sk-abc"));
        for wrong in [
            "Bearer sk-abd",
            "Bearer sk-ab",
            "Bearer sk-abcd",
            "sk-abc",
            "",
            "bearer sk-abc",
        ] {
            assert!(!key_matches(wrong, "sk-abc"), "{wrong}");
        }
    }
}
