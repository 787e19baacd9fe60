//! The statistics of result tables: Wilson intervals for accuracies, the exact McNemar
//! test and a paired bootstrap for two models on the same questions, mean and standard
//! deviation over seeds, Stouffer's method for one effect tested under several seeds.

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

/// The upper tail of the standard normal distribution, `P(Z > z)`, from the complementary
/// error function (Numerical Recipes' Chebyshev fit, relative error below 1.2e-7).
pub fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let y = t * (-x * x + poly).exp();
    if x >= 0.0 {
        y
    } else {
        2.0 - y
    }
}

/// The quantile of the standard normal distribution at probability `p` in (0, 1)
/// (Acklam's rational approximation, relative error below 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    let p = p.clamp(f64::MIN_POSITIVE, 1.0 - f64::EPSILON);
    if p < 0.024_25 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - 0.024_25 {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// The signed z-score of a two-sided p-value: `|z|` with `P(|Z| > |z|) = p`, positive when
/// the effect goes the way `positive` says.
pub fn signed_z(p: f64, positive: bool) -> f64 {
    let z = -normal_quantile(p / 2.0);
    if positive {
        z
    } else {
        -z
    }
}

/// Stouffer's method with equal weights: the two-sided p-value of `Σ zᵢ / √k` for the
/// signed z-scores of `k` tests of the same effect ([`signed_z`]), so that effects in
/// opposite directions cancel. 1 when there are none.
pub fn stouffer(z: &[f64]) -> f64 {
    if z.is_empty() {
        return 1.0;
    }
    let combined = z.iter().sum::<f64>() / (z.len() as f64).sqrt();
    (2.0 * normal_sf(combined.abs())).min(1.0)
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

    #[test]
    fn the_normal_distribution_matches_known_values() {
        // Python: statistics.NormalDist().inv_cdf, math.erfc
        for (p, z) in [
            (0.975, 1.959_963_984_540_054),
            (0.3, -0.524_400_512_708_040_7),
            (1e-10, -6.361_340_902_404_056),
            (0.5, 0.0),
        ] {
            assert!(
                (normal_quantile(p) - z).abs() < 1e-8,
                "{p}: {}",
                normal_quantile(p)
            );
        }
        for (x, e) in [
            (1.0, 0.157_299_207_050_285_13),
            (0.1, 0.887_537_083_981_715_2),
        ] {
            assert!((erfc(x) / e - 1.0).abs() < 2e-7, "{x}");
        }
        assert!((erfc(3.0) / 2.209_049_699_858_544e-5 - 1.0).abs() < 2e-7);
        assert!((normal_sf(-1.959_963_984_540_054) - 0.975).abs() < 1e-7);
    }

    #[test]
    fn stouffer_adds_agreeing_seeds_and_cancels_opposite_ones() {
        // three seeds, each 10 better and 2 worse: p = 0.038574 each, z = 2.068700
        let p = mcnemar_exact(10, 2);
        let z = signed_z(p, true);
        assert!((z - 2.068_700_303_192_838).abs() < 1e-6, "{z}");
        // Z = 3 z / √3 = 3.583094, two-sided p = erfc(Z / √2)
        let combined = stouffer(&[z, z, z]);
        assert!((combined - 3.395_483e-4).abs() < 1e-9, "{combined}");
        assert!((stouffer(&[z, -z]) - 1.0).abs() < 1e-7);
        // (10, 2), (6, 4), (3, 5): Python gives Z = 1.173459, p = 0.240612
        let zs = [
            signed_z(mcnemar_exact(10, 2), true),
            signed_z(mcnemar_exact(6, 4), true),
            signed_z(mcnemar_exact(3, 5), false),
        ];
        assert!(
            (stouffer(&zs) - 0.240_611_617).abs() < 1e-6,
            "{}",
            stouffer(&zs)
        );
        assert_eq!(signed_z(1.0, true), 0.0);
        assert_eq!(stouffer(&[]), 1.0);
    }
}
