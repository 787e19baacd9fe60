//! The AVX2 and FMA kernels of the products with few rows, for CPUs without AVX-512.

use std::arch::x86_64::*;

use super::{for_each_share, Shared};

/// Rows of `x` one pass of [`rows_of_w`] takes: two rows of `W` by six of `x` keep
/// twelve accumulators, two weight vectors and an input vector in the sixteen registers.
const X_ROWS: usize = 6;

/// `y[m, n] = x[m, k] · Wᵀ` for `W: [n, k]` (f32) and `m ≤ 16`, each thread taking its
/// own share of `W`'s rows, two at a time.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn few_rows_of(x: &[f32], m: usize, w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    let out = Shared(y.as_mut_ptr());
    let (x, w) = (x.as_ptr() as usize, w.as_ptr() as usize);
    for_each_share(n, |cols| {
        let mut j = cols.start;
        while j < cols.end {
            let pair = (cols.end - j).min(2);
            let rows = ((w as *const f32).wrapping_add(j * k), pair, k);
            // SAFETY: AVX2 and FMA are present (this function's caller checked); the
            // share writes its own columns `j .. j + pair` of `y`.
            unsafe { decoded_rows(x as *const f32, m, rows, out.ptr().add(j), n) };
            j += pair;
        }
    });
    y
}

/// `y[r, j] = x[r, :] · w[j, :]` for `m ≤ 16` rows of `x` and `rows ≤ 2` rows
/// `w: [rows, k]`; `y` points at the first of the `rows` columns (row stride `n`). The
/// rows of `x` go six at a time; `w`'s two rows stay in L1 between them.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn decoded_rows(
    x: *const f32,
    m: usize,
    (w, rows, k): (*const f32, usize, usize),
    y: *mut f32,
    n: usize,
) {
    macro_rules! dispatch {
        ($j:literal, $r0:expr, $count:expr, $($r:literal)*) => {
            match $count {
                $($r => rows_of_w::<$j, $r>(
                    x.wrapping_add($r0 * k),
                    (w, k),
                    y.wrapping_add($r0 * n),
                    n,
                ),)*
                _ => unreachable!("one pass takes 1..=6 rows of x"),
            }
        };
    }
    let mut r0 = 0;
    while r0 < m {
        let count = (m - r0).min(X_ROWS);
        if rows == 2 {
            dispatch!(2, r0, count, 1 2 3 4 5 6)
        } else {
            dispatch!(1, r0, count, 1 2 3 4 5 6)
        }
        r0 += count;
    }
}

/// `y[r, jj] = x[r, :] · w[jj, :]` for the `J` rows of `w: [J, k]` (row stride `k`) and
/// `R` rows of `x` (row stride `k`); `y` has row stride `n`. Pointer steps are wrapping
/// ones (all stay within the operands); the last `k mod 8` products are scalar.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)] // `j` and `r` also pick the row of `W` and of `y`
unsafe fn rows_of_w<const J: usize, const R: usize>(
    x: *const f32,
    (w, k): (*const f32, usize),
    y: *mut f32,
    n: usize,
) {
    let x_rows: [*const f32; R] = std::array::from_fn(|r| x.wrapping_add(r.wrapping_mul(k)));
    let w_rows: [*const f32; J] = std::array::from_fn(|j| w.wrapping_add(j.wrapping_mul(k)));
    let mut acc = [[_mm256_setzero_ps(); R]; J];
    let full = k - k % 8;
    let mut i = 0;
    while i < full {
        let wv: [__m256; J] = std::array::from_fn(|j| _mm256_loadu_ps(w_rows[j].wrapping_add(i)));
        for r in 0..R {
            let xv = _mm256_loadu_ps(x_rows[r].wrapping_add(i));
            for j in 0..J {
                acc[j][r] = _mm256_fmadd_ps(wv[j], xv, acc[j][r]);
            }
        }
        i = i.wrapping_add(8);
    }
    for j in 0..J {
        for r in 0..R {
            let mut sum = horizontal_sum(acc[j][r]);
            for t in full..k {
                sum += *x_rows[r].wrapping_add(t) * *w_rows[j].wrapping_add(t);
            }
            *y.wrapping_add(r.wrapping_mul(n).wrapping_add(j)) = sum;
        }
    }
}

/// The sum of a register's eight lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}
