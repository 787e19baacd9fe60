//! Serving adapters at runtime and spreading a study over several servers, with real
//! `rlvr serve` processes on the tiny Gemma 3: vLLM's `/v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter` with their replies and errors, a request naming a loaded
//! adapter answered by it (log-probabilities equal to the local model with that adapter),
//! and judging and evaluation over two servers, one of them killed mid-run, giving the
//! tables one server gives with every response cached once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Tensor, D};
use polars::prelude::*;
use rlvr::data::question::Question;
use rlvr::data::{self, LoadOptions};
use rlvr::endpoint::{Endpoint, EndpointOptions, Fleet};
use rlvr::eval::preset::Mode;
use rlvr::eval::{self, EvalOptions};
use rlvr::grpo::optim::Schedule;
use rlvr::grpo::{self, served, GrpoConfig};
use rlvr::judge::{self, JudgeConfig};
use rlvr::model::lm::LanguageModel;
use rlvr::model::lora::{self, LoraConfig};
use rlvr::progress::{Cancel, Job, Progress};
use rlvr::prompt::PromptTemplate;
use rlvr::reward::Reward;
use serde_json::{json, Value};

use crate::endpoint::{Action, FaultServer};
use crate::serve::{local, Served};
use crate::{kill_when, repo, tiny_policy};

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
            rlvr::model::lora::set(&var, &noise).unwrap();
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

fn load(kind: &str, split: &str, n: usize) -> DataFrame {
    let options = LoadOptions {
        split: Some(split.into()),
        ..LoadOptions::default()
    };
    data::load(kind, &repo(&format!("data/samples/{kind}")), &options)
        .unwrap()
        .head(Some(n))
}

/// A client of `served` that sends one request at a time (so the server runs each alone
/// and sampling is bit-identical whichever server answers) and gives up quickly on a
/// dead server.
fn one_at_a_time(served: &Served) -> Endpoint {
    let options = EndpointOptions {
        concurrency: 1,
        retries: 1,
        backoff: Duration::from_millis(20),
        timeout: Duration::from_secs(60),
        ..EndpointOptions::default()
    };
    Endpoint::new(&served.url, "tiny", options).unwrap()
}

/// The lines of the one cache file under `dir`.
fn cache_lines(dir: &Path) -> Vec<Value> {
    let mut lines = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return lines;
    };
    for entry in entries {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        lines.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .filter_map(|l| serde_json::from_str(l).ok()),
        );
    }
    lines
}

const SERVE_ARGS: [&str; 2] = ["--max-model-len", "4096"];

#[test]
fn judging_over_two_servers_one_killed_gives_one_servers_table() {
    let items = load("medqa", "test", 12);
    let mut config = JudgeConfig {
        samples: 3,
        batch: 64,
        seed: 5,
        cache_dir: scratch("judge-one"),
        ..JudgeConfig::default()
    };
    config.sampling.max_tokens = 24;
    config.sampling.temperature = 1.0;
    let alone = Served::start(&SERVE_ARGS, &[]);
    let reference = judge::judge(&one_at_a_time(&alone), &items, &config, &Job::silent()).unwrap();
    drop(alone);

    config.cache_dir = scratch("judge-fleet");
    let cache = config.cache_dir.join("judge");
    let first = Served::start(&SERVE_ARGS, &[]);
    let mut second = Served::start(&SERVE_ARGS, &[]);
    let fleet = Fleet::new(vec![one_at_a_time(&first), one_at_a_time(&second)]).unwrap();
    let total = items.height() * config.samples;
    let spread = std::thread::scope(|scope| {
        let running = scope.spawn(|| judge::judge(&fleet, &items, &config, &Job::silent()));
        // the second server dies with a third of the responses in
        kill_when(&mut second.child, || cache_lines(&cache).len() >= total / 3);
        running.join().unwrap().unwrap()
    });
    assert_eq!(fleet.down(), [second.url.clone()], "it died mid-run");
    let without_judge = |df: &DataFrame| df.drop("judge").unwrap();
    assert!(
        without_judge(&reference).equals_missing(&without_judge(&spread)),
        "{reference}\n{spread}"
    );
    // every response cached exactly once
    let lines = cache_lines(&cache);
    assert_eq!(lines.len(), total);
    let mut keys: Vec<(String, u64)> = lines
        .iter()
        .map(|l| (l["id"].to_string(), l["sample"].as_u64().unwrap()))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), total, "nothing judged twice");
    // the samples differ: the seeds reached the servers
    let responses = spread.column("responses").unwrap().list().unwrap().clone();
    assert!(responses.get_as_series(0).unwrap().n_unique().unwrap() > 1);
}

#[test]
fn evaluating_over_two_servers_one_killed_gives_one_servers_results() {
    let items = load("mmlu", "test", 24);
    let options = EvalOptions {
        mode: Some(Mode::Generate),
        preset: Some("study".into()),
        max_tokens: Some(16),
        temperature: 1.0,
        seed: 9,
        batch: Some(8),
        cache_dir: Some(scratch("eval-one")),
        ..EvalOptions::default()
    };
    let alone = Served::start(&SERVE_ARGS, &[]);
    let reference =
        eval::evaluate(&one_at_a_time(&alone), &items, &options, &Job::silent()).unwrap();
    drop(alone);

    let cache = scratch("eval-fleet");
    let options = EvalOptions {
        cache_dir: Some(cache.clone()),
        ..options
    };
    let first = Served::start(&SERVE_ARGS, &[]);
    let mut second = Served::start(&SERVE_ARGS, &[]);
    let fleet = Fleet::new(vec![one_at_a_time(&first), one_at_a_time(&second)]).unwrap();
    let spread = std::thread::scope(|scope| {
        let running = scope.spawn(|| eval::evaluate(&fleet, &items, &options, &Job::silent()));
        // killed once the first batch is in
        kill_when(&mut second.child, || !cache_lines(&cache).is_empty());
        running.join().unwrap().unwrap()
    });
    assert_eq!(fleet.down(), [second.url.clone()], "it died mid-run");
    assert!(reference.equals_missing(&spread), "{reference}\n{spread}");
    assert_eq!(cache_lines(&cache).len(), items.height());
}

#[test]
fn scripts_judge_and_evaluate_over_an_array_of_endpoints() {
    let (first, second) = (
        Served::start(&SERVE_ARGS, &[]),
        Served::start(&SERVE_ARGS, &[]),
    );
    let urls = format!("urls={},{}", first.url, second.url);
    let home = scratch("script-home");
    let out = crate::rlvr(&["run", "tests/scripts/fleet.rhai", "--set", &urls])
        .env("RLVR_HOME", &home)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("judged: 4 rows, 4 response lists"),
        "{stdout}"
    );
    assert!(stdout.contains("evaluated: 6 rows, model tiny"), "{stdout}");
    assert!(
        stdout.contains("element 1 of the servers is a i64, not an endpoint"),
        "{stdout}"
    );
    assert!(
        stdout.contains("serves model `another`") && stdout.contains("servers of one model"),
        "{stdout}"
    );
    // every response went into the judge's one cache
    assert_eq!(cache_lines(&home.join("cache/judge")).len(), 8);
}

fn toy_items() -> Vec<Question> {
    [
        "Say something.",
        "Write a word.",
        "Count to three.",
        "Name a colour.",
    ]
    .iter()
    .enumerate()
    .map(|(i, q)| Question {
        id: format!("toy/{i}"),
        question: q.to_string(),
        answer: "x".into(),
        ..Question::default()
    })
    .collect()
}

#[test]
fn grpo_sampling_in_a_second_process_ends_with_the_local_runs_adapter() {
    let items = toy_items();
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        let n = s.completion.chars().count().max(1) as f64;
        Ok(s.completion
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .count() as f64
            / n)
    })];
    let mut config = GrpoConfig {
        group: 4,
        batch: 4,
        grad_accum: 1,
        steps: 3,
        lr: 2e-2,
        schedule: Schedule::Constant,
        template: PromptTemplate {
            system: None,
            user: "{question}".into(),
        },
        cache_dir: scratch("grpo-local"),
        ..GrpoConfig::default()
    };
    config.sampling.max_tokens = 8;
    let mut here = tiny_policy(1);
    let local = grpo::train(&mut here, &items, &rewards, &config, &Job::silent()).unwrap();

    let server = Served::start(&["--enable-lora"], &[]);
    // the server's log-probs differ from the trainer's in the 6th digit: without the
    // mismatch correction the two runs train on the same numbers
    let corrected = config.clone();
    config.vllm_importance_sampling_correction = false;
    config.cache_dir = scratch("grpo-served");
    let mut there = tiny_policy(1);
    let mut rollouts = served::Served::new(server.client(), scratch("grpo-adapters"), "policy");
    let served = grpo::train_with(
        &mut there,
        &items,
        &rewards,
        &config,
        &mut rollouts,
        &Job::silent(),
    )
    .unwrap();
    // the server sampled what the policy samples in process (each row with its own seed)
    let sampled = |run: &rlvr::grpo::GrpoRun| {
        run.completions
            .select(["step", "id", "completion", "reward", "advantage"])
            .unwrap()
    };
    assert!(
        sampled(&local).equals_missing(&sampled(&served)),
        "{}\n{}",
        local.completions,
        served.completions
    );
    // and the trainer learnt the same adapter from it
    let (a, b) = (
        lora::variables(&mut here.model),
        lora::variables(&mut there.model),
    );
    assert_eq!(a.len(), b.len());
    let moved = a
        .iter()
        .map(|(_, v)| crate::max_abs(v.as_tensor()))
        .fold(0f32, f32::max);
    assert!(moved > 0.0);
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let d = crate::max_abs_diff(x.as_tensor(), y.as_tensor());
        assert!(d < 1e-6, "{name}: {d}");
    }
    // the server's log-probabilities are the trainer's
    assert_eq!(rollouts.mismatch.len(), 3);
    for m in &rollouts.mismatch {
        assert!(m.tokens > 0 && m.max_abs < 1e-4, "{m:?}");
    }
    // with the correction (TRL's default) the server's log-probs enter the loss: the
    // measured mismatch is in the metrics, and the ratios, within 1e-4 of 1, leave the
    // adapter close to the uncorrected run's
    let mut config = corrected;
    config.cache_dir = scratch("grpo-served-corrected");
    let mut third = tiny_policy(1);
    let mut again = served::Served::new(server.client(), scratch("grpo-adapters-2"), "again");
    let run = grpo::train_with(
        &mut third,
        &items,
        &rewards,
        &config,
        &mut again,
        &Job::silent(),
    )
    .unwrap();
    let mismatch: Vec<f64> = run
        .metrics
        .column("logp_mismatch")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert!(
        mismatch.iter().all(|&m| m > 0.0 && m < 1e-4),
        "{mismatch:?}"
    );
    // Adam divides each gradient by its own running size, so a parameter whose gradient
    // nearly cancels moves by a visible part of a step on a 1e-7 change of the ratios: the
    // adapter is compared with how far training moved it
    let c = lora::variables(&mut third.model);
    for ((name, x), (_, y)) in a.iter().zip(&c) {
        let d = crate::max_abs_diff(x.as_tensor(), y.as_tensor());
        assert!(
            d < 1e-2 * moved,
            "{name}: {d}, moved {moved}, mismatch {mismatch:?}"
        );
    }
    again.finish().unwrap();
    // one adapter was live at a time, and none is left
    rollouts.finish().unwrap();
    let (_, _, models) = exchange(&server, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
}

/// Cancels the run once `after` steps are done.
struct CancelAfter {
    after: u64,
    cancel: Cancel,
}

impl Progress for CancelAfter {
    fn start(&self, _: &str, _: u64) {}
    fn update(&self, done: u64, _: &str) {
        if done >= self.after {
            self.cancel.cancel();
        }
    }
    fn finish(&self, _: &str) {}
}

fn staleness_of(run: &rlvr::grpo::GrpoRun) -> Vec<u32> {
    run.metrics
        .column("staleness")
        .unwrap()
        .u32()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

/// With `max_staleness` 1 the server samples a step ahead with the policy one step back
/// (steps 1 and 2 by the starting adapter, step 3 by the one after step 1), the metrics say
/// so, and the run is a function of its settings: a second run, stopped after a step (its
/// sampling ahead stopped with it) and resumed with a fresh server connection, samples the
/// same completions and ends with the same adapter.
#[test]
fn grpo_with_max_staleness_samples_ahead_and_resumes_exactly() {
    let items = toy_items();
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        let n = s.completion.chars().count().max(1) as f64;
        Ok(s.completion
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .count() as f64
            / n)
    })];
    let mut config = GrpoConfig {
        group: 4,
        batch: 4,
        grad_accum: 1,
        steps: 3,
        lr: 2e-2,
        schedule: Schedule::Constant,
        max_staleness: 1,
        template: PromptTemplate {
            system: None,
            user: "{question}".into(),
        },
        cache_dir: scratch("stale-whole"),
        ..GrpoConfig::default()
    };
    config.sampling.max_tokens = 8;
    let server = Served::start(&["--enable-lora"], &[]);

    let mut whole = tiny_policy(1);
    let mut rollouts = served::Served::new(server.client(), scratch("stale-adapters"), "p");
    let uninterrupted = grpo::train_with(
        &mut whole,
        &items,
        &rewards,
        &config,
        &mut rollouts,
        &Job::silent(),
    )
    .unwrap();
    rollouts.finish().unwrap();
    let by: Vec<(usize, &str)> = rollouts
        .sampled_by
        .iter()
        .map(|(step, name)| (*step, name.as_str()))
        .collect();
    assert_eq!(by, [(1, "p-step0"), (2, "p-step0"), (3, "p-step1")]);
    assert_eq!(staleness_of(&uninterrupted), [0, 1, 1]);
    // stale rollouts are measured against the trainer's policy as it is: from step 2 on
    // the mismatch holds a step of training
    let mismatch: Vec<f64> = rollouts.mismatch.iter().map(|m| m.mean_abs).collect();
    assert!(mismatch[0] < 1e-4 && mismatch[1] > 1e-4, "{mismatch:?}");
    let moved = lora::variables(&mut whole.model)
        .iter()
        .map(|(_, v)| crate::max_abs(v.as_tensor()))
        .fold(0f32, f32::max);
    assert!(moved > 0.0);

    config.cache_dir = scratch("stale-split");
    let cancel = Cancel::new();
    let job = Job {
        progress: Arc::new(CancelAfter {
            after: 1,
            cancel: cancel.clone(),
        }),
        cancel,
    };
    let mut first = tiny_policy(1);
    let mut rollouts = served::Served::new(server.client(), scratch("stale-adapters-2"), "q");
    match grpo::train_with(&mut first, &items, &rewards, &config, &mut rollouts, &job) {
        Err(grpo::GrpoError::Interrupted { step, .. }) => assert_eq!(step, 1),
        other => panic!("expected an interruption, got {other:?}"),
    }
    rollouts.finish().unwrap();
    let mut second = tiny_policy(1);
    let mut rollouts = served::Served::new(server.client(), scratch("stale-adapters-3"), "r");
    let resumed = grpo::train_with(
        &mut second,
        &items,
        &rewards,
        &config,
        &mut rollouts,
        &Job::silent(),
    )
    .unwrap();
    rollouts.finish().unwrap();
    assert_eq!(resumed.resumed_from, 1);
    // step 2 is sampled by the starting adapter, kept in the checkpoint
    let by: Vec<(usize, &str)> = rollouts
        .sampled_by
        .iter()
        .map(|(step, name)| (*step, name.as_str()))
        .collect();
    assert_eq!(by, [(2, "r-step0"), (3, "r-step1")]);
    let sampled = |run: &rlvr::grpo::GrpoRun| {
        run.completions
            .select(["step", "id", "completion", "reward", "advantage"])
            .unwrap()
    };
    assert!(
        sampled(&uninterrupted).equals_missing(&sampled(&resumed)),
        "{}\n{}",
        uninterrupted.completions,
        resumed.completions
    );
    assert_eq!(staleness_of(&resumed), [0, 1, 1]);
    let (a, b) = (
        lora::variables(&mut whole.model),
        lora::variables(&mut second.model),
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let d = crate::max_abs_diff(x.as_tensor(), y.as_tensor());
        assert!(d < 1e-6, "{name}: {d}");
    }
    // every adapter was unloaded
    let (_, _, models) = exchange(&server, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
}

/// What a rollout server is asked, in order, with `max_staleness` 2 over 5 steps of 4
/// completions (a scripted server that answers three fixed tokens): step n is sampled by
/// the adapter of step max(0, n − 1 − 2) (1-based n), each adapter is loaded before its
/// first use and unloaded only after its last, and at most three are loaded at once.
#[test]
fn stale_steps_ask_the_server_for_the_adapter_s_steps_back() {
    let server = FaultServer::start(|_, seen| {
        if !seen.path.ends_with("/completions") {
            return Action::Reply(200, vec![], "Success".into());
        }
        let seed = seen.body["seed"].as_u64().unwrap();
        let reply = json!({"choices": [{"text": "", "finish_reason": "length", "logprobs": {
            "tokens": [format!("token_id:{}", 40 + seed % 50), "token_id:41", "token_id:42"],
            "token_logprobs": [-1.0, -2.0, -3.0]}}]});
        Action::Reply(200, vec![], reply.to_string())
    });
    let mut config = GrpoConfig {
        group: 4,
        batch: 4,
        steps: 5,
        lr: 1e-2,
        max_staleness: 2,
        vllm_importance_sampling_correction: false,
        cache_dir: scratch("stale-scripted"),
        ..GrpoConfig::default()
    };
    config.sampling.max_tokens = 3;
    let rewards = [Reward::custom("first", 1.0, |s| {
        Ok(s.completion.len() as f64)
    })];
    let endpoint = Endpoint::new(&server.url, "tiny", EndpointOptions::default()).unwrap();
    let mut rollouts = served::Served::new(endpoint, scratch("stale-scripted-adapters"), "s");
    let mut policy = tiny_policy(2);
    let run = grpo::train_with(
        &mut policy,
        &toy_items(),
        &rewards,
        &config,
        &mut rollouts,
        &Job::silent(),
    )
    .unwrap();
    rollouts.finish().unwrap();
    assert_eq!(staleness_of(&run), [0, 1, 2, 2, 2]);

    let mut loaded: Vec<String> = vec![];
    let mut most = 0;
    let mut completions = 0usize;
    for seen in server.seen() {
        let name = |key: &str| seen.body[key].as_str().unwrap().to_string();
        if seen.path.ends_with("/load_lora_adapter") {
            loaded.push(name("lora_name"));
            most = most.max(loaded.len());
        } else if seen.path.ends_with("/unload_lora_adapter") {
            let gone = name("lora_name");
            assert!(
                loaded.contains(&gone),
                "{gone} unloaded twice or never loaded"
            );
            // no later request samples with it
            loaded.retain(|n| *n != gone);
        } else {
            let step = completions / 4 + 1;
            let model = name("model");
            assert_eq!(
                model,
                format!("s-step{}", step.saturating_sub(3)),
                "step {step}"
            );
            assert!(
                loaded.contains(&model),
                "step {step}: {model} is not loaded"
            );
            completions += 1;
        }
    }
    assert_eq!(completions, 5 * 4);
    assert!(loaded.is_empty(), "left loaded: {loaded:?}");
    assert!(most <= 3, "{most} adapters loaded at once");
}

#[test]
fn scripts_train_with_rollouts_from_a_server() {
    let server = Served::start(&["--enable-lora", "--max-model-len", "4096"], &[]);
    let url = format!("url={}", server.url);
    let home = scratch("grpo-script-home");
    let out = crate::rlvr(&["run", "tests/scripts/grpo_rollout.rhai", "--set", &url])
        .env("RLVR_HOME", &home)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("trained alike"), "{stdout}");
    // the measured mismatch, printed per step
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("rollout log-prob mismatch"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("step 1: "), "{stdout}");
}
