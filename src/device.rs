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

/// Burn's fusion planner as this project sets it on GPU backends (`burn.toml` syntax): the
/// beam search looks at one block of operations at a time. With Burn 0.22.1's default of 5
/// blocks, the planner splits a training step into interleaved blocks whose composition it
/// then often cannot order, and runs such whole segments unfused (the LayerNorm backward, the
/// routing decision): 1,430 kernel launches per step at the reference configuration, against
/// 1,199 with one block (BENCHMARKS.md, lavapipe; 1,231 with 2 blocks, 1,461 with 8).
pub const FUSION_SETTINGS: &str = "[fusion.beam_search]\nmax_blocks = 1\n";

/// A `burn.toml` (or `Burn.toml`) in the working directory or one of its parents: Burn reads
/// it for its settings, and then the project leaves them to it.
pub fn burn_config_file() -> Option<std::path::PathBuf> {
    let mut dir = std::env::current_dir().ok()?;
    loop {
        for name in ["burn.toml", "Burn.toml"] {
            if dir.join(name).is_file() {
                return Some(dir.join(name));
            }
        }
        if !dir.pop() {
            return None;
        }
    }
}

/// Applies [`FUSION_SETTINGS`] to Burn (with its `BURN_FUSION_*` environment overrides on top)
/// before the first GPU operation, unless a `burn.toml` is found ([`burn_config_file`]) or
/// Burn's settings were already read. Returns whether they were applied. Burn reads its
/// settings once per process, so this runs when a GPU device is parsed.
#[cfg(feature = "gpu")]
pub fn configure_fusion() -> bool {
    use burn_std::config::RuntimeConfig;
    static APPLIED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *APPLIED.get_or_init(|| {
        if burn_config_file().is_some() {
            return false;
        }
        let config: burn::BurnConfig =
            toml::from_str(FUSION_SETTINGS).expect("FUSION_SETTINGS is valid burn.toml");
        burn::BurnConfig::try_set(config.override_from_env())
    })
}

/// Parses `cpu`, `cuda`, `cuda:1`, `wgpu`, ... into a device.
pub fn parse_device(spec: &str) -> Result<Device> {
    #[cfg(feature = "gpu")]
    if !matches!(spec, "cpu" | "flex") {
        configure_fusion();
    }
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
