//! Models from the Hugging Face hub by id (`org/name`), through `hf-hub`: the files a
//! model directory needs land in the hub's own cache (`$HF_HOME/hub`, shared with Python's
//! `huggingface_hub`), and the snapshot folder is loaded like any local directory. Files
//! already in the cache are used without asking the network.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, CacheRepo};
use serde_json::Value;

use super::{Hub, ModelsError, Result};
use crate::progress::{Job, Progress};

/// Downloads what a model directory needs from the hub (`config.json`, the safetensors
/// file or shards, `tokenizer.json`, and `tokenizer_config.json` where there is one) and
/// returns the snapshot folder holding them. Files already in the cache are not asked for
/// again, so a model fetched once loads offline. Fails with the address tried when the
/// hub cannot be reached.
pub fn download(repo_id: &str, hub: &Hub, job: &Job) -> Result<PathBuf> {
    let cache = hub
        .cache_dir
        .clone()
        .map_or_else(Cache::from_env, Cache::new);
    let mut builder = ApiBuilder::from_cache(cache.clone()).with_progress(false);
    let endpoint = hub
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()))
        .unwrap_or_else(|| "https://huggingface.co".to_string());
    builder = builder.with_endpoint(endpoint.clone());
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|e| hub_error(repo_id, &endpoint, &e))?;
    let mut files = RepoFiles {
        remote: api.model(repo_id.to_string()),
        cached: cache.model(repo_id.to_string()),
        repo_id,
        job,
        from_cache: 0,
        downloaded: false,
    };
    super::download::block_on(async {
        let config = files.get("config.json").await?;
        match files.get_optional("model.safetensors.index.json").await? {
            Some(index) => {
                for shard in shards(&index)? {
                    files.get(&shard).await?;
                }
            }
            None => {
                files.get("model.safetensors").await?;
            }
        }
        files.get("tokenizer.json").await?;
        files.get_optional("tokenizer_config.json").await?;
        Ok(config
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf))
    })?
}

/// The shard files an index names.
fn shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelsError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| ModelsError::Registry {
        url: index.display().to_string(),
        message: format!("not valid JSON: {e}"),
    })?;
    let mut files: Vec<String> = json
        .get("weight_map")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The files of one repository, from the cache when there, else from the hub.
struct RepoFiles<'a> {
    remote: ApiRepo,
    cached: CacheRepo,
    repo_id: &'a str,
    job: &'a Job,
    /// Files found in the cache so far.
    from_cache: usize,
    /// Whether any file came from the hub.
    downloaded: bool,
}

impl RepoFiles<'_> {
    async fn get(&mut self, file: &str) -> Result<PathBuf> {
        self.get_optional(file)
            .await?
            .ok_or_else(|| ModelsError::Hub {
                repo: self.repo_id.to_string(),
                url: self.remote.url(file),
                message: "no such file in the repository".into(),
            })
    }

    /// A file of the repository, `None` when the repository has none. Offline, a file
    /// missing from a cache that held everything asked for so far counts as absent (the
    /// earlier download found no such file).
    async fn get_optional(&mut self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(path) = self.cached.get(file) {
            self.from_cache += 1;
            return Ok(Some(path));
        }
        self.job.check().map_err(|_| ModelsError::Cancelled)?;
        let progress = HubProgress {
            progress: self.job.progress.clone(),
            done: Arc::new(AtomicU64::new(0)),
        };
        match self.remote.download_with_progress(file, progress).await {
            Ok(path) => {
                self.downloaded = true;
                Ok(Some(path))
            }
            Err(ApiError::RequestError(e))
                if e.status() == Some(reqwest::StatusCode::NOT_FOUND) =>
            {
                Ok(None)
            }
            Err(ApiError::RequestError(e))
                if e.status().is_none() && self.from_cache > 0 && !self.downloaded =>
            {
                Ok(None)
            }
            Err(e) => Err(hub_error(self.repo_id, &self.remote.url(file), &e)),
        }
    }
}

fn hub_error(repo_id: &str, url: &str, e: &ApiError) -> ModelsError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    if let ApiError::RequestError(r) = e {
        match r.status().map(|s| s.as_u16()) {
            Some(401 | 403) => message.push_str(
                " (a gated or private model: accept its licence on the hub and set HF_TOKEN)",
            ),
            None => message.push_str(" (is the network reachable?)"),
            Some(_) => {}
        }
    }
    ModelsError::Hub {
        repo: repo_id.to_string(),
        url: url.to_string(),
        message,
    }
}

/// `hf-hub`'s progress callbacks forwarded to a [`Progress`].
#[derive(Clone)]
struct HubProgress {
    progress: Arc<dyn Progress>,
    done: Arc<AtomicU64>,
}

impl hf_hub::api::tokio::Progress for HubProgress {
    async fn init(&mut self, size: usize, filename: &str) {
        self.done.store(0, Ordering::SeqCst);
        self.progress.start_bytes(filename, size as u64);
    }

    async fn update(&mut self, size: usize) {
        let done = self.done.fetch_add(size as u64, Ordering::SeqCst) + size as u64;
        self.progress.update(done, "");
    }

    async fn finish(&mut self) {
        self.progress.finish("");
    }
}
