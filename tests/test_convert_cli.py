"""The checkpoint conversion CLI: a training checkpoint to Hugging Face and back into a new run."""

from __future__ import annotations

import subprocess
import sys

import torch
import transformers
from conftest import REPO, run_train, tiny_args

from llamatrain.convert import checkpoint_to_state_dict
from llamatrain.data.tokenizer import load_tokenizer
from llamatrain.model import Transformer


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamatrain.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_to_hf_then_from_hf_round_trips_a_training_checkpoint(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_args(prepared_data, run_dir, **{"train.steps": 3}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    step = run_dir / "checkpoints/step-3"

    hf_dir = tmp_path / "hf"
    proc = convert("to-hf", step, hf_dir, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    ours, cfg = checkpoint_to_state_dict(step)
    model = Transformer(cfg)
    model.load_state_dict(ours)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (model(tokens) - hf_model(tokens).logits).abs().max().item() < 1e-4

    # The run kept its tokenizer, and the export carries it: AutoTokenizer encodes as SentencePiece.
    assert (run_dir / "tokenizer.model").read_bytes() == \
        (prepared_data / "tokenizer.model").read_bytes()
    sp = load_tokenizer(run_dir / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "def f(x):\n    return  42 # é"
    assert hf_tok.encode(text) == [1, *sp.encode(text)]
    (run_dir / "tokenizer.model").unlink()
    proc = convert("to-hf", step, tmp_path / "hf2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: '{run_dir / 'tokenizer.model'}': no tokenizer.model (runs from before the trainer "
        "kept one: pass --tokenizer DATA_DIR/tokenizer.model)"]
    proc = convert("to-hf", step, tmp_path / "hf2", "--tokenizer",
                   prepared_data / "tokenizer.model")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf2/tokenizer.json").is_file()

    init_dir = tmp_path / "init"
    proc = convert("from-hf", hf_dir, init_dir)
    assert proc.returncode == 0, proc.stderr
    assert "dim = 64" in (init_dir / "model.toml").read_text()
    run2 = tmp_path / "run2"
    proc = run_train(tiny_args(prepared_data, run2, **{"train.steps": 3,
                                                       "checkpoint.init_from": init_dir}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"initialised weights from {init_dir}" in proc.stdout


def test_bad_arguments_are_one_line_and_usage():
    proc = convert("to-hf", "/nonexistent/checkpoints/step-1", "/tmp/out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: '/nonexistent/checkpoints/step-1': expected RUN_DIR/checkpoints/step-N of a run "
        "(with RUN_DIR/config.toml)"]
    proc = convert("sideways", "a", "b")
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")
