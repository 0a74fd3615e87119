"""`python -m llamatrain.data clean` (§2.1) on a corpus built here from the standard library's
pydoc topics (English prose), with planted cases whose truth is known: pages of blocked sites and
their subdomains (and look-alikes that must stay), junk pages, exact copies, near copies with a few
per cent of their words changed, e-mail and IP addresses, a broken file. The report's counts are
checked against the planted numbers, the output trains, a resumed and a SLURM-array clean equal a
one-process clean."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import REPO, run_train, tiny_args
from slurm_cluster import LAUNCH, start_cluster, stop_cluster

from llamatrain.data import clean as cl
from llamatrain.data import clean_records as rio
from llamatrain.data import readers
from llamatrain.data.__main__ import main as data_main
from llamatrain.data.__main__ import prepare_dir
from llamatrain.data.prepare import PrepareOptions
from llamatrain.data.readers import CLEAN_REPORT, collect_files

BLOCK_LIST = "# sites with personal information\nblocked-people.com\n*.private.social-site.net\n"
BLOCKED_URLS = ["https://blocked-people.com/p/1", "http://www.blocked-people.com/p/2",
                "https://WWW.Blocked-People.COM/p/3", "https://a.b.blocked-people.com/p/4",
                "blocked-people.com/p/5", "https://private.social-site.net/u/6",
                "https://me.private.social-site.net/u/7", "https://x.y.private.social-site.net/8"]
# Look-alikes that the block list does not cover: site removal must keep them.
DECOY_URLS = ["https://social-site.net/u/1", "https://public.social-site.net/u/2",
              "https://notblocked-people.com/p/3", "https://blocked-people.com.example.org/p/4",
              "https://blocked-people.co/p/5", "https://private-social-site.net/u/6"]
NEAR_RATES = (0.02, 0.05)  # share of words changed in a near copy
NEAR_PER_RATE = 20
NUM_EXACT_ORIGINALS, COPIES_EACH = 5, 2
EMAIL, PUBLIC_IP, PRIVATE_IP = "jane.doe@example.net", "93.184.216.34", "192.168.0.7"
NUM_EMAILS, NUM_IPS, NUM_PRIVATE_IPS = 6, 4, 2
NUM_NO_URL = 20
OPTIONS = ["--filters", "gopher", "--dedup", "exact,minhash", "--pii", "--samples", "100"]


@dataclass
class Planted:
    """The corpus and its truth. A record is named by its source as clean reports it
    ('path#n', n counted from 1 in its file)."""

    inputs: Path
    block_list: Path
    sources: dict[str, dict] = field(default_factory=dict)  # source -> input record
    blocked: set[str] = field(default_factory=set)
    decoys: set[str] = field(default_factory=set)
    junk: dict[str, set[str]] = field(default_factory=dict)  # kind -> sources
    exact: dict[str, str] = field(default_factory=dict)  # copy -> original
    near: list[tuple[str, str, float]] = field(default_factory=list)  # original, copy, rate
    pii: dict[str, set[str]] = field(default_factory=dict)
    no_url: set[str] = field(default_factory=set)
    broken: str = ""


def prose_pages() -> list[str]:
    """Pages of about 150 words of English from pydoc_data's topics (the reference manual):
    whole sentences with neither code nor markup."""
    from pydoc_data.topics import topics

    drop = str.maketrans("", "", '“”"‘’`*')
    pages = []
    for name in sorted(topics):
        sentences = [s.translate(drop) for p in topics[name].split("\n\n")
                     for s in re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(p.split()))]
        page: list[str] = []
        for s in sentences:
            if not 6 <= len(s.split()) <= 60 or set(s) & set("[]{}<>=_#\\|/@$%^~") \
                    or not s[:1].isupper() or not s.endswith("."):
                continue
            page.append(s)
            if sum(len(x.split()) for x in page) >= 150:
                pages.append("\n\n".join(" ".join(page[i:i + 4]) for i in range(0, len(page), 4)))
                page = []
    return pages


def shingles(text: str, signer) -> set[int]:
    return set(signer.get_shingles(text).ravel().tolist())


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def base_pages(tmp: Path) -> list[str]:
    """Pages that the Gopher filters keep, with no e-mail or IP address, no two alike."""
    from datatrove.data import Document

    words = cl.EnglishWords()
    keep = [cl.GopherRepetitionFilter(language=words), cl.GopherQualityFilter(language=words)]
    pii = cl.PIIFormatter()
    signer = cl.MinhashDedupSignature(str(tmp / "sig"), language=words)
    pages, sets = [], []
    for text in prose_pages():
        if any(f.filter(Document(text=text, id="")) is not True for f in keep):
            continue
        if pii.emails_replacer.regex.search(text) or pii.ip_replacer.regex.search(text):
            continue
        s = shingles(text, signer)
        if any(jaccard(s, t) > 0.2 for t in sets):
            continue
        pages.append(text)
        sets.append(s)
    return pages


def change_words(text: str, rate: float, vocabulary: list[str], rng: random.Random) -> str:
    parts = re.split(r"(\s+)", text)
    positions = [i for i in range(0, len(parts), 2) if parts[i].isalpha()]
    for i in rng.sample(positions, max(1, round(rate * len(positions)))):
        parts[i] = rng.choice([w for w in vocabulary if w != parts[i]])
    return "".join(parts)


def junk_pages() -> dict[str, list[str]]:
    rng = random.Random(3)
    return {
        "short": [f"Click here to subscribe to page {i} of our newsletter." for i in range(4)],
        "repeated_lines": ["\n".join(["Home | About us | Contact | Login"] * 30 + [f"Page {i}"])
                           for i in range(4)],
        "numbers": ["\n".join(" ".join(str(rng.randint(0, 99)) for _ in range(12))
                              for _ in range(20)) for _ in range(4)],
    }


def build_corpus(root: Path) -> Planted:
    """The input directory: three text files, a broken .jsonl, a .jsonl, a .jsonl.gz, a parquet
    file with typed columns and a .jsonl.zst, every planted case later in the input order than
    what it copies."""
    pages = base_pages(root)
    assert len(pages) >= 131, len(pages)
    vocabulary = sorted({w for p in pages for w in p.split() if w.isalpha() and len(w) > 3})
    rng = random.Random(0)
    inputs = root / "raw"
    (inputs / "notes").mkdir(parents=True)
    truth = Planted(inputs=inputs, block_list=root / "pii_sites.txt")
    truth.block_list.write_text(BLOCK_LIST)
    files: dict[str, list[dict]] = {"web-1.jsonl": [], "web-2.jsonl.gz": [], "web-3.parquet": [],
                                    "web-4.jsonl.zst": []}
    counter = iter(range(10**6))

    def add(name: str, text: str, url: str | None = "") -> str:
        n = next(counter)
        record = {"id": f"r{n:04d}", "text": text, "lang": "en"}
        if url is not None:
            record["url"] = url or f"https://docs.example.org/page/{n}"
        if name.endswith(".parquet"):
            record.update(rank=n, tags=["docs", f"t{n % 3}"])
            record.pop("lang")
        files[name].append(record)
        source = f"{inputs / name}#{len(files[name])}"
        truth.sources[source] = record
        return source

    page = iter(pages)
    for i in range(3):
        path = inputs / "notes" / f"note-{i}.txt"
        path.write_text(next(page))
        truth.sources[f"{path}#1"] = {"text": path.read_text()}
        truth.no_url.add(f"{path}#1")
    (inputs / "broken.jsonl").write_text('{"text": "fine", "url": "https://a.org/1"}\n{oops\n')
    truth.broken = str(inputs / "broken.jsonl")
    truth.blocked = {add("web-1.jsonl", next(page), url) for url in BLOCKED_URLS}
    truth.decoys = {add("web-1.jsonl", next(page), url) for url in DECOY_URLS}
    originals = [(add("web-1.jsonl", text := next(page)), text)
                 for _ in range(NUM_EXACT_ORIGINALS)]
    near_originals = [(add("web-1.jsonl", text := next(page)), text)
                      for _ in range(NEAR_PER_RATE * len(NEAR_RATES))]
    truth.pii = {"email": set(), "ip": set(), "private_ip": set()}
    for kind, n, sentence in (("email", NUM_EMAILS, f"Write to {EMAIL} for a copy."),
                              ("ip", NUM_IPS, f"The mirror at {PUBLIC_IP} has the files."),
                              ("private_ip", NUM_PRIVATE_IPS, f"The host {PRIVATE_IP} is ours.")):
        truth.pii[kind] = {add("web-1.jsonl", f"{next(page)} {sentence}") for _ in range(n)}
    for name in ("web-1.jsonl", "web-2.jsonl.gz"):
        for _ in range(12):
            add(name, next(page))
    truth.no_url |= {add("web-2.jsonl.gz", next(page), None) for _ in range(NUM_NO_URL // 2)}
    truth.junk = {kind: {add("web-2.jsonl.gz", text, f"https://junk.example.net/{kind}/{j}")
                         for j, text in enumerate(texts)}
                  for kind, texts in junk_pages().items()}
    for source, text in originals:
        truth.exact[add("web-2.jsonl.gz", text)] = source
    for source, text in near_originals[:NEAR_PER_RATE]:
        copy = add("web-2.jsonl.gz", change_words(text, NEAR_RATES[0], vocabulary, rng))
        truth.near.append((source, copy, NEAR_RATES[0]))
    for _ in range(8):
        add("web-3.parquet", next(page))
    truth.no_url |= {add("web-3.parquet", next(page), None) for _ in range(NUM_NO_URL // 2)}
    for source, text in originals:  # the second copy: other case and whitespace
        truth.exact[add("web-3.parquet", text.lower().replace(" ", "  "))] = source
    for source, text in near_originals[NEAR_PER_RATE:]:
        copy = add("web-4.jsonl.zst", change_words(text, NEAR_RATES[1], vocabulary, rng))
        truth.near.append((source, copy, NEAR_RATES[1]))
    for _ in range(5):
        add("web-4.jsonl.zst", next(page))

    def jsonl(records: list[dict]) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in records).encode()

    (inputs / "web-1.jsonl").write_bytes(jsonl(files["web-1.jsonl"]))
    (inputs / "web-2.jsonl.gz").write_bytes(gzip.compress(jsonl(files["web-2.jsonl.gz"])))
    table = pa.Table.from_pylist(files["web-3.parquet"], schema=pa.schema([
        ("id", pa.string()), ("text", pa.string()), ("url", pa.string()), ("rank", pa.int32()),
        ("tags", pa.list_(pa.string()))]))
    pq.write_table(table, inputs / "web-3.parquet", row_group_size=16)
    (inputs / "web-4.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(jsonl(files["web-4.jsonl.zst"])))
    return truth


def read_output(out: Path) -> list[dict]:
    """The cleaned records in order, as the report lists the shards."""
    report = json.loads((out / CLEAN_REPORT).read_text())
    records = []
    for shard in report["shards"]:
        path = out / shard["file"]
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == shard["documents"]
        records += [{k: v for k, v in r.items() if v is not None} for r in rows]
    return records


def removed(report: dict, out: Path, step: str) -> set[str]:
    """Sources of what a step removed (the samples hold them all: --samples 100)."""
    entry = next(s for s in report["steps"] if s["step"] == step)
    sources = {json.loads(line)["source"] for line in (out / entry["samples"]).read_text()
               .splitlines()}
    assert len(sources) == entry["documents"]
    return sources


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    return build_corpus(tmp_path_factory.mktemp("clean-corpus"))


@pytest.fixture(scope="module")
def cleaned(planted, tmp_path_factory):
    """One process, every step on: (output dir, report, printed table)."""
    out = tmp_path_factory.mktemp("cleaned") / "clean"
    args = ["clean", "--input", str(planted.inputs), "--out", str(out), "--block-domains",
            str(planted.block_list), *OPTIONS]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert data_main(args) == 0
    return out, json.loads((out / CLEAN_REPORT).read_text()), printed.getvalue()


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records if "id" in r}


def test_site_removal_removes_blocked_domains_and_subdomains_and_nothing_else(planted, cleaned):
    out, report, _ = cleaned
    assert removed(report, out, "site") == planted.blocked
    site = report["steps"][0]
    assert site["reasons"] == {"subdomain": 5, "domain": 3}
    assert dict(site["top_domains"]) == {"blocked-people.com": 5, "social-site.net": 3}
    assert site["kept_without_url"] == NUM_NO_URL + 3  # the .jsonl/parquet records and notes
    kept = by_id(read_output(out))
    assert all(planted.sources[s]["id"] in kept for s in planted.decoys)


def test_quality_filters_drop_exactly_the_junk_pages(planted, cleaned):
    out, report, _ = cleaned
    repetition = removed(report, out, "gopher_repetition")
    quality = removed(report, out, "gopher_quality")
    assert repetition == planted.junk["repeated_lines"] | planted.junk["short"]
    assert quality == planted.junk["numbers"]
    steps = {s["step"]: s["reasons"] for s in report["steps"]}
    # A short page fails the repetition rules first: one 3-gram is most of it.
    assert steps["gopher_repetition"] == {"dup_line_frac": 4, "top_3_gram": 4}
    assert steps["gopher_quality"] == {"gopher_below_avg_threshold": 4}


def test_exact_copies_are_all_removed_and_the_first_of_each_kept(planted, cleaned):
    out, report, _ = cleaned
    assert removed(report, out, "exact") == set(planted.exact)
    kept = by_id(read_output(out))
    assert all(planted.sources[s]["id"] in kept for s in set(planted.exact.values()))


def test_near_copies_are_removed_at_the_rate_the_minhash_parameters_promise(planted, cleaned):
    out, report, _ = cleaned
    gone = removed(report, out, "minhash")
    pairs = {frozenset((a, b)) for a, b, _ in planted.near}
    # Precision: everything MinHash removed is one of a planted pair.
    assert all(any(s in p for p in pairs) for s in gone), gone
    m = report["minhash"]
    assert (m["n_grams"], m["bands"], m["rows"], m["hashes"]) == (5, 14, 8, 112)
    signer = cl.MinhashDedupSignature(str(out / "sig"), language=cl.EnglishWords())
    lines = []
    for rate in NEAR_RATES:
        group = [(a, b) for a, b, r in planted.near if r == rate]
        sims = [jaccard(shingles(planted.sources[a]["text"], signer),
                        shingles(planted.sources[b]["text"], signer)) for a, b in group]
        promised = [cl.removal_probability(s, bands=14, rows=8) for s in sims]
        found = sum(bool({a, b} & gone) for a, b in group)
        expected, sd = sum(promised), math.sqrt(sum(p * (1 - p) for p in promised))
        lines.append(f"{rate:.0%} of words changed: Jaccard {min(sims):.2f}-{max(sims):.2f}, "
                     f"found {found}/{len(group)} pairs, promised {expected:.1f} +- {sd:.1f}")
        assert abs(found - expected) <= 3 * sd + 1, lines[-1]
    print("\n" + "\n".join(lines) + f"\nprecision 1.00: all {len(gone)} documents MinHash "
          "removed are of planted pairs")


def test_report_counts_equal_the_planted_numbers(planted, cleaned):
    out, report, printed = cleaned
    assert report["in"]["files"] == 8
    assert report["in"]["skipped"] == [{"path": planted.broken,
                                        "reason": "line 2: invalid JSON (Expecting property name "
                                                  "enclosed in double quotes)"}]
    assert report["in"]["documents"] == len(planted.sources)
    steps = {s["step"]: s["documents"] for s in report["steps"]}
    assert steps == {"site": len(planted.blocked), "gopher_repetition": 8,
                     "gopher_quality": 4, "exact": NUM_EXACT_ORIGINALS * COPIES_EACH,
                     "minhash": steps["minhash"]}
    assert report["out"]["documents"] == len(planted.sources) - sum(steps.values())
    assert report["pii"] == {"documents": NUM_EMAILS + NUM_IPS, "emails": NUM_EMAILS,
                             "ips": NUM_IPS}
    records = read_output(out)
    assert len(records) == report["out"]["documents"]
    assert report["out"]["bytes"] == sum(len(r["text"].encode()) for r in records)
    assert sum(EMAIL in r["text"] for r in records) == 0
    assert sum(cl.EMAIL_REPLACEMENT in r["text"] for r in records) == NUM_EMAILS
    assert sum(PUBLIC_IP in r["text"] for r in records) == 0
    assert sum(PRIVATE_IP in r["text"] for r in records) == NUM_PRIVATE_IPS
    assert f"| - exact duplicates | {NUM_EXACT_ORIGINALS * COPIES_EACH} |" in printed
    assert f"| in | {len(planted.sources)} | 100.0% |" in printed


def test_kept_records_are_written_back_whole(planted, cleaned):
    out, report, _ = cleaned
    kept = by_id(read_output(out))
    changed = planted.pii["email"] | planted.pii["ip"]
    for source, record in planted.sources.items():
        if "id" in record and record["id"] in kept and source not in changed:
            assert kept[record["id"]] == record, source
    # Records that came from parquet keep their column types.
    schemas = [pq.read_schema(out / s["file"]) for s in report["shards"]]
    typed = [s for s in schemas if "rank" in s.names]
    assert typed and all(s.field("rank").type == pa.int32() for s in typed)
    assert all(s.field("tags").type == pa.list_(pa.string()) for s in typed)
    assert not any(rio.SOURCE_FIELD in s.names for s in schemas)
    assert not (out / "work" / "filtered").exists()  # the intermediate copy is gone


def test_prepare_and_training_take_the_clean_output(cleaned, tmp_path):
    out, report, _ = cleaned
    files = collect_files([str(out)])
    assert [str(f) for f in files] == [str(out / s["file"]) for s in report["shards"]]
    prepared = tmp_path / "prepared"
    meta = prepare_dir([str(out)], prepared, PrepareOptions(workers=1, val_fraction=0.1,
                                                             progress=False), vocab_size=384)
    assert meta["num_documents"] == report["out"]["documents"]
    digest = hashlib.sha256((out / CLEAN_REPORT).read_bytes()).hexdigest()
    assert meta["cleaning"] == [{"dir": str(out), "report_sha256": digest,
                                 "options": report["options"],
                                 "documents_in": report["in"]["documents"],
                                 "documents_out": report["out"]["documents"]}]
    run = tmp_path / "run"
    proc = run_train(tiny_args(prepared, run, **{"train.steps": 3, "checkpoint.interval": 10}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sources = json.loads((run / "report.json").read_text())["sources"]
    assert sources[0]["cleaning"][0]["report_sha256"] == digest
    assert digest in (run / "report.md").read_text()


def test_a_killed_clean_resumes_where_it_stopped_with_the_same_output(planted, cleaned,
                                                                       tmp_path, monkeypatch):
    reference, _, _ = cleaned
    out = tmp_path / "clean"
    args = ["clean", "--input", str(planted.inputs), "--out", str(out), "--block-domains",
            str(planted.block_list), *OPTIONS]

    write = rio.RecordWriter.run

    def killed(self, data, rank=0, world_size=1):
        for i, doc in enumerate(write(self, data, rank, world_size)):
            if i == 50 and not self.keep_source:
                raise KeyboardInterrupt  # as a kill in the middle of the write stage would
            yield doc

    with monkeypatch.context() as m:
        m.setattr(rio.RecordWriter, "run", killed)
        with pytest.raises(KeyboardInterrupt):
            data_main(args)
    done = out / "work" / "logs" / "filter" / "completions" / "00000"
    assert done.is_file() and not (out / CLEAN_REPORT).exists()
    before = done.stat().st_mtime_ns
    filter_log = (out / "work" / "logs" / "filter" / "logs" / "task_00000.log").read_text()
    with pytest.raises(ValueError, match="unfinished clean with other options"):
        cl.check_plan(out, cl.make_plan([str(planted.inputs)], cl.CleanOptions(), 1))
    assert data_main(args) == 0
    assert done.stat().st_mtime_ns == before  # the finished stages were not run again
    assert (out / "work" / "logs" / "filter" / "logs" / "task_00000.log").read_text() \
        == filter_log
    assert read_output(out) == read_output(reference)


def test_a_slurm_array_of_two_tasks_equals_a_one_process_clean(planted, cleaned, tmp_path):
    reference, one, _ = cleaned
    cluster = start_cluster(tmp_path / "slurm")
    try:
        out = tmp_path / "clean"
        job = cluster.sbatch("--array=0-1", "--job-name=clean", str(LAUNCH / "clean.sbatch"),
                             str(planted.inputs), "--out", str(out), "--block-domains",
                             str(planted.block_list), *OPTIONS, cwd=tmp_path)
        log = tmp_path / f"clean-{job}_0.out"
        cluster.wait_for("the chain of stages", lambda: (out / "work" / "chain").is_file(),
                         timeout=60, job_id=job, log=log)
        chain = [int(j) for j in (out / "work" / "chain").read_text().split()]
        assert len(chain) == 6  # exact, minhash signatures, buckets, cluster, write, report

        def logs() -> str:
            return "".join(f"== {p.name}\n{p.read_text()}"
                           for p in sorted(tmp_path.glob("clean-*.out")))

        def finished() -> bool:
            states = [dict(f.split("=", 1) for f in line.split() if "=" in f)
                      for j in (job, *chain) for line in
                      cluster.run("scontrol", "-o", "show", "job", str(j)).stdout.splitlines()]
            bad = [s for s in states if s["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT")
                   or s["Reason"] == "DependencyNeverSatisfied"]
            assert not bad, f"{bad[0]['JobId']} {bad[0]['JobState']}\n{logs()[-4000:]}"
            return states[-1]["JobState"] == "COMPLETED"

        cluster.wait_for("the report job", finished, timeout=240)
        text = logs()
        assert f"all stages done: {out} is cleaned" in text, text[-3000:]
        assert "| - exact duplicates | 10 |" in text
    finally:
        stop_cluster(cluster)
    two = json.loads((out / CLEAN_REPORT).read_text())
    assert two["tasks"] == 2 and len({s["file"].split("_")[0] for s in two["shards"]}) == 2
    assert read_output(out) == read_output(reference)
    for key in ("in", "out", "pii"):
        assert two[key] == one[key], key
    assert [{k: v for k, v in s.items() if k != "samples"} for s in two["steps"]] \
        == [{k: v for k, v in s.items() if k != "samples"} for s in one["steps"]]


@pytest.mark.parametrize(("extra", "message"), [
    (["--filters", "gopher,bogus"], "--filters='gopher,bogus': 'bogus' is unknown; allowed: "
                                    "gopher, c4, fineweb (comma-separated) or none"),
    (["--filter-param", "gopher.min_words=3"], "--filter-param=gopher.min_words: gopher has no "
                                               "parameter 'min_words'; allowed: dup_line_frac,"),
    (["--filter-param", "c4.min_num_sentences=3"], "--filter-param=c4.min_num_sentences: filter "
                                                   "'c4' is not in --filters; allowed: gopher"),
    (["--filter-param", "gopher.min_doc_words=thirty"], "is not a Python literal"),
    (["--dedup", "fuzzy"], "--dedup='fuzzy': 'fuzzy' is unknown; allowed: exact, minhash"),
    (["--nltk-data", "/nonexistent"], "--nltk-data='/nonexistent' has no "
                                      "tokenizers/punkt_tab/english/"),
    (["--block-domains", "BLOCK"], "line 2: 'https://x.org/a' is not a domain"),
])
def test_bad_options_are_one_line_errors(extra, message, tmp_path, capsys):
    (tmp_path / "BLOCK").write_text("ok.org\nhttps://x.org/a\n")
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    extra = [str(tmp_path / "BLOCK") if e == "BLOCK" else e for e in extra]
    code = data_main(["clean", "--input", str(tmp_path / "in.jsonl"), "--out",
                      str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_clean_without_datatrove_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llamatrain.data.clean", None)  # import raises ImportError
    code = data_main(["clean", "--input", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'llamatrain[clean]'" in err[0], err


def test_nltk_data_gives_the_filters_trained_sentences(tmp_path):
    english = tmp_path / "nltk" / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (english / name).write_text("")
    (english / "abbrev_types.txt").write_text("dr\n")
    text = "Dr. Smith came home. He sat down."
    assert cl.EnglishWords().sent_tokenize(text) == ["Dr.", "Smith came home.", "He sat down."]
    trained = cl.EnglishWords(str(tmp_path / "nltk"))
    assert trained.sent_tokenize(text) == ["Dr. Smith came home.", "He sat down."]
    assert trained.word_tokenize("He isn't home.") == ["He", "is", "n't", "home", "."]


def test_an_unfinished_clean_output_is_refused_as_input(planted, tmp_path):
    out = tmp_path / "clean"
    cl.start(out, cl.make_plan([str(planted.inputs)], cl.CleanOptions(), 1))
    with pytest.raises(ValueError, match="is a clean output that is not finished"):
        collect_files([str(out)])


def test_readme_states_the_minhash_parameters_and_what_they_remove():
    readme = (REPO / "README.md").read_text()
    s50 = cl.similarity_at(0.5, bands=cl.MINHASH_BANDS, rows=cl.MINHASH_ROWS)
    s90 = cl.similarity_at(0.9, bands=cl.MINHASH_BANDS, rows=cl.MINHASH_ROWS)
    assert math.isclose(cl.removal_probability(s50, bands=14, rows=8), 0.5)
    assert (cl.MINHASH_NGRAMS, cl.MINHASH_BANDS, cl.MINHASH_ROWS) == (5, 14, 8)
    assert f"Jaccard similarity {s50:.2f} with probability 50%, {s90:.2f} with 90%" in readme


def test_a_file_too_big_to_hold_is_checked_whole_before_any_record_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(rio, "HOLD_BYTES", 100)
    monkeypatch.setattr(readers, "TASK_BYTES", 64)  # many pieces per file
    lines = [json.dumps({"text": f"document {i}", "n": i}) for i in range(50)]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(lines) + "\n")
    bad.write_text("\n".join(lines) + "\n{oops\n")
    records = [r for r, _ in rio._file_records(good, 0, ("text",))]
    assert records == [{"text": f"document {i}", "n": i} for i in range(50)]
    with pytest.raises(readers.DocumentError, match="line 51: invalid JSON"):
        next(rio._file_records(bad, 0, ("text",)))
    long = tmp_path / "long.txt"
    long.write_text("A line of a long text document.\n" * 40)
    assert [r for r, _ in rio._file_records(long, 0, ("text",))] == [{"text": long.read_text()}]
