"""The one table of GPUs: a device found by its --device key or by the name CUDA reports, and
its peaks, power and SM limits as the data sheets give them."""

import pytest

from llamatrain import hardware


@pytest.mark.parametrize("name, key", [
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", "a100-pcie"),
    ("NVIDIA A100-PCIE-40GB", "a100-pcie"),
    ("NVIDIA H100 80GB HBM3", "h100-80gb"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200-141gb"),
    ("NVIDIA H200 NVL", "h200-nvl"),
    ("NVIDIA GeForce RTX 5090", "rtx-5090"),
])
def test_a_device_name_finds_its_most_specific_row(name, key):
    assert hardware.from_name(name).key == key


def test_peak_flops_are_the_data_sheets_dense_figures():
    assert hardware.peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert hardware.peak_flops("NVIDIA H200", "torch.bfloat16") == 989e12
    assert hardware.peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert hardware.peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == 19.5e12
    # fp8 runs at twice bf16 on Hopper; an A100 has no fp8 tensor cores.
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", "fp8") == 1979e12
    assert hardware.peak_flops("NVIDIA H200", "fp8") == 1979e12
    assert hardware.peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert hardware.peak_flops("cpu", "bf16") is None
    assert hardware.peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None


def test_unknown_dtype_names_the_value():
    with pytest.raises(ValueError, match="dtype = 'int8'"):
        hardware.peak_flops("a100", "int8")


def test_power_is_the_tdp_or_a_stated_fallback():
    assert hardware.tdp_watts("NVIDIA A100-SXM4-80GB") == 400.0
    assert hardware.tdp_watts("NVIDIA A100 80GB PCIe") == 300.0
    assert hardware.tdp_watts("NVIDIA H100 80GB HBM3") == 700.0
    assert hardware.tdp_watts("NVIDIA H200 NVL") == 600.0
    assert hardware.tdp_watts("cuda") == hardware.UNKNOWN_GPU_W
    assert hardware.tdp_watts("cpu") == hardware.CPU_W
    assert not hardware.is_gpu("cpu") and hardware.is_gpu("cuda")


def test_a_device_key_or_its_prefix_selects_a_planner_row():
    assert hardware.gpu("a100").key == "a100-80gb"
    assert hardware.gpu("H100").key == "h100-80gb"
    assert hardware.gpu("h200-141gb").memory_gib == 141.0
    with pytest.raises(ValueError, match="device = 'v100': expected one of a100-80gb"):
        hardware.gpu("v100")


def test_the_kernels_check_each_arch_against_its_gpu():
    assert {a: g.key for a, g in hardware.BY_ARCH.items()} == {
        80: "a100-80gb", 90: "h100-80gb", 120: "rtx-5090"}
    assert hardware.BY_ARCH[90].sm.shared_memory_per_block == 227 * 1024
    assert hardware.BY_ARCH[80].num_sms == 108 and hardware.BY_ARCH[90].num_sms == 132
