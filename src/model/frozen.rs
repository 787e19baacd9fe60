//! `x Wᵀ` for a frozen weight `W`. candle's matmul backward computes (and keeps) a gradient
//! for both operands; for a frozen weight that is wasted work and memory (a 671 MB gradient
//! of Gemma's embedding matrix for every chunk of the output head). This op's backward
//! returns the input's gradient only.

use super::cpu_matmul;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor,
};

/// `x Wᵀ` as one custom op on the CPU and on CUDA (the same storage-level matmul candle's
/// own uses, on the two storages in place: no copy of the input or of the product), with a
/// backward pass for `x` only.
struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) {
            if x_layout.is_contiguous() && w_layout.is_contiguous() {
                let (out_dim, in_dim) = w_layout.shape().dims2()?;
                let rows = x_layout.shape().elem_count() / in_dim.max(1);
                let mut shape = x_layout.dims().to_vec();
                *shape.last_mut().expect("at least one dimension") = out_dim;
                let xs = &xs[x_layout.start_offset()..][..rows * in_dim];
                let ws = &ws[w_layout.start_offset()..][..out_dim * in_dim];
                let y = if rows <= cpu_matmul::FEW_ROWS {
                    cpu_matmul::few_rows(xs, (rows, in_dim), ws, out_dim)
                } else {
                    cpu_matmul::by_columns(xs, (rows, in_dim), ws, (1, in_dim), out_dim)
                };
                return Ok((CpuStorage::F32(y), Shape::from(shape)));
            }
        }
        forward(x, x_layout, w, w_layout)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        forward(x, x_layout, w, w_layout)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(times_weight(grad_res, w)?), None))
    }
}

/// `g W` for `g: [..., out]` and the frozen `W: [out, in]`, with no backward: the input
/// gradient of `x Wᵀ`.
struct TimesWeight;

impl CustomOp2 for TimesWeight {
    fn name(&self) -> &'static str {
        "times-weight"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        g_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gs), CpuStorage::F32(ws)) = (g, w) else {
            return storage_times_weight(g, g_layout, w, w_layout);
        };
        let (rows, out_dim, in_dim, shape) = times_weight_dims(g_layout, w_layout)?;
        let gs = &gs[g_layout.start_offset()..][..rows * out_dim];
        let ws = &ws[w_layout.start_offset()..][..out_dim * in_dim];
        let y = cpu_matmul::by_columns(gs, (rows, out_dim), ws, (in_dim, 1), in_dim);
        Ok((CpuStorage::F32(y), shape))
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        g_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        storage_times_weight(g, g_layout, w, w_layout)
    }
}

/// The rows of `g: [..., out]`, `out`, `in` and the product's shape `[..., in]`.
fn times_weight_dims(g_layout: &Layout, w_layout: &Layout) -> Result<(usize, usize, usize, Shape)> {
    let (out_dim, in_dim) = w_layout.shape().dims2()?;
    let rows = g_layout.shape().elem_count() / out_dim.max(1);
    let mut shape = g_layout.dims().to_vec();
    *shape.last_mut().expect("at least one dimension") = in_dim;
    Ok((rows, out_dim, in_dim, Shape::from(shape)))
}

/// `g W` as one storage-level `[rows, out] × [out, in]` matmul (contiguous `g`).
fn storage_times_weight<S: BackendStorage>(
    g: &S,
    g_layout: &Layout,
    w: &S,
    w_layout: &Layout,
) -> Result<(S, Shape)> {
    let (rows, out_dim, in_dim, shape) = times_weight_dims(g_layout, w_layout)?;
    let y = g.matmul(
        w,
        (1, rows, in_dim, out_dim),
        &Layout::contiguous_with_offset((rows, out_dim), g_layout.start_offset()),
        w_layout,
    )?;
    Ok((y, shape))
}

/// `g W` (`g: [..., out]`, `W: [out, in]`) for a frozen `W`, untracked.
fn times_weight(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (g, w) = (g.contiguous()?, w.contiguous()?);
    if (g.device().is_cpu() || g.device().is_cuda()) && g.dtype() == w.dtype() {
        g.apply_op2_no_bwd(&w, &TimesWeight)
    } else {
        g.broadcast_matmul(&w)
    }
}

/// A LoRA layer, `x Wᵀ + scale · (x Aᵀ) Bᵀ`, as one op over `(x, A, B)`: backward keeps
/// the input and the adapter only (the low-rank product `x Aᵀ` is recomputed), where the
/// same layer built from separate ops keeps two more tensors of the output's size.
struct FrozenLora {
    /// `W`: `[out, in]`.
    weight: Tensor,
    scale: f64,
}

impl CustomOp3 for FrozenLora {
    fn name(&self) -> &'static str {
        "frozen-lora"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            bail!("frozen-lora: the weight is not on the CPU");
        };
        let (y, shape) = FrozenMatmul.cpu_fwd(x, x_layout, w, w_layout)?;
        let (rank, k) = a_layout.shape().dims2()?;
        let (n, b_rank) = b_layout.shape().dims2()?;
        let m = x_layout.shape().elem_count() / k.max(1);
        if b_rank != rank || shape.dims().last() != Some(&n) {
            bail!(
                "frozen-lora: A {:?} and B {:?} do not fit",
                a_layout.dims(),
                b_layout.dims()
            );
        }
        let x2 = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
        let xa = x.matmul(a, (1, m, rank, k), &x2, &a_layout.transpose(0, 1)?)?;
        let low = xa.matmul(
            b,
            (1, m, n, rank),
            &Layout::contiguous((m, rank)),
            &b_layout.transpose(0, 1)?,
        )?;
        let (CpuStorage::F32(mut y), CpuStorage::F32(low)) = (y, low) else {
            bail!("frozen-lora takes f32 tensors");
        };
        let scale = self.scale as f32;
        y.iter_mut().zip(&low).for_each(|(y, l)| *y += scale * l);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b) = (a.detach(), b.detach());
        let k = a.dim(1)?;
        let x2 = x.detach().reshape(((), k))?;
        let g = grad.contiguous()?.reshape(((), b.dim(0)?))?;
        let gb = g.matmul(&b)?; // [m, rank]
        let grad_x = (times_weight(&g, &self.weight)? + (gb.matmul(&a)? * self.scale)?)?;
        let grad_a = (gb.t()?.matmul(&x2)? * self.scale)?;
        let grad_b = (g.t()?.matmul(&x2.matmul(&a.t()?)?)? * self.scale)?;
        Ok((Some(grad_x.reshape(x.shape())?), Some(grad_a), Some(grad_b)))
    }
}

/// `x: [..., in]` (contiguous) times the transpose of `w: [out, in]` (contiguous), as one
/// `[rows, in] × [in, out]` matmul.
fn forward<S: BackendStorage>(
    x: &S,
    x_layout: &Layout,
    w: &S,
    w_layout: &Layout,
) -> Result<(S, Shape)> {
    let (out_dim, in_dim) = w_layout.shape().dims2()?;
    let dims = x_layout.dims();
    if !x_layout.is_contiguous() || !w_layout.is_contiguous() {
        bail!("frozen-matmul takes contiguous operands");
    }
    if dims.last() != Some(&in_dim) {
        bail!("frozen-matmul: input {dims:?} does not end in the weight's width {in_dim}");
    }
    let rows = x_layout.shape().elem_count() / in_dim;
    let x_2d = Layout::contiguous_with_offset((rows, in_dim), x_layout.start_offset());
    let y = x.matmul(
        w,
        (1, rows, out_dim, in_dim),
        &x_2d,
        &w_layout.transpose(0, 1)?,
    )?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("at least one dimension") = out_dim;
    Ok((y, Shape::from(shape)))
}

/// `x: [..., in]` times `weightᵀ` (`weight: [out, in]`), with no gradient for the weight.
/// Uses the custom op on the CPU and on CUDA when both share a dtype, a plain matmul
/// elsewhere.
pub fn matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let supported = x.device().is_cpu() || x.device().is_cuda();
    if supported && x.dtype() == weight.dtype() {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, FrozenMatmul)
    } else {
        x.broadcast_matmul(&weight.t()?)
    }
}

/// `x Wᵀ + scale · (x Aᵀ) Bᵀ` for a frozen `W: [out, in]` and adapter `A: [rank, in]`,
/// `B: [out, rank]`; `track` records the op for backward (gradients for `x`, `A` and `B`).
/// One op for f32 on the CPU, separate ops elsewhere.
pub fn lora_matmul_t(
    x: &Tensor,
    weight: &Tensor,
    (a, b, scale): (&Tensor, &Tensor, f64),
    track: bool,
) -> Result<Tensor> {
    let all_f32 = [x, weight, a, b].iter().all(|t| t.dtype() == DType::F32);
    if x.device().is_cpu() && all_f32 {
        let op = FrozenLora {
            weight: weight.contiguous()?,
            scale,
        };
        let x = x.contiguous()?;
        return if track {
            x.apply_op3(a, b, op)
        } else {
            x.apply_op3_no_bwd(a, b, &op)
        };
    }
    let (a, b) = if track {
        (a.clone(), b.clone())
    } else {
        (a.detach(), b.detach())
    };
    let low = x
        .to_dtype(DType::F32)?
        .broadcast_matmul(&a.t()?)?
        .broadcast_matmul(&(b * scale)?.t()?)?
        .to_dtype(x.dtype())?;
    matmul_t(x, weight)? + low
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn forward_and_input_gradient_equal_a_plain_matmul() {
        // one row, a few rows (a decoding step) and many rows take three different paths
        for rows in [(1, 1, 3), (2, 4, 3), (3, 40, 3)] {
            frozen_equals_plain(rows);
        }
    }

    fn frozen_equals_plain(x_shape: (usize, usize, usize)) {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let x = candle_core::Var::randn(0f32, 1.0, x_shape, &device).unwrap();
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        let frozen = matmul_t(x.as_tensor(), &w).unwrap();
        let diff = (&plain - &frozen)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let g_plain = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_frozen = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let a = g_plain.get(x.as_tensor()).unwrap();
        let b = g_frozen.get(x.as_tensor()).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(
            g_frozen.get(&w).is_none(),
            "no gradient for the frozen weight"
        );
    }

    #[test]
    fn the_lora_op_equals_separate_ops_in_value_and_gradients() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let x = candle_core::Var::randn(0f32, 1.0, (2, 4, 3), &device).unwrap();
        let a = candle_core::Var::randn(0f32, 1.0, (2, 3), &device).unwrap();
        let b = candle_core::Var::randn(0f32, 1.0, (5, 2), &device).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 4, 5), &device).unwrap();
        let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
        let low = xt
            .broadcast_matmul(&at.t().unwrap())
            .unwrap()
            .broadcast_matmul(&bt.t().unwrap())
            .unwrap();
        let plain = (xt.broadcast_matmul(&w.t().unwrap()).unwrap() + (low * 1.5).unwrap()).unwrap();
        let fused = lora_matmul_t(xt, &w, (at, bt, 1.5), true).unwrap();
        let untracked = lora_matmul_t(xt, &w, (at, bt, 1.5), false).unwrap();
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max((&plain - &fused).unwrap()) < 1e-5);
        assert_eq!(max((&fused - &untracked).unwrap()), 0.0);
        let g_plain = (plain * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &a, &b] {
            let (p, f) = (g_plain.get(v).unwrap(), g_fused.get(v).unwrap());
            assert!(max((p - f).unwrap()) < 1e-4);
        }
        assert!(g_fused.get(&w).is_none());
        let none = (untracked * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(none.get(&a).is_none() && none.get(&b).is_none());
    }
}
