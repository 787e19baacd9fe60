//! `x Wᵀ` for a frozen weight `W`, kept as a tensor or, on the CPU, as a GGUF file's own
//! blocks ([`FrozenWeight`]). candle's matmul backward computes (and keeps) a gradient for
//! both operands; for a frozen weight that is wasted work and memory (a 671 MB gradient of
//! Gemma's embedding matrix for every chunk of the output head). These ops' backward returns
//! the input's gradient only, computed from the same weight (the same blocks).

use std::sync::Arc;

use super::cpu_matmul;
use super::quant::Blocks;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, Tensor,
};

/// A frozen weight `W: [out, in]`: a tensor (on any device, in any dtype), or on the CPU its
/// GGUF blocks, decoded on the fly by every product (in f32, as the dequantized tensor
/// would give them). Clones share the blocks.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// The values as a tensor.
    Tensor(Tensor),
    /// The values in their GGUF blocks, on the CPU.
    Blocks(Arc<Blocks>),
}

impl From<Tensor> for FrozenWeight {
    fn from(t: Tensor) -> Self {
        FrozenWeight::Tensor(t)
    }
}

/// The device block weights live on.
static CPU: Device = Device::Cpu;

impl FrozenWeight {
    /// `[out, in]`.
    pub fn dims(&self) -> &[usize] {
        match self {
            FrozenWeight::Tensor(t) => t.dims(),
            FrozenWeight::Blocks(b) => b.dims(),
        }
    }

    /// The size of dimension `i`.
    pub fn dim(&self, i: usize) -> Result<usize> {
        match self.dims().get(i) {
            Some(&d) => Ok(d),
            None => bail!("frozen weight {:?}: no dimension {i}", self.dims()),
        }
    }

    /// `(out, in)`, or an error for a weight that is not a matrix.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.dims() {
            &[out, inp] => Ok((out, inp)),
            dims => bail!("frozen weight {dims:?} is not a matrix"),
        }
    }

    /// The device the weight lives on.
    pub fn device(&self) -> &Device {
        match self {
            FrozenWeight::Tensor(t) => t.device(),
            FrozenWeight::Blocks(_) => &CPU,
        }
    }

    /// The dtype products with it take and give (f32 for blocks).
    pub fn dtype(&self) -> DType {
        match self {
            FrozenWeight::Tensor(t) => t.dtype(),
            FrozenWeight::Blocks(_) => DType::F32,
        }
    }

    /// The values as a tensor (blocks dequantized to a new f32 tensor: for export and
    /// merging, not for products).
    pub fn to_tensor(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Tensor(t) => Ok(t.clone()),
            FrozenWeight::Blocks(b) => {
                Tensor::from_vec(b.to_f32(), (b.dims()[0], b.dims()[1]), &CPU)
            }
        }
    }

    /// The same weight cut from any graph.
    pub fn detach(&self) -> Self {
        match self {
            FrozenWeight::Tensor(t) => FrozenWeight::Tensor(t.detach()),
            FrozenWeight::Blocks(b) => FrozenWeight::Blocks(b.clone()),
        }
    }

    /// Rows `ids` (u32, any shape) as `[ids, in]`: an embedding lookup. From blocks only the
    /// rows looked up are decoded.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?;
        match self {
            FrozenWeight::Tensor(t) => t.index_select(&ids, 0),
            FrozenWeight::Blocks(b) => {
                let (n, k) = (b.dims()[0], b.dims()[1]);
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * k];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
                    if id as usize >= n {
                        bail!("row {id} looked up in a weight of {n} rows");
                    }
                    b.decode_rows(id as usize..id as usize + 1, row);
                }
                Tensor::from_vec(out, (ids.len(), k), &CPU)
            }
        }
    }

    /// The weight with a tensor's storage contiguous (blocks as they are).
    fn contiguous(&self) -> Result<Self> {
        Ok(match self {
            FrozenWeight::Tensor(t) => FrozenWeight::Tensor(t.contiguous()?),
            FrozenWeight::Blocks(b) => FrozenWeight::Blocks(b.clone()),
        })
    }
}

/// The weight as the CPU products read it: f32 values or blocks.
enum CpuWeight<'a> {
    F32(&'a [f32]),
    Blocks(&'a Blocks),
}

/// Runs `f` on the weight as the CPU products read it; an error for a tensor that is no
/// contiguous f32 one on the CPU.
fn on_cpu<T>(w: &FrozenWeight, f: impl FnOnce(CpuWeight<'_>) -> T) -> Result<T> {
    match w {
        FrozenWeight::Blocks(b) => Ok(f(CpuWeight::Blocks(b))),
        FrozenWeight::Tensor(t) => {
            let (storage, layout) = t.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(CpuWeight::F32(&v[a..b]))),
                _ => bail!("frozen weight: no contiguous f32 tensor on the CPU"),
            }
        }
    }
}

/// `x[m, in] · Wᵀ` on the CPU in f32: a decoding step's few rows read each weight once, more
/// rows share the weight's rows out between threads.
pub fn cpu_times_t(x: &[f32], m: usize, w: &FrozenWeight) -> Result<Vec<f32>> {
    let mut y = Vec::new();
    cpu_times_t_into(x, m, w, &mut y)?;
    Ok(y)
}

/// [`cpu_times_t`] into `y` (its values replaced, its allocation kept where it is large
/// enough): a decoding step's logits reuse the last step's buffer instead of faulting in a
/// new one.
pub fn cpu_times_t_into(x: &[f32], m: usize, w: &FrozenWeight, y: &mut Vec<f32>) -> Result<()> {
    let (n, k) = w.dims2()?;
    on_cpu(w, |cw| match cw {
        CpuWeight::F32(ws) if m <= cpu_matmul::FEW_ROWS => {
            cpu_matmul::few_rows_into(x, (m, k), ws, n, y)
        }
        CpuWeight::F32(ws) => *y = cpu_matmul::by_columns(x, (m, k), ws, (1, k), n),
        CpuWeight::Blocks(b) => cpu_matmul::blocks_t_into(x, m, b, y),
    })
}

/// `g[m, out] · W` on the CPU in f32 (the input gradient of `x Wᵀ`).
pub fn cpu_times(g: &[f32], m: usize, w: &FrozenWeight) -> Result<Vec<f32>> {
    let (n, k) = w.dims2()?;
    on_cpu(w, |cw| match cw {
        CpuWeight::F32(ws) => cpu_matmul::by_columns(g, (m, n), ws, (k, 1), k),
        CpuWeight::Blocks(b) => cpu_matmul::blocks_times(g, m, b),
    })
}

/// `x Wᵀ` as one custom op on the CPU and on CUDA (for a tensor weight the same
/// storage-level matmul candle's own uses, on the two storages in place: no copy of the
/// input or of the product), with a backward pass for `x` only.
struct FrozenMatmul {
    /// `W`, a contiguous tensor or blocks.
    weight: FrozenWeight,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let (rows, shape) = product_dims(x_layout, in_dim, out_dim)?;
        if let (CpuStorage::F32(xs), Some((start, _))) = (x, x_layout.contiguous_offsets()) {
            if self.weight.dtype() == DType::F32 {
                let y = cpu_times_t(&xs[start..][..rows * in_dim], rows, &self.weight)?;
                return Ok((CpuStorage::F32(y), shape));
            }
        }
        let FrozenWeight::Tensor(w) = &self.weight else {
            bail!("frozen-matmul: a weight in blocks takes contiguous f32 input");
        };
        let (storage, w_layout) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*storage else {
            bail!("frozen-matmul: the weight is not on the CPU");
        };
        forward(x, x_layout, ws, w_layout)
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let FrozenWeight::Tensor(w) = &self.weight else {
            bail!("frozen-matmul: weights in blocks live on the CPU");
        };
        let (storage, w_layout) = w.storage_and_layout();
        let Storage::Cuda(ws) = &*storage else {
            bail!("frozen-matmul: the weight is not on the GPU");
        };
        forward(x, x_layout, ws, w_layout)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(times_weight(grad_res, &self.weight)?))
    }
}

/// The rows of `x: [..., in]` and the product's shape `[..., out]`.
fn product_dims(x_layout: &Layout, in_dim: usize, out_dim: usize) -> Result<(usize, Shape)> {
    let dims = x_layout.dims();
    if dims.last() != Some(&in_dim) {
        bail!("frozen-matmul: input {dims:?} does not end in the weight's width {in_dim}");
    }
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("at least one dimension") = out_dim;
    Ok((
        x_layout.shape().elem_count() / in_dim.max(1),
        Shape::from(shape),
    ))
}

/// `g W` for `g: [..., out]` and the frozen `W: [out, in]`, with no backward: the input
/// gradient of `x Wᵀ`.
struct TimesWeight {
    /// `W`, a contiguous tensor or blocks.
    weight: FrozenWeight,
}

impl CustomOp1 for TimesWeight {
    fn name(&self) -> &'static str {
        "times-weight"
    }

    fn cpu_fwd(&self, g: &CpuStorage, g_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, out_dim, _, shape) = times_weight_dims(g_layout, self.weight.dims2()?)?;
        if let (CpuStorage::F32(gs), Some((start, _))) = (g, g_layout.contiguous_offsets()) {
            if self.weight.dtype() == DType::F32 {
                let y = cpu_times(&gs[start..][..rows * out_dim], rows, &self.weight)?;
                return Ok((CpuStorage::F32(y), shape));
            }
        }
        let FrozenWeight::Tensor(w) = &self.weight else {
            bail!("times-weight: a weight in blocks takes contiguous f32 input");
        };
        let (storage, w_layout) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*storage else {
            bail!("times-weight: the weight is not on the CPU");
        };
        storage_times_weight(g, g_layout, ws, w_layout)
    }

    fn cuda_fwd(&self, g: &CudaStorage, g_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let FrozenWeight::Tensor(w) = &self.weight else {
            bail!("times-weight: weights in blocks live on the CPU");
        };
        let (storage, w_layout) = w.storage_and_layout();
        let Storage::Cuda(ws) = &*storage else {
            bail!("times-weight: the weight is not on the GPU");
        };
        storage_times_weight(g, g_layout, ws, w_layout)
    }
}

/// The rows of `g: [..., out]`, `out`, `in` and the product's shape `[..., in]`.
fn times_weight_dims(
    g_layout: &Layout,
    (out_dim, in_dim): (usize, usize),
) -> Result<(usize, usize, usize, Shape)> {
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
    let (rows, out_dim, in_dim, shape) = times_weight_dims(g_layout, w_layout.shape().dims2()?)?;
    let y = g.matmul(
        w,
        (1, rows, in_dim, out_dim),
        &Layout::contiguous_with_offset((rows, out_dim), g_layout.start_offset()),
        w_layout,
    )?;
    Ok((y, shape))
}

/// `g W` (`g: [..., out]`, `W: [out, in]`) for a frozen `W`, untracked: one op on the CPU
/// and on CUDA, a plain matmul elsewhere.
pub fn times_weight(g: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    let (g, w) = (g.contiguous()?, w.contiguous()?);
    match &w {
        FrozenWeight::Blocks(_) => g
            .to_dtype(DType::F32)?
            .apply_op1_no_bwd(&TimesWeight { weight: w })?
            .to_dtype(g.dtype()),
        FrozenWeight::Tensor(t)
            if (g.device().is_cpu() || g.device().is_cuda()) && g.dtype() == t.dtype() =>
        {
            g.apply_op1_no_bwd(&TimesWeight { weight: w })
        }
        FrozenWeight::Tensor(t) => g.broadcast_matmul(t),
    }
}

/// A LoRA layer, `x Wᵀ + scale · (x Aᵀ) Bᵀ`, as one op over `(x, A, B)`: backward keeps
/// the input and the adapter only (the low-rank product `x Aᵀ` is recomputed), where the
/// same layer built from separate ops keeps two more tensors of the output's size.
struct FrozenLora {
    /// `W`: `[out, in]`, a contiguous tensor or blocks.
    weight: FrozenWeight,
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
        let product = FrozenMatmul {
            weight: self.weight.clone(),
        };
        let (y, shape) = product.cpu_fwd(x, x_layout)?;
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
        let packed = (a_layout.contiguous_offsets(), b_layout.contiguous_offsets());
        let low = match (x, a, b, packed) {
            // a decoding step's few rows: the kernel of the frozen product, whose rows do not
            // depend on each other (gemm's may change with the number of rows)
            (
                CpuStorage::F32(xs),
                CpuStorage::F32(av),
                CpuStorage::F32(bv),
                (Some(ao), Some(bo)),
            ) if m <= cpu_matmul::FEW_ROWS => {
                let xs = &xs[x_layout.start_offset()..];
                let xa = cpu_matmul::few_rows(xs, (m, k), &av[ao.0..ao.1], rank);
                CpuStorage::F32(cpu_matmul::few_rows(&xa, (m, rank), &bv[bo.0..bo.1], n))
            }
            _ => {
                let x2 = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
                let xa = x.matmul(a, (1, m, rank, k), &x2, &a_layout.transpose(0, 1)?)?;
                xa.matmul(
                    b,
                    (1, m, n, rank),
                    &Layout::contiguous((m, rank)),
                    &b_layout.transpose(0, 1)?,
                )?
            }
        };
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
    if !x_layout.is_contiguous() || !w_layout.is_contiguous() {
        bail!("frozen-matmul takes contiguous operands");
    }
    let (rows, shape) = product_dims(x_layout, in_dim, out_dim)?;
    let x_2d = Layout::contiguous_with_offset((rows, in_dim), x_layout.start_offset());
    let y = x.matmul(
        w,
        (1, rows, out_dim, in_dim),
        &x_2d,
        &w_layout.transpose(0, 1)?,
    )?;
    Ok((y, shape))
}

/// `x: [..., in]` times `weightᵀ` (`weight: [out, in]`), with no gradient for the weight.
/// Uses the custom op on the CPU and on CUDA when both share a dtype (weights in blocks
/// take f32: other inputs are converted there and back), a plain matmul elsewhere.
pub fn matmul_t(x: &Tensor, weight: &FrozenWeight) -> Result<Tensor> {
    let op = FrozenMatmul {
        weight: weight.contiguous()?,
    };
    match weight {
        FrozenWeight::Blocks(_) => x
            .contiguous()?
            .to_dtype(DType::F32)?
            .apply_op1(op)?
            .to_dtype(x.dtype()),
        FrozenWeight::Tensor(w)
            if (x.device().is_cpu() || x.device().is_cuda()) && x.dtype() == w.dtype() =>
        {
            x.contiguous()?.apply_op1(op)
        }
        FrozenWeight::Tensor(w) => x.broadcast_matmul(&w.t()?),
    }
}

/// `x Wᵀ + scale · (x Aᵀ) Bᵀ` for a frozen `W: [out, in]` and adapter `A: [rank, in]`,
/// `B: [out, rank]`; `track` records the op for backward (gradients for `x`, `A` and `B`).
/// One op for f32 on the CPU, separate ops elsewhere.
pub fn lora_matmul_t(
    x: &Tensor,
    weight: &FrozenWeight,
    (a, b, scale): (&Tensor, &Tensor, f64),
    track: bool,
) -> Result<Tensor> {
    let all_f32 = [x, a, b].iter().all(|t| t.dtype() == DType::F32);
    if x.device().is_cpu() && all_f32 && weight.dtype() == DType::F32 {
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
        let frozen = matmul_t(x.as_tensor(), &FrozenWeight::from(w.clone())).unwrap();
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
        let frozen = FrozenWeight::from(w.clone());
        let fused = lora_matmul_t(xt, &frozen, (at, bt, 1.5), true).unwrap();
        let untracked = lora_matmul_t(xt, &frozen, (at, bt, 1.5), false).unwrap();
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

    #[test]
    fn a_weight_in_blocks_gives_the_dequantized_weights_values_and_gradients() {
        use crate::model::quant::{testing::random_blocks, BlockKind};
        let device = Device::Cpu;
        let blocks = Arc::new(random_blocks(BlockKind::Q4K, (19, 512), 4));
        let in_blocks = FrozenWeight::Blocks(blocks.clone());
        let dense = FrozenWeight::from(in_blocks.to_tensor().unwrap());
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // a decoding step's rows and a prefill's
        for rows in [3, 40] {
            let x = candle_core::Var::randn(0f32, 1.0, (1, rows, 512), &device).unwrap();
            let a = candle_core::Var::randn(0f32, 0.1, (2, 512), &device).unwrap();
            let b = candle_core::Var::randn(0f32, 0.1, (19, 2), &device).unwrap();
            let weights = Tensor::randn(0f32, 1.0, (1, rows, 19), &device).unwrap();
            let lora = (a.as_tensor(), b.as_tensor(), 2.0);
            for (with_blocks, with_dense) in [
                (
                    matmul_t(x.as_tensor(), &in_blocks).unwrap(),
                    matmul_t(x.as_tensor(), &dense).unwrap(),
                ),
                (
                    lora_matmul_t(x.as_tensor(), &in_blocks, lora, true).unwrap(),
                    lora_matmul_t(x.as_tensor(), &dense, lora, true).unwrap(),
                ),
            ] {
                let scale = max(with_dense.clone());
                assert!(max((&with_blocks - &with_dense).unwrap()) < 1e-5 * scale);
                let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
                let g_blocks = loss(&with_blocks).backward().unwrap();
                let g_dense = loss(&with_dense).backward().unwrap();
                for v in [&x, &a, &b] {
                    if let Some(want) = g_dense.get(v) {
                        let got = g_blocks.get(v).expect("the same gradients");
                        let scale = max(want.clone());
                        assert!(max((got - want).unwrap()) < 1e-5 * scale);
                    }
                }
            }
        }
        // the embedding lookup decodes just the rows asked for
        let ids = Tensor::new(&[[3u32, 0], [18, 3]], &device).unwrap();
        let rows = in_blocks.rows(&ids).unwrap();
        assert_eq!(rows.dims(), &[4, 512]);
        let want = dense.rows(&ids).unwrap();
        assert_eq!(max((rows - want).unwrap()), 0.0);
        let err = in_blocks
            .rows(&Tensor::new(&[19u32], &device).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("row 19"), "{err}");
    }
}
