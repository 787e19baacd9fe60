//! Script bindings for OpenAI-compatible servers: `endpoint`, `generate`, `chat`, `models`,
//! `usage`. `generate` and `chat` follow the local model's conventions (text in, text out;
//! an array in, an array out; prompt `i` seeded with `seed + i`) and report progress through
//! the front end.

use std::sync::Arc;
use std::time::Duration;

use rhai::{Array, Dynamic, Engine, FuncRegistration, Map};

use super::convert::{check_keys, count, error, strings, text, text_list, RhaiResult};
use super::{Area, Output};
use crate::endpoint::{
    ChatRequest, CompletionRequest, Endpoint, EndpointError, EndpointOptions, Fleet, Reply,
    RequestParams,
};
use crate::model::chat::Message;
use crate::progress::Job;

/// The endpoint area of the reference.
pub const AREA: Area = Area {
    title: "Endpoints",
    intro: "A model on any OpenAI-compatible server (vLLM, SGLang, llama.cpp, `rlvr serve`). \
            Requests run `concurrency` at a time with timeouts and retries; `n` samples per \
            prompt are asked for in one request, or one request per sample (seeds `seed`, \
            `seed + 1`, …) where the server takes no `n`.",
    register,
};

const ENDPOINT_OPTIONS: [&str; 4] = ["api_key_env", "concurrency", "timeout_s", "retries"];
const REQUEST_OPTIONS: [&str; 6] = ["max_tokens", "temperature", "top_p", "seed", "stop", "n"];

fn endpoint_options(opts: &Map) -> RhaiResult<EndpointOptions> {
    check_keys(opts, &ENDPOINT_OPTIONS, "endpoint")?;
    let mut options = EndpointOptions {
        api_key_env: text(opts, "api_key_env")?,
        ..EndpointOptions::default()
    };
    if let Some(v) = opts.get("concurrency") {
        options.concurrency = int(v, "concurrency")?;
    }
    if let Some(v) = opts.get("retries") {
        options.retries = int(v, "retries")?;
    }
    if let Some(v) = opts.get("timeout_s") {
        let seconds = float(v, "timeout_s")?;
        if !(seconds > 0.0 && seconds.is_finite()) {
            return Err(error(format!(
                "timeout_s must be more than 0, not {seconds}"
            )));
        }
        options.timeout = Duration::from_secs_f64(seconds);
    }
    Ok(options)
}

fn int(v: &Dynamic, key: &str) -> RhaiResult<usize> {
    count(
        v.as_int()
            .map_err(|t| error(format!("{key}: expected an integer, not {t}")))?,
        key,
    )
}

fn float(v: &Dynamic, key: &str) -> RhaiResult<f64> {
    v.as_float()
        .or_else(|_| v.as_int().map(|i| i as f64))
        .map_err(|t| error(format!("{key}: expected a number, not {t}")))
}

/// The request options, with the local model's defaults: 64 new tokens, temperature 1.0,
/// seed 0.
fn request_params(opts: &Map) -> RhaiResult<RequestParams> {
    check_keys(opts, &REQUEST_OPTIONS, "generate")?;
    let mut p = RequestParams {
        max_tokens: 64,
        seed: Some(0),
        ..RequestParams::default()
    };
    if let Some(v) = opts.get("max_tokens") {
        p.max_tokens = int(v, "max_tokens")?;
    }
    if let Some(v) = opts.get("n") {
        p.n = int(v, "n")?.max(1);
    }
    if let Some(v) = opts.get("temperature") {
        p.temperature = float(v, "temperature")?;
    }
    if let Some(v) = opts.get("top_p") {
        p.top_p = float(v, "top_p")?;
    }
    if let Some(v) = opts.get("seed") {
        p.seed = Some(v.as_int().map_err(|t| error(format!("seed: not {t}")))? as u64);
    }
    p.stop = text_list(opts, "stop")?.unwrap_or_default();
    Ok(p)
}

/// Prompt `i` is seeded with `seed + i`, as the local model's batches are.
fn seeded(params: &RequestParams, i: usize) -> RequestParams {
    RequestParams {
        seed: params.seed.map(|s| s.wrapping_add(i as u64)),
        ..params.clone()
    }
}

/// The samples of every reply (one string when `n` is 1, else an array), or the first
/// failure with how many failed.
fn texts(results: Vec<Result<Reply, EndpointError>>, n: usize) -> RhaiResult<Vec<Dynamic>> {
    let total = results.len();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut out = Vec::with_capacity(total);
    for result in results {
        match result {
            Ok(mut reply) if n == 1 => out.push(Dynamic::from(reply.texts.swap_remove(0))),
            Ok(reply) => out.push(Dynamic::from_array(
                reply.texts.into_iter().map(Dynamic::from).collect(),
            )),
            Err(EndpointError::Cancelled) => return Err(error("interrupted")),
            Err(e) if total == 1 => return Err(error(e)),
            Err(e) => {
                return Err(error(format!(
                    "{failed} of {total} requests failed; the first: {e}"
                )))
            }
        }
    }
    Ok(out)
}

fn job(output: &Arc<dyn Output>) -> Job {
    Job {
        progress: output.progress(),
        cancel: output.cancel(),
    }
}

fn complete(
    ep: &Endpoint,
    output: &Arc<dyn Output>,
    prompts: Vec<String>,
    opts: &Map,
) -> RhaiResult<Vec<Dynamic>> {
    let params = request_params(opts)?;
    let requests: Vec<CompletionRequest> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| CompletionRequest {
            prompt,
            params: seeded(&params, i),
        })
        .collect();
    texts(
        ep.complete(&requests, &job(output), &mut |_, _| {}),
        params.n,
    )
}

fn converse(
    ep: &Endpoint,
    output: &Arc<dyn Output>,
    conversations: Vec<Vec<Message>>,
    opts: &Map,
) -> RhaiResult<Vec<Dynamic>> {
    let params = request_params(opts)?;
    let requests: Vec<ChatRequest> = conversations
        .into_iter()
        .enumerate()
        .map(|(i, messages)| ChatRequest {
            messages,
            params: seeded(&params, i),
        })
        .collect();
    texts(ep.chat(&requests, &job(output), &mut |_, _| {}), params.n)
}

fn message(item: Dynamic) -> RhaiResult<Message> {
    let map = item
        .try_cast::<Map>()
        .ok_or_else(|| error("chat: each message is a map #{ role: …, content: … }"))?;
    let role = text(&map, "role")?.ok_or_else(|| error("chat: a message has no `role`"))?;
    let content =
        text(&map, "content")?.ok_or_else(|| error("chat: a message has no `content`"))?;
    Ok(Message::new(&role, &content))
}

/// An array given to `chat`: one conversation (maps), many user messages (strings), or many
/// conversations (arrays of maps). The flag says whether it was one conversation.
fn conversations(items: Array) -> RhaiResult<(Vec<Vec<Message>>, bool)> {
    let Some(first) = items.first() else {
        return Ok((vec![], false));
    };
    if first.is_map() {
        let one = items
            .into_iter()
            .map(message)
            .collect::<RhaiResult<Vec<_>>>()?;
        return Ok((vec![one], true));
    }
    let many = items
        .into_iter()
        .map(|item| {
            if item.is_string() {
                Ok(vec![Message::new(
                    "user",
                    &item.into_string().map_err(error)?,
                )])
            } else if let Some(turns) = item.clone().try_cast::<Array>() {
                turns.into_iter().map(message).collect()
            } else {
                Err(error(format!(
                    "chat: an array of messages (maps), of user messages (strings) or of \
                     conversations (arrays), not of {}",
                    item.type_name()
                )))
            }
        })
        .collect::<RhaiResult<Vec<_>>>()?;
    Ok((many, false))
}

/// The fleet of an array of endpoints (`judge` and `evaluate` take one): every element an
/// `endpoint(…)` of one model.
pub(crate) fn fleet_of(servers: Array, function: &str) -> RhaiResult<Fleet> {
    let endpoints = servers
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let kind = v.type_name().to_string();
            v.try_cast::<Endpoint>().ok_or_else(|| {
                error(format!(
                    "{function}: element {i} of the servers is a {kind}, not an endpoint(…)"
                ))
            })
        })
        .collect::<RhaiResult<Vec<Endpoint>>>()?;
    Fleet::new(endpoints).map_err(|e| error(format!("{function}: {e}")))
}

fn register(engine: &mut Engine, output: &Arc<dyn Output>) {
    engine.register_type_with_name::<Endpoint>("Endpoint");
    register_endpoint(engine);
    register_generate(engine, output);
    register_chat(engine, output);
    register_server_info(engine);
}

/// `endpoint`: a model on an OpenAI-compatible server, with or without options.
fn register_endpoint(engine: &mut Engine) {
    FuncRegistration::new("endpoint")
        .with_params_info(["url: String", "model: String", "Endpoint"])
        .with_comments([
            "/// A model on an OpenAI-compatible server: `url` is the base before \
             `/chat/completions` (`http://127.0.0.1:8000/v1`; a bare host gets `/v1`). The \
             API key is read from `OPENAI_API_KEY` when set. Nothing is sent yet.",
        ])
        .register_into_engine(engine, |url: &str, model: &str| -> RhaiResult<Endpoint> {
            Endpoint::new(url, model, EndpointOptions::default()).map_err(error)
        });

    FuncRegistration::new("endpoint")
        .with_params_info(["url: String", "model: String", "options: Map", "Endpoint"])
        .with_comments([
            "/// An endpoint with options: `api_key_env` (the variable holding the API key, \
             which must then be set; the key is never shown), `concurrency` (8 requests in \
             flight), `timeout_s` (300 per request), `retries` (6, with exponential backoff, \
             honouring `Retry-After`, on 429, 5xx, dropped connections and timeouts).",
        ])
        .register_into_engine(
            engine,
            |url: &str, model: &str, options: Map| -> RhaiResult<Endpoint> {
                Endpoint::new(url, model, endpoint_options(&options)?).map_err(error)
            },
        );
}

/// `generate` by an endpoint: one prompt (with or without options), or an array of them.
fn register_generate(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("generate")
        .with_params_info([
            "endpoint: Endpoint",
            "prompt: String",
            "options: Map",
            "Dynamic",
        ])
        .with_comments([
            "/// Completes `prompt` as plain text (`/completions`, no chat template); options \
             `max_tokens` (64), `temperature` (1.0; 0.0 is greedy), `top_p`, `seed` (0), \
             `stop` (a string or an array), `n` (1). A string, or an array of `n` strings.",
        ])
        .register_into_engine(
            engine,
            move |ep: &mut Endpoint, prompt: &str, options: Map| -> RhaiResult<Dynamic> {
                Ok(complete(ep, &out, vec![prompt.to_string()], &options)?.remove(0))
            },
        );

    let out = output.clone();
    FuncRegistration::new("generate")
        .with_params_info(["endpoint: Endpoint", "prompt: String", "String"])
        .with_comments(["/// Completes `prompt` with the default options."])
        .register_into_engine(
            engine,
            move |ep: &mut Endpoint, prompt: &str| -> RhaiResult<Dynamic> {
                Ok(complete(ep, &out, vec![prompt.to_string()], &Map::new())?.remove(0))
            },
        );

    let out = output.clone();
    FuncRegistration::new("generate")
        .with_params_info([
            "endpoint: Endpoint",
            "prompts: Array",
            "options: Map",
            "Array",
        ])
        .with_comments([
            "/// Completes every prompt of an array, `concurrency` requests at a time (prompt \
             `i` seeded with `seed + i`); an array of results in order.",
        ])
        .register_into_engine(
            engine,
            move |ep: &mut Endpoint, prompts: Array, options: Map| -> RhaiResult<Array> {
                complete(ep, &out, strings(prompts, "prompts")?, &options)
            },
        );
}

/// `chat` with an endpoint: one message (with or without options), or a conversation's
/// messages.
fn register_chat(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("chat")
        .with_params_info([
            "endpoint: Endpoint",
            "message: String",
            "options: Map",
            "Dynamic",
        ])
        .with_comments([
            "/// Sends one user message to `/chat/completions` (the server applies the chat \
             template) and returns the assistant's reply; options as `generate`.",
        ])
        .register_into_engine(
            engine,
            move |ep: &mut Endpoint, message: &str, options: Map| -> RhaiResult<Dynamic> {
                let conversation = vec![Message::new("user", message)];
                Ok(converse(ep, &out, vec![conversation], &options)?.remove(0))
            },
        );

    let out = output.clone();
    FuncRegistration::new("chat")
        .with_params_info(["endpoint: Endpoint", "message: String", "String"])
        .with_comments(["/// Sends one user message with the default options."])
        .register_into_engine(
            engine,
            move |ep: &mut Endpoint, message: &str| -> RhaiResult<Dynamic> {
                let conversation = vec![Message::new("user", message)];
                Ok(converse(ep, &out, vec![conversation], &Map::new())?.remove(0))
            },
        );

    let out = output.clone();
    FuncRegistration::new("chat")
        .with_params_info([
            "endpoint: Endpoint",
            "messages: Array",
            "options: Map",
            "Dynamic",
        ])
        .with_comments([
            "/// One conversation (an array of `#{ role, content }`) gives one reply; an array \
             of user messages (strings) or of conversations (arrays) gives an array of \
             replies, in order.",
        ])
        .register_into_engine(
            engine,
            move |ep: &mut Endpoint, messages: Array, options: Map| -> RhaiResult<Dynamic> {
                let (all, single) = conversations(messages)?;
                let mut replies = converse(ep, &out, all, &options)?;
                Ok(if single {
                    replies.remove(0)
                } else {
                    Dynamic::from_array(replies)
                })
            },
        );
}

/// An Endpoint's `models`, `usage` and text form.
fn register_server_info(engine: &mut Engine) {
    FuncRegistration::new("models")
        .with_params_info(["endpoint: Endpoint", "Array"])
        .with_comments(["/// The ids of the models the server serves (`/models`)."])
        .register_into_engine(engine, |ep: &mut Endpoint| -> RhaiResult<Array> {
            Ok(ep
                .models()
                .map_err(error)?
                .into_iter()
                .map(Dynamic::from)
                .collect())
        });

    FuncRegistration::new("usage")
        .with_params_info(["endpoint: Endpoint", "Map"])
        .with_comments([
            "/// What was sent so far: `requests` (retries included), `retries`, \
             `prompt_tokens`, `completion_tokens`.",
        ])
        .register_into_engine(engine, |ep: &mut Endpoint| -> Map {
            let u = ep.usage();
            [
                ("requests", u.requests),
                ("retries", u.retries),
                ("prompt_tokens", u.prompt_tokens),
                ("completion_tokens", u.completion_tokens),
            ]
            .into_iter()
            .map(|(k, v)| (k.into(), Dynamic::from(v as i64)))
            .collect()
        });

    FuncRegistration::new("to_string")
        .register_into_engine(engine, |ep: &mut Endpoint| describe(ep));
    FuncRegistration::new("to_debug")
        .register_into_engine(engine, |ep: &mut Endpoint| describe(ep));
}

fn describe(ep: &Endpoint) -> String {
    format!("Endpoint({} at {})", ep.model(), ep.base_url())
}
