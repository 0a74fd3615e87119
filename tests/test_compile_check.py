"""The ahead-of-time compile check builds every kernel for sm_80 and sm_90 without a GPU, with
the launch configurations the kernels really use, and fails on a kernel too big for the chip."""

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from llamatrain.kernels import AOT_ENV, compile_check

attention_module = importlib.import_module("llamatrain.kernels.attention")
rmsnorm_module = importlib.import_module("llamatrain.kernels.rmsnorm")

KERNELS = {
    "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
    "_rotary_kernel", "_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel", "_cross_entropy_fwd_kernel",
}  # fmt: skip
LINE = re.compile(
    r"^sm_(?P<arch>\d+)\s+(?P<kernel>\w+)\s+(?P<shapes>\S+)\s.*shared (?P<shared>[\d.]+)/"
    r"(?P<limit>\d+) KB\s+regs (?P<regs>\d+)\s+stack (?P<stack>\d+) B\s+ok$"
)


@pytest.fixture(scope="module")
def triton_env(tmp_path_factory) -> dict[str, str]:
    """Triton's compile cache in a temp dir (not ~/.triton), shared by this module's tests."""
    cache = tmp_path_factory.mktemp("triton-cache")
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
    env.pop(AOT_ENV, None)
    return env


def test_every_kernel_compiles_for_a100_and_h100_within_shared_memory(triton_env):
    done = subprocess.run(
        [sys.executable, "-m", "llamatrain.kernels.compile_check", "--arch", "80", "--arch", "90"],
        env=triton_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("sm_")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), "\n".join(line for line, m in zip(lines, matches, strict=True) if not m)
    for arch, limit_kb in ((80, 163), (90, 227)):
        rows = [m for m in matches if int(m["arch"]) == arch]
        assert {m["kernel"] for m in rows} == KERNELS
        shapes = {shape for m in rows for shape in m["shapes"].split("+")}
        assert shapes == {"7B", "70B"}
        for m in rows:
            assert int(m["limit"]) == limit_kb
            assert float(m["shared"]) <= limit_kb
            assert 0 < int(m["regs"]) <= 255
    # Flash attention keeps K/V tiles in shared memory: far more than a row kernel needs.
    attn_fwd = [m for m in matches if m["kernel"] == "_attn_fwd_kernel"]
    assert all(float(m["shared"]) >= 32 for m in attn_fwd)
    assert re.search(r"compile_check: \d+ kernels compiled in [\d.]+ s, 0 failed", done.stdout)


def test_recorded_launches_carry_the_configs_the_launch_code_uses_on_that_gpu():
    launches = compile_check.record_model_launches(compile_check.SHAPES[1], 90)  # 70B, H100
    by_kernel = {}
    for launch in launches:
        by_kernel.setdefault(launch.kernel.__name__, []).append(launch)
    assert set(by_kernel) == KERNELS
    tiles = attention_module.launch_config(128, 90, torch.bfloat16)
    (fwd,) = by_kernel["_attn_fwd_kernel"]
    assert (fwd.args["BLOCK_M"], fwd.args["BLOCK_N"], fwd.args["HEAD_DIM"]) == (
        tiles.fwd.block_m, tiles.fwd.block_n, 128
    )
    assert (fwd.options["num_warps"], fwd.options["num_stages"]) == (
        tiles.fwd.num_warps, tiles.fwd.num_stages
    )
    assert fwd.args["group_size"] == 8 and fwd.args["Q"].dtype.is_floating_point
    (dkdv,) = by_kernel["_attn_bwd_dkdv_kernel"]
    assert (dkdv.args["BLOCK_M"], dkdv.args["BLOCK_N"]) == (tiles.dkdv.block_m, tiles.dkdv.block_n)
    block_n, warps = rmsnorm_module.launch_config(8192)
    assert {(launch.args["BLOCK_N"], launch.options["num_warps"])
            for launch in by_kernel["_rms_norm_fwd_kernel"]} == {(block_n, warps)}  # fmt: skip
    assert block_n == 8192


def test_kernel_over_the_chips_shared_memory_fails_the_check(triton_env):
    # 512-key tiles of K and V, 128 KB each in bf16, cannot fit in sm_80's 163 KB.
    script = """
import importlib
from llamatrain.kernels import compile_check as cc
att = importlib.import_module("llamatrain.kernels.attention")
big = att.TileConfig(16, 512, 4, 2)
att.launch_config = lambda head_dim, arch, dtype: att.AttentionConfig(big, big, big)
launch = next(l for l in cc.record_model_launches(cc.SHAPES[0], 80)
              if l.kernel.__name__ == "_attn_fwd_kernel")
result = cc.compile_launch(launch, 80)
print(result.line())
print("ok" if result.ok else "not ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=triton_env | {AOT_ENV: "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line, verdict = done.stdout.splitlines()[-2:]
    shared_kb = float(re.search(r"shared ([\d.]+)/163 KB", line).group(1))
    assert shared_kb > 163
    assert line.endswith("FAILED: over the shared memory limit") and verdict == "not ok"


def test_compile_check_rejects_unknown_arch(capsys):
    assert compile_check.main(["--arch", "80", "--arch", "70"]) == 2
    assert capsys.readouterr().err.strip() == "compile_check: --arch 70: expected one of [80, 90]"
