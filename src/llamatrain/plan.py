"""Layouts: what fits where. The batch geometry of a layout, and (below) the full-size dry run of
any layout on one CPU; the trainer, `plan` and `carbon project` all ask this module.
"""

from __future__ import annotations

from llamatrain.config import TrainConfig


def batch_geometry(cfg: TrainConfig, dp_size: int) -> tuple[int, int]:
    """(sequences per global batch, micro-batches per data-parallel rank per step).

    dp_size is the number of data-parallel ranks, world size / parallel.tp: the ranks of one
    tensor-parallel group work on the same sequences."""
    per_pass = dp_size * cfg.micro_batch_size * cfg.seq_len
    if cfg.global_batch_tokens % per_pass:
        raise ValueError(
            f"train.global_batch_tokens = {cfg.global_batch_tokens}: not a multiple of "
            f"data-parallel ranks x micro_batch_size x seq_len = {dp_size} x "
            f"{cfg.micro_batch_size} x {cfg.seq_len} = {per_pass}"
        )
    return cfg.global_batch_tokens // cfg.seq_len, cfg.global_batch_tokens // per_pass
