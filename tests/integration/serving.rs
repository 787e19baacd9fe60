//! Servers as first-class judges and evaluation backends. Against `rlvr serve` on the tiny
//! Gemma 3 (a child process on 127.0.0.1): `/v1/completions` echoes prompts with the local
//! model's own log-probabilities, also for lm-eval's `local-completions` payloads; judging
//! through it gives the local judge's Judged table; `evaluate` through it gives the local
//! backend's Results in loglik and generate modes. Against the fault-injecting server: an
//! evaluation survives 429s, 5xx and dropped connections, a dead server costs only the
//! batch in flight and a rerun resumes from the cache, a process killed with SIGKILL resumes
//! too, and a server without prompt log-probabilities gets a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::D;
use polars::prelude::*;
use rlvr::data::{self, LoadOptions};
use rlvr::endpoint::{Endpoint, EndpointOptions};
use rlvr::eval::preset::Mode;
use rlvr::eval::{self, Backend, Choices, EvalOptions, LocalModel};
use rlvr::judge::{self, JudgeConfig};
use rlvr::progress::Job;
use serde_json::{json, Value};

use crate::endpoint::{Action, FaultServer, Seen};
use crate::repo;
use crate::serve::{local, Served};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-serving-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
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

/// A POST to `rlvr serve` that must succeed.
fn post(served: &Served, path: &str, body: Value) -> Value {
    let (status, reply) = served.http("POST", path, &body.to_string(), "");
    assert_eq!(status, 200, "{body} → {reply}");
    reply
}

fn floats(values: &Value) -> Vec<Option<f64>> {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect()
}

#[test]
fn echoed_log_probabilities_equal_the_local_models() {
    let served = Served::start(&[], &[]);
    let lm = local();
    let prompt = "The patient has a fever and";
    let ids = lm.tokenizer.encode(prompt).unwrap();
    // the local model's log-softmax at every position
    let logits = lm.model.logits(std::slice::from_ref(&ids), false).unwrap();
    let local: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();

    // score only: the prompt echoed, nothing generated
    let reply = post(
        &served,
        "/v1/completions",
        json!({"prompt": prompt, "echo": true, "logprobs": 3, "max_tokens": 0}),
    );
    let choice = &reply["choices"][0];
    assert_eq!(choice["text"], prompt);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(reply["usage"]["completion_tokens"], 0);
    assert_eq!(reply["usage"]["prompt_tokens"], ids.len());
    let logprobs = &choice["logprobs"];
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), ids.len());
    assert_eq!(tokens.concat(), lm.tokenizer.decode(&ids).unwrap());
    let offsets: Vec<u64> = logprobs["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let mut at = 0;
    for (token, offset) in tokens.iter().zip(&offsets) {
        assert_eq!(*offset, at);
        at += token.chars().count() as u64;
    }
    let values = floats(&logprobs["token_logprobs"]);
    assert_eq!(values[0], None, "the first token has no context");
    assert!(logprobs["top_logprobs"][0].is_null());
    for t in 1..ids.len() {
        let expected = local[t - 1][ids[t] as usize] as f64;
        let got = values[t].unwrap();
        assert!(
            (got - expected).abs() < 1e-4,
            "token {t}: {got} vs {expected}"
        );
        // the alternatives: the three most likely, and the chosen token where it is not one
        let top = logprobs["top_logprobs"][t].as_object().unwrap();
        let best = local[t - 1].iter().copied().fold(f32::MIN, f32::max) as f64;
        let listed = top.values().map(|v| v.as_f64().unwrap());
        assert!((listed.clone().fold(f64::MIN, f64::max) - best).abs() < 1e-4);
        assert!((3..=4).contains(&top.len()), "{top:?}");
        assert!(listed.clone().any(|v| (v - expected).abs() < 1e-4));
    }

    // a greedy sample's own log-probabilities, without the prompt
    let reply = post(
        &served,
        "/v1/completions",
        json!({"prompt": prompt, "logprobs": 0, "max_tokens": 5, "temperature": 0}),
    );
    let choice = &reply["choices"][0];
    let generated = lm
        .generate(
            &[prompt.to_string()],
            &rlvr::model::generate::Sampling {
                max_tokens: 5,
                temperature: 0.0,
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap()
        .remove(0);
    assert_eq!(choice["text"], generated.text.as_str());
    let values = floats(&choice["logprobs"]["token_logprobs"]);
    assert_eq!(values.len(), generated.completion.ids.len());
    let per_token = lm
        .model
        .completion_logprobs(&ids, &generated.completion.ids, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (got, expected) in values.iter().zip(per_token) {
        assert!((got.unwrap() - expected as f64).abs() < 1e-4);
    }
    // greedy: each chosen token is the most likely one
    for (t, top) in choice["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let best = top
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(Some(best), values[t]);
    }
}

#[test]
fn lm_eval_local_completions_requests_score_as_the_local_backend() {
    // lm-eval's local-completions: context + continuation as token ids (its `_encode_pair`),
    // `echo: true, logprobs: 1, max_tokens: 1`, and the log-likelihood is
    // sum(token_logprobs[ctxlen:-1]); is_greedy compares each with max(top_logprobs)
    let served = Served::start(&[], &[]);
    let lm = local();
    let backend = LocalModel::new(&lm).unwrap();
    let context = "Question: Which organ pumps blood?\nA. Liver\nB. Heart\nAnswer:";
    let options = [" A", " B"];
    let local = backend
        .loglik(
            &[Choices {
                context: context.into(),
                continuations: options.iter().map(|o| o.to_string()).collect(),
            }],
            &Job::silent(),
        )
        .unwrap()
        .remove(0);
    let context_enc = lm.tokenizer.encode(context).unwrap();
    let wholes: Vec<Vec<u32>> = options
        .iter()
        .map(|o| lm.tokenizer.encode(&format!("{context}{o}")).unwrap())
        .collect();
    let reply = post(
        &served,
        "/v1/completions",
        json!({"model": "tiny", "prompt": wholes, "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": true}),
    );
    let mut choices = reply["choices"].as_array().unwrap().clone();
    choices.sort_by_key(|c| c["index"].as_u64());
    assert_eq!(choices.len(), 2);
    for (k, choice) in choices.iter().enumerate() {
        let values = floats(&choice["logprobs"]["token_logprobs"]);
        assert_eq!(
            values.len(),
            wholes[k].len() + 1,
            "the prompt and one new token"
        );
        let ctxlen = context_enc.len();
        let scored = &values[ctxlen..values.len() - 1];
        let loglik: f64 = scored.iter().map(|v| v.unwrap()).sum();
        assert!(
            (loglik - local.logprobs[k]).abs() < 1e-4,
            "{}: {loglik} vs {}",
            options[k],
            local.logprobs[k]
        );
        let tops = choice["logprobs"]["top_logprobs"].as_array().unwrap();
        for (value, top) in scored.iter().zip(&tops[ctxlen..tops.len() - 1]) {
            let best = top
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!(best >= value.unwrap());
        }
    }
}

/// The Judged table without its `judge` column (the judge's name differs by backend).
fn verdicts(judged: &DataFrame) -> DataFrame {
    judged.drop("judge").unwrap()
}

fn judge_through(served: &Served, concurrency: usize) -> Endpoint {
    let options = EndpointOptions {
        concurrency,
        retries: 0,
        ..EndpointOptions::default()
    };
    Endpoint::new(&served.url, "tiny", options).unwrap()
}

#[test]
fn judging_through_rlvr_serve_equals_the_local_judge() {
    // the tiny fixture's context is 128 tokens; the study's prompts are longer
    let served = Served::start(&["--max-batch", "16", "--max-model-len", "4096"], &[]);
    let lm = local();
    let items = load("medqa", "test", 6);

    // sampled, each conversation alone on both sides: the same arithmetic and the same
    // seeds give the same samples, bit for bit
    let mut config = JudgeConfig {
        samples: 3,
        batch: 1,
        seed: 11,
        cache_dir: scratch("judge-local"),
        ..JudgeConfig::default()
    };
    config.sampling.max_tokens = 10;
    config.sampling.temperature = 0.8;
    let here = judge::judge(&lm, &items, &config, &Job::silent()).unwrap();
    config.cache_dir = scratch("judge-served");
    let there = judge::judge(&judge_through(&served, 1), &items, &config, &Job::silent()).unwrap();
    assert!(
        verdicts(&here).equals_missing(&verdicts(&there)),
        "{here}\n{there}"
    );
    assert_eq!(
        there.column("judge").unwrap().str().unwrap().get(0),
        Some(format!("tiny at {}", served.url).as_str())
    );
    // the samples of a question differ: each seed reached the server
    let responses = there.column("responses").unwrap().list().unwrap().clone();
    let first = responses.get_as_series(0).unwrap();
    assert_eq!(first.n_unique().unwrap(), 3, "{first}");

    // batched on both sides (the server batches whatever requests wait): rows padded to
    // other widths get logits that differ in the last bits (about 1e-6), which may move a
    // sampled token that lies on a boundary, so this comparison is greedy
    config.batch = 6;
    config.samples = 1;
    config.sampling.temperature = 0.0;
    config.cache_dir = scratch("judge-local-greedy");
    let here = judge::judge(&lm, &items, &config, &Job::silent()).unwrap();
    config.cache_dir = scratch("judge-served-greedy");
    let there = judge::judge(&judge_through(&served, 4), &items, &config, &Job::silent()).unwrap();
    assert!(
        verdicts(&here).equals_missing(&verdicts(&there)),
        "{here}\n{there}"
    );
}

/// The Results table without its `model` label and (loglik) its log-probabilities.
fn outcome(results: &DataFrame) -> DataFrame {
    let mut df = results.drop("model").unwrap();
    if df.column("logprobs").is_ok() {
        df = df.drop("logprobs").unwrap();
    }
    df
}

fn logprob_rows(results: &DataFrame) -> Vec<Vec<f64>> {
    results
        .column("logprobs")
        .unwrap()
        .list()
        .unwrap()
        .amortized_iter()
        .map(|row| {
            row.unwrap()
                .as_ref()
                .f64()
                .unwrap()
                .into_no_null_iter()
                .collect::<Vec<f64>>()
        })
        .collect()
}

fn options(mode: Mode, cache: &Path) -> EvalOptions {
    EvalOptions {
        mode: Some(mode),
        batch: Some(4),
        cache_dir: Some(cache.to_path_buf()),
        ..EvalOptions::default()
    }
}

#[test]
fn loglik_evaluation_through_rlvr_serve_equals_the_local_backend() {
    let served = Served::start(&["--max-model-len", "4096"], &[]);
    let lm = local();
    let items = load("mmlu", "test", 12);
    let dev = load("mmlu", "dev", 10);
    let mut opts = options(Mode::Loglik, &scratch("loglik-local"));
    opts.shots = Some(1);
    opts.fewshot = Some(dev);
    let backend = LocalModel::new(&lm).unwrap();
    let here = eval::evaluate(&backend, &items, &opts, &Job::silent()).unwrap();
    opts.cache_dir = Some(scratch("loglik-served"));
    let endpoint = served.client();
    let there = eval::evaluate(&endpoint, &items, &opts, &Job::silent()).unwrap();
    assert!(
        outcome(&here).equals_missing(&outcome(&there)),
        "{here}\n{there}"
    );
    for (a, b) in logprob_rows(&here).iter().zip(logprob_rows(&there)) {
        assert_eq!(a.len(), 4);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{a:?} vs {b:?}");
        }
    }
    let labels = there.column("model").unwrap().str().unwrap().get(0);
    assert_eq!(labels, Some("tiny"));
    // one request per question: the context and the context with each option
    assert_eq!(endpoint.usage().requests, 12);
}

#[test]
fn generate_evaluation_through_rlvr_serve_equals_the_local_backend_greedily() {
    let served = Served::start(&["--max-model-len", "4096"], &[]);
    let lm = local();
    let backend = LocalModel::new(&lm).unwrap();
    let endpoint = served.client();
    // a conversation (the study preset, the chat template) and text (GSM8K, one shot)
    let gsm = load("gsm8k", "test", 4);
    let train = load("gsm8k", "train", 5);
    for (items, preset, fewshot) in [
        (load("mmlu", "test", 4), "study", None),
        (gsm, "gsm8k", Some(train)),
    ] {
        let mut opts = options(Mode::Generate, &scratch(&format!("generate-{preset}")));
        opts.preset = Some(preset.into());
        opts.max_tokens = Some(12);
        opts.shots = fewshot.as_ref().map(|_| 1);
        opts.fewshot = fewshot;
        let here = eval::evaluate(&backend, &items, &opts, &Job::silent()).unwrap();
        opts.cache_dir = Some(scratch(&format!("generate-{preset}-served")));
        let there = eval::evaluate(&endpoint, &items, &opts, &Job::silent()).unwrap();
        assert!(
            outcome(&here).equals_missing(&outcome(&there)),
            "{preset}:\n{here}\n{there}"
        );
        let tokens: u64 = there
            .column("tokens")
            .unwrap()
            .u64()
            .unwrap()
            .sum()
            .unwrap();
        assert!(tokens > 0, "{preset}: something was generated");
    }
}

/// The fault server's stand-in for a model: log p(the last character of `text` | the rest),
/// a fixed function of the text.
fn fake_logprob(text: &str) -> f64 {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    -((hash % 1000) as f64) / 250.0 - 0.01
}

/// A scoring reply as vLLM gives it: every prompt echoed, one token per character after
/// `<s>`, the first without a log-probability.
fn scoring_reply(seen: &Seen) -> Action {
    let choices: Vec<Value> = seen.body["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let prompt = prompt.as_str().unwrap();
            let mut tokens = vec!["<s>".to_string()];
            let mut values = vec![Value::Null];
            for (at, c) in prompt.char_indices() {
                tokens.push(c.to_string());
                values.push(json!(fake_logprob(&prompt[..at + c.len_utf8()])));
            }
            json!({"index": i, "text": prompt, "finish_reason": "length",
                   "logprobs": {"tokens": tokens, "token_logprobs": values}})
        })
        .collect();
    let body = json!({"object": "text_completion", "choices": choices});
    Action::Reply(200, vec![], body.to_string())
}

/// What the fake model gives each option of a scoring request: the context's characters,
/// then the option's, each scored by [`fake_logprob`].
fn expected_scores(seen: &Seen) -> Vec<f64> {
    let prompts: Vec<&str> = seen.body["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let context = prompts[0];
    prompts[1..]
        .iter()
        .map(|whole| {
            whole[context.len()..]
                .char_indices()
                .map(|(at, c)| fake_logprob(&whole[..context.len() + at + c.len_utf8()]))
                .sum()
        })
        .collect()
}

fn fault_client(url: &str) -> Endpoint {
    Endpoint::new(
        url,
        "tiny",
        EndpointOptions {
            concurrency: 2,
            timeout: Duration::from_secs(10),
            retries: 3,
            backoff: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            ..EndpointOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn an_evaluation_survives_429s_server_errors_and_dropped_connections() {
    let items = load("mmlu", "test", 6);
    let clean = FaultServer::start(|_, seen| scoring_reply(seen));
    let reference = eval::evaluate(
        &fault_client(&clean.url),
        &items,
        &options(Mode::Loglik, &scratch("faults-clean")),
        &Job::silent(),
    )
    .unwrap();
    let faulty = FaultServer::start(|i, seen| match i {
        0 => Action::Reply(
            429,
            vec![("retry-after-ms", "20".into())],
            r#"{"error": {"message": "slow down"}}"#.into(),
        ),
        2 => Action::Drop,
        4 => Action::Reply(503, vec![], "overloaded".into()),
        _ => scoring_reply(seen),
    });
    let endpoint = fault_client(&faulty.url);
    let results = eval::evaluate(
        &endpoint,
        &items,
        &options(Mode::Loglik, &scratch("faults")),
        &Job::silent(),
    )
    .unwrap();
    assert!(results.equals_missing(&reference), "{results}\n{reference}");
    assert_eq!(faulty.seen().len(), 6 + 3, "six questions, three retries");
    assert_eq!(endpoint.usage().retries, 3);
    // every question's scores are the fake model's sums over its options' characters
    let expected: Vec<Vec<f64>> = faulty
        .seen()
        .iter()
        .filter(|s| s.body["echo"] == true)
        .map(expected_scores)
        .collect();
    for row in logprob_rows(&results) {
        let close = |e: &Vec<f64>| e.iter().zip(&row).all(|(a, b)| (a - b).abs() < 1e-9);
        assert!(expected.iter().any(close), "{row:?} not in {expected:?}");
    }
    let body = &faulty.seen()[1].body;
    assert_eq!(
        (&body["max_tokens"], &body["logprobs"], &body["echo"]),
        (&json!(0), &json!(1), &json!(true))
    );
    assert_eq!(
        body["prompt"].as_array().unwrap().len(),
        5,
        "context + 4 options"
    );
}

fn cache_lines(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|f| {
                    std::fs::read_to_string(f.unwrap().path())
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .count()
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_dead_server_costs_the_batch_in_flight_and_a_rerun_resumes() {
    let items = load("mmlu", "test", 8);
    let cache = scratch("dead-server");
    let opts = EvalOptions {
        batch: Some(2),
        ..options(Mode::Loglik, &cache)
    };
    // answers the first batch, then dies: every later connection is refused
    let dying = FaultServer::start(|i, seen| {
        if i < 2 {
            scoring_reply(seen)
        } else {
            Action::Kill
        }
    });
    let err = eval::evaluate(&fault_client(&dying.url), &items, &opts, &Job::silent())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&dying.url) && err.contains("no reply"),
        "{err}"
    );
    assert_eq!(cache_lines(&cache), 2, "the first batch is kept");

    // the same model on a server at another address: only the rest is asked for
    let revived = FaultServer::start(|_, seen| scoring_reply(seen));
    let resumed =
        eval::evaluate(&fault_client(&revived.url), &items, &opts, &Job::silent()).unwrap();
    assert_eq!(revived.seen().len(), 6);
    assert_eq!(cache_lines(&cache), 8);
    let clean = FaultServer::start(|_, seen| scoring_reply(seen));
    let uncached = EvalOptions {
        cache_dir: None,
        ..opts.clone()
    };
    let reference =
        eval::evaluate(&fault_client(&clean.url), &items, &uncached, &Job::silent()).unwrap();
    assert!(resumed.equals_missing(&reference), "{resumed}\n{reference}");
}

#[test]
fn a_server_without_prompt_log_probabilities_gets_a_clear_error() {
    // a llama.cpp-like server: `echo` and `logprobs` ignored, a sample generated
    let server = FaultServer::start(|_, _| {
        Action::Reply(
            200,
            vec![],
            json!({"choices": [{"index": 0, "text": " maybe", "logprobs": null,
                                "finish_reason": "length"}]})
            .to_string(),
        )
    });
    let items = load("mmlu", "test", 2);
    let loglik_error = |url: &str, name: &str| {
        eval::evaluate(
            &fault_client(url),
            &items,
            &options(Mode::Loglik, &scratch(name)),
            &Job::silent(),
        )
        .unwrap_err()
        .to_string()
    };
    let err = loglik_error(&server.url, "no-echo");
    for part in [
        "does not honour `echo` with `logprobs`",
        "/completions",
        "mode \"generate\"",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    // a server that refuses the fields says so in its own words
    let refusing = FaultServer::start(|_, _| {
        Action::Reply(
            400,
            vec![],
            r#"{"error": {"message": "echo is not supported", "type": "invalid_request_error"}}"#
                .into(),
        )
    });
    let err = loglik_error(&refusing.url, "refused");
    assert!(
        err.contains("HTTP 400") && err.contains("echo is not supported") && err.contains("loglik"),
        "{err}"
    );
}

fn run_eval_script(home: &Path, url: &str, table: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .current_dir(repo(""))
        .env("RLVR_HOME", home)
        .args(["run", "tests/scripts/eval_endpoint.rhai", "--quiet"])
        .args(["--out", &home.join("run").display().to_string()])
        .args(["--set", &format!("url={url}")])
        .args(["--set", &format!("table={}", table.display())])
        .args(["--set", "n=8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_script_evaluating_through_a_server_killed_and_rerun_resumes() {
    // replies take a while, so that the script is killed with batches still to do
    let slow = FaultServer::start(|_, seen| {
        std::thread::sleep(Duration::from_millis(300));
        scoring_reply(seen)
    });
    let whole = scratch("script-whole");
    let out = run_eval_script(&whole, &slow.url, &whole.join("results.json"))
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tiny"), "{stdout}");
    let asked = slow.seen().len();
    assert_eq!(asked, 8);

    let killed = scratch("script-killed");
    let cache = killed.join("cache").join("eval");
    let mut child = run_eval_script(&killed, &slow.url, &killed.join("results.json"));
    super::kill_when(&mut child, || cache_lines(&cache) >= 2);
    let saved = cache_lines(&cache);
    assert!((2..8).contains(&saved), "killed after {saved} of 8");
    assert!(!killed.join("results.json").exists());

    // requests in flight when the process died still reach the server's log
    std::thread::sleep(Duration::from_millis(200));
    let before = slow.seen().len();
    let out = run_eval_script(&killed, &slow.url, &killed.join("results.json"))
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cache_lines(&cache), 8);
    assert_eq!(
        slow.seen().len() - before,
        8 - saved,
        "only the questions not cached are asked"
    );
    assert_eq!(
        std::fs::read_to_string(killed.join("results.json")).unwrap(),
        std::fs::read_to_string(whole.join("results.json")).unwrap()
    );
}

#[test]
fn rlvr_serve_ends_on_sigterm() {
    let mut served = Served::start(&[], &[]);
    let pid = served.child.id().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    for _ in 0..600 {
        if let Some(status) = served.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("rlvr serve still runs 30 s after SIGTERM");
}
