//! `rlvr run` records every run: a folder with `manifest.json` (script and hash, params,
//! seed, version, git commit, times, status, files with hashes, notes) and the files the
//! script saved there.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::repo;

fn rlvr() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rlvr"));
    command.current_dir(repo(""));
    command
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-runs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn manifest(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn sha256(path: &Path) -> String {
    rlvr::report::record::sha256_file(path).unwrap()
}

fn is_utc_time(v: &Value) -> bool {
    let s = v.as_str().unwrap_or_default();
    s.len() == 20 && s.ends_with('Z') && s.as_bytes()[10] == b'T'
}

#[test]
fn a_run_writes_its_manifest_and_files_into_the_run_folder() {
    let dir = scratch("ok").join("run");
    let out = rlvr()
        .args(["run", "tests/scripts/report.rhai", "--out"])
        .arg(&dir)
        .args(["--set", "seed=7", "--set", "label=first try"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("run folder: {}", dir.display())),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!(
            "plot saved to {}",
            dir.join("plot-1.png").display()
        )),
        "{stdout}"
    );

    let m = manifest(&dir);
    assert_eq!(m["script"], "tests/scripts/report.rhai");
    assert_eq!(
        m["script_sha256"],
        sha256(&repo("tests/scripts/report.rhai"))
    );
    assert_eq!(m["params"]["seed"], "7");
    assert_eq!(m["params"]["label"], "first try");
    assert_eq!(m["seed"], 7);
    assert_eq!(m["rlvr_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(m["status"], "ok");
    assert!(m["error"].is_null());
    assert!(
        is_utc_time(&m["started"]) && is_utc_time(&m["ended"]),
        "{m}"
    );
    assert!(m["duration_s"].as_f64().unwrap() >= 0.0);
    assert!(m["command"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "--out"));
    assert_eq!(m["notes"]["categories"], 4);
    assert_eq!(m["notes"]["label"], "first try");

    let git = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo(""))
        .output();
    match git {
        Ok(g) if g.status.success() => {
            assert_eq!(
                m["git"]["commit"],
                String::from_utf8_lossy(&g.stdout).trim()
            );
            assert!(m["git"]["dirty"].is_boolean());
        }
        _ => assert!(m["git"].is_null(), "no git checkout, no commit: {m}"),
    }

    let files: Vec<&Value> = m["files"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(names, ["by_category.csv", "plot-1.png", "questions.svg"]);
    for f in files {
        let path = dir.join(f["path"].as_str().unwrap());
        assert_eq!(f["sha256"], sha256(&path));
        assert_eq!(f["bytes"], std::fs::metadata(&path).unwrap().len());
    }
    assert_eq!(
        &std::fs::read(dir.join("plot-1.png")).unwrap()[..4],
        b"\x89PNG"
    );
    assert!(std::fs::read_to_string(dir.join("questions.svg"))
        .unwrap()
        .contains("questions per category"));
}

#[test]
fn without_out_a_run_gets_a_dated_folder_under_runs() {
    let cwd = scratch("default");
    let script = cwd.join("tiny.rhai");
    std::fs::write(&script, "print(run_dir());\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .args(["--quiet", "run", "tiny.rhai"])
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "--quiet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let name = printed.strip_prefix("runs/").expect("under runs/");
    let stamp = name.strip_prefix("tiny-").expect("named after the script");
    assert_eq!(stamp.len(), 15, "{stamp}");
    assert!(
        stamp
            .chars()
            .enumerate()
            .all(|(i, c)| if i == 8 { c == '-' } else { c.is_ascii_digit() }),
        "{stamp}"
    );
    let m = manifest(&cwd.join(&printed));
    assert_eq!(m["status"], "ok");
    assert!(m["seed"].is_null());
    assert_eq!(m["files"].as_array().unwrap().len(), 0);
}

#[test]
fn a_failing_run_is_recorded_with_its_error() {
    let dir = scratch("error");
    let out = rlvr()
        .args(["run", "tests/scripts/error.rhai", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let m = manifest(&dir);
    assert_eq!(m["status"], "error");
    assert!(
        m["error"]
            .as_str()
            .unwrap()
            .contains("tests/scripts/error.rhai:4:12"),
        "{m}"
    );
    assert!(is_utc_time(&m["ended"]));
}

#[test]
fn ctrl_c_marks_the_run_interrupted() {
    let dir = scratch("interrupt");
    let script = dir.join("forever.rhai");
    std::fs::write(&script, "print(\"ready\");\nlet n = 0;\nloop { n += 1; }\n").unwrap();
    let run_dir = dir.join("run");
    let mut child = rlvr()
        .arg("run")
        .arg(&script)
        .arg("--out")
        .arg(&run_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "ready");
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let m = manifest(&run_dir);
    assert_eq!(m["status"], "interrupted");
    assert!(m["error"].as_str().unwrap().contains("interrupted"), "{m}");
}
