//! `exp` over a whole row of logits (Gemma's 262,144), sixteen at a time where the CPU has
//! AVX-512: the log-partition of every sampled token and of every scored position. glibc's
//! `expf`, one value per call, took a tenth of a decoding step.
//!
//! The tanh-approximated GELU of Gemma's MLP is built on the same `exp`: `0.5 x (1 +
//! tanh(u)) = x σ(2u)`, one `exp` and one division a value where libm's `tanhf` took a
//! seventh of a scoring forward.
//!
//! The vector `exp` is the Cephes single-precision one (range reduction by `ln 2` in two
//! parts, a degree-6 polynomial, `2ⁿ` by `vscalefps`): within 2 ulp of the exact value.

/// `Σ exp(x · scale − shift)` over `xs`, summed in f64.
pub fn exp_sum(xs: &[f32], scale: f32, shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { avx512::exp_sum(xs, scale, shift) };
    }
    xs.iter().map(|&x| (x * scale - shift).exp() as f64).sum()
}

/// `x ← factor · exp(x · scale − shift)` for every `x` of `xs`.
pub fn exp_in_place(xs: &mut [f32], scale: f32, shift: f32, factor: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { avx512::exp_in_place(xs, scale, shift, factor) };
    }
    for x in xs {
        *x = factor * (*x * scale - shift).exp();
    }
}

/// `√(2/π)` and the cubic coefficient of the tanh approximation of GELU.
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// `out = gelu_tanh(gate) ⊙ up`.
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; the three slices have one length.
        return unsafe { avx512::gelu_tanh_mul(gate, up, out) };
    }
    for ((o, &x), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = gelu_scalar(x).0 * u;
    }
}

/// The gradients of `gelu_tanh(gate) ⊙ up` given the output's, `g`: `d_gate = g ⊙ up ⊙
/// gelu'(gate)` and `d_up = g ⊙ gelu(gate)`.
pub fn gelu_tanh_mul_grad(
    gate: &[f32],
    up: &[f32],
    g: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    assert!([up.len(), g.len(), d_gate.len(), d_up.len()]
        .iter()
        .all(|&n| n == gate.len()));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; the five slices have one length.
        return unsafe { avx512::gelu_tanh_mul_grad(gate, up, g, d_gate, d_up) };
    }
    for i in 0..gate.len() {
        let (gelu, slope) = gelu_scalar(gate[i]);
        d_gate[i] = g[i] * up[i] * slope;
        d_up[i] = g[i] * gelu;
    }
}

/// `(gelu(x), gelu'(x))` for the tanh approximation: with `s = σ(2u)`, `u = c (x + a x³)`,
/// `gelu = x s` and `gelu' = s + x s (1 − s) 2c (1 + 3a x²)`.
fn gelu_scalar(x: f32) -> (f32, f32) {
    let u = GELU_C * (x + GELU_A * x * x * x);
    let s = 1.0 / (1.0 + (-2.0 * u).exp());
    let slope = s + x * s * (1.0 - s) * 2.0 * GELU_C * (1.0 + 3.0 * GELU_A * x * x);
    (x * s, slope)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `exp` of sixteen f32 (inputs below −103.97 give 0, above 88.72 give +∞).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.722_84));
        let x = _mm512_max_ps(x, _mm512_set1_ps(-103.972_08));
        // n = round(x / ln 2), r = x − n ln 2 (ln 2 in a high and a low part)
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // e^r ≈ 1 + r + r² p(r)
        let e = _mm512_fmadd_ps(
            _mm512_mul_ps(r, r),
            p,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(e, n)
    }

    /// `(s, x s)` with `s = σ(2u)`, `u = c (x + a x³)`: the sigmoid and GELU of sixteen.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn gelu16(x: __m512) -> (__m512, __m512) {
        let c = _mm512_set1_ps(super::GELU_C);
        let x2 = _mm512_mul_ps(x, x);
        let inner = _mm512_fmadd_ps(_mm512_set1_ps(super::GELU_A), x2, _mm512_set1_ps(1.0));
        let minus_2u = _mm512_mul_ps(
            _mm512_set1_ps(-2.0),
            _mm512_mul_ps(c, _mm512_mul_ps(x, inner)),
        );
        let one = _mm512_set1_ps(1.0);
        let s = _mm512_div_ps(one, _mm512_add_ps(one, exp16(minus_2u)));
        (s, _mm512_mul_ps(x, s))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = gate.len();
        let full = n - n % 16;
        let mut i = 0;
        while i < full {
            let (_, gelu) = gelu16(_mm512_loadu_ps(gate.as_ptr().add(i)));
            let v = _mm512_mul_ps(gelu, _mm512_loadu_ps(up.as_ptr().add(i)));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), v);
            i += 16;
        }
        for i in full..n {
            out[i] = super::gelu_scalar(gate[i]).0 * up[i];
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_tanh_mul_grad(
        gate: &[f32],
        up: &[f32],
        g: &[f32],
        d_gate: &mut [f32],
        d_up: &mut [f32],
    ) {
        let n = gate.len();
        let full = n - n % 16;
        let one = _mm512_set1_ps(1.0);
        let two_c = _mm512_set1_ps(2.0 * super::GELU_C);
        let three_a = _mm512_set1_ps(3.0 * super::GELU_A);
        let mut i = 0;
        while i < full {
            let x = _mm512_loadu_ps(gate.as_ptr().add(i));
            let (s, gelu) = gelu16(x);
            // gelu' = s + x s (1 − s) 2c (1 + 3a x²)
            let poly = _mm512_mul_ps(two_c, _mm512_fmadd_ps(three_a, _mm512_mul_ps(x, x), one));
            let slope = _mm512_fmadd_ps(_mm512_mul_ps(gelu, _mm512_sub_ps(one, s)), poly, s);
            let gv = _mm512_loadu_ps(g.as_ptr().add(i));
            let uv = _mm512_loadu_ps(up.as_ptr().add(i));
            _mm512_storeu_ps(
                d_gate.as_mut_ptr().add(i),
                _mm512_mul_ps(_mm512_mul_ps(gv, uv), slope),
            );
            _mm512_storeu_ps(d_up.as_mut_ptr().add(i), _mm512_mul_ps(gv, gelu));
            i += 16;
        }
        for i in full..n {
            let (gelu, slope) = super::gelu_scalar(gate[i]);
            d_gate[i] = g[i] * up[i] * slope;
            d_up[i] = g[i] * gelu;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_sum(xs: &[f32], scale: f32, shift: f32) -> f64 {
        let (vs, vt) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let mut chunks = xs.chunks_exact(16);
        for chunk in &mut chunks {
            let e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(chunk.as_ptr()), vs, vt));
            lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
            hi = _mm512_add_pd(
                hi,
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(e),
                ))),
            );
        }
        let rest = chunks.remainder();
        let tail: f64 = rest.iter().map(|&x| (x * scale - shift).exp() as f64).sum();
        _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)) + tail
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_in_place(xs: &mut [f32], scale: f32, shift: f32, factor: f32) {
        let (vs, vt, vf) = (
            _mm512_set1_ps(scale),
            _mm512_set1_ps(shift),
            _mm512_set1_ps(factor),
        );
        let mut chunks = xs.chunks_exact_mut(16);
        for chunk in &mut chunks {
            let e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(chunk.as_ptr()), vs, vt));
            _mm512_storeu_ps(chunk.as_mut_ptr(), _mm512_mul_ps(vf, e));
        }
        for x in chunks.into_remainder() {
            *x = factor * (*x * scale - shift).exp();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vector_exp_is_within_two_ulp_of_the_exact_one_and_saturates() {
        // 17 per chunk: sixteen through the vector path, one through the scalar tail
        let mut xs: Vec<f32> = (0..=4000).map(|i| -100.0 + i as f32 * 0.047).collect();
        xs.extend([-120.0, -104.5, 88.0, 95.0, 0.0, -0.0, 1e-8]);
        let mut ys = xs.clone();
        exp_in_place(&mut ys, 1.0, 0.0, 1.0);
        for (&x, &y) in xs.iter().zip(&ys) {
            let exact = (x as f64).exp();
            if exact > f32::MAX as f64 {
                assert_eq!(y, f32::INFINITY, "exp({x})");
            } else if exact < 1e-38 {
                assert!(y.abs() < 1e-37, "exp({x}) = {y}");
            } else {
                let ulp = (exact as f32).to_bits().abs_diff(y.to_bits());
                assert!(ulp <= 2, "exp({x}): {y} against {exact} ({ulp} ulp)");
            }
        }
    }

    #[test]
    fn gelu_and_its_gradient_equal_the_tanh_formula_in_f64() {
        let gate: Vec<f32> = (0..1001).map(|i| -12.0 + i as f32 * 0.024).collect();
        let up: Vec<f32> = (0..1001).map(|i| 1.0 + (i % 7) as f32 * 0.3).collect();
        let g: Vec<f32> = (0..1001).map(|i| 0.5 - (i % 5) as f32 * 0.2).collect();
        let mut out = vec![0f32; 1001];
        let (mut d_gate, mut d_up) = (vec![0f32; 1001], vec![0f32; 1001]);
        gelu_tanh_mul(&gate, &up, &mut out);
        gelu_tanh_mul_grad(&gate, &up, &g, &mut d_gate, &mut d_up);
        let (c, a) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
        for i in 0..1001 {
            let x = gate[i] as f64;
            let t = (c * (x + a * x * x * x)).tanh();
            let gelu = 0.5 * x * (1.0 + t);
            let slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * a * x * x);
            let close =
                |got: f32, want: f64| (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs());
            assert!(
                close(out[i], gelu * up[i] as f64),
                "gelu({x}): {} against {}",
                out[i],
                gelu
            );
            assert!(close(d_up[i], g[i] as f64 * gelu), "d_up at {x}");
            assert!(
                close(d_gate[i], g[i] as f64 * up[i] as f64 * slope),
                "d_gate at {x}: {} against {}",
                d_gate[i],
                g[i] as f64 * up[i] as f64 * slope
            );
        }
    }

    #[test]
    fn the_sum_equals_a_plain_f64_sum_with_scale_and_shift() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 200) as f32 * 0.13 - 9.0)
            .collect();
        let want: f64 = xs.iter().map(|&x| ((x * 0.7 - 3.0) as f64).exp()).sum();
        let got = exp_sum(&xs, 0.7, 3.0);
        assert!((got - want).abs() / want < 1e-6, "{got} against {want}");
        let mut ys = xs.clone();
        exp_in_place(&mut ys, 0.7, 3.0, -2.0);
        let sum: f64 = ys.iter().map(|&y| y as f64).sum();
        assert!((sum + 2.0 * want).abs() / want < 1e-6);
    }
}
