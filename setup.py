"""Installs llamatrain (with llamatrain.kernels) from src/."""

from setuptools import setup

CLEAN = ["datatrove>=0.10.1,<0.11", "nltk>=3.9", "regex", "tldextract>=5.3", "xxhash>=3,<4"]

setup(
    name="llamatrain",
    version="0.1.0",
    description="Pretraining and SFT of Llama 2-family models on SLURM GPU clusters",
    python_requires=">=3.11",
    packages=["llamatrain", "llamatrain.checkpoint", "llamatrain.data", "llamatrain.distributed",
              "llamatrain.kernels"],
    package_dir={"": "src"},
    install_requires=[
        "torch>=2.11",  # the oldest torch make test checks (.venv-gpuimage)
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "zstandard>=0.22",
        "pyarrow>=14",
        "matplotlib>=3.7",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "transformers>=4.40", "safetensors>=0.4",
                "tokenizers>=0.15", "lm-eval>=0.4.13,<0.5", "accelerate>=0.26", *CLEAN,
                "torchao>=0.18"],
        # `python -m llamatrain.data clean` (§2.1): datatrove's core and, of its "processing"
        # extra, only what its quality filters, MinHash and the site filter import (not its
        # fastText, spaCy, trafilatura, ...); datatrove hashes str, which xxhash 4 refuses.
        "clean": CLEAN,
        # train.float8 (tensorwise or rowwise): torchao's float8 training, a 3.4 MB wheel with
        # no dependencies; 0.18.0 is what the tests run (CPU emulation).
        "float8": ["torchao>=0.18"],
        # Hugging Face export (tokenizer.json) and §2.3 benchmarks through lm-evaluation-harness.
        "eval": ["safetensors>=0.4", "tokenizers>=0.15", "lm-eval>=0.4.13,<0.5",
                 "accelerate>=0.26"],
        "wandb": ["wandb>=0.16"],
        "tensorboard": ["tensorboard>=2.15"],
        # flash-attn builds against the local CUDA toolkit; NVIDIA apex is not on PyPI and is
        # imported optionally where it helps (train.optimizer = "apex_fused_adam").
        "gpu": ["flash-attn>=2.5", "nvidia-ml-py>=12"],
    },
)
