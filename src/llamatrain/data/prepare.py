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

import json
import multiprocessing
import os
import random
import shutil
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from llamatrain.checkpoint.runlock import pid_alive
from llamatrain.data import readers
from llamatrain.data.readers import (
    HASH_BYTES,
    DocumentError,
    Item,
    cleaning_records,
    collect_files,
    content_hash,
    is_jsonl,
    parse_documents,
    read_items,
)
from llamatrain.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMATS = ("pretrain", "sft")


SPLITS = ("train", "val")


EMPTY = "empty (no non-empty document)"


META_VERSION = 1


# 512 MiB of uint16 per shard: big enough to keep file counts low, small enough to copy around.
SHARD_TOKENS = 1 << 28


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


def record_fields(opts: PrepareOptions) -> tuple[str, ...]:
    """Fields of a .jsonl record or columns of a parquet file that hold a document."""
    return ("prompt", "response") if opts.format == "sft" else (opts.text_key,)


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
            if size >= readers.TASK_BYTES:
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
        # The clean runs (options, report digest) that wrote the inputs that are clean outputs.
        "cleaning": cleaning_records(inputs),
    }


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
