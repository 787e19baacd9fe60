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
//! - `routes`: the route table and each route's reply and errors; [`request`]: a request's
//!   body read and checked;
//! - `engine`: the generation thread; `stream`: server-sent events for `stream: true`;
//!   `peer`: whether a waiting request's client has left;
//! - [`logprobs`]: token scores in OpenAI's shapes; [`lora`]: vLLM's runtime LoRA routes.
//!
//! A prompt is refused (HTTP 400, `context_length_exceeded`) when it does not fit the
//! model's context: by its length in bytes before it is tokenized when it is longer than
//! the context's tokens can spell, else by its token count.
//!
//! Each HTTP request is read and tokenized on its own thread; one generation thread owns
//! the model and runs every request's rows (every prompt × `n`, each with its own sampling
//! and stop texts) in one continuous batch ([`engine`]): a request joins the running
//! batch at the next step, as soon as slots are free, and is answered when its last row
//! ends, so concurrent clients share decoding steps and a short request does not wait for a
//! long one to finish. A request whose client leaves (a failed write to its stream, or its
//! connection seen closed in the kernel's table of sockets while it waits) has its rows, and
//! only those, ended before the next step.

mod engine;
pub mod logprobs;
pub mod lora;
mod peer;
pub mod request;
mod routes;
mod stream;

use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rlvr::model::lm::LanguageModel;
use rlvr::model::tokenizer::Tokenizer;
use serde_json::json;
use tiny_http::Server;

use engine::{run_engine, Job};
use lora::Adapters;
use peer::Sockets;
use routes::handle;

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
