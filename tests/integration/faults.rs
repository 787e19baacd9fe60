//! The short variant of the kill-and-resume campaign (`tests/faults/kill.sh`): for judging,
//! GRPO and evaluation, two runs of `tests/faults/<engine>.rhai` killed with SIGKILL (once
//! just after the first unit of work is written, once at a random time), each rerun to the
//! end; the final outputs are byte-identical to an uninterrupted run's, and a killed
//! training run redoes at most one finished step.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::repo;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-faults-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(engine: &str, home: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .current_dir(repo(""))
        .env("RLVR_HOME", home)
        .args(["--quiet", "run", &format!("tests/faults/{engine}.rhai")])
        .args(["--set", &format!("out={}", home.join("out").display())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files that record an engine's finished work.
fn progress_files(engine: &str, home: &Path) -> Vec<PathBuf> {
    let cache = home.join("cache").join(engine);
    let Ok(entries) = std::fs::read_dir(&cache) else {
        return vec![];
    };
    entries
        .map(|e| e.unwrap().path())
        .map(|p| {
            if engine == "grpo" {
                p.join("metrics.jsonl")
            } else {
                p
            }
        })
        .collect()
}

/// Units of work finished and written (whole JSON lines).
fn recorded(engine: &str, home: &Path) -> usize {
    progress_files(engine, home)
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|t| {
            t.lines()
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
                .count()
        })
        .sum()
}

/// Units a rerun starts from: the cache's lines, or the training checkpoint's step.
fn kept(engine: &str, home: &Path) -> usize {
    if engine != "grpo" {
        return recorded(engine, home);
    }
    progress_files(engine, home)
        .iter()
        .filter_map(|metrics| {
            let run = metrics.parent().unwrap();
            ["checkpoint", "checkpoint.old"]
                .iter()
                .find_map(|c| std::fs::read_to_string(run.join(c).join("state.json")).ok())
        })
        .map(|t| {
            serde_json::from_str::<serde_json::Value>(&t).unwrap()["step"]
                .as_u64()
                .unwrap() as usize
        })
        .sum()
}

fn outputs(engine: &str) -> &'static [&'static str] {
    match engine {
        "judge" => &["judged.json"],
        "eval" => &["results.json"],
        _ => &[
            "adapter/adapter_model.safetensors",
            "metrics.json",
            "completions.json",
        ],
    }
}

fn campaign(engine: &str) {
    let whole = scratch(&format!("{engine}-whole"));
    let started = Instant::now();
    finish(start(engine, &whole));
    let duration = started.elapsed();
    // a pseudo-random point from the clock: somewhere in the uninterrupted run's time
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let random_delay = duration.mul_f64(f64::from(nanos % 1000) / 1000.0);
    for (k, first_unit) in [(1, true), (2, false)] {
        let home = scratch(&format!("{engine}-{k}"));
        let mut child = start(engine, &home);
        if first_unit {
            super::kill_when(&mut child, || recorded(engine, &home) >= 1);
        } else {
            std::thread::sleep(random_delay);
            let _ = child.kill();
            child.wait().unwrap();
        }
        let (done, from) = (recorded(engine, &home), kept(engine, &home));
        assert!(
            done - from <= 1,
            "{engine}: killed with {done} units written and {from} kept"
        );
        finish(start(engine, &home));
        for file in outputs(engine) {
            assert!(
                std::fs::read(whole.join("out").join(file)).unwrap()
                    == std::fs::read(home.join("out").join(file)).unwrap(),
                "{engine}: {file} after a kill ({done} units written, {from} kept) differs \
                 from the uninterrupted run's"
            );
        }
        let _ = std::fs::remove_dir_all(&home);
    }
    let _ = std::fs::remove_dir_all(&whole);
}

#[test]
fn judging_killed_at_random_points_resumes_to_the_same_table() {
    campaign("judge");
}

#[test]
fn training_killed_at_random_points_resumes_to_the_same_adapter() {
    campaign("grpo");
}

#[test]
fn evaluation_killed_at_random_points_resumes_to_the_same_results() {
    campaign("eval");
}
