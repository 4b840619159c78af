//! Choosing the compute device: `cpu` (Burn's flex backend, the default) or a GPU backend
//! compiled in with a cargo feature (`cuda`, `rocm`, `wgpu`, `vulkan`, `metal`).

use anyhow::{Result, bail};
use burn::tensor::Device;

/// Device names accepted by `--device`.
pub const DEVICE_HELP: &str = "cpu | cuda[:N] | rocm[:N] | wgpu | vulkan | metal (GPU backends need the cargo feature of the same name)";

/// Whether `device` is the CPU backend (`flex`), with or without autodiff.
pub fn is_cpu(device: &Device) -> bool {
    // Burn compares devices by hardware: an autodiff device equals its inner device.
    *device == Device::flex()
}

/// Parses `cpu`, `cuda`, `cuda:1`, `wgpu`, ... into a device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (name, index) = match spec.split_once(':') {
        Some((n, i)) => {
            let Ok(i) = i.parse::<usize>() else {
                bail!("device `{spec}`: the index after `:` must be a number");
            };
            (n, i)
        }
        None => (spec, 0),
    };
    let missing = |feature: &str| -> Result<Device> {
        bail!(
            "device `{spec}` needs the `{feature}` backend, which this binary was built without: \
             rebuild with `cargo build --release --features {feature}`"
        )
    };
    let _ = index;
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        "cuda" => {
            #[cfg(feature = "cuda")]
            return Ok(Device::cuda(index));
            #[cfg(not(feature = "cuda"))]
            return missing("cuda");
        }
        "rocm" => {
            #[cfg(feature = "rocm")]
            return Ok(Device::rocm(index));
            #[cfg(not(feature = "rocm"))]
            return missing("rocm");
        }
        "wgpu" => {
            #[cfg(any(feature = "wgpu", feature = "wgpu-unfused"))]
            return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
            #[cfg(not(any(feature = "wgpu", feature = "wgpu-unfused")))]
            return missing("wgpu");
        }
        "vulkan" => {
            #[cfg(feature = "vulkan")]
            return Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice));
            #[cfg(not(feature = "vulkan"))]
            return missing("vulkan");
        }
        "metal" => {
            #[cfg(feature = "metal")]
            return Ok(Device::metal(burn::tensor::DeviceKind::DefaultDevice));
            #[cfg(not(feature = "metal"))]
            return missing("metal");
        }
        _ => bail!("unknown device `{spec}`; use one of: {DEVICE_HELP}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_errors() {
        parse_device("cpu").unwrap();
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device `tpu`"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("must be a number"), "{e}");
        #[cfg(not(feature = "cuda"))]
        {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
