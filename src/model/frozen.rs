//! `x Wᵀ` for a frozen weight `W`. candle's matmul backward computes (and keeps) a gradient
//! for both operands; for a frozen weight that is wasted work and memory (a 671 MB gradient
//! of Gemma's embedding matrix for every chunk of the output head). This op's backward
//! returns the input's gradient only.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

struct FrozenMatmul {
    /// `W`: `[out, in]`.
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            bail!("frozen-matmul takes a contiguous f32 input");
        };
        let x = Tensor::from_slice(&values[start..end], layout.shape(), &Device::Cpu)?;
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.broadcast_matmul(&self.weight)?))
    }
}

/// `x: [..., in]` times `weightᵀ` (`weight: [out, in]`), with no gradient for the weight.
/// Uses the custom op for f32 on the CPU, a plain matmul elsewhere.
pub fn matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(FrozenMatmul {
            weight: weight.clone(),
        })
    } else {
        x.broadcast_matmul(&weight.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
