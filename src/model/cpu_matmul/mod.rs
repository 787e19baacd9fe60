//! f32 products with a frozen weight on the CPU, shared out between threads by hand.
//!
//! gemm splits a product between its threads by itself, but for the shapes of a small model
//! it leaves much unused: a `[256, 2048] × [2048, 640]` product (Gemma 3 270m's MLP down
//! projection) runs at 80 GFLOPS on two threads where each thread alone reaches 70. Here
//! every thread takes its own share of the product's columns (the weight's rows) and runs a
//! one-thread gemm on it: 130 GFLOPS for that product. A decoding step (a few rows) reads
//! each weight once; [`few_rows`] multiplies up to sixteen rows in that one pass.
//!
//! A weight kept in GGUF blocks ([`Blocks`]) is multiplied the same ways: on an AVX-512 CPU a
//! decoding step runs the same kernel with every register of weights decoded from its block
//! in place (`block_rows`), so the weights are read once, as blocks, and nothing is
//! written; on an AVX2 CPU it decodes two rows at a time into a buffer that stays in L1 and
//! runs the AVX2 kernel on it ([`blocks_t`]); a product of many rows (prefill, training)
//! decodes a tile of rows per step into a per-thread buffer and hands it to gemm; the input gradient
//! `g · W` ([`blocks_times`]) shares out `W`'s columns, whole blocks to a thread, and decodes
//! tiles of them. The activations stay f32 throughout: the products equal those over the
//! dequantized weights up to the order of the sums.

use std::ops::Range;

use gemm::{gemm, Parallelism};

use super::quant::Blocks;
use super::team;

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

/// The column ranges the threads take: as many as the team has threads, in multiples of
/// 16 (a vector register of f32), none empty.
fn column_shares(n: usize) -> Vec<Range<usize>> {
    shares_of(n, 16)
}

/// `0..n` cut into one range per thread of the team, each a multiple of `step` long (the
/// last excepted), none empty.
fn shares_of(n: usize, step: usize) -> Vec<Range<usize>> {
    let per = n.div_ceil(team::threads()).next_multiple_of(step).max(step);
    (0..n).step_by(per).map(|c| c..(c + per).min(n)).collect()
}

/// Runs `f` on every share of `0..n` columns, each on its own thread of the team.
fn for_each_share(n: usize, f: impl Fn(Range<usize>) + Sync) {
    run_shares(column_shares(n), f)
}

/// Runs `f` on every one of `shares`, each on its own thread of the [`team`].
fn run_shares(shares: Vec<Range<usize>>, f: impl Fn(Range<usize>) + Sync) {
    team::for_each(shares.len(), |i| f(shares[i].clone()));
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

/// Whether the CPU runs the AVX-512 kernels ([`avx512::available`]).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU runs the AVX2 kernels below (AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The most rows [`few_rows`] multiplies in one pass over the weight.
pub const FEW_ROWS: usize = 16;

/// `y[m, n] = x[m, k] · Wᵀ` for `W: [n, k]` and `m ≤ FEW_ROWS` rows (a decoding step):
/// every weight is read once, every thread reading its own share of `W`'s rows. Uses
/// AVX-512 or AVX2 where the CPU has it, gemm elsewhere.
pub fn few_rows(x: &[f32], (m, k): (usize, usize), w: &[f32], n: usize) -> Vec<f32> {
    let mut y = Vec::new();
    few_rows_into(x, (m, k), w, n, &mut y);
    y
}

/// [`few_rows`] into `y`, its values replaced and its allocation kept where large enough.
pub fn few_rows_into(x: &[f32], (m, k): (usize, usize), w: &[f32], n: usize, y: &mut Vec<f32>) {
    assert!(m <= FEW_ROWS && x.len() >= m * k && w.len() >= n * k);
    #[cfg(target_arch = "x86_64")]
    if m > 0 && k > 0 && has_avx512() {
        let rows = avx512::F32Rows { w: w.as_ptr(), k };
        // SAFETY: the CPU has the kernel's features; `x` holds `[m, k]` and `w` `[n, k]`.
        return unsafe { avx512::few_rows_into(x, m, rows, n, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if m > 0 && k > 0 && has_avx2() {
        // SAFETY: AVX2 and FMA are present and `w` holds `[n, k]`.
        *y = unsafe { avx2::few_rows_of(x, m, w, k, n) };
        return;
    }
    *y = by_columns(x, (m, k), w, (1, k), n)
}

/// Rows of a block weight decoded per step of a product of many rows.
const TILE_ROWS: usize = 64;

/// `y[m, n] = x[m, k] · Wᵀ` for `W: [n, k]` kept in blocks, each thread taking its own share
/// of `W`'s rows. Up to [`FEW_ROWS`] rows on an AVX-512 CPU, [`few_rows`]'s kernel decodes
/// each register of `W` from its block and multiplies it at once; on an AVX2 CPU two rows
/// of `W` at a time are decoded into a buffer and multiplied while in L1; otherwise tiles of
/// [`TILE_ROWS`] rows are decoded and multiplied by gemm (AVX-512 or AVX2 as the CPU has).
pub fn blocks_t(x: &[f32], m: usize, w: &Blocks) -> Vec<f32> {
    let mut y = Vec::new();
    blocks_t_into(x, m, w, &mut y);
    y
}

/// [`blocks_t`] into `y`, its values replaced and its allocation kept where large enough
/// (on an AVX-512 CPU up to [`FEW_ROWS`] rows write into it in place).
pub fn blocks_t_into(x: &[f32], m: usize, w: &Blocks, y: &mut Vec<f32>) {
    let (n, k) = (w.dims()[0], w.dims()[1]);
    assert!(x.len() >= m * k, "x holds [{m}, {k}]");
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 && k > 0 && m <= FEW_ROWS && has_avx512() {
        // SAFETY: the CPU has the kernel's features; `x` holds `[m, k]` and the rows read
        // `w`'s `[n, k]` blocks, which outlive the product.
        return unsafe {
            block_rows::with_rows!(w, |rows| avx512::few_rows_into(x, m, rows, n, y))
        };
    }
    *y = blocks_t_elsewhere(x, m, w);
}

/// [`blocks_t`] where the AVX-512 kernel does not take it.
fn blocks_t_elsewhere(x: &[f32], m: usize, w: &Blocks) -> Vec<f32> {
    let (n, k) = (w.dims()[0], w.dims()[1]);
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mut y = vec![0f32; m * n];
    let out = Shared(y.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if m <= FEW_ROWS && has_avx2() {
        for_each_share(n, |cols| {
            let mut rows = vec![0f32; 2 * k];
            let mut j = cols.start;
            while j < cols.end {
                let pair = (cols.end - j).min(2);
                w.decode_rows(j..j + pair, &mut rows[..pair * k]);
                let (x, rows, y) = (
                    x.as_ptr(),
                    (rows.as_ptr(), pair, k),
                    out.ptr().wrapping_add(j),
                );
                // SAFETY: AVX2 and FMA are present; `rows` holds `[pair, k]` and `x`
                // `[m, k]`; the share writes its own columns `j .. j + pair` of `y: [m, n]`.
                unsafe { avx2::decoded_rows(x, m, rows, y, n) };
                j += pair;
            }
        });
        return y;
    }
    for_each_share(n, |cols| {
        let mut tile = vec![0f32; TILE_ROWS.min(cols.len()) * k];
        for start in cols.clone().step_by(TILE_ROWS) {
            let rows = TILE_ROWS.min(cols.end - start);
            decode_tile(w, start..start + rows, &mut tile[..rows * k]);
            // SAFETY: gemm reads `x: [m, k]` and the tile `[rows, k]` as `[k, rows]`, and
            // writes columns `start .. start + rows` of `y: [m, n]`, this share's own.
            unsafe {
                gemm(
                    m,
                    rows,
                    k,
                    out.ptr().add(start),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    tile.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        }
    });
    y
}

/// Decodes whole rows `rows` of `w` into `out`: through the product kernels' registers on
/// an AVX-512 CPU, `quant`'s decoders elsewhere (the same values either way).
fn decode_tile(w: &Blocks, rows: Range<usize>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the kernel's features; `out` holds `rows.len() × k` values.
        return unsafe { block_rows::with_rows!(w, |w| avx512::decode_rows(w, rows, out)) };
    }
    w.decode_rows(rows, out)
}

/// Rows of a block weight decoded per step of [`blocks_times`].
const TIMES_TILE_ROWS: usize = 256;

/// `y[m, k] = g[m, n] · W` for `W: [n, k]` kept in blocks (the input gradient of `x Wᵀ`):
/// each thread takes its own share of `W`'s columns, whole blocks, decodes tiles of
/// [`TIMES_TILE_ROWS`] rows of it and accumulates their products with gemm.
pub fn blocks_times(g: &[f32], m: usize, w: &Blocks) -> Vec<f32> {
    let (n, k) = (w.dims()[0], w.dims()[1]);
    assert!(g.len() >= m * n, "g holds [{m}, {n}]");
    let mut y = vec![0f32; m * k];
    if m == 0 || n == 0 || k == 0 {
        return y;
    }
    let out = Shared(y.as_mut_ptr());
    let per = w.kind().values();
    let shares: Vec<Range<usize>> = shares_of(k / per, 1)
        .into_iter()
        .map(|b| b.start * per..b.end * per)
        .collect();
    run_shares(shares, |cols| {
        let width = cols.len();
        let mut tile = vec![0f32; TIMES_TILE_ROWS.min(n) * width];
        for start in (0..n).step_by(TIMES_TILE_ROWS) {
            let rows = TIMES_TILE_ROWS.min(n - start);
            for (r, dst) in tile.chunks_exact_mut(width).take(rows).enumerate() {
                w.decode(start + r, cols.clone(), dst);
            }
            // SAFETY: gemm reads columns `start .. start + rows` of `g: [m, n]` and the tile
            // `[rows, width]`, and adds into columns `cols` of `y: [m, k]`, this share's own.
            unsafe {
                gemm(
                    m,
                    width,
                    rows,
                    out.ptr().add(cols.start),
                    1,
                    k as isize,
                    start > 0,
                    g.as_ptr().add(start),
                    1,
                    n as isize,
                    tile.as_ptr(),
                    1,
                    width as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        }
    });
    y
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod block_rows;

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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_kernel_equals_the_reference_whatever_the_cpu_prefers() {
        if !has_avx2() {
            eprintln!("this CPU has no AVX2 and FMA: the kernel is never used here");
            return;
        }
        for (k, n) in [(3, 5), (37, 33), (64, 71)] {
            for m in 1..=FEW_ROWS {
                let (x, w) = (values(m * k, 5), values(n * k, 6));
                // SAFETY: AVX2 and FMA are present; `w` holds `[n, k]`.
                let got = unsafe { avx2::few_rows_of(&x, m, &w, k, n) };
                close(&got, &reference(&x, (m, k), &w, n));
            }
        }
    }

    /// `|a − b| ≤ 1e-5 · (1 + Σ|x·w|)` per element: f32 sums in another order.
    fn close_to(got: &[f32], want: &[f32], scale: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + s),
                "{what}, element {i}: {g} against {w}"
            );
        }
    }

    /// `x · Wᵀ` and `Σ |x| · |W|` per element, in f64, from f32 values.
    fn reference_with_scale(
        x: &[f32],
        (m, k): (usize, usize),
        w: &[f32],
        n: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<f32>>();
        (
            reference(x, (m, k), w, n),
            reference(&abs(x), (m, k), &abs(w), n),
        )
    }

    /// A weight shape for `kind`: 37 rows (no multiple of 16, of a column share or of a
    /// tile) of three blocks (at least 96 values: a register tail for F16/BF16 too).
    fn ragged_shape(kind: crate::model::quant::BlockKind) -> (usize, usize) {
        (
            37,
            3 * kind.values().max(32) + usize::from(kind.values() == 1),
        )
    }

    #[test]
    fn block_products_equal_products_over_candles_dequantization() {
        use crate::model::quant::testing::{candle_values, random_blocks, KINDS};
        for (kind, dtype) in KINDS {
            let (n, k) = ragged_shape(kind);
            let blocks = random_blocks(kind, (n, k), 11);
            let w = candle_values(&blocks, dtype);
            for m in [1, 2, 3, 8, 9, 16, 17, 70] {
                let x = values(m * k, m as u32);
                let (want, scale) = reference_with_scale(&x, (m, k), &w, n);
                let what = format!("{kind:?} x·Wᵀ, {m} rows");
                close_to(&blocks_t(&x, m, &blocks), &want, &scale, &what);
                // the input gradient: g [m, n] · W [n, k], W's transpose as the reference's
                let g = values(m * n, 100 + m as u32);
                let mut wt = vec![0f32; k * n];
                for j in 0..n {
                    for i in 0..k {
                        wt[i * n + j] = w[j * k + i];
                    }
                }
                let (want, scale) = reference_with_scale(&g, (m, n), &wt, k);
                let what = format!("{kind:?} g·W, {m} rows");
                close_to(&blocks_times(&g, m, &blocks), &want, &scale, &what);
            }
        }
    }

    #[test]
    fn a_rows_product_is_the_same_bits_alone_and_among_others() {
        // each sum runs over `k` in one order whatever the rows beside it, so a sequence's
        // numbers do not depend on the batch it decodes in
        use crate::model::quant::testing::{random_blocks, KINDS};
        for (kind, _) in KINDS {
            let (n, k) = ragged_shape(kind);
            let blocks = random_blocks(kind, (n, k), 7);
            let w = blocks.to_f32();
            let x = values(FEW_ROWS * k, 9);
            let alone = |r: usize| {
                let row = &x[r * k..(r + 1) * k];
                (blocks_t(row, 1, &blocks), few_rows(row, (1, k), &w, n))
            };
            let alone: Vec<_> = (0..FEW_ROWS).map(alone).collect();
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for m in 2..=FEW_ROWS {
                let together = (
                    blocks_t(&x[..m * k], m, &blocks),
                    few_rows(&x[..m * k], (m, k), &w, n),
                );
                for (r, (blocks_alone, f32_alone)) in alone.iter().take(m).enumerate() {
                    let row = r * n..(r + 1) * n;
                    assert_eq!(
                        bits(&together.0[row.clone()]),
                        bits(blocks_alone),
                        "{kind:?}, row {r} of {m}"
                    );
                    assert_eq!(
                        bits(&together.1[row]),
                        bits(f32_alone),
                        "f32, row {r} of {m}"
                    );
                }
            }
        }
    }

    #[test]
    fn block_products_over_many_tiles() {
        use crate::model::quant::{testing::random_blocks, BlockKind};
        // more rows than a tile of either product, with a ragged last tile
        let (n, k, m) = (TIMES_TILE_ROWS + TILE_ROWS + 5, 64, 20);
        let blocks = random_blocks(BlockKind::Q8_0, (n, k), 5);
        let w = blocks.to_f32();
        let x = values(m * k, 1);
        let (want, scale) = reference_with_scale(&x, (m, k), &w, n);
        close_to(&blocks_t(&x, m, &blocks), &want, &scale, "x·Wᵀ");
        let g = values(m * n, 2);
        let got = blocks_times(&g, m, &blocks);
        let want = by_columns(&g, (m, n), &w, (k, 1), k);
        let abs: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        let scale = by_columns(
            &g.iter().map(|v| v.abs()).collect::<Vec<_>>(),
            (m, n),
            &abs,
            (k, 1),
            k,
        );
        close_to(&got, &want, &scale, "g·W");
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
