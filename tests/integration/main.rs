//! The integration tests, in one binary so they link once.

mod bad_input;
mod cli;
mod generation;
mod gguf;
mod loaders;
mod model_parity;
mod tokenizer;

use std::path::PathBuf;

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}
