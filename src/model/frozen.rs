//! `x Wᵀ` for a frozen weight `W`. candle's matmul backward computes (and keeps) a gradient
//! for both operands; for a frozen weight that is wasted work and memory (a 671 MB gradient
//! of Gemma's embedding matrix for every chunk of the output head). This op's backward
//! returns the input's gradient only.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `x Wᵀ` with the weight as the second argument, so the CPU kernel multiplies the two
/// storages in place (no copy of the input or of the product) and backward returns no
/// gradient for the weight.
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
        if !x_layout.is_contiguous() || w_layout.dims().len() != 2 {
            bail!("frozen-matmul takes a contiguous input and a [out, in] weight");
        }
        let dims = x_layout.dims();
        let k = *dims.last().unwrap_or(&0);
        let m = x_layout.shape().elem_count() / k.max(1);
        let (n, w_k) = (w_layout.dims()[0], w_layout.dims()[1]);
        if w_k != k {
            bail!("frozen-matmul: input width {k} but the weight is [{n}, {w_k}]");
        }
        let x2 = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
        let wt = w_layout.transpose(0, 1)?;
        let y = x.matmul(w, (1, m, n, k), &x2, &wt)?;
        let mut out = dims.to_vec();
        out.pop();
        out.push(n);
        Ok((y, Shape::from(out)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_res.contiguous()?.broadcast_matmul(w)?), None))
    }
}

/// `x Wᵀ + low` in one op, `low` having the product's shape: the LoRA layer's output
/// without a separate tensor for the frozen product (backward would keep it alive).
struct FrozenMatmulAdd;

impl CustomOp3 for FrozenMatmulAdd {
    fn name(&self) -> &'static str {
        "frozen-matmul-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        low: &CpuStorage,
        low_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = FrozenMatmul.cpu_fwd(x, x_layout, w, w_layout)?;
        let (CpuStorage::F32(mut y), CpuStorage::F32(low), Some((start, end))) =
            (y, low, low_layout.contiguous_offsets())
        else {
            bail!("frozen-matmul-add takes a contiguous f32 addend");
        };
        if low_layout.shape() != &shape {
            bail!(
                "frozen-matmul-add: product {:?} but addend {:?}",
                shape.dims(),
                low_layout.dims()
            );
        }
        y.iter_mut()
            .zip(&low[start..end])
            .for_each(|(y, l)| *y += l);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _low: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_x = grad_res.contiguous()?.broadcast_matmul(w)?;
        Ok((Some(grad_x), None, Some(grad_res.clone())))
    }
}

/// `x: [..., in]` times `weightᵀ` (`weight: [out, in]`), with no gradient for the weight.
/// Uses the custom op for f32 on the CPU, a plain matmul elsewhere.
pub fn matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        x.contiguous()?.apply_op2(weight, FrozenMatmul)
    } else {
        x.broadcast_matmul(&weight.t()?)
    }
}

/// `x Wᵀ + low` (`low: [..., out]`), with no gradient for the weight; one op on the CPU.
pub fn matmul_t_add(x: &Tensor, weight: &Tensor, low: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && low.dtype() == DType::F32
    {
        x.contiguous()?
            .apply_op3(weight, &low.contiguous()?, FrozenMatmulAdd)
    } else {
        matmul_t(x, weight)? + low
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn forward_and_input_gradient_equal_a_plain_matmul() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let x = candle_core::Var::randn(0f32, 1.0, (2, 4, 3), &device).unwrap();
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
    fn the_fused_add_equals_a_matmul_plus_the_addend_in_value_and_gradients() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let x = candle_core::Var::randn(0f32, 1.0, (2, 4, 3), &device).unwrap();
        let low = candle_core::Var::randn(0f32, 1.0, (2, 4, 5), &device).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 4, 5), &device).unwrap();
        let plain =
            (x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap() + low.as_tensor()).unwrap();
        let fused = matmul_t_add(x.as_tensor(), &w, low.as_tensor()).unwrap();
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max((&plain - &fused).unwrap()) < 1e-5);
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
        for v in [&x, &low] {
            let (a, b) = (g_plain.get(v).unwrap(), g_fused.get(v).unwrap());
            assert!(max((a - b).unwrap()) < 1e-5);
        }
        assert!(g_fused.get(&w).is_none());
    }
}
