"""The kernels as the model uses them: a whole tiny Llama with the Triton kernels equals it with
the PyTorch ops, eagerly and for a training step sharded by FSDP2 over two gloo processes; and
on a machine without CUDA, importing the kernels switches Triton's interpreter on by itself."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from kernel_helpers import DEVICE, assert_close

from llamatrain import ops
from llamatrain.config import ModelConfig
from llamatrain.kernels import AOT_ENV
from llamatrain.model import Transformer

# head_dim 32 with GQA 4:2, FFN hidden 352: small enough for the interpreter, nothing round.
CFG = ModelConfig(
    dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64
)


@pytest.fixture(autouse=True)
def torch_backend_afterwards():
    yield
    ops.set_backend("torch")


def batch(seed: int, batch_size: int = 2, seq: int = 37, device: str = DEVICE
          ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (batch_size, seq + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    targets[0, :5] = -100  # a masked prompt, as in SFT
    return tokens[:, :-1].to(device), targets.to(device)


def forward_backward(backend: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    assert ops.set_backend(backend, DEVICE) == backend
    model = Transformer(CFG, seed=0).to(DEVICE)
    tokens, targets = batch(seed=0)
    logits = model(tokens)
    loss = ops.cross_entropy(logits, targets)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_tiny_model_forward_and_backward_with_triton_equal_torch():
    logits, loss, grads = forward_backward("triton")
    ref_logits, ref_loss, ref_grads = forward_backward("torch")
    assert_close(logits, ref_logits, 1e-4, "logits")
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-4, f"grad of {name}")


def test_tiny_model_fused_residual_and_loss_with_triton_equal_unfused_torch_within_1e5():
    # Triton: every residual add inside an RMSNorm kernel, output projection + loss fused in
    # chunks; torch: the reference ops, each residual add and the logits on their own.
    tokens, targets = batch(seed=2)
    losses, grads = {}, {}
    for backend, fused in (("triton", True), ("torch", False)):
        ops.set_backend(backend, DEVICE)
        model = Transformer(CFG, seed=0, fuse_residual=fused).to(DEVICE)
        loss = model(tokens, targets) if fused else ops.cross_entropy_ref(model(tokens), targets)
        loss.backward()
        losses[backend] = loss.item()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)
    for name, ref in grads["torch"].items():
        assert_close(grads["triton"][name], ref, 1e-4, f"grad of {name}")


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    mesh = init_device_mesh("cpu", (world,))
    losses = {}
    for backend in ("triton", "torch"):
        ops.set_backend(backend, "cpu")
        model = Transformer(CFG, seed=0)
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens, targets = batch(seed=1 + rank, seq=16, device="cpu")
        losses[backend] = []
        for _ in range(2):  # the second loss is measured after one optimizer step
            loss = ops.cross_entropy(model(tokens), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[backend].append(loss.item())
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(losses, f)


def test_fsdp2_training_step_on_two_gloo_ranks_with_triton_equals_torch(tmp_path, monkeypatch):
    # The ranks train on the CPU over gloo, so they run the kernels through the interpreter,
    # also where this process has a GPU; whatever device the other tests run on (they see
    # LLAMATRAIN_TEST_DEVICE=cuda here as under `make gpu-check`), their data stays on the CPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("LLAMATRAIN_TEST_DEVICE", "cuda")
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        losses = json.loads((tmp_path / f"rank{rank}.json").read_text())
        triton, torch_ = losses["triton"], losses["torch"]
        assert triton[0] == pytest.approx(torch_[0], rel=1e-5)
        assert triton[1] == pytest.approx(torch_[1], rel=1e-4)
        assert triton[1] < triton[0]  # the sharded step trained: the same batch's loss fell


def run_without_cuda(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh Python that sees no GPU and no Triton settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", AOT_ENV)}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_importing_kernels_without_cuda_turns_the_interpreter_on():
    done = run_without_cuda(
        "import torch\n"
        "from llamatrain import kernels\n"
        "print(*kernels.rms_norm(torch.tensor([[3.0, 4.0]]), torch.ones(2), 0.0).tolist()[0])\n"
    )
    assert done.returncode == 0, done.stderr
    # The rms of (3, 4) is sqrt(12.5).
    assert [float(v) for v in done.stdout.split()] == pytest.approx([3 / 12.5**0.5, 4 / 12.5**0.5])


def test_importing_kernels_after_triton_without_its_interpreter_fails_clearly():
    # torch._dynamo (torch.compile) imports Triton; too late then to turn the interpreter on.
    done = run_without_cuda("import torch._dynamo\nimport llamatrain.kernels\n")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "RuntimeError: llamatrain.kernels: triton was imported without its interpreter before "
        "this package; set TRITON_INTERPRET=1 (no CUDA here) in the environment, or import "
        "llamatrain.kernels before anything that imports triton (torch._dynamo / torch.compile "
        "does)"
    )
