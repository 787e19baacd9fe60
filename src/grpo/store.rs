//! A training run's files: `manifest.json`, `metrics.jsonl` and `completions.jsonl`
//! (appended after every step), and `checkpoint/` (adapter in PEFT format, optimiser state,
//! step, with `sync_ref_model` the reference adapter, and with `max_staleness` s the
//! policies of the last s steps), replaced atomically.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use polars::prelude::*;
use serde::de::DeserializeOwned;

use super::config::GrpoConfig;
use super::optim::AdamW;
use super::{CompletionRow, GrpoError, StepMetrics};
use crate::model::lm::LanguageModel;

pub(super) struct RunStore {
    dir: PathBuf,
}

/// The synced reference adapter's tensors in a checkpoint, named by their position in
/// [`crate::model::lora::variables`]'s order.
const REFERENCE: &str = "reference.safetensors";

/// The policies of the last `max_staleness` steps in a checkpoint, tensor `<step>/<k>` the
/// `k`-th adapter variable as step `<step>` (from 0) found it.
const STALE: &str = "stale.safetensors";

fn io(path: &Path, e: impl std::fmt::Display) -> GrpoError {
    GrpoError::Store(format!("{}: {e}", path.display()))
}

impl RunStore {
    /// Opens (creating) the run folder and writes its manifest.
    pub fn open(dir: &Path, config: &GrpoConfig) -> Result<Self, GrpoError> {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let manifest = serde_json::json!({
            "rlvr_version": env!("CARGO_PKG_VERSION"),
            "settings": config.manifest(),
        });
        let path = dir.join("manifest.json");
        fs::write(
            &path,
            serde_json::to_string_pretty(&manifest).expect("JSON"),
        )
        .map_err(|e| io(&path, e))?;
        Ok(RunStore {
            dir: dir.to_path_buf(),
        })
    }

    fn metrics_path(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    fn completions_path(&self) -> PathBuf {
        self.dir.join("completions.jsonl")
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    fn old_checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint.old")
    }

    /// Forgets any earlier progress.
    pub fn reset(&mut self) -> Result<(), GrpoError> {
        for path in [self.metrics_path(), self.completions_path()] {
            if path.exists() {
                fs::remove_file(&path).map_err(|e| io(&path, e))?;
            }
        }
        for ckpt in [self.checkpoint_dir(), self.old_checkpoint_dir()] {
            if ckpt.exists() {
                fs::remove_dir_all(&ckpt).map_err(|e| io(&ckpt, e))?;
            }
        }
        Ok(())
    }

    /// Loads the checkpoint into the adapters and optimiser (and the kept policies of
    /// earlier steps into `stale`), drops records of steps after it, and returns its step
    /// (0 without a checkpoint).
    pub fn restore(
        &mut self,
        vars: &[(String, Var)],
        optimizer: &mut AdamW,
        reference: Option<&mut Vec<Tensor>>,
        stale: &mut Vec<(usize, Vec<Tensor>)>,
    ) -> Result<usize, GrpoError> {
        let ckpt = self.checkpoint_dir();
        let old = self.old_checkpoint_dir();
        if !ckpt.exists() && old.exists() {
            // killed between moving the last checkpoint aside and renaming the new one in
            fs::rename(&old, &ckpt).map_err(|e| io(&old, e))?;
        }
        let state_path = ckpt.join("state.json");
        let Ok(text) = fs::read_to_string(&state_path) else {
            self.reset()?;
            return Ok(0);
        };
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| io(&state_path, e))?;
        let step = state
            .get("step")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| io(&state_path, "no `step`"))? as usize;
        let weights = ckpt.join("adapter_model.safetensors");
        let device = vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let tensors =
            candle_core::safetensors::load(&weights, &device).map_err(|e| io(&weights, e))?;
        for (name, var) in vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| io(&weights, format!("no tensor `{name}`")))?;
            crate::model::lora::set(var, t).map_err(|e| io(&weights, e))?;
        }
        optimizer
            .load(&ckpt.join("optimizer.safetensors"))
            .map_err(|e| io(&ckpt, e))?;
        if let Some(values) = reference {
            let path = ckpt.join(REFERENCE);
            let tensors =
                candle_core::safetensors::load(&path, &device).map_err(|e| io(&path, e))?;
            for (k, value) in values.iter_mut().enumerate() {
                *value = tensors
                    .get(&k.to_string())
                    .ok_or_else(|| io(&path, format!("no tensor `{k}`")))?
                    .clone();
            }
        }
        stale.clear();
        let path = ckpt.join(STALE);
        if path.exists() {
            let tensors =
                candle_core::safetensors::load(&path, &device).map_err(|e| io(&path, e))?;
            let mut steps: Vec<usize> = tensors
                .keys()
                .filter_map(|k| k.split_once('/')?.0.parse().ok())
                .collect();
            steps.sort_unstable();
            steps.dedup();
            for at in steps {
                let values = (0..vars.len())
                    .map(|k| {
                        tensors
                            .get(&format!("{at}/{k}"))
                            .cloned()
                            .ok_or_else(|| io(&path, format!("no tensor `{at}/{k}`")))
                    })
                    .collect::<Result<_, _>>()?;
                stale.push((at, values));
            }
        }
        truncate::<StepMetrics>(&self.metrics_path(), |m| m.step <= step)?;
        truncate::<CompletionRow>(&self.completions_path(), |c| c.step <= step)?;
        Ok(step)
    }

    /// Appends one step's records.
    pub fn append(
        &mut self,
        metrics: &StepMetrics,
        rows: &[CompletionRow],
    ) -> Result<(), GrpoError> {
        append_lines(&self.metrics_path(), std::slice::from_ref(metrics))?;
        append_lines(&self.completions_path(), rows)
    }

    /// Saves the adapters, the optimiser and the step, replacing the last checkpoint. The
    /// new one is written and synced in `checkpoint.tmp/`, the old one moved to
    /// `checkpoint.old/`, the new one renamed into place and only then the old one removed:
    /// a kill at any point leaves one whole checkpoint ([`RunStore::restore`] takes
    /// `checkpoint.old/` when `checkpoint/` is missing). `stale` holds the policies of
    /// earlier steps that steps after `step` are sampled by (`max_staleness`).
    pub fn checkpoint(
        &mut self,
        step: usize,
        policy: &LanguageModel,
        optimizer: &AdamW,
        reference: Option<&[Tensor]>,
        stale: &[(usize, Vec<Tensor>)],
    ) -> Result<(), GrpoError> {
        let tmp = self.dir.join("checkpoint.tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        let mut copy = policy.clone();
        copy.save_adapter(&tmp)?;
        optimizer
            .save(&tmp.join("optimizer.safetensors"))
            .map_err(|e| io(&tmp, e))?;
        if let Some(values) = reference {
            let path = tmp.join(REFERENCE);
            let named: std::collections::HashMap<String, Tensor> = values
                .iter()
                .enumerate()
                .map(|(k, t)| (k.to_string(), t.clone()))
                .collect();
            candle_core::safetensors::save(&named, &path).map_err(|e| io(&path, e))?;
        }
        if !stale.is_empty() {
            let path = tmp.join(STALE);
            let named: std::collections::HashMap<String, Tensor> = stale
                .iter()
                .flat_map(|(at, values)| {
                    values
                        .iter()
                        .enumerate()
                        .map(move |(k, t)| (format!("{at}/{k}"), t.clone()))
                })
                .collect();
            candle_core::safetensors::save(&named, &path).map_err(|e| io(&path, e))?;
        }
        let state = tmp.join("state.json");
        fs::write(&state, serde_json::json!({ "step": step }).to_string())
            .map_err(|e| io(&state, e))?;
        sync_folder(&tmp)?;
        let ckpt = self.checkpoint_dir();
        let old = self.old_checkpoint_dir();
        if ckpt.exists() {
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
            }
            fs::rename(&ckpt, &old).map_err(|e| io(&ckpt, e))?;
        }
        fs::rename(&tmp, &ckpt).map_err(|e| io(&ckpt, e))?;
        sync_file(&self.dir)?;
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
        }
        Ok(())
    }

    /// The Metrics and completions tables of the steps recorded so far.
    pub fn tables(&self, reward_names: &[String]) -> Result<(DataFrame, DataFrame), GrpoError> {
        let metrics: Vec<StepMetrics> = read_lines(&self.metrics_path())?;
        let rows: Vec<CompletionRow> = read_lines(&self.completions_path())?;
        let polars = |e: PolarsError| GrpoError::Store(e.to_string());
        let f = |get: fn(&StepMetrics) -> f64| metrics.iter().map(get).collect::<Vec<f64>>();
        let mut columns = vec![
            Column::new(
                "step".into(),
                metrics.iter().map(|m| m.step as u32).collect::<Vec<_>>(),
            ),
            Column::new("loss".into(), f(|m| m.loss)),
            Column::new("reward".into(), f(|m| m.reward)),
            Column::new("reward_std".into(), f(|m| m.reward_std)),
        ];
        for (k, name) in reward_names.iter().enumerate() {
            columns.push(Column::new(
                format!("reward_{name}").into(),
                metrics
                    .iter()
                    .map(|m| m.rewards.get(k).copied().unwrap_or(f64::NAN))
                    .collect::<Vec<_>>(),
            ));
            columns.push(Column::new(
                format!("reward_{name}_std").into(),
                metrics
                    .iter()
                    .map(|m| m.reward_stds.get(k).copied().unwrap_or(f64::NAN))
                    .collect::<Vec<_>>(),
            ));
        }
        columns.extend([
            Column::new("kl".into(), f(|m| m.kl)),
            Column::new("entropy".into(), f(|m| m.entropy)),
            Column::new("logp_mismatch".into(), f(|m| m.logp_mismatch)),
            Column::new(
                "staleness".into(),
                metrics
                    .iter()
                    .map(|m| m.staleness as u32)
                    .collect::<Vec<_>>(),
            ),
            Column::new("clip_ratio".into(), f(|m| m.clip_ratio)),
            Column::new("completion_len".into(), f(|m| m.completion_len)),
            Column::new("frac_zero_std".into(), f(|m| m.frac_zero_std)),
            Column::new("grad_norm".into(), f(|m| m.grad_norm)),
            Column::new("lr".into(), f(|m| m.lr)),
            Column::new("step_s".into(), f(|m| m.step_s)),
            Column::new("tokens_per_s".into(), f(|m| m.tokens_per_s)),
            Column::new("gen_s".into(), f(|m| m.gen_s)),
            Column::new("reward_s".into(), f(|m| m.reward_s)),
            Column::new("train_s".into(), f(|m| m.train_s)),
        ]);
        let metrics_df = DataFrame::new(metrics.len(), columns).map_err(polars)?;
        let mut columns = vec![
            Column::new(
                "step".into(),
                rows.iter().map(|r| r.step as u32).collect::<Vec<_>>(),
            ),
            Column::new(
                "id".into(),
                rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "completion".into(),
                rows.iter()
                    .map(|r| r.completion.as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "reward".into(),
                rows.iter().map(|r| r.reward).collect::<Vec<_>>(),
            ),
        ];
        for (k, name) in reward_names.iter().enumerate() {
            columns.push(Column::new(
                format!("reward_{name}").into(),
                rows.iter()
                    .map(|r| r.rewards.get(k).copied().unwrap_or(f64::NAN))
                    .collect::<Vec<_>>(),
            ));
        }
        columns.extend([
            Column::new(
                "advantage".into(),
                rows.iter().map(|r| r.advantage).collect::<Vec<_>>(),
            ),
            Column::new(
                "tokens".into(),
                rows.iter().map(|r| r.tokens as u32).collect::<Vec<_>>(),
            ),
            Column::new(
                "finish".into(),
                rows.iter().map(|r| r.finish.as_str()).collect::<Vec<_>>(),
            ),
        ]);
        let rows_df = DataFrame::new(rows.len(), columns).map_err(polars)?;
        Ok((metrics_df, rows_df))
    }
}

/// Flushes a file (or a folder's entries) to the disk.
fn sync_file(path: &Path) -> Result<(), GrpoError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

/// Flushes every file in `dir`, then the folder itself.
fn sync_folder(dir: &Path) -> Result<(), GrpoError> {
    for entry in fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        if path.is_file() {
            sync_file(&path)?;
        }
    }
    sync_file(dir)
}

fn append_lines<T: serde::Serialize>(path: &Path, values: &[T]) -> Result<(), GrpoError> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io(path, e))?;
    let mut text = String::new();
    for v in values {
        text.push_str(&serde_json::to_string(v).expect("JSON"));
        text.push('\n');
    }
    file.write_all(text.as_bytes()).map_err(|e| io(path, e))?;
    file.sync_data().map_err(|e| io(path, e))
}

/// The records of a JSON-lines file; a torn last line (a crash mid-write) is ignored.
fn read_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, GrpoError> {
    let Ok(file) = File::open(path) else {
        return Ok(vec![]);
    };
    let mut out = vec![];
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|e| io(path, e))?;
    let n = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        match serde_json::from_str(&line) {
            Ok(v) => out.push(v),
            Err(_) if i + 1 == n => {}
            Err(e) => return Err(io(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(out)
}

fn truncate<T: DeserializeOwned + serde::Serialize>(
    path: &Path,
    keep: impl Fn(&T) -> bool,
) -> Result<(), GrpoError> {
    let kept: Vec<T> = read_lines::<T>(path)?
        .into_iter()
        .filter(|v| keep(v))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    if tmp.exists() {
        fs::remove_file(&tmp).map_err(|e| io(&tmp, e))?;
    }
    append_lines(&tmp, &kept)?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))
}
