"""The data API of the trainer: prepare a run's sources once into the cache (one `data.source`, or
a weighted `data.mix`), load their token shards as datasets of fixed-length samples, and hand them
out in the samplers' order.

A pretraining sample i is the window of seq_len + 1 tokens starting at token i * seq_len of the
split, packed across document boundaries as the paper does. An SFT sample packs whole examples
(BOS prompt <sep> response EOS) back to back into seq_len + 1 tokens and pads the rest; its labels
are -100 on the prompt, the separator and padding, so the loss covers answer tokens only (§3.1).

CLI:
  python -m llamatrain.data prepare --input PATH [PATH ...] --out DIR
      [--tokenizer MODEL | --vocab-size N] [--workers N] [--text-key KEY] ...
  python -m llamatrain.data prepare --input PATH [PATH ...] --out DIR --part I/N ...
  python -m llamatrain.data prepare --merge DIR
The --part form tokenises share I of N of the files (an array task of launch/prepare.sbatch);
--merge then writes DIR/meta.json, after which DIR is the same token stream as a one-process
prepare of the same inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llamatrain.config import DataConfig
from llamatrain.data_parts import build_part, merge, parse_part
from llamatrain.data_prepare import (
    EMPTY,
    FORMATS,
    STDLIB,
    TMP_TAG,
    PrepareOptions,
    build,
    collect_files,
    get_tokenizer,
    publish,
    remove_stale_builds,
)
from llamatrain.sampler import GlobalSampler, MixtureSampler
from llamatrain.tokenizer import TRAINER_SETTINGS, Tokenizer, load_tokenizer

if TYPE_CHECKING:
    import torch

__all__ = [
    "GlobalSampler",
    "MixtureSampler",
    "PretrainDataset",
    "SFTDataset",
    "TrainingData",
    "load_dataset",
    "open_training_data",
    "prepare_source",
    "prepare_sources",
]

IGNORE_INDEX = -100
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
    return {"source": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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


# ---------------------------------------------------------------- datasets


class TokenStream:
    """One split's shards, memory-mapped, read as one array.

    Opening checks every shard's size against meta.json (a truncated or missing .bin is an error,
    never a smaller dataset); every read checks its token ids against `limit` (the tokenizer's
    vocabulary), so a damaged shard is a ValueError naming the file and position rather than an
    IndexError inside the embedding. A max over what was read costs nothing next to a step.
    """

    def __init__(self, path: Path, meta: dict, split: str, *, limit: int | None = None) -> None:
        if split not in meta["splits"]:
            raise ValueError(f"split={split!r}; allowed: {', '.join(meta['splits'])}")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        shards = meta["splits"][split]["shards"]
        self.files = [path / s["file"] for s in shards]
        for shard, file in zip(shards, self.files, strict=True):
            check_shard_size(file, shard["num_tokens"], dtype.itemsize)
        self.arrays = [np.memmap(f, dtype=dtype, mode="r") for f in self.files]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.starts[-1])
        if self.num_tokens != meta["splits"][split]["num_tokens"]:
            raise ValueError(
                f"dataset {str(path)!r}: the {split} shards hold {self.num_tokens} tokens but "
                f"meta.json says {meta['splits'][split]['num_tokens']}; prepare it again"
            )
        self.limit = int(meta["vocab_size"] if limit is None else limit)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            a, offset = self.arrays[k], start + done - int(self.starts[k])
            n = min(length - done, len(a) - offset)
            chunk = out[done : done + n]
            chunk[:] = a[offset : offset + n]
            if n and int(chunk.max()) >= self.limit:
                self._bad_token(k, offset, chunk)
            done, k = done + n, k + 1
        return out

    def _bad_token(self, k: int, offset: int, chunk: np.ndarray) -> None:
        at = int(np.argmax(chunk >= self.limit))
        raise ValueError(
            f"dataset: token id {int(chunk[at])} >= vocabulary size {self.limit} at token "
            f"{offset + at} of {str(self.files[k])!r}: the shard is damaged; prepare the source "
            "again"
        )

    def positions_of(self, token_id: int) -> np.ndarray:
        """Every position of token_id in the stream."""
        found = [
            np.flatnonzero(a == token_id) + s
            for a, s in zip(self.arrays, self.starts[:-1], strict=True)
        ]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def check_shard_size(file: Path, num_tokens: int, itemsize: int) -> None:
    """A shard must exist and hold exactly the tokens meta.json records for it."""
    try:
        size = file.stat().st_size
    except OSError as e:
        raise ValueError(f"dataset: shard {str(file)!r} cannot be read ({e.strerror})") from None
    if size != num_tokens * itemsize:
        raise ValueError(
            f"dataset: shard {str(file)!r} has {size} bytes but meta.json records {num_tokens} "
            f"tokens ({num_tokens * itemsize} bytes): truncated or damaged; prepare it again"
        )


@dataclass
class _Dataset:
    path: Path
    meta: dict
    seq_len: int
    split: str
    stream: TokenStream = field(init=False, repr=False)
    _tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.stream = TokenStream(self.path, self.meta, self.split)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path / "tokenizer.model")
        return self._tokenizer

    def _check(self, indices: list[int]) -> None:
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"sample index {bad[0]} out of range [0, {len(self)})")

    def __len__(self) -> int:
        raise NotImplementedError


class PretrainDataset(_Dataset):
    """Sample i: tokens [i * seq_len, i * seq_len + seq_len + 1) of the split, shifted by one."""

    def __len__(self) -> int:
        return max(0, (self.stream.num_tokens - 1) // self.seq_len)

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        import torch  # here, not at the top: spawned `prepare` workers never pay for it

        self._check(indices)
        windows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            windows[row] = self.stream.read(i * self.seq_len, self.seq_len + 1)
        return {
            "input_ids": torch.from_numpy(windows[:, :-1].copy()),
            "labels": torch.from_numpy(windows[:, 1:].copy()),
        }


class SFTDataset(_Dataset):
    """Examples packed greedily, in stored order, into samples of seq_len + 1 tokens.

    An example longer than a sample is cut to it; one whose prompt alone fills it is dropped, as
    it has no answer token to learn from.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        bos = self.stream.positions_of(self.meta["bos_id"])
        ends = np.append(bos[1:], self.stream.num_tokens)
        # The first separator after each BOS (encode() never yields it, so it is unambiguous even
        # when the separator is EOS).
        seps = self.stream.positions_of(self.meta["sep_id"])
        sep = seps[np.searchsorted(seps, bos)]
        cap = self.seq_len + 1
        self.samples: list[tuple[int, int]] = []  # token span of each sample
        self.answers: list[tuple[int, int]] = []  # token spans that carry loss
        self.sample_answers: list[tuple[int, int]] = []  # range of self.answers per sample
        self.num_dropped = self.num_truncated = 0
        start = length = 0
        for b, s, e in zip(bos.tolist(), sep.tolist(), ends.tolist(), strict=True):
            if s + 1 - b >= cap:
                self.num_dropped += 1
                continue
            if length and (b != start + length or length + (e - b) > cap):
                self._close(start, length)
                length = 0
            if not length:
                start = b
            if e - b > cap:
                self.num_truncated += 1
            length = min(length + (e - b), cap)
            self.answers.append((s + 1, e))
        if length:
            self._close(start, length)

    def _close(self, start: int, length: int) -> None:
        first = self.sample_answers[-1][1] if self.sample_answers else 0
        self.samples.append((start, length))
        self.sample_answers.append((first, len(self.answers)))

    def __len__(self) -> int:
        return len(self.samples)

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        import torch  # here, not at the top: spawned `prepare` workers never pay for it

        self._check(indices)
        cap = self.seq_len + 1
        windows = np.full((len(indices), cap), self.meta["eos_id"], dtype=np.int64)
        loss = np.zeros((len(indices), cap), dtype=bool)
        for row, i in enumerate(indices):
            start, length = self.samples[i]
            windows[row, :length] = self.stream.read(start, length)
            a0, a1 = self.sample_answers[i]
            for s, e in self.answers[a0:a1]:
                loss[row, s - start : min(e, start + length) - start] = True
        labels = np.where(loss[:, 1:], windows[:, 1:], IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(windows[:, :-1].copy()),
            "labels": torch.from_numpy(labels),
        }


def load_dataset(
    path: str | Path,
    cfg: DataConfig,
    *,
    seq_len: int,
    split: str = "train",
    vocab_size: int | None = None,
) -> PretrainDataset | SFTDataset:
    """The split of a prepared directory as fixed-length samples of seq_len tokens.

    With the model's vocab_size, the directory's tokenizer is checked against it first. An empty
    training split is a ValueError; an empty validation split is a dataset of length 0.
    """
    path = Path(path)
    meta = read_meta(path)
    if vocab_size is not None:
        check_vocabulary(path, meta, vocab_size=vocab_size)
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; allowed: >= 1")
    if meta["format"] != cfg.format:
        raise ValueError(
            f"data.format={cfg.format!r} but {str(path)!r} was prepared as {meta['format']!r}"
        )
    cls = SFTDataset if meta["format"] == "sft" else PretrainDataset
    ds = cls(path, meta, seq_len, split)
    if split == "train" and not len(ds):
        raise ValueError(
            f"seq_len={seq_len}: {str(path)!r} has {ds.stream.num_tokens} training tokens, "
            "too few for one sample; allowed: a shorter seq_len or a larger source"
        )
    return ds


# ---------------------------------------------------------------- mixtures


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


class MixtureDataset:
    """Several sources' datasets as one: sample offsets[i] + j is sample j of source i."""

    def __init__(self, datasets: list[PretrainDataset | SFTDataset]) -> None:
        self.datasets = datasets
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def path(self) -> Path:
        """The first source's directory: every source holds the same tokenizer.model."""
        return self.datasets[0].path

    @property
    def tokenizer(self) -> Tokenizer:
        return self.datasets[0].tokenizer

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        import torch

        ids = np.asarray(indices, dtype=np.int64)
        if len(ids) and not (ids.min() >= 0 and ids.max() < len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        src = np.searchsorted(self.offsets, ids, side="right") - 1
        out: dict[str, torch.Tensor] = {}
        for s in np.unique(src):
            rows = np.flatnonzero(src == s)
            part = self.datasets[s].get_batch((ids[rows] - self.offsets[s]).tolist())
            for k, v in part.items():
                if k not in out:
                    out[k] = torch.empty((len(ids), *v.shape[1:]), dtype=v.dtype)
                out[k][torch.from_numpy(rows)] = v
        return out


class OrderedView:
    """A dataset read in a sampler's order: item p is dataset[order.indices_at([p])]. The
    validation split of a mixture: its first samples are drawn in the training proportions."""

    def __init__(self, dataset: MixtureDataset, order: MixtureSampler) -> None:
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.dataset.get_batch(self.order.indices_at(indices).tolist())


@dataclass
class TrainingData:
    """What the trainer reads: the training and validation data of its sources, the sampler of
    the training order, and what identifies the data (for a resume to compare)."""

    sources: list[Source]
    paths: list[Path]
    train: PretrainDataset | SFTDataset | MixtureDataset
    val: PretrainDataset | SFTDataset | OrderedView
    sampler: GlobalSampler | MixtureSampler
    tokenizer_sha256: str
    identity: dict[str, Any]

    def samples_per_source(self, consumed: int) -> dict[str, int]:
        """Training samples each source has given in the first `consumed` of the order."""
        if isinstance(self.sampler, MixtureSampler):
            counts = self.sampler.samples_per_source(consumed)
        else:
            counts = [consumed]
        return {s.name: n for s, n in zip(self.sources, counts, strict=True)}

    def source_sizes(self) -> dict[str, int]:
        if isinstance(self.train, MixtureDataset):
            sizes = [len(d) for d in self.train.datasets]
        else:
            sizes = [len(self.train)]
        return {s.name: n for s, n in zip(self.sources, sizes, strict=True)}


def open_training_data(
    paths: list[Path], cfg: DataConfig, *, seq_len: int, vocab_size: int, seed: int
) -> TrainingData:
    """The prepared sources of a run (prepare_sources' paths) as datasets and a sampler."""
    sources = run_sources(cfg)
    metas = [read_meta(p) for p in paths]
    shas = {m["tokenizer_sha256"] for m in metas}
    if len(shas) > 1:
        raise ValueError(f"data.mix: the sources were prepared with {len(shas)} different "
                         "tokenizers; allowed: one")
    train = [load_dataset(p, cfg, seq_len=seq_len, split="train", vocab_size=vocab_size)
             for p in paths]
    val = [load_dataset(p, cfg, seq_len=seq_len, split="val", vocab_size=vocab_size)
           for p in paths]
    # One source: its dataset identity as it is; a mixture: each source's with its weight (another
    # weight is another order). Names are left out: renaming a source changes no sample.
    if len(paths) == 1:
        identity = dataset_identity(paths[0])
    else:
        # Keyed by position, so that a difference reads "data.sources.1.weight 0.2 -> 0.3".
        identity = {"sources": {str(i): {"weight": s.weight, **dataset_identity(p)}
                                for i, (s, p) in enumerate(zip(sources, paths, strict=True))}}
    common = dict(sources=sources, paths=list(paths), tokenizer_sha256=shas.pop(),
                  identity=identity)
    if len(paths) == 1:
        return TrainingData(train=train[0], val=val[0],
                            sampler=GlobalSampler(num_samples=len(train[0]), seed=seed), **common)
    names = [s.name for s in sources]
    sampler = MixtureSampler([len(d) for d in train], [s.weight for s in sources], seed=seed,
                             names=names)
    has_val = [i for i, d in enumerate(val) if len(d)]
    if has_val:
        val_order = MixtureSampler([len(val[i]) for i in has_val],
                                   [sources[i].weight for i in has_val], seed=seed,
                                   names=[names[i] for i in has_val])
        val_data: Any = OrderedView(MixtureDataset([val[i] for i in has_val]), val_order)
    else:
        val_data = val[0]  # empty: the trainer skips validation
    return TrainingData(train=MixtureDataset(train), val=val_data, sampler=sampler, **common)


# ---------------------------------------------------------------- CLI


def prepare_dir(
    inputs: list[str],
    out: Path,
    opts: PrepareOptions,
    *,
    tokenizer: str = "",
    vocab_size: int = 32_000,
    overwrite: bool = False,
) -> dict:
    """Prepare inputs into out, built aside and renamed so out never looks complete too early."""
    out = out.expanduser()
    if out.exists() and not overwrite:
        if (out / "meta.json").is_file():
            raise ValueError(f"--out={str(out)!r} is already prepared; pass --overwrite to redo it")
        if not out.is_dir() or any(out.iterdir()):
            raise ValueError(f"--out={str(out)!r} exists and is not empty; pass --overwrite")
    collect_files(inputs)  # fail on missing inputs before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        meta = build(inputs, tmp, opts, tokenizer=tokenizer, vocab_size=vocab_size)
        publish(tmp, out, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamatrain.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise a corpus into token shards")
    p.add_argument("--input", nargs="+", help=f"files, directories or {STDLIB}")
    p.add_argument("--out", type=Path, help="output directory")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default="", help="existing SentencePiece model to use")
    tok.add_argument("--vocab-size", type=int, default=32_000, help="train a tokenizer this big")
    p.add_argument("--workers", type=int, default=0, help="tokenising processes; 0 = all cores")
    p.add_argument("--format", default="pretrain", choices=FORMATS)
    p.add_argument("--text-key", default="text",
                   help="JSON field of a .jsonl document, column of a parquet file")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--tokenizer-sample", type=int, default=200_000, help="lines to train on")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared --out")
    p.add_argument("--part", metavar="I/N",
                   help="tokenise share I (0-based) of N of the files into OUT/parts/ (one task "
                        "of a SLURM array); --merge OUT then completes OUT")
    p.add_argument("--merge", type=Path, metavar="DIR",
                   help="write DIR/meta.json from the finished parts of DIR")
    args = parser.parse_args(argv)
    opts = PrepareOptions(
        format=args.format,
        text_key=args.text_key,
        val_fraction=args.val_fraction,
        workers=args.workers,
        tokenizer_sample=args.tokenizer_sample,
    )
    try:
        if args.merge is not None:
            if args.input or args.part:
                raise ValueError("--merge DIR takes no --input or --part; it reads DIR/parts")
            meta = merge(args.merge.expanduser())
            _print_summary(args.merge, meta)
            return 0
        if not args.input or args.out is None:
            raise ValueError("--input and --out: required (or --merge DIR)")
        if args.part:
            part, num_parts = parse_part(args.part)
            info = build_part(args.input, args.out.expanduser(), opts, part=part,
                              num_parts=num_parts, tokenizer=args.tokenizer,
                              vocab_size=args.vocab_size)
            lo, hi = info["files"]
            print(f"{args.out}: part {part}/{num_parts}: files {lo}-{hi} of "
                  f"{info['num_files_total']}, {sum(info['num_tokens'].values()):,} tokens, "
                  f"{len(info['skipped'])} files skipped")
            return 0
        meta = prepare_dir(
            args.input,
            args.out,
            opts,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            overwrite=args.overwrite,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(args.out, meta)
    return 0


def _print_summary(out: Path, meta: dict) -> None:
    bad = [s for s in meta["skipped"] if s["reason"] != EMPTY]
    for s in bad[:20]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if len(bad) > 20:
        print(f"... and {len(bad) - 20} more (see meta.json)", file=sys.stderr)
    if len(meta["skipped"]) > len(bad):
        print(f"skipped {len(meta['skipped']) - len(bad)} empty files", file=sys.stderr)
    sp = meta["splits"]
    print(
        f"{out}: {meta['num_tokens']:,} tokens ({meta['dtype']}), {meta['num_documents']:,} "
        f"documents (train {sp['train']['num_documents']:,}, val {sp['val']['num_documents']:,}), "
        f"{len(meta['skipped'])} files skipped"
    )


if __name__ == "__main__":
    sys.exit(main())
