//! The endpoint client against a fault-injecting HTTP server on 127.0.0.1 (a raw
//! `TcpListener`, so that it can drop connections and die): 429 bursts with `Retry-After`,
//! 5xx, dropped connections, a server killed mid-run, slow replies, servers that reject or
//! ignore `n`, and cancellation. Assertions are on counts and contents, never on time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rlvr::endpoint::{
    ChatRequest, CompletionRequest, Endpoint, EndpointError, EndpointOptions, Reply, RequestParams,
};
use rlvr::model::chat::Message;
use rlvr::progress::Job;
use serde_json::{json, Value};

/// What the fault server does with one request.
pub(crate) enum Action {
    /// Answer with a status, extra headers and a body.
    Reply(u16, Vec<(&'static str, String)>, String),
    /// Answer 200 with OpenAI's reply holding these texts.
    Texts(Vec<String>),
    /// Wait, then answer with these texts (the client has usually given up by then).
    Slow(Duration, Vec<String>),
    /// Close the connection without a word.
    Drop,
    /// Close the connection and stop listening: every later connection is refused.
    Kill,
}

/// One request as the fault server saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) path: String,
    authorization: Option<String>,
    pub(crate) body: Value,
}

type Script = dyn Fn(usize, &Seen) -> Action + Send + Sync;

/// An HTTP/1.1 server on a free port of 127.0.0.1 whose `script` decides, for the `i`-th
/// request received (from 0), what happens.
pub(crate) struct FaultServer {
    pub(crate) url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FaultServer {
    pub(crate) fn start(script: impl Fn(usize, &Seen) -> Action + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let killed = Arc::new(AtomicBool::new(false));
        let script: Arc<Script> = Arc::new(script);
        let log = seen.clone();
        std::thread::spawn(move || {
            while !killed.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (log, killed, script) = (log.clone(), killed.clone(), script.clone());
                        std::thread::spawn(move || serve_one(stream, &log, &killed, &*script));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            // the listener drops here: the port refuses connections from now on
        });
        FaultServer { url, seen }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_one(stream: TcpStream, log: &Mutex<Vec<Seen>>, killed: &AtomicBool, script: &Script) {
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let (mut length, mut authorization) = (0, None);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap(),
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let seen = Seen {
        path,
        authorization,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let index = {
        let mut log = log.lock().unwrap();
        log.push(seen.clone());
        log.len() - 1
    };
    let (status, headers, text) = match script(index, &seen) {
        Action::Reply(status, headers, text) => (status, headers, text),
        Action::Texts(texts) => (200, vec![], reply(&seen, &texts)),
        Action::Slow(wait, texts) => {
            std::thread::sleep(wait);
            (200, vec![], reply(&seen, &texts))
        }
        Action::Drop => return,
        Action::Kill => {
            killed.store(true, Ordering::SeqCst);
            return;
        }
    };
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        text.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut stream = stream;
    let _ = stream.write_all(format!("{head}\r\n{text}").as_bytes());
}

/// OpenAI's reply to `seen` (chat or text shape by its path) with these texts.
fn reply(seen: &Seen, texts: &[String]) -> String {
    let chat = seen.path.ends_with("/chat/completions");
    let choices: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if chat {
                json!({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"})
            } else {
                json!({"index": i, "text": t, "finish_reason": "length"})
            }
        })
        .collect();
    json!({"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 2 * texts.len()}})
        .to_string()
}

/// The prompt or last message of a request, echoed back by the scripts below.
fn prompt_of(seen: &Seen) -> String {
    match seen.body.get("prompt") {
        Some(p) => p.as_str().unwrap().to_string(),
        None => seen.body["messages"].as_array().unwrap().last().unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string(),
    }
}

fn echo(seen: &Seen) -> Action {
    Action::Texts(vec![format!("echo {}", prompt_of(seen))])
}

fn quick_options() -> EndpointOptions {
    EndpointOptions {
        concurrency: 4,
        timeout: Duration::from_secs(5),
        retries: 3,
        backoff: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..EndpointOptions::default()
    }
}

fn prompts(count: usize) -> Vec<CompletionRequest> {
    (0..count)
        .map(|i| CompletionRequest {
            prompt: format!("p{i}"),
            params: RequestParams::default(),
        })
        .collect()
}

type Outcome = Result<Reply, EndpointError>;

/// Runs the completion requests: the results, and every result `on_done` delivered with its
/// index, in the order delivered.
fn complete_all(
    ep: &Endpoint,
    requests: &[CompletionRequest],
    job: &Job,
) -> (Vec<Outcome>, Vec<(usize, Outcome)>) {
    let mut delivered = vec![];
    let results = ep.complete(requests, job, &mut |i, r| delivered.push((i, r.clone())));
    (results, delivered)
}

fn text_of(result: &Outcome) -> &str {
    &result.as_ref().unwrap().texts[0]
}

#[test]
fn bursts_of_429_are_retried_after_the_servers_wait() {
    let server = FaultServer::start(|i, seen| match i {
        0 => Action::Reply(
            429,
            vec![("Retry-After", "1".into())],
            r#"{"error": {"message": "slow down"}}"#.into(),
        ),
        1 | 2 => Action::Reply(429, vec![("retry-after-ms", "30".into())], "{}".into()),
        _ => echo(seen),
    });
    let ep = Endpoint::new(&server.url, "m", quick_options()).unwrap();
    let (results, delivered) = complete_all(&ep, &prompts(6), &Job::silent());
    for (i, r) in results.iter().enumerate() {
        assert_eq!(text_of(r), format!("echo p{i}"));
    }
    assert_eq!(delivered.len(), 6);
    assert_eq!(server.seen().len(), 9, "six requests and three retries");
    let usage = ep.usage();
    assert_eq!((usage.requests, usage.retries), (9, 3));
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (18, 12));
}

#[test]
fn server_errors_and_dropped_connections_are_retried() {
    let server = FaultServer::start(|i, seen| match i {
        0 => Action::Reply(500, vec![], r#"{"error": {"message": "boom"}}"#.into()),
        1 => Action::Reply(503, vec![], "Service Unavailable".into()),
        2 | 3 => Action::Drop,
        _ => echo(seen),
    });
    let ep = Endpoint::new(&server.url, "m", quick_options()).unwrap();
    let (results, _) = complete_all(&ep, &prompts(5), &Job::silent());
    for (i, r) in results.iter().enumerate() {
        assert_eq!(text_of(r), format!("echo p{i}"));
    }
    assert_eq!(server.seen().len(), 9);
    assert_eq!(ep.usage().retries, 4);
}

#[test]
fn persistent_errors_name_the_url_status_and_servers_message() {
    let server = FaultServer::start(|_, seen| {
        if prompt_of(seen) == "bad" {
            Action::Reply(
                400,
                vec![],
                r#"{"error": {"message": "`max_tokens` is too large", "param": "max_tokens"}}"#
                    .into(),
            )
        } else {
            Action::Reply(
                500,
                vec![],
                r#"{"error": {"message": "model overloaded"}}"#.into(),
            )
        }
    });
    let ep = Endpoint::new(&server.url, "m", quick_options()).unwrap();
    let requests = [
        CompletionRequest {
            prompt: "bad".into(),
            params: RequestParams::default(),
        },
        CompletionRequest {
            prompt: "busy".into(),
            params: RequestParams::default(),
        },
    ];
    let (results, _) = complete_all(&ep, &requests, &Job::silent());
    let url = format!("{}/completions", server.url);
    assert_eq!(
        results[0].as_ref().unwrap_err(),
        &EndpointError::Http {
            url: url.clone(),
            status: 400,
            message: "`max_tokens` is too large".into(),
            attempts: 1
        }
    );
    let busy = results[1].as_ref().unwrap_err();
    assert_eq!(
        busy,
        &EndpointError::Http {
            url: url.clone(),
            status: 500,
            message: "model overloaded".into(),
            attempts: 4
        }
    );
    let shown = busy.to_string();
    assert!(
        shown.contains(&url) && shown.contains("500") && shown.contains("model overloaded"),
        "{shown}"
    );
    assert_eq!(
        server.seen().len(),
        1 + 4,
        "a 400 is not retried; a 500 is, three times"
    );
}

#[test]
fn a_server_killed_mid_run_loses_no_finished_result() {
    let server = FaultServer::start(|i, seen| if i < 4 { echo(seen) } else { Action::Kill });
    let options = EndpointOptions {
        concurrency: 2,
        retries: 2,
        ..quick_options()
    };
    let ep = Endpoint::new(&server.url, "m", options).unwrap();
    let (results, delivered) = complete_all(&ep, &prompts(10), &Job::silent());
    let ok: Vec<usize> = (0..10).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(
        ok.len(),
        4,
        "the four requests answered before the server died"
    );
    for &i in &ok {
        assert_eq!(text_of(&results[i]), format!("echo p{i}"));
    }
    // every finished result reached the caller as it finished, exactly once per request
    assert_eq!(delivered.len(), 10);
    let mut indices: Vec<usize> = delivered.iter().map(|(i, _)| *i).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..10).collect::<Vec<_>>());
    for (i, r) in &delivered {
        assert_eq!(r, &results[*i]);
    }
    let url = format!("{}/completions", server.url);
    for r in results.iter().filter(|r| r.is_err()) {
        match r.as_ref().unwrap_err() {
            EndpointError::Connection {
                url: u, attempts, ..
            } => {
                assert_eq!(u, &url);
                assert_eq!(*attempts, 3);
            }
            other => panic!("expected a connection error, got {other}"),
        }
    }
}

#[test]
fn slow_replies_time_out_and_are_retried() {
    let server = FaultServer::start(|i, seen| {
        if i == 0 {
            Action::Slow(Duration::from_secs(6), vec!["too late".into()])
        } else {
            echo(seen)
        }
    });
    let options = EndpointOptions {
        concurrency: 1,
        timeout: Duration::from_secs(1),
        ..quick_options()
    };
    let ep = Endpoint::new(&server.url, "m", options).unwrap();
    let (results, _) = complete_all(&ep, &prompts(3), &Job::silent());
    for (i, r) in results.iter().enumerate() {
        assert_eq!(text_of(r), format!("echo p{i}"));
    }
    let seen: Vec<String> = server.seen().iter().map(prompt_of).collect();
    assert_eq!(seen, ["p0", "p0", "p1", "p2"]);
    assert_eq!(ep.usage().retries, 1);
}

fn seeded_chat(n: usize, seed: u64) -> ChatRequest {
    ChatRequest {
        messages: vec![Message::new("user", "2+2?")],
        params: RequestParams {
            n,
            seed: Some(seed),
            temperature: 0.7,
            ..RequestParams::default()
        },
    }
}

fn seed_text(seen: &Seen) -> String {
    format!("seed {}", seen.body["seed"])
}

#[test]
fn n_is_asked_one_sample_at_a_time_when_the_server_rejects_it() {
    // llama.cpp's answer to n > 1
    let server = FaultServer::start(|_, seen| {
        if seen.body.get("n").is_some() {
            Action::Reply(400, vec![], r#"{"error": {"code": 400, "message": "Only one completion choice is allowed", "type": "invalid_request_error"}}"#.into())
        } else {
            Action::Texts(vec![seed_text(seen)])
        }
    });
    let options = EndpointOptions {
        concurrency: 1,
        ..quick_options()
    };
    let ep = Endpoint::new(&server.url, "judge", options).unwrap();
    let results = ep.chat(
        &[seeded_chat(3, 10), seeded_chat(2, 40)],
        &Job::silent(),
        &mut |_, _| {},
    );
    let first = results[0].as_ref().unwrap();
    assert_eq!(first.texts, ["seed 10", "seed 11", "seed 12"]);
    assert_eq!(first.finish_reasons, ["stop"; 3]);
    assert_eq!((first.prompt_tokens, first.completion_tokens), (3, 6));
    assert_eq!(results[1].as_ref().unwrap().texts, ["seed 40", "seed 41"]);
    let seen = server.seen();
    let ns: Vec<Value> = seen
        .iter()
        .map(|s| s.body.get("n").cloned().unwrap_or(Value::Null))
        .collect();
    // once rejected, later requests go one by one straight away
    assert_eq!(
        ns,
        [
            json!(3),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null
        ]
    );
    assert!(seen
        .iter()
        .all(|s| s.path == "/v1/chat/completions" && s.body["model"] == "judge"));
}

#[test]
fn n_is_completed_one_by_one_when_the_server_ignores_it() {
    let server = FaultServer::start(|_, seen| Action::Texts(vec![seed_text(seen)]));
    let ep = Endpoint::new(&server.url, "m", quick_options()).unwrap();
    let results = ep.chat(&[seeded_chat(3, 7)], &Job::silent(), &mut |_, _| {});
    assert_eq!(
        results[0].as_ref().unwrap().texts,
        ["seed 7", "seed 8", "seed 9"]
    );
    assert_eq!(server.seen().len(), 3);
}

#[test]
fn n_is_sent_once_to_a_server_that_honours_it() {
    let server = FaultServer::start(|_, seen| {
        let n = seen.body["n"].as_u64().unwrap_or(1);
        Action::Texts((0..n).map(|j| format!("sample {j}")).collect())
    });
    let ep = Endpoint::new(&server.url, "m", quick_options()).unwrap();
    let results = ep.chat(&[seeded_chat(4, 1)], &Job::silent(), &mut |_, _| {});
    assert_eq!(results[0].as_ref().unwrap().texts.len(), 4);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let body = &seen[0].body;
    assert_eq!(
        (
            body["n"].clone(),
            body["seed"].clone(),
            body["temperature"].clone()
        ),
        (json!(4), json!(1), json!(0.7))
    );
    assert_eq!(
        seen[0].authorization, None,
        "no key unless one is configured"
    );
}

#[test]
fn cancelling_stops_new_requests_and_reports_each_one() {
    // from the third request on, replies take long enough for the cancel to arrive first
    let server = FaultServer::start(|i, seen| {
        if i < 2 {
            echo(seen)
        } else {
            Action::Slow(Duration::from_secs(4), vec![prompt_of(seen)])
        }
    });
    let options = EndpointOptions {
        concurrency: 1,
        ..quick_options()
    };
    let ep = Endpoint::new(&server.url, "m", options).unwrap();
    let job = Job::silent();
    job.cancel.cancel();
    let (results, delivered) = complete_all(&ep, &prompts(4), &job);
    assert!(results.iter().all(|r| r == &Err(EndpointError::Cancelled)));
    assert_eq!(delivered.len(), 4);
    assert_eq!(server.seen().len(), 0, "nothing is sent once cancelled");

    let job = Job::silent();
    let cancel = job.cancel.clone();
    let calls = AtomicUsize::new(0);
    let results = ep.complete(&prompts(8), &job, &mut |_, _| {
        if calls.fetch_add(1, Ordering::SeqCst) == 1 {
            cancel.cancel();
        }
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let cancelled = results
        .iter()
        .filter(|r| **r == Err(EndpointError::Cancelled))
        .count();
    // two finished before the cancel; the third, slow one (when it started before the
    // cancel) is abandoned; the rest are never sent
    assert_eq!(ok, 2);
    assert_eq!(cancelled, 6);
    assert!((2..=3).contains(&server.seen().len()));
}
