"""What a GPU check runs with, found before anything is measured: the GPU and its driver, the
versions of python, torch, triton and numpy, the C compiler and Python headers Triton builds its
launcher with, which optional packages import, and therefore what the check will skip.

`python benchmarks/preflight.py` prints the one line `make gpu-check` starts with.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

# Import name -> distribution name of the packages a GPU run uses where they are present.
OPTIONAL = {
    "zstandard": "zstandard", "liger_kernel": "liger-kernel", "flash_attn": "flash-attn",
    "lm_eval": "lm-eval", "wandb": "wandb", "torchao": "torchao", "datatrove": "datatrove",
    "pynvml": "nvidia-ml-py", "apex": "apex", "xdist": "pytest-xdist",
    "pytest_timeout": "pytest-timeout", "transformers": "transformers",
    "sentencepiece": "sentencepiece", "pyarrow": "pyarrow", "matplotlib": "matplotlib",
}  # fmt: skip
# What the check leaves out without each of them (packages whose absence changes nothing the
# check does are not listed).
SKIPPED_WITHOUT = {
    "liger_kernel": "the Liger-Kernel rows of the kernel table",
    "flash_attn": "the flash-attn rows of the kernel table",
    "xdist": "parallel correctness tests (they run in one process)",
    "pytest_timeout": "per-test timeouts (a hung correctness test stops at the section's budget)",
    "matplotlib": "the plots",
}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def optional_packages() -> dict[str, Any]:
    """Import name -> its version when it imports, else "missing" or the import error."""
    out: dict[str, Any] = {}
    for module, distribution in OPTIONAL.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # broken installs fail with anything, not only ImportError
            out[module] = "missing" if isinstance(e, ModuleNotFoundError) else (
                f"fails: {type(e).__name__}: {e}".splitlines()[0][:120])
            continue
        out[module] = _version(distribution) or "present"
    return out


def imports(status: str) -> bool:
    """Whether an optional_packages() entry says the package imported."""
    return status != "missing" and not status.startswith("fails")


def compiler() -> dict[str, Any]:
    """The C compiler Triton would use ($CC, else cc, gcc, clang) and whether Python.h is there:
    Triton compiles a small launcher module with them the first time it runs a kernel."""
    cc = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    version = None
    if cc and shutil.which(cc):
        try:
            done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10)
            version = done.stdout.splitlines()[0] if done.stdout else None
        except (OSError, subprocess.TimeoutExpired):
            version = None
    include = Path(sysconfig.get_paths()["include"])
    return {"cc": shutil.which(cc) if cc else None, "cc_version": version,
            "python_h": (include / "Python.h").is_file(), "include": str(include)}


def driver_version() -> str | None:
    """The NVIDIA driver's version, from NVML (nvidia-ml-py) or else nvidia-smi; None when
    neither answers (the check does not need nvidia-smi)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def gpu() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"name": None, "count": 0}
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "driver": driver_version(),
            "cuda": torch.version.cuda}


def skipped(info: dict[str, Any]) -> list[str]:
    """What the check will leave out or do differently here, one phrase each."""
    out = []
    if not info["gpu"]["name"]:
        out.append("the GPU: this is a rehearsal (tiny shapes, Triton's interpreter, fp32)")
    elif not (info["compiler"]["cc"] and info["compiler"]["python_h"]):
        missing = "a C compiler" if not info["compiler"]["cc"] else "Python.h"
        out.append(f"every Triton kernel: Triton needs {missing} to build its launcher")
    if info["versions"]["triton"] is None:
        out.append("every Triton kernel: triton is not installed")
    for module, what in SKIPPED_WITHOUT.items():
        if not imports(info["optional"][module]):
            out.append(f"{what} ({OPTIONAL[module]}: {info['optional'][module]})")
    return out


def collect() -> dict[str, Any]:
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "triton": _version("triton"), "numpy": numpy.__version__}
    info = {"gpu": gpu(), "versions": versions, "compiler": compiler(),
            "optional": optional_packages(), "executable": sys.executable,
            "cpu_count": os.cpu_count()}
    info["skipped"] = skipped(info)
    info["line"] = line(info)
    return info


def line(info: dict[str, Any]) -> str:
    """The one line the check prints first."""
    g, v, c = info["gpu"], info["versions"], info["compiler"]
    where = (f"{g['name']} x{g['count']} ({g['memory_gib']} GiB, sm_"
             f"{g['compute_capability'].replace('.', '')}, driver {g['driver'] or 'unknown'}, "
             f"CUDA {g['cuda']})" if g["name"] else "no GPU (rehearsal)")
    cc = (c["cc_version"] or c["cc"]) if c["cc"] else "no C compiler"
    present = [m for m, ver in info["optional"].items() if imports(ver)]
    absent = [m for m in info["optional"] if m not in present]
    return (f"preflight: {where}; python {v['python']}, torch {v['torch']}, triton "
            f"{v['triton']}, numpy {v['numpy']}; {cc}, Python.h "
            f"{'yes' if c['python_h'] else 'NO'}; imports: {', '.join(present) or 'none'}; "
            f"missing: {', '.join(absent) or 'none'}"
            + (f"; skipping: {'; '.join(info['skipped'])}" if info["skipped"] else ""))


def section(ctx: Any) -> dict[str, Any]:
    return collect()


if __name__ == "__main__":
    print(collect()["line"])
