"""The device's peak FLOP/s, the denominator of MFU (model FLOPs utilization).

GPUs: the datasheet's dense peak for the precision. CPUs have no datasheet number that means anything here, so
the peak is measured once with a large fp32 matmul at the current thread count and cached in the rafale cache
folder (`cpu_peak.json`), keyed by CPU model, threads and torch version.
"""

import json
import os
import platform
import time
from pathlib import Path

import torch

# dense peak FLOP/s by GPU name fragment and precision (NVIDIA datasheets; SXM parts)
GPU_PEAKS = {
    "H200": {"amp_bf16": 989e12, "amp_fp16": 989e12, "fp32": 67e12},
    "H100": {"amp_bf16": 989e12, "amp_fp16": 989e12, "fp32": 67e12},
    "A100": {"amp_bf16": 312e12, "amp_fp16": 312e12, "fp32": 19.5e12},
    "A10G": {"amp_bf16": 125e12, "amp_fp16": 125e12, "fp32": 31.2e12},
    "L4": {"amp_bf16": 121e12, "amp_fp16": 121e12, "fp32": 30.3e12},
    "V100": {"amp_fp16": 125e12, "fp32": 15.7e12},
}


def gpu_peak_flops(precision: str) -> float | None:
    name = torch.cuda.get_device_name()
    for fragment, peaks in GPU_PEAKS.items():
        if fragment in name:
            return peaks.get(precision)
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(n: int = 2048, repeats: int = 10, rounds: int = 3) -> float:
    """FLOP/s of n x n fp32 matmuls (2 n^3 FLOPs each): the median of `repeats` timings, taken `rounds` times,
    keeping the best round, since other processes on the machine can only slow a probe down (and a low peak
    would inflate every MFU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)  # warm-up
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        medians.append(sorted(times)[len(times) // 2])
    return 2 * n**3 / min(medians)


def cached_cpu_peaks(cache_dir: Path) -> dict:
    try:
        return json.loads((Path(cache_dir) / "cpu_peak.json").read_text())
    except (OSError, ValueError):
        return {}


def cpu_peak_key() -> str:
    return f"{cpu_model()} | threads {torch.get_num_threads()} | torch {torch.__version__}"


def cpu_peak_flops(cache_dir: Path, reprobe: bool = False) -> float:
    key = cpu_peak_key()
    path = Path(cache_dir) / "cpu_peak.json"
    cached = cached_cpu_peaks(cache_dir)
    if reprobe or not isinstance(cached.get(key), float):
        cached[key] = measure_cpu_peak()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)
    return cached[key]


def peak_flops(device: str, precision: str, cache_dir: Path) -> float | None:
    """Peak FLOP/s of this process's device at `precision`, or None for an unknown GPU."""
    if device == "gpu":
        return gpu_peak_flops(precision)
    return cpu_peak_flops(cache_dir)
