//! Strategies trained under several seeds, compared with a reference seed by seed
//! ([`compare_seeds`]): per-seed accuracy, difference and McNemar's test, then the mean ±
//! sd over seeds with Stouffer's combination of the per-seed tests.

use std::collections::{BTreeMap, HashMap, HashSet};

use polars::prelude::*;

use super::stats::{mcnemar_exact, mean_sd, signed_z, stouffer, wilson};
use super::summary::{group_column, group_labels, in_group, rows, Row};
use super::EvalError;

/// One run: question id → 0/1 correct.
type Run = HashMap<String, f64>;

/// Every label's runs, by seed.
type Runs = HashMap<String, BTreeMap<u64, Run>>;

/// Results tables of strategies run under several seeds, side by side per value of `by`
/// (then `all` and the medical subsets) on the questions every run answered. A run is
/// told apart by its `model` label (`evaluate`'s `label`, e.g. `random`) and its `seed`
/// (`evaluate`'s `seed`, e.g. the training seed); the first label is the reference
/// (e.g. `base`), run once or under the same seeds as the others.
///
/// Per label, one row per seed, then a combined row whose `seed` is null. A seed's row:
/// `accuracy` with its 95 % Wilson interval, and against the reference's run of the same
/// seed (or its only run) `diff`, `better` and `worse` (questions only this run, or only
/// the reference, got right) and `p_value` of McNemar's exact test (`test` `mcnemar`).
/// The combined row: `accuracy` and `diff` as the mean over seeds, `sd` and `diff_sd` their
/// sample standard deviations, `runs` the number of seeds, the interval of a single run at
/// the mean accuracy, `better` and `worse` summed, and `p_value` of Stouffer's method
/// (`test` `stouffer`): each seed's two-sided McNemar p-value turned into a z-score signed
/// by the direction of its difference, `Z = Σ zᵢ / √k`, two-sided. Seeds that disagree in
/// direction cancel. Every seed answers the same questions, so the seeds' tests are not
/// independent and the combined p-value leans optimistic; `sd` is the spread between seeds.
///
/// Columns: `<by>`, `model`, `seed`, `runs`, `n`, `accuracy`, `sd`, `ci_low`, `ci_high`,
/// `diff`, `diff_sd`, `better`, `worse`, `p_value`, `test`.
pub fn compare_seeds(
    results: &[DataFrame],
    by: &str,
    column: &str,
) -> Result<DataFrame, EvalError> {
    if results.is_empty() {
        return Err(EvalError::Option(
            "compare needs at least one Results table".into(),
        ));
    }
    let tables: Vec<Vec<Row>> = results
        .iter()
        .map(|df| rows(df, by, column))
        .collect::<Result<_, _>>()?;
    let (labels, runs) = runs_by_label(&tables)?;
    let shared = shared_ids(&runs)?;
    let reference = Reference {
        label: &labels[0],
        runs: &runs[&labels[0]],
    };
    // one row per shared id, for its group and medical flags
    let mut first: BTreeMap<&str, &Row> = BTreeMap::new();
    for r in tables.iter().flatten() {
        if shared.contains(r.id.as_str()) {
            first.entry(r.id.as_str()).or_insert(r);
        }
    }
    let first: Vec<&Row> = first.into_values().collect();
    let mut out = Table::default();
    for group in group_labels(&first, by) {
        let ids: Vec<&str> = first
            .iter()
            .filter(|r| in_group(r, &group, by))
            .map(|r| r.id.as_str())
            .collect();
        if ids.is_empty() {
            continue;
        }
        for label in &labels {
            let versus = (label != reference.label).then_some(&reference);
            push_label(&mut out, &group, label, &runs[label], &ids, versus)?;
        }
    }
    out.frame(group_column(by))
}

/// The run labels in order of first appearance, and the runs keyed by (label, seed), each
/// from one table.
fn runs_by_label(tables: &[Vec<Row>]) -> Result<(Vec<String>, Runs), EvalError> {
    let mut labels: Vec<String> = vec![];
    let mut runs: Runs = HashMap::new();
    let mut source: HashMap<(String, u64), usize> = HashMap::new();
    for (t, table) in tables.iter().enumerate() {
        for r in table {
            if !labels.contains(&r.model) {
                labels.push(r.model.clone());
            }
            let from = *source.entry((r.model.clone(), r.seed)).or_insert(t);
            if from != t {
                return Err(EvalError::Option(format!(
                    "Results tables {} and {} are both `{}` with seed {}; give each run its own \
                     `seed` in evaluate",
                    from + 1,
                    t + 1,
                    r.model,
                    r.seed
                )));
            }
            runs.entry(r.model.clone())
                .or_default()
                .entry(r.seed)
                .or_default()
                .insert(r.id.clone(), r.correct);
        }
    }
    Ok((labels, runs))
}

/// The question ids every run answered (an error when there are none).
fn shared_ids(runs: &Runs) -> Result<HashSet<&str>, EvalError> {
    let mut shared: Option<HashSet<&str>> = None;
    for run in runs.values().flat_map(BTreeMap::values) {
        let these: HashSet<&str> = run.keys().map(String::as_str).collect();
        shared = Some(match shared {
            None => these,
            Some(s) => s.intersection(&these).copied().collect(),
        });
    }
    let shared = shared.unwrap_or_default();
    if shared.is_empty() {
        return Err(EvalError::Option(
            "the Results tables share no question id; compare needs the same questions".into(),
        ));
    }
    Ok(shared)
}

/// The reference label's runs, by seed.
struct Reference<'a> {
    label: &'a str,
    runs: &'a BTreeMap<u64, Run>,
}

impl Reference<'_> {
    /// The reference's run to compare a run of `seed` with: its run of that seed, or its
    /// only run.
    fn of(&self, seed: u64) -> Result<&Run, EvalError> {
        match self.runs.get(&seed) {
            Some(run) => Ok(run),
            None if self.runs.len() == 1 => Ok(self.runs.values().next().unwrap()),
            None => Err(EvalError::Option(format!(
                "the reference `{}` has runs with seeds {:?} but none with seed {seed}; run it \
                 once, or under every seed",
                self.label,
                self.runs.keys().collect::<Vec<_>>()
            ))),
        }
    }
}

/// One label's rows for one group of questions `ids`: one per seed, then the combined row;
/// compared with `reference` unless the label is the reference.
fn push_label(
    out: &mut Table,
    group: &str,
    label: &str,
    runs: &BTreeMap<u64, Run>,
    ids: &[&str],
    reference: Option<&Reference>,
) -> Result<(), EvalError> {
    let n = ids.len() as f64;
    let mut accs = vec![];
    let mut diffs = vec![];
    let mut zs = vec![];
    let (mut better_all, mut worse_all) = (0, 0);
    for (&seed, run) in runs {
        let k: f64 = ids.iter().map(|id| run[*id]).sum();
        let (low, high) = wilson(k, n);
        accs.push(k / n);
        let mut line = Line {
            group: group.to_string(),
            model: label.to_string(),
            seed: Some(seed),
            runs: 1,
            n: ids.len() as u64,
            accuracy: k / n,
            sd: None,
            ci: (low, high),
            ..Line::default()
        };
        if let Some(reference) = reference {
            let reference = reference.of(seed)?;
            let better = ids.iter().filter(|id| run[**id] > reference[**id]).count();
            let worse = ids.iter().filter(|id| run[**id] < reference[**id]).count();
            let p = mcnemar_exact(better as u64, worse as u64);
            let diff = (better as f64 - worse as f64) / n;
            diffs.push(diff);
            zs.push(signed_z(p, better > worse));
            better_all += better;
            worse_all += worse;
            line.versus = Some(Versus {
                diff,
                diff_sd: None,
                better: better as u64,
                worse: worse as u64,
                p_value: p,
                test: "mcnemar",
            });
        }
        out.push(line);
    }
    let (accuracy, sd) = mean_sd(&accs);
    let (low, high) = wilson(accuracy * n, n);
    out.push(Line {
        group: group.to_string(),
        model: label.to_string(),
        seed: None,
        runs: accs.len() as u64,
        n: ids.len() as u64,
        accuracy,
        sd: Some(sd),
        ci: (low, high),
        versus: reference.is_some().then(|| {
            let (diff, diff_sd) = mean_sd(&diffs);
            Versus {
                diff,
                diff_sd: Some(diff_sd),
                better: better_all as u64,
                worse: worse_all as u64,
                p_value: stouffer(&zs),
                test: "stouffer",
            }
        }),
    });
    Ok(())
}

/// A run's (or the combined) comparison with the reference.
struct Versus {
    diff: f64,
    diff_sd: Option<f64>,
    better: u64,
    worse: u64,
    p_value: f64,
    test: &'static str,
}

/// One output row.
#[derive(Default)]
struct Line {
    group: String,
    model: String,
    seed: Option<u64>,
    runs: u64,
    n: u64,
    accuracy: f64,
    sd: Option<f64>,
    ci: (f64, f64),
    versus: Option<Versus>,
}

/// The output rows, gathered before they become columns.
#[derive(Default)]
struct Table(Vec<Line>);

impl Table {
    fn push(&mut self, line: Line) {
        self.0.push(line);
    }

    fn frame(&self, group_name: &str) -> Result<DataFrame, EvalError> {
        let lines = &self.0;
        let text = |f: fn(&Line) -> String| lines.iter().map(f).collect::<Vec<_>>();
        let versus = |f: fn(&Versus) -> Option<f64>| {
            lines
                .iter()
                .map(|l| l.versus.as_ref().and_then(f))
                .collect::<Vec<_>>()
        };
        let count = |f: fn(&Versus) -> u64| {
            lines
                .iter()
                .map(|l| l.versus.as_ref().map(f))
                .collect::<Vec<_>>()
        };
        Ok(DataFrame::new(
            lines.len(),
            vec![
                Column::new(group_name.into(), text(|l| l.group.clone())),
                Column::new("model".into(), text(|l| l.model.clone())),
                Column::new(
                    "seed".into(),
                    lines.iter().map(|l| l.seed).collect::<Vec<_>>(),
                ),
                Column::new(
                    "runs".into(),
                    lines.iter().map(|l| l.runs).collect::<Vec<_>>(),
                ),
                Column::new("n".into(), lines.iter().map(|l| l.n).collect::<Vec<_>>()),
                Column::new(
                    "accuracy".into(),
                    lines.iter().map(|l| l.accuracy).collect::<Vec<_>>(),
                ),
                Column::new("sd".into(), lines.iter().map(|l| l.sd).collect::<Vec<_>>()),
                Column::new(
                    "ci_low".into(),
                    lines.iter().map(|l| l.ci.0).collect::<Vec<_>>(),
                ),
                Column::new(
                    "ci_high".into(),
                    lines.iter().map(|l| l.ci.1).collect::<Vec<_>>(),
                ),
                Column::new("diff".into(), versus(|v| Some(v.diff))),
                Column::new("diff_sd".into(), versus(|v| v.diff_sd)),
                Column::new("better".into(), count(|v| v.better)),
                Column::new("worse".into(), count(|v| v.worse)),
                Column::new("p_value".into(), versus(|v| Some(v.p_value))),
                Column::new(
                    "test".into(),
                    lines
                        .iter()
                        .map(|l| l.versus.as_ref().map(|v| v.test))
                        .collect::<Vec<_>>(),
                ),
            ],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::stats::mean_sd;

    /// A Results table of eight questions, q0–q3 medical.
    fn results(model: &str, seed: u64, correct: &[u8]) -> DataFrame {
        let n = correct.len();
        let ids: Vec<String> = (0..n).map(|i| format!("q{i}")).collect();
        let medical: Vec<bool> = (0..n).map(|i| i < 4).collect();
        let correct: Vec<bool> = correct.iter().map(|&c| c == 1).collect();
        df![
            "id" => ids, "dataset" => vec!["mmlu"; n], "medical" => medical,
            "model" => vec![model; n], "seed" => vec![seed; n], "correct" => correct,
        ]
        .unwrap()
    }

    fn floats(t: &DataFrame, column: &str) -> Vec<Option<f64>> {
        t.column(column).unwrap().f64().unwrap().iter().collect()
    }

    #[test]
    fn each_seed_is_paired_with_the_base_and_the_seeds_are_combined() {
        let base = results("base", 0, &[1, 0, 0, 0, 1, 0, 0, 0]);
        let seeds = [
            results("random", 1, &[1, 1, 1, 0, 1, 1, 0, 0]), // 5/8: better 3, worse 0
            results("random", 2, &[0, 1, 0, 0, 1, 0, 0, 0]), // 2/8: better 1, worse 1
            results("random", 3, &[1, 1, 1, 1, 1, 1, 1, 0]), // 7/8: better 5, worse 0
        ];
        let mut all = vec![base];
        all.extend(seeds);
        let t = compare_seeds(&all, "dataset", "correct").unwrap();
        // groups mmlu, all, medical; base: one seed + combined; random: three + combined
        assert_eq!(t.height(), 3 * 6);
        let all_rows = t
            .clone()
            .lazy()
            .filter(col("dataset").eq(lit("all")))
            .collect()
            .unwrap();
        let seed: Vec<Option<u64>> = all_rows
            .column("seed")
            .unwrap()
            .u64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(seed, [Some(0), None, Some(1), Some(2), Some(3), None]);
        let acc = floats(&all_rows, "accuracy");
        assert_eq!(
            acc[..5],
            [Some(0.25), Some(0.25), Some(0.625), Some(0.25), Some(0.875)]
        );
        let (mean, sd) = mean_sd(&[0.625, 0.25, 0.875]);
        assert!((acc[5].unwrap() - mean).abs() < 1e-12);
        assert!((floats(&all_rows, "sd")[5].unwrap() - sd).abs() < 1e-12);
        // diffs 3/8, 0, 5/8: mean 1/3, sd 0.314576
        let diff = floats(&all_rows, "diff");
        assert_eq!(diff[..5], [None, None, Some(0.375), Some(0.0), Some(0.625)]);
        assert!((diff[5].unwrap() - 1.0 / 3.0).abs() < 1e-12);
        let diff_sd = floats(&all_rows, "diff_sd")[5].unwrap();
        assert!((diff_sd - 0.314_576_4).abs() < 1e-6, "{diff_sd}");
        // McNemar per seed: (3, 0) → 0.25, (1, 1) → 1, (5, 0) → 0.0625
        let p = floats(&all_rows, "p_value");
        for (p, want) in p[2..5].iter().zip([0.25, 1.0, 0.0625]) {
            assert!((p.unwrap() - want).abs() < 1e-12, "{p:?} {want}");
        }
        // Stouffer: z = Φ⁻¹(0.875) = 1.150349, 0, Φ⁻¹(0.96875) = 1.862732;
        // Z = 3.013081 / √3 = 1.739603, p = 0.081929 (Python's NormalDist)
        assert!((p[5].unwrap() - 0.081_929).abs() < 1e-5, "{:?}", p[5]);
        let better: Vec<Option<u64>> = all_rows
            .column("better")
            .unwrap()
            .u64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(better, [None, None, Some(3), Some(1), Some(5), Some(9)]);
        let test: Vec<Option<&str>> = all_rows
            .column("test")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(
            test,
            [
                None,
                None,
                Some("mcnemar"),
                Some("mcnemar"),
                Some("mcnemar"),
                Some("stouffer")
            ]
        );
    }

    #[test]
    fn a_reference_run_per_seed_is_paired_seed_by_seed() {
        let t = compare_seeds(
            &[
                results("base", 1, &[1, 1, 1, 1, 0, 0, 0, 0]),
                results("base", 2, &[0, 0, 0, 0, 0, 0, 0, 0]),
                results("tuned", 1, &[1, 1, 1, 1, 0, 0, 0, 0]),
                results("tuned", 2, &[1, 1, 1, 1, 0, 0, 0, 0]),
            ],
            "",
            "correct",
        )
        .unwrap();
        let diff = floats(&t, "diff");
        // group `all` first: base 1, base 2, base combined, tuned 1 (= base 1), tuned 2
        assert_eq!(diff[3..5], [Some(0.0), Some(0.5)]);
    }

    #[test]
    fn a_run_given_twice_or_a_missing_reference_seed_is_an_error() {
        let twice = compare_seeds(
            &[
                results("base", 0, &[1, 0]),
                results("random", 0, &[1, 1]),
                results("random", 0, &[0, 1]),
            ],
            "",
            "correct",
        );
        assert!(twice.unwrap_err().to_string().contains("own `seed`"));
        let missing = compare_seeds(
            &[
                results("base", 1, &[1, 0]),
                results("base", 2, &[1, 0]),
                results("random", 3, &[0, 1]),
            ],
            "",
            "correct",
        );
        assert!(missing
            .unwrap_err()
            .to_string()
            .contains("none with seed 3"));
    }
}
