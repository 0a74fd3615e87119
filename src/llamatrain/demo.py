"""`make demo`: train configs/tiny.toml on 2 CPU processes (torchrun, FSDP2 over gloo) on the Python
standard library's own source, then show the report and where the loss curve is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from llamatrain.checkpoint.rundir import RunDir

RUN_DIR = Path("runs/demo")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--resume" not in args:
        shutil.rmtree(RUN_DIR, ignore_errors=True)
    overrides = [a for a in args if a != "--resume"]
    print("llamatrain demo: a 5M-parameter Llama 2 (GQA, SwiGLU, RMSNorm, rotary) trained on the "
          "Python standard library by 2 processes with FSDP2 over gloo.\nFirst the corpus is "
          "tokenised with a freshly trained SentencePiece BPE (cached in .cache/data for next "
          "time); then about 200 steps; watch the loss fall.\n", flush=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "llamatrain.train", "--config", "configs/tiny.toml",
               f"--run.dir={RUN_DIR}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    code = subprocess.call(command, env=env)
    if code != 0:
        print(f"demo: training exited with {code}", file=sys.stderr)
        return code
    run = RunDir(RUN_DIR)
    print("\n" + run.report_md.read_text())
    print(f"loss curve (the paper's Figure 5, for this run): {run.loss_plot}")
    print(f"metrics: {run.metrics}; checkpoints: {run.checkpoints}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
