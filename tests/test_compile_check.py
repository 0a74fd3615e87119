"""The ahead-of-time compile check builds every kernel for sm_80, sm_90 and sm_120 without a GPU,
with the launch configurations the kernels really use, reports registers, spills, shared memory,
occupancy, tensor-core instructions and GEMM counts, and fails on a spill or a kernel too big for
the chip."""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from llamatrain.kernels import AOT_ENV, compile_check

attention_module = importlib.import_module("llamatrain.kernels.attention")
rmsnorm_module = importlib.import_module("llamatrain.kernels.rmsnorm")
runtime = importlib.import_module("llamatrain.kernels._runtime")

KERNELS = {
    "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
    "_rotary_kernel", "_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel", "_cross_entropy_fwd_kernel",
}  # fmt: skip
LIMIT_KB = {80: 163, 90: 227, 120: 99}


@pytest.fixture(scope="module")
def triton_env() -> dict[str, str]:
    """The environment of a fresh compile_check process. Triton's compile cache is the one the
    `make test` line before the tests fills, so the report here reruns only ptxas -v; each
    kernel is still compiled and measured the same way."""
    env = dict(os.environ)
    env.pop(AOT_ENV, None)
    return env


@pytest.fixture(scope="module")
def report(triton_env) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "llamatrain.kernels.compile_check", "--json"],
        env=triton_env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"compile_check: \d+ kernels compiled in [\d.]+ s, 0 failed", done.stderr)
    return json.loads(done.stdout)


def test_every_kernel_compiles_for_each_chip_without_spills_within_shared_memory(report):
    for arch, limit_kb in LIMIT_KB.items():
        rows = [r for r in report if r["arch"] == arch]
        assert {r["kernel"] for r in rows} == KERNELS
        assert {shape for r in rows for shape in r["shapes"]} == {"7B", "70B"}
        for r in rows:
            assert r["ok"] and r["problems"] == [], r
            assert r["shared_limit"] == limit_kb * 1024
            assert r["shared"] <= r["shared_limit"]
            assert 0 < r["registers"] <= 255
            assert r["spill_stores"] == r["spill_loads"] == 0
            assert 0 < r["occupancy"] <= 1
    # Flash attention keeps K/V tiles in shared memory: far more than a row kernel needs.
    assert all(r["shared"] >= 32 * 1024 for r in report if r["kernel"] == "_attn_fwd_kernel")


def test_attention_backward_does_five_gemms_per_block_pair_with_tensor_cores(report):
    def rows(kernel, flag=None):
        return [r for r in report
                if r["kernel"] == kernel and (flag is None or flag in r["config"])]  # fmt: skip

    one_pass = rows("_attn_bwd_dkdv_kernel", "ATOMIC_DQ=True")
    assert {r["arch"] for r in one_pass} == set(LIMIT_KB)
    assert {r["gemms"] for r in one_pass} == {5}  # S, dV, dP, dK, dQ
    deterministic = rows("_attn_bwd_dkdv_kernel", "ATOMIC_DQ=False") + rows("_attn_bwd_dq_kernel")
    assert {(r["kernel"], r["gemms"]) for r in deterministic} == {
        ("_attn_bwd_dkdv_kernel", 4), ("_attn_bwd_dq_kernel", 3)
    }
    assert {r["gemms"] for r in rows("_attn_fwd_kernel")} == {2}
    kinds = {r["arch"]: r["tensor_cores"] for r in rows("_attn_fwd_kernel")}
    assert kinds == {80: "mma", 90: "wgmma", 120: "mma"}
    assert all(r["gemms"] == 0 and r["tensor_cores"] == "-" for r in rows("_swiglu_fwd_kernel"))


def test_table_prints_a_row_per_kernel_with_its_figures():
    r = compile_check.Result(90, "_k", ["7B", "70B"], "BLOCK=8 warps=4 stages=1", shared=2048,
                             registers=40, spill_stores=8, spill_loads=4, occupancy=0.5,
                             tensor_cores="wgmma", gemms=5)  # fmt: skip
    line = compile_check.table_line(r)
    assert line.split()[:9] == ["sm_90", "_k", "7B+70B", "40", "12", "2.0/227", "50%", "wgmma", "5"]
    assert "FAILED: spills registers" in line and not r.ok
    assert compile_check.table_header().split()[:3] == ["arch", "kernel", "shapes"]


def test_occupancy_is_bounded_by_registers_shared_memory_and_threads():
    a100, rtx = runtime.CHIPS[80], runtime.CHIPS[120]
    # 255 registers -> 8192 per warp: 8 warps per SM, one 8-warp block of 64: 1/8.
    assert compile_check.occupancy(a100, 255, 0, 8) == pytest.approx(8 / 64)
    # 32 registers, tiny blocks: threads bound it, full occupancy.
    assert compile_check.occupancy(a100, 32, 0, 4) == 1.0
    # 60 KB of shared memory per block: two blocks fit in 164 KB, one in sm_120's 100 KB.
    assert compile_check.occupancy(a100, 64, 60 * 1024, 4) == pytest.approx(8 / 64)
    assert compile_check.occupancy(rtx, 64, 60 * 1024, 4) == pytest.approx(4 / 48)


def test_heaviest_first_across_heads_keeps_the_gpu_busier_than_head_by_head():
    busy = compile_check.causal_busy
    # 70B at batch 1: 8 kv heads x 64 key blocks of 64 on an A100 (108 SMs, a program each),
    # and of 128 on an H100 (132 SMs): the list-scheduling model, 85% and 63%.
    assert busy(64, 8, 108, heads_first=False) == pytest.approx(0.851, abs=1e-3)
    assert busy(64, 8, 108, heads_first=True) == pytest.approx(0.963, abs=1e-3)
    assert busy(32, 8, 132, heads_first=False) == pytest.approx(0.627, abs=1e-3)
    assert busy(32, 8, 132, heads_first=True) == 1.0
    assert busy(1, 1, 1, heads_first=True) == 1.0  # one program, one slot


def test_balance_lines_report_the_attention_backward_per_arch(report):
    results = [compile_check.Result(**{k: r[k] for k in (
        "arch", "kernel", "shapes", "config", "shared", "registers", "spill_stores",
        "spill_loads", "num_warps", "occupancy", "tensor_cores", "gemms", "error")})
        for r in report]  # fmt: skip
    lines = compile_check.balance_lines(results)
    assert [line.split()[0] for line in lines] == ["sm_80", "sm_90", "sm_120"]
    for line in lines:
        ours, by_head = (float(x) for x in re.findall(r"(\d+)% ", line))
        assert ours >= 90 and ours > by_head  # 96-100% on A100 and H100, 91% on sm_120


def test_gemms_are_counted_once_per_source_dot_through_inlined_calls():
    ttir = "\n".join([
        '%1 = tt.dot %a, %b, %c : x loc(#loc5)',
        '%2 = tt.dot %a, %b, %c : x loc(#loc6)',
        '%3 = tt.dot %d, %e, %f : x loc(#loc7)',
        '#loc1 = loc("k.py":10:4)',
        '#loc2 = loc("k.py":11:4)',
        '#loc3 = loc("k.py":20:8)',
        '#loc4 = loc("k.py":30:8)',
        '#loc5 = loc(callsite(#loc1 at #loc3))',
        '#loc6 = loc(callsite(#loc1 at #loc4))',
        '#loc7 = loc("dq"(#loc2))',
    ])  # fmt: skip
    assert compile_check.count_gemms(ttir) == 2


def test_ptxas_report_is_parsed_for_registers_and_spills():
    report = ("ptxas info    : Function properties for k\n"
              "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
              "ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size")
    assert compile_check.parse_ptxas(report) == (255, 8, 4)


def test_recorded_launches_carry_the_configs_the_launch_code_uses_on_that_gpu():
    launches = compile_check.record_model_launches(compile_check.SHAPES[1], 90)  # 70B, H100
    by_kernel = {}
    for launch in launches:
        by_kernel.setdefault(launch.kernel.__name__, []).append(launch)
    assert set(by_kernel) == KERNELS
    tiles = attention_module.launch_config(128, runtime.chip_target(90), torch.bfloat16)
    (fwd,) = by_kernel["_attn_fwd_kernel"]
    assert (fwd.args["BLOCK_M"], fwd.args["BLOCK_N"], fwd.args["HEAD_DIM"]) == (
        tiles.fwd.block_m, tiles.fwd.block_n, 128
    )
    assert (fwd.options["num_warps"], fwd.options["num_stages"]) == (
        tiles.fwd.num_warps, tiles.fwd.num_stages
    )
    assert fwd.args["group_size"] == 8 and fwd.args["Q"].dtype.is_floating_point
    # Heaviest first across heads: (batch x heads) is the grid's fastest axis.
    assert fwd.grid == (64, 4096 // tiles.fwd.block_m)
    one_pass, deterministic = by_kernel["_attn_bwd_dkdv_kernel"]
    assert one_pass.args["ATOMIC_DQ"] and not deterministic.args["ATOMIC_DQ"]
    assert (one_pass.args["BLOCK_M"], one_pass.args["BLOCK_N"]) == (
        tiles.bwd.block_m, tiles.bwd.block_n
    )
    assert one_pass.grid == (8, 4096 // tiles.bwd.block_n)
    assert (deterministic.args["BLOCK_M"], deterministic.args["BLOCK_N"]) == (
        tiles.dkdv.block_m, tiles.dkdv.block_n
    )
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
att.launch_config = lambda head_dim, target, dtype: att.AttentionConfig(big, big, big, big)
launch = next(l for l in cc.record_model_launches(cc.SHAPES[0], 80)
              if l.kernel.__name__ == "_attn_fwd_kernel")
result = cc.compile_launch(launch, 80)
print(cc.table_line(result))
print("ok" if result.ok else "not ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=triton_env | {AOT_ENV: "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line, verdict = done.stdout.splitlines()[-2:]
    shared_kb = float(re.search(r" ([\d.]+)/163 ", line).group(1))
    assert shared_kb > 163
    assert "FAILED: over the shared memory limit" in line and verdict == "not ok"


def test_compile_check_rejects_unknown_arch(capsys):
    assert compile_check.main(["--arch", "80", "--arch", "70"]) == 2
    assert capsys.readouterr().err.strip() == (
        "compile_check: --arch 70: expected one of [80, 90, 120]"
    )
