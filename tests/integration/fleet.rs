//! Serving adapters at runtime, with real `rlvr serve` processes on the tiny Gemma 3:
//! vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` with their replies and
//! errors, a request naming a loaded adapter answered by it (log-probabilities equal to the
//! local model with that adapter).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};
use rlvr::model::lm::LanguageModel;
use rlvr::model::lora::{self, LoraConfig};
use serde_json::{json, Value};

use crate::serve::{local, Served};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-fleet-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A raw HTTP exchange with `served`: the status, the `Content-Type` and the body as text.
fn exchange(served: &Served, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let address = served
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let kind = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, kind, body.to_string())
}

fn post(served: &Served, path: &str, body: Value) -> (u16, String, String) {
    exchange(served, "POST", path, &body.to_string())
}

/// A vLLM error reply: its status, `type` and message.
fn failure(reply: (u16, String, String)) -> (u16, String, String) {
    let (status, kind, body) = reply;
    assert!(kind.starts_with("application/json"), "{kind}: {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], status, "{body}");
    (
        status,
        body["error"]["type"].as_str().unwrap().to_string(),
        body["error"]["message"].as_str().unwrap().to_string(),
    )
}

/// A LoRA policy of the tiny model with random (non-zero) `B` matrices, saved in PEFT's
/// format to `dir`.
fn save_random_adapter(dir: &Path, seed: u64) {
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        seed,
        ..LoraConfig::default()
    };
    let mut policy = local().with_lora(&config).unwrap();
    for (name, var) in lora::variables(&mut policy.model) {
        if name.contains("lora_B") {
            let t = var.as_tensor();
            let noise = Tensor::randn(0f32, 0.5, t.dims(), t.device()).unwrap();
            var.set(&noise).unwrap();
        }
    }
    policy.save_adapter(dir).unwrap();
}

/// Log p(token t | tokens before) under `lm`, for t ≥ 1.
fn local_logprobs(lm: &LanguageModel, ids: &[u32]) -> Vec<f64> {
    let logits = lm.model.logits(&[ids.to_vec()], lm.lora.is_some()).unwrap();
    let rows: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    (1..ids.len())
        .map(|t| rows[t - 1][ids[t] as usize] as f64)
        .collect()
}

/// The echoed log-probabilities of `text` as `model` on `served` scores them.
fn served_logprobs(served: &Served, model: &str, text: &str) -> (String, Vec<f64>) {
    let (status, _, body) = post(
        served,
        "/v1/completions",
        json!({"model": model, "prompt": text, "echo": true, "logprobs": 0, "max_tokens": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let values = body["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|v| v.as_f64().unwrap())
        .collect();
    (body["model"].as_str().unwrap().to_string(), values)
}

fn greedy_text(served: &Served, model: &str, prompt: &str) -> String {
    let (status, _, body) = post(
        served,
        "/v1/completions",
        json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["choices"][0]["text"].as_str().unwrap().to_string()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
}

#[test]
fn runtime_lora_adapters_load_answer_and_unload_as_vllms_do() {
    let dir = scratch("adapters");
    let (first, second) = (dir.join("first"), dir.join("second"));
    save_random_adapter(&first, 1);
    save_random_adapter(&second, 2);
    let served = Served::start(&["--enable-lora"], &[]);
    let load = |name: &str, path: &Path, inplace: bool| {
        post(
            &served,
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": path, "load_inplace": inplace}),
        )
    };

    let (status, kind, body) = load("policy", &first, false);
    assert_eq!(status, 200, "{body}");
    assert!(kind.starts_with("text/plain"), "{kind}");
    assert_eq!(body, "Success: LoRA adapter 'policy' added successfully.");
    let (_, _, models) = exchange(&served, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&models).unwrap();
    let cards = models["data"].as_array().unwrap();
    assert_eq!(cards.len(), 2, "{models}");
    assert_eq!(cards[0]["id"], "tiny");
    assert_eq!(cards[1]["id"], "policy");
    assert_eq!(cards[1]["parent"], "tiny");
    assert_eq!(cards[1]["root"], first.to_str().unwrap());

    // the adapter answers requests that name it, with the local adapter's log-probabilities
    let text = "The patient has a fever and a cough";
    let tuned = local().load_adapter(&first).unwrap();
    let ids = tuned.tokenizer.encode(text).unwrap();
    let (model, served_tuned) = served_logprobs(&served, "policy", text);
    assert_eq!(model, "policy");
    assert!(
        close(&served_tuned, &local_logprobs(&tuned, &ids)),
        "{served_tuned:?}"
    );
    let (model, served_base) = served_logprobs(&served, "tiny", text);
    assert_eq!(model, "tiny");
    assert!(close(&served_base, &local_logprobs(&local(), &ids)));
    assert!(
        !close(&served_base, &served_tuned),
        "the adapter changes the model"
    );
    let prompt = "The patient";
    let sampling = rlvr::model::generate::Sampling {
        max_tokens: 12,
        temperature: 0.0,
        ..Default::default()
    };
    let expected = tuned
        .generate(&[prompt.to_string()], &sampling, &mut |_| true)
        .unwrap();
    assert_eq!(greedy_text(&served, "policy", prompt), expected[0].text);

    // a name loaded twice, unless in place
    let (status, kind, message) = failure(load("policy", &second, false));
    assert_eq!((status, kind.as_str()), (400, "InvalidUserInput"));
    assert!(message.contains("has already been loaded"), "{message}");
    let (status, _, body) = load("policy", &second, true);
    assert_eq!(status, 200, "{body}");
    let other = local().load_adapter(&second).unwrap();
    let (_, replaced) = served_logprobs(&served, "policy", text);
    assert!(close(&replaced, &local_logprobs(&other, &ids)));

    // vLLM's errors
    let (status, kind, message) = failure(post(
        &served,
        "/v1/load_lora_adapter",
        json!({"lora_name": "x"}),
    ));
    assert_eq!((status, kind.as_str()), (400, "InvalidUserInput"));
    assert_eq!(
        message,
        "Both 'lora_name' and 'lora_path' must be provided."
    );
    let (status, kind, message) = failure(load("x", &dir.join("missing"), false));
    assert_eq!((status, kind.as_str()), (404, "NotFoundError"));
    assert!(message.contains("No adapter found"), "{message}");
    let dora = dir.join("dora");
    std::fs::create_dir_all(&dora).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("adapter_config.json")).unwrap())
            .unwrap();
    config["use_dora"] = json!(true);
    std::fs::write(dora.join("adapter_config.json"), config.to_string()).unwrap();
    let (status, kind, message) = failure(load("dora", &dora, false));
    assert_eq!((status, kind.as_str()), (400, "BadRequestError"));
    assert!(message.contains("use_dora"), "{message}");
    let (status, kind, message) = failure(post(
        &served,
        "/v1/unload_lora_adapter",
        json!({"lora_name": "nowhere"}),
    ));
    assert_eq!((status, kind.as_str()), (404, "NotFoundError"));
    assert_eq!(message, "The lora adapter 'nowhere' cannot be found.");

    // unloaded, the name is the served model again
    let (status, _, body) = post(
        &served,
        "/v1/unload_lora_adapter",
        json!({"lora_name": "policy"}),
    );
    assert_eq!(
        (status, body.as_str()),
        (200, "Success: LoRA adapter 'policy' removed successfully.")
    );
    let (model, after) = served_logprobs(&served, "policy", text);
    assert_eq!(model, "tiny");
    assert!(close(&after, &served_base));
    let (_, _, models) = exchange(&served, "GET", "/v1/models", "");
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn lora_routes_need_enable_lora_and_modules_load_at_start() {
    let dir = scratch("modules");
    save_random_adapter(&dir, 3);
    let plain = Served::start(&[], &[]);
    let (status, kind, message) = failure(post(
        &plain,
        "/v1/load_lora_adapter",
        json!({"lora_name": "a", "lora_path": dir}),
    ));
    assert_eq!((status, kind.as_str()), (404, "NotFoundError"));
    assert!(message.contains("--enable-lora"), "{message}");

    let module = format!("sql={}", dir.display());
    let served = Served::start(&["--enable-lora", "--lora-modules", &module], &[]);
    let text = "The patient has a fever";
    let tuned = local().load_adapter(&dir).unwrap();
    let ids = tuned.tokenizer.encode(text).unwrap();
    let (model, values) = served_logprobs(&served, "sql", text);
    assert_eq!(model, "sql");
    assert!(close(&values, &local_logprobs(&tuned, &ids)));
}
