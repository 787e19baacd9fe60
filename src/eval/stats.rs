//! The statistics of result tables: Wilson intervals for accuracies, the exact McNemar
//! test and a paired bootstrap for two models on the same questions, mean and standard
//! deviation over seeds.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The normal quantile of a two-sided 95 % interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval (95 %) of `k` successes in `n` trials; `(0, 1)` when `n` is 0.
pub fn wilson(k: f64, n: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// The exact two-sided McNemar test: `b` questions only the first model got right, `c`
/// only the second; the p-value of a binomial(b + c, ½) split at least this uneven.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Σ_{i ≤ k} C(n, i) / 2^n, summed in log space
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    let mut ln_c = 0.0; // ln C(n, 0)
    let mut total = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        total += (ln_c - ln_half_n).exp();
    }
    (2.0 * total).min(1.0)
}

/// A paired bootstrap over questions: `a[i]` and `b[i]` are the two models' scores on
/// question `i` (0/1, or a mean over seeds). Returns the two-sided p-value of "no
/// difference" and the 95 % percentile interval of the mean difference `a - b`.
pub fn paired_bootstrap(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> (f64, f64, f64) {
    let n = a.len();
    if n == 0 {
        return (1.0, 0.0, 0.0);
    }
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| diffs[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let below = means.iter().filter(|&&m| m <= 0.0).count() as f64 / resamples as f64;
    let above = means.iter().filter(|&&m| m >= 0.0).count() as f64 / resamples as f64;
    let p = (2.0 * below.min(above)).min(1.0);
    let lo = means[((resamples as f64) * 0.025) as usize];
    let hi = means[(((resamples as f64) * 0.975) as usize).min(resamples - 1)];
    (p, lo, hi)
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_known_values() {
        // statsmodels proportion_confint(8, 10, method="wilson")
        let (lo, hi) = wilson(8.0, 10.0);
        assert!(
            (lo - 0.490_162).abs() < 1e-5 && (hi - 0.943_318).abs() < 1e-5,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0.0, 20.0);
        assert!(lo == 0.0 && (hi - 0.161_125).abs() < 1e-5, "{hi}");
    }

    #[test]
    fn mcnemar_matches_the_binomial_test() {
        // scipy.stats.binomtest(2, 12, 0.5).pvalue
        assert!((mcnemar_exact(2, 10) - 0.038_574).abs() < 1e-5);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert!(mcnemar_exact(0, 400) < 1e-100);
    }

    #[test]
    fn bootstrap_sees_a_clear_difference() {
        let a = vec![1.0; 60];
        let b: Vec<f64> = (0..60).map(|i| f64::from(u8::from(i % 2 == 0))).collect();
        let (p, lo, hi) = paired_bootstrap(&a, &b, 2000, 0);
        assert!(p < 0.01 && lo > 0.3 && hi < 0.7, "{p} {lo} {hi}");
        let (p, _, _) = paired_bootstrap(&b, &b, 500, 0);
        assert_eq!(p, 1.0);
    }
}
