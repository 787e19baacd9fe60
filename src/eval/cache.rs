//! The resumable evaluation cache: one append-only JSON Lines file per setting (model,
//! adapter fingerprint, preset, shots, generation settings) under
//! `$RLVR_HOME/cache/eval/`, one line per finished item with the model's raw output. A
//! rerun skips the items already there; a killed run loses at most the batch in flight.
//! Predictions are recomputed from the raw output, so a changed filter needs no rerun.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::EvalError;

/// The raw output for one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The item id.
    pub id: String,
    /// A hash of the prompt it was asked with (a changed prompt is asked again).
    pub prompt_hash: String,
    /// The completion (generate mode).
    #[serde(default)]
    pub response: Option<String>,
    /// Each option's log-probability (loglik mode).
    #[serde(default)]
    pub logprobs: Option<Vec<f64>>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub tokens: usize,
}

/// An open cache file.
pub struct Cache {
    path: PathBuf,
    done: HashMap<String, Record>,
    file: Option<File>,
}

/// A short hash of `text`.
pub fn hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Cache {
    /// The cache of `setting` (a description of everything that changes the outputs) in
    /// `dir`, with the records already written; a truncated last line (a killed run) is
    /// ignored.
    pub fn open(dir: &Path, setting: &str) -> Result<Cache, EvalError> {
        let path = dir.join(format!("{}.jsonl", hash(setting)));
        let mut done = HashMap::new();
        if path.is_file() {
            let file = File::open(&path).map_err(|e| io(&path, e))?;
            for line in BufReader::new(file).lines() {
                let line = line.map_err(|e| io(&path, e))?;
                if let Ok(record) = serde_json::from_str::<Record>(&line) {
                    done.insert(record.id.clone(), record);
                }
            }
        }
        Ok(Cache {
            path,
            done,
            file: None,
        })
    }

    /// A cache that keeps nothing (caching turned off).
    pub fn disabled() -> Cache {
        Cache {
            path: PathBuf::new(),
            done: HashMap::new(),
            file: None,
        }
    }

    /// The file, when caching is on.
    pub fn path(&self) -> Option<&Path> {
        (!self.path.as_os_str().is_empty()).then_some(self.path.as_path())
    }

    /// The record of `id` asked with a prompt of hash `prompt_hash`, if finished.
    pub fn get(&self, id: &str, prompt_hash: &str) -> Option<&Record> {
        self.done.get(id).filter(|r| r.prompt_hash == prompt_hash)
    }

    /// Appends finished records and flushes them to disk.
    pub fn append(&mut self, records: &[Record]) -> Result<(), EvalError> {
        if self.path().is_some() {
            if self.file.is_none() {
                if let Some(dir) = self.path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                }
                let mut file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .map_err(|e| io(&self.path, e))?;
                // a killed run may have left half a line: start on a fresh one
                let torn = std::fs::read(&self.path)
                    .map_err(|e| io(&self.path, e))?
                    .last()
                    .is_some_and(|&b| b != b'\n');
                if torn {
                    file.write_all(b"\n").map_err(|e| io(&self.path, e))?;
                }
                self.file = Some(file);
            }
            let file = self.file.as_mut().expect("opened above");
            let mut text = String::new();
            for r in records {
                text.push_str(&serde_json::to_string(r).expect("records serialise"));
                text.push('\n');
            }
            file.write_all(text.as_bytes())
                .and_then(|_| file.flush())
                .map_err(|e| io(&self.path, e))?;
        }
        for r in records {
            self.done.insert(r.id.clone(), r.clone());
        }
        Ok(())
    }
}

fn io(path: &Path, e: std::io::Error) -> EvalError {
    EvalError::Cache(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("rlvr-eval-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let record = |id: &str| Record {
            id: id.into(),
            prompt_hash: "p".into(),
            response: Some("B".into()),
            logprobs: None,
            prompt_tokens: 3,
            tokens: 1,
        };
        let mut cache = Cache::open(&dir, "setting").unwrap();
        cache.append(&[record("a"), record("b")]).unwrap();
        let path = cache.path().unwrap().to_path_buf();
        drop(cache);
        // a run killed while writing leaves half a line
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\": \"c\", \"prom").unwrap();
        let mut cache = Cache::open(&dir, "setting").unwrap();
        cache.append(&[record("d")]).unwrap();
        let cache = Cache::open(&dir, "setting").unwrap();
        assert_eq!(cache.get("d", "p"), Some(&record("d")));
        assert_eq!(cache.get("a", "p"), Some(&record("a")));
        assert!(cache.get("b", "other prompt").is_none());
        assert!(cache.get("c", "p").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
