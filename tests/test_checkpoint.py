"""Checkpointer on one process, without the trainer: several async saves through one
Checkpointer publish every step and restore exactly what each saved (torch 2.11's stager could
stage only once)."""

from __future__ import annotations

import torch

from llamatrain.checkpoint.dcp import Checkpointer
from llamatrain.config import CheckpointConfig


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpointer=None) -> None:
    model(torch.randn(3, 8)).square().sum().backward()
    if checkpointer is not None:
        checkpointer.before_update()
    optimizer.step()
    optimizer.zero_grad()


def test_three_async_saves_through_one_checkpointer_publish_and_restore_each_step(tmp_path):
    identity = {"run_id": "r1", "model": {"dim": 8}}
    cfg = CheckpointConfig(interval=1, keep=3, async_save=True)
    model, optimizer = _model_and_optimizer()
    checkpointer = Checkpointer(tmp_path, cfg, rank=0, world_size=1, identity=identity)
    saved = {}
    for step in (1, 2, 3):
        _step(model, optimizer, checkpointer)
        checkpointer.save(step, model, optimizer, {"step": step})
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        checkpointer.poll()
    _step(model, optimizer, checkpointer)  # changes the weights while the last save is written
    checkpointer.close()
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step-3"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-1", "step-2", "step-3"]

    fresh, fresh_optimizer = _model_and_optimizer()
    reader = Checkpointer(tmp_path, cfg, rank=0, world_size=1, identity=identity)
    restored = reader.restore(fresh, fresh_optimizer, log=lambda line: None)
    assert restored is not None and restored.trainer["step"] == 3
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved[3][name]), name
    assert fresh_optimizer.state_dict()["state"][0]["step"].item() == 3
