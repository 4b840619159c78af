"""The machine a benchmark ran on, as the reports name it: the CPU's model and its SIMD flags."""

import platform
import subprocess


def cpu_name():
    try:
        return next(
            l.split(":", 1)[1].strip()
            for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if l.startswith("Model name")
        )
    except Exception:
        return platform.processor() or "unknown CPU"


def cpu_flags():
    """The first CPU's flags from /proc/cpuinfo, or None where it cannot be read."""
    try:
        return open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    except Exception:
        return None


def simd_flags():
    have = cpu_flags()
    if have is None:
        return "unknown"
    keep = [f for f in have if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return ", ".join(sorted(set(keep))) or "no AVX2"


def machine_label():
    """The CPU's name and whether it has AVX-512: a report's heading, so that one model of CPU
    with and without it (AMD EPYC) keeps a section each in BENCHMARKS.md."""
    have = cpu_flags()
    if have is None:
        return cpu_name()
    return f"{cpu_name()} {'with' if 'avx512f' in have else 'without'} AVX-512"
