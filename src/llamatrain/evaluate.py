"""§2.3's evaluation: the benchmarks of Table 3 through EleutherAI's lm-evaluation-harness, on a
checkpoint (DCP, Hugging Face or Meta) or on the live model of a run.

    python -m llamatrain.evaluate CHECKPOINT [CHECKPOINT ...] --tasks TASKS [--num-fewshot N]
        [--limit N] [--include-path DIR] [--out DIR] [--batch-tokens N] [--fsdp] [--download]
        [--confirm-run-unsafe-code] [--no-verify]

TASKS is a comma-separated list of lm-eval task or group names, `table3` (the paper's suite with
its shot counts) or one of its categories (`code`, `commonsense`, `world_knowledge`, `reading`,
`math`, `mmlu`, `bbh`, `agieval`). A CHECKPOINT is RUN_DIR/checkpoints/step-N, a whole RUN_DIR (all
of its checkpoints, side by side), a `convert from-hf/from-meta` output, a Hugging Face directory
or a Meta directory. A DCP checkpoint is verified against the checksums of its trainer.json before
it is loaded; one without them is refused unless `--no-verify`. Under torchrun, lm-eval splits the
documents over the ranks and gathers the results on rank 0; `--fsdp` (or a model too large for one
GPU) shards the model over the ranks.

An `--include-path` directory (and `eval.include_path` during training) is code that lm-eval runs:
a task YAML's `!function utils.fn` imports and executes that directory's Python, by lm-eval's
design. Include only task directories you would run as a program.

Offline first: datasets are read from the Hugging Face cache and lm-eval's local paths only
(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set unless the environment sets them); `--download`
fetches the tasks' datasets into the cache on a machine with internet. Code benchmarks run
model-written code: only with lm-eval's own `--confirm-run-unsafe-code`, never by default.
Outputs under --out: results.json (lm-eval's results per checkpoint) and report.md (Table 3).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llamatrain.checkpoint.rundir import RunDir, step_dirs
from llamatrain.config import EvalConfig, ModelConfig
from llamatrain.data.tokenizer import Tokenizer, load_tokenizer
from llamatrain.inference import KVCache, Sampling, cached_forward, generate
from llamatrain.model import Transformer

try:
    from lm_eval.api.model import TemplateLM
except ImportError:
    raise ImportError("llamatrain.evaluate needs lm-evaluation-harness: "
                      "pip install 'llamatrain[eval]'") from None

# ---------------------------------------------------------------------------------------------
# Table 3's suite


@dataclass(frozen=True)
class SuiteTask:
    """One lm-eval task (or group) of a suite: its category, shots and the metric reported."""

    task: str
    category: str = ""
    num_fewshot: int | None = None
    metric: str = ""
    metric_filter: str = ""


CATEGORIES = {  # key: Table 3's column
    "code": "Code", "commonsense": "Commonsense Reasoning", "world_knowledge": "World Knowledge",
    "reading": "Reading Comprehension", "math": "Math", "mmlu": "MMLU", "bbh": "BBH",
    "agieval": "AGI Eval",
}

# §2.3: each category is the average of its benchmarks. Shots as the paper gives them: code
# pass@1 (HumanEval 0-shot, MBPP 3-shot), commonsense 0-shot except CommonsenseQA 7-shot, world
# knowledge 5-shot, reading comprehension 0-shot, GSM8K 8-shot and MATH 4-shot, MMLU 5-shot,
# BBH 3-shot, AGI Eval English 3-shot. QuAC has no lm-eval task: Reading Comprehension averages
# SQuAD and BoolQ unless a task named `quac` is given through --include-path.
TABLE3 = (
    SuiteTask("humaneval", "code", 0, "pass"),
    SuiteTask("mbpp", "code", 3, "pass"),
    SuiteTask("piqa", "commonsense", 0, "acc_norm"),
    SuiteTask("social_iqa", "commonsense", 0, "acc"),
    SuiteTask("hellaswag", "commonsense", 0, "acc_norm"),
    SuiteTask("winogrande", "commonsense", 0, "acc"),
    SuiteTask("arc_easy", "commonsense", 0, "acc_norm"),
    SuiteTask("arc_challenge", "commonsense", 0, "acc_norm"),
    SuiteTask("openbookqa", "commonsense", 0, "acc_norm"),
    SuiteTask("commonsense_qa", "commonsense", 7, "acc"),
    SuiteTask("nq_open", "world_knowledge", 5, "exact_match", "remove_whitespace"),
    SuiteTask("triviaqa", "world_knowledge", 5, "exact_match", "remove_whitespace"),
    SuiteTask("squadv2", "reading", 0, "exact"),
    SuiteTask("quac", "reading", 0, "f1"),
    SuiteTask("boolq", "reading", 0, "acc"),
    SuiteTask("gsm8k", "math", 8, "exact_match", "strict-match"),
    SuiteTask("minerva_math", "math", 4, "exact_match"),
    SuiteTask("mmlu", "mmlu", 5, "acc"),
    SuiteTask("bbh_fewshot", "bbh", 3, "exact_match"),
    SuiteTask("agieval_en", "agieval", 3, "acc"),
)
OPTIONAL = {"quac"}  # in the suite, but not in lm-eval: used when the user supplies it


def resolve_tasks(spec: str, *, num_fewshot: int | None = None) -> list[SuiteTask]:
    """`table3`, category keys and lm-eval task names, comma-separated, as SuiteTasks."""
    out: list[SuiteTask] = []
    for name in (n.strip() for n in spec.split(",")):
        if not name:
            continue
        if name == "table3":
            picked = list(TABLE3)
        elif name in CATEGORIES:
            picked = [t for t in TABLE3 if t.category == name]
        else:
            picked = [SuiteTask(name)]
        for t in picked:
            if num_fewshot is not None:
                t = SuiteTask(t.task, t.category, num_fewshot, t.metric, t.metric_filter)
            if all(t.task != o.task for o in out):
                out.append(t)
    if not out:
        raise ValueError(f"--tasks = {spec!r}: expected lm-eval task names, table3 or a category "
                         f"({', '.join(CATEGORIES)})")
    return out


# ---------------------------------------------------------------------------------------------
# Tasks and datasets


def offline_first() -> None:
    """Read datasets from the Hugging Face cache only, unless the environment says otherwise:
    on a cluster without internet, a missing dataset is then an error at once, not a hang."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(key, "1")


def hf_cache_dir() -> str:
    return os.environ.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())


class Suite:
    """The lm-eval tasks of a run of evaluations, loaded once (so that a missing dataset is found
    before any model runs) and evaluated as often as asked."""

    def __init__(self, tasks: Sequence[SuiteTask], *, include_path: str = "",
                 confirm_run_unsafe_code: bool = False, log=print):
        from lm_eval.tasks import TaskManager

        if include_path and not Path(include_path).is_dir():
            raise ValueError(f"--include-path = {include_path!r}: not a directory")
        manager = None
        if include_path:  # indexing lm-eval's own tasks takes seconds: skip when all are local
            manager = TaskManager(include_path=include_path, include_defaults=False)
            if not all(t.task in manager.all_tasks for t in tasks):
                manager = None
        manager = manager or TaskManager(include_path=include_path or None)
        self.tasks: list[SuiteTask] = []
        self.loaded: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
        for t in tasks:
            if t.task not in manager.all_tasks:
                if t.task in OPTIONAL:
                    log(f"{t.task}: not an lm-eval task; {CATEGORIES[t.category]} averages the "
                        f"others (add a task named {t.task} with --include-path to include it)")
                    continue
                raise ValueError(f"task {t.task!r}: not an lm-eval task or group (nor in "
                                 f"--include-path {include_path or 'unset'})")
            if not confirm_run_unsafe_code and _is_unsafe(manager, t.task):
                if t.category and len(tasks) > 1:
                    log(f"{t.task}: skipped, it executes model-written code (pass "
                        "--confirm-run-unsafe-code to run it)")
                    continue
                raise ValueError(f"task {t.task!r} executes model-written code: pass "
                                 "--confirm-run-unsafe-code to run it")
            loaded = self._load(manager, t)
            for key in self.loaded:
                self.loaded[key].update(loaded.get(key, {}))
            self.tasks.append(t)
        if not self.tasks:
            raise ValueError("no task left to evaluate")
        self.confirm_run_unsafe_code = confirm_run_unsafe_code

    @staticmethod
    def _load(manager, t: SuiteTask) -> dict[str, Any]:
        try:
            loaded = manager.load([t.task])
        except OSError as e:  # ConnectionError (offline hub), FileNotFoundError (local files)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"task {t.task!r}: dataset not available here ({reason}); on a machine with "
                f"internet run `python -m llamatrain.evaluate --download --tasks {t.task}` and "
                f"copy {hf_cache_dir()} to this machine's HF_HOME, or point the task's YAML "
                "(--include-path) at local files") from None
        except ImportError as e:  # a task's helper module needs a package lm-eval leaves out
            raise ValueError(f"task {t.task!r} needs a package that is not installed ({e}); "
                             "install it (lm-eval's extras name most: pip install "
                             "'lm-eval[math]', 'lm-eval[ifeval]', ...)") from None
        for task in loaded["tasks"].values():
            if t.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=t.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        return loaded

    def run(self, lm, *, limit: int | None = None, bootstrap_iters: int = 0,
            log_samples: bool = False) -> dict[str, Any] | None:
        """lm-eval's results dict on rank 0 (None on the other ranks)."""
        from lm_eval.evaluator import evaluate

        for task in self.loaded["tasks"].values():
            # The same few-shot examples at every evaluation (lm-eval's default seed).
            task.set_fewshot_seed(seed=1234)
        return evaluate(lm, self.loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                        log_samples=log_samples, verbosity="WARNING",
                        confirm_run_unsafe_code=self.confirm_run_unsafe_code)


def _is_unsafe(manager, name: str) -> bool:
    """Whether a task's YAML (or one it includes) marks it `unsafe_code`, read before its
    dataset is loaded, so that a skipped code task needs no data."""
    path = getattr(manager.task_index.get(name), "yaml_path", None)
    seen: set[Path] = set()
    while path and Path(path).is_file() and Path(path) not in seen:
        path = Path(path)
        seen.add(path)
        text = path.read_text()
        if re.search(r"^unsafe_code:\s*true", text, re.MULTILINE | re.IGNORECASE):
            return True
        include = re.search(r"^include:\s*(\S+)", text, re.MULTILINE)
        path = path.parent / include.group(1).strip("'\"") if include else None
    return False


def download(tasks: Sequence[SuiteTask], include_path: str = "") -> None:
    """Load every task online, which stores its datasets in the Hugging Face cache."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ[key] = "0"
    Suite(tasks, include_path=include_path, confirm_run_unsafe_code=True)
    print(f"datasets of {len(tasks)} task(s) are in {hf_cache_dir()}: copy it to the machine "
          "that evaluates (its HF_HOME)")


# ---------------------------------------------------------------------------------------------
# The model as an lm-eval LM


def length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, each padded batch within
    max_tokens (a single longer item is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class LlamaLM(TemplateLM):
    """lm-eval's LM interface over a llamatrain Transformer (plain or FSDP-sharded) and its
    SentencePiece tokenizer. Scoring runs the training forward on length-sorted batches;
    generation runs inference.generate with its KV cache. Under torch.distributed each rank
    answers the requests lm-eval gives it; with a sharded model every forward is collective, so
    the ranks agree before each one whether any still has work and run an idle one if they have
    none (lockstep)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, batch_tokens: int = 4096,
                 max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tok = model, tokenizer
        self.batch_tokens = batch_tokens
        self._max_gen_toks = max_gen_toks
        self._device = model.rope_cos.device
        if dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self.lockstep = self._world_size > 1 and _is_sharded(model)

    # -- what lm-eval asks of a model ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"llamatrain-sentencepiece-{self.tok.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                   ) -> list[int]:
        """SentencePiece ids, after BOS unless add_special_tokens is False (as HF's Llama)."""
        ids = self.tok.encode(string)
        return ids if add_special_tokens is False else [self.tok.bos_id, *ids]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # -- lockstep ------------------------------------------------------------------------------
    def _any_active(self, active: bool) -> bool:
        if not self.lockstep:
            return active
        flag = torch.tensor([int(active)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _idle_until_all_done(self, idle_forward) -> None:
        while self._any_active(False):
            idle_forward()

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        self._any_active(True)
        return self.model(tokens)

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), greedy?) of ((context, continuation), context ids,
        continuation ids); the sequence is cut on the left to max_length + 1 tokens."""
        items = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            scored = min(len(continuation), len(whole) - 1)  # the first token has no prediction
            items.append((whole[:-1], whole[len(whole) - scored:]))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        for batch in length_batches([len(inp) for inp, _ in items], self.batch_tokens):
            width = len(items[batch[0]][0])
            tokens = torch.tensor([items[i][0] + [self.tok.eos_id] * (width - len(items[i][0]))
                                   for i in batch], device=self.device)
            logprobs = self._logits(tokens).float().log_softmax(-1)
            for row, i in enumerate(batch):
                inp, target = items[i]
                scores = logprobs[row, len(inp) - len(target): len(inp)]
                target_t = torch.tensor(target, device=self.device)
                out[i] = (scores.gather(-1, target_t[:, None]).sum().item(),
                          bool((scores.argmax(-1) == target_t).all()))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        self._idle_until_all_done(
            lambda: self.model(torch.tensor([[self.tok.bos_id]], device=self.device)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in windows of max_length tokens after BOS, each
        token predicted once with as much context as a window holds (lm-eval's windows)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, req in enumerate(requests):
            for window in get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0], add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1):
                context, continuation = make_disjoint_window(window)
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logprob
        return totals

    # -- generation ----------------------------------------------------------------------------
    def _sampling(self, kwargs: dict[str, Any]) -> Sampling:
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = kwargs.pop("do_sample", None)
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0
        return Sampling(temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                        top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                        seed=int(kwargs.pop("seed", 1234)))

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut at the first of its `until` strings; greedy unless
        its generation kwargs sample. Batches share generation kwargs and similar lengths."""
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out: list[str | None] = [None] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = self._sampling(kwargs)
            budget = self.max_length - max_new
            if budget < 1:
                raise ValueError(f"max_gen_toks = {max_new}: leaves no room for a context in "
                                 f"the model's {self.max_length} positions")
            contexts = [self.tok_encode(requests[n].args[0])[-budget:] for n in members]

            def stop(tokens: list[int], until: list[str] = until) -> bool:
                text = self.tok.decode(tokens)
                return any(s in text for s in until)

            # The budget counts the positions each row's KV cache will hold.
            lengths = [len(c) + max_new for c in contexts]
            for batch in length_batches(lengths, self.batch_tokens):
                new = generate(self.model, [contexts[i] for i in batch], max_new_tokens=max_new,
                               eos_id=self.tok.eos_id, sampling=sampling, stop=stop,
                               before_forward=lambda: self._any_active(True))
                for i, tokens in zip(batch, new, strict=True):
                    text = self.tok.decode(tokens)
                    for s in until:
                        text = text.split(s)[0]
                    out[members[i]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[i]].args, text)
        self._idle_until_all_done(self._idle_generation_step)
        return out

    def _idle_generation_step(self) -> None:
        tokens = torch.tensor([[self.tok.bos_id]], device=self.device)
        cached_forward(self.model, tokens, torch.zeros_like(tokens),
                       KVCache(len(self.model.layers), 1, 1))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_kind(path: Path) -> str:
    """dcp (RUN_DIR/checkpoints/step-N), init (convert from-hf/from-meta output), hf, meta, or
    run (a run directory: all of its checkpoints)."""
    if (path / ".metadata").is_file() and (path / "model.toml").is_file():
        return "init"
    if (path / ".metadata").is_file() and RunDir.of_checkpoint(path).config.is_file():
        return "dcp"
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    if RunDir(path).checkpoints.is_dir() and RunDir(path).config.is_file():
        return "run"
    raise ValueError(f"checkpoint {str(path)!r}: expected RUN_DIR/checkpoints/step-N, a run "
                     "directory, a `convert from-hf/from-meta` output, a Hugging Face directory "
                     "(config.json) or a Meta directory (params.json)")


def expand_checkpoints(paths: Sequence[str]) -> list[Path]:
    """Checkpoints to evaluate, in order; a run directory stands for all of its checkpoints."""
    out: list[Path] = []
    for p in map(Path, paths):
        if checkpoint_kind(p) == "run":
            # DCP writes .metadata last: a step directory with it holds the whole model.
            steps = [s for s in reversed(step_dirs(RunDir(p).checkpoints))
                     if (s / ".metadata").is_file()]
            if not steps:
                raise ValueError(f"run {str(p)!r}: no complete checkpoint under checkpoints/")
            out += steps
        else:
            out.append(p)
    return out


def _model_section(toml_path: Path) -> ModelConfig:
    """The [model] section of a run's config.toml or a converted checkpoint's model.toml, checked
    as a config's would be (config.validate_model) before the model is built."""
    import tomllib

    from llamatrain.config import from_dict, validate_model

    try:
        section = tomllib.loads(toml_path.read_text()).get("model", {})
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{str(toml_path)!r}: not a readable TOML file ({e})") from None
    try:
        return validate_model(from_dict({"model": section}).model)
    except ValueError as e:
        raise ValueError(f"{str(toml_path)!r}: {e}") from None


def _find_tokenizer(path: Path, kind: str, override: str) -> Tokenizer:
    if override:
        return load_tokenizer(override)
    if kind == "dcp":
        from llamatrain.convert import run_tokenizer

        return run_tokenizer(path)
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.is_file():
            return load_tokenizer(candidate)
    raise ValueError(f"checkpoint {str(path)!r}: no tokenizer.model beside it; pass --tokenizer")


def must_shard(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the weights would take more than 3/4 of one GPU: then they are sharded over the
    ranks (under torchrun), leaving room for activations and the KV cache."""
    if device.type != "cuda" or not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    with torch.device("meta"):
        size = sum(p.numel() for p in Transformer(cfg).parameters()) * dtype.itemsize
    return size > 0.75 * torch.cuda.get_device_properties(device).total_memory


def load_checkpoint(path: str | Path, *, device: torch.device, dtype: torch.dtype,
                    shard: bool | None = False, tokenizer: str = "", verify: bool = True
                    ) -> tuple[Transformer, Tokenizer]:
    """A checkpoint's model on `device` (sharded over every rank with FSDP2 when `shard`, or
    when it does not fit one GPU if `shard` is None) in `dtype`, ready to evaluate, and its
    tokenizer. A DCP checkpoint is verified against its checksums first; `verify` False also
    loads one that has none (with a warning)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from llamatrain.checkpoint.dcp import load_model_weights
    from llamatrain.config import ParallelConfig
    from llamatrain.convert import load_hf, load_meta
    from llamatrain.distributed.parallel_dims import ParallelDims
    from llamatrain.distributed.parallelize import parallelize

    path = Path(path)
    kind = checkpoint_kind(path)
    full: dict[str, torch.Tensor] | None = None
    if kind == "dcp":
        cfg = _model_section(RunDir.of_checkpoint(path).config)
    elif kind == "init":
        cfg = _model_section(path / "model.toml")
    else:
        full, cfg = load_hf(path) if kind == "hf" else load_meta(path)
    tok = _find_tokenizer(path, kind, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"checkpoint {str(path)!r}: tokenizer has {tok.vocab_size} pieces, "
                         f"more than the model's {cfg.vocab_size}")
    if shard is None:
        shard = must_shard(cfg, device, dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    if shard:
        mesh = ParallelDims.from_config(ParallelConfig(), dist.get_world_size()).build_mesh(
            device.type)
        model = parallelize(model, ParallelConfig(), mesh, param_dtype=dtype)
    model.to_empty(device=device)
    if full is None:
        load_model_weights(path, model, key="checkpoint", verify=verify,
                           bypass="pass --no-verify",
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    elif shard:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                   strict=True))
    else:
        model.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    if not shard:
        model.to(dtype)
    model.init_rope()  # fp32 tables, also after a cast to bf16
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------
# Scores and the Table 3 report


def _metric_value(entry: dict[str, Any], metric: str, metric_filter: str) -> float | None:
    values = {k: v for k, v in entry.items()
              if "," in k and "stderr" not in k and isinstance(v, int | float)}
    if metric_filter and f"{metric},{metric_filter}" in values:
        return float(values[f"{metric},{metric_filter}"])
    for exact in (True, False):
        for key, value in values.items():
            name = key.split(",")[0]
            if (name == metric) if exact else (not metric or name.startswith(metric)):
                return float(value)
    return None


def task_score(results: dict[str, Any], t: SuiteTask) -> float | None:
    """The score of a task in percent (a group without its own aggregate: the mean of its
    subtasks), or None if the results lack it."""
    for section in ("results", "groups"):
        entry = results.get(section, {}).get(t.task)
        if entry:
            value = _metric_value(entry, t.metric, t.metric_filter)
            if value is not None:
                return 100 * value
    children = results.get("group_subtasks", {}).get(t.task, [])
    scores = [task_score(results, SuiteTask(c, metric=t.metric, metric_filter=t.metric_filter))
              for c in children]
    scores = [s for s in scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def summarize(results: dict[str, Any], tasks: Sequence[SuiteTask]) -> dict[str, float]:
    """Per-task scores and, for the suite's categories, their averages (§2.3): the keys are
    task names and Table 3's column names."""
    out: dict[str, float] = {}
    for t in tasks:
        score = task_score(results, t)
        if score is not None:
            out[t.task] = score
    for key, column in CATEGORIES.items():
        scores = [out[t.task] for t in tasks if t.category == key and t.task in out]
        if scores:
            out[column] = sum(scores) / len(scores)
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def report_markdown(rows: Sequence[tuple[str, dict[str, float]]], tasks: Sequence[SuiteTask]
                    ) -> str:
    """Table 3's layout (one row per checkpoint, a column per category present), then every
    task's score beside, with its shots."""
    columns = [c for k, c in CATEGORIES.items()
               if any(t.category == k for t in tasks) and any(c in r for _, r in rows)]
    lines = []
    if columns:
        lines += ["| checkpoint | " + " | ".join(columns) + " |",
                  "| --- |" + " --- |" * len(columns)]
        lines += [f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in columns) + " |"
                  for name, r in rows]
        lines.append("")
    names = [t.task for t in tasks]
    shots = ["" if t.num_fewshot is None else f" ({t.num_fewshot}-shot)" for t in tasks]
    lines += ["| checkpoint | " + " | ".join(n + s for n, s in zip(names, shots, strict=True))
              + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {name} | " + " | ".join(_fmt(r.get(n)) for n in names) + " |"
              for name, r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# During training


class TrainingBenchmarks:
    """The [eval] section of a run: its tasks, loaded when the run starts (a missing dataset
    stops the run before it trains), evaluated on the live (possibly sharded) model by every
    rank every eval.interval steps and at the end. Code tasks are never run here."""

    def __init__(self, cfg: EvalConfig, tokenizer: Tokenizer, *, log=print):
        offline_first()
        self.cfg, self.tokenizer = cfg, tokenizer
        try:
            self.suite = Suite(resolve_tasks(cfg.tasks), include_path=cfg.include_path, log=log)
        except ValueError as e:
            raise ValueError(f"eval.tasks = {cfg.tasks!r}: {e}") from None
        self.last_step = -1

    def due(self, step: int, *, final: bool) -> bool:
        if step == self.last_step:
            return False
        return final or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def run(self, model: Transformer, step: int) -> dict[str, float] | None:
        """Scores in percent (tasks and Table 3 categories) on rank 0, None on the others."""
        self.last_step = step
        results = self.suite.run(LlamaLM(model, self.tokenizer), limit=self.cfg.limit or None)
        return None if results is None else summarize(results, self.suite.tasks)

    def report(self, records: Sequence[dict[str, Any]]) -> str:
        """Table 3 for every evaluation logged in metrics.jsonl (`eval/...` keys), by step."""
        rows = [(f"step {r['step']}", {k.removeprefix("eval/"): v for k, v in r.items()
                                       if k.startswith("eval/")})
                for r in records if any(k.startswith("eval/") for k in r)]
        return report_markdown(rows, self.suite.tasks) if rows else ""


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llamatrain.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="step-N checkpoint, run directory, HF or Meta directory")
    p.add_argument("--tasks", required=True, help="task names, table3 or a category")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots for every task")
    p.add_argument("--limit", type=int, default=None, help="documents per task (for a look)")
    p.add_argument("--include-path", default="",
                   help="directory of your own task YAMLs; its Python runs (`!function`)")
    p.add_argument("--out", default="", help="write results.json and report.md here")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tokenizer", default="", help="SentencePiece model, if not beside")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model over the ranks (automatic when it does not fit a GPU)")
    p.add_argument("--download", action="store_true",
                   help="fetch the tasks' datasets into the Hugging Face cache and exit")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow code benchmarks, which execute model-written code")
    p.add_argument("--no-verify", action="store_true",
                   help="also load a DCP checkpoint without checksums (no trainer.json), "
                   "unverified, with a warning")
    return p


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    for flag, value, least in (("--num-fewshot", args.num_fewshot, 0), ("--limit", args.limit, 1),
                               ("--batch-tokens", args.batch_tokens, 1)):
        if value is not None and value < least:
            raise ValueError(f"{flag} = {value}: expected an integer >= {least}")
    tasks = resolve_tasks(args.tasks, num_fewshot=args.num_fewshot)
    if args.download:
        download(tasks, args.include_path)
        return 0
    if not args.checkpoints:
        raise ValueError("CHECKPOINT: give at least one (or --download)")
    checkpoints = expand_checkpoints(args.checkpoints)
    offline_first()
    from llamatrain.distributed.world import init_distributed

    world = init_distributed()
    device = _device()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.fsdp and world.world_size == 1:
        raise ValueError("--fsdp: shards over the ranks of torchrun; run under torchrun")
    say = print if world.is_main else (lambda *a, **k: None)
    if args.confirm_run_unsafe_code:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # the code_eval metric asks for it too
    suite = Suite(tasks, include_path=args.include_path,
                  confirm_run_unsafe_code=args.confirm_run_unsafe_code, log=say)
    rows, everything = [], {}
    for ckpt in checkpoints:
        model, tok = load_checkpoint(ckpt, device=device, dtype=dtype,
                                     shard=True if args.fsdp else None, tokenizer=args.tokenizer,
                                     verify=not args.no_verify)
        lm = LlamaLM(model, tok, batch_tokens=args.batch_tokens)
        results = suite.run(lm, limit=args.limit, bootstrap_iters=1000)
        if world.is_main:
            scores = summarize(results, suite.tasks)
            rows.append((str(ckpt), scores))
            everything[str(ckpt)] = {"scores": scores, **_jsonable(results)}
            say(f"{ckpt}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
        del model, lm
    if world.is_main:
        report = report_markdown(rows, suite.tasks)
        print("\n" + report)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(everything, indent=2) + "\n")
            (out / "report.md").write_text("# Benchmarks (§2.3, Table 3 layout)\n\n" + report)
            print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
            "higher_is_better", "n-samples")
    return json.loads(json.dumps({k: results[k] for k in keep if k in results}, default=str))


if __name__ == "__main__":
    from llamatrain.config import run_cli

    run_cli(main)
