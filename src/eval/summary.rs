//! Results tables summed up: accuracy per group with a 95 % interval, the overall and
//! medical-subset rows, micro or macro averaging ([`summary`]); several models side by side
//! on their shared questions with the difference and a paired test, seeds of one setting
//! as mean ± sd ([`compare`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use polars::prelude::*;

use super::stats::{mcnemar_exact, mean_sd, paired_bootstrap, wilson, Z95};
use super::EvalError;

/// How questions are averaged into a group's accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Average {
    /// Every question weighs the same (lm-evaluation-harness, MMLU's and MMLU-Pro's own
    /// scripts).
    Micro,
    /// The mean of the subjects' accuracies (CMMLU's own script, OpenCompass).
    Macro,
}

impl Average {
    /// The average called `name` (`micro` or `macro`).
    pub fn by_name(name: &str) -> Result<Average, EvalError> {
        match name {
            "micro" => Ok(Average::Micro),
            "macro" => Ok(Average::Macro),
            other => Err(EvalError::Option(format!(
                "unknown average `{other}`; averages: micro (over questions), macro (over subjects)"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Average::Micro => "micro",
            Average::Macro => "macro",
        }
    }
}

/// The row label of the overall group.
pub const ALL: &str = "all";
/// The row label of the core medical subset.
pub const MEDICAL: &str = "medical";
/// The row label of the extended medical subset.
pub const MEDICAL_EXT: &str = "medical (extended)";

/// One Results row as the summaries read it.
pub(super) struct Row {
    pub(super) id: String,
    pub(super) model: String,
    pub(super) group: String,
    subject: String,
    pub(super) correct: f64,
    medical: bool,
    medical_ext: bool,
    pub(super) seed: u64,
    setting: String,
}

fn text_column(df: &DataFrame, name: &str) -> Result<Option<Vec<String>>, EvalError> {
    match df.column(name) {
        Ok(c) => {
            let s = c.cast(&DataType::String)?;
            Ok(Some(
                s.str()?
                    .iter()
                    .map(|v| v.unwrap_or("").to_string())
                    .collect(),
            ))
        }
        Err(_) => Ok(None),
    }
}

fn bool_column(df: &DataFrame, name: &str) -> Result<Option<Vec<bool>>, EvalError> {
    match df.column(name) {
        Ok(c) => Ok(Some(
            c.cast(&DataType::Boolean)?
                .bool()?
                .iter()
                .map(|v| v.unwrap_or(false))
                .collect(),
        )),
        Err(_) => Ok(None),
    }
}

/// The rows of a Results table, grouped by column `by`, scored by the true/false `column`.
pub(super) fn rows(df: &DataFrame, by: &str, column: &str) -> Result<Vec<Row>, EvalError> {
    let need = |name: &str| -> Result<Vec<String>, EvalError> {
        text_column(df, name)?.ok_or_else(|| {
            EvalError::Option(format!(
                "the table has no `{name}` column (a Results table from `evaluate` is needed)"
            ))
        })
    };
    let ids = need("id")?;
    let groups = if by.is_empty() || by == ALL {
        vec![ALL.to_string(); df.height()]
    } else {
        need(by)?
    };
    let correct = bool_column(df, column)?.ok_or_else(|| {
        EvalError::Option(format!("the table has no `{column}` column of true/false"))
    })?;
    let n = df.height();
    let models = text_column(df, "model")?.unwrap_or_else(|| vec![String::new(); n]);
    let subjects = text_column(df, "subject")?.unwrap_or_else(|| vec![String::new(); n]);
    let medical = bool_column(df, "medical")?.unwrap_or_else(|| vec![false; n]);
    let medical_ext = bool_column(df, "medical_ext")?.unwrap_or_else(|| vec![false; n]);
    let seeds: Vec<u64> = match df.column("seed") {
        Ok(c) => c
            .cast(&DataType::UInt64)?
            .u64()?
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect(),
        Err(_) => vec![0; n],
    };
    let setting_cols: Vec<Vec<String>> = ["model", "adapter", "preset", "mode", "shots"]
        .iter()
        .map(|c| text_column(df, c).map(|v| v.unwrap_or_else(|| vec![String::new(); n])))
        .collect::<Result<_, _>>()?;
    Ok((0..n)
        .map(|i| Row {
            id: ids[i].clone(),
            model: models[i].clone(),
            group: groups[i].clone(),
            subject: subjects[i].clone(),
            correct: f64::from(u8::from(correct[i])),
            medical: medical[i],
            medical_ext: medical_ext[i],
            seed: seeds[i],
            setting: setting_cols
                .iter()
                .map(|c| c[i].as_str())
                .collect::<Vec<_>>()
                .join("\u{1f}"),
        })
        .collect())
}

/// The group labels of rows: each value of `by` in order, then `all`, then the medical
/// subsets when any row is in them.
pub(super) fn group_labels(rows: &[&Row], by: &str) -> Vec<String> {
    let mut labels: Vec<String> = if by.is_empty() || by == ALL {
        vec![]
    } else {
        let set: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.group.as_str()).collect();
        set.into_iter().map(str::to_string).collect()
    };
    labels.push(ALL.into());
    if rows.iter().any(|r| r.medical) {
        labels.push(MEDICAL.into());
    }
    if rows.iter().any(|r| r.medical_ext) {
        labels.push(MEDICAL_EXT.into());
    }
    labels
}

/// Whether a row belongs to the group labelled `label`.
pub(super) fn in_group(row: &Row, label: &str, by: &str) -> bool {
    match label {
        ALL => true,
        MEDICAL => row.medical,
        MEDICAL_EXT => row.medical_ext,
        _ => !by.is_empty() && row.group == label,
    }
}

/// The name of the output column of the groups: `by`, or `group` for the overall rows alone
/// (and for `model`, which is a column of its own).
pub(super) fn group_column(by: &str) -> &str {
    if by.is_empty() || by == ALL || by == "model" {
        "group"
    } else {
        by
    }
}

/// Accuracy and its interval for a set of rows.
struct Stat {
    n: usize,
    n_correct: f64,
    accuracy: f64,
    low: f64,
    high: f64,
}

fn stat(rows: &[&Row], average: Average) -> Stat {
    let n = rows.len();
    let k: f64 = rows.iter().map(|r| r.correct).sum();
    match average {
        Average::Micro => {
            let (low, high) = wilson(k, n as f64);
            Stat {
                n,
                n_correct: k,
                accuracy: if n > 0 { k / n as f64 } else { f64::NAN },
                low,
                high,
            }
        }
        Average::Macro => {
            let mut subjects: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
            for r in rows {
                let e = subjects.entry(r.subject.as_str()).or_default();
                e.0 += r.correct;
                e.1 += 1.0;
            }
            let s = subjects.len() as f64;
            let accuracy = subjects.values().map(|(k, n)| k / n).sum::<f64>() / s;
            // the mean of independent binomial proportions: var = Σ p(1-p)/n / S²
            let var = subjects
                .values()
                .map(|(k, n)| {
                    let p = k / n;
                    p * (1.0 - p) / n
                })
                .sum::<f64>()
                / (s * s);
            let half = Z95 * var.sqrt();
            Stat {
                n,
                n_correct: k,
                accuracy,
                low: (accuracy - half).max(0.0),
                high: (accuracy + half).min(1.0),
            }
        }
    }
}

/// Accuracy per value of column `by` of a Results table (`""` or `"all"`: overall only),
/// then the overall row `all` and the medical subsets (`medical`, `medical (extended)`),
/// for each model in the table. Columns: `model`, `<by>` (or `group`), `n`, `n_correct`,
/// `accuracy`, `ci_low`, `ci_high` (95 %: Wilson for micro averages; for macro, the normal
/// interval of a mean of subject proportions), `average`. `column` is the true/false column
/// scored (`correct`, or e.g. `correct_flexible`).
pub fn summary(
    res: &DataFrame,
    by: &str,
    average: Average,
    column: &str,
) -> Result<DataFrame, EvalError> {
    let rows = rows(res, by, column)?;
    let refs: Vec<&Row> = rows.iter().collect();
    let labels = group_labels(&refs, by);
    let mut models: Vec<&str> = vec![];
    for r in &rows {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    let mut out_model = vec![];
    let mut out_group = vec![];
    let mut out = (vec![], vec![], vec![], vec![], vec![]);
    for model in &models {
        for label in &labels {
            let members: Vec<&Row> = rows
                .iter()
                .filter(|r| r.model == *model && in_group(r, label, by))
                .collect();
            if members.is_empty() {
                continue;
            }
            let s = stat(&members, average);
            out_model.push(model.to_string());
            out_group.push(label.clone());
            out.0.push(s.n as u64);
            out.1.push(s.n_correct as u64);
            out.2.push(s.accuracy);
            out.3.push(s.low);
            out.4.push(s.high);
        }
    }
    let group_name = group_column(by);
    let height = out_model.len();
    Ok(DataFrame::new(
        height,
        vec![
            Column::new("model".into(), out_model),
            Column::new(group_name.into(), out_group),
            Column::new("n".into(), out.0),
            Column::new("n_correct".into(), out.1),
            Column::new("accuracy".into(), out.2),
            Column::new("ci_low".into(), out.3),
            Column::new("ci_high".into(), out.4),
            Column::new("average".into(), vec![average.name(); height]),
        ],
    )?)
}

/// Several Results tables side by side, per value of `by` (then `all` and the medical
/// subsets), on the questions every table has. Tables of one setting (same model, adapter,
/// preset, mode and shots) with different seeds are runs of it: their accuracy is the
/// mean over runs, `sd` the standard deviation between runs. Each setting after the first
/// is compared with the first: `diff` (accuracy minus the first's) with its 95 % interval
/// and the p-value of a paired test on the shared questions — McNemar's exact test when
/// both sides are single runs, else a paired bootstrap (2,000 resamples) of per-question
/// mean correctness (`test` names it). Columns: `<by>`, `model`, `runs`, `n`, `accuracy`,
/// `sd`, `ci_low`, `ci_high`, `diff`, `diff_low`, `diff_high`, `p_value`, `test`.
pub fn compare(results: &[DataFrame], by: &str, column: &str) -> Result<DataFrame, EvalError> {
    if results.is_empty() {
        return Err(EvalError::Option(
            "compare needs at least one Results table".into(),
        ));
    }
    let tables: Vec<Vec<Row>> = results
        .iter()
        .map(|df| rows(df, by, column))
        .collect::<Result<_, _>>()?;
    let (settings, runs) = setting_runs(&tables);
    let shared = shared_questions(&runs)?;
    // one reference row per shared id, for its group and medical flags
    let mut reference: BTreeMap<&str, &Row> = BTreeMap::new();
    for r in tables.iter().flatten() {
        if shared.contains(&r.id) {
            reference.entry(r.id.as_str()).or_insert(r);
        }
    }
    let ref_rows: Vec<&Row> = reference.values().copied().collect();
    let labels = group_labels(&ref_rows, by);
    let mut out = Compared::default();
    for label in &labels {
        let ids: Vec<&str> = ref_rows
            .iter()
            .filter(|r| in_group(r, label, by))
            .map(|r| r.id.as_str())
            .collect();
        if ids.is_empty() {
            continue;
        }
        let (base_items, base_runs) = per_item(&runs[&settings[0].0], &ids);
        for (setting, model) in &settings {
            let (items, run_accs) = per_item(&runs[setting], &ids);
            let n = items.len() as f64;
            let (accuracy, sd) = mean_sd(&run_accs);
            let (low, high) = wilson(items.iter().sum(), n);
            out.group.push(label.clone());
            out.model.push(model.clone());
            out.runs.push(run_accs.len() as u64);
            out.n.push(items.len() as u64);
            out.accuracy.push(accuracy);
            out.sd.push(sd);
            out.ci_low.push(low);
            out.ci_high.push(high);
            if setting == &settings[0].0 {
                out.diff.push(None);
                out.diff_low.push(None);
                out.diff_high.push(None);
                out.p_value.push(None);
                out.test.push(None);
                continue;
            }
            let diff = accuracy - mean_sd(&base_runs).0;
            let single = run_accs.len() == 1 && base_runs.len() == 1;
            let (p, lo, hi, test) = paired_test(&items, &base_items, diff, single);
            out.diff.push(Some(diff));
            out.diff_low.push(Some(lo));
            out.diff_high.push(Some(hi));
            out.p_value.push(Some(p));
            out.test.push(Some(test.to_string()));
        }
    }
    out.frame(group_column(by))
}

/// One setting's runs: seed → question id → 0/1 correct.
type SeedRuns = BTreeMap<u64, HashMap<String, f64>>;

/// The settings in order of first appearance, as (setting key, model label), and their
/// runs keyed by (setting, seed).
fn setting_runs(tables: &[Vec<Row>]) -> (Vec<(String, String)>, HashMap<String, SeedRuns>) {
    let mut settings: Vec<(String, String)> = vec![];
    let mut runs: HashMap<String, SeedRuns> = HashMap::new();
    for table in tables {
        for r in table {
            if !settings.iter().any(|(s, _)| *s == r.setting) {
                settings.push((r.setting.clone(), r.model.clone()));
            }
            runs.entry(r.setting.clone())
                .or_default()
                .entry(r.seed)
                .or_default()
                .insert(r.id.clone(), r.correct);
        }
    }
    (settings, runs)
}

/// The questions every run of every setting answered (an error when there are none).
fn shared_questions(runs: &HashMap<String, SeedRuns>) -> Result<HashSet<String>, EvalError> {
    let mut shared: Option<HashSet<String>> = None;
    for per_seed in runs.values() {
        for ids in per_seed.values() {
            let these: HashSet<String> = ids.keys().cloned().collect();
            shared = Some(match shared {
                None => these,
                Some(s) => s.intersection(&these).cloned().collect(),
            });
        }
    }
    let shared = shared.unwrap_or_default();
    if shared.is_empty() {
        return Err(EvalError::Option(
            "the Results tables share no question id; compare needs the same questions".into(),
        ));
    }
    Ok(shared)
}

/// A setting's mean correctness per question of `ids` (over its runs), and each run's
/// accuracy on them.
fn per_item(seeds: &SeedRuns, ids: &[&str]) -> (Vec<f64>, Vec<f64>) {
    let item_means = ids
        .iter()
        .map(|id| seeds.values().map(|m| m[*id]).sum::<f64>() / seeds.len() as f64)
        .collect();
    let run_accs = seeds
        .values()
        .map(|m| ids.iter().map(|id| m[*id]).sum::<f64>() / ids.len() as f64)
        .collect();
    (item_means, run_accs)
}

/// The paired test of `items` against `base_items` (per-question mean correctness) with
/// accuracy difference `diff`: (p-value, interval low, interval high, test name), by
/// McNemar's exact test when both sides are `single` runs, else a paired bootstrap.
fn paired_test(
    items: &[f64],
    base_items: &[f64],
    diff: f64,
    single: bool,
) -> (f64, f64, f64, &'static str) {
    if single {
        let n = items.len() as f64;
        let b = items
            .iter()
            .zip(base_items)
            .filter(|(a, z)| **a > **z)
            .count() as f64;
        let c = items
            .iter()
            .zip(base_items)
            .filter(|(a, z)| **a < **z)
            .count() as f64;
        let se = ((b + c) - (b - c).powi(2) / n).max(0.0).sqrt() / n;
        let p = mcnemar_exact(b as u64, c as u64);
        (p, diff - Z95 * se, diff + Z95 * se, "mcnemar")
    } else {
        let (p, lo, hi) = paired_bootstrap(items, base_items, 2000, 0);
        (p, lo, hi, "bootstrap")
    }
}

/// The rows of [`compare`], gathered column by column.
#[derive(Default)]
struct Compared {
    group: Vec<String>,
    model: Vec<String>,
    runs: Vec<u64>,
    n: Vec<u64>,
    accuracy: Vec<f64>,
    sd: Vec<f64>,
    ci_low: Vec<f64>,
    ci_high: Vec<f64>,
    diff: Vec<Option<f64>>,
    diff_low: Vec<Option<f64>>,
    diff_high: Vec<Option<f64>>,
    p_value: Vec<Option<f64>>,
    test: Vec<Option<String>>,
}

impl Compared {
    /// The rows as a table whose first column is `group_name`.
    fn frame(self, group_name: &str) -> Result<DataFrame, EvalError> {
        let height = self.group.len();
        Ok(DataFrame::new(
            height,
            vec![
                Column::new(group_name.into(), self.group),
                Column::new("model".into(), self.model),
                Column::new("runs".into(), self.runs),
                Column::new("n".into(), self.n),
                Column::new("accuracy".into(), self.accuracy),
                Column::new("sd".into(), self.sd),
                Column::new("ci_low".into(), self.ci_low),
                Column::new("ci_high".into(), self.ci_high),
                Column::new("diff".into(), self.diff),
                Column::new("diff_low".into(), self.diff_low),
                Column::new("diff_high".into(), self.diff_high),
                Column::new("p_value".into(), self.p_value),
                Column::new("test".into(), self.test),
            ],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(model: &str, seed: u64, correct: &[bool]) -> DataFrame {
        let n = correct.len();
        let ids: Vec<String> = (0..n).map(|i| format!("q{i}")).collect();
        let cats: Vec<&str> = (0..n)
            .map(|i| if i % 2 == 0 { "stem" } else { "other" })
            .collect();
        let subjects: Vec<&str> = (0..n)
            .map(|i| if i % 4 < 2 { "s1" } else { "s2" })
            .collect();
        let medical: Vec<bool> = (0..n).map(|i| i < 4).collect();
        df![
            "id" => ids, "category" => cats, "subject" => subjects, "medical" => medical,
            "model" => vec![model; n], "seed" => vec![seed; n], "correct" => correct.to_vec(),
        ]
        .unwrap()
    }

    #[test]
    fn summary_has_groups_overall_and_medical_rows() {
        let res = results("m", 0, &[true, true, false, true, false, false, true, true]);
        let s = summary(&res, "category", Average::Micro, "correct").unwrap();
        let groups: Vec<&str> = s
            .column("category")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .flatten()
            .collect();
        assert_eq!(groups, ["other", "stem", "all", "medical"]);
        let acc: Vec<f64> = s
            .column("accuracy")
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .flatten()
            .collect();
        assert_eq!(acc, [0.75, 0.5, 0.625, 0.75]);
        let lo = s.column("ci_low").unwrap().f64().unwrap().get(2).unwrap();
        assert!((lo - wilson(5.0, 8.0).0).abs() < 1e-12);
        // macro: subjects s1 (q0 q1 q4 q5: 2/4) and s2 (q2 q3 q6 q7: 3/4)
        let m = summary(&res, "", Average::Macro, "correct").unwrap();
        assert_eq!(
            m.column("accuracy").unwrap().f64().unwrap().get(0),
            Some(0.625)
        );
        assert!(summary(&res, "nope", Average::Micro, "correct").is_err());
    }

    #[test]
    fn compare_pairs_models_and_pools_seeds() {
        let a = results(
            "base",
            0,
            &[true, false, false, false, true, false, false, false],
        );
        let b = results(
            "tuned",
            0,
            &[true, true, true, true, true, true, true, false],
        );
        let t = compare(&[a.clone(), b.clone()], "", "correct").unwrap();
        assert_eq!(t.height(), 4); // all + medical, two models
        let p = t.column("p_value").unwrap().f64().unwrap().get(1).unwrap();
        assert!((p - mcnemar_exact(0, 5)).abs() < 1e-12);
        let diff = t.column("diff").unwrap().f64().unwrap().get(1).unwrap();
        assert!((diff - 0.625).abs() < 1e-12);
        let b2 = results(
            "tuned",
            1,
            &[true, true, true, false, true, true, true, false],
        );
        let t = compare(&[a, b, b2], "", "correct").unwrap();
        let runs = t.column("runs").unwrap().u64().unwrap().get(1);
        assert_eq!(runs, Some(2));
        let sd = t.column("sd").unwrap().f64().unwrap().get(1).unwrap();
        assert!((sd - mean_sd(&[0.875, 0.75]).1).abs() < 1e-12);
        let test = t
            .column("test")
            .unwrap()
            .str()
            .unwrap()
            .get(1)
            .map(str::to_string);
        assert_eq!(test.as_deref(), Some("bootstrap"));
    }
}
