"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout under `<run.dir>/checkpoints/`: `step-<N>/` holds the DCP files of the model and optimizer,
`rng-<rank>.pt` (tensors only) and `trainer.json`: step, tokens seen, sampler position, the run's
identity (checkpoint.identity) and the SHA-256 of every other file. `latest` names the newest
complete step. A save is written into `.tmp-step-<N>/`, trainer.json last, published by one rename,
and only then does `latest` move (itself replaced atomically), so a crash at any moment leaves the
previous checkpoint loadable. DCP reshards on load: a checkpoint written by W ranks loads on any
other number.

A checkpoint directory is untrusted input: nothing in it is unpickled (checkpoint.safe_dcp), its
checksums are verified before it is loaded, a checkpoint of another run is refused, and only
checkpoints of this run are ever deleted.
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

from llamatrain.checkpoint import safe_dcp
from llamatrain.checkpoint.identity import differences
from llamatrain.checkpoint.rundir import (
    LATEST,
    STEP_NAME,
    RunDir,
    fresh_dir,
    make_dir,
    step_dirs,
    step_name,
    step_of,
    tmp_step_dirs,
    tmp_step_name,
    write_atomic,
)
from llamatrain.config import CheckpointConfig

TRAINER_STATE = "trainer.json"
# The optimizer's state and hyperparameters keyed by parameter name ("state.<fqn>.exp_avg",
# "param_groups.<fqn>.lr"), not as lists of the parameters a rank holds: under pipelining each
# rank holds other parameters, and a checkpoint resumes at any pp degree.
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Files each rank writes in parallel: one writer thread leaves fast disks half idle while it
# serialises (benchmarks/checkpoint.py: about 55% of raw write speed with 1, 80-95% with 4).
WRITE_THREADS = 4
# Whether one DefaultStager can stage several saves (see Checkpointer._stager_for_save).
STAGER_REUSABLE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)
# A world of one saves and loads without a process group, which is what DCP warns about.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or")


class ResumeRefused(ValueError):
    """The run directory holds checkpoints this run must not continue from or train over."""


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file()


def candidates(ckpt_dir: Path, log=print) -> list[Path]:
    """Complete checkpoints, newest first, starting from the one `latest` names."""
    steps = step_dirs(ckpt_dir)
    latest_file = ckpt_dir / LATEST
    if latest_file.is_file():
        name = latest_file.read_bytes()[:100].decode(errors="replace").strip()
        named = ckpt_dir / name
        if STEP_NAME.fullmatch(name) and named.is_dir():
            steps = [named] + [p for p in steps if p != named and step_of(p) < step_of(named)]
        else:
            log(f"{latest_file} holds {name!r}, not a checkpoint of this directory: ignored; "
                "using the newest complete checkpoint")
    return [p for p in steps if is_complete(p)]


def read_trainer_state(path: Path) -> dict[str, Any]:
    state = json.loads((path / TRAINER_STATE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path / TRAINER_STATE}: not a trainer state")
    return state


@dataclass
class Restored:
    path: Path
    trainer: dict[str, Any]


@dataclass
class _Pending:
    """A save in flight: written by DCP into `tmp`, published as `final` with `state`."""

    tmp: Path
    final: Path
    writer: safe_dcp.ChecksummingWriter
    state: dict[str, Any]
    started: float  # perf_counter at the start of the save
    upload: Future | None = None


class Checkpointer:
    """Saves and restores model, optimizer and trainer state for every rank of a run.

    With `checkpoint.async`, `save` returns once the save is planned; the state is copied in the
    background while the next step computes, `before_update` waits for that copy before the
    optimizer changes the state, and the files are written and published behind the loop."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, rank: int, world_size: int,
                 identity: dict[str, Any]):
        self.dir = RunDir(run_dir).checkpoints
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        # What defines this run; its run_id is adopted from the checkpoint a resume loads.
        self.identity = identity
        self._pending: _Pending | None = None
        # Seconds from the start of the last published save to its publication (its total cost,
        # of which `save` returns the part the caller was blocked).
        self.last_total_s: float | None = None
        self._staging: Future | None = None
        self._stager: DefaultStager | None = None  # made by the first async save
        # Background saves talk on their own gloo group so they never interleave with the
        # training loop's collectives.
        self._group = (
            dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized() else None
        )
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        make_dir(self.dir)

    @staticmethod
    def _new_stager() -> DefaultStager:
        # Copies into staging buffers run in a background thread, overlapping the next step's
        # forward and backward; only the optimizer update waits for them (before_update).
        on_gpu = torch.cuda.is_available()
        return DefaultStager(StagingOptions(
            use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=True,
            use_non_blocking_copy=on_gpu))

    def _stager_for_save(self) -> DefaultStager:
        """The stager of the next async save: the same one, which keeps its pinned buffers, where
        torch lets a stager stage twice; a new one per save before torch 2.13, whose stager
        empties its copy table after its first save (the second then fails with
        `KeyError: <class 'type'>`)."""
        if self._stager is not None and not STAGER_REUSABLE:
            self._stager.close()  # its save has been staged: save() waited for it
            self._stager = None
        if self._stager is None:
            self._stager = self._new_stager()
        return self._stager

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    @staticmethod
    def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIM_OPTIONS)
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
        final = self.dir / step_name(step)
        tmp = self.dir / tmp_step_name(step)
        if self.rank == 0:
            fresh_dir(tmp)
        self._barrier()
        torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        state = dict(trainer_state, identity=self.identity, saved_world_size=self.world_size,
                     time=time.time())
        pending = _Pending(tmp, final, safe_dcp.ChecksummingWriter(tmp, thread_count=WRITE_THREADS),
                           state, start)
        app_state = self._app_state(model, optimizer)
        if self.cfg.async_save:
            response = dcp.async_save(app_state, storage_writer=pending.writer,
                                      process_group=self._group,
                                      async_stager=self._stager_for_save(),
                                      no_dist=not dist.is_initialized())
            self._staging = response.staging_completion
            pending.upload = response.upload_completion
            self._pending = pending
        else:
            dcp.save(app_state, storage_writer=pending.writer,
                     no_dist=not dist.is_initialized())
            self._publish(pending)
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
        if self._pending is not None and self._pending.upload.done():
            self.wait()

    def wait(self) -> None:
        """Block until a background save, if any, is written and published."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self.before_update()
        pending.upload.result()
        self._publish(pending, collective=False)

    def _publish(self, pending: _Pending, *, collective: bool = True) -> None:
        # DCP's coordinator (rank 0) writes .metadata last, after every rank's data, and holds
        # every file's checksum: once it returns, rank 0 completes the checkpoint with
        # trainer.json and publishes it by renaming.
        if collective:
            self._barrier()
        if self.rank == 0:
            tmp, final = pending.tmp, pending.final
            checksums = dict(pending.writer.checksums)
            for rng in tmp.glob("rng-*.pt"):
                checksums[rng.name] = safe_dcp.file_sha256(rng)
            state = dict(pending.state, checksums=checksums)
            write_atomic(tmp / TRAINER_STATE, json.dumps(state, indent=1) + "\n")
            if final.exists() or final.is_symlink():
                self._set_aside(final)
            os.replace(tmp, final)
            write_atomic(self.dir / LATEST, final.name + "\n")
            self._prune()
        if collective:
            self._barrier()
        self.last_total_s = time.perf_counter() - pending.started

    def _ours(self, path: Path) -> bool:
        """Whether checkpoint `path` was written by this run (same run_id)."""
        try:
            saved = read_trainer_state(path).get("identity") or {}
        except (OSError, ValueError):
            return False
        return saved.get("run_id") == self.identity["run_id"]

    def _set_aside(self, path: Path) -> None:
        """Make room for a new `path`: an old one of this run goes, any other (a link too) is kept
        aside."""
        if not path.is_symlink() and self._ours(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.replace(path, path.with_name(f"{path.name}.replaced-{int(time.time())}"))

    def _prune(self) -> None:
        ours = [p for p in step_dirs(self.dir) if is_complete(p) and self._ours(p)]
        for old in ours[self.cfg.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in tmp_step_dirs(self.dir):
            if self._pending is None or stale != self._pending.tmp:
                shutil.rmtree(stale, ignore_errors=True)

    def _check_identity(self, path: Path, trainer: dict[str, Any], log) -> None:
        saved = trainer.get("identity")
        if saved is None:
            log(f"checkpoint {path} records no run identity (an older llamatrain): not compared")
            return
        breaking, logged = differences(saved, self.identity)
        if breaking:
            raise ResumeRefused(
                f"run.dir = {str(self.dir.parent)!r} holds another run ({'; '.join(breaking)}): "
                "start a new run with another run.dir, or load only its weights with "
                f"--checkpoint.init_from={path}")
        if logged:
            log(f"resuming {path.name} with changed settings: {'; '.join(logged)}")
        self.identity["run_id"] = saved["run_id"]

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, log=print
    ) -> Restored | None:
        """Load the newest loadable checkpoint of this run; an unreadable one is reported and
        the previous one tried. None when there is no checkpoint; ResumeRefused when the
        checkpoints belong to another run or none of them loads."""
        existing = step_dirs(self.dir)
        if not existing:
            return None
        tried = []
        for path in candidates(self.dir, log=log):
            ok, error = True, ""
            try:
                trainer = read_trainer_state(path)
            except (OSError, ValueError) as e:
                ok, error = False, f"{TRAINER_STATE}: {type(e).__name__}: {e}"
            if _all_ok(ok):
                self._check_identity(path, trainer, log)
                ok, error = self._load(path, trainer, model, optimizer, log)
            if _all_ok(ok):
                return Restored(path, trainer)
            reason = error or "on another rank"
            tried.append(f"{path.name}: {reason}")
            log(f"checkpoint {path} is unreadable ({reason}); trying the previous one")
        incomplete = [p.name for p in existing if not is_complete(p)]
        if incomplete:
            tried.append(f"incomplete: {', '.join(incomplete)}")
        raise ResumeRefused(
            f"run.dir = {str(self.dir.parent)!r} holds checkpoints but none loads "
            f"({' | '.join(tried)}); not training over them: repair or move "
            f"{self.dir}, or start a new run with another run.dir")

    def _load(self, path: Path, trainer: dict[str, Any], model: nn.Module,
              optimizer: torch.optim.Optimizer, log) -> tuple[bool, str]:
        """Verify and load one checkpoint into model and optimizer: (ok, why not)."""
        checksums = trainer.get("checksums")
        if checksums is None:
            log(f"checkpoint {path} records no checksums (an older llamatrain): not verified")
        else:
            problem = safe_dcp.verify(path, checksums, rank=self.rank,
                                      world_size=self.world_size)
            if not _all_ok(problem is None):
                return False, problem or "checksum mismatch on another rank"
        try:
            app_state = self._app_state(model, optimizer)
            safe_dcp.load(app_state, path)
            rng = path / f"rng-{self.rank}.pt"
            rng_state = torch.load(rng, weights_only=True) if rng.is_file() else None
        except (Exception, CheckpointException) as e:  # any failure to read: try the previous
            return False, f"{type(e).__name__}: {e}".splitlines()[0][:300]
        set_state_dict(model, optimizer, model_state_dict=app_state["model"],
                       optim_state_dict=app_state["optim"], options=OPTIM_OPTIONS)
        if rng_state is not None:
            _set_rng_state(rng_state)
        return True, ""


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


def verify_checkpoint(path: Path, key: str, *, verify: bool = True, bypass: str = "",
                      log=print) -> None:
    """Check every file of a checkpoint against the SHA-256 sums its trainer.json records, before
    anything of it is loaded: a missing or unlisted file or a mismatch is a ValueError naming
    `key`. A checkpoint with no sums to check (no trainer.json, or one without checksums: an
    older llamatrain's, or one whose trainer.json was removed) is refused as well, unless `verify`
    is False (`bypass` says how to ask for that): then it is loaded, with a warning."""
    state_path = path / TRAINER_STATE
    checksums = None
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{key} = {str(path)!r}: unreadable {TRAINER_STATE} ({e})") from None
        checksums = state.get("checksums") if isinstance(state, dict) else None
    if not isinstance(checksums, dict) or not checksums:
        why = (f"its {TRAINER_STATE} records no checksums" if state_path.is_file()
               else f"it has no {TRAINER_STATE}")
        if verify:
            raise ValueError(
                f"{key} = {str(path)!r}: {why}, so its files cannot be verified (llamatrain "
                "loads a checkpoint only after checking every file against the SHA-256 sums "
                f"recorded when it was written); if you trust where it came from, {bypass}")
        log(f"WARNING: {key} = {str(path)!r}: {why}; loading it UNVERIFIED, as asked")
        return
    unlisted = sorted(p.name for p in path.iterdir()
                      if p.is_file() and p.name != TRAINER_STATE and p.name not in checksums)
    problem = (f"{unlisted[0]} has no checksum in {TRAINER_STATE}" if unlisted else
               safe_dcp.verify(path, checksums, rank=0, world_size=1))
    if problem:
        raise ValueError(f"{key} = {str(path)!r}: {problem}")


def load_model_weights(path: str | Path, model: nn.Module, *, key: str = "checkpoint.init_from",
                       verify: bool = True, bypass: str = "", log=print) -> None:
    """Load only the model's weights from a verified checkpoint (checkpoint.init_from,
    evaluate), at any world size; see verify_checkpoint for `verify` and `bypass`."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{key} = {str(path)!r}: not a checkpoint directory")
    verify_checkpoint(path, key, verify=verify, bypass=bypass, log=log)
    options = StateDictOptions(strict=True)
    model_sd = get_model_state_dict(model, options=options)
    try:
        safe_dcp.load({"model": model_sd}, path)
    except (Exception, CheckpointException) as e:
        reason = str(e).strip().splitlines()[-1][:300]
        raise ValueError(f"{key} = {str(path)!r}: does not fit the [model] section "
                         f"({reason})") from None
    set_model_state_dict(model, model_sd, options=options)


def save_model_weights(state_dict: dict[str, torch.Tensor], path: str | Path, *,
                       files: dict[str, bytes] | None = None, source: str = "") -> Path:
    """Write plain tensors as a weights-only DCP checkpoint (one process, no process group), with
    `files` beside them and a trainer.json of every file's SHA-256, written last, which is what
    init_from, evaluate and convert verify before they load it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    writer = safe_dcp.ChecksummingWriter(path, thread_count=1)
    dcp.save({"model": state_dict}, storage_writer=writer, no_dist=True)
    checksums = dict(writer.checksums)
    for name, data in (files or {}).items():
        write_atomic(path / name, data)
        checksums[name] = safe_dcp.file_sha256(path / name)
    state = {"weights_only": True, "source": source, "checksums": checksums}
    write_atomic(path / TRAINER_STATE, json.dumps(state, indent=1) + "\n")
    return path


def read_model_weights(path: str | Path, template: dict[str, torch.Tensor], *,
                       verify: bool = True, bypass: str = "") -> None:
    """Fill `template` (plain tensors of the right shapes) from a verified checkpoint, in one
    process; see verify_checkpoint for `verify` and `bypass`."""
    verify_checkpoint(Path(path), "checkpoint", verify=verify, bypass=bypass)
    try:
        safe_dcp.load({"model": template}, path, no_dist=True)
    except (Exception, CheckpointException) as e:
        reason = str(e).strip().splitlines()[-1][:300]
        raise ValueError(f"checkpoint {str(path)!r}: cannot be read ({reason})") from None
