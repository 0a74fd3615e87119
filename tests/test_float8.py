"""train.float8 on a CPU through torchao's emulation: exactly the block linears converted, losses
that follow bf16's, FSDP2 and tensor parallelism that match one process, checkpoints that resume
either way, the fp8 rate in plan and carbon, and one line for every refusal."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from conftest import REPO, load_benchmark, losses
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

from llamatrain import carbon, ops, plan
from llamatrain.checkpoint.safe_dcp import read_metadata
from llamatrain.config import Config, ModelConfig, TrainConfig, load_config
from llamatrain.convert import checkpoint_to_state_dict
from llamatrain.distributed import float8 as f8
from llamatrain.distributed.parallelize import apply_tp, materialize
from llamatrain.flops import (
    block_flops_per_token,
    float8_flops_per_token,
    float8_params,
    flops_per_token,
)
from llamatrain.hardware import GPUS, gpu, has_fp8, peak_flops
from llamatrain.loss import loss_context, sequence_loss
from llamatrain.model import Transformer

f8.Float8.for_run("tensorwise", torch.device("cpu"))  # torchao ([dev]), without its CPU notices
from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.float8.float8_tensor_parallel import (  # noqa: E402
    Float8ColwiseParallel,
    Float8RowwiseParallel,
    PrepareFloat8ModuleInput,
)

# The runs' model (tests/float8_runs.py): dim 128, FFN 384, every block linear aligned.
ALIGNED = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384,
                      multiple_of=128, max_seq_len=64)
LINEARS = {"attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
           "feed_forward.w2", "feed_forward.w3"}
# Measured on the 2-core CI machine (tests/float8_runs.py, deterministic): over 50 steps the
# float8 losses stay within 0.25% of the unconverted run's (tensorwise 0.24%, rowwise 0.25%), and
# FSDP2 and tp = 2 within 0.21% of one float8 process; the tests allow twice that.
FOLLOWS = 0.005
# Step 1 is the forward of the same weights: one process, FSDP2 (float8 all-gather) and tp = 2
# agreed to 1e-7 relative, while float8 moved it 7e-5 (tensorwise) and 2e-4 (rowwise) off bf16.
SAME_FORWARD = 1e-6
FLOAT8_MOVES = 3e-5


def converted(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}


def test_float8_converts_exactly_the_block_linears_and_keeps_the_parameter_names():
    with torch.device("meta"):
        plain, model = Transformer(ALIGNED), Transformer(ALIGNED)
    names = f8.Float8("tensorwise", emulate=True).convert(model, tp=1, dp_shard=1)
    want = {f"layers.{i}.{name}" for i in range(ALIGNED.n_layers) for name in LINEARS}
    assert set(names) == converted(model) == want
    assert type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in plain.state_dict().items()}
    assert float8_params(ALIGNED) == sum(model.get_submodule(n).weight.numel() for n in names)


def test_linears_whose_shards_are_not_multiples_of_16_stay_unconverted():
    # FFN hidden 344 (multiple_of 8): w1, w2, w3 stay; the attention projections convert.
    cfg = replace(ALIGNED, multiple_of=8)
    assert cfg.ffn_hidden == 344
    with torch.device("meta"):
        model = Transformer(cfg)
    f8.Float8("rowwise", emulate=True).convert(model, tp=1, dp_shard=1)
    assert {n.split(".", 2)[2] for n in converted(model)} == {
        "attention.wq", "attention.wk", "attention.wv", "attention.wo"}
    assert float8_params(cfg) == cfg.n_layers * (2 * 128 * 128 + 2 * 64 * 128)  # wq wo, wk wv
    # Under tensor parallelism it is the shard that must align: wk (64 x 128) split 4 and 8 ways.
    assert f8.eligible("attention.wk", 64, 128, tp=4)
    assert not f8.eligible("attention.wk", 64, 128, tp=8)
    assert not f8.eligible("attention.wo", 128, 64, tp=8)  # row-wise: the input is split
    assert not f8.eligible("output", 384, 128)


def test_tensorwise_on_cuda_takes_torchaos_float8_tp_styles_where_every_reader_converted():
    with torch.device("meta"):
        model = Transformer(replace(ALIGNED, multiple_of=8))  # the FFN stays bf16
    cuda = f8.Float8("tensorwise", emulate=False)
    cuda.convert(model, tp=2, dp_shard=4)
    assert cuda.fsdp_float8_all_gather
    styles = cuda.tp_styles(model.layers["0"])
    assert {k: v for k, v in styles.items() if k != "attention"} == {
        "attention.wq": Float8ColwiseParallel, "attention.wk": Float8ColwiseParallel,
        "attention.wv": Float8ColwiseParallel, "attention.wo": Float8RowwiseParallel}
    prepare = styles["attention"](input_layouts=(Shard(1), None, None), use_local_output=True,
                                  desired_input_layouts=(Replicate(), None, None))
    assert isinstance(prepare, PrepareFloat8ModuleInput)
    assert not prepare.use_local_output  # a DTensor into the float8 linears, as torchtitan
    # Gloo has no float8 dtype, and rowwise gathers in bf16: the plain styles.
    assert f8.Float8("tensorwise", emulate=True).tp_styles(model.layers["0"]) == {}
    rowwise = f8.Float8("rowwise", emulate=False)
    rowwise.convert(model, tp=2, dp_shard=4)
    assert not rowwise.fsdp_float8_all_gather and rowwise.tp_styles(model.layers["0"]) == {}


def test_the_float8_tp_styles_carry_a_forward_and_backward_through_the_blocks():
    # Gloo cannot move float8, torch's fake backend moves nothing at all: the numbers mean
    # nothing here, the float8 DTensors' path through attention and the feed-forward is checked.
    ops.set_backend("torch")
    with plan.fake_world(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        with torch.device("meta"):
            model = Transformer(ALIGNED)
        float8 = f8.Float8("tensorwise", emulate=True)
        float8.convert(model, tp=2, dp_shard=1)
        float8.emulate = False  # the styles of a CUDA run, on emulated matmuls
        assert len(float8.tp_styles(model.layers["0"])) == 9
        apply_tp(model, mesh, float8)
        materialize(model, torch.device("cpu"), seed=0)
        tokens = torch.randint(0, ALIGNED.vocab_size, (2, 64))
        with loss_context(mesh):
            sequence_loss(model(tokens), tokens).backward()
    wq = model.layers["0"].attention.wq
    assert isinstance(wq, Float8Linear) and wq.weight.grad.to_local().shape == (64, 128)


# ---------------------------------------------------------------------------------------------
# Training runs (tests/float8_runs.py): one process, then two under torchrun


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("float8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = [str(REPO / "tests/float8_runs.py"), str(prepared_data), str(out)]
    for launcher in ([sys.executable],
                     [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc-per-node=2"]):
        proc = subprocess.run([*launcher, *script], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Failed to load" not in proc.stderr  # torchao's CUDA-extension notices, on a CPU
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_fifty_float8_steps_follow_the_unconverted_loss(runs, mode):
    got, want = losses(runs / mode), losses(runs / "none")
    assert sorted(got) == sorted(want) == list(range(1, 51))
    assert all(math.isfinite(v) for v in got.values())
    assert max(rel(got[s], want[s]) for s in got) <= FOLLOWS
    assert rel(got[1], want[1]) >= FLOAT8_MOVES  # the matmuls really are float8
    assert got[50] < got[1] / 2
    assert f"float8 {mode}: 7 linears, emulated in fp32 (CPU)" in (runs / f"{mode}.log").read_text()


@pytest.mark.parametrize("name", ["fsdp", "tp"])
def test_fsdp2_and_tensor_parallel_float8_match_one_float8_process(runs, name):
    got, want = losses(runs / name), losses(runs / "short")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert rel(got[1], want[1]) <= SAME_FORWARD
    assert max(rel(got[s], want[s]) for s in got) <= FOLLOWS
    log = (runs / f"{name}.log").read_text()
    gather = ", float8 FSDP all-gather" if name == "fsdp" else ""
    assert f"float8 tensorwise: 7 linears{gather}, emulated in fp32 (CPU)" in log


@pytest.mark.parametrize(("resumed", "source", "steps", "change"), [
    ("fsdp-to-none", "fsdp", range(3, 5), "train.float8 'tensorwise' -> 'none' from this step on"),
    ("none-to-tensorwise", "none", range(41, 51),
     "train.float8 'none' -> 'tensorwise' from this step on")])
def test_a_float8_checkpoint_resumes_without_float8_and_the_reverse(runs, resumed, source, steps,
                                                                    change):
    log = (runs / f"{resumed}.log").read_text()
    assert f"resumed from {runs / resumed}/checkpoints/step-{steps[0] - 1} " in log
    assert change in log
    # From the saved step on, the trajectory the source run took, as float8 follows bf16.
    got, want = losses(runs / resumed), losses(runs / source)
    assert max(rel(got[s], want[s]) for s in steps) <= FOLLOWS


def model_entries(run_dir, step: int) -> dict:
    meta = read_metadata(run_dir / "checkpoints" / f"step-{step}" / ".metadata")
    return {k: (v.properties.dtype, v.size) for k, v in meta.state_dict_metadata.items()
            if k.startswith("model.")}


def test_float8_checkpoints_hold_the_tensors_of_bf16_ones_under_the_same_names(runs):
    plain = model_entries(runs / "none", 50)
    assert len(plain) == len(Transformer(replace(ALIGNED, n_layers=1)).state_dict())
    assert model_entries(runs / "fsdp", 4) == plain  # float8 all-gather weights, 2 ranks
    assert model_entries(runs / "tp", 4) == plain
    assert model_entries(runs / "none-to-tensorwise", 50) == plain
    assert all(dtype == torch.float32 for dtype, _ in plain.values())


def test_convert_and_evaluate_read_a_float8_checkpoint_as_a_bf16_one(runs):
    state, cfg = checkpoint_to_state_dict(runs / "fsdp/checkpoints/step-4")
    start, _ = checkpoint_to_state_dict(runs / "fsdp/checkpoints/step-2")
    plain = Transformer(cfg).state_dict()
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == \
        {k: (v.shape, v.dtype) for k, v in plain.items()}
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not torch.equal(state["layers.0.attention.wq.weight"],
                           start["layers.0.attention.wq.weight"])


# ---------------------------------------------------------------------------------------------
# Accounting: the fp8 rate of the converted linears in plan and carbon


def test_flops_split_into_the_converted_linears_and_the_rest():
    cfg = load_config(REPO / "configs/llama2_70b.toml").model
    linear, rest = float8_flops_per_token(cfg, 4096)
    assert linear + rest == flops_per_token(cfg, 4096)
    # 6 x the block linears' 64.9B parameters; the output projection and attention stay bf16.
    assert linear == 6 * 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    assert float8_params(cfg, tp=8) == float8_params(cfg)


def test_the_gpus_with_an_fp8_peak_are_the_ones_of_sm89_and_newer():
    for g in GPUS:
        if g.peak_tflops:  # the RTX 5090 has no dense peaks in the table at all
            assert ("fp8" in g.peak_tflops) == has_fp8(g.arch), g.key
    assert not has_fp8(80) and has_fp8(89) and has_fp8(90)


def test_step_model_runs_the_converted_linears_at_the_fp8_peak():
    cfg = load_config(REPO / "configs/llama2_70b.toml", ["--parallel.tp=8"])
    layout = plan.Layout(1, 256, 8, "full", 1)
    h100 = gpu("h100-80gb")

    def step(mode: str) -> dict:
        c = replace(cfg, train=replace(cfg.train, float8=mode))
        return plan.step_model(c, layout, num_gpus=2048, gpus_per_node=8, device=h100, mfu=0.45,
                               fabric=plan.FABRICS["ib"], link_gbps=200.0)

    bf16, rowwise, tensorwise = step("none"), step("rowwise"), step("tensorwise")
    linear, rest = float8_flops_per_token(cfg.model, 4096, tp=8)
    tokens = cfg.train.global_batch_tokens / 2048
    # Model FLOPs, and the forward of every block that full checkpointing recomputes (a third
    # of the blocks' FLOPs), each at the rate of its linears.
    blocks = cfg.model.n_layers * block_flops_per_token(cfg.model, 4096)
    for x, fp8 in ((bf16, 989e12), (rowwise, 1979e12)):
        assert x["compute_s"] - x["recompute_s"] == pytest.approx(
            tokens * (linear / fp8 + rest / 989e12) / 0.45)
        assert x["recompute_s"] == pytest.approx(
            tokens * (linear / fp8 + (blocks - linear) / 989e12) / 3 / 0.45)
    assert tensorwise["compute_s"] == rowwise["compute_s"]
    # Tensorwise all-gathers the converted weights in one byte instead of two.
    ag = {r: next(c for c in x["collectives"] if c["kind"] == "all-gather")["bytes"]
          for r, x in (("none", bf16), ("rowwise", rowwise), ("tensorwise", tensorwise))}
    assert ag["rowwise"] == ag["none"]
    saved = 2 * 255 / 256 * float8_params(cfg.model, tp=8) / 8  # 2 gathers, 1 byte less each
    assert ag["none"] - ag["tensorwise"] == pytest.approx(saved)


def test_carbon_projects_float8_tokens_per_s_and_keeps_mfu_against_bf16():
    def project(mode: str) -> dict:
        cfg = load_config(REPO / "configs/llama2_70b.toml",
                          ["--parallel.tp=8", f"--train.float8={mode}"])
        return carbon.project(carbon.Plan(config=cfg, tokens=2e12, num_gpus=2048,
                                          device="h100", mfu=0.45))

    bf16, fp8 = project("none"), project("rowwise")
    cfg = load_config(REPO / "configs/llama2_70b.toml").model
    linear, rest = float8_flops_per_token(cfg, 4096, tp=8)
    fp8_peak, bf16_peak = (peak_flops(gpu("h100").name, d) for d in ("fp8", "bf16"))
    assert (fp8_peak, bf16_peak) == (1979e12, 989e12)  # NVIDIA's data sheet: about 2 x
    speedup = (linear + rest) / (linear * bf16_peak / fp8_peak + rest)
    assert 1.7 < speedup < 1.9  # the linears are most of the 70B's FLOPs, not all
    assert fp8["tokens_per_s_per_gpu"] == pytest.approx(bf16["tokens_per_s_per_gpu"] * speedup)
    assert fp8["compute_mfu"] == 0.45 and fp8["mfu"] == pytest.approx(0.45 * speedup)
    assert fp8["gpu_hours"] == pytest.approx(bf16["gpu_hours"] / speedup)
    assert "float8 rowwise: 45.0% of each peak" in carbon.format_projection(fp8)


def test_plan_prints_the_float8_step_beside_the_bf16_one(capsys):
    cfg = Config(model=replace(ALIGNED, n_layers=1), train=TrainConfig(
        seq_len=64, micro_batch_size=1, global_batch_tokens=64 * 8, float8="tensorwise",
        warmup_steps=1, steps=2))
    result = plan.plan(cfg, plan.Setup(8, device="h200"), search=False)
    text = plan.format_result(result)
    chosen = result["requested"]
    assert chosen["bf16"]["compute_s"] > chosen["compute_s"]
    assert "float8 tensorwise: the block linears at 45% of the fp8 peak" in text
    assert f"float8 tensorwise: step {chosen['step_s']:.2f} s" in text
    assert "FSDP parameters (bf16, float8 linears)" in text


# ---------------------------------------------------------------------------------------------
# Refusals, one line each


@pytest.mark.parametrize("argv", [
    ["llamatrain.plan", "--config", "configs/llama2_70b.toml", "--gpus", "2048",
     "--device", "a100-80gb", "--train.float8=rowwise"],
    ["llamatrain.carbon", "project", "--config", "configs/llama2_70b.toml", "--tokens", "2e12",
     "--gpus", "2048", "--device", "a100", "--parallel.tp=2", "--train.float8=rowwise"]])
def test_plan_and_carbon_refuse_float8_on_an_a100_in_one_line(argv):
    main = importlib.import_module(argv[0]).main
    with pytest.raises(ValueError) as e:
        main(argv[1:])
    assert str(e.value) == (
        "train.float8 = 'rowwise': NVIDIA A100-SXM4-80GB (sm_80) has no float8 tensor cores "
        "(they need sm_89 or newer: L4, H100, H200, B200); use train.float8 = 'none'")


def test_float8_on_a_gpu_below_sm89_is_refused_and_on_hopper_never_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100 80GB PCIe")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"^train.float8 = 'tensorwise': NVIDIA A100 80GB PCIe "
                                         r"\(sm_80\) has no float8 tensor cores"):
        f8.Float8.for_run("tensorwise", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert f8.Float8.for_run("rowwise", torch.device("cuda", 0)).emulate is False
    assert f8.Float8.for_run("rowwise", torch.device("cpu")).emulate is True
    assert f8.Float8.for_run("none", torch.device("cuda", 0)) is None


def test_float8_without_torchao_is_one_line_from_the_trainer(tmp_path):
    # torchao made unimportable in the trainer's process, as on an install without the extra.
    code = ("import sys; sys.modules['torchao'] = None; sys.argv[1:] = " + json.dumps(
        ["--config", "configs/tiny.toml", f"--run.dir={tmp_path}", "--train.float8=tensorwise"])
        + "; from llamatrain.config import run_cli; from llamatrain.train import main; "
        "run_cli(main)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.strip().splitlines() == [
        "error: train.float8 = 'tensorwise': torchao is not installed (pip install "
        "'llamatrain[float8]')"]
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# make bench's float8 row


def test_the_bench_float8_row_is_skipped_on_a_cpu_with_its_reason_and_renders_on_a_gpu():
    train, run = load_benchmark("train"), load_benchmark("run")
    skipped = train.float8_rows("configs/tiny.toml", [], 4)
    assert skipped == {"skipped": "no GPU (on a CPU float8 is emulated: numerics, not speed)"}
    assert run.float8_markdown(skipped) == [
        "## Float8 training", "", f"Skipped: {skipped['skipped']}.", ""]
    assert train.format_float8(skipped) == [f"float8: skipped: {skipped['skipped']}"]
    assert run.float8_markdown({"error": "RuntimeError: boom"})[2] == "Failed: RuntimeError: boom."
    rows = {"steps": 10, "compiled": True, "rows": [
        {"float8": "none", "tokens_per_s_per_device": 1000.0, "vs_bf16": 1.0, "loss": 4.5,
         "mfu": 0.4},
        {"float8": "rowwise", "tokens_per_s_per_device": 1400.0, "vs_bf16": 1.4, "loss": 4.51,
         "mfu": 0.56}]}
    table = run.float8_markdown(rows)
    assert "| float8 rowwise | 1,400 | 1.40x | 4.5100 | 56.0% |" in table
    assert train.format_float8(rows)[2].split() == [
        "float8", "rowwise", "1,400", "tokens/s", "per", "device", "(1.40x", "bf16),", "loss",
        "4.5100,", "MFU", "56.0%"]
