//! rlvr-lab: a workbench for reinforcement learning with verifiable rewards (RLVR) on
//! language models. This crate is its library: data, models, engines, reports and the
//! script engine; the front ends over it are crates of their own in the workspace (`cli/`,
//! the `rlvr` binary; `kernel/`, the Jupyter kernel; `serve/`, the OpenAI-compatible
//! server), so a program using the library compiles no ZeroMQ and no HTTP server.
//!
//! Cargo features: `http` (on by default) is the HTTP client — fetching models from the
//! package registries and the Hugging Face hub, and OpenAI-compatible servers as
//! [`endpoint`]s for judging, evaluation and served rollouts; without it the library
//! loads local models only and has no network code of its own (polars still brings reqwest
//! and tokio). `cuda` builds for NVIDIA GPUs.
//!
//! Layers, imports pointing down only: the script engine ([`script`]) over engines over the
//! core ([`data`], [`model`]). See `docs/architecture.md`.

pub mod data;
#[cfg(feature = "http")]
pub mod endpoint;
pub mod eval;
pub mod grpo;
pub mod judge;
pub mod model;
pub mod models;
pub mod paths;
pub mod progress;
pub mod prompt;
pub mod report;
pub mod reward;
pub mod runtime;
pub mod script;
pub mod sft;

/// Unit tests run with the binary's process settings and allocator (see [`runtime`]).
#[cfg(test)]
mod test_runtime {
    #[global_allocator]
    static ALLOCATOR: crate::runtime::Allocator = crate::runtime::Allocator;

    #[ctor::ctor(unsafe)]
    fn runtime_settings() {
        crate::runtime::init();
    }
}
