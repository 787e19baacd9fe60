//! The JSON of OpenAI's API as the client sends and reads it: request bodies for
//! `/chat/completions` and `/completions`, replies, and the server's error message.

use serde_json::{json, Map, Value};

use super::{PromptLogprobs, Reply, RequestParams};
use crate::model::chat::Message;

/// The two generation routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/chat/completions`: messages in, `choices[].message.content` out.
    Chat,
    /// `/completions`: a prompt in, `choices[].text` out.
    Completion,
}

impl Route {
    /// The path below the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/chat/completions",
            Route::Completion => "/completions",
        }
    }
}

/// What a request asks for, before the sampling fields are added.
#[derive(Debug, Clone)]
pub enum Input {
    /// A conversation.
    Messages(Vec<Message>),
    /// A plain prompt.
    Prompt(String),
}

impl Input {
    /// The route this input goes to.
    pub fn route(&self) -> Route {
        match self {
            Input::Messages(_) => Route::Chat,
            Input::Prompt(_) => Route::Completion,
        }
    }
}

/// The request body: `n` samples (the field is left out for one, since some servers accept
/// no `n` at all), with `seed` when there is one.
pub fn body(
    model: &str,
    input: &Input,
    params: &RequestParams,
    n: usize,
    seed: Option<u64>,
) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    match input {
        Input::Messages(messages) => {
            body.insert("messages".into(), json!(messages));
        }
        Input::Prompt(prompt) => {
            body.insert("prompt".into(), json!(prompt));
        }
    }
    body.insert("max_tokens".into(), json!(params.max_tokens));
    body.insert("temperature".into(), json!(params.temperature));
    body.insert("top_p".into(), json!(params.top_p));
    if n != 1 {
        body.insert("n".into(), json!(n));
    }
    if let Some(seed) = seed {
        body.insert("seed".into(), json!(seed));
    }
    if !params.stop.is_empty() {
        body.insert("stop".into(), json!(params.stop));
    }
    Value::Object(body)
}

/// The body that asks for the log-probabilities of every token of `prompts` and nothing
/// more: OpenAI's legacy `echo` with `logprobs` and `max_tokens: 0` (lm-eval's
/// `local-completions` sends `logprobs: 1` too).
pub fn score_body(model: &str, prompts: &[String]) -> Value {
    json!({
        "model": model,
        "prompt": prompts,
        "max_tokens": 0,
        "echo": true,
        "logprobs": 1,
        "temperature": 0,
    })
}

/// Why a reply to [`score_body`] holds no prompt log-probabilities, for the server that
/// ignores `echo` or `logprobs`.
pub const NO_PROMPT_LOGPROBS: &str = "the reply holds no log-probabilities of the prompt's \
     tokens: the server does not honour `echo` with `logprobs` on /completions";

/// The echoed prompts of a reply to [`score_body`], its choices in `index` order: each
/// token's text and log-probability (`None` where the server gives none, as for the first
/// token).
pub fn parse_scores(reply: &Value, prompts: &[String]) -> Result<Vec<PromptLogprobs>, String> {
    let choices = choices_by_index(reply)?;
    let mut scored = Vec::with_capacity(choices.len());
    for (position, choice) in choices {
        let logprobs = choice.get("logprobs").filter(|v| !v.is_null());
        let field = |name: &str| {
            logprobs
                .and_then(|l| l.get(name))
                .and_then(Value::as_array)
                .filter(|a| !a.is_empty())
        };
        let (Some(tokens), Some(values)) = (field("tokens"), field("token_logprobs")) else {
            return Err(format!("choices[{position}]: {NO_PROMPT_LOGPROBS}"));
        };
        if tokens.len() != values.len() {
            return Err(format!(
                "choices[{position}]: {} tokens but {} token_logprobs",
                tokens.len(),
                values.len()
            ));
        }
        let tokens = tokens
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(format!(
                "choices[{position}].logprobs.tokens are not all text"
            ))?;
        let logprobs = values
            .iter()
            .map(|v| match v {
                Value::Null => Ok(None),
                v => v.as_f64().map(Some).ok_or(format!(
                    "choices[{position}].logprobs.token_logprobs holds {v}"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        scored.push((choice.get("text"), PromptLogprobs { tokens, logprobs }));
    }
    if scored.len() != prompts.len() {
        return Err(format!(
            "{} choices for {} prompts (the server does not take a list of prompts)",
            scored.len(),
            prompts.len()
        ));
    }
    scored
        .into_iter()
        .zip(prompts)
        .enumerate()
        .map(|(i, ((text, scored), prompt))| {
            // `max_tokens: 0` must return the prompt alone: a server that generated after it
            // would have its tokens counted as the prompt's
            match text.and_then(Value::as_str) {
                Some(text) if text != prompt => Err(format!(
                    "choice {i} is not the prompt alone (the server ignored `max_tokens: 0` \
                     or `echo`): {}",
                    cut(text, 80)
                )),
                _ => Ok(scored),
            }
        })
        .collect()
}

/// The texts, finish reasons and token counts of a reply, its choices in `index` order.
pub fn parse_reply(route: Route, reply: &Value) -> Result<Reply, String> {
    let choices = choices_by_index(reply)?;
    let mut parsed = Vec::with_capacity(choices.len());
    for (position, choice) in choices {
        let text = match route {
            Route::Chat => {
                let message = choice
                    .get("message")
                    .ok_or(format!("choices[{position}] has no `message`"))?;
                content_text(message.get("content").unwrap_or(&Value::Null))
                    .ok_or(format!("choices[{position}].message.content is not text"))?
            }
            Route::Completion => choice
                .get("text")
                .and_then(Value::as_str)
                .ok_or(format!("choices[{position}] has no `text`"))?
                .to_string(),
        };
        let finish = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        parsed.push((text, finish));
    }
    let usage = |key: &str| {
        reply
            .get("usage")
            .and_then(|u| u.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize
    };
    let (texts, finish_reasons) = parsed.into_iter().unzip();
    Ok(Reply {
        texts,
        finish_reasons,
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
    })
}

/// The reply's `choices` in `index` order (a choice without one keeps its place), each with
/// its position in the array, for messages.
fn choices_by_index(reply: &Value) -> Result<Vec<(usize, &Value)>, String> {
    let choices = reply
        .get("choices")
        .and_then(Value::as_array)
        .ok_or("no `choices` array")?;
    let mut ordered: Vec<(usize, &Value)> = choices.iter().enumerate().collect();
    ordered.sort_by_key(|(position, choice)| {
        choice
            .get("index")
            .and_then(Value::as_u64)
            .map_or(*position, |i| i as usize)
    });
    Ok(ordered)
}

/// A message's content as text: a string, nothing (`null`, as when a model only calls
/// tools), or a list of parts whose `text` fields are joined.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::Null => Some(String::new()),
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

/// The most telling part of an error reply: `error.message` (OpenAI, vLLM, llama.cpp),
/// `error` as text, `message` or `detail` (FastAPI), else the body itself, cut to 500
/// characters.
pub fn server_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let found = parsed.as_ref().and_then(|v| {
        [
            v.get("error").and_then(|e| e.get("message")),
            v.get("error"),
            v.get("message"),
            v.get("detail"),
        ]
        .into_iter()
        .flatten()
        .find_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Null | Value::Object(_) => None,
            other => Some(other.to_string()),
        })
    });
    let text = found.unwrap_or_else(|| body.trim().to_string());
    let text = if text.is_empty() {
        "(empty body)".to_string()
    } else {
        text
    };
    cut(&text, 500)
}

/// `text` cut to at most `limit` characters, marked when cut.
pub fn cut(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RequestParams {
        RequestParams {
            max_tokens: 32,
            temperature: 0.7,
            top_p: 0.9,
            n: 3,
            seed: Some(5),
            stop: vec!["\n\n".into()],
        }
    }

    #[test]
    fn bodies_carry_every_sampling_field() {
        let chat = body(
            "judge",
            &Input::Messages(vec![Message::new("user", "Hi")]),
            &params(),
            3,
            Some(5),
        );
        assert_eq!(
            chat,
            json!({"model": "judge", "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "n": 3, "seed": 5,
                   "stop": ["\n\n"]})
        );
        let one = body(
            "m",
            &Input::Prompt("2+2=".into()),
            &RequestParams::default(),
            1,
            None,
        );
        assert_eq!(one["prompt"], "2+2=");
        assert!(one.get("n").is_none() && one.get("seed").is_none() && one.get("stop").is_none());
    }

    #[test]
    fn replies_are_read_in_index_order_with_usage() {
        let reply = json!({
            "choices": [
                {"index": 1, "message": {"role": "assistant", "content": "B"}, "finish_reason": "length"},
                {"index": 0, "message": {"role": "assistant", "content": null}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
        });
        let r = parse_reply(Route::Chat, &reply).unwrap();
        assert_eq!(r.texts, ["", "B"]);
        assert_eq!(r.finish_reasons, ["stop", "length"]);
        assert_eq!((r.prompt_tokens, r.completion_tokens), (7, 9));
        let text = json!({"choices": [{"index": 0, "text": " 4", "finish_reason": null}]});
        let r = parse_reply(Route::Completion, &text).unwrap();
        assert_eq!(
            (r.texts[0].as_str(), r.finish_reasons[0].as_str()),
            (" 4", "")
        );
        assert_eq!(r.prompt_tokens, 0);
    }

    #[test]
    fn malformed_replies_say_what_is_missing() {
        assert_eq!(
            parse_reply(Route::Chat, &json!({"object": "list"})).unwrap_err(),
            "no `choices` array"
        );
        let err = parse_reply(Route::Completion, &json!({"choices": [{"message": {}}]}));
        assert_eq!(err.unwrap_err(), "choices[0] has no `text`");
    }

    #[test]
    fn echoed_prompts_are_read_in_index_order() {
        let prompts = ["Answer: A".to_string(), "Answer:".to_string()];
        let body = score_body("m", &prompts);
        assert_eq!(
            (&body["echo"], &body["max_tokens"], &body["logprobs"]),
            (&json!(true), &json!(0), &json!(1))
        );
        let choice = |index: usize, tokens: &[&str], values: Value| {
            json!({"index": index, "text": prompts[index], "finish_reason": "length",
                   "logprobs": {"tokens": tokens, "token_logprobs": values,
                                "top_logprobs": null, "text_offset": null}})
        };
        let reply = json!({"choices": [
            choice(1, &["<bos>", "Answer", ":"], json!([null, -2.5, -0.5])),
            choice(0, &["<bos>", "Answer", ":", " A"], json!([null, -2.5, -0.5, -1.25])),
        ]});
        let scored = parse_scores(&reply, &prompts).unwrap();
        assert_eq!(scored[0].tokens, ["<bos>", "Answer", ":", " A"]);
        assert_eq!(
            scored[0].logprobs,
            [None, Some(-2.5), Some(-0.5), Some(-1.25)]
        );
        assert_eq!(scored[1].logprobs.len(), 3);
    }

    #[test]
    fn servers_that_do_not_score_prompts_are_named() {
        let prompts = ["x".to_string()];
        // llama.cpp-like: `echo` and `logprobs` ignored
        let ignored = json!({"choices": [{"index": 0, "text": "", "logprobs": null}]});
        let err = parse_scores(&ignored, &prompts).unwrap_err();
        assert!(
            err.contains("does not honour `echo` with `logprobs`"),
            "{err}"
        );
        // generated although asked for nothing
        let generated = json!({"choices": [{"index": 0, "text": "x and more",
            "logprobs": {"tokens": ["x", " and"], "token_logprobs": [null, -1.0]}}]});
        let err = parse_scores(&generated, &prompts).unwrap_err();
        assert!(err.contains("`max_tokens: 0`"), "{err}");
        let err = parse_scores(&json!({"choices": []}), &prompts).unwrap_err();
        assert!(err.starts_with("0 choices for 1 prompts"), "{err}");
    }

    #[test]
    fn server_messages_come_from_every_common_shape() {
        let openai = r#"{"error": {"message": "n must be 1", "type": "invalid_request_error"}}"#;
        assert_eq!(server_message(openai), "n must be 1");
        assert_eq!(server_message(r#"{"detail": "Not Found"}"#), "Not Found");
        assert_eq!(server_message(r#"{"error": "overloaded"}"#), "overloaded");
        assert_eq!(server_message("Bad Gateway\n"), "Bad Gateway");
        assert_eq!(server_message(""), "(empty body)");
        assert_eq!(server_message(&"x".repeat(600)).chars().count(), 501);
    }
}
