"""The data pipeline inside training runs: damaged data stops a run with one line."""

from __future__ import annotations

import shutil

import numpy as np
from conftest import run_train, tiny_args


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
