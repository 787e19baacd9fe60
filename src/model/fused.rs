//! Fused CPU ops with their own backward, for the training path: RMS normalisation, the
//! masked, scaled softmax of attention, rotary position embedding and Gemma's `gelu(gate) ⊙
//! up`. Built from elementwise candle ops, each keeps three
//! or four full-size tensors alive for backward; fused, each keeps its input and output only,
//! and makes one pass over the data instead of five. Their backward computes the input's
//! gradient only (norm scales and masks are never trained).

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::team;

/// The rows of a contiguous f32 storage.
fn f32_rows<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => bail!("{what} takes contiguous f32 tensors"),
    }
}

/// `x / sqrt(mean(x²) + eps) · scale` over the last dimension.
struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        scale: &CpuStorage,
        scale_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_rows(x, x_layout, "rms-norm")?;
        let w = f32_rows(scale, scale_layout, "rms-norm")?;
        let d = w.len();
        if x_layout.dims().last() != Some(&d) {
            bail!("rms-norm: width {:?} but {d} scales", x_layout.dims());
        }
        let eps = self.eps as f32;
        let mut out = vec![0f32; xs.len()];
        // whole rows per thread's share
        let rows_per = (ELEMENTWISE_CHUNK / d.max(1)).max(1);
        team::for_each_chunk(&mut out, rows_per * d, |c, out| {
            let xs = &xs[c * rows_per * d..][..out.len()];
            for (out, row) in out.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                let inv = inv_rms(row, eps);
                for ((o, &v), &s) in out.iter_mut().zip(row).zip(w) {
                    *o = v * inv * s;
                }
            }
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(scale, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean = row.iter().map(|&v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

/// The input gradient of [`RmsNorm`], one pass per row: with `x̂ = x / rms`, `y = x̂ ⊙ w`
/// gives `dx = (g ⊙ w − x̂ · mean(g ⊙ w ⊙ x̂)) / rms`.
struct RmsNormGrad {
    eps: f64,
}

impl candle_core::CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        scale: &CpuStorage,
        scale_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_rows(x, x_layout, "rms-norm backward")?;
        let w = f32_rows(scale, scale_layout, "rms-norm backward")?;
        let gs = f32_rows(grad, grad_layout, "rms-norm backward")?;
        let d = w.len();
        if xs.len() != gs.len() || x_layout.dims().last() != Some(&d) {
            bail!("rms-norm backward: x {:?}, {d} scales", x_layout.dims());
        }
        let eps = self.eps as f32;
        let rows_per = (ELEMENTWISE_CHUNK / d.max(1)).max(1);
        let mut out = vec![0f32; xs.len()];
        team::for_each_chunk(&mut out, rows_per * d, |c, out| {
            let at = c * rows_per * d..c * rows_per * d + out.len();
            let (xs, gs) = (&xs[at.clone()], &gs[at]);
            for ((dx, x), g) in out
                .chunks_exact_mut(d)
                .zip(xs.chunks_exact(d))
                .zip(gs.chunks_exact(d))
            {
                let inv = inv_rms(x, eps);
                let dot = x
                    .iter()
                    .zip(g)
                    .zip(w)
                    .map(|((&v, &gv), &s)| gv * s * v * inv)
                    .sum::<f32>()
                    / d as f32;
                for (((dx, &v), &gv), &s) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *dx = (gv * s - v * inv * dot) * inv;
                }
            }
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// RMS normalisation over the last dimension: `x / sqrt(mean(x²) + eps) · scale`, in f32.
/// Fused on the CPU for f32; built from elementwise ops elsewhere.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && scale.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2(&scale.contiguous()?, RmsNorm { eps });
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean + eps)?.sqrt()?)?;
    normed
        .broadcast_mul(&scale.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// Values per thread's share of an elementwise op.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// `gelu_tanh(gate) ⊙ up`, Gemma's MLP activation, in one pass on rayon's threads; backward
/// keeps the two inputs only and computes both gradients in one pass too.
struct GeluTanhMul;

impl CustomOp2 for GeluTanhMul {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = f32_rows(gate, gate_layout, "gelu-tanh-mul")?;
        let up = f32_rows(up, up_layout, "gelu-tanh-mul")?;
        if gate_layout.dims() != up_layout.dims() {
            bail!(
                "gelu-tanh-mul: {:?} against {:?}",
                gate_layout.dims(),
                up_layout.dims()
            );
        }
        let mut out = vec![0f32; gate.len()];
        team::for_each_chunk(&mut out, ELEMENTWISE_CHUNK, |c, out| {
            let at = c * ELEMENTWISE_CHUNK..c * ELEMENTWISE_CHUNK + out.len();
            super::exp::gelu_tanh_mul(&gate[at.clone()], &up[at], out)
        });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &GeluTanhMulGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `[d_gate, d_up]` (stacked) for `gelu_tanh(gate) ⊙ up` given the output's gradient.
struct GeluTanhMulGrad;

impl candle_core::CustomOp3 for GeluTanhMulGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-mul-grad"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = f32_rows(gate, gate_layout, "gelu-tanh-mul backward")?;
        let up = f32_rows(up, up_layout, "gelu-tanh-mul backward")?;
        let grad = f32_rows(grad, grad_layout, "gelu-tanh-mul backward")?;
        let n = gate.len();
        if up.len() != n || grad.len() != n {
            bail!("gelu-tanh-mul backward: operands of different sizes");
        }
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        let pairs: Vec<_> = d_gate
            .chunks_mut(ELEMENTWISE_CHUNK)
            .zip(d_up.chunks_mut(ELEMENTWISE_CHUNK))
            .map(std::sync::Mutex::new)
            .collect();
        team::for_each(pairs.len(), |c| {
            let mut pair = pairs[c].lock().unwrap_or_else(|e| e.into_inner());
            let (d_gate, d_up) = &mut *pair;
            let at = c * ELEMENTWISE_CHUNK..c * ELEMENTWISE_CHUNK + d_gate.len();
            let (gate, up, grad) = (&gate[at.clone()], &up[at.clone()], &grad[at]);
            super::exp::gelu_tanh_mul_grad(gate, up, grad, d_gate, d_up)
        });
        let mut dims = vec![2];
        dims.extend_from_slice(gate_layout.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `gelu_tanh(gate) ⊙ up` (GELU with the tanh approximation, as Gemma's MLP). Fused on the
/// CPU for f32; candle's ops elsewhere.
pub fn gelu_tanh_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let f32_cpu = gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32;
    if f32_cpu && gate.dims() == up.dims() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, GeluTanhMul);
    }
    gate.gelu()? * up
}

/// Rotary position embedding, `x ⊙ cos + rotate_half(x) ⊙ sin`, in one pass over `x: [b, h,
/// s, hd]` (any strides but a contiguous last dimension, such as the transposed output of
/// the q/k norms) with `cos, sin: [b, 1, s, hd]` whose two halves are equal (as
/// [`super::attention::Rope::cos_sin`] makes them). Since they are, the backward pass is the
/// same rotation by the opposite angle.
struct RotaryEmbedding;

impl candle_core::CustomOp3 for RotaryEmbedding {
    fn name(&self) -> &'static str {
        "fused-rotary-embedding"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(xs) = x else {
            bail!("rotary-embedding takes f32 tensors");
        };
        let cos = f32_rows(cos, cos_layout, "rotary-embedding")?;
        let sin = f32_rows(sin, sin_layout, "rotary-embedding")?;
        let (b, h, s, hd) = x_layout.shape().dims4()?;
        let st = x_layout.stride();
        if st[3] != 1 || hd % 2 != 0 || cos_layout.dims() != [b, 1, s, hd] {
            bail!(
                "rotary-embedding: x {:?} (strides {st:?}), cos {:?}",
                x_layout.dims(),
                cos_layout.dims()
            );
        }
        let (start, half) = (x_layout.start_offset(), hd / 2);
        let mut out = vec![0f32; b * h * s * hd];
        team::for_each_chunk(&mut out, s * hd, |bh, out| {
            let (bi, hi) = (bh / h, bh % h);
            for (si, out) in out.chunks_exact_mut(hd).enumerate() {
                let x = &xs[start + bi * st[0] + hi * st[1] + si * st[2]..][..hd];
                let at = (bi * s + si) * hd;
                let (c, sn) = (&cos[at..at + hd], &sin[at..at + hd]);
                for i in 0..half {
                    out[i] = x[i] * c[i] - x[i + half] * sn[i];
                    out[i + half] = x[i + half] * c[i + half] + x[i] * sn[i + half];
                }
            }
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.apply_op3_no_bwd(cos, &sin.neg()?, &RotaryEmbedding)?;
        Ok((Some(dx), None, None))
    }
}

/// `x ⊙ cos + rotate_half(x) ⊙ sin` for `x: [b, h, s, hd]` and `cos, sin: [b, 1, s, hd]` with
/// equal halves (Hugging Face's layout). Fused on the CPU for f32; candle's ops elsewhere.
pub fn rotary_embedding(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let f32_cpu = x.device().is_cpu() && [x, cos, sin].iter().all(|t| t.dtype() == DType::F32);
    if f32_cpu && x.rank() == 4 && x.stride()[3] == 1 {
        return x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RotaryEmbedding);
    }
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// `softmax(scores · scale + mask)` over the last dimension, for `scores: [b, h, s, t]` and an
/// additive `mask: [b, 1, s, t]` shared by the heads.
struct MaskedSoftmax {
    scale: f64,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        scores: &CpuStorage,
        scores_layout: &Layout,
        mask: &CpuStorage,
        mask_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_rows(scores, scores_layout, "masked-softmax")?;
        let ms = f32_rows(mask, mask_layout, "masked-softmax")?;
        let (b, h, s, t) = scores_layout.shape().dims4()?;
        if mask_layout.shape().dims4()? != (b, 1, s, t) {
            bail!(
                "masked-softmax: scores {:?} but mask {:?}",
                scores_layout.dims(),
                mask_layout.dims()
            );
        }
        let scale = self.scale as f32;
        let mut out = vec![0f32; xs.len()];
        for (r, (row, dst)) in xs.chunks_exact(t).zip(out.chunks_exact_mut(t)).enumerate() {
            let (bi, si) = (r / (h * s), r % s);
            let m = &ms[(bi * s + si) * t..(bi * s + si + 1) * t];
            let mut max = f32::NEG_INFINITY;
            for ((d, &x), &mk) in dst.iter_mut().zip(row).zip(m) {
                *d = x * scale + mk;
                max = max.max(*d);
            }
            let mut sum = 0f32;
            for d in dst.iter_mut() {
                *d = (*d - max).exp();
                sum += *d;
            }
            let inv = 1.0 / sum;
            dst.iter_mut().for_each(|d| *d *= inv);
        }
        Ok((CpuStorage::F32(out), scores_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dx = scale · p ⊙ (g − Σ g ⊙ p)
        let dot = (grad * probs)?.sum_keepdim(D::Minus1)?;
        let dx = ((grad.broadcast_sub(&dot)? * probs)? * self.scale)?;
        Ok((Some(dx), None))
    }
}

/// `softmax(scores · scale + mask)` over the last dimension in f32, `scores: [b, h, s, t]`,
/// `mask: [b, 1, s, t]`. Fused on the CPU for f32; built from elementwise ops elsewhere.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 && mask.dtype() == DType::F32 {
        return scores
            .contiguous()?
            .apply_op2(&mask.contiguous()?, MaskedSoftmax { scale });
    }
    let scores = (scores * scale)?.to_dtype(DType::F32)?;
    candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The value and input gradient of `f` and of `reference` for the same random input,
    /// the loss weighting each output element differently.
    fn compare(
        shape: (usize, usize, usize, usize),
        f: impl Fn(&Tensor) -> Tensor,
        reference: impl Fn(&Tensor) -> Tensor,
    ) -> (f32, f32) {
        let device = Device::Cpu;
        let x = Var::randn(0f32, 1.0, shape, &device).unwrap();
        let weights = Tensor::randn(0f32, 1.0, shape, &device).unwrap();
        let (a, b) = (f(x.as_tensor()), reference(x.as_tensor()));
        let ga = (&a * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (&b * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (
            max_diff(&a, &b),
            max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()),
        )
    }

    #[test]
    fn fused_gelu_mul_equals_candles_gelu_times_up_in_value_and_gradients() {
        let device = Device::Cpu;
        // 3 × 7 × 1000: whole vector chunks and a ragged tail in every thread's share
        let gate = Var::randn(0f32, 3.0, (3, 7, 1000), &device).unwrap();
        let up = Var::randn(0f32, 1.0, (3, 7, 1000), &device).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (3, 7, 1000), &device).unwrap();
        let fused = gelu_tanh_mul(gate.as_tensor(), up.as_tensor()).unwrap();
        let plain = (gate.as_tensor().gelu().unwrap() * up.as_tensor()).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = (&fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&gate, &up] {
            let d = max_diff(gf.get(v).unwrap(), gp.get(v).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }

    #[test]
    fn fused_rotary_embedding_equals_the_composite_on_a_transposed_input() {
        let device = Device::Cpu;
        // positions per row, as left padding makes them
        let positions = Tensor::new(&[[0u32, 0, 1, 2, 3], [4, 5, 6, 7, 8]], &device).unwrap();
        let rope = super::super::attention::Rope::new(10_000.0, 8, &|f| f, &device).unwrap();
        let (cos, sin) = rope.cos_sin(&positions).unwrap();
        let composite = |x: &Tensor| {
            let half = 4;
            let x1 = x.narrow(D::Minus1, 0, half).unwrap();
            let x2 = x.narrow(D::Minus1, half, half).unwrap();
            let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
        };
        // `[b, s, h, hd]` seen as `[b, h, s, hd]`, as the attention passes it
        let (value, grad) = compare(
            (2, 5, 3, 8),
            |x| {
                rotary_embedding(&x.transpose(1, 2).unwrap(), &cos, &sin)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
            },
            |x| {
                composite(&x.transpose(1, 2).unwrap())
                    .transpose(1, 2)
                    .unwrap()
            },
        );
        assert!(
            value < 1e-6 && grad < 1e-5,
            "value {value}, gradient {grad}"
        );
    }

    #[test]
    fn fused_rms_norm_equals_the_composite_in_value_and_gradient() {
        let scale = Tensor::randn(0f32, 1.0, 8, &Device::Cpu).unwrap();
        let composite = |x: &Tensor| {
            let mean = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let normed = x
                .broadcast_div(&(mean + 1e-6).unwrap().sqrt().unwrap())
                .unwrap();
            normed.broadcast_mul(&scale).unwrap()
        };
        let (value, grad) = compare(
            (2, 3, 5, 8),
            |x| rms_norm(x, &scale, 1e-6).unwrap(),
            composite,
        );
        assert!(
            value < 1e-5 && grad < 1e-4,
            "value {value}, gradient {grad}"
        );
    }

    #[test]
    fn fused_masked_softmax_equals_the_composite_in_value_and_gradient() {
        let device = Device::Cpu;
        let (b, h, s, t) = (2, 3, 4, 6);
        let mask: Vec<f32> = (0..b * s * t)
            .map(|i| {
                if (i % t) > (i / t) % s + 1 {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, s, t), &device).unwrap();
        let composite = |x: &Tensor| {
            let scaled = (x * 0.3).unwrap().broadcast_add(&mask).unwrap();
            candle_nn::ops::softmax(&scaled, D::Minus1).unwrap()
        };
        let (value, grad) = compare(
            (b, h, s, t),
            |x| masked_softmax(x, &mask, 0.3).unwrap(),
            composite,
        );
        assert!(
            value < 1e-6 && grad < 1e-5,
            "value {value}, gradient {grad}"
        );
    }
}
