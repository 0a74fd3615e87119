"""Input files as documents: find the files of the inputs (directories walked in sorted order; a
directory that `clean` wrote is read as the shards its report lists) and stream each one,
decompressed, as pieces (blocks of text, whole .jsonl lines, parquet row batches) that parse into
documents or whole records. Memory is bounded by the block size, not the file size; a file that is
not what its format promises raises DocumentError, a read error becomes an error item."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import itertools
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

try:
    import zstandard
except ImportError:  # optional: only .zst inputs need it, and collect_files says so for them
    zstandard = None

STDLIB = "python-stdlib"


# What a file that cannot be read raises while it is read (it becomes an error item).
READ_ERRORS = (OSError, EOFError, zlib.error) + ((zstandard.ZstdError,) if zstandard else ())

# Work handed to a worker at a time: large enough to amortise pickling, small enough to balance.
TASK_BYTES = 1 << 18


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


# What `clean` writes last into its output directory: its presence means the directory is complete,
# and it lists the shards (in order) that are the cleaned corpus. Until then its plan is there.
CLEAN_REPORT = "clean_report.json"
CLEAN_PLAN = "work/plan.json"


def clean_report(directory: Path) -> dict | None:
    """The report of a directory that `clean` completed, else None."""
    path = Path(directory) / CLEAN_REPORT
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def cleaning_record(directory: Path) -> dict:
    """What a prepared dataset records of a cleaned input: where, the options, the report's
    digest and its document counts."""
    path = Path(directory) / CLEAN_REPORT
    data = path.read_bytes()
    report = json.loads(data)
    return {"dir": str(directory), "report_sha256": hashlib.sha256(data).hexdigest(),
            "options": report["options"], "documents_in": report["in"]["documents"],
            "documents_out": report["out"]["documents"]}


def cleaning_records(inputs: Sequence[str]) -> list[dict]:
    """cleaning_record of every input that is a cleaned directory."""
    return [cleaning_record(Path(i).expanduser()) for i in inputs
            if i != STDLIB and (Path(i).expanduser() / CLEAN_REPORT).is_file()]


def collect_files(inputs: Sequence[str], *, key: str = "--input") -> list[Path]:
    """Input files in processing order: inputs as given, each directory walked in sorted order, a
    cleaned directory as its report's shards."""
    files: list[Path] = []
    for inp in inputs:
        p = Path(inp).expanduser()
        if inp == STDLIB:
            files += stdlib_files()
        elif p.is_file():
            files.append(p)
        elif p.is_dir() and (report := clean_report(p)) is not None:
            files += [p / shard["file"] for shard in report["shards"]]
        elif p.is_dir() and (p / CLEAN_PLAN).is_file():
            raise ValueError(f"{key}={inp!r} is a clean output that is not finished (no "
                             f"{CLEAN_REPORT}); finish or rerun the clean first")
        elif p.is_dir():
            files += _walk(p, set())
        else:
            raise ValueError(f"{key}={inp!r} does not exist; allowed: files, directories, {STDLIB}")
    if not files:
        raise ValueError(f"{key}={' '.join(inputs)!r} holds no input files")
    zst = [f for f in files if f.name.endswith(".zst")]
    if zst and zstandard is None:
        raise ValueError(f"{key}={' '.join(inputs)!r}: {len(zst)} .zst file(s), e.g. "
                         f"{str(zst[0])!r}, and the zstandard package is not installed "
                         "(pip install zstandard)")
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
    # Rows of a parquet file: column -> values, already read by pyarrow (data is then empty), and
    # the file's schema when every column was read (so that a record can be written back as is).
    rows: dict[str, list] | None = None
    rows_bytes: int = 0
    schema: object = None

    @property
    def size(self) -> int:
        return len(self.data) + self.rows_bytes


# Rows per parquet piece: pyarrow reads one row group at a time and hands out this many rows.
PARQUET_ROWS = 1024


def read_items(path: Path, file_index: int, *, fields: tuple[str, ...] = ("text",),
               scan: bool = True, all_columns: bool = False) -> Iterator[Item]:
    """A file's pieces in order; the last one has last=True. Read errors become an error item.

    Memory is bounded by the block size (a row group for parquet), not the file size. scan=False
    skips the first pass over a long text document (its hash and checks), for reading a sample.
    all_columns reads every column of a parquet file, not only `fields` (which must be there).
    """
    try:
        if is_parquet(path):
            yield from _parquet_items(path, file_index, fields, all_columns=all_columns)
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
    except READ_ERRORS as e:
        yield Item(file_index, b"", last=True, error=f"cannot read: {e}")


def _parquet_items(path: Path, file_index: int, fields: tuple[str, ...], *,
                   all_columns: bool = False) -> Iterator[Item]:
    """The document columns (or all columns) of a parquet file, streamed row group by row group."""
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
            columns = None if all_columns else list(fields)
            schema = pf.schema_arrow if all_columns else None
            for batch in pf.iter_batches(batch_size=PARQUET_ROWS, columns=columns):
                rows = batch.to_pydict()
                size = sum(len(v) for col in rows.values() for v in col if isinstance(v, str))
                yield Item(file_index, b"", first_line=row, rows=rows, rows_bytes=size,
                           schema=schema)
                row += batch.num_rows
    except pa.ArrowException as e:
        yield Item(file_index, b"", last=True, error=f"cannot read: {e}")
        return
    yield Item(file_index, b"", first_line=row, last=True,
               rows={f: [] for f in (names if all_columns else fields)}, schema=schema)


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
    if item.rows is None and not jsonl and fmt == "sft":
        raise DocumentError(
            'sft needs .jsonl lines of {"prompt": ..., "response": ...} or parquet columns'
        )
    records = parse_records(item, jsonl=jsonl, keys=keys)
    if fmt == "sft":
        return [(r["prompt"], r["response"]) for r in records]
    return [r[text_key] for r in records]


def parse_records(item: Item, *, jsonl: bool, keys: tuple[str, ...]) -> list[dict]:
    """Whole records of a piece, every one with string `keys`: a .jsonl line's object, a parquet
    row (the columns that were read), or a text file's {keys[0]: text}."""
    if item.rows is not None:
        names = list(item.rows)
        records = []
        for i, values in enumerate(zip(*item.rows.values(), strict=True)):
            record = dict(zip(names, values, strict=True))
            if not all(isinstance(record[k], str) for k in keys):
                wanted = ", ".join(repr(k) for k in keys)
                found = ", ".join(type(record[k]).__name__ for k in keys)
                raise DocumentError(f"row {item.first_line + i + 1}: expected string column(s) "
                                    f"{wanted}, found {found}")
            records.append(record)
        return records
    try:
        text = item.data.decode("utf-8")
    except UnicodeDecodeError as e:
        if jsonl:
            where = f"line {item.first_line + item.data.count(NEWLINE, 0, e.start) + 1}"
        else:
            where = f"byte {e.start}"
        raise DocumentError(f"not valid UTF-8 ({where}: {e.reason})") from None
    if not jsonl:
        return [{keys[0]: text}]
    records = []
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
        records.append(obj)
    return records


HASH_BYTES = 8


def content_hash(content: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(content, digest_size=HASH_BYTES).digest(), "little")
