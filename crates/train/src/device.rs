//! Choosing the compute device at run time (`--device`). Only this crate picks devices.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A backend the `--device` flag can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// Burn's pure-Rust CPU backend (always compiled in).
    Flex,
    /// wgpu (Vulkan/Metal/DX12); `wgpu-cpu` asks for a software adapter such as Mesa lavapipe.
    Wgpu {
        /// Whether to ask for the CPU (software) adapter.
        cpu_adapter: bool,
    },
    /// CUDA device `index`.
    Cuda {
        /// Device index.
        index: usize,
    },
    /// The deprecated ndarray backend.
    Ndarray,
}

impl DeviceChoice {
    /// The names `--device` accepts.
    pub const NAMES: &'static str = "flex, wgpu, wgpu-cpu, cuda, cuda:N, ndarray";

    /// Builds the device, or says which Cargo feature the binary lacks.
    pub fn device(self) -> Result<Device, String> {
        match self {
            Self::Flex => Ok(Device::flex()),
            Self::Wgpu { cpu_adapter } => wgpu_device(cpu_adapter),
            Self::Cuda { index } => cuda_device(index),
            Self::Ndarray => ndarray_device(),
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device(cpu_adapter: bool) -> Result<Device, String> {
    use burn::tensor::DeviceKind;
    Ok(Device::wgpu(if cpu_adapter {
        DeviceKind::Cpu
    } else {
        DeviceKind::DefaultDevice
    }))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(_: bool) -> Result<Device, String> {
    Err(
        "this efformer was built without wgpu: rebuild with `--features wgpu` (on by default)"
            .into(),
    )
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device, String> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_: usize) -> Result<Device, String> {
    Err("this efformer was built without CUDA: rebuild with `cargo build --release -p train --features cuda`".into())
}

#[cfg(feature = "ndarray")]
fn ndarray_device() -> Result<Device, String> {
    Ok(Device::ndarray())
}

#[cfg(not(feature = "ndarray"))]
fn ndarray_device() -> Result<Device, String> {
    Err("this efformer was built without ndarray (deprecated upstream): rebuild with `--features ndarray`".into())
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flex" | "cpu" => Ok(Self::Flex),
            "wgpu" => Ok(Self::Wgpu { cpu_adapter: false }),
            "wgpu-cpu" => Ok(Self::Wgpu { cpu_adapter: true }),
            "cuda" => Ok(Self::Cuda { index: 0 }),
            "ndarray" => Ok(Self::Ndarray),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(index)) => Ok(Self::Cuda { index }),
                _ => Err(format!(
                    "unknown device `{s}`: expected one of {}",
                    Self::NAMES
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flex => f.write_str("flex"),
            Self::Wgpu { cpu_adapter: false } => f.write_str("wgpu"),
            Self::Wgpu { cpu_adapter: true } => f.write_str("wgpu-cpu"),
            Self::Cuda { index } => write!(f, "cuda:{index}"),
            Self::Ndarray => f.write_str("ndarray"),
        }
    }
}

/// The wgpu CPU-adapter device for the wgpu leg of the test suite, per `EFFORMER_WGPU_TESTS`:
/// unset or `off` → `None` (skip); `on` → the device if an adapter answers, else `None`;
/// `require` → the device, panicking if no adapter answers.
///
/// # Panics
/// With `require` when no wgpu CPU adapter (e.g. Mesa lavapipe) is installed.
pub fn wgpu_test_device() -> Option<Device> {
    use std::sync::OnceLock;
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();

    let setting = std::env::var("EFFORMER_WGPU_TESTS").unwrap_or_default();
    if !matches!(setting.as_str(), "on" | "require") {
        eprintln!("wgpu leg skipped: set EFFORMER_WGPU_TESTS=on (cargo xtask test does)");
        return None;
    }
    let probe = PROBE.get_or_init(|| {
        std::panic::catch_unwind(|| {
            let device = wgpu_device(true)?;
            let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device);
            let sum = t.sum().into_scalar::<f32>();
            if sum == 3.0 {
                Ok(())
            } else {
                Err(format!("wgpu CPU adapter computed 1 + 2 = {sum}"))
            }
        })
        .unwrap_or_else(|_| Err("no wgpu CPU adapter (install mesa-vulkan-drivers)".into()))
    });
    match (probe, setting.as_str()) {
        (Ok(()), _) => wgpu_device(true).ok(),
        (Err(e), "require") => panic!("EFFORMER_WGPU_TESTS=require: {e}"),
        (Err(e), _) => {
            eprintln!("wgpu leg skipped: {e}");
            None
        }
    }
}
