//! f32 products with a frozen weight on the CPU, shared out between threads by hand.
//!
//! gemm splits a product between its threads by itself, but for the shapes of a small model
//! it leaves much unused: a `[256, 2048] × [2048, 640]` product (Gemma 3 270m's MLP down
//! projection) runs at 80 GFLOPS on two threads where each thread alone reaches 70. Here
//! every thread takes its own share of the product's columns (the weight's rows) and runs a
//! one-thread gemm on it: 130 GFLOPS for that product. A decoding step (a few rows) reads
//! each weight once; [`few_rows`] multiplies up to sixteen rows in that one pass.

use gemm::{gemm, Parallelism};

/// A pointer that may cross into the threads of one product: each writes its own columns.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the threads of one product write disjoint columns of the same output.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures take the whole `Shared`, not its field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// The column ranges the threads take: as many as rayon's pool has threads, in multiples of
/// 16 (a vector register of f32), none empty.
fn column_shares(n: usize) -> Vec<std::ops::Range<usize>> {
    let threads = rayon::current_num_threads().max(1);
    let per = n.div_ceil(threads).next_multiple_of(16).max(16);
    (0..n).step_by(per).map(|c| c..(c + per).min(n)).collect()
}

/// Runs `f` on every share of `0..n` columns, each on its own thread of rayon's pool.
fn for_each_share(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let shares = column_shares(n);
    if shares.len() == 1 {
        return f(0..n);
    }
    rayon::scope(|scope| {
        for share in shares {
            let f = &f;
            scope.spawn(move |_| f(share));
        }
    });
}

/// `y[m, n] = x[m, k] · B[k, n]`, where `B[i, j]` is `b[i * b_rs + j * b_cs]`: `b` is the
/// frozen weight `W: [n, k]` read as `Wᵀ` (`b_rs = 1`, `b_cs = k`) or `W: [k, n]` as
/// itself (`b_rs = n`, `b_cs = 1`).
pub fn by_columns(
    x: &[f32],
    (m, k): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    n: usize,
) -> Vec<f32> {
    assert!(x.len() >= m * k, "x holds [{m}, {k}]");
    assert!(
        n == 0 || k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "b holds [{k}, {n}]"
    );
    let mut y = vec![0f32; m * n];
    let out = Shared(y.as_mut_ptr());
    for_each_share(n, |cols| {
        // SAFETY: gemm reads `[m, k]` of `x` and columns `cols` of `B`, both checked above,
        // and writes columns `cols` of `y: [m, n]`, which no other share touches.
        unsafe {
            gemm(
                m,
                cols.len(),
                k,
                out.ptr().add(cols.start),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                b.as_ptr().add(cols.start * b_cs),
                b_cs as isize,
                b_rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    });
    y
}

/// The most rows [`few_rows`] multiplies in one pass over the weight.
pub const FEW_ROWS: usize = 16;

/// `y[m, n] = x[m, k] · Wᵀ` for `W: [n, k]` and `m ≤ FEW_ROWS` rows (a decoding step):
/// every weight is read once, every thread reading its own share of `W`'s rows. Uses
/// AVX-512 where the CPU has it, gemm elsewhere.
pub fn few_rows(x: &[f32], (m, k): (usize, usize), w: &[f32], n: usize) -> Vec<f32> {
    assert!(m <= FEW_ROWS && x.len() >= m * k && w.len() >= n * k);
    #[cfg(target_arch = "x86_64")]
    if m > 0 && k > 0 && std::arch::is_x86_feature_detected!("avx512f") {
        let mut y = vec![0f32; m * n];
        let out = Shared(y.as_mut_ptr());
        for_each_share(n, |rows| {
            // SAFETY: AVX-512F is present; the kernel reads `[m, k]` of `x` and rows `rows`
            // of `W` (checked above) and writes columns `rows` of `y: [m, n]`, no other
            // share's.
            unsafe { avx512::few_rows(x.as_ptr(), m, k, w.as_ptr(), rows, out.ptr(), n) }
        });
        return y;
    }
    by_columns(x, (m, k), w, (1, k), n)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Columns `cols` of `y[m, n] = x[m, k] · Wᵀ` (row stride `n`).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn few_rows(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        cols: std::ops::Range<usize>,
        y: *mut f32,
        n: usize,
    ) {
        // two of `W`'s rows at a time for up to eight input rows (16 accumulators), one at a
        // time for more
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match m {
                    $($r => block::<$r>(x, k, w, cols, y, n),)*
                    _ => unreachable!("few_rows takes 1..=16 rows"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        cols: std::ops::Range<usize>,
        y: *mut f32,
        n: usize,
    ) {
        let mut j = cols.start;
        if R <= 8 {
            while j + 2 <= cols.end {
                rows_of_w::<2, R>(x, k, w.wrapping_add(j * k), y.wrapping_add(j), n);
                j += 2;
            }
        }
        while j < cols.end {
            rows_of_w::<1, R>(x, k, w.wrapping_add(j * k), y.wrapping_add(j), n);
            j += 1;
        }
    }

    /// `y[r, j] = x[r, :] · W[j, :]` for `J` consecutive rows of `W` (from `w`) and the `R`
    /// rows of `x`; `y` points at column 0 of those `J`. Pointer steps are wrapping ones
    /// (all stay within the operands): checked ones would take the accumulators out of
    /// registers in a build with overflow checks.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows_of_w<const J: usize, const R: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        y: *mut f32,
        n: usize,
    ) {
        let x_rows: [*const f32; R] = std::array::from_fn(|r| x.wrapping_add(r.wrapping_mul(k)));
        let w_rows: [*const f32; J] = std::array::from_fn(|j| w.wrapping_add(j.wrapping_mul(k)));
        let mut acc = [[_mm512_setzero_ps(); R]; J];
        let full = k - k % 16;
        let mut i = 0;
        while i < full {
            for j in 0..J {
                let wv = _mm512_loadu_ps(w_rows[j].wrapping_add(i));
                for r in 0..R {
                    let xv = _mm512_loadu_ps(x_rows[r].wrapping_add(i));
                    acc[j][r] = _mm512_fmadd_ps(wv, xv, acc[j][r]);
                }
            }
            i = i.wrapping_add(16);
        }
        if full < k {
            let mask: __mmask16 = (1u16 << (k - full)) - 1;
            for j in 0..J {
                let wv = _mm512_maskz_loadu_ps(mask, w_rows[j].wrapping_add(full));
                for r in 0..R {
                    let xv = _mm512_maskz_loadu_ps(mask, x_rows[r].wrapping_add(full));
                    acc[j][r] = _mm512_fmadd_ps(wv, xv, acc[j][r]);
                }
            }
        }
        #[allow(clippy::needless_range_loop)] // `j` and `r` place the sum in `y` too
        for j in 0..J {
            for r in 0..R {
                *y.wrapping_add(r.wrapping_mul(n).wrapping_add(j)) =
                    _mm512_reduce_add_ps(acc[j][r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x · Wᵀ` one product at a time, in f64.
    fn reference(x: &[f32], (m, k): (usize, usize), w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
                y[r * n + j] = dot as f32;
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (a, b)) in a.iter().zip(b).enumerate() {
            assert!((a - b).abs() < 1e-4, "element {i}: {a} against {b}");
        }
    }

    #[test]
    fn few_rows_equals_the_reference_for_every_row_count_and_ragged_widths() {
        // widths: under one register, one and a bit, several; odd column counts
        for (k, n) in [(3, 5), (37, 33), (64, 71)] {
            for m in 1..=FEW_ROWS {
                let (x, w) = (values(m * k, 1), values(n * k, 2));
                close(&few_rows(&x, (m, k), &w, n), &reference(&x, (m, k), &w, n));
            }
        }
    }

    #[test]
    fn by_columns_reads_the_weight_transposed_or_as_it_is() {
        let (m, k, n) = (40, 29, 70);
        let (x, w) = (values(m * k, 3), values(n * k, 4));
        let want = reference(&x, (m, k), &w, n);
        close(&by_columns(&x, (m, k), &w, (1, k), n), &want);
        // the same weight stored as `[k, n]`
        let mut wt = vec![0f32; k * n];
        for j in 0..n {
            for i in 0..k {
                wt[i * n + j] = w[j * k + i];
            }
        }
        close(&by_columns(&x, (m, k), &wt, (n, 1), n), &want);
    }
}
