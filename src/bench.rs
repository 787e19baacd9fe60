//! Benchmarks behind `rlvr bench`: each measures one capability on real data and reports
//! figures as one JSON line, so a driver script (`benches/`) can set them beside a reference
//! implementation run on the same machine.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::data::{self, LoadOptions, Result};

/// Figures of the loading benchmark.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    /// What was measured.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Rows of the MMLU test split.
    pub mmlu_rows: usize,
    /// Rows of the CMMLU test split.
    pub cmmlu_rows: usize,
    /// Rows of the MMLU-Pro test split.
    pub mmlu_pro_rows: usize,
    /// Seconds to load all three into Items tables.
    pub wall_s: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
}

/// Loads the full MMLU, CMMLU and MMLU-Pro test splits found under `data_dir` (the
/// published layouts: `mmlu/`, `cmmlu/`, `mmlu_pro/`) into Items tables.
pub fn load(data_dir: &Path) -> Result<LoadReport> {
    let options = LoadOptions::default();
    let start = Instant::now();
    let mmlu = data::load("mmlu", &data_dir.join("mmlu"), &options)?;
    let cmmlu = data::load("cmmlu", &data_dir.join("cmmlu"), &options)?;
    let mmlu_pro = data::load("mmlu_pro", &data_dir.join("mmlu_pro"), &options)?;
    let wall_s = start.elapsed().as_secs_f64();
    Ok(LoadReport {
        implementation: format!("rlvr {}", env!("CARGO_PKG_VERSION")),
        mmlu_rows: mmlu.height(),
        cmmlu_rows: cmmlu.height(),
        mmlu_pro_rows: mmlu_pro.height(),
        wall_s,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`; 0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
