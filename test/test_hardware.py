"""GPU peaks: real device names (as torch.cuda.get_device_name() spells them) get their own datasheet row."""

import pytest

from rafale.hardware import TFLOPS, gpu_peak_flops, gpu_peaks_of

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
