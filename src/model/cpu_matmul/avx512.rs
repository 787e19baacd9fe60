//! The AVX-512 kernels of the products with few rows (decoding steps): every weight is read
//! once, sixteen values at a time into a register — decoded there from its GGUF block where
//! it is kept as blocks ([`super::block_rows`]) — and multiplied with up to sixteen rows of
//! activations.

use std::arch::x86_64::*;

use super::{for_each_share, Shared};

/// Whether the CPU has what the kernels here are compiled for: AVX-512F, AVX-512VL and F16C.
/// VL lets the sums' final reductions (256- and 128-bit operations) use all 32 vector
/// registers; without it those operations reach only the first 16, and the compiler keeps
/// a sum of a 16-sum kernel in memory.
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// A weight `W: [n, k]` read sixteen values at a time into a register.
pub trait Rows: Copy + Send + Sync {
    /// Values per block, a multiple of 16. A row holds whole blocks, but for the values
    /// [`Rows::tail`] reads.
    const BLOCK: usize;
    /// A block's scales and the place of its values: read once for all of its registers.
    type Block: Copy;
    /// The row length `k`.
    fn k(self) -> usize;
    /// Where row `j`'s stored values lie: its first byte and its length in bytes.
    fn row_bytes(self, j: usize) -> (*const u8, usize);
    /// Block `b` of row `j`.
    unsafe fn block(self, j: usize, b: usize) -> Self::Block;
    /// Values `16 c .. 16 c + 16` of a block, as f32.
    unsafe fn values(block: Self::Block, c: usize) -> __m512;
    /// Values `i .. k` of row `j`, fewer than sixteen past the last whole block, zeros after.
    /// Only element formats (f32, f16, bf16), whose rows need not be whole registers, have
    /// them.
    unsafe fn tail(self, j: usize, i: usize) -> __m512;
}

/// `W` as f32 values.
#[derive(Clone, Copy)]
pub struct F32Rows {
    /// `[n, k]`, row-major.
    pub w: *const f32,
    /// The row length.
    pub k: usize,
}
// SAFETY: read only, by the threads of one product.
unsafe impl Send for F32Rows {}
unsafe impl Sync for F32Rows {}

impl Rows for F32Rows {
    const BLOCK: usize = 16;
    type Block = *const f32;

    fn k(self) -> usize {
        self.k
    }

    #[inline(always)]
    fn row_bytes(self, j: usize) -> (*const u8, usize) {
        (self.w.wrapping_add(j * self.k) as *const u8, 4 * self.k)
    }

    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> *const f32 {
        self.w.wrapping_add(j * self.k + 16 * b)
    }

    #[inline(always)]
    unsafe fn values(block: *const f32, _c: usize) -> __m512 {
        _mm512_loadu_ps(block)
    }

    #[inline(always)]
    unsafe fn tail(self, j: usize, i: usize) -> __m512 {
        let mask: __mmask16 = (1u16 << (self.k - i)) - 1;
        _mm512_maskz_loadu_ps(mask, self.w.wrapping_add(j * self.k + i))
    }
}

/// The row counts with a kernel of their own: a product of other counts runs the next one
/// up, on rows of zeros past its own (each output is its own sum, so the extra rows change
/// nothing of the others).
fn kernel_rows(m: usize) -> usize {
    match m {
        0..=8 => m,
        9..=12 => 12,
        _ => 16,
    }
}

/// `y[m, n] = x[m, k] · Wᵀ` for `1 ≤ m ≤ 16`, each thread taking its own share of `W`'s
/// rows, into `y`: its values replaced, its allocation kept where large enough, and nothing
/// zeroed first (every value is written).
///
/// # Safety
/// The CPU has what [`available`] checks; `x` holds `[m, k]` and `w` `[n, k]`.
#[target_feature(enable = "avx512f,avx512vl,f16c")]
pub unsafe fn few_rows_into<W: Rows>(x: &[f32], m: usize, w: W, n: usize, y: &mut Vec<f32>) {
    let k = w.k();
    let rows = kernel_rows(m);
    let x = packed(x, m, k, rows);
    y.clear();
    y.reserve(rows * n);
    let out = Shared(y.as_mut_ptr());
    let x = x.as_ptr() as usize;
    for_each_share(n, |cols| {
        // SAFETY: the CPU has the features (this function's caller checked); `x` is packed
        // for `rows` rows; the share writes its own columns of `y`'s `rows × n` values,
        // which `reserve` made room for.
        unsafe { share(x as *const f32, rows, w, cols, out.ptr(), n) }
    });
    // SAFETY: the shares together wrote every column of every row, the first `m` among them
    y.set_len(m * n);
}

/// `x: [m, k]` packed register by register for a kernel of `rows` rows: at each of the
/// `⌈k / 16⌉` positions, the sixteen values of every row side by side (zeros past `k` and
/// past `m`). A kernel then reads all its rows' registers from one pointer at fixed offsets,
/// in the order it uses them, instead of from `rows` places `4k` bytes apart.
fn packed(x: &[f32], m: usize, k: usize, rows: usize) -> Vec<f32> {
    let positions = k.div_ceil(16);
    let mut packed = vec![0f32; positions * rows * 16];
    for (r, row) in x[..m * k].chunks_exact(k).enumerate() {
        for (q, values) in row.chunks(16).enumerate() {
            let at = (q * rows + r) * 16;
            packed[at..at + values.len()].copy_from_slice(values);
        }
    }
    packed
}

/// Columns `cols` of `y[m, n] = x[m, k] · Wᵀ` (row stride `n`) for a kernel's row count, `x`
/// [`packed`] for it.
#[target_feature(enable = "avx512f,avx512vl,f16c")]
unsafe fn share<W: Rows>(
    x: *const f32,
    m: usize,
    w: W,
    cols: std::ops::Range<usize>,
    y: *mut f32,
    n: usize,
) {
    macro_rules! dispatch {
        ($($r:literal)*) => {
            match m {
                $($r => columns::<W, $r>(x, w, cols, y, n),)*
                _ => unreachable!("kernel_rows gives 1..=8, 12 or 16 rows"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 12 16)
}

/// Columns `cols` of the product for `R` rows of `x`, two of `W`'s rows at a time.
#[target_feature(enable = "avx512f,avx512vl,f16c")]
unsafe fn columns<W: Rows, const R: usize>(
    x: *const f32,
    w: W,
    cols: std::ops::Range<usize>,
    y: *mut f32,
    n: usize,
) {
    let mut j = cols.start;
    while j + 2 <= cols.end {
        prefetch(w, j + 2..(j + 4).min(cols.end));
        groups::<W, 2, R>(x, w, j, y.wrapping_add(j), n);
        j += 2;
    }
    if j < cols.end {
        groups::<W, 1, R>(x, w, j, y.wrapping_add(j), n);
    }
}

/// `J` rows of `W` from `j0` times the `R` rows of `x`, in groups of at most eight rows of
/// `x` (with two rows of `W`, sixteen sums held in registers); `W`'s rows stay in L1 for
/// the later groups.
#[target_feature(enable = "avx512f,avx512vl,f16c")]
#[inline]
unsafe fn groups<W: Rows, const J: usize, const R: usize>(
    x: *const f32,
    w: W,
    j0: usize,
    y: *mut f32,
    n: usize,
) {
    let step = 16 * R;
    let (x8, y8) = (x.wrapping_add(16 * 8), y.wrapping_add(8 * n));
    match R {
        12 => {
            rows_of_w::<W, J, 8>(x, step, w, j0, y, n);
            rows_of_w::<W, J, 4>(x8, step, w, j0, y8, n);
        }
        16 => {
            rows_of_w::<W, J, 8>(x, step, w, j0, y, n);
            rows_of_w::<W, J, 8>(x8, step, w, j0, y8, n);
        }
        _ => rows_of_w::<W, J, R>(x, step, w, j0, y, n),
    }
}

/// Asks for rows `rows` of `W` to be brought into the cache while the rows before them are
/// multiplied, so that the product waits on memory less.
#[target_feature(enable = "avx512f,avx512vl,f16c")]
#[inline]
unsafe fn prefetch<W: Rows>(w: W, rows: std::ops::Range<usize>) {
    for j in rows {
        let (start, len) = w.row_bytes(j);
        for line in (0..len).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line) as *const i8);
        }
    }
}

/// Runs `$body` with `$c` bound to each of `0..$n` in turn, written out once per value (at
/// most sixteen), so that a block's register index is a constant in each copy: its offsets
/// and the choice of nibbles are then fixed at compile time, and no closure (which a
/// generic helper would call without this function's target features) stands in the way.
macro_rules! each_register {
    ($n:expr, |$c:ident| $body:block) => {
        const { assert!($n <= 16, "each_register writes out sixteen registers") };
        each_register!(@ $n, $c, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    };
    (@ $n:expr, $c:ident, $body:block, $($i:literal)*) => {
        $(if $i < $n {
            let $c: usize = $i;
            $body
        })*
    };
}

/// `y[r, j0 + jj] = x[r, :] · W[j0 + jj, :]` for `J` consecutive rows of `W` from `j0`
/// and `R` rows of `x` ([`packed`]: the rows' registers at one position of `k` start at
/// `x`, the next position's `step` values on); `y` points at column `j0`. Each sum runs
/// over `k` in order, whatever `J` and `R`. Pointer steps are wrapping ones (all stay
/// within the operands).
#[target_feature(enable = "avx512f,avx512vl,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // `j` and `r` also pick the row of `W` and of `y`
unsafe fn rows_of_w<W: Rows, const J: usize, const R: usize>(
    x: *const f32,
    step: usize,
    w: W,
    j0: usize,
    y: *mut f32,
    n: usize,
) {
    let k = w.k();
    let mut acc = [[_mm512_setzero_ps(); R]; J];
    let blocks = k / W::BLOCK;
    // the `R` rows' registers at the current position of `k`
    let mut at = x;
    for b in 0..blocks {
        // each block's scales are read once, as it is entered
        let mut block = [w.block(j0, b); J];
        for j in 1..J {
            block[j] = w.block(j0 + j, b);
        }
        each_register!(W::BLOCK / 16, |c| {
            // each row's register is loaded once for the `J` rows of `W`
            let mut wv = [_mm512_setzero_ps(); J];
            for j in 0..J {
                wv[j] = W::values(block[j], c);
            }
            for r in 0..R {
                let xv = _mm512_loadu_ps(at.wrapping_add(16 * r));
                for j in 0..J {
                    acc[j][r] = _mm512_fmadd_ps(wv[j], xv, acc[j][r]);
                }
            }
            at = at.wrapping_add(step);
        });
    }
    if blocks * W::BLOCK < k {
        // the packed registers hold zeros past `k`, as the tail's weights do
        for j in 0..J {
            let wv = w.tail(j0 + j, blocks * W::BLOCK);
            for r in 0..R {
                let xv = _mm512_loadu_ps(at.wrapping_add(16 * r));
                acc[j][r] = _mm512_fmadd_ps(wv, xv, acc[j][r]);
            }
        }
    }
    for j in 0..J {
        for r in 0..R {
            *y.wrapping_add(r.wrapping_mul(n).wrapping_add(j)) = _mm512_reduce_add_ps(acc[j][r]);
        }
    }
}

/// Decodes whole rows `rows` of `w` into `out` (`rows.len() × k` values) through the same
/// registers the products use.
///
/// # Safety
/// The CPU has what [`available`] checks; `w` holds the rows; `out` holds
/// `rows.len() × k` values.
#[target_feature(enable = "avx512f,avx512vl,f16c")]
pub unsafe fn decode_rows<W: Rows>(w: W, rows: std::ops::Range<usize>, out: &mut [f32]) {
    let k = w.k();
    assert!(out.len() == rows.len() * k, "decoded rows fit their buffer");
    let blocks = k / W::BLOCK;
    let mut y = out.as_mut_ptr();
    for j in rows {
        for b in 0..blocks {
            let block = w.block(j, b);
            each_register!(W::BLOCK / 16, |c| {
                _mm512_storeu_ps(y, W::values(block, c));
                y = y.wrapping_add(16);
            });
        }
        let done = blocks * W::BLOCK;
        if done < k {
            let mask: __mmask16 = (1u16 << (k - done)) - 1;
            _mm512_mask_storeu_ps(y, mask, w.tail(j, done));
            y = y.wrapping_add(k - done);
        }
    }
}
