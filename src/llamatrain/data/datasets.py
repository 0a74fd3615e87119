"""Datasets of fixed-length samples over prepared token shards, one source or a weighted mixture,
and the training data of a run (datasets, validation split, sampler) that the trainer opens.

A pretraining sample i is the window of seq_len + 1 tokens starting at token i * seq_len of the
split, packed across document boundaries as the paper does. An SFT sample packs whole examples
(BOS prompt <sep> response EOS) back to back into seq_len + 1 tokens and pads the rest; its labels
are -100 on the prompt, the separator and padding, so the loss covers answer tokens only (§3.1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llamatrain.config import DataConfig
from llamatrain.data.cache import Source, check_vocabulary, dataset_identity, read_meta, run_sources
from llamatrain.data.sampler import GlobalSampler, MixtureSampler
from llamatrain.data.tokenizer import Tokenizer, load_tokenizer
from llamatrain.loss import IGNORE_INDEX

if TYPE_CHECKING:
    import torch





class TokenStream:
    """One split's shards, memory-mapped, read as one array.

    Opening checks every shard's size against meta.json (a truncated or missing .bin is an error,
    never a smaller dataset); every read checks its token ids against `limit` (the tokenizer's
    vocabulary), so a damaged shard is a ValueError naming the file and position rather than an
    IndexError inside the embedding. A max over what was read costs nothing next to a step.

    A shard truncated in place while the run reads it would end the process with SIGBUS (its
    pages are gone from under the memory map), which no Python code can catch: every read first
    checks the shard's size on disk (one stat, microseconds), so that it is a ValueError saying
    what to do instead. Truncating between that check and the read still ends in SIGBUS.
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
            self._check_still_whole(k)
            n = min(length - done, len(a) - offset)
            chunk = out[done : done + n]
            chunk[:] = a[offset : offset + n]
            if n and int(chunk.max()) >= self.limit:
                self._bad_token(k, offset, chunk)
            done, k = done + n, k + 1
        return out

    def _check_still_whole(self, k: int) -> None:
        expected = len(self.arrays[k]) * self.arrays[k].itemsize
        try:
            size = os.stat(self.files[k]).st_size
        except OSError as e:
            size, why = -1, e.strerror
        if size < expected:
            now = f"now has {size} bytes" if size >= 0 else f"cannot be read now ({why})"
            raise ValueError(
                f"dataset: shard {str(self.files[k])!r} {now}, {expected} when the run opened it: "
                "it was truncated or replaced while the run read it; a prepared source must not "
                "change under a run: restore it (or prepare the source again into a new "
                "directory), then start the run again (it resumes from its last checkpoint)")

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

