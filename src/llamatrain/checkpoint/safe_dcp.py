"""DCP reading and writing that never executes code from disk and checksums every file.

torch.distributed.checkpoint reads `.metadata` with pickle and non-tensor values with torch.load
outside its weights-only mode: a crafted file in a downloaded checkpoint would run code. Here
`.metadata` goes through an unpickler that admits only DCP's own metadata classes, and non-tensor
values load with `weights_only=True`. The writer hashes each file (SHA-256) as its threads stream
it to disk, so checksums cost no second pass over the data.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

METADATA = ".metadata"
HASH_CHUNK = 1 << 24
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *((_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
}
# The write result that carries one rank's file checksums to the coordinator.
_CHECKSUMS_FQN = "__llamatrain_checksums__"


class UnsafeCheckpoint(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED_GLOBALS or dtype:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{METADATA} names {module}.{name}, which is not DCP metadata; "
                               "refusing to load it")


def read_metadata(path: str | Path) -> Metadata:
    """A checkpoint's `.metadata`, unpickled with DCP's metadata classes only."""
    with open(path, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{path}: not DCP metadata ({type(metadata).__name__})")
    return metadata


class SafeReader(FileSystemReader):
    """Hands DCP the checkpoint's `.metadata` as read_metadata() unpickled it, up front: so an
    unsafe or missing file is one clear error, not DCP's fallback to per-rank metadata files."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(str(path))
        self._metadata = read_metadata(Path(path) / METADATA)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self._metadata, "storage_meta", None) is not None:
            self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyperparameters, ...) load as plain data, never as objects."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load(state_dict: dict[str, Any], path: str | Path, *, no_dist: bool | None = None) -> None:
    """dcp.load through SafeReader and SafeLoadPlanner; collective when a process group is up,
    unless `no_dist`."""
    dcp.load(state_dict, storage_reader=SafeReader(path), planner=SafeLoadPlanner(),
             no_dist=not dist.is_initialized() if no_dist is None else no_dist)


class _HashingStream(io.RawIOBase):
    """A write-only file that hashes what passes through it."""

    def __init__(self, raw: io.BufferedWriter, on_close) -> None:
        self.raw, self.digest, self._on_close = raw, hashlib.sha256(), on_close

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        self.digest.update(view)
        return self.raw.write(view)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        if not self.raw.closed:
            self.raw.flush()

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
            self._on_close(self.digest.hexdigest())
        super().close()


class _HashingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, str] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = Path(path).name

        def record(digest: str) -> None:
            with self._lock:
                self.digests[name] = digest

        stream = _HashingStream(open(path, "wb"), record)  # noqa: SIM115 - closed below
        try:
            yield stream
        finally:
            stream.close()


class ChecksummingWriter(FileSystemWriter):
    """FileSystemWriter that hashes every file it writes; on the coordinator (rank 0) `checksums`
    holds every rank's files and `.metadata` once the save has finished."""

    def __init__(self, path: str | Path, *, thread_count: int) -> None:
        super().__init__(str(path), thread_count=thread_count)
        self.fs = _HashingFileSystem()
        self.checksums: dict[str, str] = {}

    def write_data(self, plan, planner) -> Future[list[WriteResult]]:
        results = super().write_data(plan, planner).wait()
        carrier = WriteResult(index=MetadataIndex(_CHECKSUMS_FQN), size_in_bytes=0,
                              storage_data=dict(self.fs.digests))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([*results, carrier])
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        checksums: dict[str, str] = {}
        clean = []
        for rank_results in results:
            for wr in rank_results:
                if wr.index.fqn == _CHECKSUMS_FQN:
                    checksums.update(wr.storage_data)
            clean.append([wr for wr in rank_results if wr.index.fqn != _CHECKSUMS_FQN])
        super().finish(metadata, clean)
        tmp = f"{METADATA}.tmp"
        checksums[METADATA] = self.fs.digests[tmp]
        self.checksums = {k: v for k, v in checksums.items() if k != tmp}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(directory: Path, checksums: dict[str, str], *, rank: int, world_size: int) -> str | None:
    """Check this rank's share of the files against their checksums; the first problem, or None."""
    for i, name in enumerate(sorted(checksums)):
        if i % world_size != rank:
            continue
        if Path(name).name != name or name in (".", ".."):  # a name, never a path elsewhere
            return f"checksum entry {name!r} is not a file name of the checkpoint"
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != checksums[name]:
            return f"{name} does not match its checksum"
    return None
