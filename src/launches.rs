//! What a step costs a GPU besides arithmetic: kernel launches (each a round trip through the
//! driver; Burn's fusion merges element-wise chains into one) and host-device synchronisations
//! (the host waits for every queued kernel: the pipeline drains).
//!
//! ```text
//! launches: cubecl's launch observer, every kernel issued on a cubecl device (GPU builds)
//! syncs:    counted here, at each read of a tensor back to the host and each explicit device
//!           sync this crate makes on a GPU backend (the same count on lavapipe and on a real
//!           GPU; none on the CPU backend, whose tensors are host memory)
//! ```
//! [`Counts::now`] reads both; the difference of two readings is what happened in between (on
//! every thread of the process).

use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::Device;

static SYNCS: AtomicU64 = AtomicU64::new(0);

/// Launches and syncs of this process so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Kernels issued on cubecl devices (0 without a GPU feature, or before
    /// [`count_launches`] is called).
    pub launches: u64,
    /// Host-device synchronisations: tensor reads to the host and explicit syncs, off the CPU
    /// backend.
    pub syncs: u64,
}

impl Counts {
    /// The counts so far.
    pub(crate) fn now() -> Self {
        Self {
            launches: gpu::launches(),
            syncs: SYNCS.load(Ordering::Relaxed),
        }
    }

    /// What happened since `earlier`.
    pub(crate) fn since(self, earlier: Self) -> Self {
        Self {
            launches: self.launches - earlier.launches,
            syncs: self.syncs - earlier.syncs,
        }
    }
}

/// Starts counting kernel launches (once per process; a no-op without a GPU feature).
/// Counting costs one atomic add per launch.
pub(crate) fn count_launches() {
    gpu::install();
}

/// Notes a read of a tensor on `device` to the host: a synchronisation, except on the CPU
/// backend (eager: its tensors are host memory, a read waits for nothing).
pub(crate) fn note_read(device: &Device) {
    if !crate::device::Paths::of(device).free_reads {
        SYNCS.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(feature = "gpu-counts")]
mod gpu {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, OnceLock};

    use cubecl_runtime::logging::{LaunchObservation, LaunchObserver};

    static LAUNCHES: AtomicU64 = AtomicU64::new(0);
    static OBSERVATION: OnceLock<LaunchObservation> = OnceLock::new();

    struct Count;

    /// `SWITCH_LAUNCH_NAMES=1`: every kernel's name to standard error as it launches
    /// (`LAUNCH <name>`), to see which ops a step's launches come from.
    fn print_names() -> bool {
        static PRINT: OnceLock<bool> = OnceLock::new();
        *PRINT.get_or_init(|| std::env::var_os("SWITCH_LAUNCH_NAMES").is_some())
    }

    impl LaunchObserver for Count {
        fn launched(&self, kernel: &'static str) {
            LAUNCHES.fetch_add(1, Ordering::Relaxed);
            if print_names() {
                eprintln!("LAUNCH {kernel}");
            }
        }
    }

    pub(crate) fn install() {
        OBSERVATION.get_or_init(|| LaunchObservation::new(Arc::new(Count)));
    }

    pub(crate) fn launches() -> u64 {
        LAUNCHES.load(Ordering::Relaxed)
    }
}

#[cfg(not(feature = "gpu-counts"))]
mod gpu {
    pub(crate) fn install() {}

    pub(crate) fn launches() -> u64 {
        0
    }
}

// Without a GPU feature every tensor of a test process is on the CPU backend.
#[cfg(all(test, not(feature = "gpu-counts")))]
mod tests {
    use super::*;

    /// No thread adds to the count: every tensor is on the CPU backend.
    #[test]
    fn the_cpu_backend_never_waits() {
        let before = Counts::now();
        for d in [Device::flex(), Device::flex().autodiff()] {
            note_read(&d);
        }
        assert_eq!(Counts::now().since(before), Counts::default());
    }
}
