//! The integration tests, in one binary so they link once.

mod bad_input;
mod bench;
mod bf16;
mod cli;
mod downloads;
mod endpoint;
mod eval;
mod export;
mod generation;
mod gguf;
mod grpo;
mod grpo_parity;
mod judge;
mod kernel;
mod loaders;
mod model_parity;
mod plots;
mod real_models;
mod run_records;
mod serve;
mod serving;
mod study;
mod tokenizer;

use std::path::PathBuf;

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The largest absolute value of a tensor.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}
