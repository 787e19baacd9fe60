//! The one linear layer of every model: `y = x Wᵀ + b`, plus an optional low-rank adapter
//! `(alpha / r) · x Aᵀ Bᵀ` whose `A` and `B` are the only trainable variables of a model.

use std::cell::Cell;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::frozen::FrozenWeight;

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every adapter read as a constant, so no operation inside records the graph
/// that backward would need (and keep alive): for generation and scoring without training.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAD.set(self.0);
        }
    }
    let _restore = Restore(NO_GRAD.replace(true));
    f()
}

/// A low-rank adapter on one linear layer (PEFT's LoRA).
#[derive(Debug, Clone)]
pub struct Lora {
    /// `A`: `[rank, in]`, Kaiming-uniform at creation.
    pub a: Var,
    /// `B`: `[out, rank]`, zero at creation so a new adapter changes nothing.
    pub b: Var,
    /// `alpha / rank`, or `alpha / sqrt(rank)` for rsLoRA.
    pub scale: f64,
}

impl Lora {
    /// A fresh adapter for a layer of `in_dim → out_dim`: `A` Kaiming-uniform
    /// (bound `1 / sqrt(in_dim)`, as PEFT's `kaiming_uniform_(a = sqrt(5))`), `B` zero.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        rank: usize,
        scale: f64,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let values: Vec<f32> = (0..rank * in_dim)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(values, (rank, in_dim), device)?)?;
        let b = Var::zeros((out_dim, rank), DType::F32, device)?;
        Ok(Lora { a, b, scale })
    }

    /// The adapter's rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

/// A linear layer with an optional adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `W`: `[out, in]`, a tensor or a GGUF file's blocks.
    pub weight: FrozenWeight,
    /// `b`: `[out]`, when the layer has one.
    pub bias: Option<Tensor>,
    /// The adapter, when one is attached.
    pub lora: Option<Lora>,
}

impl Linear {
    /// A plain layer.
    pub fn new(weight: impl Into<FrozenWeight>, bias: Option<Tensor>) -> Self {
        Linear {
            weight: weight.into(),
            bias,
            lora: None,
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x: [..., in] → [..., out]`; the adapter is applied when `adapters_on`.
    pub fn forward(&self, x: &Tensor, adapters_on: bool) -> Result<Tensor> {
        let y = match (&self.lora, adapters_on) {
            (Some(lora), true) => super::frozen::lora_matmul_t(
                x,
                &self.weight,
                (lora.a.as_tensor(), lora.b.as_tensor(), lora.scale),
                !NO_GRAD.get(),
            )?,
            _ => super::frozen::matmul_t(x, &self.weight)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `W + scale · B A`: the weight with the adapter folded in (a tensor: blocks are
    /// dequantized where an adapter is merged).
    pub fn merged_weight(&self) -> Result<FrozenWeight> {
        match &self.lora {
            Some(lora) => {
                let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scale)?;
                let merged = (self.weight.to_tensor()? + delta.to_dtype(self.weight.dtype())?)?;
                Ok(FrozenWeight::Tensor(merged))
            }
            None => Ok(self.weight.clone()),
        }
    }
}

impl Linear {
    /// The layer as Hugging Face stores it, adapter merged: `prefix.weight` and, when the
    /// layer has one, `prefix.bias`.
    pub fn hf_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            format!("{prefix}.weight"),
            self.merged_weight()?.to_tensor()?,
        )];
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.clone()));
        }
        Ok(out)
    }
}

/// The seven linear layers of one decoder block with their Hugging Face module names
/// (`<prefix>.self_attn.q_proj`, …, `<prefix>.mlp.down_proj`), for attaching adapters.
pub fn block_linears<'a>(
    prefix: &str,
    [q, k, v, o]: [&'a mut Linear; 4],
    [gate, up, down]: [&'a mut Linear; 3],
) -> [(String, &'a mut Linear); 7] {
    [
        (format!("{prefix}.self_attn.q_proj"), q),
        (format!("{prefix}.self_attn.k_proj"), k),
        (format!("{prefix}.self_attn.v_proj"), v),
        (format!("{prefix}.self_attn.o_proj"), o),
        (format!("{prefix}.mlp.gate_proj"), gate),
        (format!("{prefix}.mlp.up_proj"), up),
        (format!("{prefix}.mlp.down_proj"), down),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_grad_records_no_graph_and_changes_no_value() {
        let device = Device::Cpu;
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let mut layer = Linear::new(Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap(), None);
        let lora = Lora::new(3, 5, 2, 2.0, &mut rng, &device).unwrap();
        super::super::lora::set(&lora.b, &Tensor::randn(0f32, 1.0, (5, 2), &device).unwrap())
            .unwrap();
        layer.lora = Some(lora.clone());
        let x = Tensor::randn(0f32, 1.0, (4, 3), &device).unwrap();
        let tracked = layer.forward(&x, true).unwrap();
        let constant = no_grad(|| layer.forward(&x, true).unwrap());
        let diff = (&tracked - &constant)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let grads = tracked.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(lora.b.as_tensor()).is_some());
        let grads = constant.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(lora.b.as_tensor()).is_none());
        assert!(grads.get(lora.a.as_tensor()).is_none());
    }
}
