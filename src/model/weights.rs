//! Model weights by Hugging Face name, from safetensors shards or a GGUF file (renamed),
//! with errors that name the file and the tensor. Tensors are handed out in the model's
//! dtype, norm scales in f32. On the CPU in f32, a GGUF file's matrices stay in their blocks
//! and bf16/f16 safetensors matrices in their dtype (see [`super::quant`]); elsewhere, and
//! for the types not kept so, they are converted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Error, Result, Tensor};

use super::frozen::FrozenWeight;
use super::linear::Linear;
use super::quant::{BlockKind, Blocks};

/// Where the weights came from, which decides how Gemma norms are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Hugging Face safetensors: Gemma norms hold `w` and scale by `1 + w`.
    Safetensors,
    /// GGUF: llama.cpp's converter stores Gemma norms as `1 + w` already.
    Gguf,
}

/// The tensors of a model, by Hugging Face name, on one device, as stored (converted to
/// `dtype` when handed out).
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Matrices kept in a GGUF file's blocks (none of them also in `tensors`).
    blocks: HashMap<String, Arc<Blocks>>,
    format: Format,
    source: PathBuf,
    device: Device,
    dtype: DType,
}

impl Weights {
    /// Reads every tensor of the safetensors `files` (the shards of one model), to be
    /// handed out in `dtype`. On the CPU in f32, bf16 and f16 matrices stay in their dtype
    /// (as [`Blocks`]), decoded on the fly by every product.
    pub fn from_safetensors(files: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        let keep_blocks = device.is_cpu() && dtype == DType::F32;
        let mut tensors = HashMap::new();
        let mut blocks = HashMap::new();
        for file in files {
            let in_file = |e: Error| Error::Msg(format!("{}: {e}", file.display()));
            let loaded = candle_core::safetensors::load(file, device).map_err(in_file)?;
            for (name, t) in loaded {
                let kind = match t.dtype() {
                    DType::BF16 => Some(BlockKind::BF16),
                    DType::F16 => Some(BlockKind::F16),
                    _ => None,
                };
                match (keep_blocks, kind, t.dims2()) {
                    (true, Some(kind), Ok((n, k))) => {
                        let mut bytes = Vec::with_capacity(n * k * 2);
                        t.write_bytes(&mut bytes).map_err(in_file)?;
                        let b = Blocks::new(kind, (n, k), bytes).map_err(|e| {
                            Error::Msg(format!("{}: tensor `{name}`: {e}", file.display()))
                        })?;
                        blocks.insert(name, Arc::new(b));
                    }
                    _ => {
                        tensors.insert(name, t);
                    }
                }
            }
        }
        let source = match files {
            [one] => one.clone(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map_or_else(PathBuf::new, Path::to_path_buf),
        };
        Ok(Weights {
            tensors,
            blocks,
            format: Format::Safetensors,
            source,
            device: device.clone(),
            dtype,
        })
    }

    /// Reads every tensor of a GGUF file, renaming llama.cpp's names (`blk.N.attn_q.weight`,
    /// …) to Hugging Face's for `architecture`. On the CPU in f32, matrices in a block type of
    /// [`super::quant::BlockKind`] stay in their blocks; everything else is dequantized.
    /// llama.cpp stores Llama's q and k rows permuted for its rotary layout; `qk_heads`
    /// (query heads, key/value heads) undoes that, as transformers' GGUF loader does.
    /// Tensors are handed out in `dtype`.
    pub fn from_gguf(
        path: &Path,
        content: &gguf_file::Content,
        architecture: &str,
        qk_heads: Option<(usize, usize)>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        let keep_blocks = device.is_cpu() && dtype == DType::F32;
        let mut tensors = HashMap::new();
        let mut blocks = HashMap::new();
        for name in content.tensor_infos.keys() {
            let Some(hf) = hf_name(name, architecture) else {
                continue;
            };
            let in_file =
                |e: Error| Error::Msg(format!("{}: tensor `{name}`: {e}", path.display()));
            let q = content.tensor(&mut file, name, device).map_err(in_file)?;
            let heads = match (qk_heads, name.ends_with(".weight")) {
                (Some((heads, _)), true) if name.contains(".attn_q.") => Some(heads),
                (Some((_, kv_heads)), true) if name.contains(".attn_k.") => Some(kv_heads),
                _ => None,
            };
            if keep_blocks {
                if let Some(b) = Blocks::of_qtensor(&q).map_err(in_file)? {
                    let b = match heads {
                        Some(heads) => {
                            let out = b.dims()[0];
                            b.with_rows(|r| unpermuted_row(r, out, heads))
                        }
                        None => b,
                    };
                    blocks.insert(hf, Arc::new(b));
                    continue;
                }
            }
            let mut t = q.dequantize(device)?;
            if let Some(heads) = heads {
                t = unpermute(&t, heads)?;
            }
            tensors.insert(hf, t);
        }
        Ok(Weights {
            tensors,
            blocks,
            format: Format::Gguf,
            source: path.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.blocks.contains_key(name)
    }

    /// The dtype tensors are handed out in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The tensor `name` in the model's dtype, or an error naming it and the file.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.stored(name)?.to_dtype(self.dtype)
    }

    /// The frozen matrix `name`: its blocks where kept so, else the tensor in the model's
    /// dtype.
    pub fn frozen(&self, name: &str) -> Result<FrozenWeight> {
        match self.blocks.get(name) {
            Some(b) => Ok(FrozenWeight::Blocks(b.clone())),
            None => Ok(FrozenWeight::Tensor(self.tensor(name)?)),
        }
    }

    /// The tensor `name` as stored (blocks dequantized); an error names it and the file
    /// when it is missing or holds no floating-point numbers.
    fn stored(&self, name: &str) -> Result<Tensor> {
        if let Some(b) = self.blocks.get(name) {
            return FrozenWeight::Blocks(b.clone()).to_tensor();
        }
        let t = self.tensors.get(name).cloned().ok_or_else(|| {
            Error::Msg(format!(
                "{}: tensor `{name}` is missing",
                self.source.display()
            ))
        })?;
        if !t.dtype().is_float() {
            return Err(Error::Msg(format!(
                "{}: tensor `{name}` holds {:?}, not floating-point numbers",
                self.source.display(),
                t.dtype()
            )));
        }
        Ok(t)
    }

    /// A norm scale in f32 (norms are computed in f32 whatever the model's dtype).
    pub fn norm(&self, name: &str) -> Result<Tensor> {
        self.stored(name)?.to_dtype(DType::F32)
    }

    /// The linear layer `prefix` (`prefix.weight`, and `prefix.bias` when `bias`), whose
    /// weight must have the shape `[out, in]` the config gives.
    pub fn linear(&self, prefix: &str, bias: bool, [out, inp]: [usize; 2]) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = self.frozen(&name)?;
        if weight.dims() != [out, inp] {
            return Err(Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}; the config gives [{out}, {inp}]",
                self.source.display(),
                weight.dims()
            )));
        }
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    /// A Gemma RMSNorm scale as the forward pass uses it, in f32: `1 + w`.
    pub fn gemma_norm(&self, name: &str) -> Result<Tensor> {
        let w = self.norm(name)?;
        match self.format {
            Format::Safetensors => w + 1.0,
            Format::Gguf => Ok(w),
        }
    }
}

/// The row of a llama.cpp q/k matrix of `out` rows over `heads` heads that [`unpermute`]
/// moves to row `r`.
fn unpermuted_row(r: usize, out: usize, heads: usize) -> usize {
    let width = out / heads;
    let half = width / 2;
    let (head, within) = (r / width, r % width);
    let (t, i) = (within / half, within % half);
    head * width + 2 * i + t
}

/// Undoes llama.cpp's rotary permutation of q/k rows: `[heads, 2, dim/2, in] → [heads,
/// dim/2, 2, in]` read back as `[out, in]`.
fn unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = t.dims2()?;
    let half = out / heads / 2;
    t.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// The Hugging Face name of a llama.cpp tensor name (`None` for tensors the text model
/// does not use).
fn hf_name(gguf: &str, architecture: &str) -> Option<String> {
    let gemma = architecture.starts_with("gemma");
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = simple {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (kind, suffix) = tail.rsplit_once('.')?;
    let module = match kind {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_norm" => "input_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_rows_move_as_the_tensors_unpermutation_moves_them() {
        // 2 heads of 8 rows, each row holding its own index
        let (out, heads) = (16, 2);
        let values: Vec<f32> = (0..out * 3).map(|i| (i / 3) as f32).collect();
        let t = Tensor::from_vec(values, (out, 3), &Device::Cpu).unwrap();
        let moved = unpermute(&t, heads).unwrap().to_vec2::<f32>().unwrap();
        for (r, row) in moved.iter().enumerate() {
            assert_eq!(row[0] as usize, unpermuted_row(r, out, heads), "row {r}");
        }
    }
}
