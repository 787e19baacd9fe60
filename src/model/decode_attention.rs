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
//! A row's keys come in [`Segment`]s, in position order: stretches shared with other rows
//! (a prompt prefilled once for a group, blocks of the prefix cache), then its own buffer.
//! Rows that share a segment read it together, a few keys at a time while they sit in L1,
//! so a prompt's keys cross from memory once a step for the whole group, not once a row.
//!
//! The result equals [`super::attention::attend`]'s up to summation order; each row's
//! numbers depend on its own query and keys alone, whatever else the step holds: every sum
//! runs over the row's keys in its position order, whoever shares them.

use candle_core::{bail, CpuStorage, DType, Device, Result, Storage, Tensor, TensorId};

use super::team;

/// Keys and values of a stretch of a row's positions: rows `from .. from + len` of the
/// buffers `[1, kv, capacity, hd]`.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Keys, each row packed.
    pub keys: Tensor,
    /// Values, laid out as the keys.
    pub values: Tensor,
    /// The first buffer row of the stretch.
    pub from: usize,
    /// Rows in the stretch.
    pub len: usize,
}

impl Segment {
    /// The whole of `keys, values: [1, kv, len, hd]`.
    pub fn whole(keys: Tensor, values: Tensor) -> Result<Segment> {
        let len = keys.dim(2)?;
        Ok(Segment {
            keys,
            values,
            from: 0,
            len,
        })
    }

    /// Keys and values `[1, kv, len, hd]` of the stretch, as views.
    pub fn narrowed(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.keys.narrow(2, self.from, self.len)?,
            self.values.narrow(2, self.from, self.len)?,
        ))
    }

    /// What makes two rows' segments the same stretch of the same buffers.
    fn identity(&self) -> (TensorId, usize, usize) {
        (self.keys.id(), self.from, self.len)
    }
}

/// One decoding row's keys and values: its segments, in position order.
pub struct RowKeys {
    /// The stretches of keys the row attends to.
    pub segments: Vec<Segment>,
}

/// True where [`attend`] can take `q` and `k`, `v`: f32 on the CPU, outside any graph that
/// backward would need.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v]
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && !t.track_op())
}

/// Keys a shared segment is read in at a time by all the rows that share it (16 KiB of keys
/// at Gemma's head width, which stay in L1 while every row takes them).
const KEYS_AT_ONCE: usize = 16;

/// A segment's buffers as the kernels read them.
struct Stretch<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    capacity: usize,
    from: usize,
    len: usize,
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
    // every distinct segment once, with its buffers held for reading
    let mut segments: Vec<&Segment> = Vec::new();
    let mut row_segments: Vec<Vec<usize>> = Vec::with_capacity(b);
    for row in rows {
        if row.segments.is_empty() || row.segments.iter().any(|s| s.len == 0) {
            bail!("decode attention: a row with no keys or an empty segment");
        }
        let ids = row
            .segments
            .iter()
            .map(|seg| {
                let at = segments.iter().position(|s| s.identity() == seg.identity());
                at.unwrap_or_else(|| {
                    segments.push(seg);
                    segments.len() - 1
                })
            })
            .collect();
        row_segments.push(ids);
    }
    let guards: Vec<_> = segments
        .iter()
        .map(|s| (s.keys.storage_and_layout(), s.values.storage_and_layout()))
        .collect();
    let mut kv = None;
    let mut stretches = Vec::with_capacity(segments.len());
    for (seg, ((ks, kl), (vs, vl))) in segments.iter().zip(&guards) {
        let (_, heads, capacity, width) = seg.keys.dims4()?;
        if width != hd
            || h % heads != 0
            || *kv.get_or_insert(heads) != heads
            || seg.from + seg.len > capacity
            || seg.values.dims() != kl.dims()
        {
            bail!(
                "decode attention: {h} query heads of width {hd} against keys {:?}, values {:?}",
                kl.dims(),
                vl.dims()
            );
        }
        stretches.push(Stretch {
            keys: packed(ks, kl)?,
            values: packed(vs, vl)?,
            capacity,
            from: seg.from,
            len: seg.len,
        });
    }
    let kv = kv.expect("a row has a segment");
    let shape = Shape {
        h,
        kv,
        hd,
        scale: scale as f32,
        softcap: softcap.map(|c| c as f32),
    };
    let tasks = tasks(&row_segments);
    let outs: Vec<Vec<(usize, Vec<f32>)>> = team::map(tasks.len(), |t| {
        attend_task(&tasks[t], &queries, &row_segments, &stretches, &shape)
    });
    let mut out = vec![0f32; b * h * hd];
    for (r, values) in outs.into_iter().flatten() {
        out[r * h * hd..(r + 1) * h * hd].copy_from_slice(&values);
    }
    Tensor::from_vec(out, (b, h, 1, hd), q.device())
}

/// The rows each thread takes: rows that begin with the same shared segment together (at
/// most a thread's share of the step's rows in one task), so they read it together.
fn tasks(row_segments: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let b = row_segments.len();
    let per_task = b.div_ceil(team::threads()).clamp(1, 8);
    let mut groups: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
    for (r, segs) in row_segments.iter().enumerate() {
        // a row of one segment has nothing shared
        let first = (segs.len() > 1).then_some(segs[0]);
        match groups
            .iter_mut()
            .find(|(f, rows)| first.is_some() && *f == first && rows.len() < per_task)
        {
            Some((_, rows)) => rows.push(r),
            None => groups.push((first, vec![r])),
        }
    }
    groups.into_iter().map(|(_, rows)| rows).collect()
}

/// What every row of a step has in common.
struct Shape {
    h: usize,
    kv: usize,
    hd: usize,
    scale: f32,
    softcap: Option<f32>,
}

/// The attention of the rows `task`, each `(row, its [h, hd] output)`: per key/value head,
/// every distinct segment's keys read a few at a time by all the task's rows that hold it,
/// scores softmaxed per row, then the values read the same way.
fn attend_task(
    task: &[usize],
    queries: &[f32],
    row_segments: &[Vec<usize>],
    stretches: &[Stretch],
    shape: &Shape,
) -> Vec<(usize, Vec<f32>)> {
    let Shape { h, kv, hd, .. } = *shape;
    let group = h / kv;
    // per row: its keys in all, and where each of its segments starts among them
    let mut lens = Vec::with_capacity(task.len());
    let mut offsets = Vec::with_capacity(task.len());
    for &r in task {
        let mut at = 0;
        offsets.push(
            row_segments[r]
                .iter()
                .map(|&s| {
                    let start = at;
                    at += stretches[s].len;
                    start
                })
                .collect::<Vec<_>>(),
        );
        lens.push(at);
    }
    // the task's segments in position order (each row's own order, as every row's
    // segments run in it), each with the rows that hold it and where
    let mut order: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
    for (i, &r) in task.iter().enumerate() {
        for (n, &s) in row_segments[r].iter().enumerate() {
            let holder = (i, offsets[i][n]);
            match order.iter_mut().find(|(seg, _)| *seg == s) {
                Some((_, holders)) => holders.push(holder),
                None => order.push((s, vec![holder])),
            }
        }
    }
    order.sort_by_key(|(_, holders)| holders[0].1);
    let mut outs: Vec<Vec<f32>> = task.iter().map(|_| vec![0f32; h * hd]).collect();
    for j in 0..kv {
        let heads = j * group * hd..(j + 1) * group * hd;
        let q: Vec<&[f32]> = task
            .iter()
            .map(|&r| &queries[r * h * hd..][heads.clone()])
            .collect();
        let mut weights: Vec<Vec<f32>> = lens.iter().map(|&t| vec![0f32; group * t]).collect();
        for_each_block(&order, stretches, j, hd, |keys, _, i, at| {
            kernels::scores(q[i], keys, hd, &mut weights[i][at..], lens[i]);
        });
        let inverse_sums: Vec<Vec<f32>> = weights
            .iter_mut()
            .zip(&lens)
            .map(|(w, &t)| softmax(w, t, shape))
            .collect();
        let mut out: Vec<Vec<f32>> = task.iter().map(|_| vec![0f32; group * hd]).collect();
        for_each_block(&order, stretches, j, hd, |_, values, i, at| {
            kernels::weighted_sum(&weights[i][at..], lens[i], values, hd, &mut out[i]);
        });
        for ((o, inverse), full) in out.iter_mut().zip(&inverse_sums).zip(&mut outs) {
            for (o, inverse) in o.chunks_exact_mut(hd).zip(inverse) {
                o.iter_mut().for_each(|x| *x *= inverse);
            }
            full[heads.clone()].copy_from_slice(o);
        }
    }
    task.iter().copied().zip(outs).collect()
}

/// Runs `f(keys, values, row, at)` over the segments `order` in key/value head `j`, a
/// segment [`KEYS_AT_ONCE`] keys at a time for each of its rows in turn (`at`: where those
/// keys begin among the row's), so a shared segment's keys are read once for all.
fn for_each_block(
    order: &[(usize, Vec<(usize, usize)>)],
    stretches: &[Stretch],
    j: usize,
    hd: usize,
    mut f: impl FnMut(&[f32], &[f32], usize, usize),
) {
    for (s, holders) in order {
        let st = &stretches[*s];
        let first = (j * st.capacity + st.from) * hd;
        let keys = &st.keys[first..first + st.len * hd];
        let values = &st.values[first..first + st.len * hd];
        for block in (0..st.len).step_by(KEYS_AT_ONCE) {
            let span = block * hd..(block + KEYS_AT_ONCE).min(st.len) * hd;
            for &(i, at) in holders {
                f(&keys[span.clone()], &values[span.clone()], i, at + block);
            }
        }
    }
}

/// Softmax of each of the `g` heads' scores in `weights: [g, t]` in place, but for the
/// division: the exponentials are left unnormalised and each head's `1 / sum` returned.
fn softmax(weights: &mut [f32], t: usize, shape: &Shape) -> Vec<f32> {
    weights
        .chunks_exact_mut(t)
        .map(|w| {
            let factor = match shape.softcap {
                Some(cap) => {
                    for x in w.iter_mut() {
                        *x = (*x * shape.scale / cap).tanh() * cap;
                    }
                    1.0
                }
                None => shape.scale,
            };
            let max = w.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * factor;
            super::exp::exp_in_place(w, factor, max, 1.0);
            1.0 / w.iter().sum::<f32>()
        })
        .collect()
}

/// The f32 values of a packed buffer.
fn packed<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Ok(&values[start..end]),
        _ => bail!("decode attention takes packed f32 key and value buffers"),
    }
}

/// The two products, with AVX-512 where the CPU has it and the width is whole registers.
mod kernels {
    /// `scores[i · stride + p] = q_i · key_p` for the `g` heads of `q: [g, hd]` and the keys
    /// `[n, hd]`.
    pub fn scores(q: &[f32], keys: &[f32], hd: usize, scores: &mut [f32], stride: usize) {
        let n = keys.len() / hd;
        assert!(scores.len() >= (q.len() / hd - 1) * stride + n);
        #[cfg(target_arch = "x86_64")]
        if hd.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            for (c, q) in q.chunks(4 * hd).enumerate() {
                let scores = &mut scores[4 * c * stride..];
                // SAFETY: AVX-512F is present; widths are whole registers; the heads' rows
                // of `scores` hold `n` values each (asserted above).
                unsafe {
                    match q.len() / hd {
                        1 => avx512::scores::<1>(q, keys, hd, scores, stride),
                        2 => avx512::scores::<2>(q, keys, hd, scores, stride),
                        3 => avx512::scores::<3>(q, keys, hd, scores, stride),
                        _ => avx512::scores::<4>(q, keys, hd, scores, stride),
                    }
                }
            }
            return;
        }
        for (i, q) in q.chunks_exact(hd).enumerate() {
            for (p, key) in keys.chunks_exact(hd).enumerate() {
                scores[i * stride + p] = q.iter().zip(key).map(|(a, b)| a * b).sum();
            }
        }
    }

    /// `out_i += Σ_p weights[i · stride + p] · value_p` for `out: [g, hd]` and the values
    /// `[n, hd]`, over `p` in order.
    pub fn weighted_sum(
        weights: &[f32],
        stride: usize,
        values: &[f32],
        hd: usize,
        out: &mut [f32],
    ) {
        let n = values.len() / hd;
        assert!(weights.len() >= (out.len() / hd - 1) * stride + n);
        #[cfg(target_arch = "x86_64")]
        if hd.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            for (c, out) in out.chunks_mut(4 * hd).enumerate() {
                let w = &weights[4 * c * stride..];
                // SAFETY: as in `scores`.
                unsafe {
                    match out.len() / hd {
                        1 => avx512::weighted_sum::<1>(w, stride, values, hd, out),
                        2 => avx512::weighted_sum::<2>(w, stride, values, hd, out),
                        3 => avx512::weighted_sum::<3>(w, stride, values, hd, out),
                        _ => avx512::weighted_sum::<4>(w, stride, values, hd, out),
                    }
                }
            }
            return;
        }
        for (i, out) in out.chunks_exact_mut(hd).enumerate() {
            for (&w, value) in weights[i * stride..][..n]
                .iter()
                .zip(values.chunks_exact(hd))
            {
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
        pub unsafe fn scores<const N: usize>(
            q: &[f32],
            keys: &[f32],
            hd: usize,
            out: &mut [f32],
            stride: usize,
        ) {
            let n = keys.len() / hd;
            let (q, keys) = (q.as_ptr(), keys.as_ptr());
            for p in 0..n {
                let key = keys.add(p * hd);
                let mut acc = [_mm512_setzero_ps(); N];
                for c in (0..hd).step_by(16) {
                    let k = _mm512_loadu_ps(key.add(c));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(i * hd + c)), k, *acc);
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    out[i * stride + p] = _mm512_reduce_add_ps(*acc);
                }
            }
        }

        /// [`super::weighted_sum`] for `N` heads at once, 64 columns at a time in registers.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn weighted_sum<const N: usize>(
            weights: &[f32],
            stride: usize,
            values: &[f32],
            hd: usize,
            out: &mut [f32],
        ) {
            const COLUMNS: usize = 4;
            let n = values.len() / hd;
            let (w, values, o) = (weights.as_ptr(), values.as_ptr(), out.as_mut_ptr());
            let mut c = 0;
            while c < hd {
                let width = ((hd - c) / 16).min(COLUMNS);
                let mut acc = [[_mm512_setzero_ps(); COLUMNS]; N];
                for (i, acc) in acc.iter_mut().enumerate() {
                    for (r, acc) in acc.iter_mut().enumerate().take(width) {
                        *acc = _mm512_loadu_ps(o.add(i * hd + c + 16 * r));
                    }
                }
                for p in 0..n {
                    let value = values.add(p * hd + c);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let weight = _mm512_set1_ps(*w.add(i * stride + p));
                        for (r, acc) in acc.iter_mut().enumerate().take(width) {
                            *acc =
                                _mm512_fmadd_ps(weight, _mm512_loadu_ps(value.add(16 * r)), *acc);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    for (r, acc) in acc.iter().enumerate().take(width) {
                        _mm512_storeu_ps(o.add(i * hd + c + 16 * r), *acc);
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
                    segments: vec![Segment {
                        keys: random(&[1, kv, capacity, hd], seed + 1 + r as u64),
                        values: random(&[1, kv, capacity, hd], seed + 5 + r as u64),
                        from: 0,
                        len,
                    }],
                })
                .collect();
            let scale = 1.0 / (hd as f64).sqrt();
            let fast = attend(&q, &rows, scale, softcap).unwrap();
            for (r, row) in rows.iter().enumerate() {
                let (keys, values) = row.segments[0].narrowed().unwrap();
                let reference = crate::model::attention::attend(
                    &q.narrow(0, r, 1).unwrap(),
                    &keys,
                    &values,
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

    /// Rows that share segments (a prompt of two blocks for four rows, the first block
    /// alone for a fifth, each with its own keys after them, one row with nothing shared):
    /// each row's numbers are bit for bit those it gets attending alone, whatever shares its
    /// step, and equal the candle ops over its keys laid end to end.
    #[test]
    fn rows_that_share_segments_attend_as_each_alone() {
        let (h, kv, hd, capacity) = (4, 1, 256, 64);
        let block = |seed| Segment {
            keys: random(&[1, kv, 40, hd], seed),
            values: random(&[1, kv, 40, hd], seed + 1),
            from: 0,
            len: 40,
        };
        let own = |seed, len| Segment {
            keys: random(&[1, kv, capacity, hd], seed),
            values: random(&[1, kv, capacity, hd], seed + 1),
            from: 0,
            len,
        };
        let (first, second) = (block(100), block(200));
        let rows: Vec<RowKeys> = [
            vec![first.clone(), second.clone(), own(1, 3)],
            vec![first.clone(), second.clone(), own(3, 1)],
            vec![first.clone(), own(5, 50)],
            vec![own(7, 17)],
            vec![first.clone(), second.clone(), own(9, 64)],
            vec![first.clone(), second.clone(), own(11, 20)],
        ]
        .into_iter()
        .map(|segments| RowKeys { segments })
        .collect();
        let q = (random(&[rows.len(), h, 1, hd], 42) * 3.0).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let together = attend(&q, &rows, scale, None).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let q_r = q.narrow(0, r, 1).unwrap();
            let alone = attend(&q_r, std::slice::from_ref(row), scale, None).unwrap();
            let got = together.narrow(0, r, 1).unwrap();
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                bits(&got),
                bits(&alone),
                "row {r} depends on its neighbours"
            );
            let parts: Vec<(Tensor, Tensor)> =
                row.segments.iter().map(|s| s.narrowed().unwrap()).collect();
            let keys = Tensor::cat(&parts.iter().map(|p| &p.0).collect::<Vec<_>>(), 2).unwrap();
            let values = Tensor::cat(&parts.iter().map(|p| &p.1).collect::<Vec<_>>(), 2).unwrap();
            let reference =
                crate::model::attention::attend(&q_r, &keys, &values, None, scale, None).unwrap();
            let diff = (got - &reference)
                .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
                .unwrap();
            assert!(diff < 1e-5, "row {r}: differs by {diff}");
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
