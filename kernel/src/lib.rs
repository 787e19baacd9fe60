//! The Jupyter kernel for Rhai: `rlvr kernel install` writes its kernelspec, `rlvr kernel
//! --connection-file F` runs it. Only this crate knows Jupyter (the library `rlvr` does
//! not, as evcxr's evaluator knows nothing of `evcxr_jupyter`); it evaluates cells in a
//! [`rlvr::script::Session`] (one scope across cells) and implements
//! [`rlvr::script::Output`] so that a cell's prints, displays and progress bars reach the
//! notebook while it runs.
//!
//! - `server`: the protocol (sockets, signatures, the control channel's requests);
//! - `shell`: the shell channel's requests (execute, complete, inspect, history, …);
//! - `output`: the [`rlvr::script::Output`] of a running cell, and progress displays;
//! - `display`: MIME bundles by value kind (tables, plots, text);
//! - `history`: the cells run so far;
//! - [`install`]: the kernelspec, with the logos of `kernelspec/`.

mod display;
mod history;
pub mod install;
mod output;
mod server;
mod shell;

use std::path::Path;

use anyhow::{Context, Result};
use jupyter_protocol::ConnectionInfo;

/// Runs the kernel described by the connection file at `path` until a `shutdown_request`.
pub fn run(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the connection file {}", path.display()))?;
    let info: ConnectionInfo = serde_json::from_str(&text)
        .with_context(|| format!("reading the connection file {}", path.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the kernel's runtime")?;
    runtime.block_on(server::serve(info))?;
    // The session thread may still be inside a cell; the process ends with the kernel.
    std::process::exit(0);
}

/// Unit tests run with the binary's process settings and allocator (see [`rlvr::runtime`]).
#[cfg(test)]
mod test_runtime {
    #[global_allocator]
    static ALLOCATOR: rlvr::runtime::Allocator = rlvr::runtime::Allocator;

    #[ctor::ctor(unsafe)]
    fn runtime_settings() {
        rlvr::runtime::init();
    }
}
