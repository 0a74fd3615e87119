"""The training loop: `python -m llamatrain.train --config CONFIG [--section.key=value ...]`.

Alone it is a world of one; under torchrun it is one rank of any number of processes and nodes.
Each step reads its slice of the global batch, runs the micro-batches (gradient accumulation),
clips, steps AdamW on the §2.2 schedule and logs; checkpoints are saved every
`checkpoint.interval` steps and at the end, and a run whose directory holds one resumes from it.

Exit codes: 0 done; 2 bad configuration, or a run directory this run must not use (held by another
run, or holding checkpoints of another run, or checkpoints none of which loads); 3 too many
non-finite losses in a row; 4 disk full; 130 interrupted (SIGINT);
75 (REQUEUE_EXIT_CODE) requeue me, resuming from the latest checkpoint: a SIGUSR1 or SIGTERM was
received and a checkpoint saved, or the watchdog saw no progress for train.hang_timeout_s (stacks
in `<run.dir>/hang/`), or a collective failed because another rank was lost.
torchrun reports any non-zero worker exit as its own exit 1, so a stop for requeue also leaves the
file `<run.dir>/requeue` (the step and the reason), which launchers read; the next start removes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llamatrain.carbon import EnergyMeter, account, format_accounting
from llamatrain.checkpoint.dcp import Checkpointer, load_model_weights
from llamatrain.checkpoint.identity import new_run_id, run_identity
from llamatrain.checkpoint.interval import SaveSchedule
from llamatrain.checkpoint.interval import markdown as interval_markdown
from llamatrain.checkpoint.rundir import (
    REQUEUE,
    RunDir,
    RunDirRefused,
    check_usable,
    copy_file,
    make_dir,
    write_atomic,
    write_with,
)
from llamatrain.checkpoint.runlock import RunDirLocked, RunLock
from llamatrain.config import (
    Config,
    TrainConfig,
    load_config,
    run_cli,
    split_cli,
    to_dict,
    to_toml,
    usage,
)
from llamatrain.data.cache import prepare_sources, read_meta
from llamatrain.data.datasets import open_training_data
from llamatrain.data.loader import BatchLoader
from llamatrain.distributed.float8 import Float8
from llamatrain.distributed.parallel_dims import ParallelDims
from llamatrain.distributed.parallelize import local_bytes, materialize, parallelize
from llamatrain.distributed.pipeline import Pipeline
from llamatrain.distributed.world import World, collective_timeout_s, init_distributed
from llamatrain.flops import mfu as model_flops_utilisation
from llamatrain.goodput import Goodput
from llamatrain.goodput import markdown as goodput_markdown
from llamatrain.kernels_choice import choose_kernels
from llamatrain.loss import IGNORE_INDEX, loss_context, micro_batch_loss
from llamatrain.metrics import (
    MetricsLogger,
    memory_gb,
    plot_loss,
    read_metrics,
    require_optional,
)
from llamatrain.model import Transformer, num_params
from llamatrain.requeue import REQUEUE_EXIT_CODE, peer_lost, read_failures, record_exit
from llamatrain.stragglers import Stragglers
from llamatrain.stragglers import markdown as straggler_markdown
from llamatrain.watchdog import Watchdog, set_aside

REQUEUE_MARKER = REQUEUE
BAD_STEPS_EXIT_CODE = 3
DISK_FULL_EXIT_CODE = 4
INTERRUPTED_EXIT_CODE = 130


@dataclass
class Faults:
    """Fault injection for tests, from the environment: LLAMATRAIN_FAULT_NAN_STEPS (comma-separated
    steps whose loss is made NaN), LLAMATRAIN_FAULT_STOP_STEP (act as if SIGUSR1 arrived before
    that step), LLAMATRAIN_FAULT_KILL_STEP (the last rank SIGKILLs itself before that step, on
    torchrun's first attempt only), LLAMATRAIN_FAULT_SIGNAL=STEP:RANK (that rank alone sends
    itself a real SIGUSR1 before that step), LLAMATRAIN_FAULT_HANG=STEP:RANK (that rank stops for
    good before that step), LLAMATRAIN_FAULT_SLOW=RANK:SECONDS (that rank sleeps in every step,
    before its first collective)."""

    nan_steps: frozenset[int] = frozenset()
    stop_step: int | None = None
    kill_step: int | None = None
    signal_at: tuple[int, ...] | None = None
    hang_at: tuple[int, ...] | None = None
    slow: tuple[int, float] | None = None

    @classmethod
    def from_env(cls) -> Faults:
        env = os.environ

        def step(name: str) -> int | None:
            return int(env[name]) if env.get(name) else None

        def pair(name: str) -> tuple[int, ...] | None:
            value = env.get(name, "")
            return tuple(int(x) for x in value.split(":")) if value else None

        nan = env.get("LLAMATRAIN_FAULT_NAN_STEPS", "")
        slow = env.get("LLAMATRAIN_FAULT_SLOW", "")
        return cls(frozenset(int(s) for s in nan.split(",") if s),
                   step("LLAMATRAIN_FAULT_STOP_STEP"), step("LLAMATRAIN_FAULT_KILL_STEP"),
                   pair("LLAMATRAIN_FAULT_SIGNAL"), pair("LLAMATRAIN_FAULT_HANG"),
                   (int(slow.split(":")[0]), float(slow.split(":")[1])) if slow else None)

    def at_step_boundary(self, trainer: Trainer) -> None:
        if trainer.step == self.stop_step:
            trainer.stop.requested = True
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        world = trainer.world
        if trainer.step == self.kill_step and first_attempt and world.rank == world.world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.signal_at == (trainer.step, world.rank):
            signal.raise_signal(signal.SIGUSR1)
        while self.hang_at == (trainer.step, world.rank):
            time.sleep(3600)  # until the watchdog ends the process

    def in_step(self, world: World) -> None:
        if self.slow is not None and self.slow[0] == world.rank:
            time.sleep(self.slow[1])


class TooManyBadSteps(RuntimeError):
    pass


class StopFlag:
    """Set by SIGUSR1/SIGTERM from the first moment of main(), so that a preemption notice that
    arrives while data is prepared or the model built is not lost."""

    FAULT = 1  # `code` of a stop asked for by fault injection; a signal's code is its number

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0

    @property
    def code(self) -> int:
        """What this rank was asked: 0 nothing, FAULT, or the number of the signal it got."""
        return self.signum or (self.FAULT if self.requested else 0)

    @staticmethod
    def reason(code: int) -> str:
        return "fault injection" if code == StopFlag.FAULT else signal.Signals(code).name

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.signum = signum
        print(f"pid {os.getpid()}: got {signal.Signals(signum).name}; saving at the next step "
              "boundary", file=sys.stderr, flush=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update number `step` (0-based): linear warmup, then cosine to
    min_lr_ratio of the peak at the last step (§2.2: 2000 warmup steps, decay to 10%)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _fused_adam():
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        raise ValueError("train.optimizer = 'apex_fused_adam': NVIDIA apex is not importable "
                         "(build it from github.com/NVIDIA/apex, or use 'adamw')") from None
    return FusedAdam


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on the 2-D weight matrices (linear layers and embeddings) only;
    RMSNorm gains are not decayed."""
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim != 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "apex_fused_adam":
        return _fused_adam()(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def use_deterministic_algorithms() -> None:
    """torch's deterministic algorithms. On CUDA they need cuBLAS with a fixed workspace, which
    CUBLAS_WORKSPACE_CONFIG sets when cuBLAS starts (torch refuses the first matmul without it);
    a value the user set is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def attention_backward(cfg: Config) -> str:
    """The attention backward a run uses: the deterministic one whenever train.deterministic asks
    for bit-identical reruns, else kernels.attention_backward."""
    return "deterministic" if cfg.train.deterministic else cfg.kernels.attention_backward


class Trainer:
    def __init__(self, cfg: Config, world: World, stop: StopFlag | None = None):
        # Optional packages asked for and missing: one line now, not after data and model.
        require_optional(cfg.metrics)
        if cfg.train.optimizer == "apex_fused_adam":
            _fused_adam()
        self.cfg, self.world = cfg, world
        self.device = world.device
        self.float8 = Float8.for_run(cfg.train.float8, self.device)  # missing torchao: one line
        self.run_dir = Path(cfg.run.dir)
        self.files = RunDir(self.run_dir)
        self.stop = stop or StopFlag()
        self.dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                      "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.train.dtype]
        run = ParallelDims.for_run(cfg, world.world_size, world.local_world_size)
        self.dims = run.dims
        # The ranks of one tensor-parallel group, and of one pipeline, read the same samples.
        self.tp, self.dp_size = self.dims.tp, self.dims.dp_size
        self.dp_rank = self.dims.coordinates(world.rank).dp_rank
        self.global_batch, self.accum = run.global_batch, run.accum
        self.pp_micro_batches = run.pp_micro_batches
        # Each op's kernel or PyTorch path, on this run's shapes (kernels.backend = auto: timed).
        self.kernel_choice = choose_kernels(cfg, tp=self.dims.tp, device=self.device,
                                            dtype=self.dtype,
                                            attention_backward=attention_backward(cfg))
        self.backend = self.kernel_choice.resolved
        self.log(self.kernel_choice.summary())
        self.faults = Faults.from_env()
        self.goodput = Goodput(num_devices=world.world_size)
        self.schedule = SaveSchedule(cfg.checkpoint)
        self.staging_wait_s = 0.0  # time the loop waited for async checkpoint staging
        self.sync_wait_s = 0.0  # this step's wait for the other ranks at its first collective
        self.loader: BatchLoader | None = None  # started at the first step, after a restore
        self.state_bytes: dict[str, int] = {}
        self.lock = self._lock_run_dir()
        try:
            self._setup(cfg, world)
        except BaseException:
            self.release()
            raise

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 checks that the run directory is one this run may use, before anything is
        written, and takes it for the whole run; every rank stops if it cannot."""
        lock, error = None, None
        if self.world.is_main:
            lock = RunLock(self.run_dir, log=self.log)
            try:
                check_usable(self.run_dir, self.cfg)
                lock.acquire()
            except (RunDirLocked, RunDirRefused) as e:
                error = e
        held = _all_reduce(torch.tensor([float(error is None)], device=self.device),
                           dist.ReduceOp.MIN)
        if error is not None:
            raise error
        if not held.item():
            raise RunDirRefused(f"run.dir = {str(self.run_dir)!r}: refused by rank 0 (see its "
                                "error)")
        return lock

    def release(self) -> None:
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, cfg: Config, world: World) -> None:
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            use_deterministic_algorithms()

        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        timeout = collective_timeout_s()
        self.log(f"world {world.world_size} on {world.num_nodes} node(s), {self.device_name}, "
                 f"kernels {self.backend}, {str(self.dtype).removeprefix('torch.')}; global batch "
                 f"{self.global_batch} x {cfg.train.seq_len} tokens, {self.accum} micro-batch(es) "
                 f"of {cfg.train.micro_batch_size} per rank; SLURM_RESTART_COUNT {restarts}, "
                 f"torchrun restarts {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}; "
                 f"collective timeout {'n/a' if timeout is None else f'{timeout:.0f} s'}")
        self.stragglers = Stragglers(world, cfg.metrics.straggler_factor, self.log)
        self.watchdog = Watchdog(self.run_dir, rank=world.rank, world_size=world.world_size,
                                 gpu=world.gpu, timeout_s=cfg.train.hang_timeout_s,
                                 on_fire=self._on_hang, flight_recorder=self.device.type == "cuda",
                                 log=self.log)
        self._setup_data()
        self.benchmarks = _benchmarks(cfg, self.train_data.tokenizer, self.log)
        self.metrics = MetricsLogger(self.run_dir, cfg.metrics, enabled=world.is_main,
                                     total_steps=cfg.train.steps, run_name=cfg.run.name,
                                     config=to_dict(cfg))
        self._setup_model()
        identity = run_identity(cfg, data=self.data.identity, run_id=new_run_id())
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint, rank=world.rank,
                                         world_size=world.world_size, identity=identity)
        self.energy = EnergyMeter(self.device)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def log(self, message: str) -> None:
        if self.world.is_main:
            print(message, flush=True)

    def _setup_data(self) -> None:
        cfg, world = self.cfg, self.world
        # One process per node prepares the sources; the others then find them in the cache.
        if world.local_rank == 0:
            paths = prepare_sources(cfg.data, vocab_size=cfg.model.vocab_size)
        if dist.is_initialized():
            dist.barrier()
        if world.local_rank != 0:
            paths = prepare_sources(cfg.data, vocab_size=cfg.model.vocab_size)
        self.data = open_training_data(paths, cfg.data, seq_len=cfg.train.seq_len,
                                       vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
        self.train_data, self.val_data = self.data.train, self.data.val
        self.sampler = self.data.sampler
        if cfg.train.epochs > 0:
            cfg.train.steps = math.ceil(cfg.train.epochs * len(self.train_data) / self.global_batch)
            if cfg.train.warmup_steps >= cfg.train.steps:
                raise ValueError(f"train.warmup_steps = {cfg.train.warmup_steps}: must be shorter "
                                 f"than the {cfg.train.steps} steps of train.epochs = "
                                 f"{cfg.train.epochs}")
            self.log(f"train.epochs = {cfg.train.epochs}: {cfg.train.steps} steps")
        sizes = self.data.source_sizes()
        for source, path in zip(self.data.sources, self.data.paths, strict=True):
            self.log(f"data {source.name} (weight {source.weight:g}) {path}: "
                     f"{sizes[source.name]:,} training sequences")
        self.log(f"data: {len(self.train_data):,} training and {len(self.val_data):,} "
                 f"validation sequences")

    def _setup_model(self) -> None:
        cfg, world = self.cfg, self.world
        with torch.device("meta"):
            model = Transformer(cfg.model, fuse_residual=cfg.kernels.fused_residual)
        self.num_params = num_params(model)
        use_fsdp = world.world_size > 1 or self.device.type == "cuda"
        self.mesh = self.dims.build_mesh(self.device.type) if use_fsdp else None
        self.pipeline = None
        if self.dims.pp > 1:
            self.pipeline = Pipeline(cfg, model, self.dims, self.mesh, self.device,
                                     rank=world.rank, micro_batches=self.pp_micro_batches,
                                     param_dtype=self.dtype, fused=self._fused,
                                     float8=self.float8)
            self.model = self.pipeline.model
        else:
            self.model = parallelize(model, cfg.parallel, self.mesh, param_dtype=self.dtype,
                                     float8=self.float8)
            materialize(self.model, self.device, seed=cfg.train.seed)
        if self.float8 is not None:
            self.log(self.float8.describe(compiled=cfg.parallel.compile))
        self.optimizer = build_optimizer(self.model, cfg.train, self.device)
        mesh = (f"mesh {dict(zip(self.mesh.mesh_dim_names, self.mesh.shape, strict=True))}"
                if self.mesh else "unsharded")
        self.log(f"model {self.num_params:,} parameters ({mesh})")

    # ------------------------------------------------------------------------------------------

    def _agree_to_stop(self) -> int:
        """0 to go on, else why some rank was asked to stop (StopFlag.code, agreed by all)."""
        flag = _all_reduce(torch.tensor([float(self.stop.code)], device=self.device),
                           dist.ReduceOp.MAX)
        return int(flag.item())

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "sampler": self.sampler.state_dict(), "schedule": {"step": self.step},
                "bad_steps": self.bad_steps, "wall_s": self.wall_s,
                "energy_kwh": self._energy_so_far(), "float8": self.cfg.train.float8,
                "goodput": asdict(self.goodput.ledger()),
                "checkpoint_interval": self.schedule.state_dict()}

    def save(self) -> None:
        if self.bad_steps:
            # The weights may already be non-finite: a checkpoint now would be restored as good.
            start = f"step-{self.last_saved}" if self.last_saved >= 0 else "the beginning"
            self.log(f"step {self.step}: no checkpoint during a non-finite streak; a resume "
                     f"starts from {start}")
            return
        with self.watchdog.long_phase(self.step, "checkpoint"):
            blocked = self.checkpointer.save(self.step, self.model, self.optimizer,
                                             self._trainer_state())
            # The job's save cost is its slowest rank's; every rank then computes one interval.
            cost = torch.tensor([blocked, self.checkpointer.last_total_s or 0.0,
                                 self.watchdog.median_step_s or 0.0], device=self.device)
            blocked_max, total, step_s = _all_reduce(cost, dist.ReduceOp.MAX).tolist()
        self.goodput.stalled(blocked)
        self.schedule.measured(blocked_s=blocked_max, total_s=total, step_s=step_s)
        mode = "async, " if self.cfg.checkpoint.async_save else ""
        every = (f"; next in {self.schedule.every} steps (auto)" if self.schedule.auto else "")
        self.log(f"checkpoint step-{self.step} ({mode}blocked {blocked:.2f} s){every}")
        self.last_saved = self.step

    def restore(self) -> None:
        self.step = self.tokens_seen = self.bad_steps = 0
        self.wall_s = self.energy_kwh = 0.0
        start = time.perf_counter()
        restored = self.checkpointer.restore(self.model, self.optimizer, log=self.log)
        self.goodput.restore_took(time.perf_counter() - start)
        if restored is None:
            if self.cfg.checkpoint.init_from:
                load_model_weights(self.cfg.checkpoint.init_from, self.model,
                                   verify=self.cfg.checkpoint.verify_init_from,
                                   bypass="set --checkpoint.verify_init_from=false", log=self.log)
                self.log(f"initialised weights from {self.cfg.checkpoint.init_from}")
            self.last_saved = -1
            self.metrics.truncate_after(0)  # records of an attempt that never saved
            return
        state = restored.trainer
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.bad_steps, self.wall_s = state["bad_steps"], state["wall_s"]
        self.energy_kwh = state.get("energy_kwh") or 0.0
        self.sampler.load_state_dict(state["sampler"])
        self.last_saved = self.step
        self.schedule.load_state_dict(state.get("checkpoint_interval"))
        if self.world.is_main:  # only rank 0's ledger is saved and reported
            self.goodput.resumed(self.run_dir, state, log=self.log)
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {restored.path} (step {self.step}, saved at world size "
                 f"{state['saved_world_size']})")
        # Not part of the run's identity: the weights are the same tensors either way.
        if state.get("float8", "none") != self.cfg.train.float8:
            self.log(f"train.float8 {state.get('float8', 'none')!r} -> "
                     f"{self.cfg.train.float8!r} from this step on")

    def _on_hang(self, step: int, line: str) -> None:
        """The watchdog fired (its own thread): leave the requeue marker like a stop does."""
        if self.world.is_main:
            marker = {"step": step, "reason": line}
            write_atomic(self.files.requeue, json.dumps(marker) + "\n")

    # ------------------------------------------------------------------------------------------

    def _micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], float]:
        """This rank's micro-batches of the next step and the seconds the loop waited for them."""
        if self.loader is None:
            self.loader = BatchLoader(self.train_data, self.sampler, global_batch=self.global_batch,
                                      rank=self.dp_rank, world_size=self.dp_size,
                                      micro_batch_size=self.cfg.train.micro_batch_size,
                                      device=self.device, prefetch=self.cfg.data.prefetch)
        return self.loader.next()

    def _close_loader(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    @property
    def _fused(self) -> bool:
        # The fused loss needs the whole vocabulary: under tensor parallelism, the sharded logits.
        return self.cfg.kernels.fused_loss and self.tp == 1

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return micro_batch_loss(self.model, batch, fused=self._fused)

    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches; returns (global loss, grad norm).

        The loss is the mean over every unmasked target of the global batch, so SFT's masked
        prompts and unequal micro-batches weigh exactly as they should: each micro-batch's mean is
        weighted by its share of the global target count (FSDP then averages over the data-parallel
        ranks). Sums over all ranks count each tensor-parallel group tp times, and the targets of
        each pipeline pp times; under pipelining only the last stage's ranks hold losses."""
        counts = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro]).to(self.device)
        sync = time.perf_counter()
        global_count = (_all_reduce(counts.sum().float()) / (self.tp * self.dims.pp)).clamp(min=1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the wait for the other ranks, seen by the host
        self.sync_wait_s = time.perf_counter() - sync  # stragglers: the others' lateness
        scale = float("nan") if self.step in self.faults.nan_steps else 1.0
        max_norm = self.cfg.train.grad_clip or float("inf")
        if self.pipeline is not None:
            total = self.pipeline.step(micro, global_count=global_count, scale=scale)
            norm = self.pipeline.clip_grad_norm_(max_norm)
            return (_all_reduce(total) / self.tp).item(), norm.item()
        total = torch.zeros((), device=self.device)
        with loss_context(self.mesh):
            for i, batch in enumerate(micro):
                if self.mesh is not None:
                    self.model.set_requires_gradient_sync(i == len(micro) - 1)
                loss, count = self._loss(batch)
                share = loss * scale * count / global_count
                (share * self.dp_size).backward()
                total += share.detach()
        loss = (_all_reduce(total) / self.tp).item()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return loss, norm.item()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the first eval_batches micro-batches of every rank."""
        mbs, dp_size = self.cfg.train.micro_batch_size, self.dp_size
        n = min(len(self.val_data), self.cfg.train.eval_batches * mbs * dp_size)
        if n < dp_size:
            return None
        self.model.eval()
        mine = list(range(self.dp_rank, n, dp_size))
        batches = [{k: v.to(self.device) for k, v in self.val_data.get_batch(ids).items()}
                   for ids in (mine[i : i + mbs] for i in range(0, len(mine), mbs))]
        if self.pipeline is not None:
            total = self.pipeline.evaluate(batches)
        else:
            total = torch.zeros(2, device=self.device)
            with loss_context(self.mesh):
                for batch in batches:
                    loss, count = self._loss(batch)
                    total += torch.stack([loss * count, count.float()])
        self.model.train()
        total = _all_reduce(total)  # each tp group counted tp times, in numerator and denominator
        return (total[0] / total[1].clamp(min=1)).item()

    # ------------------------------------------------------------------------------------------

    def train(self) -> int:
        cfg = self.cfg
        self.restore()  # first: a refused resume leaves the directory as it found it
        if self.world.is_main:
            self.files.requeue.unlink(missing_ok=True)
            set_aside(self.run_dir)  # a previous hang's records, before this attempt's watchdog
            write_atomic(self.files.config, to_toml(cfg))
            # The run's own copy of its tokenizer: exports and evaluation read it from here.
            copy_file(self.train_data.path / "tokenizer.model", self.files.tokenizer)
        if self.step >= cfg.train.steps:
            self.log(f"already at step {self.step} of {cfg.train.steps}: nothing to do")
            return 0
        start_step, window = self.step, _Window()
        profiler = self._profiler()
        self.watchdog.start(self.step)
        while self.step < cfg.train.steps:
            self.faults.at_step_boundary(self)
            self.watchdog.mark(self.step, "boundary")
            stop_code = self._agree_to_stop()
            if stop_code:
                if self.last_saved != self.step:
                    self.save()
                self.checkpointer.close()
                self._close_loader()
                if self.world.is_main:
                    marker = {"step": self.step, "reason": StopFlag.reason(stop_code)}
                    write_atomic(self.files.requeue, json.dumps(marker) + "\n")
                self.log(f"stopping at step {self.step} for requeue (exit {REQUEUE_EXIT_CODE})")
                return REQUEUE_EXIT_CODE
            t0 = time.perf_counter()
            lr = lr_at(self.step, cfg.train)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            micro, data_wait = self._micro_batches()
            self.watchdog.mark(self.step, "batch")
            self.faults.in_step(self.world)
            loss, grad_norm = self.train_step(micro)
            self.watchdog.mark(self.step, "backward")
            staged = 0.0
            if math.isfinite(loss) and math.isfinite(grad_norm):
                staged = self.checkpointer.before_update()
                self.staging_wait_s += staged
                self.goodput.stalled(staged)
                self.optimizer.step()
                if self.float8 is not None:
                    self.float8.after_optimizer_step(self.model)
                self.bad_steps = 0
                if not self.state_bytes:
                    self.state_bytes = self._state_bytes()
            else:
                self.bad_steps += 1
                self.log(f"step {self.step}: non-finite loss {loss} / grad norm {grad_norm}; "
                         f"update skipped ({self.bad_steps} in a row)")
                if self.bad_steps >= cfg.train.max_bad_steps:
                    last = f"step-{self.last_saved}" if self.last_saved >= 0 else "none"
                    raise TooManyBadSteps(
                        f"{self.bad_steps} non-finite steps in a row (train.max_bad_steps = "
                        f"{cfg.train.max_bad_steps}); last good checkpoint: {last}")
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.step += 1
            self.tokens_seen += self.global_batch * cfg.train.seq_len
            step_time = time.perf_counter() - t0
            self.wall_s += step_time
            self.goodput.step(step_time - staged)
            self.watchdog.step_done(self.step, step_time)
            window.add(step_time, data_wait, self.sync_wait_s)
            if profiler is not None:
                profiler.step()
            self.checkpointer.poll()
            if self.step % cfg.metrics.log_interval == 0 or self.step == cfg.train.steps:
                self._log_step(loss, grad_norm, lr, window, self.step - start_step)
                window = _Window()
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                with self.watchdog.long_phase(self.step, "evaluation"):
                    self._log_eval()
            if self.benchmarks and self.benchmarks.due(self.step,
                                                       final=self.step == cfg.train.steps):
                with self.watchdog.long_phase(self.step, "benchmarks"):
                    self._log_benchmarks()
            if self.schedule.due(self.step, last_saved=self.last_saved,
                                 steps_this_run=self.step - start_step,
                                 final=self.step == cfg.train.steps):
                self.save()
        self.watchdog.close()
        self._close_loader()
        if cfg.train.eval_interval == 0 or self.step % cfg.train.eval_interval:
            self._log_eval()
        self.checkpointer.close()
        if profiler is not None:
            profiler.stop()
        self.report()
        return 0

    def _state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds."""
        params = list(self.model.parameters())
        optim = [t for state in self.optimizer.state.values() for t in state.values()
                 if isinstance(t, torch.Tensor) and t.dim() > 0]
        return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
                "optimizer": local_bytes(optim)}

    def _log_step(self, loss: float, grad_norm: float, lr: float, window: _Window,
                  steps_this_run: int) -> None:
        cfg = self.cfg
        tokens_per_s = window.steps * self.global_batch * cfg.train.seq_len / window.time / \
            self.world.world_size
        kwh = self._energy_so_far()
        stragglers = self.stragglers.interval(
            self.step, (window.time - window.sync_wait) / window.steps,
            window.data_wait / window.steps)
        rec = {
            "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_seen": self.tokens_seen, "tokens_per_s": tokens_per_s,
            "mfu": model_flops_utilisation(tokens_per_s, cfg.model, cfg.train.seq_len,
                                           self.device_name, "bf16"),
            "mem_gb": memory_gb(self.device), "step_time_s": window.time / window.steps,
            "data_wait_s": window.data_wait / window.steps, "bad_steps": self.bad_steps,
            "energy_kwh": kwh, "tokens_per_source": self._tokens_per_source(),
            **stragglers, "time": time.time(),
        }
        self.metrics.log(rec, steps_done_this_run=steps_this_run, step=self.step)

    def _tokens_per_source(self) -> dict[str, int]:
        """Training tokens each source has given so far (all ranks, this run and earlier ones)."""
        seq_len = self.cfg.train.seq_len
        return {name: n * seq_len
                for name, n in self.data.samples_per_source(self.sampler.consumed).items()}

    def _log_eval(self) -> None:
        val = self.evaluate()
        if val is not None:
            self.log(f"step {self.step}: validation loss {val:.4f}")
            self.metrics.write({"step": self.step, "tokens_seen": self.tokens_seen,
                                "val_loss": val})

    def _log_benchmarks(self) -> None:
        scores = self.benchmarks.run(self.model, self.step)
        if scores is not None:
            self.log(f"step {self.step}: benchmarks " +
                     ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
            self.metrics.write({"step": self.step, "tokens_seen": self.tokens_seen,
                                **{f"eval/{k}": v for k, v in scores.items()}})

    def _energy_so_far(self) -> float | None:
        """kWh measured by NVML on every device over the whole run (earlier attempts included),
        or None when any device cannot measure. Every rank must call it: it is a collective."""
        measured = self.energy.kwh()
        pair = torch.tensor([measured or 0.0, measured is None], dtype=torch.float64,
                            device=self.device)
        total, missing = _all_reduce(pair).tolist()
        return None if missing else self.energy_kwh + total

    def _profiler(self):
        n = self.cfg.metrics.profile_steps
        if not n:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule

        out = self.files.profile
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if self.device.type == "cuda" else [])

        def export(prof) -> None:
            path = out / f"trace-rank{self.world.rank}.json"
            make_dir(out)
            write_with(path, lambda tmp: prof.export_chrome_trace(str(tmp)))
            self.log(f"profiler trace: {path} (open in https://ui.perfetto.dev or TensorBoard)")

        prof = profile(activities=activities, on_trace_ready=export,
                       schedule=schedule(wait=1, warmup=1, active=n, repeat=1))
        prof.start()
        return prof

    def report(self) -> dict[str, Any]:
        """report.json and report.md: what the run did and what it cost."""
        cfg, world = self.cfg, self.world
        # Throughput from the time in steps; cost (device-hours, energy, carbon) from the whole
        # wall time of every attempt, lost work included, at each attempt's world size.
        tokens_per_s = self.tokens_seen / max(self.wall_s, 1e-9)
        goodput = self.goodput.report()
        acct = account(cfg.carbon, num_devices=world.world_size,
                       wall_s=goodput["device_s"] / world.world_size,
                       device_name=self.device_name, measured_kwh=self._energy_so_far())
        per_device = tokens_per_s / world.world_size
        report = {
            "run": cfg.run.name, "world_size": world.world_size, "num_nodes": world.num_nodes,
            "device": self.device_name, "kernels": self.backend,
            "kernel_choice": self.kernel_choice.as_dict(), "params": self.num_params,
            "steps": self.step, "tokens": self.tokens_seen, "step_time_total_s": self.wall_s,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
            "mfu": model_flops_utilisation(per_device, cfg.model, cfg.train.seq_len,
                                           self.device_name, "bf16"),
            "checkpoint_staging_wait_s": self.staging_wait_s,
            "state_bytes_per_rank": self.state_bytes, "sources": self._source_report(), **acct,
            "wall_s": goodput["wall_s"], "device_hours": goodput["device_hours"],
            "goodput": goodput, "checkpoint": self.schedule.report(),
            "stragglers": self.stragglers.report(), "failures": read_failures(self.run_dir),
        }
        if world.is_main:
            records = read_metrics(self.files.metrics)
            for key in ("loss", "val_loss"):
                values = [r[key] for r in records if key in r]
                if values:
                    report[f"final_{key}"] = values[-1]
            write_atomic(self.files.report_json, json.dumps(report, indent=2) + "\n")
            table = self.benchmarks.report(records) if self.benchmarks else ""
            write_atomic(
                self.files.report_md, _report_markdown(report, acct)
                + (f"\n## Benchmarks (§2.3, Table 3)\n\n{table}" if table else ""))
            self.log(f"goodput {100 * (goodput['goodput'] or 0):.1f}% over "
                     f"{goodput['attempts']} attempt(s): {goodput['productive_s']:.1f} s of steps "
                     f"in {goodput['wall_s']:.1f} s wall, {goodput['lost_steps']} step(s) lost")
            plot = plot_loss(self.run_dir)
            self.log(f"done: {self.step} steps, {self.tokens_seen:,} tokens in "
                     f"{self.wall_s:.1f} s; {format_accounting(acct)}; report "
                     f"{self.files.report_md}; loss curve {plot}")
        return report

    def _source_report(self) -> list[dict[str, Any]]:
        """Each source's weight, the share of training samples it gave, its epochs, and the
        cleaning (clean_report digest and options) its prepared data came from."""
        samples = self.data.samples_per_source(self.sampler.consumed)
        total_weight = sum(s.weight for s in self.data.sources)
        total, sizes = max(1, sum(samples.values())), self.data.source_sizes()
        return [{"name": s.name, "source": s.source, "weight": s.weight,
                 "weight_share": s.weight / total_weight, "share": samples[s.name] / total,
                 "tokens": samples[s.name] * self.cfg.train.seq_len,
                 "epochs": samples[s.name] / sizes[s.name],
                 "cleaning": read_meta(p).get("cleaning", [])}
                for s, p in zip(self.data.sources, self.data.paths, strict=True)]


class _Window:
    """Timing of the steps since the last log line."""

    def __init__(self) -> None:
        self.steps, self.time, self.data_wait, self.sync_wait = 0, 0.0, 0.0, 0.0

    def add(self, step_time: float, data_wait: float, sync_wait: float) -> None:
        self.steps += 1
        self.time += step_time
        self.data_wait += data_wait
        self.sync_wait += sync_wait


def _benchmarks(cfg: Config, tokenizer, log):
    """The run's [eval] benchmarks (llamatrain.evaluate), or None when eval.tasks is empty."""
    if not cfg.eval.tasks:
        return None
    try:
        from llamatrain.evaluate import TrainingBenchmarks
    except ImportError:
        raise ValueError(f"eval.tasks = {cfg.eval.tasks!r}: lm-evaluation-harness is not "
                         "installed (pip install 'llamatrain[eval]')") from None
    return TrainingBenchmarks(cfg.eval, tokenizer, log=log)


_SECTIONS = ("goodput", "checkpoint", "stragglers", "failures")


def _report_markdown(report: dict[str, Any], acct: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        return "n/a" if v is None else str(v)

    rows = "\n".join(f"| {k} | {fmt(v)} |" for k, v in report.items() if k not in _SECTIONS)
    return (f"# Run report: {report['run']}\n\n| what | value |\n| --- | --- |\n{rows}\n\n"
            f"{format_accounting(acct)}\n\n"
            f"## Goodput (every attempt)\n\n"
            f"{goodput_markdown(report['goodput'], report['failures'])}\n"
            f"## Checkpoint interval\n\n{interval_markdown(report['checkpoint'])}\n"
            f"## Stragglers\n\n{straggler_markdown(report['stragglers'])}")


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag()
    stop.install()
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(usage("python -m llamatrain.train") + "\n\n" + __doc__.split("\n\n", 1)[1])
        return 0
    path, overrides = split_cli(argv)
    if path is None:
        raise ValueError("--config: required (e.g. --config configs/tiny.toml)")
    cfg = load_config(path, overrides)
    world = init_distributed(cfg.train.collective_timeout_s)
    trainer = None
    try:
        trainer = Trainer(cfg, world, stop)
        code = trainer.train()
        if dist.is_initialized():
            dist.barrier()  # leave together: a rank tearing down alone can abort its peers
        record_exit(code, "saved" if code == REQUEUE_EXIT_CODE else "done")
        return code
    except TooManyBadSteps as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        record_exit(BAD_STEPS_EXIT_CODE, "bad-steps")
        return BAD_STEPS_EXIT_CODE
    except BaseException as e:
        if trainer is not None and trainer.watchdog.fired:
            trainer.watchdog.wait_for_exit()  # it ends the process with its own exit code
        code, message = exit_code_for(e, cfg.run.dir)
        if code is None:
            if isinstance(e, ValueError):  # run_cli prints it and exits 2
                record_exit(2, "configuration")
            else:
                record_exit(1, f"crash-{type(e).__name__}")
            raise
        print(message, file=sys.stderr, flush=True)
        record_exit(code, {REQUEUE_EXIT_CODE: "peer-lost", INTERRUPTED_EXIT_CODE: "interrupted",
                           DISK_FULL_EXIT_CODE: "disk-full"}[code])
        return code
    finally:
        if trainer is not None:
            trainer.release()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def exit_code_for(error: BaseException, run_dir: str) -> tuple[int | None, str]:
    """(exit code, one line) for an interrupt, a full disk or a lost peer, wherever it was raised
    (DCP wraps what its threads and ranks raise); (None, "") for anything else."""
    causes = list(_causes(error))
    if any(isinstance(c, KeyboardInterrupt) for c in causes):
        return INTERRUPTED_EXIT_CODE, "interrupted (SIGINT): stopped without saving"
    if peer_lost(error):
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return REQUEUE_EXIT_CODE, (
            f"error: a collective failed because another rank was lost ({type(error).__name__}: "
            f"{first}); exiting {REQUEUE_EXIT_CODE} to be requeued from the last checkpoint")
    full = [c for c in causes if isinstance(c, OSError) and c.errno == errno.ENOSPC]
    if full:
        where = full[0].filename or run_dir
        return DISK_FULL_EXIT_CODE, (
            f"error: disk full: no space left on the device writing {where}; free space there "
            "and start the run again (it resumes from its last checkpoint)")
    return None, ""


def _causes(error: BaseException):
    """An exception, what caused it, and what DCP collected from each rank, depth first."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


if __name__ == "__main__":
    run_cli(main)
