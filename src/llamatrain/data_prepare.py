"""Corpus -> token shards: find the input files, sample them to train the tokenizer, tokenise every
document on all workers, and write shards plus meta.json into a fresh directory.

Inputs are text files (one document each), .jsonl records (`text_key`, or prompt/response for
SFT) and parquet files (the same names as columns), text and .jsonl optionally .gz or .zst. Every
file is streamed: blocks of text, row batches of parquet, so memory is bounded by the block size,
not the file size; a text document longer than a block is tokenised in pieces cut after newlines.

Documents are tokenised in a fixed order (inputs as given, directories sorted) and written in that
order, so the output is byte-identical whatever the number of workers. A file that cannot be read
(a dangling or looping symlink, one gone mid-run, a truncated archive) or is not what its format
promises (not UTF-8, bad JSON, a missing column) is rolled back and listed in meta.json's
`skipped`; nothing else is lost. Publishing the directory atomically is the caller's job (see
data.py).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import shutil
import socket
import sys
import sysconfig
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

from llamatrain.runlock import pid_alive
from llamatrain.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

STDLIB = "python-stdlib"
FORMATS = ("pretrain", "sft")
SPLITS = ("train", "val")
EMPTY = "empty (no non-empty document)"
META_VERSION = 1
# 512 MiB of uint16 per shard: big enough to keep file counts low, small enough to copy around.
SHARD_TOKENS = 1 << 28
# Work handed to a worker at a time: large enough to amortise pickling, small enough to balance.
TASK_BYTES = 1 << 18
# At most this many lines come from one file, so a corpus of a few huge files still gets sampled
# from several of them.
SAMPLE_FILES_MIN = 16


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that shapes the shards, except the inputs and the tokenizer."""

    format: str = "pretrain"
    text_key: str = "text"
    val_fraction: float = 0.01
    workers: int = 0
    tokenizer_sample: int = 200_000
    shard_tokens: int = SHARD_TOKENS
    progress: bool = True

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r}; allowed: {', '.join(FORMATS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction}; allowed: 0 <= x < 1")
        if self.workers < 0:
            raise ValueError(f"data.workers={self.workers}; allowed: 0 (all cores) or more")
        if self.tokenizer_sample < 1:
            raise ValueError(f"data.tokenizer_sample={self.tokenizer_sample}; allowed: >= 1")
        if not self.text_key:
            raise ValueError("data.text_key=''; allowed: a non-empty JSON field name")

    def num_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- inputs


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return [p for p in _walk(root, skip) if p.suffix == ".py"]


def _walk(root: Path, skip_dirs: set[str]) -> list[Path]:
    """Files under root, hidden ones left out, sorted by path."""
    files = []
    for d, dirnames, filenames in os.walk(root):
        dirnames[:] = [n for n in dirnames if n not in skip_dirs and not n.startswith(".")]
        files += [Path(d, n) for n in filenames if not n.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def collect_files(inputs: Sequence[str], *, key: str = "--input") -> list[Path]:
    """Input files in processing order: inputs as given, each directory walked in sorted order."""
    files: list[Path] = []
    for inp in inputs:
        p = Path(inp).expanduser()
        if inp == STDLIB:
            files += stdlib_files()
        elif p.is_file():
            files.append(p)
        elif p.is_dir():
            files += _walk(p, set())
        else:
            raise ValueError(f"{key}={inp!r} does not exist; allowed: files, directories, {STDLIB}")
    if not files:
        raise ValueError(f"{key}={' '.join(inputs)!r} holds no input files")
    return files


def _base_name(path: Path) -> str:
    name = path.name
    for ext in (".gz", ".zst"):
        name = name.removesuffix(ext)
    return name


def is_jsonl(path: Path) -> bool:
    return _base_name(path).endswith(".jsonl")


def is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def record_fields(opts: PrepareOptions) -> tuple[str, ...]:
    """Fields of a .jsonl record or columns of a parquet file that hold a document."""
    return ("prompt", "response") if opts.format == "sft" else (opts.text_key,)


def _blocks(path: Path) -> Iterator[bytes]:
    """The file's bytes, decompressed, in blocks of up to TASK_BYTES."""
    with open(path, "rb") as raw:
        if path.name.endswith(".zst"):
            yield from _zstd_blocks(raw)
            return
        f = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        while block := f.read(TASK_BYTES):
            yield block


def _zstd_blocks(raw: BinaryIO) -> Iterator[bytes]:
    # By hand rather than zstandard's stream_reader, which ends silently where a truncated file
    # stops; every frame, as pzstd and appending writers make several.
    dctx = zstandard.ZstdDecompressor()
    frame, in_frame = dctx.decompressobj(), False
    while data := raw.read(TASK_BYTES):
        while data:
            if out := frame.decompress(data):
                yield out
            data, in_frame = b"", True
            if frame.eof:
                data, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise EOFError("zstd data ends inside a frame (truncated file?)")


@dataclass
class Item:
    """A piece of one input file: whole lines of a .jsonl file, or a text file's document, whole
    or (when longer than a block) in pieces cut after a newline."""

    file_index: int
    data: bytes
    first_line: int = 0
    last: bool = False
    error: str = ""
    # A text document in several pieces: whether this piece opens (BOS) and closes (EOS) it, and
    # the whole document's content hash, which decides its split before all of it is read.
    opens: bool = True
    closes: bool = True
    doc_hash: int | None = None
    # Rows of a parquet file: column -> values, already read by pyarrow (data is then empty).
    rows: dict[str, list] | None = None
    rows_bytes: int = 0

    @property
    def size(self) -> int:
        return len(self.data) + self.rows_bytes


# Rows per parquet piece: pyarrow reads one row group at a time and hands out this many rows.
PARQUET_ROWS = 1024


def read_items(path: Path, file_index: int, *, fields: tuple[str, ...] = ("text",),
               scan: bool = True) -> Iterator[Item]:
    """A file's pieces in order; the last one has last=True. Read errors become an error item.

    Memory is bounded by the block size (a row group for parquet), not the file size. scan=False
    skips the first pass over a long text document (its hash and checks), for reading a sample.
    """
    try:
        if is_parquet(path):
            yield from _parquet_items(path, file_index, fields)
            return
        if not is_jsonl(path):
            yield from _text_items(path, file_index, scan=scan)
            return
        line, rest, pending = 0, b"", None
        for block in _blocks(path):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                if pending is not None:
                    yield pending
                    line += pending.data.count(b"\n")
                pending = Item(file_index, block[:cut], first_line=line)
        if rest:
            if pending is not None:
                yield pending
                line += pending.data.count(b"\n")
            pending = Item(file_index, rest, first_line=line)
        if pending is None:
            pending = Item(file_index, b"")
        pending.last = True
        yield pending
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        yield Item(file_index, b"", last=True, error=f"cannot read: {e}")


def _parquet_items(path: Path, file_index: int, fields: tuple[str, ...]) -> Iterator[Item]:
    """The document columns of a parquet file, streamed row group by row group."""
    import pyarrow as pa  # only where there is parquet to read
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(path) as pf:
            names = pf.schema_arrow.names
            missing = [f for f in fields if f not in names]
            if missing:
                yield Item(file_index, b"", last=True, error=(
                    f"no column {missing[0]!r} (columns: {', '.join(names)}); set data.text_key"))
                return
            for batch in pf.iter_batches(batch_size=PARQUET_ROWS, columns=list(fields)):
                rows = batch.to_pydict()
                size = sum(len(v) for col in rows.values() for v in col if isinstance(v, str))
                yield Item(file_index, b"", first_line=row, rows=rows, rows_bytes=size)
                row += batch.num_rows
    except pa.ArrowException as e:
        yield Item(file_index, b"", last=True, error=f"cannot read: {e}")
        return
    yield Item(file_index, b"", first_line=row, last=True, rows={f: [] for f in fields})


def _text_items(path: Path, file_index: int, *, scan: bool) -> Iterator[Item]:
    """A text file is one document: one Item when it fits in a block. A longer one is read twice,
    streaming: first to hash it and check it is UTF-8 with some text, then in pieces."""
    blocks = _blocks(path)
    first, more = next(blocks, b""), next(blocks, None) is not None
    blocks.close()
    if not more:
        yield Item(file_index, first, last=True)
        return
    doc_hash, error, blank = _scan_text(path) if scan else (0, "", False)
    if error or blank:
        yield Item(file_index, b"", last=True, error=error)
        return
    rest, opens = b"", True
    for block in _blocks(path):
        block = rest + block
        cut = _piece_end(block)
        if cut:
            yield Item(file_index, block[:cut], opens=opens, closes=False, doc_hash=doc_hash)
            opens = False
        rest = block[cut:]
    yield Item(file_index, rest, last=True, opens=opens, doc_hash=doc_hash)


def _piece_end(block: bytes) -> int:
    """Where to cut a long document's block: after its last newline, where tokenisation can
    restart exactly; in a line longer than a block, at the last character boundary."""
    cut = block.rfind(b"\n") + 1
    if not cut:
        cut = len(block)
        while cut > 0 and len(block) - cut < 4 and block[cut - 1] & 0xC0 == 0x80:
            cut -= 1  # inside a multi-byte character: back to its lead byte
        if cut and block[cut - 1] >= 0xC0:
            cut -= 1
    return cut


def _scan_text(path: Path) -> tuple[int, str, bool]:
    """(content hash, UTF-8 error or '', whether it is blank) of a whole file, read in blocks."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    for block in itertools.chain(_blocks(path), [b""]):
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            return 0, f"not valid UTF-8 (byte {offset - pending + e.start}: {e.reason})", False
        h.update(block)
        offset += len(block)
        blank = blank and not text.strip()
    return int.from_bytes(h.digest(), "little"), "", blank


NEWLINE = b"\n"


class DocumentError(Exception):
    """A piece of input that is not what its format promises; the whole file is skipped."""


def parse_documents(item: Item, *, jsonl: bool, fmt: str, text_key: str) -> list:
    """Documents of a piece: str for pretraining, (prompt, response) for SFT."""
    keys = ("prompt", "response") if fmt == "sft" else (text_key,)
    if item.rows is not None:
        docs = []
        for i, values in enumerate(zip(*(item.rows[k] for k in keys), strict=True)):
            if not all(isinstance(v, str) for v in values):
                wanted = ", ".join(repr(k) for k in keys)
                found = ", ".join(type(v).__name__ for v in values)
                raise DocumentError(f"row {item.first_line + i + 1}: expected string column(s) "
                                    f"{wanted}, found {found}")
            docs.append(values if fmt == "sft" else values[0])
        return docs
    try:
        text = item.data.decode("utf-8")
    except UnicodeDecodeError as e:
        if jsonl:
            where = f"line {item.first_line + item.data.count(NEWLINE, 0, e.start) + 1}"
        else:
            where = f"byte {e.start}"
        raise DocumentError(f"not valid UTF-8 ({where}: {e.reason})") from None
    if not jsonl:
        if fmt == "sft":
            raise DocumentError(
                'sft needs .jsonl lines of {"prompt": ..., "response": ...} or parquet columns'
            )
        return [text]
    docs: list = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        where = f"line {item.first_line + i + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocumentError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in keys):
            wanted = ", ".join(repr(k) for k in keys)
            raise DocumentError(f"{where}: expected a JSON object with string field(s) {wanted}")
        docs.append((obj["prompt"], obj["response"]) if fmt == "sft" else obj[text_key])
    return docs


def sample_sentences(files: Sequence[Path], opts: PrepareOptions) -> list[str]:
    """Up to opts.tokenizer_sample lines of files taken in a seeded random order, to train on.

    Reading stops once the sample is full, so time and memory stay bounded on any corpus size.
    """
    order = list(range(len(files)))
    random.Random(0).shuffle(order)
    per_file = max(1, opts.tokenizer_sample // SAMPLE_FILES_MIN)
    sample: list[str] = []
    for k in order:
        path, taken = files[k], 0
        for item in read_items(path, k, fields=record_fields(opts), scan=False):
            if item.error:
                break
            try:
                docs = parse_documents(
                    item, jsonl=is_jsonl(path), fmt=opts.format, text_key=opts.text_key
                )
            except DocumentError:
                break  # prepare reports it; the sample just does without
            texts = [t for d in docs for t in (d if isinstance(d, tuple) else (d,))]
            lines = [s for t in texts for s in t.split("\n") if s.strip()]
            lines = lines[: per_file - taken]
            sample += lines
            taken += len(lines)
            if taken >= per_file or len(sample) >= opts.tokenizer_sample:
                break
        if len(sample) >= opts.tokenizer_sample:
            break
    return sample[: opts.tokenizer_sample]


def get_tokenizer(
    files: Sequence[Path], opts: PrepareOptions, *, tokenizer: str, vocab_size: int
) -> Tokenizer:
    """The given tokenizer, or one trained on a sample of files with vocab_size pieces."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    return train_tokenizer(sample_sentences(files, opts), vocab_size=vocab_size)


# ---------------------------------------------------------------- workers


@dataclass
class ItemResult:
    """Tokens of one Item, split into train and val, or the reason its file must be skipped."""

    file_index: int
    last: bool
    num_bytes: int
    error: str = ""
    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    num_documents: dict[str, int] = field(default_factory=dict)
    num_empty: int = 0


_worker: dict = {}


def init_worker(model_proto: bytes, opts: PrepareOptions, file_kinds: list[bool]) -> None:
    """Pool initializer: the tokenizer and options live in each worker once, not in every task."""
    tok = Tokenizer(model_proto)
    _worker.update(tok=tok, opts=opts, jsonl=file_kinds, dtype=token_dtype(tok.vocab_size))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


HASH_BYTES = 8


def content_hash(content: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(content, digest_size=HASH_BYTES).digest(), "little")


def is_val(content: bytes, val_fraction: float) -> bool:
    """Stable split: the document's content hash, read as a number in [0, 1)."""
    return hash_is_val(content_hash(content), val_fraction)


def hash_is_val(doc_hash: int, val_fraction: float) -> bool:
    return doc_hash < val_fraction * 2.0 ** (8 * HASH_BYTES)


def encode_task(items: list[Item]) -> list[ItemResult]:
    return [encode_item(item) for item in items]


def encode_item(item: Item) -> ItemResult:
    tok: Tokenizer = _worker["tok"]
    opts: PrepareOptions = _worker["opts"]
    res = ItemResult(item.file_index, item.last, item.size, error=item.error)
    if item.error:
        return res
    try:
        docs = parse_documents(
            item, jsonl=_worker["jsonl"][item.file_index], fmt=opts.format, text_key=opts.text_key
        )
    except DocumentError as e:
        res.error = str(e)
        return res
    if item.doc_hash is not None:
        return _encode_piece(item, docs[0], tok, opts, res)
    if opts.format == "sft":
        kept = [(p, r) for p, r in docs if r.strip()]
        flat = tok.encode_batch([t for pr in kept for t in pr])
        # BOS prompt <sep> response EOS: the dataset finds the loss span again from <sep> and EOS.
        encoded = [[*flat[2 * i], tok.sep_id, *flat[2 * i + 1]] for i in range(len(kept))]
        contents = [(p + "\0" + r).encode() for p, r in kept]
    else:
        kept = [d for d in docs if d.strip()]
        encoded = tok.encode_batch(kept)
        contents = [d.encode() for d in kept]
    res.num_empty = len(docs) - len(kept)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    res.num_documents = dict.fromkeys(SPLITS, 0)
    for ids, content in zip(encoded, contents, strict=True):
        split = "val" if is_val(content, opts.val_fraction) else "train"
        out[split].append(tok.bos_id)
        out[split] += ids
        out[split].append(tok.eos_id)
        res.num_documents[split] += 1
    res.tokens = {s: np.array(out[s], dtype=_worker["dtype"]) for s in SPLITS}
    return res


def _encode_piece(
    item: Item, text: str, tok: Tokenizer, opts: PrepareOptions, res: ItemResult
) -> ItemResult:
    """A piece of a long text document: BOS only on the first, EOS only on the last."""
    ids = tok.encode(text) if item.opens else tok.encode_continuation(text)
    split = "val" if hash_is_val(item.doc_hash or 0, opts.val_fraction) else "train"
    tokens = [tok.bos_id] * item.opens + ids + [tok.eos_id] * item.closes
    res.num_documents = {s: int(s == split and item.closes) for s in SPLITS}
    res.tokens = {
        s: np.array(tokens if s == split else [], dtype=_worker["dtype"]) for s in SPLITS
    }
    return res


# ---------------------------------------------------------------- writing


class ShardWriter:
    """Appends one split's tokens to numbered shards; can roll back to a mark within the shard."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split = out_dir, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "num_tokens"} of closed shards
        self.file: BinaryIO | None = None
        self.count = 0  # tokens in the open shard

    def write(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        if self.file is None:
            name = f"{self.split}_{len(self.shards):06d}.bin"
            # Open across many writes and files; close() ends it.
            self.file = open(self.out_dir / name, "wb")  # noqa: SIM115
            self.shards.append({"file": name, "num_tokens": 0})
        # Shards are raw little-endian ids whatever the machine.
        self.file.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.count += len(tokens)

    def mark(self) -> int:
        return self.count

    def rollback(self, mark: int) -> None:
        if self.file is not None:
            self.file.truncate(mark * self.dtype.itemsize)
            self.file.seek(mark * self.dtype.itemsize)
            self.count = mark

    def end_file(self) -> None:
        """Between input files (never within one, so rollback stays inside one shard)."""
        if self.count >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.file is None:
            return
        self.file.close()
        self.file = None
        self.shards[-1]["num_tokens"] = self.count
        if not self.count:  # every file written to it was rolled back
            (self.out_dir / self.shards.pop()["file"]).unlink()
        self.count = 0


class Progress:
    """One status line on stderr: files, documents/s, tokens/s, ETA (by input bytes)."""

    def __init__(self, *, total_files: int, total_bytes: int, enabled: bool) -> None:
        self.total_files, self.total_bytes, self.enabled = total_files, max(total_bytes, 1), enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.width = 0

    def update(self, *, files: int, docs: int, tokens: int, done_bytes: int, final=False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        frac = done_bytes / self.total_bytes
        eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
        line = (
            f"prepare {files}/{self.total_files} files {frac:6.1%} | {docs / dt:,.0f} docs/s | "
            f"{tokens / dt / 1e6:.2f}M tok/s | {tokens:,} tokens | "
            + (f"done in {dt:.1f}s" if final else f"ETA {eta:.0f}s")
        )
        if self.tty:  # redraw in place, blanking what a longer previous line left behind
            line, self.width = "\r" + line.ljust(self.width), max(self.width, len(line))
        print(line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


@dataclass
class Totals:
    num_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    num_documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    num_empty: int = 0

    def add(self, res: ItemResult) -> None:
        for s in SPLITS:
            self.num_tokens[s] += len(res.tokens[s])
            self.num_documents[s] += res.num_documents.get(s, 0)
        self.num_empty += res.num_empty

    def copy(self) -> Totals:
        return Totals(dict(self.num_tokens), dict(self.num_documents), self.num_empty)


def _tasks(files: Sequence[Path], fields: tuple[str, ...], abandoned: set[int]
           ) -> Iterator[list[Item]]:
    """Items grouped into tasks of about TASK_BYTES, in file order."""
    task: list[Item] = []
    size = 0
    for k, path in enumerate(files):
        for item in read_items(path, k, fields=fields):
            task.append(item)
            size += item.size
            if size >= TASK_BYTES:
                yield task
                task, size = [], 0
            if k in abandoned:  # a worker already found this file bad: stop reading it
                break
    if task:
        yield task


def _start_method() -> str:
    """fork starts workers in milliseconds, spawn in about a second; but forking a process whose
    torch or gloo threads are running (the trainer's) can deadlock the child, so spawn there."""
    if "torch" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return "fork"


def _results(files: Sequence[Path], tok: Tokenizer, opts: PrepareOptions, abandoned: set[int]):
    """ItemResults in file order, from a pool of spawned workers (or in-process for one)."""
    init = (tok.model_proto, opts, [is_jsonl(p) for p in files])
    n = opts.num_workers()
    if n == 1:
        init_worker(*init)
        for task in _tasks(files, record_fields(opts), abandoned):
            yield from encode_task(task)
        return
    with multiprocessing.get_context(_start_method()).Pool(n, init_worker, init) as pool:
        pending: deque = deque()
        tasks = _tasks(files, record_fields(opts), abandoned)
        while True:
            # A bounded window keeps memory flat when reading outruns tokenising.
            while len(pending) < 4 * n and (task := next(tasks, None)) is not None:
                pending.append(pool.apply_async(encode_task, (task,)))
            if not pending:
                return
            yield from pending.popleft().get()


def file_size(path: Path) -> int:
    """Bytes of a file for the progress bar; one that cannot be read is skipped later, by name."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tokenize_files(
    files: Sequence[Path], tok: Tokenizer, opts: PrepareOptions, out_dir: Path
) -> tuple[Totals, list[dict], dict[str, list[dict]]]:
    """Write the split shards of files into out_dir; returns totals, skipped files and shards."""
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out_dir, s, dtype, opts.shard_tokens) for s in SPLITS}
    sizes = [file_size(p) for p in files]
    progress = Progress(total_files=len(files), total_bytes=sum(sizes), enabled=opts.progress)
    totals, skipped, abandoned = Totals(), [], set()
    current, failed, done_files, done_bytes = -1, False, 0, 0
    marks: dict[str, int] = {}
    before = totals.copy()
    for res in _results(files, tok, opts, abandoned):
        if res.file_index != current:
            current, failed, before = res.file_index, False, totals.copy()
            marks = {s: w.mark() for s, w in writers.items()}
        if not failed and res.error:
            failed = True
            abandoned.add(current)
            for s, w in writers.items():
                w.rollback(marks[s])
            totals = before
            skipped.append({"path": str(files[current]), "reason": res.error})
        elif not failed:
            for s, w in writers.items():
                w.write(res.tokens[s])
            totals.add(res)
        if res.last:
            docs = sum(totals.num_documents.values()) - sum(before.num_documents.values())
            if not failed and not docs:
                skipped.append({"path": str(files[current]), "reason": EMPTY})
            for w in writers.values():
                w.end_file()
            done_files += 1
            done_bytes += sizes[current]
        progress.update(
            files=done_files,
            docs=sum(totals.num_documents.values()),
            tokens=sum(totals.num_tokens.values()),
            done_bytes=done_bytes,
        )
    for w in writers.values():
        w.close()
    progress.update(
        files=done_files,
        docs=sum(totals.num_documents.values()),
        tokens=sum(totals.num_tokens.values()),
        done_bytes=done_bytes,
        final=True,
    )
    return totals, skipped, {s: w.shards for s, w in writers.items()}


def build(
    inputs: Sequence[str],
    out_dir: Path,
    opts: PrepareOptions,
    *,
    tokenizer: str = "",
    vocab_size: int = 32_000,
    key: str = "--input",
) -> dict:
    """Fill the empty directory out_dir with tokenizer.model, shards and (last) meta.json."""
    opts.validate()
    files = collect_files(inputs, key=key)
    tok = get_tokenizer(files, opts, tokenizer=tokenizer, vocab_size=vocab_size)
    totals, skipped, shards = tokenize_files(files, tok, opts, out_dir)
    meta = dataset_meta(inputs, opts, tok, tokenizer, totals, skipped, shards, len(files), key=key)
    tok.save(out_dir / "tokenizer.model")
    # meta.json last: its presence is what "complete" means.
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def dataset_meta(
    inputs: Sequence[str],
    opts: PrepareOptions,
    tok: Tokenizer,
    tokenizer: str,
    totals: Totals,
    skipped: list[dict],
    shards: dict[str, list[dict]],
    num_files: int,
    *,
    key: str,
) -> dict:
    """meta.json of a prepared directory; no usable document at all is a ValueError."""
    num_documents = sum(totals.num_documents.values())
    if not num_documents:
        first = f" (first skipped: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise ValueError(
            f"{key}={' '.join(inputs)!r}: none of {num_files} files held a usable document{first}"
        )
    return {
        "version": META_VERSION,
        "format": opts.format,
        "dtype": token_dtype(tok.vocab_size).name,
        "num_tokens": sum(totals.num_tokens.values()),
        "num_documents": num_documents,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "sep_id": tok.sep_id,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_source": tokenizer or f"trained on {opts.tokenizer_sample} sampled lines",
        "splits": {
            s: {
                "num_tokens": totals.num_tokens[s],
                "num_documents": totals.num_documents[s],
                "shards": shards[s],
            }
            for s in SPLITS
        },
        "val_fraction": opts.val_fraction,
        "text_key": opts.text_key,
        "inputs": list(inputs),
        "num_files": num_files,
        "num_empty_documents": totals.num_empty,
        "skipped": skipped,
    }


# ---------------------------------------------------------------- publishing


TMP_TAG = ".tmp-"
# A build on another host is presumed dead when nothing in its directory changed for this long:
# longer than training any tokenizer on a bounded sample, or writing one block of shards.
STALE_BUILD_S = 6 * 3600


def remove_stale_builds(cache: Path) -> list[Path]:
    """Delete the temporary directories of cache builds whose process is gone (killed, node lost):
    on this host, when their pid is no longer running; from another host (a shared file system),
    when untouched for STALE_BUILD_S. Returns what was removed."""
    removed = []
    host, now = socket.gethostname(), time.time()
    for d in cache.glob(f".*{TMP_TAG}*"):
        owner = d.name.rsplit(TMP_TAG, 1)[1]
        parts = owner.rsplit("-", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            mtime = max([d.stat().st_mtime] + [p.stat().st_mtime for p in d.iterdir()])
        except OSError:
            continue  # finished or removed meanwhile
        if (parts[0] == host and not pid_alive(int(parts[1]))) or now - mtime > STALE_BUILD_S:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed





def publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the finished tmp to out, replacing an old out only when asked."""
    if out.exists() and overwrite:
        trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, out)  # onto an empty directory too; anything else was refused earlier
