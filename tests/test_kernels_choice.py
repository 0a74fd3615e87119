"""kernels.backend = auto times each op's kernel against its PyTorch path on rank 0 and every
rank takes rank 0's choice; train.deterministic and a forced backend decide without timing; an
implementation that fails is not chosen. Timed on a CPU with injected timers."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from llamatrain import ops
from llamatrain.config import load_config
from llamatrain.kernels_choice import OpShapes, choose_kernels

TINY = ["--model.dim=64", "--model.n_layers=1", "--model.n_heads=4", "--model.n_kv_heads=2",
        "--model.vocab_size=96", "--model.multiple_of=32", "--model.max_seq_len=16",
        "--train.seq_len=16", "--train.micro_batch_size=1", "--train.global_batch_tokens=32"]
# What each rank's timer says (ms): rank 0 finds the kernels faster for the norm, SwiGLU and
# attention, PyTorch for rotary and the loss; rank 1 the opposite.
SAYS = {0: {"rms_norm": (1, 2), "swiglu": (1, 2), "rotary": (2, 1), "attention": (1, 3),
            "linear_cross_entropy": (5, 4)},
        1: {"rms_norm": (2, 1), "swiglu": (2, 1), "rotary": (1, 2), "attention": (3, 1),
            "linear_cross_entropy": (4, 5)}}


@pytest.fixture(autouse=True)
def torch_backend_afterwards():
    yield
    ops.set_backend("torch")


def config(*overrides: str):
    return load_config(Path(__file__).parents[1] / "configs/tiny.toml", [*TINY, *overrides])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                           world_size=world)
    calls = []

    def timer(op, impl, call):
        calls.append(op)
        return float(SAYS[rank][op][0 if impl == "triton" else 1])

    choice = choose_kernels(config(), tp=1, device=torch.device("cpu"), dtype=torch.float32,
                            attention_backward="atomic", timer=timer)
    result = {"choice": choice.as_dict(), "calls": calls, "kernel_ops": sorted(ops._kernel_ops)}
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def test_auto_times_on_rank_0_and_every_rank_takes_its_choice(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["calls"] == ["rms_norm"] * 2 + ["swiglu"] * 2 + ["rotary"] * 2 + \
        ["attention"] * 2 + ["linear_cross_entropy"] * 2
    assert results[1]["calls"] == []  # rank 1 only listens
    for r in results:
        choice = r["choice"]
        assert choice["how"] == "timed on rank 0" and choice["resolved"] == "mixed"
        assert {op: choice["ops"][op] for op in SAYS[0]} == {
            "rms_norm": "triton", "swiglu": "triton", "rotary": "torch", "attention": "triton",
            "linear_cross_entropy": "torch"}
        assert choice["timings_ms"]["attention"] == {"triton": 1.0, "torch": 3.0}
        assert r["kernel_ops"] == ["attention", "cross_entropy", "rms_norm", "swiglu"]


def test_deterministic_mode_and_a_forced_backend_decide_without_timing():
    def timer(op, impl, call):
        raise AssertionError("timed")

    cpu = torch.device("cpu")
    det = choose_kernels(config("--train.deterministic=true"), tp=1, device=cpu,
                         dtype=torch.float32, attention_backward="deterministic", timer=timer)
    assert (det.how, det.resolved, det.timings_ms) == ("deterministic", "torch", {})
    forced = choose_kernels(config("--kernels.backend=triton"), tp=1, device=cpu,
                            dtype=torch.float32, attention_backward="atomic", timer=timer)
    assert (forced.how, forced.resolved) == ("forced", "triton")
    assert ops._kernel_ops == set(ops.OPS)
    plain = choose_kernels(config(), tp=1, device=cpu, dtype=torch.float32,
                           attention_backward="atomic")
    assert (plain.how, plain.resolved) == ("no CUDA", "torch") and ops._kernels is None


def test_real_calls_time_every_op_and_a_failing_kernel_is_not_chosen():
    def timer(op, impl, call):
        if (op, impl) == ("attention", "triton"):
            raise RuntimeError("no kernel image is available for execution on the device")
        call()  # the op's real forward and backward at the tiny shapes, in the interpreter
        return 1.0 if impl == "triton" else 2.0

    choice = choose_kernels(config(), tp=1, device=torch.device("cpu"), dtype=torch.float32,
                            attention_backward="atomic", timer=timer)
    assert choice.ops["attention"] == "torch" and choice.ops["rms_norm"] == "triton"
    assert choice.errors == {"attention triton": "RuntimeError: no kernel image is available for "
                                                 "execution on the device"}
    assert choice.as_dict()["timings_ms"]["attention"] == {"triton": None, "torch": 2.0}
    assert "attention torch (inf vs 2 ms)" in choice.summary()


def test_op_shapes_are_the_local_ones_under_tensor_parallelism():
    s = OpShapes.of(config().model, micro_batch_size=2, seq_len=16, tp=2)
    assert (s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_hidden) == (2, 1, 16, 96)
    assert s.loss_op == "cross_entropy"  # the fused loss needs the whole vocabulary
