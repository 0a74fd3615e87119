"""The run directory's layout, in one place: the name of everything a run writes under `run.dir`
and the step directories of its checkpoints. The trainer, the checkpointer, the run lock, the
metrics logger, `convert` and `evaluate` ask this module instead of spelling the names.

    run.dir/
      checkpoints/step-<N>/   one DCP checkpoint (checkpoint.dcp), written as .tmp-step-<N>/
      checkpoints/latest      names the newest complete step
      metrics.jsonl  config.toml  tokenizer.model  report.json  report.md  loss.png
      requeue                 left by a stop for requeue (step and reason)
      LOCK  .flock            the run lock (checkpoint.runlock)
      .requeue-<job>/         launch/pretrain.sbatch's markers of a stop for requeue
      nccl_trace/             launch/fabric.sh's NCCL flight recorder dumps
      profile/  tensorboard/  when metrics.profile_steps / metrics.tensorboard ask for them

A run directory is untrusted input, and everything a run writes stays inside it: the file
operations here never follow a link they did not create (O_NOFOLLOW on open, a symbolic link where
a file is to be written is refused, a file is replaced by os.replace of a temporary file created
with O_EXCL in the same directory, so the entry itself is replaced, never what it points to), and
`check_usable` refuses, before anything is written, a run.dir that holds another run's outputs, a
planted link or a system directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamatrain.config import Config

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STEP_NAME = re.compile(r"step-\d+")
TMP_STEP_PREFIX = ".tmp-step-"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
TOKENIZER = "tokenizer.model"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PLOT = "loss.png"
REQUEUE = "requeue"
LOCK = "LOCK"
FLOCK = ".flock"
PROFILE = "profile"
TENSORBOARD = "tensorboard"
# launch/pretrain.sbatch's per-job directory of "saved on request" markers (.requeue-<job id>).
REQUEUE_DIR_PREFIX = ".requeue-"
# launch/fabric.sh's directory for the NCCL flight recorder's dumps, made before the run starts.
NCCL_TRACE = "nccl_trace"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def of_checkpoint(cls, step_dir: str | Path) -> RunDir:
        """The run directory a `checkpoints/step-<N>` directory belongs to."""
        return cls(Path(step_dir).parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def report_json(self) -> Path:
        return self.path / REPORT_JSON

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def requeue(self) -> Path:
        return self.path / REQUEUE

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def flock(self) -> Path:
        return self.path / FLOCK

    @property
    def profile(self) -> Path:
        return self.path / PROFILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD


def step_name(step: int) -> str:
    return f"step-{step}"


def tmp_step_name(step: int) -> str:
    return f"{TMP_STEP_PREFIX}{step}"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """Every `step-<N>` directory, complete or not, newest first (a link is none of them)."""
    return sorted((p for p in ckpt_dir.glob("step-*")
                   if STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()),
                  key=step_of, reverse=True)


def tmp_step_dirs(ckpt_dir: Path) -> list[Path]:
    """Directories of saves that were never published."""
    return list(ckpt_dir.glob(f"{TMP_STEP_PREFIX}*"))


# ---------------------------------------------------------------------------------------------
# Writing inside a run directory


class RunDirRefused(ValueError):
    """A run directory this run must not write into, or over (a user-facing, exit-2 error)."""


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise RunDirRefused(
            f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r}) that llamatrain did not "
            "create; a run writes only real files inside its run.dir: remove the link")


def _open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a link at `path` and anything but a regular file (O_NONBLOCK: a
    planted FIFO must not block the open)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            _refuse_link(path)
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirRefused(f"{str(path)!r} is not a regular file; a run writes only its own "
                            "files inside its run.dir: remove it")
    return fd


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace the file at `path` with `data` in one rename: a kill at any moment leaves the old
    file or the new one. A link at `path` is refused; the data goes to a temporary file created
    with O_EXCL in the same directory, which os.replace then puts in the entry's place."""
    _refuse_link(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_with(path: Path, write) -> None:
    """Replace the file at `path` with what `write(tmp)` writes to a temporary file of ours (for
    writers that take a file name: matplotlib, the profiler), as write_atomic does."""
    _refuse_link(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.close(_open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_text(path: Path, text: str) -> None:
    """Append to the file at `path` (created if missing), never through a link."""
    with os.fdopen(_open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
        f.write(text)


def read_text(path: Path, limit: int | None = None) -> str:
    """The text of a file in a run directory, read without following a link; at most `limit`
    bytes when given."""
    with os.fdopen(_open_nofollow(path, os.O_RDONLY), "rb") as f:
        data = f.read() if limit is None else f.read(limit)
    return data.decode(errors="replace")


def copy_file(src: Path, dst: Path) -> None:
    """Copy `src` (from outside the run directory) to `dst` inside it, atomically."""
    write_atomic(dst, Path(src).read_bytes())


def make_dir(path: Path) -> Path:
    """The directory `path` inside a run directory, created if missing; a link there, or a file,
    is refused."""
    if not path.is_symlink():
        with contextlib.suppress(FileExistsError):  # a file of that name: refused below
            path.mkdir(exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        _refuse_link(path)
        raise RunDirRefused(f"{str(path)!r} is not a directory; a run keeps its own directory "
                            "there: remove it")
    return path


def fresh_dir(path: Path) -> Path:
    """An empty new directory at `path`, whatever was there (a link is removed, not followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------------
# Whether a run may use a directory

# Directories no run belongs in: a run writes checkpoints, metrics and its config into run.dir.
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
})
# ... nor anywhere below these (/dev/shm, a RAM disk, is a place for runs).
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                "/sbin", "/sys", "/usr")
FILES = (METRICS, CONFIG, TOKENIZER, REPORT_JSON, REPORT_MD, LOSS_PLOT, REQUEUE, LOCK, FLOCK)
DIRS = (CHECKPOINTS, PROFILE, TENSORBOARD)
# What a run leaves before its first checkpoint: an attempt that stopped there starts over.
_LEFTOVERS = (CHECKPOINTS, PROFILE, TENSORBOARD, "wandb", NCCL_TRACE, METRICS, CONFIG, TOKENIZER,
              REQUEUE, LOCK, FLOCK)
# What only a run that went to its end writes (after its last checkpoint).
_FINISHED = (REPORT_JSON, REPORT_MD, LOSS_PLOT)


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry
        return None


def _system_dir(path: Path) -> str | None:
    resolved = path.resolve()
    text = str(resolved)
    if resolved == _home():
        return "your home directory"
    if text in SYSTEM_DIRS:
        return "a system directory"
    if text.startswith("/dev/shm/"):
        return None
    for tree in SYSTEM_TREES:
        if text.startswith(tree + "/"):
            return f"inside the system directory {tree}"
    return None


def _ours(name: str) -> bool:
    """Whether an entry of run.dir is one a run writes before its first checkpoint (its temporary
    files included)."""
    return (name in _LEFTOVERS or name.startswith((f"{LOCK}.stale-", REQUEUE_DIR_PREFIX))
            or any(name.startswith(f".{n}.") for n in FILES))


def _names(entries: list[str], most: int = 5) -> str:
    shown = ", ".join(sorted(entries)[:most])
    return shown + (f" and {len(entries) - most} more" if len(entries) > most else "")


def _check_entries(path: Path) -> None:
    """Refuse a link, or an entry of the wrong kind, where a run writes."""
    ckpt = path / CHECKPOINTS
    inside = list(ckpt.iterdir()) if ckpt.is_dir() and not ckpt.is_symlink() else []
    written = [path / n for n in FILES + DIRS] + [
        p for p in inside if p.name == LATEST or STEP_NAME.fullmatch(p.name)
        or p.name.startswith(TMP_STEP_PREFIX)]
    for p in written:
        if p.is_symlink():
            raise RunDirRefused(
                f"run.dir = {str(path)!r}: {str(p.relative_to(path))!r} is a symbolic link (to "
                f"{os.readlink(p)!r}) that llamatrain did not create, where a run writes; remove "
                "it, or choose another run.dir")
        if not p.exists():
            continue
        want_dir = p.name in DIRS or (p.parent == ckpt and p.name != LATEST)
        if not (p.is_dir() if want_dir else p.is_file()):
            kind = "a directory" if want_dir else "a regular file"
            raise RunDirRefused(f"run.dir = {str(path)!r}: {str(p.relative_to(path))!r} is not "
                                f"{kind}, where a run writes one; remove it, or choose another "
                                "run.dir")


def _same_run(path: Path, cfg: Config) -> str | None:
    """None when run.dir's config.toml is this run's config, else why not."""
    from llamatrain.checkpoint.identity import differences, run_identity
    from llamatrain.config import load_config, to_dict

    def identity(c: Config) -> dict:
        data = {k: v for k, v in to_dict(c)["data"].items()
                if k not in ("cache_dir", "workers", "prefetch")}
        return run_identity(c, data=data, run_id="")

    try:
        saved = load_config(path / CONFIG)
    except ValueError as e:
        return f"its config.toml is not a config of this llamatrain ({e})"
    breaking, _ = differences(identity(saved), identity(cfg))
    return f"its config.toml is another run's ({'; '.join(breaking)})" if breaking else None


def check_usable(path: str | Path, cfg: Config) -> None:
    """Refuse, in one line (RunDirRefused), a run.dir this run must not write into.

    A run directory is usable when it does not exist, is empty, or is a run directory:
    - one whose checkpoints/ holds step directories (the resume then checks that they are this
      run's, checkpoint.dcp);
    - or one left by an attempt of this same run that stopped before its first checkpoint: only
      the files such an attempt writes (config.toml, metrics.jsonl, tokenizer.model, the lock,
      requeue, an empty checkpoints/, profile/, tensorboard/, wandb/), and its config.toml has
      this run's identity (model, sequence length, seed, data), which is what starts over.
    It holds another run's outputs, and is refused, when it has no checkpoint but a report
    (report.json, report.md, loss.png: a finished or archived run), files that no run writes
    (any other folder), or a config.toml of another run. Refused as well: a system directory,
    `/` or your home directory, and a link or a file of the wrong kind where a run writes."""
    path = Path(path)
    system = _system_dir(path)
    if system is not None:
        raise RunDirRefused(f"run.dir = {str(path)!r} is {system}; a run writes checkpoints, "
                            "metrics and its config into run.dir: choose a directory of its own "
                            "(e.g. runs/NAME)")
    if path.is_symlink() and not path.exists():
        raise RunDirRefused(f"run.dir = {str(path)!r} is a link to {os.readlink(path)!r}, which "
                            "does not exist: create that directory or choose another run.dir")
    if not path.exists():
        return
    if not path.is_dir():
        raise RunDirRefused(f"run.dir = {str(path)!r} is not a directory: choose another run.dir")
    entries = [e.name for e in os.scandir(path)]
    if not entries:
        return
    _check_entries(path)
    if (path / CHECKPOINTS).is_dir() and step_dirs(path / CHECKPOINTS):
        return
    finished = [n for n in _FINISHED if n in entries]
    foreign = [n for n in entries if n not in _FINISHED and not _ours(n)]
    hint = "choose another run.dir, or move them away"
    if finished or foreign:
        what = "another run's outputs" if finished else "files that are not a run's"
        raise RunDirRefused(f"run.dir = {str(path)!r} holds {what} ({_names(finished + foreign)})"
                            f" and no checkpoint: {hint}")
    if CONFIG in entries:
        why = _same_run(path, cfg)
        if why is not None:
            raise RunDirRefused(f"run.dir = {str(path)!r} holds the outputs of another run that "
                                f"stopped before its first checkpoint ({why}): {hint}")
    elif METRICS in entries:
        raise RunDirRefused(f"run.dir = {str(path)!r} holds a metrics.jsonl without the "
                            f"config.toml of its run, and no checkpoint: {hint}")
