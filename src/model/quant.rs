//! Frozen weights kept in a GGUF file's own blocks (Q4_K, Q8_0, F16, …) rather than as f32:
//! a quarter to an eighth of the bytes held and read. The blocks are decoded a row (or a tile
//! of rows) at a time into a small buffer right before the f32 arithmetic that uses them
//! (`cpu_matmul`), so products equal those over the dequantized weights up to summation
//! order. Each decoder computes every value as llama.cpp's (and candle's) dequantization
//! does, operation for operation.

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};

/// The block formats kept as blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// IEEE half precision, one value per "block".
    F16,
    /// bfloat16, one value per "block".
    BF16,
    /// 32 values: an f16 scale and 4-bit values offset by 8.
    Q4_0,
    /// 32 values: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 values: an f16 scale and 5-bit values offset by 16.
    Q5_0,
    /// 32 values: f16 scale and minimum, 5-bit values.
    Q5_1,
    /// 32 values: an f16 scale and signed bytes.
    Q8_0,
    /// 256 values: eight sub-blocks of 4-bit values with 6-bit scales and minimums.
    Q4K,
    /// 256 values: eight sub-blocks of 5-bit values with 6-bit scales and minimums.
    Q5K,
    /// 256 values: sixteen sub-blocks of 6-bit values with 8-bit scales.
    Q6K,
}

impl BlockKind {
    /// The kind of a GGUF tensor type, `None` for those not kept as blocks (F32 stays a
    /// tensor; Q2_K, Q3_K and the rest are dequantized at load).
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::F16 => BlockKind::F16,
            GgmlDType::BF16 => BlockKind::BF16,
            GgmlDType::Q4_0 => BlockKind::Q4_0,
            GgmlDType::Q4_1 => BlockKind::Q4_1,
            GgmlDType::Q5_0 => BlockKind::Q5_0,
            GgmlDType::Q5_1 => BlockKind::Q5_1,
            GgmlDType::Q8_0 => BlockKind::Q8_0,
            GgmlDType::Q4K => BlockKind::Q4K,
            GgmlDType::Q5K => BlockKind::Q5K,
            GgmlDType::Q6K => BlockKind::Q6K,
            _ => return None,
        })
    }

    /// Values per block.
    pub fn values(self) -> usize {
        match self {
            BlockKind::F16 | BlockKind::BF16 => 1,
            BlockKind::Q4_0 | BlockKind::Q4_1 | BlockKind::Q5_0 | BlockKind::Q5_1 => 32,
            BlockKind::Q8_0 => 32,
            BlockKind::Q4K | BlockKind::Q5K | BlockKind::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn bytes(self) -> usize {
        match self {
            BlockKind::F16 | BlockKind::BF16 => 2,
            BlockKind::Q4_0 => 18,
            BlockKind::Q4_1 => 20,
            BlockKind::Q5_0 => 22,
            BlockKind::Q5_1 => 24,
            BlockKind::Q8_0 => 34,
            BlockKind::Q4K => 144,
            BlockKind::Q5K => 176,
            BlockKind::Q6K => 210,
        }
    }
}

/// A frozen weight `[n, k]` as its GGUF blocks, row after row (`k` a multiple of the block's
/// value count).
pub struct Blocks {
    kind: BlockKind,
    dims: [usize; 2],
    row_bytes: usize,
    data: Vec<u8>,
}

impl Blocks {
    /// `data` as `[n, k]` values in `kind`'s blocks; an error when `k` is no whole number of
    /// blocks or `data` is not their size.
    pub fn new(kind: BlockKind, (n, k): (usize, usize), data: Vec<u8>) -> Result<Self, String> {
        if !k.is_multiple_of(kind.values()) {
            return Err(format!(
                "rows of {k} values are no whole number of {kind:?} blocks ({} values)",
                kind.values()
            ));
        }
        let row_bytes = k / kind.values() * kind.bytes();
        if data.len() != n * row_bytes {
            return Err(format!(
                "{} bytes for [{n}, {k}] in {kind:?} blocks, which take {}",
                data.len(),
                n * row_bytes
            ));
        }
        Ok(Blocks {
            kind,
            dims: [n, k],
            row_bytes,
            data,
        })
    }

    /// A two-dimensional GGUF tensor's blocks, `None` where its type or row length is not
    /// kept as blocks.
    pub fn of_qtensor(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let (Some(kind), Ok((n, k))) = (BlockKind::of(q.dtype()), q.shape().dims2()) else {
            return Ok(None);
        };
        if !k.is_multiple_of(kind.values()) {
            return Ok(None);
        }
        Blocks::new(kind, (n, k), q.data()?.into_owned())
            .map(Some)
            .map_err(candle_core::Error::Msg)
    }

    /// The block format.
    pub fn kind(&self) -> BlockKind {
        self.kind
    }

    /// `[n, k]`.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The blocks' bytes, row after row.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The same weight with its rows reordered: row `r` of the result is row `source(r)`.
    pub fn with_rows(&self, source: impl Fn(usize) -> usize) -> Self {
        let mut data = Vec::with_capacity(self.data.len());
        for r in 0..self.dims[0] {
            let s = source(r);
            data.extend_from_slice(&self.data[s * self.row_bytes..][..self.row_bytes]);
        }
        Blocks { data, ..*self }
    }

    /// Decodes values `cols` of row `row` into `out` (`cols.len()` values); `cols` starts
    /// and ends on block edges (or at `k`).
    pub fn decode(&self, row: usize, cols: Range<usize>, out: &mut [f32]) {
        let per = self.kind.values();
        assert!(
            row < self.dims[0]
                && cols.start.is_multiple_of(per)
                && cols.end.is_multiple_of(per)
                && cols.end <= self.dims[1]
                && out.len() == cols.len(),
            "decode row {row}, columns {cols:?} of [{}, {}] {:?} blocks",
            self.dims[0],
            self.dims[1],
            self.kind
        );
        let bytes = self.kind.bytes();
        let start = row * self.row_bytes + cols.start / per * bytes;
        let data = &self.data[start..start + cols.len() / per * bytes];
        decode_blocks(self.kind, data, out);
    }

    /// Decodes whole rows `rows` into `out` (`rows.len() × k` values).
    pub fn decode_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        let k = self.dims[1];
        assert!(rows.end <= self.dims[0] && out.len() == rows.len() * k);
        let data = &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes];
        decode_blocks(self.kind, data, out);
    }

    /// Every value as f32, `[n, k]` row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.dims[0] * self.dims[1]];
        self.decode_rows(0..self.dims[0], &mut out);
        out
    }
}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Blocks({:?}, [{}, {}], {} bytes)",
            self.kind,
            self.dims[0],
            self.dims[1],
            self.data.len()
        )
    }
}

/// Decodes whole blocks of `kind` into `out`, with the widest vector instructions the CPU
/// has (the same scalar code compiled for each).
fn decode_blocks(kind: BlockKind, data: &[u8], out: &mut [f32]) {
    assert_eq!(
        data.len() / kind.bytes() * kind.values(),
        out.len(),
        "{kind:?} blocks"
    );
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma");
        if avx2 && has!("avx512f") && has!("avx512bw") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { decode_avx512(kind, data, out) };
        }
        if avx2 {
            // SAFETY: as above.
            return unsafe { decode_avx2(kind, data, out) };
        }
    }
    decode_portable(kind, data, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn decode_avx512(kind: BlockKind, data: &[u8], out: &mut [f32]) {
    decode_portable(kind, data, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_avx2(kind: BlockKind, data: &[u8], out: &mut [f32]) {
    decode_portable(kind, data, out)
}

/// Every block of `data` through `decode` into `out`, in fixed-size arrays (so the
/// compiler sees every index in bounds and vectorises the block's loops); a macro, so that
/// `decode` is inlined into the caller compiled for the CPU's features.
macro_rules! each_block {
    ($data:expr, $out:expr, $bytes:literal, $values:literal, $decode:expr) => {{
        let (blocks, _) = $data.as_chunks::<$bytes>();
        let (outs, _) = $out.as_chunks_mut::<$values>();
        for (b, y) in blocks.iter().zip(outs) {
            $decode(b, y);
        }
    }};
}

#[inline(always)]
fn decode_portable(kind: BlockKind, data: &[u8], out: &mut [f32]) {
    match kind {
        BlockKind::F16 => each_block!(data, out, 2, 1, f16_value),
        BlockKind::BF16 => each_block!(data, out, 2, 1, bf16_value),
        BlockKind::Q4_0 => each_block!(data, out, 18, 32, q4_0),
        BlockKind::Q4_1 => each_block!(data, out, 20, 32, q4_1),
        BlockKind::Q5_0 => each_block!(data, out, 22, 32, q5_0),
        BlockKind::Q5_1 => each_block!(data, out, 24, 32, q5_1),
        BlockKind::Q8_0 => each_block!(data, out, 34, 32, q8_0),
        BlockKind::Q4K => each_block!(data, out, 144, 256, q4_k),
        BlockKind::Q5K => each_block!(data, out, 176, 256, q5_k),
        BlockKind::Q6K => each_block!(data, out, 210, 256, q6_k),
    }
}

#[inline(always)]
fn f16_value(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = f16(b[0], b[1]);
}

#[inline(always)]
fn bf16_value(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16);
}

/// An IEEE half (little-endian bytes) as f32, exactly.
#[inline(always)]
fn f16(lo: u8, hi: u8) -> f32 {
    let h = u16::from_le_bytes([lo, hi]);
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match exp {
        0 => {
            // zero or subnormal: man × 2⁻²⁴, exact in f32
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[inline(always)]
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16(b[0], b[1]);
    let qs: &[u8; 16] = b[2..18].try_into().expect("16 bytes");
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0f) as i16 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i16 - 8) as f32 * d;
    }
}

#[inline(always)]
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (f16(b[0], b[1]), f16(b[2], b[3]));
    let qs: &[u8; 16] = b[4..20].try_into().expect("16 bytes");
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

#[inline(always)]
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16(b[0], b[1]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs: &[u8; 16] = b[6..22].try_into().expect("16 bytes");
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((qs[j] & 0x0f) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

#[inline(always)]
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (f16(b[0], b[1]), f16(b[2], b[3]));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs: &[u8; 16] = b[8..24].try_into().expect("16 bytes");
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((qs[j] & 0x0f) | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

#[inline(always)]
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16(b[0], b[1]);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K / Q5_K block.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let (d, min) = (f16(b[0], b[1]), f16(b[2], b[3]));
    let scales = &b[4..16];
    let qs = &b[16..144];
    let (qs, _) = qs.as_chunks::<32>();
    let (ys, _) = y.as_chunks_mut::<64>();
    for (half, (q, y)) in qs.iter().zip(ys).enumerate() {
        let (sc, m) = scale_min_k4(2 * half, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * half + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

#[inline(always)]
fn q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let (d, min) = (f16(b[0], b[1]), f16(b[2], b[3]));
    let scales = &b[4..16];
    let qh: &[u8; 32] = b[16..48].try_into().expect("32 bytes");
    let (qs, _) = b[48..176].as_chunks::<32>();
    let (ys, _) = y.as_chunks_mut::<64>();
    for (half, (ql, y)) in qs.iter().zip(ys).enumerate() {
        let (sc, m) = scale_min_k4(2 * half, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * half + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (u1, u2) = (1u8 << (2 * half), 2u8 << (2 * half));
        for l in 0..32 {
            let add1 = if qh[l] & u1 != 0 { 16f32 } else { 0f32 };
            let add2 = if qh[l] & u2 != 0 { 16f32 } else { 0f32 };
            y[l] = d1 * ((ql[l] & 0x0f) as f32 + add1) - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) as f32 + add2) - m2;
        }
    }
}

#[inline(always)]
fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = f16(b[208], b[209]);
    for half in 0..2 {
        let ql: &[u8; 64] = b[64 * half..64 * half + 64].try_into().expect("64 bytes");
        let qh: &[u8; 32] = b[128 + 32 * half..][..32].try_into().expect("32 bytes");
        let sc: &[u8; 8] = b[192 + 8 * half..][..8].try_into().expect("8 bytes");
        let y: &mut [f32; 128] = (&mut y[128 * half..][..128])
            .try_into()
            .expect("128 values");
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// Random blocks of every kind for the tests here and in `cpu_matmul`: random bytes with
/// every f16 scale set to a modest finite value.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Every kind with its GGUF type.
    pub const KINDS: [(BlockKind, GgmlDType); 10] = [
        (BlockKind::F16, GgmlDType::F16),
        (BlockKind::BF16, GgmlDType::BF16),
        (BlockKind::Q4_0, GgmlDType::Q4_0),
        (BlockKind::Q4_1, GgmlDType::Q4_1),
        (BlockKind::Q5_0, GgmlDType::Q5_0),
        (BlockKind::Q5_1, GgmlDType::Q5_1),
        (BlockKind::Q8_0, GgmlDType::Q8_0),
        (BlockKind::Q4K, GgmlDType::Q4K),
        (BlockKind::Q5K, GgmlDType::Q5K),
        (BlockKind::Q6K, GgmlDType::Q6K),
    ];

    /// Byte offsets of a block's f16 scales.
    fn scale_offsets(kind: BlockKind) -> &'static [usize] {
        match kind {
            BlockKind::Q4_0 | BlockKind::Q5_0 | BlockKind::Q8_0 => &[0],
            BlockKind::Q4_1 | BlockKind::Q5_1 | BlockKind::Q4K | BlockKind::Q5K => &[0, 2],
            BlockKind::Q6K => &[208],
            BlockKind::F16 | BlockKind::BF16 => &[],
        }
    }

    /// `[n, k]` random blocks of `kind` (`k` a whole number of blocks).
    pub fn random_blocks(kind: BlockKind, (n, k): (usize, usize), seed: u64) -> Blocks {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let blocks = n * k / kind.values();
        let mut data: Vec<u8> = (0..blocks * kind.bytes()).map(|_| next() as u8).collect();
        for block in data.chunks_exact_mut(kind.bytes()) {
            for &at in scale_offsets(kind) {
                // 2⁻⁸ · (1 + a fraction), either sign for the minimum-carrying kinds
                let v = (0x1c00 | (next() as u16 & 0x83ff)).to_le_bytes();
                block[at..at + 2].copy_from_slice(&v);
            }
            let r = next();
            let bits = match kind {
                // values within ±4
                BlockKind::BF16 => (((r % 2001) as f32 / 250.0 - 4.0).to_bits() >> 16) as u16,
                // zeros and subnormals among them (exponent 0), none above 2⁴
                BlockKind::F16 => (r as u16 & 0x83ff) | (((r >> 16) % 20) as u16) << 10,
                _ => continue,
            };
            block.copy_from_slice(&bits.to_le_bytes());
        }
        Blocks::new(kind, (n, k), data).expect("a whole number of blocks")
    }

    /// candle's own dequantization of the same bytes, `[n, k]`.
    pub fn candle_values(blocks: &Blocks, dtype: GgmlDType) -> Vec<f32> {
        let device = Device::Cpu;
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Borrowed(&blocks.data),
            &device,
            dtype,
        )
        .unwrap();
        let q = QTensor::new(storage, (blocks.dims[0], blocks.dims[1])).unwrap();
        let t: Tensor = q.dequantize(&device).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn every_kind_decodes_as_candle_dequantizes_bit_for_bit() {
        for (kind, dtype) in KINDS {
            let k = 3 * kind.values().max(32);
            let blocks = random_blocks(kind, (5, k), 7);
            let want = candle_values(&blocks, dtype);
            let got = blocks.to_f32();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{kind:?} value {i}: {g} against {w}"
                );
            }
            // a part of one row: the second block onwards of row 3
            let per = kind.values();
            let mut part = vec![0f32; k - per];
            blocks.decode(3, per..k, &mut part);
            assert_eq!(part, want[3 * k + per..4 * k]);
        }
    }

    #[test]
    fn reordered_rows_and_bad_sizes() {
        let blocks = random_blocks(BlockKind::Q4_0, (4, 64), 3);
        let values = blocks.to_f32();
        let reversed = blocks.with_rows(|r| 3 - r).to_f32();
        assert_eq!(reversed[..64], values[3 * 64..]);
        let err = Blocks::new(BlockKind::Q4K, (2, 640), vec![0; 10]).unwrap_err();
        assert!(err.contains("640"), "{err}");
        let err = Blocks::new(BlockKind::Q8_0, (2, 64), vec![0; 10]).unwrap_err();
        assert!(err.contains("136"), "{err}");
    }
}
