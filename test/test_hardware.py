"""GPU peaks: real device names (as torch.cuda.get_device_name() spells them) get their own datasheet row; and the
CPU memory settings rafale makes (freed memory kept, huge pages for big tensors) take effect."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from rafale.run.hardware import TFLOPS, gpu_peak_flops, gpu_peaks_of

# (device name, dense bf16 peak in TFLOP/s; None: no bf16 tensor cores or no datasheet)
DEVICES = [
    ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A10", 125),
    ("NVIDIA L4", 121),
    ("NVIDIA L40S", 362),
    ("NVIDIA L40", 181),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 35.6),
    ("Tesla T4", None),
    ("Tesla V100-SXM2-16GB", None),
]


@pytest.mark.parametrize("name,bf16", DEVICES)
def test_gpu_peak_of_real_device_names(name, bf16):
    peaks = gpu_peaks_of(name)
    assert peaks is not None, name
    if bf16 is None:
        assert "amp_bf16" not in peaks
    else:
        assert peaks["amp_bf16"] == pytest.approx(bf16 * TFLOPS)


def test_fp16_and_fp32_peaks_of_older_cards():
    assert gpu_peak_flops("amp_fp16", "Tesla T4") == pytest.approx(65 * TFLOPS)
    assert gpu_peak_flops("fp32", "Tesla V100-PCIE-32GB") == pytest.approx(14 * TFLOPS)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA H20", "NVIDIA L4X", "AMD Instinct MI300X", "NVIDIA B200"])
def test_unknown_gpu_has_no_peak_and_says_mfu_is_unavailable(name, capsys):
    assert gpu_peaks_of(name) is None
    assert gpu_peak_flops("amp_bf16", name) is None
    assert "MFU is unavailable" in capsys.readouterr().out


def test_precision_without_tensor_cores_has_no_peak(capsys):
    assert gpu_peak_flops("amp_bf16", "Tesla T4") is None
    assert "MFU is unavailable" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# CPUs: the peak is probed in the dtype the model's matmuls run in


def test_cpu_peak_is_probed_and_cached_per_dtype(tmp_path, monkeypatch):
    import torch

    from rafale.run import hardware

    probed = []
    peaks = {torch.float32: 1e9, torch.bfloat16: 3e9}
    monkeypatch.setattr(hardware, "measure_cpu_peak", lambda dtype: probed.append(dtype) or peaks[dtype])
    assert hardware.peak_flops("cpu", "fp32", tmp_path) == 1e9
    assert hardware.peak_flops("cpu", "fp32", tmp_path, torch.bfloat16) == 3e9  # rafale's own bf16 autocast
    assert hardware.peak_flops("cpu", "fp32", tmp_path, torch.bfloat16) == 3e9
    assert hardware.peak_flops("cpu", "fp32", tmp_path) == 1e9
    assert probed == [torch.float32, torch.bfloat16]  # once each, then from cpu_peak.json
    assert set(hardware.cached_cpu_peaks(tmp_path)) == {hardware.cpu_peak_key(), hardware.cpu_peak_key(torch.bfloat16)}


def test_the_probe_multiplies_in_the_dtype_asked(monkeypatch):
    import torch

    from rafale.run import hardware

    seen = set()
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: seen.add((a.dtype, b.dtype)) or real_mm(a, b))
    assert hardware.measure_cpu_peak(n=64, repeats=2, rounds=1, dtype=torch.bfloat16) > 0
    assert seen == {(torch.bfloat16, torch.bfloat16)}


def test_a_bf16_run_reports_mfu_against_the_bf16_peak(tmp_path, cache_dir, capsys, monkeypatch):
    """A run that autocasts itself to bf16 on a CPU divides by the bf16 probe, not the fp32 one."""
    import json

    import torch

    from conftest import run_in_process, write_config
    from rafale.run import hardware, trainer_parts

    monkeypatch.setattr(trainer_parts, "cpu_has_fast_bf16", lambda: True)  # emulated bf16 where the CPU lacks it: still bf16
    cached = cache_dir / "cpu_peak.json"  # the session's cache: other tests read it, so it is restored below
    before = cached.read_text() if cached.exists() else None
    # peaks no 2-core CPU reaches on this model (so the run never probes again): 10 TFLOP/s bf16, 1e30 fp32
    fake = {hardware.cpu_peak_key(): 1e30, hardware.cpu_peak_key(torch.bfloat16): 1e13}
    cached.write_text(json.dumps(hardware.cached_cpu_peaks(cache_dir) | fake))
    cfg = write_config(tmp_path / "cfg.yaml", run={"output_dir": str(tmp_path / "runs"), "name": "bf16-mfu"},
                       training={"precision": "amp_bf16", "max_duration": "4ba", "eval_interval": "4ba",
                                 "save_interval": "4ba"})
    try:
        code, out, err = run_in_process(["-c", str(cfg)], capsys, monkeypatch)
        assert code in (0, None), err
        summary = json.loads((tmp_path / "runs" / "bf16-mfu" / "summary.json").read_text())
    finally:
        cached.write_text(before) if before is not None else cached.unlink()
    flops_per_token = summary["mfu"] * 1e13 / summary["tokens_per_s"]
    # the debug model's ~6N FLOPs per token, within a factor of 100; against the fp32 entry (1e30) it would be
    # ~1e-15, 21 orders of magnitude smaller
    assert 6 * summary["parameters"] / 100 < flops_per_token < 6 * summary["parameters"] * 100


STEP_FAULTS = """
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
applied = None
if sys.argv[1] == "keep":
    from rafale.run.hardware import keep_freed_memory
    applied = keep_freed_memory()
def step():  # a training step's activations: a few blocks of some MB, written, then freed
    blocks = [libc.malloc(8 << 20) for _ in range(3)]
    for b in blocks:
        libc.memset(b, 1, 8 << 20)
    for b in blocks:
        libc.free(b)
for _ in range(3):
    step()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_stops_each_step_from_page_faulting_anew():
    """What `rafale -c` sets before training (rafale.run.hardware.keep_freed_memory): with glibc's defaults, the same
    24 MB freed and allocated again each step is handed back to the OS and page-faults anew (6,112 faults a step
    here); kept, it is reused (each side in a fresh process). The effect on training steps: bench/bench.py
    --default-malloc."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
        applied, per_step = out.stdout.split()
        return applied, float(per_step)

    (_, default), (applied, kept) = faults("default"), faults("keep")
    assert applied == "True"
    assert default > 3000 and kept < 100, (default, kept)


HUGE_PAGES_PROBE = """
import os, resource, sys
import rafale.main as cli

def probe(argv):  # a command, as `rafale <command>` runs it
    assert "torch" not in sys.modules  # the setting is in place before torch's first allocation
    print(os.environ.get("THP_MEM_ALLOC_ENABLE"))
    import torch
    x = torch.empty(0)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.ones(16 << 20)  # 64 MB: above glibc's mapping threshold, mapped and faulted in each time
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5)
    return 0

cli.COMMANDS["probe"] = (probe, "")
cli.main(["probe"])
"""


def test_rafale_commands_put_big_tensors_on_huge_pages():
    """`rafale` sets torch's THP_MEM_ALLOC_ENABLE before torch is imported (rafale/main.py): a 64 MB tensor is then
    faulted in by huge pages (tens of faults, not 16,384), where the system has transparent huge pages on."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], capture_output=True, text=True, env=env, check=True)
    setting, faults = out.stdout.split()
    assert setting == "1"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" not in thp.read_text():
        assert float(faults) < 4096, faults  # 16,384 pages of 4 KB without huge pages
