//! Will a model fit? The memory a model needs in f32 is estimated from its files' headers
//! before any weight is read, and loading is refused when the machine has less available.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{ModelError, Result};

/// Extra room over the weights for activations, the KV cache and the allocator.
const HEADROOM: f64 = 1.3;

/// Parameters stored in safetensors `files`, read from their headers.
pub fn safetensors_parameters(files: &[PathBuf]) -> Result<u64> {
    let mut total = 0u64;
    for file in files {
        let bad = |message: String| ModelError::File {
            path: file.clone(),
            message,
        };
        let mut f = std::fs::File::open(file).map_err(|source| ModelError::Io {
            path: file.clone(),
            source,
        })?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|_| bad("truncated: no safetensors header".into()))?;
        let len = u64::from_le_bytes(len);
        if len > 100_000_000 {
            return Err(bad(
                "not a safetensors file (header length is implausible)".into()
            ));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header)
            .map_err(|_| bad("truncated safetensors header".into()))?;
        let header: Value = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("bad safetensors header: {e}")))?;
        for (name, info) in header.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let shape = info.get("shape").and_then(Value::as_array);
            total += shape
                .map(|dims| dims.iter().filter_map(Value::as_u64).product::<u64>())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Memory available to a new allocation, from `/proc/meminfo` (`None` where unknown).
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Fails with a clear message when `parameters` in f32 (plus headroom) exceed the memory
/// available; `path` names the model in the message.
pub fn check_fits(path: &Path, parameters: u64) -> Result<()> {
    let needed = (parameters as f64 * 4.0 * HEADROOM) as u64;
    match available_bytes() {
        Some(available) if needed > available => Err(ModelError::File {
            path: path.to_path_buf(),
            message: format!(
                "needs about {:.1} GiB in f32 ({:.2} B parameters) but only {:.1} GiB is available",
                gib(needed),
                parameters as f64 / 1e9,
                gib(available)
            ),
        }),
        _ => Ok(()),
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
