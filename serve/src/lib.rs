//! `rlvr serve`: an OpenAI-compatible HTTP server over a loaded model, so that any
//! OpenAI client (lm-eval's `local-chat-completions`, the `openai` package, the library's
//! [`rlvr::endpoint::Endpoint`]) can use it.
//!
//! Routes: `GET /v1/models`, `POST /v1/chat/completions` (the chat template applied by the
//! model's tokenizer), `POST /v1/completions` (text or token ids; `echo` and `logprobs` in
//! OpenAI's legacy format, so lm-eval's `local-completions` can score continuations),
//! `GET /health`; with `--enable-lora`, vLLM's runtime LoRA API ([`lora`]):
//! `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`, and requests whose `model`
//! names a loaded adapter run with it.
//!
//! A prompt is refused (HTTP 400, `context_length_exceeded`) when it does not fit the
//! model's context: by its length in bytes before it is tokenized when it is longer than
//! the context's tokens can spell, else by its token count.
//!
//! Each HTTP request is read and tokenized on its own thread; one generation thread owns
//! the model and runs every request's rows (every prompt × `n`, each with its own sampling
//! and stop texts) in one continuous batch ([`Scheduler`]): a request joins the running
//! batch at the next step, as soon as slots are free, and is answered when its last row
//! ends, so concurrent clients share decoding steps and a short request does not wait for a
//! long one to finish. A request whose client leaves (a failed write to its stream, or its
//! connection seen closed in the kernel's table of sockets while it waits) has its rows, and
//! only those, ended before the next step.

pub mod logprobs;
pub mod lora;
pub mod request;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tiny_http::{Header, Method, Response, Server};

use logprobs::{Entry, TokenScore};
use lora::{Adapter, Adapters};
use request::{BadRequest, GenerationRequest, Prompt};
use rlvr::model::batching::Scheduler;
use rlvr::model::generate::{Completion, Finish, Sampling};
use rlvr::model::lm::LanguageModel;
use rlvr::model::tokenizer::Tokenizer;
use rlvr::progress::Cancel;

/// The largest request body read, in bytes.
const MAX_BODY: u64 = 32 << 20;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on; 0 picks a free one (the `on_ready` callback learns which).
    pub port: u16,
    /// The model id reported by `/v1/models` and in replies.
    pub name: String,
    /// Rows (prompts × `n`) at most in the running batch; more wait for free slots.
    pub max_batch: usize,
    /// The most new tokens a request may ask for (`max_tokens`); more is an HTTP 400, and a
    /// request that names none gets at most this many.
    pub max_tokens: Option<usize>,
    /// The context a prompt and its new tokens must fit in; `None`: the model config's
    /// `max_position_embeddings` (no limit when it states none).
    pub max_model_len: Option<usize>,
    /// When set, every request must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// vLLM's `--enable-lora`: requests may name a loaded adapter as their `model`, and
    /// adapters are loaded and unloaded at runtime (`/v1/load_lora_adapter`,
    /// `/v1/unload_lora_adapter`).
    pub enable_lora: bool,
    /// Adapters loaded at start (vLLM's `--lora-modules name=path`), as names and PEFT
    /// folders; needs `enable_lora`.
    pub lora_modules: Vec<(String, String)>,
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {message}")]
pub struct ServeError {
    /// The address asked for.
    pub address: String,
    /// Why.
    pub message: String,
}

/// Serves `lm` until the process ends; `on_ready` learns the address once it listens.
pub fn serve(
    lm: LanguageModel,
    options: &ServeOptions,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let address = format!("{}:{}", options.host, options.port);
    let server = Server::http(&address).map_err(|e| ServeError {
        address: address.clone(),
        message: e.to_string(),
    })?;
    let bound = server.server_addr().to_ip().ok_or_else(|| ServeError {
        address: address.clone(),
        message: "not an IP address".into(),
    })?;
    let created = unix_time();
    let adapters = match options.enable_lora {
        true => Some(start_adapters(&lm, options, created, &address)?),
        false if options.lora_modules.is_empty() => None,
        false => {
            return Err(ServeError {
                address,
                message: "LoRA modules need --enable-lora".into(),
            })
        }
    };
    let context = Arc::new(Context {
        name: options.name.clone(),
        created,
        adapters,
        api_key: options.api_key.clone(),
        tokenizer: lm.tokenizer.clone(),
        vocab: lm.model.lm_head().dims()[0],
        context: options.max_model_len.or_else(|| lm.model.context_length()),
        max_tokens: options.max_tokens,
        longest_token: lm.tokenizer.longest_token_bytes(),
        port: bound.port(),
        sockets: Arc::default(),
    });
    let (jobs, queue) = mpsc::channel::<Job>();
    let max_batch = options.max_batch.max(1);
    std::thread::Builder::new()
        .name("rlvr-serve-generate".into())
        .spawn(move || run_engine(&lm, &queue, max_batch))
        .map_err(|e| ServeError {
            address: address.clone(),
            message: format!("cannot start the generation thread: {e}"),
        })?;
    keep_connection_pool_moving(bound);
    on_ready(bound);
    for request in server.incoming_requests() {
        let (context, jobs) = (context.clone(), jobs.clone());
        std::thread::spawn(move || handle(request, &context, &jobs));
    }
    Ok(())
}

/// The adapter registry of `--enable-lora`, with the `--lora-modules` loaded.
fn start_adapters(
    lm: &LanguageModel,
    options: &ServeOptions,
    created: u64,
    address: &str,
) -> Result<Adapters, ServeError> {
    let adapters = Adapters::new(lm.clone(), &options.name, created);
    for (name, path) in &options.lora_modules {
        let (status, body) = adapters.load(&json!({"lora_name": name, "lora_path": path}));
        if status != 200 {
            return Err(ServeError {
                address: address.to_string(),
                message: format!(
                    "LoRA module {name}={path}: {}",
                    body["error"]["message"].as_str().unwrap_or_default()
                ),
            });
        }
    }
    Ok(adapters)
}

/// tiny_http 0.12 gives each connection a thread of its pool for as long as the client keeps
/// it alive, and starts a new thread only when none is waiting. When several connections
/// open at once, it can count a thread as waiting that has already been woken for another
/// connection, and leave one connection queued until a busy thread is freed: until some
/// client closes an idle connection, 90 s later for reqwest. A connection of our own every
/// 100 ms, closed at once, makes the pool start a thread when every thread is busy, and that
/// thread then takes the queued connection.
fn keep_connection_pool_moving(bound: SocketAddr) {
    let mut target = bound;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        let _ = TcpStream::connect_timeout(&target, Duration::from_secs(1));
    });
}

/// What every request thread needs.
struct Context {
    name: String,
    created: u64,
    /// The runtime adapters (`None` without `--enable-lora`).
    adapters: Option<Adapters>,
    api_key: Option<String>,
    tokenizer: Tokenizer,
    /// Rows of the embedding table: token ids must be below it.
    vocab: usize,
    /// The model's context length (`max_position_embeddings`), when its config states it:
    /// a prompt and its new tokens must fit in it.
    context: Option<usize>,
    /// The bytes of the longest token of the vocabulary: a text longer than `context` times
    /// this cannot fit in the context, and is refused before it is tokenized.
    longest_token: usize,
    /// `--max-tokens`: the most new tokens a request may ask for.
    max_tokens: Option<usize>,
    /// The port the server listens on, to find a client's connection in the kernel's table.
    port: u16,
    /// That table, shared by every waiting request.
    sockets: Arc<Sockets>,
}

/// One HTTP request's rows, sent to the generation thread; the results come back on
/// `reply`.
struct Job {
    rows: Vec<(Vec<u32>, Sampling)>,
    /// Texts that end a row once its decoded completion holds one.
    stop: Vec<String>,
    /// Which tokens to score, when the request asks for log-probabilities.
    scoring: Option<Scoring>,
    /// The adapter the request named (`None`: the served model as loaded).
    adapter: Option<Arc<Adapter>>,
    reply: Sender<Result<Vec<Row>, String>>,
    /// With `stream`: each row's new tokens as they come (scored from the logits they were
    /// sampled from when `scoring` asks); a row ends once the receiver is gone.
    tokens: Option<Sender<Streamed>>,
    /// Set once the client has left: the generation thread ends the request's rows, and
    /// only its own, before its next step.
    cancel: Cancel,
}

/// A new token of a streamed row.
struct Streamed {
    /// The row's index in its request.
    row: usize,
    token: u32,
    /// Its score, when the request asks for log-probabilities.
    score: Option<TokenScore>,
    /// Whether it completes a stop text: its text is not sent as it comes (the last chunk
    /// sends the text before the stop text).
    stop: bool,
}

/// What a request wants scored.
#[derive(Debug, Clone, Copy)]
struct Scoring {
    /// The prompt's tokens too (`echo`), not only the sample's.
    prompt: bool,
    /// Alternatives listed at each position.
    top: usize,
}

/// One row's result: its completion (empty for `max_tokens: 0`) and, when asked for, the
/// scores of the prompt's tokens after the first (with `echo`) and of the completion's.
struct Row {
    completion: Completion,
    scores: Vec<TokenScore>,
}

/// A request on the generation thread: its job, and its rows' completions as they end.
struct Running {
    job: Job,
    completions: Vec<Option<Completion>>,
}

/// One continuous batch over one model (the served model, or the model with one loaded
/// adapter): its [`Scheduler`], the requests running in it and which request each
/// scheduled row belongs to.
struct Batch<'a> {
    lm: &'a LanguageModel,
    scheduler: Scheduler<'a>,
    running: HashMap<usize, Running>,
    /// each scheduled row's request and its index there
    rows: HashMap<usize, (usize, usize)>,
    next_request: usize,
    next_row: usize,
}

impl<'a> Batch<'a> {
    /// An empty batch of at most `max_batch` rows on `lm`.
    fn new(lm: &'a LanguageModel, max_batch: usize) -> Self {
        Batch {
            lm,
            scheduler: Scheduler::with_rows(&lm.model, lm.lora.is_some(), None, max_batch),
            running: HashMap::new(),
            rows: HashMap::new(),
            next_request: 0,
            next_row: 0,
        }
    }

    /// Whether no row is running or waiting.
    fn is_idle(&self) -> bool {
        self.scheduler.is_idle()
    }

    /// Queues every row of `job`; it joins at the next step.
    fn admit(&mut self, job: Job) {
        for (r, (prompt, sampling)) in job.rows.iter().enumerate() {
            self.rows.insert(self.next_row, (self.next_request, r));
            self.scheduler
                .submit(self.next_row, prompt.clone(), sampling.clone());
            self.next_row += 1;
        }
        let completions = vec![None; job.rows.len()];
        self.running
            .insert(self.next_request, Running { job, completions });
        self.next_request += 1;
    }

    /// Ends the rows of every request whose client has left (the rows of the requests
    /// beside it, a shared prompt's included, run on); it gets no answer.
    fn drop_cancelled(&mut self) {
        let gone: Vec<usize> = (self.running.iter())
            .filter(|(_, request)| request.job.cancel.is_cancelled())
            .map(|(&id, _)| id)
            .collect();
        if gone.is_empty() {
            return;
        }
        let rows = &self.rows;
        let ended = self
            .scheduler
            .cancel(&|row| rows.get(&row).is_some_and(|(id, _)| gone.contains(id)));
        for (row, _) in ended {
            self.rows.remove(&row);
        }
        for id in gone {
            self.running.remove(&id);
        }
    }

    /// One decoding step; answers every request whose last row ended (scored first when
    /// it asks for log-probabilities). A step that fails fails the requests running in it.
    fn step(&mut self) {
        self.drop_cancelled();
        if self.is_idle() {
            return;
        }
        let (lm, running, rows) = (self.lm, &self.running, &self.rows);
        let step = rlvr::model::linear::no_grad(|| {
            self.scheduler.step(&mut |row, ids, logits| {
                let (id, r) = rows[&row];
                let job = &running[&id].job;
                let token = *ids.last().expect("a new token");
                let stop = ends_with_stop(&lm.tokenizer, ids, &job.stop);
                let left = job.tokens.as_ref().is_some_and(|tokens| {
                    let score = job
                        .scoring
                        .map(|s| logprobs::from_logits(logits, token, s.top));
                    let streamed = Streamed {
                        row: r,
                        token,
                        score,
                        stop,
                    };
                    tokens.send(streamed).is_err()
                });
                left || stop
            })
        });
        let ended = match step {
            Ok(ended) => ended,
            Err(e) => {
                self.scheduler.cancel_all();
                self.rows.clear();
                for (_, request) in self.running.drain() {
                    let _ = request.job.reply.send(Err(first_line(&e)));
                }
                return;
            }
        };
        for (row, completion) in ended {
            let (id, r) = self.rows.remove(&row).expect("a scheduled row");
            let request = self.running.get_mut(&id).expect("a running request");
            request.completions[r] = Some(completion);
            if request.completions.iter().all(Option::is_some) {
                let request = self.running.remove(&id).expect("a running request");
                let answer = scored(lm, &request).map_err(|e| first_line(&e));
                let _ = request.job.reply.send(answer);
            }
        }
    }
}

/// The generation thread: one continuous batch of `max_batch` rows on the served model
/// runs the rows of every request; requests that arrive join it at the next step, and each
/// is answered as soon as its last row ends. Requests naming a loaded adapter run, adapter
/// by adapter, in a batch of their own on that adapter's model, between two steps of the
/// served model's batch.
fn run_engine(lm: &LanguageModel, queue: &Receiver<Job>, max_batch: usize) {
    let mut batch = Batch::new(lm, max_batch);
    loop {
        let first = if batch.is_idle() {
            let Ok(job) = queue.recv() else { return };
            Some(job)
        } else {
            None
        };
        let mut with_adapter = Vec::new();
        for job in first
            .into_iter()
            .chain(std::iter::from_fn(|| queue.try_recv().ok()))
        {
            if job.adapter.is_some() {
                with_adapter.push(job);
            } else {
                batch.admit(job);
            }
        }
        for group in by_adapter(with_adapter) {
            let adapter = group[0].adapter.clone().expect("an adapter");
            let mut own = Batch::new(&adapter.lm, max_batch);
            for job in group {
                own.admit(job);
            }
            while !own.is_idle() {
                own.step();
            }
        }
        if !batch.is_idle() {
            batch.step();
        }
    }
}

/// Jobs that name an adapter, grouped by it, in order of first appearance.
fn by_adapter(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        let same = |other: &Job| match (&job.adapter, &other.adapter) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        match groups.iter_mut().find(|g| same(&g[0])) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// The first line of an error (candle appends a backtrace to some).
fn first_line(e: &rlvr::model::ModelError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// A finished request's rows, each with the scores it asks for: the prompt's tokens after
/// the first (with `echo`) and the completion's.
fn scored(lm: &LanguageModel, request: &Running) -> rlvr::model::Result<Vec<Row>> {
    let adapters_on = lm.lora.is_some();
    let job = &request.job;
    job.rows
        .iter()
        .zip(&request.completions)
        .map(|((prompt, _), completion)| {
            let completion = completion.clone().expect("every row ended");
            // a streamed request's tokens were scored as they came
            let scores = match job.scoring.filter(|_| job.tokens.is_none()) {
                Some(scoring) => {
                    let whole: Vec<u32> = prompt.iter().chain(&completion.ids).copied().collect();
                    let from = if scoring.prompt { 1 } else { prompt.len() };
                    logprobs::score(&lm.model, &whole, from, scoring.top, adapters_on)?
                }
                None => vec![],
            };
            Ok(Row { completion, scores })
        })
        .collect()
}

/// Whether the text of `ids` now holds one of the `stop` texts. A stop text that was not
/// there before ends in the newest token, and a text of `b` bytes spans at most `b` tokens
/// (plus one cut across its start), so only the last tokens are decoded.
fn ends_with_stop(tokenizer: &Tokenizer, ids: &[u32], stop: &[String]) -> bool {
    let Some(longest) = stop.iter().map(String::len).max() else {
        return false;
    };
    let tail = &ids[ids.len().saturating_sub(longest + 2)..];
    tokenizer
        .decode(tail)
        .is_ok_and(|text| stop.iter().any(|s| text.contains(s.as_str())))
}

/// An HTTP answer: status and JSON body.
type Answer = (u16, Value);

fn handle(mut request: tiny_http::Request, context: &Context, jobs: &Sender<Job>) {
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
fn request_rows(
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

/// A streamed request's replies as the generation thread sends them.
struct Events {
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
fn start_stream(
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
fn stream_events(request: tiny_http::Request, mut events: Events) -> String {
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

/// A client's TCP connection as the kernel's table of sockets (`/proc/net/tcp`, `tcp6`)
/// shows it, so that a request waiting for its rows learns when the client has closed its
/// end (tiny_http hands out no socket to look at). Where there is no such table (not
/// Linux) no client is ever seen to leave, and a client that shuts down only its sending
/// half would be taken as gone.
struct Peer {
    /// The server's port.
    port: u16,
    sockets: Arc<Sockets>,
    /// The client's address as the table writes it, `None` when unknown.
    remote: Option<Vec<String>>,
    /// Whether the connection was found open once (a connection never found is never
    /// taken as gone).
    seen: bool,
}

impl Peer {
    /// How often a waiting request looks.
    const POLL: Duration = Duration::from_millis(500);

    /// The peer of `request` on the server of `context`.
    fn of(request: &tiny_http::Request, context: &Context) -> Self {
        let remote = request.remote_addr().map(|addr| {
            let port = addr.port();
            let words = |octets: &[u8]| -> String {
                (octets.chunks(4))
                    .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                    .collect()
            };
            match addr.ip().to_canonical() {
                std::net::IpAddr::V4(ip) => vec![
                    format!("{}:{port:04X}", words(&ip.octets())),
                    format!("{}:{port:04X}", words(&ip.to_ipv6_mapped().octets())),
                ],
                std::net::IpAddr::V6(ip) => vec![format!("{}:{port:04X}", words(&ip.octets()))],
            }
        });
        Peer {
            port: context.port,
            sockets: context.sockets.clone(),
            remote,
            seen: false,
        }
    }

    /// Whether the client has closed its end: the server's socket to it waits to close
    /// (`CLOSE_WAIT`), or is gone after it was seen open.
    fn left(&mut self) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        let mut state = None;
        let text = self.sockets.read();
        for line in text
            .lines()
            .filter(|l| remote.iter().any(|r| l.contains(r)))
        {
            // sl local_address rem_address st ...
            let fields: Vec<&str> = line.split_whitespace().take(4).collect();
            let [_, local, rem, st] = fields[..] else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(self.port) && remote.iter().any(|r| r == rem) {
                state = u8::from_str_radix(st, 16).ok();
            }
        }
        const CLOSE_WAIT: u8 = 0x08;
        match state {
            Some(CLOSE_WAIT) => true,
            Some(_) => {
                self.seen = true;
                false
            }
            None => self.seen,
        }
    }
}

/// The kernel's tables of TCP sockets (`/proc/net/tcp` and `tcp6`), read at most once per
/// [`Peer::POLL`] however many requests wait: one read costs milliseconds of kernel time on a
/// machine with many sockets, too much to spend for each request.
#[derive(Default)]
struct Sockets(std::sync::Mutex<Option<(Instant, Arc<String>)>>);

impl Sockets {
    /// The tables' text, read again when the last read is older than [`Peer::POLL`].
    fn read(&self) -> Arc<String> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, text)) = cached.as_ref() {
            if at.elapsed() < Peer::POLL {
                return text.clone();
            }
        }
        let mut text = String::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            text += &std::fs::read_to_string(table).unwrap_or_default();
        }
        let text = Arc::new(text);
        *cached = Some((Instant::now(), text.clone()));
        text
    }
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
fn finish_text<'a>(
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
fn error(status: u16, kind: &str, param: Option<&str>, message: &str) -> Answer {
    (
        status,
        json!({"error": {"message": message, "type": kind, "param": param, "code": null}}),
    )
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unit tests run with the binary's process settings and allocator (see [`rlvr::runtime`]).
#[cfg(test)]
mod test_runtime {
    #[global_allocator]
    static ALLOCATOR: rlvr::runtime::Allocator = rlvr::runtime::Allocator;

    #[ctor::ctor(unsafe)]
    fn runtime_settings() {
        rlvr::runtime::init();
    }
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
