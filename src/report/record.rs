//! The record of one script run: a folder for its outputs and a `manifest.json` saying what
//! ran (script and its hash, parameters, seed, rlvr version, git commit), when, how it
//! ended, which files it wrote, and what engines noted (model and adapter hashes).
//!
//! One record is active per process at a time. [`RunRecord::note`] and
//! [`RunRecord::note_file`] add to the active record and do nothing when there is none
//! (library use, the REPL, notebooks), so engines call them freely.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The manifest's file name inside the run folder.
pub const MANIFEST: &str = "manifest.json";

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Still running (or the process died without finishing the record).
    Running,
    /// The script ran to its end.
    Ok,
    /// The script failed.
    Error,
    /// The script was stopped by Ctrl-C.
    Interrupted,
}

/// A file in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileEntry {
    /// Relative to the run folder for files inside it, else as the script named it.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, in hex.
    pub sha256: String,
}

/// The git state of the script's checkout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GitState {
    /// `git rev-parse HEAD`.
    pub commit: String,
    /// Tracked files differ from the commit.
    pub dirty: bool,
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    /// The script as given on the command line.
    pub script: String,
    /// SHA-256 of the script's text.
    pub script_sha256: String,
    /// The full command line.
    pub command: Vec<String>,
    /// The `--set key=value` pairs as typed.
    pub params: Map<String, Value>,
    /// The `seed` parameter, when given.
    pub seed: Option<Value>,
    /// The rlvr version that ran the script.
    pub rlvr_version: String,
    /// The git commit of the checkout holding the script, when it is in one.
    pub git: Option<GitState>,
    /// Start time, UTC, RFC 3339.
    pub started: String,
    /// End time, UTC, RFC 3339.
    pub ended: Option<String>,
    /// Wall-clock seconds from start to end.
    pub duration_s: Option<f64>,
    /// How the run ended.
    pub status: RunStatus,
    /// The error that ended the run, when it failed.
    pub error: Option<String>,
    /// Every file in the run folder (except this manifest), then the files the script wrote
    /// elsewhere.
    pub files: Vec<FileEntry>,
    /// What engines and the script noted: model and adapter hashes, results.
    pub notes: Map<String, Value>,
}

/// A run in progress and its folder.
pub struct RunRecord {
    dir: PathBuf,
    clock: Instant,
    manifest: Mutex<Manifest>,
    outside: Mutex<Vec<PathBuf>>,
}

static ACTIVE: Mutex<Option<Arc<RunRecord>>> = Mutex::new(None);

fn active_slot() -> std::sync::MutexGuard<'static, Option<Arc<RunRecord>>> {
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

impl RunRecord {
    /// `<root>/<script stem>-<YYYYmmdd-HHMMSS>` (UTC) for a run starting at `now`, with
    /// `-2`, `-3`, … appended when that folder exists already.
    pub fn default_dir(root: &Path, script: &Path, now: SystemTime) -> PathBuf {
        let stem = script
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".to_string());
        let base = format!("{stem}-{}", Utc::from(now).stamp());
        let mut dir = root.join(&base);
        let mut n = 2;
        while dir.exists() {
            dir = root.join(format!("{base}-{n}"));
            n += 1;
        }
        dir
    }

    /// Starts recording a run of `script` into `dir` (created if needed): writes the
    /// manifest with status `running` and makes this the active record.
    pub fn start(
        dir: &Path,
        script: &Path,
        params: &[(String, String)],
        command: Vec<String>,
    ) -> std::io::Result<Arc<RunRecord>> {
        let script_sha256 = sha256_file(script).map_err(|e| with_path(e, script))?;
        std::fs::create_dir_all(dir).map_err(|e| with_path(e, dir))?;
        let params: Map<String, Value> = params
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let seed = params.get("seed").map(|v| {
            let text = v.as_str().unwrap_or_default();
            text.parse::<i64>()
                .map(Value::from)
                .unwrap_or_else(|_| v.clone())
        });
        let manifest = Manifest {
            script: script.display().to_string(),
            script_sha256,
            command,
            params,
            seed,
            rlvr_version: env!("CARGO_PKG_VERSION").to_string(),
            git: git_state(script),
            started: Utc::from(SystemTime::now()).rfc3339(),
            ended: None,
            duration_s: None,
            status: RunStatus::Running,
            error: None,
            files: Vec::new(),
            notes: Map::new(),
        };
        let record = Arc::new(RunRecord {
            dir: dir.to_path_buf(),
            clock: Instant::now(),
            manifest: Mutex::new(manifest),
            outside: Mutex::new(Vec::new()),
        });
        record.write()?;
        *active_slot() = Some(record.clone());
        Ok(record)
    }

    /// The active record, if a run is being recorded.
    pub fn active() -> Option<Arc<RunRecord>> {
        active_slot().clone()
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest as it stands.
    pub fn manifest(&self) -> Manifest {
        self.lock().clone()
    }

    /// Adds `key: value` to the active record's notes (replacing an earlier value), e.g. an
    /// engine noting the hash of the adapter it saved. Does nothing without an active record.
    pub fn note(key: &str, value: Value) {
        if let Some(record) = RunRecord::active() {
            record.lock().notes.insert(key.to_string(), value);
        }
    }

    /// Notes under `key` the path, size and SHA-256 of a file, or of every file in a folder
    /// (a model or adapter directory). Does nothing without an active record.
    pub fn note_artifact(key: &str, path: &Path) -> std::io::Result<()> {
        if RunRecord::active().is_none() {
            return Ok(());
        }
        let files = if path.is_dir() {
            list_files(path)?
                .into_iter()
                .map(|(rel, full)| entry(&full, rel))
                .collect::<std::io::Result<Vec<_>>>()?
        } else {
            vec![entry(path, path.display().to_string())?]
        };
        let value = serde_json::json!({ "path": path.display().to_string(), "files": files });
        RunRecord::note(key, value);
        Ok(())
    }

    /// Remembers that the script wrote the file at `path`, so the manifest lists it even when
    /// it lies outside the run folder. Does nothing without an active record.
    pub fn note_file(path: &Path) {
        if let Some(record) = RunRecord::active() {
            let mut outside = record.outside.lock().unwrap_or_else(|e| e.into_inner());
            if !outside.iter().any(|p| p == path) {
                outside.push(path.to_path_buf());
            }
        }
    }

    /// Ends the run: lists and hashes the files, writes the final manifest and stops being
    /// the active record. Only the first call counts (a second Ctrl-C may race the end of
    /// the script).
    pub fn finish(&self, status: RunStatus, error: Option<&str>) -> std::io::Result<()> {
        {
            let mut manifest = self.lock();
            if manifest.status != RunStatus::Running {
                return Ok(());
            }
            manifest.status = status;
            manifest.error = error.map(str::to_string);
            manifest.ended = Some(Utc::from(SystemTime::now()).rfc3339());
            manifest.duration_s =
                Some((self.clock.elapsed().as_secs_f64() * 1000.0).round() / 1000.0);
        }
        let files = self.files()?;
        self.lock().files = files;
        let written = self.write();
        let mut active = active_slot();
        if active
            .as_ref()
            .is_some_and(|a| std::ptr::eq(a.as_ref(), self))
        {
            *active = None;
        }
        written
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Manifest> {
        self.manifest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files in the run folder, then noted files outside it that still exist.
    fn files(&self) -> std::io::Result<Vec<FileEntry>> {
        let mut files = Vec::new();
        for (rel, full) in list_files(&self.dir)? {
            if rel != MANIFEST {
                files.push(entry(&full, rel)?);
            }
        }
        let inside = std::fs::canonicalize(&self.dir)?;
        let outside = self
            .outside
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for path in outside {
            let Ok(full) = std::fs::canonicalize(&path) else {
                continue;
            };
            if full.starts_with(&inside) || !full.is_file() {
                continue;
            }
            files.push(entry(&full, path.display().to_string())?);
        }
        Ok(files)
    }

    fn write(&self) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(&*self.lock()).map_err(std::io::Error::other)?;
        let path = self.dir.join(MANIFEST);
        std::fs::write(&path, text + "\n").map_err(|e| with_path(e, &path))
    }
}

fn with_path(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn entry(full: &Path, shown: String) -> std::io::Result<FileEntry> {
    Ok(FileEntry {
        path: shown,
        bytes: std::fs::metadata(full)
            .map_err(|e| with_path(e, full))?
            .len(),
        sha256: sha256_file(full).map_err(|e| with_path(e, full))?,
    })
}

/// Every file under `dir`, as (path relative to `dir` with `/` separators, full path),
/// sorted by relative path.
fn list_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for item in std::fs::read_dir(&folder).map_err(|e| with_path(e, &folder))? {
            let path = item?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .expect("found under dir")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                found.push((rel, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// SHA-256 of a file's contents, in hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The commit and dirtiness of the git checkout holding `script`, when git is installed and
/// the script is in a checkout.
fn git_state(script: &Path) -> Option<GitState> {
    let dir = script
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(GitState { commit, dirty })
}

/// A UTC calendar time, to the second.
struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
}

impl From<SystemTime> for Utc {
    /// The civil date from days since 1970 (Howard Hinnant's `civil_from_days`).
    fn from(t: SystemTime) -> Self {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Utc {
            year,
            month,
            day,
            hour: rest / 3600,
            minute: rest % 3600 / 60,
            second: rest % 60,
        }
    }
}

impl Utc {
    fn stamp(&self) -> String {
        format!(
            "{:04}{:02}{:02}-{:02}{:02}{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    fn rfc3339(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_dates_match_known_instants() {
        let at = |s: u64| Utc::from(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0).rfc3339(), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day in a century year) 12:34:56.
        assert_eq!(at(951_827_696).rfc3339(), "2000-02-29T12:34:56Z");
        // 2024-12-31 23:59:59, the last second of a leap year.
        assert_eq!(at(1_735_689_599).stamp(), "20241231-235959");
        assert_eq!(at(1_735_689_600).stamp(), "20250101-000000");
    }

    #[test]
    fn default_folders_are_named_after_the_script_and_never_reused() {
        let root = std::env::temp_dir().join(format!("rlvr-record-{}", std::process::id()));
        let now = UNIX_EPOCH + Duration::from_secs(1_735_689_599);
        let first = RunRecord::default_dir(&root, Path::new("scripts/study.rhai"), now);
        assert_eq!(first, root.join("study-20241231-235959"));
        std::fs::create_dir_all(&first).unwrap();
        let second = RunRecord::default_dir(&root, Path::new("scripts/study.rhai"), now);
        assert_eq!(second, root.join("study-20241231-235959-2"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn sha256_of_a_known_text() {
        let path = std::env::temp_dir().join(format!("rlvr-sha-{}", std::process::id()));
        std::fs::write(&path, "abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
