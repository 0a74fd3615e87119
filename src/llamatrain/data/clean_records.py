"""The records of `python -m llamatrain.data clean` in and out of datatrove: each input record as
a Document that keeps all of the record (read through llamatrain.data.readers, a bad file skipped
whole), the shards a stage writes back with every field and column type, and each step's account
of what it removed."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from llamatrain.data.parts import part_range
from llamatrain.data.readers import (
    DocumentError,
    Item,
    is_jsonl,
    is_parquet,
    parse_records,
    read_items,
)

if TYPE_CHECKING:
    from llamatrain.data.clean import CleanOptions

# Where the columns of a record go for the stages after `filter`; stripped from the output.
SOURCE_FIELD = "__llamatrain_source"

# A file's records are held until all of it parses (a bad file is skipped whole, as prepare does);
# past this many bytes it is parsed twice instead: once to check, once to stream.
HOLD_BYTES = 64 << 20

# Characters of a removed document kept in its sample.
SAMPLE_CHARS = 4000


class Account:
    """What one step did in one task: documents and text bytes removed, by reason, by domain,
    other counts, and the first removed documents as samples; saved as JSON when the step ends.
    Given to datatrove's filters as their exclusion writer (it only needs `with` and write())."""

    def __init__(self, folder: Path, step: str, rank: int, *, samples: int) -> None:
        self.path = folder / f"{step}-{rank:05d}.json"
        self.samples_wanted = samples
        self.data: dict[str, Any] = {"documents": 0, "bytes": 0, "reasons": Counter(),
                                     "domains": Counter(), "counts": Counter(), "samples": []}

    def __enter__(self) -> Account:
        return self

    def __exit__(self, *exc: object) -> None:
        self.save()

    def write(self, doc: Document, rank: int = 0, **_: Any) -> None:
        d = self.data
        d["documents"] += 1
        d["bytes"] += len(doc.text.encode())
        reason = doc.metadata.get("filter_reason", "")
        if reason:
            d["reasons"][reason] += 1
        if domain := doc.metadata.get("blocked_domain"):
            d["domains"][domain] += 1
        if len(d["samples"]) < self.samples_wanted:
            d["samples"].append({"source": doc.metadata["source"], "url": doc.metadata["url"],
                                 "reason": reason, "chars": len(doc.text),
                                 "text": doc.text[:SAMPLE_CHARS]})

    def count(self, key: str, value: int = 1) -> None:
        self.data["counts"][key] += value

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)


def _document(record: dict, *, opts: CleanOptions, source: str, rank: int,
              schema: Any) -> Document:
    url = record.get(opts.url_key)
    return Document(text=record[opts.text_key], id=source, metadata={
        "record": record, "source": source, "task": rank, "schema": schema,
        "url": url if isinstance(url, str) and url.strip() else None})


def _file_records(path: Path, k: int, keys: tuple[str, ...]) -> Iterator[tuple[dict, Any]]:
    """(record, parquet schema or None) of one file, only once all of it has parsed: a bad file
    raises DocumentError before anything of it is used. A text file is one record."""
    jsonl = is_jsonl(path)

    def records(item: Item) -> list[dict]:
        if item.error:
            raise DocumentError(item.error)
        return parse_records(item, jsonl=jsonl, keys=keys)

    items = read_items(path, k, fields=keys, all_columns=True)
    if not jsonl and not is_parquet(path):
        # A long text document comes in pieces cut at newlines: one record of them all.
        pieces = list(items)
        if pieces[-1].error:
            raise DocumentError(pieces[-1].error)
        whole = Item(k, b"".join(p.data for p in pieces), last=True)
        yield from ((r, None) for r in records(whole))
        return
    held, size = [], 0
    for item in items:
        held.append((records(item), item.schema))
        size += item.size
        if size > HOLD_BYTES:
            break
    else:
        yield from ((r, schema) for recs, schema in held for r in recs)
        return
    for item in items:  # too big to hold: check the rest, then read it all again
        records(item)
    for item in read_items(path, k, fields=keys, all_columns=True):
        yield from ((r, item.schema) for r in records(item))


class InputReader(PipelineStep):
    """Share `rank` of `world_size` of the input files (contiguous, balanced by bytes, as prepare
    parts are) as Documents; a file that cannot be read or parsed is skipped and named."""

    type = "📖 - READER"
    name = "llamatrain input files"

    def __init__(self, plan: dict[str, Any], opts: CleanOptions, account: Account) -> None:
        super().__init__()
        self.files, self.sizes = plan["files"], plan["sizes"]
        self.opts, self.account = opts, account

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        lo, hi = part_range(self.sizes, rank, world_size)
        acct = self.account.data
        acct.update(files=[lo, hi], skipped=[])
        keys = (self.opts.text_key,)
        with self.account:
            for k in range(lo, hi):
                path, n = Path(self.files[k]), 0
                try:
                    for record, schema in _file_records(path, k, keys):
                        n += 1
                        doc = _document(record, opts=self.opts, source=f"{path}#{n}", rank=rank,
                                        schema=schema)
                        acct["documents"] += 1
                        acct["bytes"] += len(doc.text.encode())
                        yield doc
                except DocumentError as e:
                    if n:  # only a file that changed while read gets here
                        raise ValueError(f"{path} changed while read ({e}); rerun this task"
                                         ) from None
                    acct["skipped"].append({"path": str(path), "reason": str(e)})


class ShardReader(PipelineStep):
    """The records task `rank` wrote into `folder` (work/filtered/), in order, as Documents."""

    type = "📖 - READER"
    name = "llamatrain filtered shards"

    def __init__(self, folder: Path, opts: CleanOptions) -> None:
        super().__init__()
        self.folder, self.opts = folder, opts

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        keys = (self.opts.text_key, SOURCE_FIELD)
        for path in _rank_files(self.folder, rank):
            for item in read_items(path, 0, fields=keys, all_columns=True):
                if item.error:
                    raise ValueError(f"{path}: {item.error} (rerun --stage filter)")
                schema = item.schema
                if schema is not None:
                    schema = schema.remove(schema.get_field_index(SOURCE_FIELD))
                for record in parse_records(item, jsonl=is_jsonl(path), keys=keys):
                    source = record.pop(SOURCE_FIELD)
                    yield _document(record, opts=self.opts, source=source, rank=rank,
                                    schema=schema)


def _rank_files(folder: Path, rank: int) -> list[Path]:
    return sorted(folder.glob(f"{rank:05d}_*.*"))


class RecordWriter(PipelineStep):
    """Writes each Document's record, its text in place, to `folder`/RANK_PART.parquet|.jsonl:
    the input's fields and (parquet inputs) its column types. A parquet part ends where the
    records' schema changes. Earlier files of this rank are removed first (a rerun)."""

    type = "💽 - WRITER"
    name = "llamatrain records"

    def __init__(self, folder: Path, opts: CleanOptions, account: Account, *,
                 keep_source: bool) -> None:
        super().__init__()
        self.folder, self.opts, self.account = folder, opts, account
        self.keep_source = keep_source

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in _rank_files(self.folder, rank):
            old.unlink()
        writer = (_ParquetParts if self.opts.output_format == "parquet" else _JsonlParts)(
            self.folder, rank)
        acct = self.account.data
        seen: tuple[Any, Any] = (None, None)  # (input schema, with the source column)
        with self.account:
            try:
                for doc in data:
                    record = dict(doc.metadata["record"])
                    record[self.opts.text_key] = doc.text
                    schema = doc.metadata["schema"]
                    if self.keep_source:
                        record[SOURCE_FIELD] = doc.metadata["source"]
                        if schema is not None:
                            if schema is not seen[0]:
                                seen = (schema, _with_source(schema))
                            schema = seen[1]
                    writer.add(record, schema)
                    acct["documents"] += 1
                    acct["bytes"] += len(doc.text.encode())
                    yield doc
            finally:
                writer.close()
            acct["shards"] = [{"file": p.name, "documents": n} for p, n in writer.parts]


def _with_source(schema: Any) -> Any:
    import pyarrow as pa

    return schema.append(pa.field(SOURCE_FIELD, pa.string()))


def _same_schema(a: Any, b: Any) -> bool:
    return a is b or (a is not None and b is not None and a.equals(b))


class _JsonlParts:
    """Records as JSON lines, one file per task."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.path = folder / f"{rank:05d}_000.jsonl"
        self.file: Any = None
        self.parts: list[tuple[Path, int]] = []

    def add(self, record: dict, schema: Any) -> None:
        if self.file is None:
            self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
            self.parts.append((self.path, 0))
        try:
            line = json.dumps(record, ensure_ascii=False)
        except TypeError as e:
            raise ValueError(f"a record of {record.get(SOURCE_FIELD, 'the input')} is not JSON "
                             f"({e}); allowed: --output-format parquet") from None
        self.file.write(line + "\n")
        self.parts[-1] = (self.path, self.parts[-1][1] + 1)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _ParquetParts:
    """Records as parquet row groups of up to BATCH rows; a new part where the schema changes.
    Records that came from parquet keep their file's schema; others' types are inferred."""

    BATCH = 1000

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder, self.rank = folder, rank
        self.rows: list[dict] = []
        self.schema: Any = None
        self.writer: Any = None
        self.parts: list[tuple[Path, int]] = []

    def add(self, record: dict, schema: Any) -> None:
        if self.rows and not _same_schema(schema, self.schema):
            self.flush()
        self.schema = schema
        self.rows.append(record)
        if len(self.rows) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        try:
            if self.schema is not None:
                table = pa.Table.from_pylist(self.rows, schema=self.schema)
            else:
                names = list(dict.fromkeys(k for r in self.rows for k in r))
                table = pa.Table.from_pydict({k: [r.get(k) for r in self.rows] for k in names})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"records of {self.rows[0].get(SOURCE_FIELD, 'the input')} do not "
                             f"fit one parquet schema ({e}); allowed: --output-format jsonl"
                             ) from None
        if self.writer is not None and table.schema != self.writer.schema:
            try:
                table = table.cast(self.writer.schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, NotImplementedError):
                self.writer.close()
                self.writer = None
        if self.writer is None:
            path = self.folder / f"{self.rank:05d}_{len(self.parts):03d}.parquet"
            self.writer = pq.ParquetWriter(path, table.schema)
            self.parts.append((path, 0))
        self.writer.write_table(table)
        path, n = self.parts[-1]
        self.parts[-1] = (path, n + table.num_rows)
        self.rows = []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
