//! `rlvr serve` on the tiny Gemma 3 fixture (with the tiny tokenizer that fits its
//! 512-token vocabulary), started as a child process on a free port of 127.0.0.1 and queried
//! by the endpoint client and by raw HTTP: replies equal the local model's generation for
//! the same seeds, `n` and seeds reproduce, stop texts cut, usage counts, OpenAI's errors,
//! batched concurrent requests, adapters, API keys and the script surface.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use rlvr::endpoint::{
    ChatRequest, CompletionRequest, Endpoint, EndpointError, EndpointOptions, RequestParams,
};
use rlvr::model::chat::Message;
use rlvr::model::generate::Sampling;
use rlvr::model::lm::LanguageModel;
use rlvr::progress::Job;
use serde_json::{json, Value};

use crate::repo;

const MODEL: &str = "tests/fixtures/tiny-gemma3";
const TOKENIZER: &str = "tests/fixtures/tiny-tokenizer/tokenizer.json";

/// A running `rlvr serve`, killed when dropped.
pub(crate) struct Served {
    pub(crate) child: Child,
    /// `http://127.0.0.1:PORT/v1`
    pub(crate) url: String,
}

impl Served {
    /// `rlvr serve` on the tiny fixture.
    pub(crate) fn start(extra: &[&str], envs: &[(&str, &str)]) -> Self {
        Served::start_model(MODEL, extra, envs)
    }

    fn start_model(model: &str, extra: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rlvr"));
        command
            .args([
                "serve",
                "--model",
                model,
                "--tokenizer",
                TOKENIZER,
                "--port",
                "0",
            ])
            .args(["--served-model-name", "tiny"])
            .args(extra)
            .current_dir(repo(""))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("rlvr serve starts");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let url = first
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "rlvr serve did not start: {first:?} {}",
                    log.lock().unwrap()
                )
            })
            .to_string();
        Served { child, url }
    }

    /// A client that does not retry and waits a minute at most for a reply, so that any
    /// server error or stall fails the test.
    pub(crate) fn client(&self) -> Endpoint {
        let options = EndpointOptions {
            retries: 0,
            timeout: std::time::Duration::from_secs(60),
            ..EndpointOptions::default()
        };
        Endpoint::new(&self.url, "tiny", options).unwrap()
    }

    /// A raw HTTP request: the status and the JSON body.
    pub(crate) fn http(&self, method: &str, path: &str, body: &str, headers: &str) -> (u16, Value) {
        let address = self
            .url
            .trim_start_matches("http://")
            .trim_end_matches("/v1");
        let mut stream = TcpStream::connect(address).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).unwrap())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn local() -> LanguageModel {
    LanguageModel::load(&repo(MODEL), Some(&repo(TOKENIZER)), &Device::Cpu).unwrap()
}

fn params(max_tokens: usize, temperature: f64, n: usize, seed: u64) -> RequestParams {
    RequestParams {
        max_tokens,
        temperature,
        n,
        seed: Some(seed),
        ..RequestParams::default()
    }
}

fn complete(ep: &Endpoint, prompt: &str, params: RequestParams) -> rlvr::endpoint::Reply {
    let request = CompletionRequest {
        prompt: prompt.into(),
        params,
    };
    ep.complete(&[request], &Job::silent(), &mut |_, _| {})
        .remove(0)
        .unwrap()
}

#[test]
fn replies_equal_the_local_model_for_the_same_seeds() {
    let served = Served::start(&[], &[]);
    let ep = served.client();
    assert_eq!(ep.models().unwrap(), ["tiny"]);
    let lm = local();

    // /v1/completions with n = 3: sample j is the local model's prompt j of a batch seeded 5
    let reply = complete(&ep, "The patient", params(8, 0.8, 3, 5));
    let sampling = Sampling {
        max_tokens: 8,
        temperature: 0.8,
        seed: 5,
        ..Sampling::default()
    };
    let expected = lm
        .generate(&vec!["The patient".to_string(); 3], &sampling, &mut |_| {
            true
        })
        .unwrap();
    let texts: Vec<&str> = expected.iter().map(|g| g.text.as_str()).collect();
    assert_eq!(reply.texts, texts);
    assert_eq!(
        reply.prompt_tokens,
        lm.tokenizer.encode("The patient").unwrap().len()
    );
    let generated: usize = expected.iter().map(|g| g.completion.ids.len()).sum();
    assert_eq!(reply.completion_tokens, generated);
    assert_eq!(reply.finish_reasons.len(), 3);

    // /v1/chat/completions: the tokenizer's chat template, then greedy decoding
    let messages = vec![Message::new("user", "What is 2 + 2?")];
    let chat = ChatRequest {
        messages: messages.clone(),
        params: params(6, 0.0, 1, 0),
    };
    let reply = ep
        .chat(&[chat], &Job::silent(), &mut |_, _| {})
        .remove(0)
        .unwrap();
    let prompt = lm.tokenizer.chat(&messages, true).unwrap();
    let greedy = Sampling {
        max_tokens: 6,
        temperature: 0.0,
        ..Sampling::default()
    };
    let expected = lm
        .generate(std::slice::from_ref(&prompt), &greedy, &mut |_| true)
        .unwrap()
        .remove(0);
    assert_eq!(reply.texts, [expected.text]);
    assert_eq!(
        reply.prompt_tokens,
        lm.tokenizer.encode(&prompt).unwrap().len()
    );
    let usage = ep.usage();
    assert_eq!(
        (usage.requests, usage.retries),
        (3, 0),
        "models, completions, chat"
    );
}

#[test]
fn seeds_reproduce_and_differ() {
    let served = Served::start(&[], &[]);
    let ep = served.client();
    let a = complete(&ep, "An answer is", params(10, 1.0, 2, 11));
    let b = complete(&ep, "An answer is", params(10, 1.0, 2, 11));
    let c = complete(&ep, "An answer is", params(10, 1.0, 2, 12));
    assert_eq!(a.texts, b.texts);
    assert_ne!(
        a.texts[0], a.texts[1],
        "the two samples of a request differ"
    );
    assert_eq!(
        a.texts[1], c.texts[0],
        "sample 1 of seed 11 is sample 0 of seed 12"
    );
}

#[test]
fn stop_texts_cut_samples_and_their_token_counts() {
    let served = Served::start(&[], &[]);
    let ep = served.client();
    let full = complete(&ep, "The patient", params(16, 0.0, 1, 0));
    let text = &full.texts[0];
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let stopped = complete(
        &ep,
        "The patient",
        RequestParams {
            stop: vec![stop.clone(), "never appears ∅".into()],
            ..params(16, 0.0, 1, 0)
        },
    );
    assert_eq!(stopped.texts, [cut]);
    assert_eq!(stopped.finish_reasons, ["stop"]);
    // generation ended at the token that completed the stop text
    let lm = local();
    let greedy = Sampling {
        max_tokens: 16,
        temperature: 0.0,
        ..Sampling::default()
    };
    let ids = lm
        .generate(&["The patient".to_string()], &greedy, &mut |_| true)
        .unwrap()[0]
        .completion
        .ids
        .clone();
    let through_stop = (1..=ids.len())
        .find(|&k| lm.tokenizer.decode(&ids[..k]).unwrap().contains(&stop))
        .unwrap();
    assert_eq!(stopped.completion_tokens, through_stop);
    assert!(stopped.completion_tokens < full.completion_tokens);
}

#[test]
fn bad_requests_get_openai_errors_naming_the_field() {
    let served = Served::start(&[], &[]);
    let chat = |extra: &str| {
        format!(r#"{{"model": "tiny", "messages": [{{"role": "user", "content": "Hi"}}]{extra}}}"#)
    };
    for (body, param) in [
        (chat(r#", "temperature": -1"#), "temperature"),
        (chat(r#", "n": 0"#), "n"),
        (chat(r#", "max_tokens": "many""#), "max_tokens"),
        (chat(r#", "stop": 5"#), "stop"),
        (chat(r#", "stream": "yes""#), "stream"),
        (r#"{"messages": "Hi"}"#.to_string(), "messages"),
    ] {
        let (status, reply) = served.http("POST", "/v1/chat/completions", &body, "");
        assert_eq!(status, 400, "{body}: {reply}");
        assert_eq!(reply["error"]["type"], "invalid_request_error");
        assert_eq!(reply["error"]["param"], param, "{body}");
        assert!(reply["error"]["message"].as_str().unwrap().contains(param));
    }
    let (status, reply) = served.http("POST", "/v1/completions", "{not json", "");
    assert_eq!(status, 400);
    assert!(reply["error"]["message"].as_str().unwrap().contains("JSON"));
    let (status, reply) = served.http("POST", "/v1/completions", r#"{"prompt": [2, 99999]}"#, "");
    assert_eq!(
        (status, reply["error"]["param"].clone()),
        (400, json!("prompt"))
    );
    let (status, _) = served.http("GET", "/v1/nothing", "", "");
    assert_eq!(status, 404);
    let (status, _) = served.http("GET", "/v1/chat/completions", "", "");
    assert_eq!(status, 405);

    // the client reports the server's message and does not retry a 400
    let ep = served.client();
    let request = CompletionRequest {
        prompt: "x".into(),
        params: params(4, -2.0, 1, 0),
    };
    let err = ep
        .complete(&[request], &Job::silent(), &mut |_, _| {})
        .remove(0)
        .unwrap_err();
    match err {
        EndpointError::Http {
            status: 400,
            message,
            attempts: 1,
            ..
        } => {
            assert!(message.contains("temperature"), "{message}")
        }
        other => panic!("{other}"),
    }
}

#[test]
fn concurrent_requests_are_batched_and_each_gets_its_own_rows() {
    let served = Served::start(&["--max-batch", "16"], &[]);
    let ep = served.client();
    let lm = local();
    let prompts = [
        "The patient",
        "An answer is",
        "Fever and",
        "2 + 2 =",
        "Q:",
        "Hello",
        "x",
        "The",
    ];
    // request i asks for i + 1 greedy tokens, so a mix-up of rows shows in lengths and texts
    let requests: Vec<CompletionRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| CompletionRequest {
            prompt: p.to_string(),
            params: params(i + 1, 0.0, 1, 0),
        })
        .collect();
    let results = ep.complete(&requests, &Job::silent(), &mut |_, _| {});
    for (i, (prompt, result)) in prompts.iter().zip(&results).enumerate() {
        let greedy = Sampling {
            max_tokens: i + 1,
            temperature: 0.0,
            ..Sampling::default()
        };
        let expected = lm
            .generate(&[prompt.to_string()], &greedy, &mut |_| true)
            .unwrap()
            .remove(0);
        let reply = result.as_ref().unwrap();
        assert_eq!(reply.texts, [expected.text], "{prompt}");
        assert_eq!(
            reply.completion_tokens,
            expected.completion.ids.len(),
            "{prompt}"
        );
    }
}

#[test]
fn an_adapter_changes_the_served_model() {
    let adapter = "tests/fixtures/tiny-gemma3/adapter";
    let served = Served::start(&["--adapter", adapter], &[]);
    let ep = served.client();
    let tuned = local().load_adapter(&repo(adapter)).unwrap();
    let reply = complete(&ep, "The patient", params(12, 0.0, 1, 0));
    let greedy = Sampling {
        max_tokens: 12,
        temperature: 0.0,
        ..Sampling::default()
    };
    let expected = tuned
        .generate(&["The patient".to_string()], &greedy, &mut |_| true)
        .unwrap();
    assert_eq!(reply.texts, [expected[0].text.clone()]);
}

#[test]
fn scripts_use_a_server_with_an_api_key_that_is_never_shown() {
    let key = "sk-test-3f9a1c";
    let served = Served::start(
        &["--api-key-env", "RLVR_TEST_SERVE_KEY"],
        &[("RLVR_TEST_SERVE_KEY", key)],
    );
    let (status, reply) = served.http("GET", "/v1/models", "", "");
    assert_eq!(
        (status, reply["error"]["type"].clone()),
        (401, json!("authentication_error"))
    );
    let (status, _) = served.http(
        "GET",
        "/v1/models",
        "",
        &format!("Authorization: Bearer {key}\r\n"),
    );
    assert_eq!(status, 200);

    let url = format!("url={}", served.url);
    let run = |key_value: &str| {
        crate::rlvr(&["run", "tests/scripts/endpoint.rhai", "--set", &url])
            .env("RLVR_TEST_SERVE_KEY", key_value)
            .current_dir(repo(""))
            .output()
            .unwrap()
    };
    let out = run(key);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("models: [\"tiny\"]"), "{stdout}");
    assert!(stdout.contains("requests: 9"), "{stdout}");
    assert!(!stdout.contains(key) && !stderr.contains(key));

    let out = run("sk-wrong-key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("/v1/models"),
        "{stderr}"
    );
    assert!(!stderr.contains("sk-wrong-key"), "{stderr}");
}

#[test]
fn models_are_named_as_model_names_them() {
    // an alias resolves in the model store of $RLVR_HOME: an empty store names the fetch
    let home = std::env::temp_dir().join(format!("rlvr-serve-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let home_var = home.to_str().unwrap();
    let serve = |model: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_rlvr"))
            .args(["serve", "--model", model, "--port", "0"])
            .env("RLVR_HOME", home_var)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = serve("smollm2-135m-instruct");
    assert!(
        stderr.contains("rlvr models fetch smollm2-135m-instruct"),
        "{stderr}"
    );
    let stderr = serve("no-such-model");
    assert!(stderr.contains("no-such-model"), "{stderr}");
}

#[test]
fn max_tokens_beyond_the_context_is_a_400_and_a_missing_one_fits_the_context() {
    // the tiny fixture's context is 128 tokens
    let served = Served::start(&[], &[]);
    let body = |max_tokens: &str| {
        format!(
            r#"{{"model": "tiny", "prompt": "The patient has a fever", {max_tokens} "temperature": 0}}"#
        )
    };
    let (status, reply) = served.http(
        "POST",
        "/v1/completions",
        &body(r#""max_tokens": 4000,"#),
        "",
    );
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["type"], "invalid_request_error");
    assert_eq!(reply["error"]["param"], "max_tokens");
    assert_eq!(reply["error"]["code"], "context_length_exceeded");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("maximum context length is 128 tokens"),
        "{message}"
    );
    // right at the limit is fine, one more is not
    let (_, fits) = served.http("POST", "/v1/completions", &body(r#""max_tokens": 1,"#), "");
    let prompt = fits["usage"]["prompt_tokens"].as_u64().unwrap();
    let most = format!(r#""max_tokens": {},"#, 128 - prompt);
    let (status, reply) = served.http("POST", "/v1/completions", &body(&most), "");
    assert_eq!(status, 200, "{reply}");
    let over = format!(r#""max_tokens": {},"#, 129 - prompt);
    assert_eq!(
        served.http("POST", "/v1/completions", &body(&over), "").0,
        400
    );
    // the chat route too
    let chat = r#"{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 500}"#;
    let (status, reply) = served.http("POST", "/v1/chat/completions", chat, "");
    assert_eq!(
        (status, reply["error"]["code"].clone()),
        (400, json!("context_length_exceeded"))
    );
    // without max_tokens the default is cut to what the context leaves
    let (status, reply) = served.http("POST", "/v1/completions", &body(""), "");
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["usage"]["total_tokens"].as_u64().unwrap() <= 128,
        "{reply}"
    );
}

/// The standard error of `rlvr serve` with `args` and `envs`, stopped once it listens.
fn serve_stderr(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rlvr"));
    command
        .args([
            "serve",
            "--model",
            MODEL,
            "--tokenizer",
            TOKENIZER,
            "--port",
            "0",
        ])
        .args(args)
        .current_dir(repo(""))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(first.starts_with("listening on"), "{first}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn listening_beyond_loopback_without_an_api_key_warns() {
    let stderr = serve_stderr(&["--host", "0.0.0.0"], &[]);
    assert!(
        stderr.contains("warning: listening on 0.0.0.0 without an API key"),
        "{stderr}"
    );
    assert!(!serve_stderr(&["--host", "127.0.0.1"], &[]).contains("warning"));
    let keyed = serve_stderr(
        &["--host", "0.0.0.0", "--api-key-env", "RLVR_TEST_OPEN_KEY"],
        &[("RLVR_TEST_OPEN_KEY", "sk-open")],
    );
    assert!(!keyed.contains("warning"), "{keyed}");
}

/// Sends raw bytes, closes the sending side and reads the reply within 30 s: the status, or
/// `None` when the server closed the connection without one.
fn raw_exchange(address: &str, data: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let _ = stream.write_all(data);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "no reply within 30 s to {:?}: {e}",
            String::from_utf8_lossy(&data[..data.len().min(200)])
        ),
        Ok(_) => {}
    }
    let head = String::from_utf8_lossy(&reply[..reply.len().min(20)]).to_string();
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

/// The `k`-th malformed request of the short abuse run (`tests/faults/abuse.py` sends
/// 10,000 of more kinds).
fn malformed(k: usize, seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        // xorshift64
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let post = |body: &[u8], length: usize| {
        let mut r = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let valid = br#"{"prompt": "The patient", "max_tokens": 2, "temperature": 0}"#;
    match k % 8 {
        0 => {
            let body: Vec<u8> = (0..next() % 1000).map(|_| next() as u8).collect();
            post(&body, body.len())
        }
        1 => {
            let cut = (next() as usize) % valid.len();
            post(&valid[..cut], cut)
        }
        2 => {
            let fields = [
                r#"{"prompt": 5}"#,
                r#"{"prompt": "x", "max_tokens": -1}"#,
                r#"{"prompt": "x", "n": 1000000000}"#,
                r#"{"prompt": "x", "temperature": "hot"}"#,
                r#"{"prompt": [[-1, 99999999999]]}"#,
                r#"{"prompt": "x", "max_tokens": 1e300}"#,
                r#"[1, 2, 3]"#,
                r#"null"#,
            ];
            let body = fields[(next() as usize) % fields.len()].as_bytes();
            post(body, body.len())
        }
        3 => {
            let depth = 100 + (next() % 50_000) as usize;
            let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            post(body.as_bytes(), body.len())
        }
        4 => post(b"{\"prompt\": \"\xff\xfe\xc3\"}", 16),
        5 => post(valid, [0, 5, valid.len() + 100][(next() % 3) as usize]),
        6 => {
            // beyond the 128-token context, short enough for the tiny tokenizer to be quick
            let prompt = "fever ".repeat(200 + (next() % 200) as usize);
            let body = format!(r#"{{"prompt": "{prompt}", "max_tokens": 4}}"#);
            post(body.as_bytes(), body.len())
        }
        _ => {
            // not HTTP at all
            (0..next() % 400).map(|_| next() as u8).collect()
        }
    }
}

#[test]
fn malformed_requests_never_stop_the_server() {
    let mut served = Served::start(&[], &[]);
    let address = served
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let normal = r#"{"prompt": "The patient has", "max_tokens": 4, "temperature": 0}"#;
    let (status, first) = served.http("POST", "/v1/completions", normal, "");
    assert_eq!(status, 200);
    let mut seed = 0x5eed_u64;
    let mut statuses = std::collections::BTreeMap::new();
    for k in 0..400 {
        let status = raw_exchange(&address, &malformed(k, &mut seed));
        assert!(
            status.is_none_or(|s| s < 500),
            "request {k} got a server error {status:?}"
        );
        *statuses.entry(status).or_insert(0) += 1;
        if k % 50 == 49 {
            let (status, reply) = served.http("POST", "/v1/completions", normal, "");
            assert_eq!(status, 200, "{reply}");
            assert_eq!(reply["choices"][0]["text"], first["choices"][0]["text"]);
        }
    }
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    assert!(
        statuses.get(&Some(400)).is_some_and(|&n| n > 100),
        "{statuses:?}"
    );
}

/// The resident memory of process `pid` in MiB (Linux).
fn resident_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

#[test]
fn an_oversized_prompt_is_refused_before_it_is_tokenized() {
    // the tiny fixture's context is 128 tokens and its longest token 15 bytes: a text of
    // more than 1,920 bytes cannot fit
    let served = Served::start(&[], &[]);
    let normal = r#"{"prompt": "The patient has", "max_tokens": 4, "temperature": 0}"#;
    let (status, first) = served.http("POST", "/v1/completions", normal, "");
    assert_eq!(status, 200, "{first}");
    let before = resident_mib(served.child.id());
    let words = "fever ".repeat(200_000 / 6);
    let bodies = [
        (
            "/v1/completions",
            json!({"prompt": words, "max_tokens": 4}),
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["Hi", words], "max_tokens": 4}),
            "prompt[1]",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": words}], "max_tokens": 4}),
            "messages",
        ),
    ];
    for (route, body, param) in bodies {
        let started = std::time::Instant::now();
        let (status, reply) = served.http("POST", route, &body.to_string(), "");
        let took = started.elapsed();
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["code"], "context_length_exceeded");
        assert_eq!(reply["error"]["param"], param);
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("maximum context length is 128 tokens") && message.contains("bytes"),
            "{message}"
        );
        // tokenizing this text took more than 20 s before the bound
        assert!(took.as_secs_f64() < 5.0, "{route}: {took:?}");
    }
    let after = resident_mib(served.child.id());
    assert!(after - before < 100.0, "{before:.0} MiB → {after:.0} MiB");
    // a text within the bound is tokenized, and refused by its token count
    let long = json!({"prompt": "fever ".repeat(300), "max_tokens": 4}).to_string();
    let (status, reply) = served.http("POST", "/v1/completions", &long, "");
    assert_eq!(status, 400, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("tokens and leaves no room"), "{message}");
    // the server goes on answering
    let (status, reply) = served.http("POST", "/v1/completions", normal, "");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["text"], first["choices"][0]["text"]);
}

#[test]
fn a_short_request_is_answered_while_a_long_one_runs() {
    // the long request decodes 3,000 tokens (greedy, no stop token on this prompt); the
    // short one joins the running batch instead of waiting for it to end
    let served = Served::start(&["--max-model-len", "4096"], &[]);
    let body = |max_tokens: usize| {
        format!(
            r#"{{"model": "tiny", "prompt": "The patient", "max_tokens": {max_tokens}, "temperature": 0}}"#
        )
    };
    let long_done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            let reply = served.http("POST", "/v1/completions", &body(3000), "");
            long_done.store(true, std::sync::atomic::Ordering::SeqCst);
            reply
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (status, short) = served.http("POST", "/v1/completions", &body(2), "");
        let answered_first = !long_done.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(status, 200, "{short}");
        assert_eq!(short["usage"]["completion_tokens"], 2, "{short}");
        let (status, long) = long.join().unwrap();
        assert_eq!(status, 200, "{long}");
        assert_eq!(long["usage"]["completion_tokens"], 3000, "{long}");
        assert!(answered_first, "the short request waited for the long one");
        // the same tokens as alone: the short reply's text starts the long one's
        let short_text = short["choices"][0]["text"].as_str().unwrap();
        let long_text = long["choices"][0]["text"].as_str().unwrap();
        assert!(long_text.starts_with(short_text), "{short_text:?}");
    });
}

#[test]
fn max_tokens_past_the_servers_limit_is_a_400() {
    let served = Served::start(&["--max-tokens", "8"], &[]);
    let body = |max_tokens: &str| {
        format!(r#"{{"model": "tiny", "prompt": "The patient", {max_tokens} "temperature": 0}}"#)
    };
    let (status, reply) = served.http("POST", "/v1/completions", &body(r#""max_tokens": 9,"#), "");
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["param"], "max_tokens");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("limit of 8"), "{message}");
    let (status, reply) = served.http("POST", "/v1/completions", &body(r#""max_tokens": 8,"#), "");
    assert_eq!(status, 200, "{reply}");
    // a request naming none gets at most the limit
    let (status, reply) = served.http("POST", "/v1/completions", &body(""), "");
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["usage"]["completion_tokens"].as_u64().unwrap() <= 8,
        "{reply}"
    );
}

/// The status and the `data:` payloads of a streamed reply (read until the server closes).
fn streamed(served: &Served, path: &str, body: &str) -> (u16, Vec<String>) {
    let address = served
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(head.contains("text/event-stream"), "{head}");
    let events = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect();
    (status, events)
}

#[test]
fn a_streamed_reply_carries_the_text_of_a_whole_one() {
    let served = Served::start(&[], &[]);
    let routes = [
        ("/v1/completions", r#""prompt": "The patient""#),
        (
            "/v1/chat/completions",
            r#""messages": [{"role": "user", "content": "Hi"}]"#,
        ),
    ];
    for (path, input) in routes {
        let body = |stop: &str, stream: bool| {
            format!(
                r#"{{"model": "tiny", {input}, "max_tokens": 24, "temperature": 0, "stop": {stop}, "stream": {stream}}}"#
            )
        };
        let text_of = |choice: &Value| {
            let text = choice
                .get("text")
                .or_else(|| choice["message"].get("content"));
            text.and_then(Value::as_str).unwrap().to_string()
        };
        // without a stop text, then with one from the free completion (so the stream must
        // hold back text that could start it)
        let (_, free) = served.http("POST", path, &body("[]", false), "");
        let free: Vec<char> = text_of(&free["choices"][0]).chars().collect();
        assert!(free.len() > 12, "{free:?}");
        let at = free.len() * 2 / 3;
        let stop: String = free[at..at + 3].iter().collect();
        for stops in ["[]".to_string(), json!([stop]).to_string()] {
            let (status, whole) = served.http("POST", path, &body(&stops, false), "");
            assert_eq!(status, 200, "{whole}");
            let (status, events) = streamed(&served, path, &body(&stops, true));
            assert_eq!(status, 200);
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let text: String = chunks
                .iter()
                .map(|c| {
                    let choice = &c["choices"][0];
                    let piece = choice
                        .get("text")
                        .or_else(|| choice["delta"].get("content"));
                    piece.and_then(Value::as_str).unwrap_or("").to_string()
                })
                .collect();
            assert_eq!(text, text_of(&whole["choices"][0]), "{path} {stops}");
            let finish = &chunks.last().unwrap()["choices"][0]["finish_reason"];
            assert_eq!(
                finish, &whole["choices"][0]["finish_reason"],
                "{path} {stops}"
            );
            if stops == "[]" {
                assert!(chunks.len() > 12, "a chunk per token: {events:?}");
            }
        }
    }
}

#[test]
fn a_client_that_leaves_a_stream_stops_its_sequence() {
    // one slot: the next request can only run once the abandoned stream's row has ended
    let served = Served::start(&["--max-batch", "1", "--max-model-len", "200000"], &[]);
    let address = served
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    let body = r#"{"model": "tiny", "prompt": "The patient", "max_tokens": 100000, "temperature": 0, "stream": true}"#;
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 512];
    let n = stream.read(&mut first).unwrap();
    assert!(n > 0);
    drop(stream);
    let started = std::time::Instant::now();
    let (status, reply) = served.http(
        "POST",
        "/v1/completions",
        r#"{"model": "tiny", "prompt": "Hi", "max_tokens": 2}"#,
        "",
    );
    assert_eq!(status, 200, "{reply}");
    let waited = started.elapsed().as_secs_f64();
    assert!(waited < 20.0, "the abandoned row ran on: {waited:.1} s");
}

/// The JSON chunks of a streamed reply, checked to end with `[DONE]`.
fn stream_chunks(served: &Served, path: &str, body: &Value) -> Vec<Value> {
    let (status, events) = streamed(served, path, &body.to_string());
    assert_eq!(status, 200, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn close_to(a: &Value, b: &Value) -> bool {
    (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-3
}

#[test]
fn a_streamed_reply_scores_its_tokens_and_ends_with_its_usage() {
    let served = Served::start(&[], &[]);
    // /v1/completions: the legacy lists, chunk by chunk, add up to the whole reply's
    let body = json!({"model": "tiny", "prompt": "The patient", "max_tokens": 16,
                      "temperature": 0, "logprobs": 2});
    let (status, whole) = served.http("POST", "/v1/completions", &body.to_string(), "");
    assert_eq!(status, 200, "{whole}");
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&served, "/v1/completions", &streaming);
    let (last, choices) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"], whole["usage"]);
    let mut lists: [Vec<Value>; 4] = Default::default();
    for chunk in choices {
        assert_eq!(
            (&chunk["model"], &chunk["usage"]),
            (&json!("tiny"), &Value::Null)
        );
        let logprobs = &chunk["choices"][0]["logprobs"];
        for (list, key) in
            lists
                .iter_mut()
                .zip(["tokens", "token_logprobs", "top_logprobs", "text_offset"])
        {
            list.extend(logprobs[key].as_array().unwrap().iter().cloned());
        }
    }
    let expected = &whole["choices"][0]["logprobs"];
    assert_eq!(json!(lists[0]), expected["tokens"]);
    assert_eq!(json!(lists[3]), expected["text_offset"]);
    let values = expected["token_logprobs"].as_array().unwrap();
    assert_eq!(lists[1].len(), values.len());
    assert!(
        lists[1].iter().zip(values).all(|(a, b)| close_to(a, b)),
        "{lists:?}"
    );
    for (streamed, whole) in lists[2]
        .iter()
        .zip(expected["top_logprobs"].as_array().unwrap())
    {
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(streamed), keys(whole));
    }

    // chat: `logprobs.content` entries, each with its bytes and two alternatives
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 16, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (status, whole) = served.http("POST", "/v1/chat/completions", &body.to_string(), "");
    assert_eq!(status, 200, "{whole}");
    let expected = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let joined: String = expected
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text);
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let chunks = stream_chunks(&served, "/v1/chat/completions", &streaming);
    let content: Vec<Value> = chunks
        .iter()
        .flat_map(|c| {
            assert!(c.get("usage").is_none(), "no usage unless asked: {c}");
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(content.len(), expected.len());
    for (streamed, whole) in content.iter().zip(&expected) {
        assert_eq!(streamed["token"], whole["token"]);
        let bytes: Vec<u8> = serde_json::from_value(streamed["bytes"].clone()).unwrap();
        assert_eq!(bytes, whole["token"].as_str().unwrap().as_bytes());
        assert!(close_to(&streamed["logprob"], &whole["logprob"]));
        let tops = |v: &Value| -> Vec<Value> {
            v["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["token"].clone())
                .collect()
        };
        assert_eq!(tops(streamed), tops(whole));
        assert_eq!(tops(streamed).len(), 2);
    }
}

#[test]
fn a_streamed_reply_names_the_adapter_it_ran() {
    let module = format!(
        "tuned={}",
        repo("tests/fixtures/tiny-gemma3/adapter").display()
    );
    let served = Served::start(&["--enable-lora", "--lora-modules", &module], &[]);
    for (model, named) in [("tuned", "tuned"), ("tiny", "tiny")] {
        let body = json!({"model": model, "prompt": "The patient", "max_tokens": 4,
                          "stream": true});
        for chunk in stream_chunks(&served, "/v1/completions", &body) {
            assert_eq!(chunk["model"], named, "{chunk}");
        }
    }
}

/// Sends `body` to `path` and closes the connection after `wait` without reading a reply.
fn leave_after(served: &Served, path: &str, body: &str, wait: std::time::Duration) {
    let address = served
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(wait);
}

#[test]
fn a_client_that_leaves_a_request_stops_its_rows_and_only_its_own() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // two slots: one for the request that stays, one the abandoned request must free
    let served = Served::start(&["--max-batch", "2", "--max-model-len", "200000"], &[]);
    let body = |max_tokens: usize| {
        json!({"model": "tiny", "prompt": "The patient", "max_tokens": max_tokens,
               "temperature": 0})
        .to_string()
    };
    let (status, alone) = served.http("POST", "/v1/completions", &body(4000), "");
    assert_eq!(status, 200, "{alone}");
    let stayed_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let stays = scope.spawn(|| {
            let reply = served.http("POST", "/v1/completions", &body(4000), "");
            stayed_done.store(true, Ordering::SeqCst);
            reply
        });
        let wait = std::time::Duration::from_millis(300);
        leave_after(&served, "/v1/completions", &body(100_000), wait);
        let (status, reply) = served.http(
            "POST",
            "/v1/completions",
            r#"{"model": "tiny", "prompt": "Hi", "max_tokens": 2}"#,
            "",
        );
        assert_eq!(status, 200, "{reply}");
        assert!(
            !stayed_done.load(Ordering::SeqCst),
            "the third request got a slot only once the other request ended"
        );
        let (status, stayed) = stays.join().unwrap();
        assert_eq!(status, 200, "{stayed}");
        assert_eq!(stayed["usage"]["completion_tokens"], 4000, "{stayed}");
        assert_eq!(stayed["choices"][0]["text"], alone["choices"][0]["text"]);
    });
}
