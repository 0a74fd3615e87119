"""SFT packing (§3.1): prompt <sep> answer examples packed back to back, loss on answers only."""

import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llamatrain.config import DataConfig
from llamatrain.data.__main__ import prepare_dir
from llamatrain.data.datasets import load_dataset
from llamatrain.data.prepare import PrepareOptions
from llamatrain.data.tokenizer import TRAINER_SETTINGS
from llamatrain.loss import IGNORE_INDEX
from llamatrain.ops import cross_entropy

WORDS = ["what", "is", "the", "value", "of", "answer", "sum", "total", "print", "list", "sort"]
SFT = DataConfig(format="sft")


def examples(n: int, seed: int = 0, prompt_words: tuple[int, int] = (3, 10)) -> list[dict]:
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {
            "prompt": sentence(*prompt_words) + "?",
            "response": f"{sentence(2, 8)} {rng.randint(0, 999)}.",
        }
        for _ in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def opts(**kw) -> PrepareOptions:
    return PrepareOptions(format="sft", workers=1, progress=False, val_fraction=0.0, **kw)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rows = examples(300)
    prepare_dir(
        [str(write_jsonl(root / "train.jsonl", rows))], root / "out", opts(), vocab_size=300
    )
    return root / "out", rows


def answer_runs(labels: torch.Tensor) -> list[list[int]]:
    """Maximal runs of unmasked labels in a row: one per (possibly cut) answer."""
    runs, cur = [], []
    for t in labels.tolist() + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


def test_labels_cover_exactly_the_answers_and_their_eos(sft_dir):
    out, rows = sft_dir
    ds = load_dataset(out, SFT, seq_len=96, split="train")
    tok = ds.tokenizer
    batch = ds.get_batch(list(range(len(ds))))
    assert batch["input_ids"].shape == (len(ds), 96)
    runs = [r for row in batch["labels"] for r in answer_runs(row)]
    assert ds.num_truncated == ds.num_dropped == 0
    assert [tok.decode(r[:-1]) for r in runs] == [r["response"] for r in rows]
    assert all(r[-1] == tok.eos_id for r in runs)
    # The input right before each answer's first label is the separator.
    inputs, labels = batch["input_ids"], batch["labels"]
    first = (labels != IGNORE_INDEX) & (torch.nn.functional.pad(labels, (1, 0))[:, :-1] == -100)
    assert (inputs[first] == tok.sep_id).all() and int(first.sum()) == len(rows)
    # Prompts are in the inputs but never in the labels.
    joined = " ".join(tok.decode(row) for row in inputs.tolist())
    assert rows[0]["prompt"] in joined and rows[-1]["prompt"] in joined


def test_examples_are_packed_back_to_back_and_padding_is_masked(sft_dir):
    out, rows = sft_dir
    seq_len = 96
    ds = load_dataset(out, SFT, seq_len=seq_len, split="train")
    tok = ds.tokenizer
    batch = ds.get_batch(list(range(len(ds))))
    per_sample = [len(answer_runs(row)) for row in batch["labels"]]
    assert sum(per_sample) == len(rows) and max(per_sample) >= 2
    lengths = [len(tok.encode(r["prompt"])) + len(tok.encode(r["response"])) + 3 for r in rows]
    # Greedy packing in order: a sample takes the next example unless it would overflow.
    bins, cur = [], 0
    for length in lengths:
        if cur + length > seq_len + 1:
            bins, cur = [*bins, cur], 0
        cur += length
    assert [length for _, length in ds.samples] == [*bins, cur]
    assert len(ds) < len(rows)
    for (_, length), row_in, row_lab in zip(
        ds.samples, batch["input_ids"], batch["labels"], strict=True
    ):
        assert (row_in[length:] == tok.eos_id).all()
        assert (row_lab[length - 1 :] == IGNORE_INDEX).all()
        assert row_in[0] == tok.bos_id


def test_long_examples_are_cut_and_prompt_only_samples_dropped(tmp_path, sft_dir):
    out, _ = sft_dir
    rows = examples(40, seed=2, prompt_words=(1, 30))
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    prepare_dir([str(path)], tmp_path / "o", opts(), tokenizer=str(out / "tokenizer.model"))
    ds = load_dataset(tmp_path / "o", SFT, seq_len=24)
    assert ds.num_dropped > 0 and ds.num_truncated > 0
    batch = ds.get_batch(list(range(len(ds))))
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) > 0).all()


def test_masked_tokens_contribute_nothing_to_the_gradient(sft_dir):
    out, _ = sft_dir
    ds = load_dataset(out, SFT, seq_len=96)
    batch = ds.get_batch([0, 1, 2])
    inputs, labels = batch["input_ids"], batch["labels"]
    masked = labels == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    vocab = ds.tokenizer.vocab_size

    def grads(input_ids: torch.Tensor) -> list[torch.Tensor]:
        # Position-wise model: position j's logits depend on input j only.
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
        logits = model(input_ids)
        logits.retain_grad()
        cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).backward()
        assert (logits.grad[masked] == 0).all()
        assert (logits.grad[~masked].abs().sum(dim=-1) > 0).all()
        return [p.grad.clone() for p in model.parameters()]

    reference = grads(inputs)
    # Rewrite every prompt and padding position with other tokens: the gradient does not move.
    scrambled = inputs.clone()
    scrambled[masked] = torch.randint(4, vocab, (int(masked.sum()),), generator=torch.Generator())
    assert not torch.equal(scrambled, inputs)
    for a, b in zip(reference, grads(scrambled), strict=True):
        assert torch.equal(a, b)


def test_a_tokenizer_without_sep_uses_eos_as_the_separator(tmp_path):
    rows = examples(200, seed=3)
    lines = [t for r in rows for t in (r["prompt"], r["response"])]
    model = io.BytesIO()
    settings = {k: v for k, v in TRAINER_SETTINGS.items() if k != "control_symbols"}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=300, minloglevel=2, **settings
    )
    (tmp_path / "plain.model").write_bytes(model.getvalue())
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    meta = prepare_dir([str(path)], tmp_path / "o", opts(), tokenizer=str(tmp_path / "plain.model"))
    assert meta["sep_id"] == meta["eos_id"] == 2
    ds = load_dataset(tmp_path / "o", SFT, seq_len=128)
    runs = [r for row in ds.get_batch(list(range(len(ds))))["labels"] for r in answer_runs(row)]
    assert [ds.tokenizer.decode(r[:-1]) for r in runs] == [r["response"] for r in rows]


def test_sft_inputs_that_are_not_prompt_response_jsonl_are_skipped(tmp_path, sft_dir):
    out, _ = sft_dir
    good = write_jsonl(tmp_path / "c.jsonl", examples(3, seed=4))
    (tmp_path / "a.txt").write_text("plain text")
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p"}])
    meta = prepare_dir(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(good)],
        tmp_path / "o",
        opts(),
        tokenizer=str(out / "tokenizer.model"),
    )
    reasons = [s["reason"] for s in meta["skipped"]]
    assert reasons[0].startswith("sft needs .jsonl")
    assert reasons[1] == "line 1: expected a JSON object with string field(s) 'prompt', 'response'"
    assert meta["num_documents"] == 3
