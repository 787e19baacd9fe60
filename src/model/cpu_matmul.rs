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

/// Whether the CPU runs the AVX-512 kernels below.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The most rows [`few_rows`] multiplies in one pass over the weight.
pub const FEW_ROWS: usize = 16;

/// `y[m, n] = x[m, k] · Wᵀ` for `W: [n, k]` and `m ≤ FEW_ROWS` rows (a decoding step):
/// every weight is read once, every thread reading its own share of `W`'s rows. Uses
/// AVX-512 where the CPU has it, gemm elsewhere.
pub fn few_rows(x: &[f32], (m, k): (usize, usize), w: &[f32], n: usize) -> Vec<f32> {
    assert!(m <= FEW_ROWS && x.len() >= m * k && w.len() >= n * k);
    #[cfg(target_arch = "x86_64")]
    if m > 0 && k > 0 && has_avx512() {
        let rows = avx512::F32Rows { w: w.as_ptr(), k };
        // SAFETY: AVX-512F is present and `w` holds `[n, k]`.
        return unsafe { avx512::few_rows_of(x, m, rows, n) };
    }
    by_columns(x, (m, k), w, (1, k), n)
}

/// A frozen weight `[n, k]` in Q8_0 blocks (32 values: an f32 scale and 32 signed bytes),
/// kept beside its f32 values where those are exactly `scale × byte`: a Q8_0 GGUF
/// dequantized, as Gemma's 262,144-row output head in the default model. A decoding step
/// reads a quarter of the bytes and gets the same products as from the f32 values, since
/// every weight converts back exactly and the sums run in the same order.
#[derive(Debug)]
pub struct Q8Rows {
    n: usize,
    k: usize,
    scales: Vec<f32>,
    quants: Vec<i8>,
}

impl Q8Rows {
    /// `w: [n, k]` as Q8_0 blocks when every value is exactly its block's `max |w| / 127`
    /// times an integer in −127..=127 (and `k` is a multiple of 32) and the CPU has the
    /// AVX-512 kernel that reads them; `None` otherwise.
    pub fn exact(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if k == 0 || !k.is_multiple_of(32) || w.len() != n * k || !has_avx512() {
            return None;
        }
        let mut scales = Vec::with_capacity(n * k / 32);
        let mut quants = vec![0i8; n * k];
        for (block, q) in w.chunks_exact(32).zip(quants.chunks_exact_mut(32)) {
            let amax = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let d = amax / 127.0;
            for (q, &v) in q.iter_mut().zip(block) {
                let r = if d == 0.0 { 0.0 } else { (v / d).round() };
                if r * d != v {
                    return None;
                }
                *q = r as i8;
            }
            scales.push(d);
        }
        Some(Q8Rows {
            n,
            k,
            scales,
            quants,
        })
    }

    /// [`few_rows`] against these weights: the same values, a quarter of the bytes read.
    pub fn few_rows(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert!(m <= FEW_ROWS && x.len() >= m * k);
        if m == 0 {
            return Vec::new();
        }
        #[cfg(target_arch = "x86_64")]
        {
            let rows = avx512::Q8Blocks {
                scales: self.scales.as_ptr(),
                quants: self.quants.as_ptr(),
                k,
            };
            // SAFETY: `exact` made these blocks only where AVX-512F is present; they hold
            // `[n, k]`.
            unsafe { avx512::few_rows_of(x, m, rows, n) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "Q8Rows::exact makes none without AVX-512 (x: {}, {n} rows)",
            x.len()
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{for_each_share, Shared};

    /// Sixteen consecutive weights of one row of `W`, as f32.
    pub trait Rows: Copy + Send + Sync {
        /// The row length.
        fn k(self) -> usize;
        /// Weights `i .. i + 16` of row `j` (`i + 16 ≤ k`).
        unsafe fn load(self, j: usize, i: usize) -> __m512;
        /// Weights `i ..` of row `j` up to `k`, zeros after.
        unsafe fn load_tail(self, j: usize, i: usize) -> __m512;
    }

    /// `W` as f32 values.
    #[derive(Clone, Copy)]
    pub struct F32Rows {
        pub w: *const f32,
        pub k: usize,
    }
    // SAFETY: read only, by the threads of one product.
    unsafe impl Send for F32Rows {}
    unsafe impl Sync for F32Rows {}

    impl Rows for F32Rows {
        fn k(self) -> usize {
            self.k
        }

        #[inline(always)]
        unsafe fn load(self, j: usize, i: usize) -> __m512 {
            _mm512_loadu_ps(self.w.wrapping_add(j * self.k + i))
        }

        #[inline(always)]
        unsafe fn load_tail(self, j: usize, i: usize) -> __m512 {
            let mask: __mmask16 = (1u16 << (self.k - i)) - 1;
            _mm512_maskz_loadu_ps(mask, self.w.wrapping_add(j * self.k + i))
        }
    }

    /// `W` as Q8_0 blocks (`k` a multiple of 32, so no row has a tail).
    #[derive(Clone, Copy)]
    pub struct Q8Blocks {
        pub scales: *const f32,
        pub quants: *const i8,
        pub k: usize,
    }
    // SAFETY: read only, by the threads of one product.
    unsafe impl Send for Q8Blocks {}
    unsafe impl Sync for Q8Blocks {}

    impl Rows for Q8Blocks {
        fn k(self) -> usize {
            self.k
        }

        #[inline(always)]
        unsafe fn load(self, j: usize, i: usize) -> __m512 {
            let at = j * self.k + i;
            let bytes = _mm_loadu_si128(self.quants.wrapping_add(at) as *const __m128i);
            let values = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
            _mm512_mul_ps(values, _mm512_set1_ps(*self.scales.wrapping_add(at / 32)))
        }

        #[inline(always)]
        unsafe fn load_tail(self, _j: usize, _i: usize) -> __m512 {
            unreachable!("Q8_0 rows are whole blocks")
        }
    }

    /// `y[m, n] = x[m, k] · Wᵀ` for `m ≤ 16`, each thread taking its own share of `W`'s rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn few_rows_of<W: Rows>(x: &[f32], m: usize, w: W, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        let out = Shared(y.as_mut_ptr());
        let x = x.as_ptr() as usize;
        for_each_share(n, |cols| {
            // SAFETY: AVX-512F is present (this function's caller checked); the share writes
            // its own columns of `y`.
            unsafe { few_rows(x as *const f32, m, w, cols, out.ptr(), n) }
        });
        y
    }

    /// Columns `cols` of `y[m, n] = x[m, k] · Wᵀ` (row stride `n`).
    #[target_feature(enable = "avx512f")]
    unsafe fn few_rows<W: Rows>(
        x: *const f32,
        m: usize,
        w: W,
        cols: std::ops::Range<usize>,
        y: *mut f32,
        n: usize,
    ) {
        // two of `W`'s rows at a time for up to eight input rows (16 accumulators), one at a
        // time for more
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match m {
                    $($r => block::<W, $r>(x, w, cols, y, n),)*
                    _ => unreachable!("few_rows takes 1..=16 rows"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn block<W: Rows, const R: usize>(
        x: *const f32,
        w: W,
        cols: std::ops::Range<usize>,
        y: *mut f32,
        n: usize,
    ) {
        let mut j = cols.start;
        if R <= 8 {
            while j + 2 <= cols.end {
                rows_of_w::<W, 2, R>(x, w, j, y.wrapping_add(j), n);
                j += 2;
            }
        }
        while j < cols.end {
            rows_of_w::<W, 1, R>(x, w, j, y.wrapping_add(j), n);
            j += 1;
        }
    }

    /// `y[r, j0 + jj] = x[r, :] · W[j0 + jj, :]` for `J` consecutive rows of `W` from `j0`
    /// and the `R` rows of `x`; `y` points at column `j0`. Pointer steps are wrapping ones
    /// (all stay within the operands).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // `j` and `r` also pick the row of `W` and of `y`
    unsafe fn rows_of_w<W: Rows, const J: usize, const R: usize>(
        x: *const f32,
        w: W,
        j0: usize,
        y: *mut f32,
        n: usize,
    ) {
        let k = w.k();
        let x_rows: [*const f32; R] = std::array::from_fn(|r| x.wrapping_add(r.wrapping_mul(k)));
        let mut acc = [[_mm512_setzero_ps(); R]; J];
        let full = k - k % 16;
        let mut i = 0;
        while i < full {
            for j in 0..J {
                let wv = w.load(j0 + j, i);
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
                let wv = w.load_tail(j0 + j, full);
                for r in 0..R {
                    let xv = _mm512_maskz_loadu_ps(mask, x_rows[r].wrapping_add(full));
                    acc[j][r] = _mm512_fmadd_ps(wv, xv, acc[j][r]);
                }
            }
        }
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
    fn q8_rows_rebuild_exact_blocks_and_give_the_f32_products_bit_for_bit() {
        // a Q8_0 matrix dequantized: scale × byte, the byte ±127 at each block's largest
        let (n, k) = (37, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                let scale = 0.001 * (1 + (i / 32) % 7) as f32;
                let q = if i % 32 == 5 {
                    127
                } else {
                    ((i * 31) % 255) as i32 - 127
                };
                scale * q as f32
            })
            .collect();
        let q8 = Q8Rows::exact(&w, n, k).expect("exact Q8_0 blocks");
        for m in [1, 3, 8, 13] {
            let x = values(m * k, 9);
            let want = few_rows(&x, (m, k), &w, n);
            assert_eq!(q8.few_rows(&x, m), want, "{m} rows");
        }
        // values that are no such blocks are refused
        assert!(Q8Rows::exact(&values(n * k, 3), n, k).is_none());
        assert!(Q8Rows::exact(&w[..n * 90], n, 90).is_none());
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
