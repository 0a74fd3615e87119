"""The data pipeline inside training runs: weighted mixtures, the prefetching loader, and damaged
data stopping a run with one line."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, losses, run_train, tiny_args, write_corpus

from llamatrain.config import load_config
from llamatrain.data.cache import prepare_sources
from llamatrain.data.loader import BatchLoader
from llamatrain.data.sampler import GlobalSampler
from llamatrain.metrics import read_metrics
from llamatrain.train import REQUEUE_EXIT_CODE


def test_a_damaged_shard_stops_training_with_one_line_naming_it(prepared_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data)
    tokens = np.fromfile(data / "train_000000.bin", dtype=np.uint16)
    tokens[::97] = 50_000  # beyond the model's 384: an IndexError in the embedding without checks
    tokens.tofile(data / "train_000000.bin")

    proc = run_train(tiny_args(data, tmp_path / "run", **{"train.steps": 3}))

    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: dataset: token id 50000 >= vocabulary size 384 at token ")
    assert "train_000000.bin" in err[-1]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Two raw corpora as a 3:1 mixture, prepared once into a shared cache: the overrides."""
    root = tmp_path_factory.mktemp("mix")
    web = write_corpus(root / "web", num_docs=60, seed=1)
    books = write_corpus(root / "books", num_docs=20, seed=2)
    mix = f'[{{source = "{web}", weight = 3}}, {{source = "{books}", weight = 1}}]'
    overrides = {"data.source": "python-stdlib", "data.mix": mix, "data.val_fraction": 0.05,
                 "data.cache_dir": str(root / "cache"), "train.steps": 8, "train.warmup_steps": 2,
                 "checkpoint.interval": 100}
    # Prepared here with the runs' own data settings, so that every run finds it in the cache.
    cfg = load_config(REPO / "configs/tiny.toml", [f"--{k}={v}" for k, v in overrides.items()])
    prepare_sources(cfg.data, vocab_size=384)
    return overrides


@pytest.fixture(scope="module")
def mixture_runs(mixture, tmp_path_factory):
    """Uninterrupted 8-step runs of the mixture with prefetch off and on: {prefetch: run dir}."""
    root = tmp_path_factory.mktemp("mix-runs")
    runs = {}
    for prefetch in (0, 2):
        runs[prefetch] = root / f"prefetch{prefetch}"
        proc = run_train(tiny_args(runs[prefetch], runs[prefetch],
                                   **{**mixture, "data.prefetch": prefetch}))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "data web (weight 3)" in proc.stdout and "data books (weight 1)" in proc.stdout
    return runs


def test_a_mixture_trains_with_tokens_per_source_and_prefetch_changes_no_loss(mixture,
                                                                             mixture_runs):
    runs = mixture_runs

    assert len(losses(runs[0])) == 8
    assert losses(runs[0]) == losses(runs[2])
    shared = json.loads((runs[2] / "report.json").read_text())["sources"][0]["source"]
    assert (runs[2] / "tokenizer.model").read_bytes() == \
        next(Path(mixture["data.cache_dir"]).glob("tokenizer-*.model")).read_bytes()
    assert shared.endswith("web")
    for rec in read_metrics(runs[2] / "metrics.jsonl"):
        if "loss" in rec:
            assert set(rec["tokens_per_source"]) == {"web", "books"}
            assert sum(rec["tokens_per_source"].values()) == rec["tokens_seen"]
            assert rec["data_wait_s"] >= 0
    report = json.loads((runs[2] / "report.json").read_text())
    shares = {s["name"]: s for s in report["sources"]}
    assert shares["web"]["weight_share"] == 0.75 and shares["books"]["weight_share"] == 0.25
    assert abs(shares["web"]["share"] - 0.75) < 0.1  # 128 samples
    assert shares["web"]["tokens"] + shares["books"]["tokens"] == report["tokens"]


def test_a_prefetching_mixture_run_resumed_on_two_ranks_sees_the_same_samples(
    mixture, mixture_runs, tmp_path
):
    """Read-ahead batches are not counted as trained: the checkpoint taken on a stop holds the
    position of the last trained step, and a resume at another world size continues exactly."""
    run_dir = tmp_path / "stopped"
    args = tiny_args(run_dir, run_dir, **mixture)
    stopped = run_train(args, env={"LLAMATRAIN_FAULT_STOP_STEP": "3"})
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stderr[-3000:]
    assert sorted(losses(run_dir)) == [1, 2, 3]
    resumed = run_train(args, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == pytest.approx(losses(mixture_runs[2]), rel=1e-5)
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r][-1]
    reference = [r for r in read_metrics(mixture_runs[2] / "metrics.jsonl") if "loss" in r][-1]
    assert last["tokens_per_source"] == reference["tokens_per_source"]


def test_a_resume_with_other_mixture_weights_is_refused_naming_the_source(
    mixture, mixture_runs, tmp_path
):
    run_dir = tmp_path / "reweighted"
    shutil.copytree(mixture_runs[2], run_dir)
    reweighted = {**mixture, "data.mix": mixture["data.mix"].replace("weight = 3", "weight = 2"),
                  "train.steps": 10}
    proc = run_train(tiny_args(run_dir, run_dir, **reweighted))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.sources.0.weight 3.0 -> 2.0" in proc.stderr.strip().splitlines()[-1]


class _Data:
    """A dataset whose batch k holds k, optionally failing at one batch or reading slowly."""

    def __init__(self, *, fail_at: int = -1, delay: float = 0.0) -> None:
        self.fail_at, self.delay, self.reads = fail_at, delay, 0

    def get_batch(self, indices):
        self.reads += 1
        time.sleep(self.delay)
        if indices[0] // 4 == self.fail_at:
            raise ValueError("dataset: token id 99 >= vocabulary size 10 at token 3 of 'x.bin'")
        ids = torch.tensor(indices).view(-1, 1)
        return {"input_ids": ids, "labels": ids}


class _InOrder(GlobalSampler):
    def indices_at(self, positions):
        return np.asarray(positions)


def loader(dataset, prefetch: int) -> BatchLoader:
    return BatchLoader(dataset, _InOrder(10**6), global_batch=4, rank=0, world_size=1,
                       micro_batch_size=2, device=torch.device("cpu"), prefetch=prefetch)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_the_loader_gives_each_step_in_order_and_moves_the_sampler_as_consumed(prefetch):
    batches = loader(_Data(), prefetch)
    for step in range(5):
        micro, wait = batches.next()
        assert [m["input_ids"].flatten().tolist() for m in micro] == [
            [4 * step, 4 * step + 1], [4 * step + 2, 4 * step + 3]]
        assert batches.sampler.consumed == 4 * (step + 1) and wait >= 0
    batches.close()


def test_an_error_in_the_loader_thread_is_raised_in_the_loop_at_once():
    batches = loader(_Data(fail_at=2), prefetch=2)
    batches.next()
    batches.next()
    start = time.perf_counter()
    with pytest.raises(ValueError, match="token id 99"):
        batches.next()
    assert time.perf_counter() - start < 2
    assert batches.sampler.consumed == 8  # the failed step was not consumed
    assert not any(t.name == "batch-loader" for t in threading.enumerate())


def test_close_stops_the_loader_thread_and_reading_ahead_is_bounded():
    data = _Data(delay=0.01)
    batches = loader(data, prefetch=2)
    batches.next()
    time.sleep(0.3)
    assert data.reads <= 1 + 2 + 1  # the one taken, two queued, one waiting to be queued
    batches.close()
    assert not any(t.name == "batch-loader" for t in threading.enumerate())
