"""The device's peak FLOP/s, the denominator of MFU (model FLOPs utilization).

GPUs: the datasheet's dense peak for the precision. CPUs have no datasheet number that means anything here, so
the peak is measured once with matmuls in the dtype the model computes in (fp32, or bf16 where rafale's CPU
autocast runs) at the current thread count, and cached in the rafale cache folder (`cpu_peak.json`), keyed by CPU
model, threads, torch version, dtype and the probe's version. The probe keeps the fastest of many short timings:
other processes can only slow a matmul down, and a peak measured low makes every MFU high (8.95 GFLOP/s probed on
a busy machine once gave MFUs of 62-228%).

`keep_freed_memory` asks glibc's malloc to reuse freed memory instead of handing it back to the OS every step.

A run that computes faster than its peak says the peak is wrong (or the FLOPs count): `check_peak` probes the CPU
again (the console's per-step MFU, rafale.run.loggers.CheckedSpeedMonitor) and `confirm_peak` also rewrites the cache
entry (the end-of-run summary); where the run is still above the peak, MFU is unavailable, said in one line.
"""

import ctypes
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

TFLOPS = 1e12

# Dense peak FLOP/s (no 2:4 sparsity) per precision, from NVIDIA's datasheets. amp_bf16/amp_fp16 are the tensor
# core figures with FP32 accumulation (what torch uses); fp32 is the non-tensor FP32 figure. Each key is a regular
# expression matched against the whole normalised device name (see `normalise_gpu_name`), so an L40S never takes
# the L4's row nor an H100 PCIe the SXM's. A GPU missing here has no peak, and MFU is not reported for it.
GPU_PEAKS = {
    # H100 datasheet: SXM 989 / PCIe 756 / NVL 835 BF16 TFLOPS (1,979 / 1,513 / 1,671 "with sparsity"); FP32 67 / 51 / 60
    r"h100( sxm5?)?( 80gb)?( hbm3)?": {"amp_bf16": 989 * TFLOPS, "amp_fp16": 989 * TFLOPS, "fp32": 67 * TFLOPS},
    r"h100 pcie( 80gb)?": {"amp_bf16": 756 * TFLOPS, "amp_fp16": 756 * TFLOPS, "fp32": 51 * TFLOPS},
    r"h100 nvl": {"amp_bf16": 835 * TFLOPS, "amp_fp16": 835 * TFLOPS, "fp32": 60 * TFLOPS},
    # H200 datasheet: SXM 989 / NVL 835 BF16 TFLOPS (1,979 / 1,671 with sparsity); FP32 67 / 60
    r"h200( sxm)?( 141gb)?( hbm3e)?": {"amp_bf16": 989 * TFLOPS, "amp_fp16": 989 * TFLOPS, "fp32": 67 * TFLOPS},
    r"h200 nvl": {"amp_bf16": 835 * TFLOPS, "amp_fp16": 835 * TFLOPS, "fp32": 60 * TFLOPS},
    # A100 datasheet (SXM and PCIe, 40 and 80 GB alike): BF16 312 TFLOPS (624 with sparsity); FP32 19.5
    r"a100( (sxm4|pcie|\d+gb))*": {"amp_bf16": 312 * TFLOPS, "amp_fp16": 312 * TFLOPS, "fp32": 19.5 * TFLOPS},
    # A10 datasheet: BF16 125 TFLOPS (250 with sparsity); FP32 31.2. (The A10G has no public datasheet: not listed.)
    r"a10": {"amp_bf16": 125 * TFLOPS, "amp_fp16": 125 * TFLOPS, "fp32": 31.2 * TFLOPS},
    # L4 datasheet: BF16 121 TFLOPS (242 with sparsity); FP32 30.3
    r"l4": {"amp_bf16": 121 * TFLOPS, "amp_fp16": 121 * TFLOPS, "fp32": 30.3 * TFLOPS},
    # L40S datasheet: BF16 362 TFLOPS (733 with sparsity); FP32 91.6
    r"l40s": {"amp_bf16": 362 * TFLOPS, "amp_fp16": 362 * TFLOPS, "fp32": 91.6 * TFLOPS},
    # L40 datasheet: BF16 181 TFLOPS (362 with sparsity); FP32 90.5
    r"l40": {"amp_bf16": 181 * TFLOPS, "amp_fp16": 181 * TFLOPS, "fp32": 90.5 * TFLOPS},
    # V100 datasheet: SXM2 125 / PCIe 112 FP16 tensor TFLOPS; FP32 15.7 / 14 (no bf16)
    r"v100 sxm2( \d+gb)?": {"amp_fp16": 125 * TFLOPS, "fp32": 15.7 * TFLOPS},
    r"v100 pcie( \d+gb)?": {"amp_fp16": 112 * TFLOPS, "fp32": 14 * TFLOPS},
    # T4 datasheet: FP16 tensor 65 TFLOPS; FP32 8.1 (no bf16)
    r"t4": {"amp_fp16": 65 * TFLOPS, "fp32": 8.1 * TFLOPS},
    # Ada whitepaper (RTX 4090): FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS (330.3 with sparsity); FP32 82.6
    r"rtx 4090": {"amp_bf16": 165.2 * TFLOPS, "amp_fp16": 165.2 * TFLOPS, "fp32": 82.6 * TFLOPS},
    # Ampere GA102 whitepaper (RTX 3090): FP16/BF16 tensor with FP32 accumulate 35.6 TFLOPS (71 with sparsity); FP32 35.6
    r"rtx 3090": {"amp_bf16": 35.6 * TFLOPS, "amp_fp16": 35.6 * TFLOPS, "fp32": 35.6 * TFLOPS},
}


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next step instead of returning it to the OS: by default a
    block above a threshold (128 KB, raised as big blocks are freed) is mapped and unmapped each time and the heap's
    top is trimmed, so each training step page-faults its activations in anew. In the default job (pythia-tiny,
    T=128, B=16, fp32, one thread, Intel Xeon) that was about 9,000 page faults a step and 6% of its time; with
    this, 600 (bench/bench.py --default-malloc compares). Blocks above 32 MB, glibc's most, are still mapped.
    The process keeps its peak memory until it exits. Linux with glibc only; elsewhere nothing changes. Returns
    whether it applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def normalise_gpu_name(name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'a100 sxm4 80gb': lower case, dashes as spaces, vendor and brand words dropped."""
    words = re.sub(r"[-_]", " ", name.lower()).split()
    return " ".join(w for w in words if w not in ("nvidia", "tesla", "geforce"))


def gpu_peaks_of(name: str) -> dict | None:
    """The datasheet peaks {precision: FLOP/s} of the GPU torch.cuda.get_device_name() calls `name`, or None."""
    normalised = normalise_gpu_name(name)
    for pattern, peaks in GPU_PEAKS.items():
        if re.fullmatch(pattern, normalised):
            return peaks
    return None


def gpu_peak_flops(precision: str, name: str | None = None) -> float | None:
    """Dense peak FLOP/s of the GPU (this process's when `name` is None) at `precision`, or None with a note
    when the GPU or the precision is not in GPU_PEAKS."""
    name = name or torch.cuda.get_device_name()
    peak = (gpu_peaks_of(name) or {}).get(precision)
    if peak is None:
        print(f"rafale: no datasheet peak for '{name}' at {precision} in rafale/run/hardware.py GPU_PEAKS; MFU is unavailable")
    return peak


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Matrix sides the probe multiplies, each timed many times: the fastest side depends on the dtype and the
# machine (on this project's EPYC, one thread: fp32 about the same at every side, ~100 GFLOP/s; bf16 477 GFLOP/s
# at 512, 412 at 2048), and a short matmul is more likely than a long one to run while no other process does.
PROBE_SIZES = (512, 1024, 2048)
PROBE_ROUND_S = 0.25  # a round of timings of one side stops after this long (but times `repeats` at most)
PROBE_VERSION = 2  # in the cache key: peaks cached by the median-of-long-timings probe (version 1) are probed again


def measure_cpu_peak(n: int | None = None, repeats: int = 20, rounds: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the fastest single n x n matmul in `dtype` (2 n^3 FLOPs): `rounds` rounds, a short pause apart,
    of up to `repeats` timings (PROBE_ROUND_S at most) for each side (n, or each of PROBE_SIZES). The maximum over
    all timings, not a median: other processes on the machine can only slow a timing down, never speed it up."""
    best = 0.0
    for side in (n,) if n else PROBE_SIZES:
        a, b = torch.randn(side, side, dtype=dtype), torch.randn(side, side, dtype=dtype)
        torch.mm(a, b)  # warm-up: the first call of a shape allocates and packs
        for round_ in range(rounds):
            if round_:
                time.sleep(0.02)  # another moment of the other processes' load
            round_end = time.perf_counter() + PROBE_ROUND_S
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(a, b)
                end = time.perf_counter()
                best = max(best, 2 * side**3 / (end - start))
                if end >= round_end:
                    break
    return best


def cached_cpu_peaks(cache_dir: Path) -> dict:
    try:
        return json.loads((Path(cache_dir) / "cpu_peak.json").read_text())
    except (OSError, ValueError):
        return {}


def cpu_peak_key(dtype: torch.dtype = torch.float32) -> str:
    key = f"{cpu_model()} | threads {torch.get_num_threads()} | torch {torch.__version__} | probe {PROBE_VERSION}"
    return key if dtype == torch.float32 else f"{key} | {str(dtype).removeprefix('torch.')}"


def write_cpu_peak(cache_dir: Path, dtype: torch.dtype, peak: float) -> None:
    """Set this machine's cached peak of `dtype` in cpu_peak.json (written aside and renamed: other runs read it)."""
    path = Path(cache_dir) / "cpu_peak.json"
    cached = cached_cpu_peaks(cache_dir)
    cached[cpu_peak_key(dtype)] = float(peak)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=2))
    tmp.replace(path)


def cpu_peak_flops(cache_dir: Path, reprobe: bool = False, dtype: torch.dtype = torch.float32) -> float:
    """The cached CPU peak of `dtype`, probed (and cached) when there is none or `reprobe` asks."""
    cached = cached_cpu_peaks(cache_dir).get(cpu_peak_key(dtype))
    if reprobe or not isinstance(cached, float):
        cached = measure_cpu_peak(dtype=dtype)
        write_cpu_peak(cache_dir, dtype, cached)
    return cached


def peak_flops(device: str, precision: str, cache_dir: Path, cpu_dtype: torch.dtype | None = None) -> float | None:
    """Peak FLOP/s of this process's device at `precision`, or None for an unknown GPU. On a CPU, the probed
    peak of `cpu_dtype`'s matmuls (the model's own autocast dtype; None: fp32)."""
    if device == "gpu":
        return gpu_peak_flops(precision)
    return cpu_peak_flops(cache_dir, dtype=cpu_dtype or torch.float32)


def check_peak(achieved_flops_per_s: float, peak: float | None, device: str, cpu_dtype: torch.dtype | None = None,
               cache_dir: Path | None = None) -> float | None:
    """The peak to divide `achieved_flops_per_s` (a run's FLOP/s per device) by, given the `peak` it was measured
    against: `peak` itself when the run stayed at or below it, or None when there is none.

    A run above its peak means the peak or the FLOPs count is wrong. On a CPU the probe may have run while the
    machine was busy, so it is probed again (the best of the old and the new probe; with `cache_dir`, written to
    its cpu_peak.json), one line says so, and the new peak is returned if the run is below it. Otherwise (and
    always on a GPU, whose datasheet peak cannot be beaten) the line says that MFU is unavailable, and None."""
    if not peak or achieved_flops_per_s <= peak:
        return peak or None
    achieved = f"{achieved_flops_per_s / 1e9:,.1f} GFLOP/s"
    if device == "gpu":
        print(f"rafale: MFU unavailable: the run computed {achieved} per GPU, above the datasheet peak of "
              f"{peak / 1e9:,.0f} GFLOP/s (rafale/run/hardware.py GPU_PEAKS); the model's FLOPs count must be wrong")
        return None
    dtype = cpu_dtype or torch.float32
    new = max(peak, measure_cpu_peak(dtype=dtype))
    where = ""
    if cache_dir is not None:
        write_cpu_peak(cache_dir, dtype, new)
        where = f", now in {Path(cache_dir) / 'cpu_peak.json'}"
    still_above = achieved_flops_per_s > new
    verdict = ("; MFU unavailable: the run is faster still, so the peak or the model's FLOPs count (flops_per_token) "
               "is wrong") if still_above else ""
    name = str(dtype).removeprefix("torch.")
    print(f"rafale: the run computed {achieved}, above the CPU's {name} matmul peak of {peak / 1e9:,.1f} GFLOP/s "
          f"(probed while the machine was busy?); probed again: {new / 1e9:,.1f} GFLOP/s{where}{verdict}")
    return None if still_above else new


def confirm_peak(achieved_flops_per_s: float, device: str, precision: str, cache_dir: Path,
                 cpu_dtype: torch.dtype | None = None) -> float | None:
    """The peak a run's MFU is against, once the run has measured `achieved_flops_per_s` per device: what
    `peak_flops` gives (the cached probe on a CPU) when the run stayed below it; when the run went faster, the CPU
    is probed again, cpu_peak.json rewritten, and the new peak returned, or None (MFU unavailable) if the run is
    still above it. Each case that is not the plain one prints one line (see check_peak)."""
    return check_peak(achieved_flops_per_s, peak_flops(device, precision, cache_dir, cpu_dtype), device, cpu_dtype,
                      cache_dir if device != "gpu" else None)


def machine_load() -> tuple[float, int] | None:
    """(the 1-minute load average, the machine's cores), or None where the system has no load average. A load above
    the cores means other processes share them: tokens/s and MFU are then lower than the machine alone gives."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None


def describe_load(load: float, cores: int) -> str:
    """'load 5.3 on 2 cores' (to put next to tokens/s and MFU); '' when the load is not above the cores."""
    return f"load {load:.1f} on {cores} cores" if load > cores else ""
