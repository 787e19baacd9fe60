//! `x Wᵀ` for a frozen weight `W`. candle's matmul backward computes (and keeps) a gradient
//! for both operands; for a frozen weight that is wasted work and memory (a 671 MB gradient
//! of Gemma's embedding matrix for every chunk of the output head). This op's backward
//! returns the input's gradient only.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x Wᵀ` as one custom op on the CPU and on CUDA (the same storage-level matmul candle's
/// own uses), with a backward pass for `x` only.
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
        Ok((Some(grad_res.broadcast_matmul(w)?), None))
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
    let w_t = w_layout.transpose(0, 1)?;
    let y = x.matmul(w, (1, rows, out_dim, in_dim), &x_2d, &w_t)?;
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
}
