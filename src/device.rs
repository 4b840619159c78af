//! Choosing the compute device: `cpu` (Burn's flex backend, the default) or a GPU backend
//! compiled in with a cargo feature (`cuda`, `rocm`, `wgpu`, `vulkan`, `metal`).

use anyhow::{Result, bail};
use burn::tensor::Device;

/// Device names accepted by `--device`.
pub(crate) const DEVICE_HELP: &str = "cpu | cuda[:N] | rocm[:N] | wgpu | vulkan | metal (GPU backends need the cargo feature of the same name)";

/// Which of the project's paths tensors on a device take: decided here, once, for every
/// place that chooses between a host fast path and the generic Burn path that the GPU
/// backends run. On the CPU backend (`flex`) tensors are host memory, so host code reads and
/// writes them for free; on a GPU a read is a synchronisation and a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paths {
    /// The kernels of `crate::cpu` run on f32 tensors (LayerNorm, softmax, grouped FFN, fused
    /// Adam, the thin matmul of decoding and its row-major tied head, expert parallelism's
    /// token exchange) and `infer::HostDecoder` decodes.
    pub host_kernels: bool,
    /// `route_on = auto` decides the routing on the host (reading the router's output is free
    /// there); elsewhere on the device.
    pub host_routing: bool,
    /// bf16 weights of a checkpoint stay bf16 (the host kernels widen them as they stream);
    /// elsewhere they are widened to f32 on load.
    pub bf16_weights: bool,
    /// A read of a tensor to the host waits for nothing (no synchronisation to count).
    pub free_reads: bool,
}

impl Paths {
    /// The paths of tensors on `device`.
    pub fn of(device: &Device) -> Self {
        let cpu = is_cpu(device);
        Self {
            host_kernels: cpu,
            host_routing: cpu,
            bf16_weights: cpu,
            free_reads: cpu,
        }
    }
}

/// Whether `device` is the CPU backend (`flex`), with or without autodiff.
fn is_cpu(device: &Device) -> bool {
    // Burn compares devices by hardware: an autodiff device equals its inner device.
    *device == Device::flex()
}

/// Burn's fusion planner as this project sets it on GPU backends (`burn.toml` syntax): the
/// beam search looks at one block of operations at a time. With Burn 0.22.1's default of 5
/// blocks, the planner splits a training step into interleaved blocks whose composition it
/// then often cannot order, and runs such whole segments unfused (the LayerNorm backward, the
/// routing decision): 1,430 kernel launches per step at the reference configuration, against
/// 1,199 with one block (BENCHMARKS.md, lavapipe; 1,231 with 2 blocks, 1,461 with 8).
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
pub(crate) const FUSION_SETTINGS: &str = "[fusion.beam_search]\nmax_blocks = 1\n";

/// A `burn.toml` (or `Burn.toml`) in the working directory or one of its parents: Burn reads
/// it for its settings, and then the project leaves them to it.
#[cfg_attr(not(feature = "gpu-counts"), allow(dead_code))]
pub(crate) fn burn_config_file() -> Option<std::path::PathBuf> {
    file_above(&["burn.toml", "Burn.toml"])
}

/// The first of `names` found in the working directory or one of its parents.
#[cfg_attr(not(feature = "gpu-counts"), allow(dead_code))]
fn file_above(names: &[&str]) -> Option<std::path::PathBuf> {
    let mut dir = std::env::current_dir().ok()?;
    loop {
        if let Some(file) = names.iter().map(|n| dir.join(n)).find(|f| f.is_file()) {
            return Some(file);
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
pub(crate) fn configure_fusion() -> bool {
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

/// Where GPU backends keep compiled kernels and autotune results between processes:
/// `$SWITCH_CACHE_DIR`, else `$XDG_CACHE_HOME/switch-transformer`, else
/// `~/.cache/switch-transformer`, else the temporary directory's `switch-transformer`.
/// (cubecl's own default is `target/environment` under the outermost `Cargo.toml` above the
/// working directory, or the user cache outside a Cargo project: a different place, and so a
/// cold cache, for every checkout and working directory.)
#[cfg_attr(not(feature = "gpu-counts"), allow(dead_code))]
pub(crate) fn kernel_cache_dir() -> std::path::PathBuf {
    cache_dir_from(|name| std::env::var_os(name))
}

/// [`kernel_cache_dir`] from the environment variables `var` gives (empty ones ignored).
#[cfg_attr(not(feature = "gpu-counts"), allow(dead_code))]
fn cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> std::path::PathBuf {
    use std::path::PathBuf;
    let var = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("SWITCH_CACHE_DIR") {
        return dir;
    }
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("switch-transformer")
}

/// Points cubecl's persistent caches (autotune results, compiled kernels) at
/// [`kernel_cache_dir`], with cubecl's `CUBECL_*` environment overrides on top, unless a
/// `cubecl.toml` or `burn.toml` in the working directory or above configures cubecl, or its
/// settings were already read. Says once, on standard error, that kernels are tuned on first
/// use when the cache is empty (a first process on a GPU spends tens of seconds there).
#[cfg(feature = "gpu-counts")]
pub(crate) fn configure_kernel_cache() {
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if burn_config_file().is_some() || file_above(&["cubecl.toml", "CubeCL.toml"]).is_some() {
            return;
        }
        let dir = kernel_cache_dir();
        let cold = std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none());
        let mut config = CubeClRuntimeConfig::default();
        config.environment.path = CacheConfig::Directory(dir.clone());
        if CubeClRuntimeConfig::try_set(config.override_from_env()) && cold {
            tracing::info!(
                "GPU kernels are compiled and autotuned on first use; the results are kept in {} \
                 (set SWITCH_CACHE_DIR to move them), so this first process on the device spends \
                 a while tuning and later ones start in seconds",
                dir.display()
            );
        }
    });
}

/// Whether the `--device` value `spec` names a GPU backend (anything but the CPU's names).
pub fn names_gpu(spec: &str) -> bool {
    !matches!(spec, "cpu" | "flex")
}

/// Parses `cpu`, `cuda`, `cuda:1`, `wgpu`, ... into a device.
///
/// ```
/// use switch_transformer::device::{Paths, parse_device};
///
/// let cpu = parse_device("cpu")?;
/// assert!(Paths::of(&cpu).host_kernels); // the CPU fast paths apply there
/// assert!(parse_device("tpu").is_err());
/// # anyhow::Ok(())
/// ```
pub fn parse_device(spec: &str) -> Result<Device> {
    #[cfg(feature = "gpu")]
    if names_gpu(spec) {
        configure_fusion();
        configure_kernel_cache();
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
    fn the_cpu_backend_takes_every_host_path_with_or_without_autodiff() {
        let host = Paths {
            host_kernels: true,
            host_routing: true,
            bf16_weights: true,
            free_reads: true,
        };
        assert_eq!(Paths::of(&Device::flex()), host);
        assert_eq!(Paths::of(&Device::flex().autodiff()), host);
    }

    #[test]
    fn kernel_cache_dir_follows_the_environment() {
        use std::path::Path;
        let from = |pairs: &[(&str, &str)]| {
            cache_dir_from(|name| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            })
        };
        let all = [
            ("SWITCH_CACHE_DIR", "/s"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(from(&all), Path::new("/s"));
        assert_eq!(
            from(&[
                ("SWITCH_CACHE_DIR", ""),
                ("XDG_CACHE_HOME", "/x"),
                ("HOME", "/h")
            ]),
            Path::new("/x/switch-transformer")
        );
        assert_eq!(
            from(&[("HOME", "/h")]),
            Path::new("/h/.cache/switch-transformer")
        );
        assert_eq!(from(&[]), std::env::temp_dir().join("switch-transformer"));
    }

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
