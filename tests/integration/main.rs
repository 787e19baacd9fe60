//! The integration tests, in one binary so they link once.

mod bad_input;
mod bench;
mod bf16;
mod cli;
mod downloads;
mod endpoint;
mod eval;
mod export;
mod faults;
mod fleet;
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
mod seeds;
mod serve;
mod serving;
mod sft;
mod study;
mod tokenizer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The allocator the binary runs with.
#[global_allocator]
static ALLOCATOR: rlvr::runtime::Allocator = rlvr::runtime::Allocator;

/// The binary's process settings (threads, allocator options, table format), applied
/// before the test harness starts its threads, so tests in this process run as the binary;
/// and the repository root as the working directory (cargo starts a test in its package's
/// folder, `cli/`), where the tests' relative paths (`data/samples/…`) point.
#[ctor::ctor(unsafe)]
fn runtime_settings() {
    rlvr::runtime::init();
    std::env::set_current_dir(repo("")).expect("the repository root");
}

#[test]
fn the_test_process_runs_with_the_runtime_settings() {
    let settings = rlvr::runtime::applied().expect("init ran before the harness");
    assert!(settings.threads >= 1);
    let var = |key: &str| std::env::var(key).unwrap_or_default();
    assert_eq!(var("RAYON_NUM_THREADS"), settings.threads.to_string());
    assert_eq!(
        var("CANDLE_NUM_THREADS"),
        settings.candle_threads.to_string()
    );
    assert!(!var("POLARS_FMT_MAX_ROWS").is_empty());
}

/// The `rlvr` binary with `args`, run from the repository root. A `run` that names no run
/// folder (`--out`, or `--set out=…`) gets a fresh one under the system's temporary folder,
/// so that no test leaves a `runs/` folder in the checkout.
pub fn rlvr(args: &[&str]) -> Command {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let mut command = Command::new(env!("CARGO_BIN_EXE_rlvr"));
    command.current_dir(repo("")).args(args);
    let names_folder = args
        .iter()
        .any(|a| *a == "--out" || a.starts_with("--out=") || a.starts_with("out="));
    if args.contains(&"run") && !names_folder {
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rlvr-test-runs-{}", std::process::id()));
        command.arg("--out").arg(dir.join(n.to_string()));
    }
    command
}

/// Waits (up to a minute) until `ready`, then kills `child` with SIGKILL and reaps it: a
/// crash in the middle of a long job.
pub fn kill_when(child: &mut std::process::Child, ready: impl Fn() -> bool) {
    let mut waited = 0;
    while !ready() && waited < 6000 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

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

/// A path inside the repository (these tests belong to the package in `cli/`).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ sits in the repository")
        .join(path)
}

/// The tiny Gemma 3 fixture with the tiny tokenizer and fresh LoRA adapters (r 8, alpha 16)
/// seeded with `seed`.
pub fn tiny_policy(seed: u64) -> rlvr::model::lm::LanguageModel {
    let base = rlvr::model::lm::LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    base.with_lora(&rlvr::model::lora::LoraConfig {
        rank: 8,
        alpha: 16.0,
        seed,
        ..Default::default()
    })
    .unwrap()
}
