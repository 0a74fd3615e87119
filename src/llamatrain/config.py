"""Run configuration: one dataclass per TOML section, loaded from a file plus `section.key=value`
overrides, then validated.

Every field carries its help text in `metadata["help"]`: `python -m llamatrain.config --markdown`
prints the reference that README.md carries (a test keeps the two equal). Mistakes are a ValueError
that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _f(default: Any, help: str, *, key: str | None = None,
       keywords: tuple[str, ...] = ()) -> Any:
    """A field with its help text; `keywords` are the words an `int | str` field takes besides
    an integer (checkpoint.interval = "auto")."""
    metadata: dict[str, Any] = {"help": help}
    if key is not None:
        metadata["key"] = key
    if keywords:
        metadata["keywords"] = keywords
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    name: str = _f("llamatrain", "Name of the run, shown in logs and the report.")
    dir: str = _f("runs/llamatrain", "Directory for checkpoints, metrics, config and report.")


@dataclass
class ModelConfig:
    dim: int = _f(4096, "Model width (embedding size).")
    n_layers: int = _f(32, "Number of transformer blocks.")
    n_heads: int = _f(32, "Number of query heads.")
    n_kv_heads: int = _f(32, "Number of key/value heads (grouped-query attention when fewer).")
    vocab_size: int = _f(32000, "Vocabulary size of the tokenizer.")
    multiple_of: int = _f(256, "FFN hidden size is rounded up to a multiple of this.")
    ffn_dim_multiplier: float = _f(1.0, "Scales the FFN hidden size 8/3*dim (1.3 for 70B).")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    rope_theta: float = _f(10000.0, "Rotary embedding base.")
    max_seq_len: int = _f(4096, "Longest sequence the rotary tables cover.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
        hidden = int(2 * 4 * self.dim / 3)
        hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


@dataclass
class TrainConfig:
    steps: int = _f(480_000, "Optimizer steps to train for.")
    epochs: float = _f(0.0, "If > 0, train for this many passes over the data (sets steps).")
    seed: int = _f(0, "Seed for weights, data order and dropout-free RNG state.")
    lr: float = _f(3e-4, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Cosine decay ends at this fraction of the peak (paper: 10%).")
    warmup_steps: int = _f(2000, "Linear warmup steps.")
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to 2-D weight matrices only.")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-5, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 = off).")
    global_batch_tokens: int = _f(4 * 1024 * 1024, "Tokens per optimizer step over all ranks.")
    micro_batch_size: int = _f(1, "Sequences per rank per forward/backward.")
    seq_len: int = _f(4096, "Training sequence length.")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    optimizer: str = _f("adamw", "adamw (torch, fused on CUDA) or apex_fused_adam.")
    eval_interval: int = _f(0, "Validation loss every this many steps (0 = only at the end).")
    eval_batches: int = _f(4, "Micro-batches per rank in one validation pass.")
    max_bad_steps: int = _f(5, "Stop after this many non-finite losses in a row.")
    deterministic: bool = _f(False, "Use deterministic algorithms (bit-identical reruns).")
    collective_timeout_s: float = _f(
        600.0, "Process group timeout: a collective that waits longer fails (NCCL dumps its "
        "flight recorder).",
    )  # fmt: skip
    hang_timeout_s: float = _f(
        0.0, "Seconds without a finished step before the watchdog dumps every thread's stacks "
        "into run.dir/hang/ and exits 75 (0 = auto: 10x the median step, at least 300 s; 1800 "
        "s until 5 steps are timed).",
    )  # fmt: skip
    float8: str = _f(
        "none", "none, tensorwise or rowwise: the block linears' matmuls in float8 through "
        "torchao (the float8 extra; GPUs of sm_89 and newer, emulated on CPU). Meant with "
        "parallel.compile = true: without it every cast is a kernel of its own and a step is "
        "usually slower than bf16's. Checkpoints stay as they are.",
    )  # fmt: skip


@dataclass
class MixSource:
    """One source of a weighted mixture: a `[[data.mix]]` table."""

    source: str = _f("", "A file, directory or prepared directory, as data.source.")
    weight: float = _f(1.0, "Share of the samples, relative to the other sources' weights.")
    name: str = _f("", "Name in metrics and the report (default: the source's file name).")


@dataclass
class DataConfig:
    source: str = _f(
        "python-stdlib",
        "python-stdlib, a file or directory of text/.jsonl/.parquet(.gz/.zst), or a prepared "
        "directory.",
    )
    mix: list[MixSource] = field(
        default_factory=list,
        metadata={"help": "Weighted sources, [[data.mix]] tables of source, weight and name; "
                          "replaces data.source."},
    )
    format: str = _f("pretrain", "pretrain (packed documents) or sft (prompt/response .jsonl).")
    cache_dir: str = _f("~/.cache/llamatrain", "Where prepared sources are cached.")
    tokenizer: str = _f("", "SentencePiece model to use; empty trains one on the source.")
    text_key: str = _f("text", "Field of a .jsonl record that holds the document.")
    val_fraction: float = _f(0.01, "Fraction of documents held out for validation.")
    workers: int = _f(0, "Tokenizer processes for prepare (0 = all cores).")
    tokenizer_sample: int = _f(200_000, "Most sentences sampled to train the tokenizer.")
    prefetch: int = _f(2, "Steps of batches read ahead in a background thread (0 = in the loop).")


@dataclass
class ParallelConfig:
    dp_shard: int = _f(-1, "FSDP shard group size (-1 = world size / dp_replicate).")
    dp_replicate: int = _f(1, "Replica groups, HSDP when > 1 (-1 = world size / dp_shard).")
    tp: int = _f(1, "Tensor (and sequence) parallel degree, inside a node; dp is world size / "
                    "(pp x tp).")
    pp: int = _f(1, "Pipeline parallel degree: the blocks split into stages on different ranks "
                    "(outermost mesh axis, so stages sit on different nodes).")
    pp_stages_per_rank: int = _f(1, "Pipeline stages each rank holds: 1, or 2 and more for the "
                                    "interleaved and zero-bubble schedules.")
    pp_schedule: str = _f("1f1b", "Pipeline schedule: gpipe, 1f1b, interleaved_1f1b or "
                                  "zero_bubble (torch's interleaved zero bubble, ZB1P).")
    pp_microbatches: int = _f(0, "Micro-batches per pipeline schedule (0 = the micro-batches a "
                                 "rank runs in a step); must divide them.")
    activation_checkpointing: str = _f("none", "none, full or selective (every other block).")
    compile: bool = _f(False, "torch.compile each transformer block.")


@dataclass
class KernelsConfig:
    backend: str = _f(
        "auto", "auto (on CUDA each op the faster of its Triton kernel and PyTorch, timed at "
        "startup on the run's shapes; the kernels untimed with train.deterministic; PyTorch on "
        "CPU), triton or torch.",
    )  # fmt: skip
    attention_backward: str = _f(
        "atomic", "Triton attention backward: atomic (dQ summed with fp32 atomics in the dK/dV "
        "pass, 5 GEMMs per block pair) or deterministic (dQ in its own kernel, bit-identical "
        "reruns); train.deterministic = true selects deterministic.",
    )  # fmt: skip
    fused_loss: bool = _f(
        True, "Output projection and cross-entropy fused, in chunks of tokens (no full logits); "
        "false: logits, then the loss (e.g. for a vocabulary-sharded output).",
    )  # fmt: skip
    fused_residual: bool = _f(
        True, "Every residual add inside an RMSNorm kernel; false: the block output add as its "
        "own op (e.g. for norms that cannot take the residual under a parallel plan).",
    )  # fmt: skip


@dataclass
class CheckpointConfig:
    interval: int | str = _f(
        500, 'Save every this many steps and at the end; 0 = never (benchmarks); or "auto": the '
        "Young-Daly interval sqrt(2 x save cost x checkpoint.mtbf_hours) once the first save is "
        "timed.",
        keywords=("auto",),
    )  # fmt: skip
    keep: int = _f(3, "Newest checkpoints kept on disk.")
    async_save: bool = _f(False, "Save in the background; block only while staging.", key="async")
    init_from: str = _f("", "Checkpoint to initialise a new run from (weights only), verified "
                            "against the checksums of its trainer.json first; one without them is "
                            "refused unless checkpoint.verify_init_from = false.")
    verify_init_from: bool = _f(True, "false: load a checkpoint.init_from that has no checksums "
                                      "(no trainer.json), unverified, with a warning.")
    mtbf_hours: float = _f(
        0.0, "Mean time between failures of the whole job, in hours (0 = unknown); the report "
        "then gives the Young-Daly checkpoint interval.",
    )  # fmt: skip


@dataclass
class MetricsConfig:
    log_interval: int = _f(10, "Log a line and a metrics.jsonl record every this many steps.")
    wandb: bool = _f(False, "Also log to Weights & Biases (needs the wandb extra).")
    tensorboard: bool = _f(False, "Also log to TensorBoard (needs the tensorboard extra).")
    profile_steps: int = _f(0, "Record a torch.profiler trace of this many steps (0 = off).")
    straggler_factor: float = _f(
        1.2, "Ranks whose step time (waits for other ranks left out) or data wait exceeds the "
        "median by this factor are named in the log and the report.",
    )  # fmt: skip


@dataclass
class EvalConfig:
    tasks: str = _f("", "lm-eval tasks benchmarked during training: names, table3 or a category "
                        "(empty = none; code tasks never run here).")
    interval: int = _f(0, "Benchmark the live model every this many steps (0 = only at the end).")
    limit: int = _f(0, "Documents per task in each benchmark pass (0 = all).")
    include_path: str = _f("", "Directory of your own lm-eval task YAMLs: code lm-eval runs (a "
                               "YAML's `!function` imports its Python).")


@dataclass
class CarbonConfig:
    power_w: float = _f(0.0, "Watts per device when NVML cannot measure (0 = the device's TDP).")
    pue: float = _f(1.0, "Power usage effectiveness of the data centre.")
    intensity_kg_per_kwh: float = _f(0.4235, "kg CO2eq per kWh (the factor behind Table 2).")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _keys(section_cls: type) -> dict[str, dataclasses.Field]:
    """TOML key -> dataclass field of a section."""
    return {f.metadata.get("key", f.name): f for f in dataclasses.fields(section_cls)}


def _closest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _int_or_keyword(key: str, value: Any, keywords: Sequence[str]) -> int | str:
    """An `int | str` field: an integer >= 0 (not a bool), or exactly one of its keywords. The
    one parse of such a field, for files, the command line and dataclasses built in code."""
    if (isinstance(value, int) and not isinstance(value, bool) and value >= 0) \
            or (isinstance(value, str) and value in keywords):
        return value
    allowed = " or ".join(f'"{k}"' for k in keywords)
    raise ValueError(f"{key} = {value!r}: expected an integer >= 0 or {allowed}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check a TOML value against a field's type; ints are accepted where floats are."""
    if isinstance(tp, types.UnionType):
        raise TypeError(f"unsupported config type {tp}")
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ValueError(f"{key} = {value!r}: expected {_type_name(tp)}")
    return value


def _parse_override(text: str) -> tuple[str, str, Any]:
    """'--section.key=value' -> (section, key, value), the value read as TOML where it parses."""
    body = text[2:] if text.startswith("--") else text
    name, sep, raw = body.partition("=")
    section, dot, key = name.partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"override {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def _table_list(key: str, value: Any, item_cls: type) -> list[Any]:
    """A TOML array of tables (`[[data.mix]]`) as a list of item_cls, each key checked."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{key} = {value!r}: expected an array of tables ([[{key}]])")
    fields, hints = _keys(item_cls), typing.get_type_hints(item_cls)
    items = []
    for i, table in enumerate(value):
        item = item_cls()
        for k, v in table.items():
            if k not in fields:
                raise ValueError(f"unknown key {key}[{i}].{k}{_closest(k, fields)} "
                                 f"(allowed: {', '.join(fields)})")
            setattr(item, fields[k].name, _coerce(f"{key}[{i}].{k}", v, hints[fields[k].name]))
        items.append(item)
    return items


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    if section not in SECTIONS:
        raise ValueError(f"unknown section [{section}]{_closest(section, SECTIONS)}")
    fields = _keys(SECTIONS[section])
    if key not in fields:
        allowed = ", ".join(fields)
        raise ValueError(
            f"unknown key {section}.{key}{_closest(key, fields)} (allowed: {allowed})"
        )
    f = fields[key]
    tp = typing.get_type_hints(SECTIONS[section])[f.name]
    if typing.get_origin(tp) is list:
        setattr(getattr(cfg, section), f.name,
                _table_list(f"{section}.{key}", value, typing.get_args(tp)[0]))
        return
    if tp == int | str:
        setattr(getattr(cfg, section), f.name,
                _int_or_keyword(f"{section}.{key}", value, f.metadata["keywords"]))
        return
    if tp is str and not isinstance(value, str):
        value = str(value).lower() if isinstance(value, bool) else str(value)
    setattr(getattr(cfg, section), f.name, _coerce(f"{section}.{key}", value, tp))


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} = {value!r}: expected one of {', '.join(allowed)}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{key} = {value!r}: expected a number {bound}")


def _finite(cfg: Config) -> None:
    """inf and nan pass every comparison the checks below make: refuse them first, everywhere."""
    for section, cls in SECTIONS.items():
        for key, f in _keys(cls).items():
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{section}.{key} = {value!r}: expected a finite number")


TP_CHOICES = (1, 2, 4, 8, 16)
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
# train.float8: off, or torchao's recipe of that name (llamatrain.distributed.float8).
FLOAT8_MODES = ("none", "tensorwise", "rowwise")


def tp_divides(cfg: Config) -> dict[str, int]:
    """What parallel.tp must divide: the head counts, the FFN hidden size, the vocabulary (each
    rank holds a slice of them) and the sequence (sequence parallelism splits it)."""
    m = cfg.model
    return {"model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads,
            "the FFN hidden size": m.ffn_hidden, "model.vocab_size": m.vocab_size,
            "train.seq_len": cfg.train.seq_len}


def _check_tp(cfg: Config) -> None:
    tp = cfg.parallel.tp
    if tp < 1:
        raise ValueError(f"parallel.tp = {tp}: expected an integer >= 1")
    for what, value in tp_divides(cfg).items():
        if value % tp:
            ok = [d for d in TP_CHOICES if all(v % d == 0 for v in tp_divides(cfg).values())]
            raise ValueError(f"parallel.tp = {tp}: must divide {what} = {value} "
                             f"(would work: {', '.join(map(str, ok))})")


# The largest sizes a model may have. Beyond them a number is a typo or a crafted file, not a model,
# and it would be allocated (a vocabulary of 10^12 is terabytes of embedding) before anything else
# could refuse it. The largest released Llama-family model (Llama 3.1 405B: dim 16,384, 126 layers,
# 128 heads, FFN 53,248, vocabulary 128,256, context 131,072) is well inside every bound.
MODEL_LIMITS = {"dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
                "vocab_size": 1 << 20, "multiple_of": 1 << 16, "max_seq_len": 1 << 20}
MAX_FFN_HIDDEN = 1 << 20


def validate_model(m: ModelConfig, *, prefix: str = "model.",
                   names: dict[str, str] | None = None) -> ModelConfig:
    """Check a [model] section (from a config, a model.toml, or an imported config.json whose keys
    `names` maps to ours, under `prefix`); raise ValueError naming the first bad key."""
    names = names or {}

    def key(k: str) -> str:
        return prefix + names.get(k, k)

    for k, limit in MODEL_LIMITS.items():
        v = getattr(m, k)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise ValueError(f"{key(k)} = {v!r}: expected an integer from 1 to {limit:,} "
                             "(config.MODEL_LIMITS)")
    for k in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
        v = getattr(m, k)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                or v <= 0:
            raise ValueError(f"{key(k)} = {v!r}: expected a finite number > 0")
    if m.ffn_hidden > MAX_FFN_HIDDEN:
        raise ValueError(f"{key('ffn_dim_multiplier')} = {m.ffn_dim_multiplier!r}: gives an FFN "
                         f"hidden size of {m.ffn_hidden:,}, above {MAX_FFN_HIDDEN:,}")
    if m.dim % m.n_heads:
        raise ValueError(f"{key('dim')} = {m.dim}: must be divisible by {key('n_heads')} = "
                         f"{m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise ValueError(f"{key('n_kv_heads')} = {m.n_kv_heads}: must divide {key('n_heads')} = "
                         f"{m.n_heads}")
    if m.head_dim % 2:
        raise ValueError(f"{key('dim')} / {key('n_heads')} = {m.head_dim}: head_dim must be even")
    return m


def validate(cfg: Config) -> Config:
    """Check values for sense; raise ValueError naming the first bad key."""
    _finite(cfg)
    if not cfg.run.dir.strip():
        raise ValueError(f"run.dir = {cfg.run.dir!r}: expected a directory path (it must not be "
                         "empty: the run would write into the working directory)")
    m, t = cfg.model, cfg.train
    validate_model(m)
    for key in ("steps", "lr", "global_batch_tokens", "micro_batch_size", "seq_len", "beta1",
                "eps", "max_bad_steps"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("warmup_steps", "weight_decay", "grad_clip", "eval_interval", "eval_batches",
                "seed", "epochs"):
        _positive(f"train.{key}", getattr(t, key), zero_ok=True)
    if not 0 < t.beta2 < 1 or not 0 < t.beta1 < 1:
        raise ValueError(f"train.beta1/beta2 = {t.beta1}/{t.beta2}: expected values in (0, 1)")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ValueError(f"train.min_lr_ratio = {t.min_lr_ratio}: expected a value in [0, 1]")
    if t.warmup_steps >= t.steps:
        raise ValueError(
            f"train.warmup_steps = {t.warmup_steps}: must be shorter than train.steps = {t.steps}"
        )
    if t.seq_len > m.max_seq_len:
        raise ValueError(
            f"train.seq_len = {t.seq_len}: exceeds model.max_seq_len = {m.max_seq_len}"
        )
    _choice("train.dtype", t.dtype, ("auto", "bf16", "fp32"))
    _choice("train.optimizer", t.optimizer, ("adamw", "apex_fused_adam"))
    _choice("train.float8", t.float8, FLOAT8_MODES)
    _choice("data.format", cfg.data.format, ("pretrain", "sft"))
    if not 0 <= cfg.data.val_fraction < 1:
        raise ValueError(f"data.val_fraction = {cfg.data.val_fraction}: expected [0, 1)")
    _positive("data.workers", cfg.data.workers, zero_ok=True)
    _positive("data.tokenizer_sample", cfg.data.tokenizer_sample)
    _positive("data.prefetch", cfg.data.prefetch, zero_ok=True)
    _validate_mix(cfg.data)
    p = cfg.parallel
    for key in ("dp_shard", "dp_replicate"):
        value = getattr(p, key)
        if value == 0 or value < -1:
            raise ValueError(f"parallel.{key} = {value}: expected -1 (the rest) or >= 1")
    _check_tp(cfg)
    for key in ("pp", "pp_stages_per_rank"):
        if getattr(p, key) < 1:
            raise ValueError(f"parallel.{key} = {getattr(p, key)}: expected an integer >= 1")
    _positive("parallel.pp_microbatches", p.pp_microbatches, zero_ok=True)
    _choice("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    if p.dp_shard == -1 and p.dp_replicate == -1:
        raise ValueError("parallel.dp_shard and parallel.dp_replicate are both -1: set one")
    _choice("parallel.activation_checkpointing", p.activation_checkpointing,
            ("none", "full", "selective"))
    _choice("kernels.backend", cfg.kernels.backend, ("auto", "triton", "torch"))
    _choice("kernels.attention_backward", cfg.kernels.attention_backward,
            ("atomic", "deterministic"))  # fmt: skip
    _check_resilience(cfg)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("metrics.log_interval", cfg.metrics.log_interval)
    _positive("metrics.profile_steps", cfg.metrics.profile_steps, zero_ok=True)
    _positive("eval.interval", cfg.eval.interval, zero_ok=True)
    _positive("eval.limit", cfg.eval.limit, zero_ok=True)
    for key in ("tp", "pp"):
        # The lm-eval model scores whole logits of the whole model; under tensor parallelism
        # they stay sharded, under pipelining each rank holds a part of the model.
        if cfg.eval.tasks and getattr(p, key) > 1:
            raise ValueError(f"eval.tasks = {cfg.eval.tasks!r} with parallel.{key} = "
                             f"{getattr(p, key)}: benchmarks during training need parallel.{key} "
                             "= 1; evaluate the checkpoints with python -m llamatrain.evaluate "
                             "instead")
    _positive("carbon.power_w", cfg.carbon.power_w, zero_ok=True)
    _positive("carbon.pue", cfg.carbon.pue)
    _positive("carbon.intensity_kg_per_kwh", cfg.carbon.intensity_kg_per_kwh, zero_ok=True)
    return cfg


def _check_resilience(cfg: Config) -> None:
    """Timeouts, the checkpoint interval and the straggler factor."""
    t, c = cfg.train, cfg.checkpoint
    _positive("train.collective_timeout_s", t.collective_timeout_s)
    _positive("train.hang_timeout_s", t.hang_timeout_s, zero_ok=True)
    if t.hang_timeout_s >= t.collective_timeout_s:
        # A hang inside a collective would end in the process group's timeout, without stacks.
        raise ValueError(f"train.hang_timeout_s = {t.hang_timeout_s!r}: must be shorter than "
                         f"train.collective_timeout_s = {t.collective_timeout_s!r} (or 0 = auto)")
    _positive("checkpoint.mtbf_hours", c.mtbf_hours, zero_ok=True)
    _int_or_keyword("checkpoint.interval", c.interval, _keys(CheckpointConfig)["interval"]
                    .metadata["keywords"])
    if c.interval == "auto" and not c.mtbf_hours:
        raise ValueError('checkpoint.interval = "auto": needs checkpoint.mtbf_hours > 0 (the '
                         "mean time between failures of the whole job, in hours)")
    if not cfg.metrics.straggler_factor > 1:
        raise ValueError(f"metrics.straggler_factor = {cfg.metrics.straggler_factor!r}: "
                         "expected a number > 1")


def _validate_mix(data: DataConfig) -> None:
    if data.mix and data.source != DataConfig.source:
        raise ValueError(f"data.source = {data.source!r} and data.mix are both set: data.mix "
                         "replaces data.source; keep one")
    for i, m in enumerate(data.mix):
        if not m.source:
            raise ValueError(f"data.mix[{i}].source: required (a file, directory or prepared "
                             "directory)")
        if not (math.isfinite(m.weight) and m.weight > 0):
            raise ValueError(f"data.mix[{i}].weight = {m.weight!r}: expected a number > 0")
    total = sum(m.weight for m in data.mix)
    if not math.isfinite(total):
        weights = ", ".join(f"{m.weight:g}" for m in data.mix)
        raise ValueError(f"data.mix weights = {weights}: their sum is not a finite number; "
                         "weights are relative: scale them down (e.g. 1 and 1)")


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ValueError(f"{section} = {values!r}: expected a [{section}] table")
        for key, value in values.items():
            _apply(cfg, section, key, value)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a TOML file (or the defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(path)!r}: {e}") from None
    cfg = from_dict(data)
    for text in overrides:
        _apply(cfg, *_parse_override(text))
    return validate(cfg)


def _plain(value: Any) -> Any:
    """A config value as TOML/JSON sees it: lists of tables as lists of dicts."""
    if isinstance(value, list):
        return [{f.metadata.get("key", f.name): getattr(v, f.name) for f in dataclasses.fields(v)}
                for v in value]
    return value


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {
        section: {
            f.metadata.get("key", f.name): _plain(getattr(getattr(cfg, section), f.name))
            for f in dataclasses.fields(SECTIONS[section])
        }
        for section in SECTIONS
    }


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, readable back by load_config."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            # JSON's escapes (\n, \", \uXXXX) are TOML's; DEL is the one control character
            # JSON leaves raw and TOML refuses.
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list):
            tables = ("{ " + ", ".join(f"{k} = {fmt(x)}" for k, x in t.items()) + " }" for t in v)
            return "[" + ", ".join(tables) + "]"
        return repr(v)

    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The configuration reference table for README.md."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = to_dict(Config())
    for section, cls in SECTIONS.items():
        for key, f in _keys(cls).items():
            lines.append(f"| `{section}.{key}` | `{defaults[section][key]!r}` | "
                         f"{f.metadata['help']} |")
    return "\n".join(lines)


def usage(prog: str) -> str:
    """`--help` of an entry point: the command line and every key with its default and meaning."""
    lines = [f"usage: {prog} --config CONFIG [--section.key=value ...]", "",
             "Every key of the config file can be overridden on the command line:"]
    defaults = to_dict(Config())
    for section, cls in SECTIONS.items():
        lines.append(f"\n  [{section}]")
        for key, f in _keys(cls).items():
            name = f"--{section}.{key}"
            lines.append(f"    {name:<34} {f.metadata['help']} "
                         f"(default {defaults[section][key]!r})")
    return "\n".join(lines)


def split_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--config PATH` (or `--config=PATH`) and the `--section.key=value` overrides of a CLI."""
    path: str | None = None
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ValueError("--config: expected a path")
            path = args.pop(0)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            if "=" not in arg and args and not args[0].startswith("--"):
                arg = f"{arg}={args.pop(0)}"
            overrides.append(arg)
        else:
            raise ValueError(f"argument {arg!r}: expected --config PATH or --section.key=value")
    return path, overrides


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: a ValueError is one line on stderr and exit status 2."""
    try:
        code = main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(reference_markdown())
    else:
        print("usage: python -m llamatrain.config --markdown", file=sys.stderr)
        sys.exit(2)
