//! `stream: true`: a request's tokens answered as server-sent events on its own connection,
//! as the generation thread sends them.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use rlvr::model::tokenizer::Tokenizer;
use rlvr::progress::Cancel;
use serde_json::{json, Value};

use crate::engine::{Job, Row, Scoring, Streamed};
use crate::logprobs::{self, Entry, TokenScore};
use crate::lora::Adapter;
use crate::peer::Peer;
use crate::request::GenerationRequest;
use crate::routes::{error, finish_text, request_rows, Answer};
use crate::{unix_time, Context};

/// A streamed request's replies as the generation thread sends them.
pub(crate) struct Events {
    tokens: Receiver<Streamed>,
    results: Receiver<Result<Vec<Row>, String>>,
    tokenizer: Tokenizer,
    stop: Vec<String>,
    chat: bool,
    id: String,
    created: u64,
    /// The served model's name, or the adapter's the request named.
    model: String,
    /// Whether the request asks for log-probabilities.
    logprobs: bool,
    /// With `stream_options.include_usage`: the prompts' tokens, for the last chunk's
    /// `usage`.
    usage: Option<usize>,
    rows: Vec<StreamRow>,
    /// Set when the client leaves: the generation thread ends the request's rows.
    cancel: Cancel,
    peer: Peer,
}

/// One row of a streamed request so far.
#[derive(Debug, Clone, Default)]
struct StreamRow {
    ids: Vec<u32>,
    /// The text sent.
    sent: String,
    /// The tokens' scores, when the request asks for log-probabilities.
    scores: Vec<TokenScore>,
    /// Tokens whose log-probabilities were sent.
    reported: usize,
    /// Characters of the reported tokens' texts: where the next one starts
    /// (`text_offset`).
    offset: usize,
}

/// Queues a `stream: true` request's rows, their tokens to come back one at a time.
pub(crate) fn start_stream(
    context: &Context,
    jobs: &Sender<Job>,
    request: &GenerationRequest,
    chat: bool,
    adapter: Option<Arc<Adapter>>,
    peer: Peer,
) -> Result<Events, Answer> {
    let (prompt_ids, rows) = request_rows(context, request)?;
    let (reply, results) = mpsc::channel();
    let (tokens_to, tokens) = mpsc::channel();
    let count = rows.len();
    let model = adapter.as_ref().map_or(&context.name, |a| &a.name).clone();
    let cancel = Cancel::new();
    jobs.send(Job {
        rows,
        stop: request.stop.clone(),
        scoring: request.logprobs.map(|top| Scoring { prompt: false, top }),
        adapter,
        reply,
        tokens: Some(tokens_to),
        cancel: cancel.clone(),
    })
    .map_err(|_| {
        error(
            500,
            "server_error",
            None,
            "the generation thread has stopped",
        )
    })?;
    let id_prefix = if chat { "chatcmpl" } else { "cmpl" };
    Ok(Events {
        tokens,
        results,
        tokenizer: context.tokenizer.clone(),
        stop: request.stop.clone(),
        chat,
        id: format!("{id_prefix}-{:016x}", rand::random::<u64>()),
        created: unix_time(),
        model,
        logprobs: request.logprobs.is_some(),
        usage: request
            .include_usage
            .then(|| prompt_ids.iter().map(Vec::len).sum()),
        rows: vec![StreamRow::default(); count],
        cancel,
        peer,
    })
}

/// Answers a streamed request on its own connection, as OpenAI's API does: server-sent
/// events, a chunk with each row's new text as its tokens come (text held back while it
/// could still be the start of a stop text, or half a character; with `logprobs`, the
/// scores of the tokens the text comes from), a last chunk per row with its finish reason,
/// with `stream_options.include_usage` a chunk of no choices with the request's `usage`,
/// then `data: [DONE]`; the connection closes after it. When the client leaves (a write
/// fails, or the kernel shows its end of the connection closed) the request's rows end
/// before the next step. Returns a note for the log.
pub(crate) fn stream_events(request: tiny_http::Request, mut events: Events) -> String {
    let mut out = request.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                Connection: close\r\n\r\n";
    let send = |out: &mut Box<dyn Write + Send>, chunk: &str| {
        out.write_all(chunk.as_bytes()).and_then(|()| out.flush())
    };
    let left = |events: &Events| {
        events.cancel.cancel();
        "(stream: the client left)".to_string()
    };
    if send(&mut out, head).is_err() {
        return left(&events);
    }
    let hold = events.stop.iter().map(String::len).max().unwrap_or(1) - 1;
    loop {
        let streamed = match events.tokens.recv_timeout(Peer::POLL) {
            Ok(streamed) => streamed,
            Err(mpsc::RecvTimeoutError::Timeout) if events.peer.left() => return left(&events),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            // every row has ended
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let index = streamed.row;
        let row = &mut events.rows[index];
        row.ids.push(streamed.token);
        row.scores.extend(streamed.score);
        if streamed.stop {
            continue;
        }
        let Ok(text) = events.tokenizer.decode(&row.ids) else {
            continue;
        };
        let mut end = text.len().saturating_sub(hold);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let shown = text[..end].trim_end_matches('\u{FFFD}');
        if shown.len() <= row.sent.len() || !shown.starts_with(row.sent.as_str()) {
            continue;
        }
        let first = row.sent.is_empty();
        let delta = shown[row.sent.len()..].to_string();
        row.sent = shown.to_string();
        let upto = row.ids.len();
        let chunk = match events.report(index, upto) {
            Ok(logprobs) => events.chunk(index, Some(&delta), None, first, logprobs),
            Err(e) => return format!("(stream: decoding failed: {e})"),
        };
        if send(&mut out, &chunk).is_err() {
            return left(&events);
        }
    }
    let mut tail = String::new();
    let note = match events.results.recv() {
        Ok(Ok(rows)) => {
            let mut tokens = 0;
            for (index, row) in rows.iter().enumerate() {
                let Ok((text, finish, n, shown)) =
                    finish_text(&events.tokenizer, &row.completion, &events.stop)
                else {
                    continue;
                };
                tokens += n;
                let sent = events.rows[index].sent.clone();
                let rest = text.strip_prefix(sent.as_str()).unwrap_or("");
                let rest = Some(rest).filter(|r| !r.is_empty());
                let upto = match kept_tokens(&events.tokenizer, shown, &text) {
                    Ok(upto) => upto,
                    Err(e) => return format!("(stream: decoding failed: {e})"),
                };
                let logprobs = events.report(index, upto).unwrap_or(Value::Null);
                tail += &events.chunk(index, rest, Some(finish), sent.is_empty(), logprobs);
            }
            if let Some(prompt_tokens) = events.usage {
                let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                   "total_tokens": prompt_tokens + tokens});
                tail += &format!("data: {}\n\n", events.envelope(json!([]), usage));
            }
            format!(
                "(stream: {} choices, {tokens} completion tokens)",
                rows.len()
            )
        }
        Ok(Err(message)) => {
            let message = format!("generation failed: {message}");
            tail += &format!("data: {}\n\n", error(500, "server_error", None, &message).1);
            message
        }
        Err(_) => "(stream: the generation thread has stopped)".into(),
    };
    tail += "data: [DONE]\n\n";
    let _ = send(&mut out, &tail);
    note
}

/// How many of a sample's `shown` tokens its `text` keeps: those that start before a stop
/// text cut it.
fn kept_tokens(tokenizer: &Tokenizer, shown: &[u32], text: &str) -> rlvr::model::Result<usize> {
    let pieces = logprobs::pieces(tokenizer, shown)?;
    if pieces.iter().map(String::len).sum::<usize>() <= text.len() {
        return Ok(shown.len());
    }
    let mut start = 0;
    Ok(pieces
        .iter()
        .take_while(|piece| {
            let kept = start < text.len();
            start += piece.len();
            kept
        })
        .count())
}

impl Events {
    /// The `logprobs` of row `index`'s tokens from the last reported one up to `upto`, as a
    /// chunk carries them (`null` when the request asks for none): chat's `content`
    /// entries, or the legacy lists of `/v1/completions` with each token's `text_offset`
    /// counted from the row's first token.
    fn report(&mut self, index: usize, upto: usize) -> rlvr::model::Result<Value> {
        if !self.logprobs {
            return Ok(Value::Null);
        }
        let row = &mut self.rows[index];
        let upto = upto.min(row.scores.len()).max(row.reported);
        let from = row.reported;
        // a few tokens before give the first ones their context (a leading space, the
        // rest of a character)
        let context = from.saturating_sub(8);
        let pieces = logprobs::pieces(&self.tokenizer, &row.ids[context..upto])?;
        let pieces = &pieces[from - context..];
        let scores = &row.scores[from..upto];
        row.reported = upto;
        if self.chat {
            let content = pieces
                .iter()
                .zip(scores)
                .map(|(piece, score)| logprobs::chat_entry(&self.tokenizer, piece, score))
                .collect::<rlvr::model::Result<Vec<_>>>()?;
            return Ok(json!({ "content": content }));
        }
        let entries: Vec<Entry> = (row.ids[from..upto].iter())
            .zip(pieces)
            .zip(scores)
            .map(|((&id, piece), score)| Entry {
                id,
                piece: piece.clone(),
                score: Some(score),
            })
            .collect();
        let mut legacy = logprobs::legacy(&self.tokenizer, &entries)?;
        for offset in legacy["text_offset"].as_array_mut().into_iter().flatten() {
            *offset = json!(offset.as_u64().unwrap_or(0) as usize + row.offset);
        }
        row.offset += pieces.iter().map(|p| p.chars().count()).sum::<usize>();
        Ok(legacy)
    }

    /// One server-sent event: a chunk of row `index` with new `text` and, on its last one,
    /// its `finish` reason and the `logprobs` of its tokens; a chat's `first` chunk of a row
    /// names the role.
    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        finish: Option<&str>,
        first: bool,
        logprobs: Value,
    ) -> String {
        let choice = if self.chat {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(text) = text {
                delta["content"] = json!(text);
            }
            json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs})
        } else {
            json!({"index": index, "text": text.unwrap_or(""), "finish_reason": finish,
                   "logprobs": logprobs})
        };
        format!("data: {}\n\n", self.envelope(json!([choice]), Value::Null))
    }

    /// A chunk with `choices` around them; with `include_usage` every chunk has a `usage`
    /// (null until the last), as OpenAI sends them.
    fn envelope(&self, choices: Value, usage: Value) -> Value {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut chunk = json!({"id": self.id, "object": object, "created": self.created,
                               "model": self.model, "choices": choices});
        if self.usage.is_some() {
            chunk["usage"] = usage;
        }
        chunk
    }
}
