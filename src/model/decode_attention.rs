//! Attention of a decoding step on the CPU: each row's one query against the keys and values
//! its slot holds, read in place, rows in parallel, with no tensor made per row.
//!
//! [`super::attention::attend`] computes the same from candle ops, and still does for a
//! prefill chunk and for training, where gradients must flow. For a decoding step it costs a
//! dozen small ops a row and a layer (a copy of the query, two matrix products of four rows,
//! a softmax, reshapes) and a concatenation of the rows: at sixteen rows over contexts of a
//! few hundred tokens that was a third of the step. Here a row reads each key once for all
//! the query heads that share it, and each value once per 64 output columns.
//!
//! The result equals [`super::attention::attend`]'s up to summation order; each row's
//! numbers depend on its own query and keys alone, whatever else the step holds.

use candle_core::{bail, CpuStorage, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// One decoding row's keys and values: the buffers `[1, kv, capacity, hd]` of its slot and
/// how many keys (the first ones) it attends to.
pub struct RowKeys {
    /// Keys, each row packed.
    pub keys: Tensor,
    /// Values, laid out as the keys.
    pub values: Tensor,
    /// Keys attended to: positions `0 .. len` of the buffers.
    pub len: usize,
}

/// True where [`attend`] can take `q` and `k`, `v`: f32 on the CPU, outside any graph that
/// backward would need.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v]
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && !t.track_op())
}

/// Scaled dot-product attention of `q: [b, h, 1, hd]` (row `r`'s heads against
/// `rows[r]`'s keys, query head `i` on key/value head `i / (h / kv)`), softmax in f32, with
/// Gemma 2's `softcap` on the scores where given → `[b, h, 1, hd]`.
pub fn attend(q: &Tensor, rows: &[RowKeys], scale: f64, softcap: Option<f64>) -> Result<Tensor> {
    let (b, h, s, hd) = q.dims4()?;
    if s != 1 || b != rows.len() {
        bail!(
            "decode attention: one query a row, {b} rows for {} slots",
            rows.len()
        );
    }
    let queries = q.flatten_all()?.to_vec1::<f32>()?;
    let guards: Vec<_> = rows
        .iter()
        .map(|r| (r.keys.storage_and_layout(), r.values.storage_and_layout()))
        .collect();
    let mut buffers = Vec::with_capacity(b);
    for (row, ((ks, kl), (vs, vl))) in rows.iter().zip(&guards) {
        let (_, kv, capacity, width) = row.keys.dims4()?;
        if width != hd
            || h % kv != 0
            || row.len == 0
            || row.len > capacity
            || row.values.dims() != kl.dims()
        {
            bail!(
                "decode attention: {h} query heads of width {hd} against keys {:?}, values {:?}",
                kl.dims(),
                vl.dims()
            );
        }
        buffers.push((packed(ks, kl)?, packed(vs, vl)?, kv, capacity, row.len));
    }
    let (scale, softcap) = (scale as f32, softcap.map(|c| c as f32));
    let mut out = vec![0f32; b * h * hd];
    out.par_chunks_mut(h * hd)
        .zip(queries.par_chunks(h * hd))
        .zip(&buffers)
        .for_each(|((out, q), &(keys, values, kv, capacity, len))| {
            let group = h / kv;
            for j in 0..kv {
                let span = j * capacity * hd..(j * capacity + len) * hd;
                let heads = j * group * hd..(j + 1) * group * hd;
                attend_heads(
                    &q[heads.clone()],
                    &keys[span.clone()],
                    &values[span],
                    &mut out[heads],
                    hd,
                    scale,
                    softcap,
                );
            }
        });
    Tensor::from_vec(out, (b, h, 1, hd), q.device())
}

/// The f32 values of a packed buffer.
fn packed<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Ok(&values[start..end]),
        _ => bail!("decode attention takes packed f32 key and value buffers"),
    }
}

/// Attention of the query heads `q: [g, hd]` that share one key/value head over its `t`
/// keys and values `[t, hd]`, into `out: [g, hd]`.
fn attend_heads(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    out: &mut [f32],
    hd: usize,
    scale: f32,
    softcap: Option<f32>,
) {
    let (g, t) = (q.len() / hd, keys.len() / hd);
    let mut weights = vec![0f32; g * t];
    kernels::scores(q, keys, hd, &mut weights);
    let mut inverse_sums = vec![0f32; g];
    for (w, inverse) in weights.chunks_exact_mut(t).zip(&mut inverse_sums) {
        let factor = match softcap {
            Some(cap) => {
                for x in w.iter_mut() {
                    *x = (*x * scale / cap).tanh() * cap;
                }
                1.0
            }
            None => scale,
        };
        let max = w.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * factor;
        super::exp::exp_in_place(w, factor, max, 1.0);
        *inverse = 1.0 / w.iter().sum::<f32>();
    }
    kernels::weighted_sum(&weights, values, hd, out);
    for (o, inverse) in out.chunks_exact_mut(hd).zip(inverse_sums) {
        o.iter_mut().for_each(|x| *x *= inverse);
    }
}

/// The two products, with AVX-512 where the CPU has it and the width is whole registers.
mod kernels {
    /// `scores[i · t + p] = q_i · key_p` for the `g` heads of `q: [g, hd]`.
    pub fn scores(q: &[f32], keys: &[f32], hd: usize, scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if hd.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            for (q, scores) in q
                .chunks(4 * hd)
                .zip(scores.chunks_mut(4 * (keys.len() / hd)))
            {
                // SAFETY: AVX-512F is present; widths are whole registers, slices in bounds.
                unsafe {
                    match q.len() / hd {
                        1 => avx512::scores::<1>(q, keys, hd, scores),
                        2 => avx512::scores::<2>(q, keys, hd, scores),
                        3 => avx512::scores::<3>(q, keys, hd, scores),
                        _ => avx512::scores::<4>(q, keys, hd, scores),
                    }
                }
            }
            return;
        }
        let t = keys.len() / hd;
        for (i, q) in q.chunks_exact(hd).enumerate() {
            for (p, key) in keys.chunks_exact(hd).enumerate() {
                scores[i * t + p] = q.iter().zip(key).map(|(a, b)| a * b).sum();
            }
        }
    }

    /// `out_i = Σ_p weights[i · t + p] · value_p` for `out: [g, hd]`.
    pub fn weighted_sum(weights: &[f32], values: &[f32], hd: usize, out: &mut [f32]) {
        let t = values.len() / hd;
        #[cfg(target_arch = "x86_64")]
        if hd.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            for (w, out) in weights.chunks(4 * t).zip(out.chunks_mut(4 * hd)) {
                // SAFETY: as in `scores`.
                unsafe {
                    match out.len() / hd {
                        1 => avx512::weighted_sum::<1>(w, values, hd, out),
                        2 => avx512::weighted_sum::<2>(w, values, hd, out),
                        3 => avx512::weighted_sum::<3>(w, values, hd, out),
                        _ => avx512::weighted_sum::<4>(w, values, hd, out),
                    }
                }
            }
            return;
        }
        out.fill(0.0);
        for (w, out) in weights.chunks_exact(t).zip(out.chunks_exact_mut(hd)) {
            for (&w, value) in w.iter().zip(values.chunks_exact(hd)) {
                for (o, &x) in out.iter_mut().zip(value) {
                    *o += w * x;
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use std::arch::x86_64::*;

        /// [`super::scores`] for `N` heads at once: each key register loaded once.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn scores<const N: usize>(q: &[f32], keys: &[f32], hd: usize, out: &mut [f32]) {
            let t = keys.len() / hd;
            let (q, keys) = (q.as_ptr(), keys.as_ptr());
            for p in 0..t {
                let key = keys.add(p * hd);
                let mut acc = [_mm512_setzero_ps(); N];
                for c in (0..hd).step_by(16) {
                    let k = _mm512_loadu_ps(key.add(c));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(i * hd + c)), k, *acc);
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    out[i * t + p] = _mm512_reduce_add_ps(*acc);
                }
            }
        }

        /// [`super::weighted_sum`] for `N` heads at once, 64 columns at a time in registers.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn weighted_sum<const N: usize>(
            weights: &[f32],
            values: &[f32],
            hd: usize,
            out: &mut [f32],
        ) {
            const COLUMNS: usize = 4;
            let t = values.len() / hd;
            let (w, values) = (weights.as_ptr(), values.as_ptr());
            let mut c = 0;
            while c < hd {
                let width = ((hd - c) / 16).min(COLUMNS);
                let mut acc = [[_mm512_setzero_ps(); COLUMNS]; N];
                for p in 0..t {
                    let value = values.add(p * hd + c);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let weight = _mm512_set1_ps(*w.add(i * t + p));
                        for (r, acc) in acc.iter_mut().enumerate().take(width) {
                            *acc =
                                _mm512_fmadd_ps(weight, _mm512_loadu_ps(value.add(16 * r)), *acc);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    for (r, acc) in acc.iter().enumerate().take(width) {
                        _mm512_storeu_ps(out.as_mut_ptr().add(i * hd + c + 16 * r), *acc);
                    }
                }
                c += 16 * width;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Random `[shape]` f32 values in `[-1, 1)` from a fixed seed.
    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Every row against the candle ops of `attention::attend` on the same keys, for
    /// grouped heads of 1, 3, 4 and 8 queries a key head, register and odd widths, a
    /// softcap, and rows of other lengths in one call.
    #[test]
    fn decoding_rows_attend_as_the_candle_ops_do() {
        let cases = [
            (4, 1, 256, None),
            (9, 3, 64, None),
            (8, 1, 48, Some(30.0)),
            (2, 2, 20, None),
        ];
        for (case, &(h, kv, hd, softcap)) in cases.iter().enumerate() {
            let lens = [1usize, 37, 300];
            let capacity = 320;
            let seed = 10 * case as u64;
            let q = (random(&[lens.len(), h, 1, hd], seed) * 3.0).unwrap();
            let rows: Vec<RowKeys> = lens
                .iter()
                .enumerate()
                .map(|(r, &len)| RowKeys {
                    keys: random(&[1, kv, capacity, hd], seed + 1 + r as u64),
                    values: random(&[1, kv, capacity, hd], seed + 5 + r as u64),
                    len,
                })
                .collect();
            let scale = 1.0 / (hd as f64).sqrt();
            let fast = attend(&q, &rows, scale, softcap).unwrap();
            for (r, row) in rows.iter().enumerate() {
                let reference = crate::model::attention::attend(
                    &q.narrow(0, r, 1).unwrap(),
                    &row.keys.narrow(2, 0, row.len).unwrap(),
                    &row.values.narrow(2, 0, row.len).unwrap(),
                    None,
                    scale,
                    softcap,
                )
                .unwrap();
                let diff = (fast.narrow(0, r, 1).unwrap() - &reference)
                    .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
                    .unwrap();
                assert!(diff < 1e-5, "case {case}, row {r}: differs by {diff}");
            }
        }
    }

    #[test]
    fn a_query_in_a_graph_is_not_taken() {
        let var = candle_core::Var::from_tensor(&random(&[1, 4, 1, 16], 1)).unwrap();
        let q = (var.as_tensor() * 2.0).unwrap();
        let k = random(&[1, 1, 1, 16], 2);
        assert!(!applies(&q, &k, &k));
        assert!(applies(&q.detach(), &k, &k));
    }
}
