"""What defines a run, so that a resume continues the run it finds and never another.

Every checkpoint's trainer.json carries the identity of the run that wrote it. A resume compares:
a change that would make the checkpoint mean something else (the model, the sequence length, the
seed and so the data order, the tokenizer, the data) is refused; a change a run may make on the
way (global batch, learning-rate schedule, steps) is logged. The parallel layout is not part of
the identity: DCP reshards, and the sampler's order does not depend on the world size.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from llamatrain.config import Config

# Keys of [train] that a resumed run may change; every change is logged.
SCHEDULE_KEYS = ("global_batch_tokens", "lr", "min_lr_ratio", "warmup_steps", "steps",
                 "weight_decay", "beta1", "beta2", "eps", "grad_clip")


def new_run_id() -> str:
    return uuid.uuid4().hex


def run_identity(cfg: Config, *, data: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The JSON-able identity of a run with this config, training on `data` (its identity)."""
    return {
        "run_id": run_id,
        "model": dataclasses.asdict(cfg.model),
        "seq_len": cfg.train.seq_len,
        "seed": cfg.train.seed,
        "data": data,
        "schedule": {k: getattr(cfg.train, k) for k in SCHEDULE_KEYS},
    }


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: its head is enough to tell two apart
    return repr(value)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that break the run, changes that are logged), each as 'key old -> new'."""
    old, new = _flatten(saved, ""), _flatten(current, "")
    breaking, logged = [], []
    for key in sorted(old.keys() | new.keys()):
        if key == "run_id" or old.get(key) == new.get(key):
            continue
        text = f"{key} {_short(old.get(key, 'unset'))} -> {_short(new.get(key, 'unset'))}"
        (logged if key.startswith("schedule.") else breaking).append(text)
    return breaking, logged
