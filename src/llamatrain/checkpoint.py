"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout under `<run.dir>/checkpoints/`: `step-<N>/` holds the DCP files of the model and optimizer,
`trainer.json` (step, tokens seen, sampler position, the schedule's step, and what saved it) and
`rng-<rank>.pt`; `latest` names the newest complete step. A save is written into
`.tmp-step-<N>/`, published by one rename, and only then does `latest` move (itself replaced
atomically), so a crash at any moment leaves the previous checkpoint loadable. DCP reshards on load:
a checkpoint written by W ranks loads on any other number.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from llamatrain.config import CheckpointConfig

TRAINER_STATE = "trainer.json"
# Files each rank writes in parallel: one writer thread leaves fast disks half idle while it
# serialises (benchmarks/checkpoint.py: about 55% of raw write speed with 1, 80-95% with 4).
WRITE_THREADS = 4
# A world of one saves and loads without a process group, which is what DCP warns about.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _writer(path: Path) -> dcp.FileSystemWriter:
    return dcp.FileSystemWriter(str(path), thread_count=WRITE_THREADS)


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file()


def candidates(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first, starting from the one `latest` names."""
    steps = sorted(
        (p for p in ckpt_dir.glob("step-*") if p.name.removeprefix("step-").isdigit()),
        key=_step_of,
        reverse=True,
    )
    latest_file = ckpt_dir / "latest"
    if latest_file.is_file():
        named = ckpt_dir / latest_file.read_text().strip()
        steps = [named] + [p for p in steps if p != named and _step_of(p) < _step_of(named)]
    return [p for p in steps if is_complete(p)]


@dataclass
class Restored:
    path: Path
    trainer: dict[str, Any]


class Checkpointer:
    """Saves and restores model, optimizer and trainer state for every rank of a run.

    With `checkpoint.async`, `save` returns once the save is planned; the state is copied in the
    background while the next step computes, `before_update` waits for that copy before the
    optimizer changes the state, and the files are written and published behind the loop."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self._pending: tuple[Future, Path, Path] | None = None
        self._staging: Future | None = None
        self._stager: DefaultStager | None = None
        if cfg.async_save:
            # Copies into staging buffers run in a background thread, overlapping the next step's
            # forward and backward; only the optimizer update waits for them (before_update).
            on_gpu = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=True,
                use_non_blocking_copy=on_gpu))
        # Background saves talk on their own gloo group so they never interleave with the
        # training loop's collectives.
        self._group = (
            dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized() else None
        )
        self.dir.mkdir(parents=True, exist_ok=True)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    @staticmethod
    def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
    ) -> float:
        """Save step `step`; returns the seconds the caller was blocked."""
        start = time.perf_counter()
        self.wait()
        final = self.dir / f"step-{step}"
        tmp = self.dir / f".tmp-step-{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        if self.rank == 0:
            state = dict(trainer_state, saved_world_size=self.world_size, time=time.time())
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n")
        app_state = self._app_state(model, optimizer)
        if self._stager is not None:
            response = dcp.async_save(app_state, storage_writer=_writer(tmp),
                                      process_group=self._group,
                                      async_stager=self._stager,
                                      no_dist=not dist.is_initialized())
            self._staging = response.staging_completion
            self._pending = (response.upload_completion, tmp, final)
        else:
            dcp.save(app_state, storage_writer=_writer(tmp), no_dist=not dist.is_initialized())
            self._publish(tmp, final)
        return time.perf_counter() - start

    def before_update(self) -> float:
        """Wait until a background save has copied the state it saves (call before every
        optimizer step, which changes that state); returns the seconds waited."""
        if self._staging is None:
            return 0.0
        start = time.perf_counter()
        self._staging.result()
        self._staging = None
        return time.perf_counter() - start

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()

    def poll(self) -> None:
        """Publish a finished background save (call once per step)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until a background save, if any, is written and published."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        self.before_update()
        future.result()
        self._publish(tmp, final, collective=False)

    def _publish(self, tmp: Path, final: Path, *, collective: bool = True) -> None:
        # DCP's coordinator writes .metadata last, after every rank's data: once rank 0 returns,
        # the checkpoint is whole, and only rank 0 renames.
        if collective:
            self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.dir / "latest", final.name + "\n")
            self._prune()
        if collective:
            self._barrier()

    def _prune(self) -> None:
        complete = sorted((p for p in self.dir.glob("step-*") if is_complete(p)), key=_step_of)
        for old in complete[: -self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-step-*"):
            if self._pending is None or stale != self._pending[1]:
                shutil.rmtree(stale, ignore_errors=True)

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, log=print
    ) -> Restored | None:
        """Load the newest loadable checkpoint; an unreadable one is reported and skipped."""
        for path in candidates(self.dir):
            ok = True
            try:
                app_state = self._app_state(model, optimizer)
                dcp.load(app_state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
                trainer = json.loads((path / TRAINER_STATE).read_text())
            except (Exception, CheckpointException) as e:  # any failure to read: try the previous
                ok = False
                error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            if not _all_ok(ok):
                log(f"checkpoint {path} is unreadable ({error if not ok else 'on another rank'})"
                    "; trying the previous one")
                continue
            set_state_dict(model, optimizer, model_state_dict=app_state["model"],
                           optim_state_dict=app_state["optim"])
            rng = path / f"rng-{self.rank}.pt"
            if rng.is_file():
                _set_rng_state(torch.load(rng, weights_only=False))
            return Restored(path, trainer)
        return None


def _all_ok(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_cpu_group())
    return bool(flag.item())


@functools.cache
def _cpu_group() -> dist.ProcessGroup | None:
    """A gloo group for small CPU-side agreements when the default group is NCCL."""
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load only the model's weights from a checkpoint (checkpoint.init_from), at any world size."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint.init_from = {str(path)!r}: not a checkpoint directory")
    options = StateDictOptions(strict=True)
    model_sd = get_model_state_dict(model, options=options)
    try:
        dcp.load({"model": model_sd}, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:
        reason = str(e).strip().splitlines()[-1][:300]
        raise ValueError(f"checkpoint.init_from = {str(path)!r}: does not fit the [model] "
                         f"section ({reason})") from None
    set_model_state_dict(model, model_sd, options=options)


def save_model_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write plain tensors as a weights-only DCP checkpoint (one process, no process group)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dcp.save({"model": state_dict}, checkpoint_id=str(path), no_dist=True)
    return path


def read_model_weights(path: str | Path, template: dict[str, torch.Tensor]) -> None:
    """Fill `template` (plain tensors of the right shapes) from a checkpoint, in one process."""
    dcp.load({"model": template}, checkpoint_id=str(path), no_dist=True)
