"""One run at a time in a run directory.

Rank 0 holds two locks for the whole run:
- `run.dir/.flock`, locked with flock(2): the kernel drops it when the holder dies, so on one host
  (and on file systems that pass flock between hosts) a dead holder is told apart from a live one;
- `run.dir/LOCK`, created with O_EXCL, naming the holder (host, pid, SLURM job id, start time).
  Its modification time is a heartbeat, renewed every HEARTBEAT_S by a thread, which is what works
  on shared file systems where flock does not reach other hosts.

A LOCK is stale, and taken over, when its holder is on this host and not alive, when it was left
by this same SLURM job (a requeued job starts again under its id), or when its heartbeat is older
than STALE_S. Otherwise the second run exits 2 at once, naming the holder. A LOCK that is not a
llamatrain lock (another shape of JSON, a link) is named as such and taken over only when stale;
neither file is ever opened through a link, and a directory that cannot be written is one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from llamatrain.checkpoint.rundir import LOCK as LOCK_FILE
from llamatrain.checkpoint.rundir import RunDir, RunDirRefused, read_text

# A LOCK's fields and their types: anything else in the file is not a llamatrain lock.
_HOLDER_FIELDS = {"host": str, "pid": int, "slurm_job_id": str, "started": (int, float)}
# errno of a directory that cannot be written: a user-facing error, not a crash.
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunDirLocked(ValueError):
    """The run directory is held by another live run (a user-facing, exit-2 error)."""


def _holder_text(info: dict) -> str:
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"host {info.get('host', '?')} pid {info.get('pid', '?')}{job}, since {since}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive hold of a run directory; `acquire` raises RunDirLocked naming a live holder."""

    def __init__(self, run_dir: str | Path, *, log=print) -> None:
        self.dir = Path(run_dir)
        self.log = log
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "started": time.time()}
        self._flock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return RunDir(self.dir).lock

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as e:
            if e.errno not in _NOT_WRITABLE:
                raise
            self.release()
            where = f": {e.filename}" if e.filename else ""
            raise RunDirRefused(f"run.dir = {str(self.dir)!r} cannot be written ({e.strerror}"
                                f"{where}): make it writable, or choose another run.dir") from None

    def _acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        flock_held = self._flock()
        for _ in range(3):
            try:
                # O_EXCL does not follow a link at the name: a planted one counts as a holder.
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale(flock_held)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.info) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                            name="llamatrain-runlock")
            self._thread.start()
            return
        raise RunDirLocked(f"run.dir = {str(self.dir)!r}: could not create {self.path} "
                           "(another run keeps taking it)")

    def _flock(self) -> bool:
        """True when flock(2) is held; False where the file system does not support it."""
        path = RunDir(self.dir).flock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:  # a link planted there: opening it would create its target
                raise RunDirRefused(f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r})"
                                    " that llamatrain did not create: remove it") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(self._in_use(self._read_holder())) from None
            return False  # ENOLCK / EOPNOTSUPP: only the LOCK file protects this directory
        self._flock_fd = fd
        return True

    def _read_holder(self) -> dict:
        """The LOCK's holder: its fields when the file is a llamatrain lock; {} when it is gone or
        empty (being written); {"malformed": why} for anything else."""
        try:
            text = read_text(self.path, limit=4096)
        except FileNotFoundError:
            return {}
        except (OSError, RunDirRefused) as e:
            return {"malformed": f"unreadable: {e}"}
        if not text.strip():
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return {"malformed": "not JSON"}
        if not isinstance(holder, dict) or any(
                not isinstance(holder.get(k), t) or isinstance(holder.get(k), bool)
                for k, t in _HOLDER_FIELDS.items()):
            return {"malformed": "not an object of " + ", ".join(_HOLDER_FIELDS)}
        return holder

    def _in_use(self, holder: dict) -> str:
        if "malformed" in holder:
            return (f"run.dir = {str(self.dir)!r} holds a LOCK that is not a llamatrain lock "
                    f"({holder['malformed']}); if no run uses this directory, remove {self.path}")
        who = _holder_text(holder) if holder else "another process"
        return (f"run.dir = {str(self.dir)!r} is in use by {who}; wait for that run to end, stop "
                f"it, or choose another run.dir (remove {self.path} only if that run is gone)")

    def _take_over_if_stale(self, flock_held: bool) -> None:
        holder = self._read_holder()
        try:
            age = time.time() - self.path.lstat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        same_host = "malformed" not in holder and holder.get("host") == self.info["host"]
        job = self.info["slurm_job_id"]
        if same_host and (flock_held or not pid_alive(int(holder.get("pid", -1)))):
            why = "its process is gone"
        elif job and holder.get("slurm_job_id") == job:
            why = f"it was left by this SLURM job {job} before a requeue"
        elif age > STALE_S:
            why = f"no heartbeat for {age:.0f} s"
        else:
            self.release()
            raise RunDirLocked(self._in_use(holder))
        whose = ("a LOCK that is not a llamatrain lock" if "malformed" in holder
                 else _holder_text(holder) if holder else "an empty LOCK")
        self.log(f"taking over the lock of {whose}: {why}")
        # Rename, not unlink: of two runs taking over at once, one rename fails and that run
        # meets the other's fresh LOCK on its next try.
        stale = self.path.with_name(f"{LOCK_FILE}.stale-{self.info['host']}-{os.getpid()}")
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a missed beat is harmless: STALE_S spans many
                os.utime(self.path, follow_symlinks=False)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            holder = self._read_holder()
            if (holder.get("host"), holder.get("pid")) == (self.info["host"], self.info["pid"]):
                self.path.unlink(missing_ok=True)
        if self._flock_fd is not None:
            os.close(self._flock_fd)  # closing drops the flock
            self._flock_fd = None
