"""A run's sources prepared once: each `data.source` (or every source of a weighted `data.mix`,
with one shared tokenizer) is tokenised into the cache under a key of everything that shapes its
shards, by one process per node, published atomically; a prepared directory is used as it is.
Each prepared directory's identity (meta.json) is what a resume checks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llamatrain.config import DataConfig
from llamatrain.data.prepare import (
    FORMATS,
    TMP_TAG,
    PrepareOptions,
    build,
    get_tokenizer,
    remove_stale_builds,
)
from llamatrain.data.readers import CLEAN_REPORT, STDLIB, cleaning_record, collect_files
from llamatrain.data.tokenizer import TRAINER_SETTINGS, load_tokenizer

# Bump when the shard layout or tokenisation changes, so old cache entries are not reused.
CACHE_VERSION = 1


def _options(cfg: DataConfig) -> PrepareOptions:
    return PrepareOptions(
        format=cfg.format,
        text_key=cfg.text_key,
        val_fraction=cfg.val_fraction,
        workers=cfg.workers,
        tokenizer_sample=cfg.tokenizer_sample,
    )


def read_meta(path: Path) -> dict:
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"dataset: {str(path)!r} has no meta.json; run `prepare` on it first")
    return json.loads(meta_path.read_text())


def dataset_identity(path: str | Path) -> dict[str, Any]:
    """What tells one prepared dataset from another, for a run's identity: its format, tokenizer
    and token counts per split (not where its files were read from, so a moved corpus is the
    same data)."""
    meta = read_meta(Path(path))
    return {"format": meta["format"], "tokenizer_sha256": meta["tokenizer_sha256"],
            "vocab_size": meta["vocab_size"],
            "splits": {s: {"num_tokens": v["num_tokens"], "num_documents": v["num_documents"]}
                       for s, v in sorted(meta["splits"].items())}}


def _source_identity(source: str, *, key: str = "data.source") -> dict[str, Any]:
    """What names a source in the cache key: the stdlib by interpreter, a path by its top-level
    stat. Edits deep inside a directory are not seen (walking a huge corpus on every rank would
    cost more than it saves); delete the cache entry after changing files in place."""
    if source == STDLIB:
        return {"source": STDLIB, "python": sys.version, "prefix": sys.base_prefix}
    p = Path(source).expanduser()
    if not p.exists():
        raise ValueError(
            f"{key}={source!r} does not exist; allowed: {STDLIB}, or a file or directory"
        )
    st = p.stat()
    identity = {"source": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if (p / CLEAN_REPORT).is_file():  # cleaned again in place: other shards
        identity["clean_report_sha256"] = cleaning_record(p)["report_sha256"]
    return identity


def cache_key(cfg: DataConfig, *, vocab_size: int) -> str:
    """Hash of everything that changes the prepared shards (not the worker count)."""
    if cfg.tokenizer:
        tokenizer: dict[str, Any] = {"sha256": load_tokenizer(cfg.tokenizer).sha256}
    else:
        tokenizer = {
            "vocab_size": vocab_size,
            "sample": cfg.tokenizer_sample,
            "settings": TRAINER_SETTINGS,
        }
    key = {
        "version": CACHE_VERSION,
        **_source_identity(cfg.source),
        "format": cfg.format,
        "text_key": cfg.text_key,
        "val_fraction": cfg.val_fraction,
        "tokenizer": tokenizer,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def check_vocabulary(path: Path, meta: dict, *, vocab_size: int) -> None:
    """The prepared directory's tokenizer.model is the one its shards were made with, and its
    vocabulary fits the model's."""
    tok = load_tokenizer(path / "tokenizer.model")
    if tok.sha256 != meta["tokenizer_sha256"] or tok.vocab_size != meta["vocab_size"]:
        raise ValueError(
            f"dataset {str(path)!r}: tokenizer.model ({tok.vocab_size} pieces, sha256 "
            f"{tok.sha256[:12]}) is not the tokenizer its shards were prepared with "
            f"({meta['vocab_size']} pieces, sha256 {meta['tokenizer_sha256'][:12]})"
        )
    if meta["vocab_size"] > vocab_size:
        raise ValueError(
            f"model vocab_size={vocab_size} is smaller than the tokenizer's {meta['vocab_size']} "
            f"of {str(path)!r}; allowed: vocab_size >= {meta['vocab_size']}"
        )


def _check_prepared(path: Path, cfg: DataConfig, *, vocab_size: int) -> None:
    meta = read_meta(path)
    if meta["format"] != cfg.format:
        raise ValueError(
            f"data.format={cfg.format!r} but {str(path)!r} was prepared as {meta['format']!r}"
        )
    check_vocabulary(path, meta, vocab_size=vocab_size)
    if cfg.tokenizer and load_tokenizer(cfg.tokenizer).sha256 != meta["tokenizer_sha256"]:
        raise ValueError(
            f"data.tokenizer={cfg.tokenizer!r} is not the tokenizer {str(path)!r} was prepared with"
        )


def prepare_source(cfg: DataConfig, *, vocab_size: int) -> Path:
    """Directory of the prepared `cfg.source`: prepared now into cfg.cache_dir unless cached.

    Several processes may call this at once (ranks, nodes on a shared file system): each builds in
    its own temporary directory and renames it into place; whoever loses the race discards its
    copy and returns the winner's. Temporary directories of killed builds are removed first. A
    prepared directory (with meta.json) is used as it is.
    """
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format={cfg.format!r}; allowed: {', '.join(FORMATS)}")
    if cfg.source != STDLIB and (Path(cfg.source).expanduser() / "meta.json").is_file():
        path = Path(cfg.source).expanduser()
        _check_prepared(path, cfg, vocab_size=vocab_size)
        return path
    if cfg.tokenizer:
        tok_vocab = load_tokenizer(cfg.tokenizer).vocab_size
        if tok_vocab > vocab_size:
            raise ValueError(
                f"data.tokenizer={cfg.tokenizer!r} has {tok_vocab} pieces, more than the model's "
                f"vocab_size={vocab_size}; allowed: vocab_size >= {tok_vocab}"
            )
    name = STDLIB if cfg.source == STDLIB else Path(cfg.source).expanduser().resolve().name
    cache = Path(cfg.cache_dir).expanduser()
    final = cache / f"{name}-{cfg.format}-{cache_key(cfg, vocab_size=vocab_size)}"
    if (final / "meta.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(cache)
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = cache / f".{final.name}{TMP_TAG}{owner}"
    tmp.mkdir()
    try:
        build(
            [cfg.source],
            tmp,
            _options(cfg),
            tokenizer=cfg.tokenizer,
            vocab_size=vocab_size,
            key="data.source",
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            # Lost the race to another process: its copy is identical; keep that one.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass(frozen=True)
class Source:
    """One source of a run: its name (metrics, report), where it is, its weight."""

    name: str
    source: str
    weight: float
    key: str  # the config key that names it, for error messages


def run_sources(cfg: DataConfig) -> list[Source]:
    """The sources of a run: data.mix, or data.source as a mixture of one."""
    if not cfg.mix:
        return [Source(_default_name(cfg.source), cfg.source, 1.0, "data.source")]
    sources, seen = [], set()
    for i, m in enumerate(cfg.mix):
        name = m.name or _default_name(m.source)
        if name in seen:
            name = f"{name}-{i}"
        seen.add(name)
        sources.append(Source(name, m.source, m.weight, f"data.mix[{i}].source"))
    return sources


def _default_name(source: str) -> str:
    return source if source == STDLIB else Path(source).expanduser().name or source


def _prepared(source: str) -> Path | None:
    p = Path(source).expanduser()
    return p if source != STDLIB and (p / "meta.json").is_file() else None


def shared_tokenizer(cfg: DataConfig, sources: list[Source], *, vocab_size: int) -> str:
    """The tokenizer every source of a mixture is prepared with: data.tokenizer; else the one the
    first prepared source was made with; else one trained once on a sample of all the sources'
    files, kept in the cache (several processes may train it at once: the same bytes)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    for s in sources:
        if (path := _prepared(s.source)) is not None:
            return str(path / "tokenizer.model")
    key = {
        "version": CACHE_VERSION,
        "sources": [_source_identity(s.source, key=s.key) for s in sources],
        "format": cfg.format,
        "text_key": cfg.text_key,
        "vocab_size": vocab_size,
        "sample": cfg.tokenizer_sample,
        "settings": TRAINER_SETTINGS,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir).expanduser()
    path = cache / f"tokenizer-{digest}.model"
    if not path.is_file():
        files = [f for s in sources for f in collect_files([s.source], key=s.key)]
        tok = get_tokenizer(files, _options(cfg), tokenizer="", vocab_size=vocab_size)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{path.name}{TMP_TAG}{socket.gethostname()}-{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, path)
    return str(path)


def prepare_sources(cfg: DataConfig, *, vocab_size: int) -> list[Path]:
    """Prepared directory of every source of the run, all made with one tokenizer."""
    sources = run_sources(cfg)
    if len(sources) == 1:
        return [prepare_source(replace(cfg, source=sources[0].source, mix=[]),
                               vocab_size=vocab_size)]
    for s in sources:
        _source_identity(s.source, key=s.key)  # a missing source first, before any work
    tokenizer = shared_tokenizer(cfg, sources, vocab_size=vocab_size)
    sha = load_tokenizer(tokenizer).sha256
    paths = []
    for s in sources:
        prepared = _prepared(s.source)
        if prepared is not None and read_meta(prepared)["tokenizer_sha256"] != sha:
            raise ValueError(
                f"{s.key}={s.source!r} was prepared with another tokenizer (sha256 "
                f"{read_meta(prepared)['tokenizer_sha256'][:12]}) than the mixture's "
                f"{tokenizer!r} (sha256 {sha[:12]}); allowed: sources prepared with one "
                "tokenizer (prepare --tokenizer MODEL)"
            )
        paths.append(prepare_source(replace(cfg, source=s.source, tokenizer=tokenizer, mix=[]),
                                    vocab_size=vocab_size))
    return paths
