//! Where a model's weights and activations live and in which precision: the CPU in f32 by
//! default, or a CUDA GPU (in a build with the `cuda` feature) in bf16. LoRA weights, the
//! optimizer state, attention softmax, norms and log-probabilities stay f32 whatever the
//! placement.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use candle_core::{DType, Device};

/// A device and the dtype of the frozen weights and activations on it.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Where the tensors live.
    pub device: Device,
    /// The dtype of the frozen weights and of the activations (f32 or bf16).
    pub dtype: DType,
}

/// The placement `model(…)` uses when its options name none: set once by `rlvr run --device`.
static DEFAULT: RwLock<Option<(String, Option<String>)>> = RwLock::new(None);

/// One device per CUDA ordinal, so every model on `cuda:N` shares a context and its tensors
/// can meet in one operation.
static CUDA_DEVICES: Mutex<Option<HashMap<usize, Device>>> = Mutex::new(None);

impl Placement {
    /// The CPU in f32.
    pub fn cpu() -> Self {
        Placement {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// The placement named by `device` (`cpu`, `cuda` or `cuda:N`) and `dtype` (`f32`,
    /// `bf16`; when absent, f32 on the CPU and bf16 on a GPU).
    pub fn parse(device: &str, dtype: Option<&str>) -> Result<Self, String> {
        let device = parse_device(device)?;
        let dtype = match dtype {
            None if device.is_cpu() => DType::F32,
            None => DType::BF16,
            Some("f32") => DType::F32,
            Some("bf16") => DType::BF16,
            Some(other) => {
                return Err(format!(
                    "dtype `{other}` is not supported; use \"f32\" or \"bf16\""
                ))
            }
        };
        Ok(Placement { device, dtype })
    }

    /// The placement of `device` and `dtype` where given; what is not given comes from
    /// [`Placement::set_default`] (its dtype only along with its device), else the CPU in f32.
    pub fn chosen(device: Option<&str>, dtype: Option<&str>) -> Result<Self, String> {
        let default = DEFAULT.read().expect("placement lock").clone();
        match (device, default) {
            (Some(device), _) => Placement::parse(device, dtype),
            (None, Some((device, default_dtype))) => {
                Placement::parse(&device, dtype.or(default_dtype.as_deref()))
            }
            (None, None) => Placement::parse("cpu", dtype),
        }
    }

    /// Makes `device` and `dtype` what `model(…)` uses when its options name none, after
    /// checking they can be had.
    pub fn set_default(device: &str, dtype: Option<&str>) -> Result<(), String> {
        Placement::parse(device, dtype)?;
        *DEFAULT.write().expect("placement lock") =
            Some((device.to_string(), dtype.map(str::to_string)));
        Ok(())
    }
}

/// `cpu`, `cuda` (ordinal 0) or `cuda:N`.
fn parse_device(name: &str) -> Result<Device, String> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                format!("device `{name}` is not known; use \"cpu\", \"cuda\" or \"cuda:N\"")
            })?,
    };
    cuda_device(ordinal)
}

/// The CUDA device `ordinal`, created on first use.
fn cuda_device(ordinal: usize) -> Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "device `cuda:{ordinal}`: this rlvr was built without CUDA support; build it with \
             scripts/build-cuda.sh (README, section \"GPU\")"
        ));
    }
    let mut devices = CUDA_DEVICES.lock().expect("device lock");
    let devices = devices.get_or_insert_with(HashMap::new);
    if let Some(device) = devices.get(&ordinal) {
        return Ok(device.clone());
    }
    // cudarc panics when it cannot load the driver library: turn that into an error, with
    // the panic hook silenced meanwhile so that the error is reported once, without a trace
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let created = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    let created = created
        .map_err(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("device `cuda:{ordinal}`: the CUDA driver could not be loaded: {why}")
        })?
        .map_err(|e| format!("device `cuda:{ordinal}`: {e}"))?;
    devices.insert(ordinal, created.clone());
    Ok(created)
}

/// The most memory a CUDA device's tensors took at once since the device was created, in
/// MiB, as its driver memory pool (from which candle allocates) recorded it: in use by
/// tensors at once, and held by the pool at once. Neither counts the CUDA context or
/// cuBLAS's workspace.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct GpuPeak {
    /// Peak bytes in use by tensors, MiB (as torch's `max_memory_allocated`).
    pub used_mib: f64,
    /// Peak bytes the pool held, MiB (as torch's `max_memory_reserved`).
    pub reserved_mib: f64,
}

/// The peak memory of `device` (after waiting for its queued work); `None` on the CPU, in a
/// build without CUDA, or where the driver allocates without a memory pool.
pub fn gpu_peak(device: &Device) -> Option<GpuPeak> {
    #[cfg(feature = "cuda")]
    {
        cuda_pool_peak(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// The high-water marks of the default memory pool of `device`'s GPU: cudarc allocates
/// with `cuMemAllocAsync` (from that pool) where the device supports pools.
#[cfg(feature = "cuda")]
fn cuda_pool_peak(device: &Device) -> Option<GpuPeak> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(cuda) = device else {
        return None;
    };
    device.synchronize().ok()?;
    let stream = cuda.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return None;
    }
    context.bind_to_thread().ok()?;
    // SAFETY: the device handle belongs to a live context, and each attribute read is a u64
    let pool = unsafe { result::device::get_default_mem_pool(context.cu_device()) }.ok()?;
    let read = |attribute: sys::CUmemPool_attribute| -> Option<f64> {
        let mut bytes: u64 = 0;
        unsafe {
            result::mem_pool::get_attribute(pool, attribute, (&mut bytes as *mut u64).cast())
        }
        .ok()?;
        Some(bytes as f64 / (1024.0 * 1024.0))
    };
    Some(GpuPeak {
        used_mib: read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        reserved_mib: read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_defaults_follow_the_device() {
        let p = Placement::parse("cpu", None).unwrap();
        assert!(p.device.is_cpu());
        assert_eq!(p.dtype, DType::F32);
        assert_eq!(
            Placement::parse("cpu", Some("bf16")).unwrap().dtype,
            DType::BF16
        );
        let err = Placement::parse("cpu", Some("f8")).unwrap_err();
        assert!(err.contains("`f8`"), "{err}");
        let err = Placement::parse("tpu", None).unwrap_err();
        assert!(err.contains("`tpu`") && err.contains("cuda:N"), "{err}");
        let err = Placement::parse("cuda:x", None).unwrap_err();
        assert!(err.contains("`cuda:x`"), "{err}");
    }

    #[test]
    fn the_cpu_has_no_gpu_peak() {
        assert_eq!(gpu_peak(&Device::Cpu), None);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cuda_device_without_the_feature_is_a_clear_error() {
        let err = Placement::parse("cuda:0", Some("bf16")).unwrap_err();
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(err.contains("build-cuda.sh"), "{err}");
    }
}
