//! Using an OpenAI-compatible server from Rust as a judge would: four samples of every
//! question, each reply appended to a JSON Lines file the moment it arrives, so that a run
//! stopped halfway keeps what it received.
//!
//! Start a server (`rlvr serve --model M --port 8000`, vLLM, llama.cpp), then from the
//! repository root: `cargo run --example endpoint -- http://127.0.0.1:8000/v1 MODEL out.jsonl`

use std::io::Write;

use rlvr::endpoint::{ChatRequest, Endpoint, EndpointOptions, RequestParams};
use rlvr::model::chat::Message;
use rlvr::progress::Job;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rlvr::runtime::init();
    let args: Vec<String> = std::env::args().collect();
    let [_, url, model, out] = &args[..] else {
        return Err("usage: endpoint URL MODEL OUT.jsonl".into());
    };
    let judge = Endpoint::new(url, model, EndpointOptions::default())?;
    let questions = [
        "What causes iron-deficiency anaemia? Answer in one sentence.",
        "Which vitamin deficiency causes scurvy? Answer in one word.",
        "What is 12 times 7? Answer with the number.",
    ];
    let params = RequestParams {
        max_tokens: 64,
        temperature: 0.7,
        n: 4,
        seed: Some(42),
        ..RequestParams::default()
    };
    let requests: Vec<ChatRequest> = questions
        .iter()
        .map(|q| ChatRequest {
            messages: vec![Message::new("user", q)],
            params: params.clone(),
        })
        .collect();
    let mut file = std::fs::File::create(out)?;
    let results = judge.chat(&requests, &Job::silent(), &mut |i, result| {
        let line = match result {
            Ok(reply) => serde_json::json!({"question": questions[i], "responses": reply.texts}),
            Err(e) => serde_json::json!({"question": questions[i], "error": e.to_string()}),
        };
        let _ = writeln!(file, "{line}");
    });
    let failed = results.iter().filter(|r| r.is_err()).count();
    let usage = judge.usage();
    println!(
        "{} replies, {failed} failed; {} requests ({} retries), {} completion tokens",
        results.len() - failed,
        usage.requests,
        usage.retries,
        usage.completion_tokens
    );
    Ok(())
}
