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

/// What `rlvr bench model` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelTask {
    /// One forward pass over a 256-token prompt (the last position's logits).
    Prefill,
    /// Greedy generation of new tokens for a batch of copies of a short prompt.
    Decode,
    /// One LoRA forward and backward pass over a batch of 256-token rows.
    Lora,
}

/// Figures of one model benchmark task.
#[derive(Debug, Serialize)]
pub struct ModelReport {
    /// What was measured.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// The task.
    pub task: String,
    /// Rows in the batch.
    pub batch: usize,
    /// Tokens per row (prompt tokens, or new tokens for decoding).
    pub tokens: usize,
    /// Seconds of the timed step (after one warm-up for prefill and LoRA).
    pub seconds: f64,
    /// Tokens processed per second.
    pub tokens_per_s: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
}

/// Runs one model benchmark on `model` with the token ids of `ids` (a JSON file with
/// `prompt_256` and `prompt_16` arrays), the model on `placement`.
pub fn model(
    model_path: &Path,
    ids_path: &Path,
    task: ModelTask,
    batch: usize,
    new_tokens: usize,
    placement: &crate::model::Placement,
) -> anyhow::Result<ModelReport> {
    use crate::model::generate::{generate, Sampling};
    use crate::model::{logprob, lora, Input, Model};
    use candle_core::Tensor;

    let ids: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ids_path)?)?;
    let row = |key: &str| -> anyhow::Result<Vec<u32>> {
        Ok(ids[key]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("{}: no `{key}` array", ids_path.display()))?
            .iter()
            .filter_map(|v| v.as_u64().map(|i| i as u32))
            .collect())
    };
    let device = placement.device.clone();
    let mut m = Model::load_on(model_path, placement)?;
    let (batch, tokens, seconds) = match task {
        ModelTask::Prefill => {
            let prompt = row("prompt_256")?;
            let step = |m: &Model| -> anyhow::Result<()> {
                let input = Input::unpadded(std::slice::from_ref(&prompt), 0, &device)?;
                let hidden = m.forward(&input, None, false)?;
                let last = hidden.squeeze(0)?.narrow(0, prompt.len() - 1, 1)?;
                logprob::logits_of(&last, m.lm_head(), m.logit_softcap())?;
                // a GPU runs asynchronously: the step ends when its work has
                device.synchronize()?;
                Ok(())
            };
            step(&m)?;
            let start = Instant::now();
            step(&m)?;
            (1, prompt.len(), start.elapsed().as_secs_f64())
        }
        ModelTask::Decode => {
            let prompt = row("prompt_16")?;
            let prompts = vec![prompt; batch];
            let requests = vec![
                Sampling {
                    max_tokens: new_tokens,
                    temperature: 0.0,
                    ..Sampling::default()
                };
                batch
            ];
            let start = Instant::now();
            generate(&m, &prompts, &requests, false, None, &mut |_| true)?;
            (batch, new_tokens, start.elapsed().as_secs_f64())
        }
        ModelTask::Lora => {
            let prompt = row("prompt_256")?;
            let config = lora::LoraConfig {
                rank: 16,
                alpha: 32.0,
                ..lora::LoraConfig::default()
            };
            lora::attach(&mut m, &config)?;
            let rows = vec![prompt.clone(); batch];
            let step = |m: &Model| -> anyhow::Result<()> {
                let input = Input::unpadded(&rows, 0, &device)?;
                let hidden = m.forward(&input, None, true)?;
                let (b, s, d) = hidden.dims3()?;
                let states = hidden.narrow(1, 0, s - 1)?.reshape((b * (s - 1), d))?;
                let targets: Vec<u32> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
                let targets = Tensor::new(targets, &device)?;
                let logprobs = logprob::gather_logprobs(
                    &states,
                    m.lm_head(),
                    &targets,
                    m.logit_softcap(),
                    1.0,
                )?;
                logprobs.sum_all()?.neg()?.backward()?;
                device.synchronize()?;
                Ok(())
            };
            step(&m)?;
            let start = Instant::now();
            step(&m)?;
            (batch, prompt.len(), start.elapsed().as_secs_f64())
        }
    };
    Ok(ModelReport {
        implementation: format!("rlvr {}", env!("CARGO_PKG_VERSION")),
        task: format!("{task:?}").to_lowercase(),
        batch,
        tokens,
        seconds,
        tokens_per_s: (batch * tokens) as f64 / seconds,
        peak_rss_mib: peak_rss_mib(),
    })
}
