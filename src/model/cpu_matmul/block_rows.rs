//! A weight kept in GGUF blocks read as [`Rows`]: each block's sixteen-value registers are
//! decoded straight from its bytes (no buffer in between), every value computed as
//! `quant`'s decoders compute it, operation for operation, so a product sees exactly the
//! dequantized weights.

use std::arch::x86_64::*;

use super::avx512::Rows;
use crate::model::quant::Blocks;

/// Where a block weight's bytes lie.
#[derive(Clone, Copy)]
pub struct Raw {
    data: *const u8,
    row_bytes: usize,
    k: usize,
}
// SAFETY: read only, by the threads of one product, while the `Blocks` it points into lives.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

impl Raw {
    /// `w`'s bytes (valid while `w` lives).
    pub fn of(w: &Blocks) -> Self {
        Raw {
            data: w.data().as_ptr(),
            row_bytes: w.row_bytes(),
            k: w.dims()[1],
        }
    }

    /// The first byte of block `b` (of `bytes` bytes) of row `j`.
    #[inline(always)]
    fn at(self, j: usize, b: usize, bytes: usize) -> *const u8 {
        self.data.wrapping_add(j * self.row_bytes + b * bytes)
    }
}

/// Calls `$body` with `$rows` bound to `w` read as the [`Rows`] of its kind.
macro_rules! with_rows {
    ($w:expr, |$rows:ident| $body:expr) => {{
        use $crate::model::cpu_matmul::block_rows::*;
        use $crate::model::quant::BlockKind;
        let raw = Raw::of($w);
        match $w.kind() {
            BlockKind::F16 => {
                let $rows = F16(raw);
                $body
            }
            BlockKind::BF16 => {
                let $rows = Bf16(raw);
                $body
            }
            BlockKind::Q4_0 => {
                let $rows = Q4_0(raw);
                $body
            }
            BlockKind::Q4_1 => {
                let $rows = Q4_1(raw);
                $body
            }
            BlockKind::Q5_0 => {
                let $rows = Q5_0(raw);
                $body
            }
            BlockKind::Q5_1 => {
                let $rows = Q5_1(raw);
                $body
            }
            BlockKind::Q8_0 => {
                let $rows = Q8_0(raw);
                $body
            }
            BlockKind::Q4K => {
                let $rows = Q4K(raw);
                $body
            }
            BlockKind::Q5K => {
                let $rows = Q5K(raw);
                $body
            }
            BlockKind::Q6K => {
                let $rows = Q6K(raw);
                $body
            }
        }
    }};
}
pub(crate) use with_rows;

/// The row length and the rows' bytes of a [`Rows`] that wraps a [`Raw`].
macro_rules! in_raw {
    () => {
        fn k(self) -> usize {
            self.0.k
        }
        #[inline(always)]
        fn row_bytes(self, j: usize) -> (*const u8, usize) {
            (self.0.at(j, 0, 0), self.0.row_bytes)
        }
    };
}

/// An IEEE half at `p` (little-endian) as f32, exactly.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let half = u16::from_le_bytes([*p, *p.wrapping_add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(half))))
}

/// Sixteen bytes at `p` as sixteen unsigned 32-bit lanes.
#[inline(always)]
unsafe fn bytes_at(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
}

/// The low (`high` false) or high four bits of each lane.
#[inline(always)]
unsafe fn nibbles(bytes: __m512i, high: bool) -> __m512i {
    if high {
        _mm512_srli_epi32::<4>(bytes)
    } else {
        _mm512_and_si512(bytes, _mm512_set1_epi32(0x0f))
    }
}

/// Integer lanes as f32 (exact: every value here is small).
#[inline(always)]
unsafe fn float(v: __m512i) -> __m512 {
    _mm512_cvtepi32_ps(v)
}

/// The reads of element formats past a row's last whole register: the values `i .. k` of
/// row `j`, two bytes each, widened to 32-bit lanes, zeros after.
#[inline(always)]
unsafe fn halves_tail(raw: Raw, j: usize, i: usize) -> __m512i {
    let mut tail = [0u16; 16];
    let p = raw.at(j, i, 2);
    for (t, value) in tail.iter_mut().take(raw.k - i).enumerate() {
        *value = u16::from_le_bytes([*p.wrapping_add(2 * t), *p.wrapping_add(2 * t + 1)]);
    }
    _mm512_cvtepu16_epi32(_mm256_loadu_si256(tail.as_ptr() as *const __m256i))
}

/// IEEE halves.
#[derive(Clone, Copy)]
pub struct F16(pub Raw);

impl Rows for F16 {
    const BLOCK: usize = 16;
    type Block = *const u8;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> *const u8 {
        self.0.at(j, 16 * b, 2)
    }
    #[inline(always)]
    unsafe fn values(block: *const u8, _c: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(block as *const __m256i))
    }
    #[inline(always)]
    unsafe fn tail(self, j: usize, i: usize) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(halves_tail(self.0, j, i)))
    }
}

/// bfloat16 values.
#[derive(Clone, Copy)]
pub struct Bf16(pub Raw);

impl Rows for Bf16 {
    const BLOCK: usize = 16;
    type Block = *const u8;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> *const u8 {
        self.0.at(j, 16 * b, 2)
    }
    #[inline(always)]
    unsafe fn values(block: *const u8, _c: usize) -> __m512 {
        let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(block as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
    }
    #[inline(always)]
    unsafe fn tail(self, j: usize, i: usize) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves_tail(self.0, j, i)))
    }
}

/// A block of 32 values with one scale (and perhaps a minimum): where its values lie.
#[derive(Clone, Copy)]
pub struct Scaled {
    p: *const u8,
    d: __m512,
    m: __m512,
    high_bits: u32,
}

/// The reads of block formats, whose rows are whole blocks: never called.
macro_rules! whole_blocks {
    () => {
        #[inline(always)]
        unsafe fn tail(self, _j: usize, _i: usize) -> __m512 {
            unreachable!("rows of block formats are whole blocks")
        }
    };
}

/// Q4_0: `(q − 8) × d`.
#[derive(Clone, Copy)]
pub struct Q4_0(pub Raw);

impl Rows for Q4_0 {
    const BLOCK: usize = 32;
    type Block = Scaled;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> Scaled {
        let p = self.0.at(j, b, 18);
        Scaled {
            p: p.wrapping_add(2),
            d: _mm512_set1_ps(f16_at(p)),
            m: _mm512_setzero_ps(),
            high_bits: 0,
        }
    }
    #[inline(always)]
    unsafe fn values(s: Scaled, c: usize) -> __m512 {
        let q = _mm512_sub_epi32(nibbles(bytes_at(s.p), c == 1), _mm512_set1_epi32(8));
        _mm512_mul_ps(float(q), s.d)
    }
    whole_blocks!();
}

/// Q4_1: `q × d + m`.
#[derive(Clone, Copy)]
pub struct Q4_1(pub Raw);

impl Rows for Q4_1 {
    const BLOCK: usize = 32;
    type Block = Scaled;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> Scaled {
        let p = self.0.at(j, b, 20);
        Scaled {
            p: p.wrapping_add(4),
            d: _mm512_set1_ps(f16_at(p)),
            m: _mm512_set1_ps(f16_at(p.wrapping_add(2))),
            high_bits: 0,
        }
    }
    #[inline(always)]
    unsafe fn values(s: Scaled, c: usize) -> __m512 {
        let q = nibbles(bytes_at(s.p), c == 1);
        _mm512_add_ps(_mm512_mul_ps(float(q), s.d), s.m)
    }
    whole_blocks!();
}

/// Four bits of `bytes` with a fifth (16) where `high_bits` has a bit for the lane.
#[inline(always)]
unsafe fn five_bits(bytes: __m512i, high: bool, high_bits: u16) -> __m512i {
    let low = nibbles(bytes, high);
    _mm512_mask_or_epi32(low, high_bits, low, _mm512_set1_epi32(0x10))
}

/// Q5_0: `(q − 16) × d`, the fifth bits of the 32 values in one 32-bit word.
#[derive(Clone, Copy)]
pub struct Q5_0(pub Raw);

impl Rows for Q5_0 {
    const BLOCK: usize = 32;
    type Block = Scaled;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> Scaled {
        let p = self.0.at(j, b, 22);
        Scaled {
            p: p.wrapping_add(6),
            d: _mm512_set1_ps(f16_at(p)),
            m: _mm512_setzero_ps(),
            high_bits: (p.wrapping_add(2) as *const u32).read_unaligned().to_le(),
        }
    }
    #[inline(always)]
    unsafe fn values(s: Scaled, c: usize) -> __m512 {
        let q = five_bits(bytes_at(s.p), c == 1, (s.high_bits >> (16 * c)) as u16);
        _mm512_mul_ps(float(_mm512_sub_epi32(q, _mm512_set1_epi32(16))), s.d)
    }
    whole_blocks!();
}

/// Q5_1: `q × d + m`, the fifth bits of the 32 values in one 32-bit word.
#[derive(Clone, Copy)]
pub struct Q5_1(pub Raw);

impl Rows for Q5_1 {
    const BLOCK: usize = 32;
    type Block = Scaled;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> Scaled {
        let p = self.0.at(j, b, 24);
        Scaled {
            p: p.wrapping_add(8),
            d: _mm512_set1_ps(f16_at(p)),
            m: _mm512_set1_ps(f16_at(p.wrapping_add(2))),
            high_bits: (p.wrapping_add(4) as *const u32).read_unaligned().to_le(),
        }
    }
    #[inline(always)]
    unsafe fn values(s: Scaled, c: usize) -> __m512 {
        let q = five_bits(bytes_at(s.p), c == 1, (s.high_bits >> (16 * c)) as u16);
        _mm512_add_ps(_mm512_mul_ps(float(q), s.d), s.m)
    }
    whole_blocks!();
}

/// Q8_0: `q × d` for signed bytes `q`.
#[derive(Clone, Copy)]
pub struct Q8_0(pub Raw);

impl Rows for Q8_0 {
    const BLOCK: usize = 32;
    type Block = Scaled;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> Scaled {
        let p = self.0.at(j, b, 34);
        Scaled {
            p: p.wrapping_add(2),
            d: _mm512_set1_ps(f16_at(p)),
            m: _mm512_setzero_ps(),
            high_bits: 0,
        }
    }
    #[inline(always)]
    unsafe fn values(s: Scaled, c: usize) -> __m512 {
        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(s.p.wrapping_add(16 * c) as *const __m128i));
        _mm512_mul_ps(float(q), s.d)
    }
    whole_blocks!();
}

/// A super-block of 256 values in sub-blocks of 32, each with its own scale and minimum
/// (already multiplied by the block's).
#[derive(Clone, Copy)]
pub struct SubScaled {
    values: *const u8,
    high_bits: *const u8,
    scales: [f32; 16],
    mins: [f32; 8],
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K / Q5_K block's twelve bytes.
#[inline(always)]
unsafe fn scale_min_k4(j: usize, q: *const u8) -> (u8, u8) {
    let at = |i: usize| *q.wrapping_add(i);
    if j < 4 {
        (at(j) & 63, at(j + 4) & 63)
    } else {
        (
            (at(j + 4) & 0x0f) | ((at(j - 4) >> 6) << 4),
            (at(j + 4) >> 4) | ((at(j) >> 6) << 4),
        )
    }
}

/// A Q4_K / Q5_K block's eight scales `d × sc` and minimums `min × m`.
#[inline(always)]
unsafe fn k4_scales(p: *const u8) -> ([f32; 16], [f32; 8]) {
    let (d, min) = (f16_at(p), f16_at(p.wrapping_add(2)));
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 8]);
    for s in 0..8 {
        let (sc, m) = scale_min_k4(s, p.wrapping_add(4));
        scales[s] = d * sc as f32;
        mins[s] = min * m as f32;
    }
    (scales, mins)
}

/// Register `c` of a Q4_K / Q5_K block: its sub-block (32 bytes of nibbles give two: low,
/// then high), whether its values are the high nibbles, and its offset in the 32 bytes.
#[inline(always)]
fn k4_register(c: usize) -> (usize, bool, usize) {
    let (group, high, part) = (c / 4, (c / 2) % 2 == 1, c % 2);
    (2 * group + usize::from(high), high, 32 * group + 16 * part)
}

/// Q4_K: `d × sc × q − min × m` per sub-block of 32.
#[derive(Clone, Copy)]
pub struct Q4K(pub Raw);

impl Rows for Q4K {
    const BLOCK: usize = 256;
    type Block = SubScaled;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> SubScaled {
        let p = self.0.at(j, b, 144);
        let (scales, mins) = k4_scales(p);
        SubScaled {
            values: p.wrapping_add(16),
            high_bits: p,
            scales,
            mins,
        }
    }
    #[inline(always)]
    unsafe fn values(s: SubScaled, c: usize) -> __m512 {
        let (sub, high, offset) = k4_register(c);
        let q = nibbles(bytes_at(s.values.wrapping_add(offset)), high);
        let scaled = _mm512_mul_ps(_mm512_set1_ps(s.scales[sub]), float(q));
        _mm512_sub_ps(scaled, _mm512_set1_ps(s.mins[sub]))
    }
    whole_blocks!();
}

/// Q5_K: `d × sc × q − min × m` per sub-block of 32, the fifth bits in 32 bytes of their
/// own.
#[derive(Clone, Copy)]
pub struct Q5K(pub Raw);

impl Rows for Q5K {
    const BLOCK: usize = 256;
    type Block = SubScaled;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> SubScaled {
        let p = self.0.at(j, b, 176);
        let (scales, mins) = k4_scales(p);
        SubScaled {
            values: p.wrapping_add(48),
            high_bits: p.wrapping_add(16),
            scales,
            mins,
        }
    }
    #[inline(always)]
    unsafe fn values(s: SubScaled, c: usize) -> __m512 {
        let (sub, high, offset) = k4_register(c);
        // the fifth bit of value `l` of sub-block `sub` is bit `sub` of byte `l`
        let bit = _mm512_set1_epi32(1 << sub);
        let fifth = _mm512_test_epi32_mask(bytes_at(s.high_bits.wrapping_add(offset % 32)), bit);
        let q = five_bits(bytes_at(s.values.wrapping_add(offset)), high, fifth);
        let scaled = _mm512_mul_ps(_mm512_set1_ps(s.scales[sub]), float(q));
        _mm512_sub_ps(scaled, _mm512_set1_ps(s.mins[sub]))
    }
    whole_blocks!();
}

/// Q6_K: `d × sc × (q − 32)` per sub-block of 16, four bits of `q` in one array and two in
/// another.
#[derive(Clone, Copy)]
pub struct Q6K(pub Raw);

impl Rows for Q6K {
    const BLOCK: usize = 256;
    type Block = SubScaled;

    in_raw!();
    #[inline(always)]
    unsafe fn block(self, j: usize, b: usize) -> SubScaled {
        let p = self.0.at(j, b, 210);
        let d = f16_at(p.wrapping_add(208));
        let mut scales = [0f32; 16];
        for (i, scale) in scales.iter_mut().enumerate() {
            *scale = d * *p.wrapping_add(192 + i) as i8 as f32;
        }
        SubScaled {
            values: p,
            high_bits: p.wrapping_add(128),
            scales,
            mins: [0f32; 8],
        }
    }
    #[inline(always)]
    unsafe fn values(s: SubScaled, c: usize) -> __m512 {
        // register `c`: half `c / 8` of the block (128 values), quarter `t` of the half
        // (32 values), first or second sixteen of it
        let (half, t, part) = (c / 8, (c / 2) % 4, c % 2);
        let low = s.values.wrapping_add(64 * half + 32 * (t % 2) + 16 * part);
        let four = nibbles(bytes_at(low), t >= 2);
        let high = bytes_at(s.high_bits.wrapping_add(32 * half + 16 * part));
        let two = _mm512_and_si512(
            _mm512_srlv_epi32(high, _mm512_set1_epi32(2 * t as i32)),
            _mm512_set1_epi32(3),
        );
        let q = _mm512_or_si512(four, _mm512_slli_epi32::<4>(two));
        let q = _mm512_sub_epi32(q, _mm512_set1_epi32(32));
        let scale = s.scales[8 * half + 2 * t + part];
        _mm512_mul_ps(_mm512_set1_ps(scale), float(q))
    }
    whole_blocks!();
}

/// Whether every kind's registers hold exactly the values `quant`'s decoders write.
#[cfg(test)]
mod tests {
    use super::super::avx512::{self, Rows};
    use crate::model::quant::testing::{random_blocks, KINDS};

    /// Every value of every register of `rows` against `want` (`[n, k]`), bit for bit.
    unsafe fn same_values<W: Rows>(rows: W, n: usize, want: &[f32], what: &str) {
        let k = rows.k();
        let mut got = vec![0f32; n * k];
        avx512::decode_rows(rows, 0..n, &mut got);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits(),
                "{what}: value {} of row {}: {g} against {w}",
                i % k,
                i / k
            );
        }
    }

    #[test]
    fn registers_hold_the_decoders_values_for_every_kind() {
        if !avx512::available() {
            eprintln!("this CPU has no AVX-512F and F16C: the registers are never used here");
            return;
        }
        for (kind, _) in KINDS {
            // element formats with a ragged last register; blocks three to a row
            let k = match kind.values() {
                1 => 16 * 3 + 5,
                per => 3 * per,
            };
            let n = 5;
            let blocks = random_blocks(kind, (n, k), 7);
            let want = blocks.to_f32();
            let what = format!("{kind:?}");
            // SAFETY: the CPU has the features; `blocks` lives through the reads.
            unsafe { with_rows!(&blocks, |rows| same_values(rows, n, &want, &what)) };
        }
    }
}
