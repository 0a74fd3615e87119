"""Preparation in parts, for a SLURM array (launch/prepare.sbatch) or any set of machines: part I
of N tokenises a contiguous share of the input files into DIR/parts/, and `merge` then writes
DIR/meta.json over all the parts' shards. Split by split, the merged token stream and the
tokenizer are those of a one-process prepare of the same inputs, and any part can be rerun alone.

Each part records, in its part.json, the range of files it read and each file's path, size and
mtime_ns. Parts that ran while the corpus changed cut their ranges from different listings, so
merge checks that the ranges tile the input files exactly, and that every file is still the one
its part read; otherwise it names the part and the file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llamatrain.data.prepare import (
    SPLITS,
    TMP_TAG,
    PrepareOptions,
    Totals,
    dataset_meta,
    file_size,
    get_tokenizer,
    publish,
    remove_stale_builds,
    tokenize_files,
)
from llamatrain.data.readers import collect_files
from llamatrain.data.tokenizer import Tokenizer, load_tokenizer


def part_name(part: int, num_parts: int) -> str:
    return f"part-{part:05d}-of-{num_parts:05d}"


def parse_part(text: str, *, key: str = "--part") -> tuple[int, int]:
    """'I/N' -> (I, N): share I (0-based) of N."""
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ValueError(f"{key}={text!r}; allowed: I/N with 0 <= I < N (e.g. 0/8)")
    return int(i), int(n)


def part_range(sizes: Sequence[int], part: int, num_parts: int) -> tuple[int, int]:
    """Files [lo, hi) of a part: contiguous, so the parts in order are the files in order, and cut
    where the running byte count crosses part / num_parts of the total."""
    before = np.cumsum([0, *sizes])[:-1]
    total = sum(sizes)

    def start(k: int) -> int:
        return len(sizes) if k == num_parts else int(np.searchsorted(before, total * k / num_parts))

    return start(part), start(part + 1)


def part_tokenizer(
    out: Path, files: Sequence[Path], opts: PrepareOptions, *, tokenizer: str, vocab_size: int
) -> Tokenizer:
    """The tokenizer of a parted preparation, out/tokenizer.model: once there it is used; else
    every part trains it on the same sample of all the files (the same bytes, so no part waits for
    another and any part can be rerun alone) and the first to finish publishes it."""
    path = out / "tokenizer.model"
    if path.is_file():
        tok = load_tokenizer(path)
        if tokenizer and load_tokenizer(tokenizer).sha256 != tok.sha256:
            raise ValueError(f"--tokenizer={tokenizer!r} is not {str(path)!r}, which the other "
                             "parts use; allowed: the same tokenizer for every part")
        return tok
    tok = get_tokenizer(files, opts, tokenizer=tokenizer, vocab_size=vocab_size)
    tmp = out / f".tokenizer.model.tmp-{socket.gethostname()}-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def file_stat(path: Path) -> list:
    """[path, size, mtime_ns] of an input file, as a part saw it ([path, -1, -1]: unreadable)."""
    try:
        st = path.stat()
    except OSError:
        return [str(path), -1, -1]
    return [str(path), st.st_size, st.st_mtime_ns]


def check_tiling(out: Path, parts: Sequence[tuple[str, dict]]) -> None:
    """The parts' file ranges, in order, must cover the input files exactly once, and every file
    must still be what its part read (same path, size and mtime_ns)."""
    n = len(parts)
    total = parts[0][1]["num_files_total"]
    end, previous = 0, "the start"
    for name, info in parts:
        lo, hi = info["files"]
        if lo != end:
            how = (f"overlaps {previous} (files {lo}-{end})" if lo < end
                   else f"leaves files {end}-{lo} out after {previous}")
            raise ValueError(f"--merge={str(out)!r}: {name} covers files {lo}-{hi} of {total} and "
                             f"{how}: the parts ran while the corpus changed; rerun every part "
                             f"(prepare --part I/{n})")
        end, previous = hi, name
    if end != total:
        raise ValueError(f"--merge={str(out)!r}: the parts end at file {end} of {total}: files "
                         f"{end}-{total} are in no part; rerun every part (prepare --part I/{n})")
    current = collect_files(parts[0][1]["inputs"])
    if len(current) != total:
        raise ValueError(f"--merge={str(out)!r}: the inputs now hold {len(current)} files, the "
                         f"parts saw {total}: the corpus changed; rerun every part (prepare "
                         f"--part I/{n})")
    for name, info in parts:
        lo, hi = info["files"]
        if "file_stats" not in info:
            raise ValueError(f"--merge={str(out)!r}: {name} records no file sizes (an older "
                             f"llamatrain made it): rerun it (prepare --part {info['part']}/{n})")
        for (path, size, mtime), now in zip(info["file_stats"], current[lo:hi], strict=True):
            _, size_now, mtime_now = file_stat(now)
            if path != str(now):
                change = f"whose place in the file order now holds {now}"
            elif size_now < 0:
                change = "which cannot be read now"
            elif (size, mtime) != (size_now, mtime_now):
                change = (f"which had {size} bytes (mtime_ns {mtime}) and now has {size_now} "
                          f"(mtime_ns {mtime_now})")
            else:
                continue
            raise ValueError(f"--merge={str(out)!r}: {name} read {path}, {change}: the corpus "
                             f"changed after that part ran; rerun it (prepare --part "
                             f"{info['part']}/{n})")


def build_part(
    inputs: Sequence[str],
    out: Path,
    opts: PrepareOptions,
    *,
    part: int,
    num_parts: int,
    tokenizer: str = "",
    vocab_size: int = 32_000,
) -> dict:
    """Share `part` of num_parts of the input files, tokenised into out/parts/part-I-of-N with its
    part.json; a rerun replaces it. `merge` then writes out/meta.json."""
    opts.validate()
    files = collect_files(inputs)
    out.mkdir(parents=True, exist_ok=True)
    tok = part_tokenizer(out, files, opts, tokenizer=tokenizer, vocab_size=vocab_size)
    lo, hi = part_range([file_size(f) for f in files], part, num_parts)
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    remove_stale_builds(parts)
    final = parts / part_name(part, num_parts)
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = parts / f".{final.name}{TMP_TAG}{owner}"
    tmp.mkdir()
    try:
        # Taken before reading: a file that changes while the part reads it no longer matches.
        stats = [file_stat(f) for f in files[lo:hi]]
        totals, skipped, shards = tokenize_files(files[lo:hi], tok, opts, tmp)
        info = {
            "part": part,
            "num_parts": num_parts,
            "files": [lo, hi],
            "num_files_total": len(files),
            "file_stats": stats,
            "inputs": list(inputs),
            "options": {"format": opts.format, "text_key": opts.text_key,
                        "val_fraction": opts.val_fraction},
            "tokenizer_sha256": tok.sha256,
            "tokenizer_source": tokenizer or f"trained on {opts.tokenizer_sample} sampled lines",
            "num_tokens": totals.num_tokens,
            "num_documents": totals.num_documents,
            "num_empty_documents": totals.num_empty,
            "shards": shards,
            "skipped": skipped,
        }
        (tmp / "part.json").write_text(json.dumps(info, indent=1) + "\n")
        publish(tmp, final, overwrite=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def merge(out: Path) -> dict:
    """Write out/meta.json from every part of out/parts: the token stream of each split is the
    parts' streams in order, which is a one-process prepare's stream of the same inputs. Missing
    or mismatched parts are a ValueError naming them; rerunning merge is harmless."""
    infos = {}
    for d in sorted((out / "parts").glob("part-*-of-*")):
        if (d / "part.json").is_file():
            info = json.loads((d / "part.json").read_text())
            infos[(info["part"], info["num_parts"])] = (d.name, info)
    counts = sorted({n for _, n in infos})
    if not counts:
        raise ValueError(f"--merge={str(out)!r} has no finished parts in {str(out / 'parts')!r}; "
                         "run prepare --part I/N first")
    if len(counts) > 1:
        raise ValueError(f"--merge={str(out)!r} holds parts of {' and '.join(map(str, counts))} "
                         "parts; allowed: one count (remove the stale parts)")
    n = counts[0]
    missing = [i for i in range(n) if (i, n) not in infos]
    if missing:
        raise ValueError(f"--merge={str(out)!r}: part(s) {', '.join(map(str, missing))} of {n} "
                         f"not finished; rerun them (prepare --part I/{n}, or those array tasks)")
    parts = [infos[(i, n)] for i in range(n)]
    tok = load_tokenizer(out / "tokenizer.model")
    first = parts[0][1]
    for name, info in parts:
        for field_ in ("inputs", "options", "num_files_total"):
            if info[field_] != first[field_]:
                raise ValueError(f"--merge={str(out)!r}: {name} was prepared with other "
                                 f"{field_.replace('_', ' ')} than {parts[0][0]}; rerun it")
        if info["tokenizer_sha256"] != tok.sha256:
            raise ValueError(f"--merge={str(out)!r}: {name} was tokenised with another tokenizer "
                             f"than {str(out / 'tokenizer.model')!r}; rerun it")
    check_tiling(out, parts)
    totals, skipped, shards = Totals(), [], {s: [] for s in SPLITS}
    for name, info in parts:
        for s in SPLITS:
            totals.num_tokens[s] += info["num_tokens"][s]
            totals.num_documents[s] += info["num_documents"][s]
            shards[s] += [{**sh, "file": f"parts/{name}/{sh['file']}"} for sh in info["shards"][s]]
        totals.num_empty += info["num_empty_documents"]
        skipped += info["skipped"]
    opts = PrepareOptions(**first["options"])
    meta = dataset_meta(first["inputs"], opts, tok, "", totals, skipped, shards,
                 first["num_files_total"], key="--input")
    meta["tokenizer_source"] = first["tokenizer_source"]
    meta["parts"] = n
    tmp = out / f".meta.json.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta
