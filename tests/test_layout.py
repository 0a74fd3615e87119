"""No module of this repository shadows an installed package.

`python -m ...` from the repository root puts the root first on sys.path, and `python
benchmarks/X.py` puts benchmarks/ first: a top-level name there that an installed distribution
also provides (transformers 5.25 imports Hugging Face's `kernels`) would be imported instead.
"""

import importlib.metadata
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _importable_names(folder: Path) -> set[str]:
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names


def test_no_module_at_the_root_or_in_benchmarks_shadows_an_installed_package():
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    assert {"torch", "json"} <= installed  # distributions and the standard library are both seen
    for folder in (REPO, REPO / "benchmarks", REPO / "tests"):
        clashes = _importable_names(folder) & installed
        assert not clashes, f"{folder.relative_to(REPO.parent)}: {sorted(clashes)} shadow packages"
