//! A GPU process as a user meets it (`SWITCH_TEST_DEVICE=wgpu` on lavapipe in CI; on the CPU
//! only what must not happen there): the first process on a device says that kernels are tuned
//! and where they are kept, a later one finds them there; results printed before the process
//! ends without the GPU libraries' teardown (`exit_now`) still arrive whole.

use std::path::Path;
use std::process::{Command, Output};

use crate::common;

fn switch(args: &[&str], cwd: &Path, cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switch"))
        .args(args)
        .current_dir(cwd)
        .env("SWITCH_CACHE_DIR", cache)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the switch binary")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_kernel_cache_persists_between_processes() {
    let device = std::env::var("SWITCH_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let tmp = common::temp_dir("gpu-cache");
    let cache = tmp.join("kernels");
    let args = [
        "--device",
        &device,
        "bench",
        "--json",
        "--routing",
        "256,2048",
        "--steps",
        "2",
    ];
    let first = switch(&args, &tmp, &cache);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert_eq!(json_lines(&first).len(), 2, "every result line arrives");
    let note = "autotuned on first use";
    if device == "cpu" {
        // The CPU backend compiles nothing: no note, no cache.
        assert!(!stderr.contains(note), "{stderr}");
        assert!(!cache.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
        return;
    }
    assert!(
        stderr.contains(note) && stderr.contains(&*cache.to_string_lossy()),
        "the first process names the cache: {stderr}"
    );
    let entries = std::fs::read_dir(&cache).map_or(0, |d| d.count());
    assert!(entries > 0, "nothing written to {}", cache.display());
    let second = switch(&args, &tmp, &cache);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(!stderr.contains(note), "the cache was found: {stderr}");
    assert_eq!(json_lines(&second).len(), 2);
    std::fs::remove_dir_all(&tmp).unwrap();
}
