"""prepare (corpus -> shards, meta.json), the prepare_source cache, and the pretraining dataset."""

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import zstandard

from llamatrain.config import DataConfig
from llamatrain.data import cache, datasets, prepare, readers
from llamatrain.data.__main__ import main, prepare_dir
from llamatrain.data.cache import prepare_source
from llamatrain.data.datasets import load_dataset
from llamatrain.data.prepare import PrepareOptions, is_val
from llamatrain.data.tokenizer import Tokenizer
from llamatrain.loss import IGNORE_INDEX

WORDS = ["def", "return", "class", "import", "self", "value", "index", "total", "print"]
HARD = ["\ttab\r\nCRLF\r\n", "   runs   of spaces ", " lead", "中文 😀 ﬁ ＡＢ", "\n\nx\n"]


def make_doc(rng: random.Random, lines: int) -> str:
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))
        out.append(" " * rng.choice([0, 4]) + f"{words} = {rng.randint(0, 9999)}")
    return "\n".join(out) + "\n"


def make_corpus(root: Path, seed: int = 0) -> list[str]:
    """Text, .jsonl, gzip and zstd inputs plus one non-UTF-8 and one empty file; returns the
    non-empty documents in the order prepare must store them (sorted paths)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    expected = []
    # Sorted order: a.txt, bad.txt, empty.txt, notes.txt.gz, sub/b.md, web.jsonl, web2.jsonl.zst
    a = make_doc(rng, 60) + HARD[0]
    (root / "a.txt").write_text(a, newline="")
    expected.append(a)
    (root / "bad.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8\n" + make_doc(rng, 5).encode())
    (root / "empty.txt").write_bytes(b"")
    notes = HARD[3] + make_doc(rng, 20)
    (root / "notes.txt.gz").write_bytes(gzip.compress(notes.encode()))
    expected.append(notes)
    (root / "sub").mkdir()
    b = HARD[1] + make_doc(rng, 40)
    (root / "sub" / "b.md").write_text(b)
    expected.append(b)
    web = [make_doc(rng, rng.randint(1, 6)) + HARD[k % len(HARD)] for k in range(30)]
    web.insert(7, "")  # an empty document: skipped, the rest of the file kept
    lines = [json.dumps({"text": t, "id": k}) for k, t in enumerate(web)]
    (root / "web.jsonl").write_text("\n".join(lines[:12]) + "\n\n" + "\n".join(lines[12:]) + "\n")
    expected += [t for t in web if t]
    zst = [make_doc(rng, 3) for _ in range(10)]
    payload = "".join(json.dumps({"text": t}) + "\r\n" for t in zst).encode()
    (root / "web2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    expected += zst
    return expected


def read_split(path: Path, split: str) -> np.ndarray:
    meta = json.loads((path / "meta.json").read_text())
    shards = meta["splits"][split]["shards"]
    parts = [np.fromfile(path / s["file"], dtype=meta["dtype"]) for s in shards]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


def documents(path: Path, split: str) -> list[str]:
    """Decoded documents of a split; checks each is stored as BOS + tokens + EOS."""
    meta = json.loads((path / "meta.json").read_text())
    tok = Tokenizer((path / "tokenizer.model").read_bytes())
    stream = read_split(path, split).astype(np.int64)
    starts = np.flatnonzero(stream == meta["bos_id"])
    ends = np.append(starts[1:], len(stream))[: len(starts)]
    docs = []
    for s, e in zip(starts, ends, strict=True):
        assert stream[e - 1] == meta["eos_id"]
        docs.append(tok.decode(stream[s + 1 : e - 1]))
    return docs


def opts(**kw) -> PrepareOptions:
    return PrepareOptions(**{"workers": 1, "progress": False, "val_fraction": 0.0, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One prepared corpus shared by the read-only tests: (corpus dir, out dir, expected docs)."""
    root = tmp_path_factory.mktemp("prep")
    expected = make_corpus(root / "corpus")
    prepare_dir([str(root / "corpus")], root / "out", opts(val_fraction=0.2), vocab_size=400)
    return root / "corpus", root / "out", expected


def test_prepare_round_trips_every_document_and_writes_meta(prepared):
    corpus, out, expected = prepared
    meta = json.loads((out / "meta.json").read_text())
    train, val = documents(out, "train"), documents(out, "val")
    assert sorted(train + val) == sorted(expected)
    # Stored in input order: each split is the expected order filtered to that split.
    assert train == [d for d in expected if d in set(train)]
    assert val == [d for d in expected if d in set(val)]

    shard_bytes = sum(p.stat().st_size for p in out.glob("*.bin"))
    assert meta["dtype"] == "uint16"
    assert meta["num_tokens"] * 2 == shard_bytes
    assert meta["num_tokens"] == sum(meta["splits"][s]["num_tokens"] for s in ("train", "val"))
    assert meta["num_documents"] == len(expected)
    assert meta["splits"]["val"]["num_documents"] == len(val) > 0
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == (400, 1, 2)
    model = (out / "tokenizer.model").read_bytes()
    assert meta["tokenizer_sha256"] == hashlib.sha256(model).hexdigest()
    assert meta["num_empty_documents"] == 2  # empty.txt and one .jsonl line


def test_a_non_utf8_file_and_an_empty_file_are_skipped_and_named(prepared):
    corpus, out, _ = prepared
    meta = json.loads((out / "meta.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == {"bad.txt", "empty.txt"}
    assert reasons["bad.txt"].startswith("not valid UTF-8 (byte 3")
    assert reasons["empty.txt"].startswith("empty")
    assert meta["num_files"] == 7


def test_the_validation_split_follows_each_documents_content_hash(prepared):
    _, out, _ = prepared
    assert all(is_val(d.encode(), 0.2) for d in documents(out, "val"))
    assert not any(is_val(d.encode(), 0.2) for d in documents(out, "train"))


def test_output_is_identical_for_one_and_two_workers(tmp_path, monkeypatch, prepared):
    _, first, _ = prepared
    corpus = tmp_path / "corpus"
    make_corpus(corpus)
    # Tiny tasks: .jsonl files are cut into many pieces and spread over both workers.
    monkeypatch.setattr(readers, "TASK_BYTES", 200)
    model = str(first / "tokenizer.model")
    for n in (1, 2):
        prepare_dir([str(corpus)], tmp_path / f"w{n}", opts(workers=n), tokenizer=model)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_a_bad_jsonl_line_skips_its_whole_file_and_nothing_else(tmp_path, monkeypatch, prepared):
    _, first, _ = prepared
    rng = random.Random(1)
    good = [make_doc(rng, 2) for _ in range(40)]
    lines = [json.dumps({"text": t}) for t in good]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines[:30]) + "\n{broken\n" + lines[30])
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines[30:]) + "\n")
    # Small pieces, so part of a.jsonl is already written when its line 31 turns out bad.
    monkeypatch.setattr(readers, "TASK_BYTES", 300)
    out = tmp_path / "out"
    meta = prepare_dir(
        [str(tmp_path / "in")], out, opts(), tokenizer=str(first / "tokenizer.model")
    )
    assert documents(out, "train") == good[30:]
    assert [Path(s["path"]).name for s in meta["skipped"]] == ["a.jsonl"]
    assert meta["skipped"][0]["reason"].startswith("line 31: invalid JSON")


def test_a_jsonl_line_without_the_text_key_names_the_key(tmp_path, prepared):
    _, first, _ = prepared
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "b.txt").write_text("kept")
    meta = prepare_dir(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")],
        tmp_path / "out",
        opts(text_key="text"),
        tokenizer=str(first / "tokenizer.model"),
    )
    assert (
        meta["skipped"][0]["reason"] == "line 1: expected a JSON object with string field(s) 'text'"
    )
    assert documents(tmp_path / "out", "train") == ["kept"]


def test_shards_roll_over_between_files_and_samples_span_them(tmp_path, prepared):
    corpus, first, _ = prepared
    out = tmp_path / "out"
    meta = prepare_dir(
        [str(corpus)], out, opts(shard_tokens=200), tokenizer=str(first / "tokenizer.model")
    )
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) >= 3
    stream = read_split(out, "train").astype(np.int64)
    seq_len = 64
    ds = load_dataset(out, DataConfig(), seq_len=seq_len, split="train")
    assert len(ds) == (len(stream) - 1) // seq_len
    batch = ds.get_batch(list(range(len(ds))))
    assert batch["input_ids"].shape == batch["labels"].shape == (len(ds), seq_len)
    assert str(batch["input_ids"].dtype) == "torch.int64"
    for i in range(len(ds)):
        window = stream[i * seq_len : i * seq_len + seq_len + 1]
        assert batch["input_ids"][i].tolist() == window[:-1].tolist()
        assert batch["labels"][i].tolist() == window[1:].tolist()
    assert ds.tokenizer.vocab_size == 400


def test_cli_errors_are_one_line_and_a_nonzero_exit(tmp_path, capsys, prepared):
    _, first, _ = prepared
    (tmp_path / "nothing").mkdir()
    out = str(tmp_path / "out")
    assert main(["prepare", "--input", str(tmp_path / "nothing"), "--out", out]) == 2
    assert main(["prepare", "--input", str(tmp_path / "missing"), "--out", out]) == 2
    assert main(["prepare", "--input", str(first), "--out", str(first)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "holds no input files" in err[0]
    assert "does not exist" in err[1]
    assert "--overwrite" in err[2]


def test_cli_overwrite_replaces_a_prepared_directory(tmp_path, capsys, prepared):
    _, first, _ = prepared
    (tmp_path / "in.txt").write_text("return value")
    args = ["prepare", "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out")]
    args += ["--tokenizer", str(first / "tokenizer.model"), "--workers", "1"]
    assert main(args) == 0
    (tmp_path / "in.txt").write_text("print total")
    assert main(args) == 2
    assert documents(tmp_path / "out", "train") == ["return value"]
    assert main([*args, "--overwrite"]) == 0
    assert documents(tmp_path / "out", "train") == ["print total"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]


def test_a_failed_prepare_leaves_no_output_directory(tmp_path, monkeypatch, prepared):
    corpus, first, _ = prepared

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "tokenize_files", crash)
    with pytest.raises(RuntimeError):
        prepare_dir(
            [str(corpus)], tmp_path / "out", opts(), tokenizer=str(first / "tokenizer.model")
        )
    assert list(tmp_path.iterdir()) == []


def source_config(corpus: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(source=str(corpus), cache_dir=str(cache), workers=1, **kw)


def test_prepare_source_builds_once_then_reuses_the_cache(tmp_path, monkeypatch, prepared):
    corpus, first, expected = prepared
    cfg = source_config(corpus, tmp_path / "cache", tokenizer=str(first / "tokenizer.model"))
    path = prepare_source(cfg, vocab_size=512)
    assert path.parent == tmp_path / "cache"
    assert len(documents(path, "train") + documents(path, "val")) == len(expected)

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached source")

    monkeypatch.setattr(cache, "build", must_not_build)
    assert prepare_source(cfg, vocab_size=512) == path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]
    # A prepared directory as the source is used as it is.
    assert prepare_source(source_config(path, tmp_path / "x"), vocab_size=512) == path


def test_prepare_source_race_loser_keeps_the_winners_copy(tmp_path, monkeypatch, prepared):
    corpus, first, _ = prepared
    cfg = source_config(corpus, tmp_path / "cache", tokenizer=str(first / "tokenizer.model"))
    real_build = cache.build
    final = {}

    def build_then_lose(inputs, out_dir, *args, **kwargs):
        meta = real_build(inputs, out_dir, *args, **kwargs)
        # Another rank finishes first and publishes the same directory.
        winner = out_dir.parent / out_dir.name.split(".tmp-")[0].lstrip(".")
        shutil.copytree(out_dir, winner)
        (winner / "winner").write_text("")
        final["path"] = winner
        return meta

    monkeypatch.setattr(cache, "build", build_then_lose)
    path = prepare_source(cfg, vocab_size=512)
    assert path == final["path"] and (path / "winner").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]


def test_prepare_source_rejects_mismatches_with_a_value_error(tmp_path, prepared):
    corpus, first, _ = prepared
    with pytest.raises(ValueError, match="data.source='/nonexistent'"):
        prepare_source(source_config(Path("/nonexistent"), tmp_path), vocab_size=512)
    with pytest.raises(ValueError, match="data.format='sft'"):
        prepare_source(source_config(first, tmp_path, format="sft"), vocab_size=512)
    with pytest.raises(ValueError, match="vocab_size=256"):
        prepare_source(source_config(first, tmp_path), vocab_size=256)
    with pytest.raises(ValueError, match="data.format='sft'"):
        load_dataset(first, DataConfig(format="sft"), seq_len=8)
    with pytest.raises(ValueError, match="seq_len=100000: .* too few for one sample"):
        load_dataset(first, DataConfig(), seq_len=100_000)


def test_the_default_source_is_the_stdlib_python_files():
    files = readers.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 1000
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert root / "json" / "decoder.py" in files


def test_cli_prepares_a_stdlib_slice_with_a_progress_bar(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path / "x"
    cmd = [sys.executable, "-m", "llamatrain.data", "prepare", "--out", str(out)]
    cmd += ["--input", str(stdlib / "json"), str(stdlib / "logging"), "--vocab-size", "1000"]
    cmd += ["--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "docs/s" in proc.stderr and "tok/s" in proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_tokens"] * 2 == sum(p.stat().st_size for p in out.glob("*.bin"))
    py = [p for d in ("json", "logging") for p in (stdlib / d).glob("*.py") if p.stat().st_size]
    assert meta["num_documents"] == len(py)
    # Byte-compiled caches in __pycache__ are not UTF-8 text: named as skipped, not fatal.
    assert all(s["path"].endswith(".pyc") for s in meta["skipped"])


def test_token_ids_are_uint16_while_the_vocabulary_fits_else_uint32():
    assert prepare.token_dtype(32_000) == np.uint16
    assert prepare.token_dtype(65_536) == np.uint16
    assert prepare.token_dtype(65_537) == np.uint32


def test_truncated_compressed_files_are_skipped_not_read_short(tmp_path, prepared):
    _, first, _ = prepared
    rows = "".join(json.dumps({"text": f"return value {k}"}) + "\n" for k in range(2000)).encode()
    gz, zst = gzip.compress(rows), zstandard.ZstdCompressor().compress(rows)
    (tmp_path / "a.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "b.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    (tmp_path / "c.jsonl.zst").write_bytes(zst + zst)  # two frames: both read
    meta = prepare_dir(
        [str(tmp_path)], tmp_path / "out", opts(), tokenizer=str(first / "tokenizer.model")
    )
    reasons = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == {"a.jsonl.gz", "b.jsonl.zst"}
    assert all(r.startswith("cannot read: ") for r in reasons.values())
    assert meta["num_documents"] == 4000


def copy_prepared(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_truncated_shard_is_an_error_naming_it_not_a_smaller_dataset(tmp_path, prepared):
    _, first, _ = prepared
    out = copy_prepared(first, tmp_path / "p")
    shard = out / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train_000000.bin' has \d+ bytes but meta.json records"):
        load_dataset(out, DataConfig(), seq_len=16)
    shard.unlink()
    with pytest.raises(ValueError, match="train_000000.bin' cannot be read"):
        load_dataset(out, DataConfig(), seq_len=16)


def test_a_shard_truncated_in_place_while_open_is_one_line_not_sigbus(tmp_path, prepared):
    """In a process of its own: were the check missing, the read would kill it with SIGBUS."""
    _, first, _ = prepared
    out = copy_prepared(first, tmp_path / "p")
    shard = out / "train_000000.bin"
    script = ("import os, sys\n"
              "from llamatrain.config import DataConfig\n"
              "from llamatrain.data.datasets import load_dataset\n"
              f"ds = load_dataset({str(out)!r}, DataConfig(), seq_len=16)\n"
              "ds.get_batch([0])\n"
              f"os.truncate({str(shard)!r}, 4096)\n"
              "try:\n"
              "    ds.get_batch([len(ds) - 1])\n"
              "except ValueError as e:\n"
              "    sys.exit(f'error: {e}')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    size = len(np.fromfile(first / "train_000000.bin", dtype=np.uint8))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        f"error: dataset: shard '{shard}' now has 4096 bytes, {size} when the run opened it: it "
        "was truncated or replaced while the run read it; a prepared source must not change "
        "under a run: restore it (or prepare the source again into a new directory), then start "
        "the run again (it resumes from its last checkpoint)")


def test_a_token_id_beyond_the_vocabulary_names_the_shard_and_position(tmp_path, prepared):
    _, first, _ = prepared
    out = copy_prepared(first, tmp_path / "p")
    tokens = np.fromfile(out / "train_000000.bin", dtype=np.uint16)
    tokens[1234] = 60_000  # a flipped byte: still a valid uint16, far beyond 400 pieces
    tokens.tofile(out / "train_000000.bin")
    ds = load_dataset(out, DataConfig(), seq_len=16, vocab_size=512)
    assert ds.get_batch([0, 1, 2])["input_ids"].max() < 400  # other samples read fine
    with pytest.raises(ValueError, match=r"token id 60000 >= vocabulary size 400 at token 1234 "
                                         r"of '.*train_000000.bin'"):
        ds.get_batch([5, 1234 // 16])


def test_the_tokenizer_is_checked_against_the_shards_and_the_model(tmp_path, prepared):
    _, first, _ = prepared
    with pytest.raises(ValueError, match="vocab_size=300 is smaller than the tokenizer's 400"):
        load_dataset(first, DataConfig(), seq_len=16, vocab_size=300)
    out = copy_prepared(first, tmp_path / "p")
    (out / "tokenizer.model").write_bytes(
        prepare.train_tokenizer(make_doc(random.Random(5), 300).split("\n"), vocab_size=300)
        .model_proto
    )
    with pytest.raises(ValueError, match=r"tokenizer.model \(300 pieces.* is not the tokenizer"):
        load_dataset(out, DataConfig(), seq_len=16, vocab_size=512)


def test_unreadable_paths_are_skipped_and_named_not_fatal(tmp_path, monkeypatch, prepared):
    _, first, _ = prepared
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text("return value")
    (corpus / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (corpus / "loop.txt").symlink_to(corpus / "loop.txt")
    (corpus / "vanishes.txt").write_text("print total")
    (corpus / "z.txt").write_text("import self")
    real = prepare.get_tokenizer

    def list_then_delete(*args, **kwargs):  # between listing the files and reading them
        (corpus / "vanishes.txt").unlink()
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "get_tokenizer", list_then_delete)
    model = str(first / "tokenizer.model")
    meta = prepare_dir([str(corpus)], tmp_path / "out", opts(), tokenizer=model)

    reasons = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert set(reasons) == {"dangling.txt", "loop.txt", "vanishes.txt"}
    assert "No such file" in reasons["dangling.txt"] and "No such file" in reasons["vanishes.txt"]
    assert "Too many levels of symbolic links" in reasons["loop.txt"]
    assert all(r.startswith("cannot read: ") for r in reasons.values())
    assert documents(tmp_path / "out", "train") == ["return value", "import self"]


def test_a_long_single_line_file_is_read_in_blocks_not_whole(tmp_path):
    import tracemalloc

    path = tmp_path / "one-line.txt"
    line = ("wörd " * 200_000 + "😀") * 24  # 24 MB without a newline
    path.write_text(line)
    tracemalloc.start()
    sizes = [len(item.data) for item in readers.read_items(path, 0)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # A piece is a block plus at most the 3 bytes of a character cut at the previous block.
    assert sum(sizes) == len(line.encode()) and max(sizes) <= readers.TASK_BYTES + 3
    assert peak < 16 * readers.TASK_BYTES  # 4 MB; over 28 MB when read whole


def test_long_documents_are_tokenised_in_pieces_exactly_and_split_as_a_whole(
    tmp_path, monkeypatch, prepared
):
    _, first, _ = prepared
    rng = random.Random(3)
    corpus = tmp_path / "in"
    corpus.mkdir()
    docs = [make_doc(rng, 80) + HARD[k % len(HARD)] for k in range(6)]
    docs.append("x中😀 " * 400)  # one long line: cut inside it at a character boundary
    for k, d in enumerate(docs):
        (corpus / f"{k}.txt").write_text(d, newline="")
    (corpus / "bad.txt").write_bytes(b"ok\n" * 500 + b"caf\xe9\n")  # bad UTF-8 far in
    (corpus / "blank.txt").write_text(" \n" * 500)
    monkeypatch.setattr(readers, "TASK_BYTES", 300)
    tok = Tokenizer((first / "tokenizer.model").read_bytes())
    out = tmp_path / "out"
    meta = prepare_dir(
        [str(corpus)], out, opts(val_fraction=0.5), tokenizer=str(first / "tokenizer.model")
    )

    train, val = documents(out, "train"), documents(out, "val")
    assert sorted(train + val) == sorted(docs) and val
    assert all(is_val(d.encode(), 0.5) for d in val)
    assert not any(is_val(d.encode(), 0.5) for d in train)
    reasons = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert reasons == {"bad.txt": "not valid UTF-8 (byte 1503: invalid continuation byte)",
                       "blank.txt": prepare.EMPTY}
    # Cut after newlines, a document tokenises exactly as it does whole.
    stream = np.concatenate([read_split(out, "train"), read_split(out, "val")]).tolist()
    for d in docs[:6]:
        whole = [tok.bos_id, *tok.encode(d), tok.eos_id]
        assert any(stream[i : i + len(whole)] == whole for i in range(len(stream)))


def test_prepare_source_removes_temp_directories_of_dead_builds_only(tmp_path, prepared):
    import os
    import socket
    import time

    corpus, first, _ = prepared
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    dirs = {
        "killed here": f".x-pretrain-1.tmp-{host}-{dead}-0000aaaa",
        "running here": f".x-pretrain-1.tmp-{host}-{os.getpid()}-0000bbbb",
        "old elsewhere": ".x-pretrain-1.tmp-other-node-7-0000cccc",
        "recent elsewhere": ".x-pretrain-1.tmp-other-node-8-0000dddd",
    }
    for name in dirs.values():
        (cache / name).mkdir()
        (cache / name / "train_000000.bin").write_bytes(b"\0" * 10)
    old = time.time() - prepare.STALE_BUILD_S - 60
    for p in (cache / dirs["old elsewhere"], cache / dirs["old elsewhere"] / "train_000000.bin"):
        os.utime(p, (old, old))

    cfg = source_config(corpus, cache, tokenizer=str(first / "tokenizer.model"))
    path = prepare_source(cfg, vocab_size=512)

    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted([path.name, dirs["running here"], dirs["recent elsewhere"]])


# ---------------------------------------------------------------- mixtures


def mix_config(cache: Path, *entries: tuple[str, float], **kw) -> DataConfig:
    from llamatrain.config import MixSource

    return DataConfig(mix=[MixSource(source=s, weight=w) for s, w in entries],
                      cache_dir=str(cache), workers=1, val_fraction=0.1, **kw)


def test_mixture_sources_share_one_tokenizer_trained_on_all_of_them(tmp_path):
    rng = random.Random(4)
    for name, n in (("web", 30), ("code", 10)):
        (tmp_path / name).mkdir()
        for k in range(n):
            (tmp_path / name / f"{k}.txt").write_text(make_doc(rng, 20) + HARD[k % len(HARD)])
    cfg = mix_config(tmp_path / "cache", (str(tmp_path / "web"), 0.7), (str(tmp_path / "code"), 3))
    paths = cache.prepare_sources(cfg, vocab_size=400)
    metas = [json.loads((p / "meta.json").read_text()) for p in paths]
    assert metas[0]["tokenizer_sha256"] == metas[1]["tokenizer_sha256"]
    assert [m["num_files"] for m in metas] == [30, 10]
    assert len(list((tmp_path / "cache").glob("tokenizer-*.model"))) == 1

    td = datasets.open_training_data(paths, cfg, seq_len=16, vocab_size=400, seed=0)
    assert [s.name for s in td.sources] == ["web", "code"]
    assert td.tokenizer_sha256 == metas[0]["tokenizer_sha256"]
    assert [s["weight"] for s in td.identity["sources"].values()] == [0.7, 3.0]
    assert td.identity["sources"]["1"]["tokenizer_sha256"] == td.tokenizer_sha256
    sizes = td.source_sizes()
    web = load_dataset(paths[0], cfg, seq_len=16)
    code = load_dataset(paths[1], cfg, seq_len=16)
    assert sizes == {"web": len(web), "code": len(code)}
    ids = td.sampler.next_indices(32, 0, 1)
    batch = td.train.get_batch(ids)
    for row, i in enumerate(ids):
        ds, j = (web, i) if i < len(web) else (code, i - len(web))
        assert batch["input_ids"][row].tolist() == ds.get_batch([j])["input_ids"][0].tolist()
    assert sum(td.samples_per_source(32).values()) == 32
    assert len(td.val) > 0 and td.val.get_batch([0, 1])["input_ids"].shape == (2, 16)


def test_bad_mixtures_are_one_line_naming_the_source(tmp_path, prepared):
    corpus, first, _ = prepared
    with pytest.raises(ValueError, match=r"data.mix\[1\].source='/nonexistent' does not exist"):
        cache.prepare_sources(mix_config(tmp_path, (str(corpus), 1), ("/nonexistent", 1)),
                             vocab_size=512)
    other = tmp_path / "other"
    (tmp_path / "o.txt").write_text(make_doc(random.Random(8), 200))
    prepare_dir([str(tmp_path / "o.txt")], other, opts(), vocab_size=300)
    with pytest.raises(ValueError, match=r"data.mix\[1\].source=.* was prepared with another "
                                         r"tokenizer"):
        cache.prepare_sources(mix_config(tmp_path, (str(first), 1), (str(other), 1)),
                             vocab_size=512)


# ---------------------------------------------------------------- parquet


def write_parquet(path: Path, columns: dict, *, row_group_size: int = 7) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_parquet_documents_round_trip_exactly_reading_only_the_text_column(
    tmp_path, monkeypatch, prepared
):
    _, first, _ = prepared
    rng = random.Random(6)
    texts = [make_doc(rng, rng.randint(1, 5)) + HARD[k % len(HARD)] for k in range(40)]
    texts[9] = ""  # an empty document: counted, not stored
    write_parquet(tmp_path / "web.parquet",
                  {"id": list(range(40)), "body": texts, "url": ["u"] * 40})
    monkeypatch.setattr(readers, "PARQUET_ROWS", 5)
    items = list(readers.read_items(tmp_path / "web.parquet", 0, fields=("body",)))
    assert all(set(item.rows) == {"body"} for item in items)
    assert [len(item.rows["body"]) for item in items] == [5] * 8 + [0]  # streamed, not whole

    out = tmp_path / "out"
    meta = prepare_dir([str(tmp_path / "web.parquet")], out, opts(text_key="body", workers=2),
                       tokenizer=str(first / "tokenizer.model"))
    assert documents(out, "train") == [t for t in texts if t]
    assert meta["num_empty_documents"] == 1 and meta["skipped"] == []


def test_sft_reads_prompt_and_response_columns_of_parquet(tmp_path, prepared):
    _, first, _ = prepared
    write_parquet(tmp_path / "chat.parquet",
                  {"prompt": ["2+2?", "name?"], "response": ["4", "llama"]})
    out = tmp_path / "out"
    prepare_dir([str(tmp_path / "chat.parquet")], out, opts(format="sft"),
                tokenizer=str(first / "tokenizer.model"))
    ds = load_dataset(out, DataConfig(format="sft"), seq_len=32)
    batch = ds.get_batch([0])
    answer = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    tok = ds.tokenizer
    assert answer == [*tok.encode("4"), tok.eos_id, *tok.encode("llama"), tok.eos_id]


def test_bad_parquet_inputs_are_skipped_with_one_line_each(tmp_path, capsys, prepared):
    _, first, _ = prepared
    write_parquet(tmp_path / "a.parquet", {"text": ["return value"]})
    write_parquet(tmp_path / "b.parquet", {"content": ["x"]})
    write_parquet(tmp_path / "c.parquet", {"text": ["print total", None]})
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really parquet")
    args = ["prepare", "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", "1",
            "--tokenizer", str(first / "tokenizer.model")]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"skipped {tmp_path / 'b.parquet'}: no column 'text' (columns: content); set " \
           "data.text_key" in err
    assert f"skipped {tmp_path / 'c.parquet'}: row 2: expected string column(s) 'text', " \
           "found NoneType" in err
    assert any(line.startswith(f"skipped {tmp_path / 'd.parquet'}: cannot read: ") for line in err)
    assert documents(tmp_path / "out", "train") == ["return value"]


# ---------------------------------------------------------------- parts and merge


def test_parts_then_merge_equal_a_one_process_prepare_token_for_token(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    make_corpus(corpus)
    write_parquet(corpus / "z.parquet", {"text": ["from a parquet file", "second row"]})
    common = ["--vocab-size", "400", "--workers", "1", "--val-fraction", "0.2"]
    one = tmp_path / "one"
    assert main(["prepare", "--input", str(corpus), "--out", str(one), *common]) == 0
    parted = tmp_path / "parted"
    for part in (2, 0, 1, 3):  # any order, as array tasks finish
        args = ["prepare", "--input", str(corpus), "--out", str(parted), "--part", f"{part}/4"]
        assert main([*args, *common]) == 0
    assert main(["prepare", "--merge", str(parted)]) == 0
    # A failed task is rerun alone: its part is replaced, the result is the same, and what a
    # killed task left behind is removed.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    killed = parted / "parts" / f".part-00001-of-00004.tmp-{socket.gethostname()}-{dead}-0000aaaa"
    killed.mkdir()
    args = ["prepare", "--input", str(corpus), "--out", str(parted), "--part", "1/4"]
    assert main([*args, *common]) == 0
    assert main(["prepare", "--merge", str(parted)]) == 0
    capsys.readouterr()

    assert (one / "tokenizer.model").read_bytes() == (parted / "tokenizer.model").read_bytes()
    for split in ("train", "val"):
        assert np.array_equal(read_split(one, split), read_split(parted, split))
    a, b = (json.loads((d / "meta.json").read_text()) for d in (one, parted))
    for key in ("num_tokens", "num_documents", "num_files", "skipped", "num_empty_documents",
                "tokenizer_sha256", "inputs"):
        assert a[key] == b[key], key
    assert b["parts"] == 4
    parts = sorted(p.name for p in (parted / "parts").iterdir())
    assert parts == [f"part-0000{i}-of-00004" for i in range(4)]  # and no killed.name
    ds = load_dataset(parted, DataConfig(), seq_len=16, vocab_size=400)
    assert ds.get_batch([0])["input_ids"].tolist() == \
        load_dataset(one, DataConfig(), seq_len=16).get_batch([0])["input_ids"].tolist()


def test_merge_names_missing_parts_and_bad_part_arguments_are_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(make_doc(random.Random(1), 300))
    out = str(tmp_path / "out")
    common = ["--input", str(tmp_path / "a.txt"), "--out", out, "--vocab-size", "300"]
    assert main(["prepare", *common, "--part", "0/3", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["prepare", "--merge", out]) == 2
    assert main(["prepare", *common, "--part", "3/3"]) == 2
    assert main(["prepare", "--merge", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: --merge='{out}': part(s) 1, 2 of 3 not finished; rerun them (prepare --part I/3, "
        "or those array tasks)",
        "error: --part='3/3'; allowed: I/N with 0 <= I < N (e.g. 0/8)",
        f"error: --merge='{tmp_path / 'nothing'}' has no finished parts in "
        f"'{tmp_path / 'nothing' / 'parts'}'; run prepare --part I/N first",
    ]
    assert not (tmp_path / "out" / "meta.json").exists()


def test_merge_refuses_parts_that_ran_while_the_corpus_changed(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(3)
    for i in range(6):
        (corpus / f"f{i}.txt").write_text(make_doc(rng, 200))
    out = str(tmp_path / "out")
    common = ["--input", str(corpus), "--out", out, "--vocab-size", "300", "--workers", "1"]
    assert main(["prepare", *common, "--part", "0/2"]) == 0
    # The corpus grows at its end between the two tasks: part 1 cuts its range further on.
    (corpus / "f5.txt").write_text(make_doc(rng, 200) * 8)
    assert main(["prepare", *common, "--part", "1/2"]) == 0
    capsys.readouterr()
    assert main(["prepare", "--merge", out]) == 2
    gap = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: --merge='{out}': part-00001-of-00002 covers files (\d)-6 of 6 "
                        r"and leaves files (\d)-\1 out after part-00000-of-00002: the parts ran "
                        r"while the corpus changed; rerun every part \(prepare --part I/2\)",
                        gap), gap
    # Rerun part 0: the ranges tile, until a file a part read is changed in place.
    assert main(["prepare", *common, "--part", "0/2"]) == 0
    assert main(["prepare", "--merge", out]) == 0
    size, seen = (corpus / "f0.txt").stat().st_size, (corpus / "f0.txt").stat().st_mtime_ns
    (corpus / "f0.txt").write_text("x" * size)
    os.utime(corpus / "f0.txt", ns=(1, 1))
    capsys.readouterr()
    assert main(["prepare", "--merge", out]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --merge='{out}': part-00000-of-00002 read {corpus / 'f0.txt'}, which had "
        f"{size} bytes (mtime_ns {seen}) and now has {size} (mtime_ns 1): the corpus changed "
        "after that part ran; rerun it (prepare --part 0/2)")


def test_without_zstandard_the_trainer_imports_and_zst_inputs_are_one_line(tmp_path):
    # The GPU image has no zstandard: nothing but .zst inputs may need it.
    (tmp_path / "a.txt").write_text("plain text\n")
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n'))
    code = (
        "import sys\n"
        "sys.modules['zstandard'] = None  # import zstandard now raises ImportError\n"
        "import llamatrain.train, llamatrain.data.cache\n"
        "from llamatrain.data.readers import collect_files\n"
        f"print(len(collect_files([{str(tmp_path / 'a.txt')!r}])))\n"
        f"collect_files([{str(tmp_path)!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "1"
    assert done.stderr.strip().splitlines()[-1] == (
        f"ValueError: --input={str(tmp_path)!r}: 1 .zst file(s), e.g. "
        f"{str(tmp_path / 'b.jsonl.zst')!r}, and the zstandard package is not installed "
        "(pip install zstandard)")
