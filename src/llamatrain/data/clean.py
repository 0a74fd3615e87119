"""Corpus cleaning before tokenising (§2.1) on Hugging Face's datatrove: site removal, quality
filters, exact and MinHash near deduplication, PII replacement, and the report of what was removed.

The input is what `prepare` reads (text files, .jsonl, parquet, .gz/.zst, through
llamatrain.data.readers, with the same skip-and-name rule for bad files); each record becomes a
datatrove Document whose metadata keeps the whole record, so a kept record is written back with
every field. The work runs as stages, each a set of tasks that datatrove's executor runs and marks
complete (`work/logs/<stage>/completions/`), so a rerun skips what is done:

  filter              N tasks: read a contiguous share of the files, remove blocked sites, apply
                      the quality filters, write the survivors to work/filtered/, hash them for
                      exact deduplication
  exact               1 task: find the exact duplicates over all tasks
  minhash-signatures  N tasks: MinHash signatures of what exact deduplication keeps
  minhash-buckets     min(bands, N) tasks: matching signatures, band by band
  minhash-cluster     1 task: duplicate pairs -> clusters, one document kept per cluster
  write               N tasks: drop the duplicates, replace e-mails and IPs, write OUT/data/
  report              1 task: OUT/clean_report.json (last: it marks OUT complete), OUT/removed/

Document order is the inputs' order in every stage and ties are broken by that order, so the
output is the same document for document whatever the number of tasks N.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import re
import shutil
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.dedup import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.utils.logging import setup_default_logger
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer, strip_strings
from tldextract import TLDExtract

from llamatrain.data.clean_records import Account, InputReader, RecordWriter, ShardReader
from llamatrain.data.readers import CLEAN_PLAN, CLEAN_REPORT, collect_files

REPORT_VERSION = 1

FILTERS: dict[str, tuple[type, ...]] = {
    # Gopher's two rule sets (Rae et al. 2021, as FineWeb applies them), C4's page rules (Raffel et
    # al. 2020; it also drops the lines without terminal punctuation), FineWeb's own rules.
    "gopher": (GopherRepetitionFilter, GopherQualityFilter),
    "c4": (C4QualityFilter,),
    "fineweb": (FineWebQualityFilter,),
}
DEDUPS = ("exact", "minhash")
FORMATS = ("parquet", "jsonl")

# Set by llamatrain, not by --filter-param.
_OWN_PARAMS = {"self", "exclusion_writer", "language"}

# FineWeb's MinHash: 5-gram shingles, 14 bands of 8 hashes (112 hashes of 64 bits).
MINHASH_NGRAMS, MINHASH_BANDS, MINHASH_ROWS, MINHASH_SEED = 5, 14, 8, 1

# Exact duplicates: the same text up to case and runs of whitespace.
EXACT_NORM = TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=False,
                            norm_unicode_diacritics=False, norm_numbers=False)

# One replacement each (datatrove cycles through a list, which would make the output depend on
# where a task starts).
EMAIL_REPLACEMENT, IP_REPLACEMENT = "email@example.com", "22.214.171.124"

# Exact deduplication keeps the document of highest priority (16 bits); 65535 - task keeps the
# first in input order across tasks, as one task keeps its first.
_PRIORITY_MAX = 65535
MAX_TASKS = _PRIORITY_MAX - 1

WORK, DATA, REMOVED = "work", "data", "removed"


@dataclass(frozen=True)
class CleanOptions:
    """Everything that decides what `clean` keeps and how it writes it."""

    text_key: str = "text"
    url_key: str = "url"
    block_domains: str = ""
    filters: tuple[str, ...] = ("gopher",)
    filter_params: tuple[tuple[str, str, Any], ...] = ()
    dedup: tuple[str, ...] = DEDUPS
    minhash_ngrams: int = MINHASH_NGRAMS
    minhash_bands: int = MINHASH_BANDS
    minhash_rows: int = MINHASH_ROWS
    pii: bool = False
    nltk_data: str = ""
    output_format: str = "parquet"
    samples: int = 20

    def validate(self) -> None:
        for name in self.filters:
            if name not in FILTERS:
                raise ValueError(f"--filters={','.join(self.filters)!r}: {name!r} is unknown; "
                                 f"allowed: {', '.join(FILTERS)} (comma-separated) or none")
        for name in self.dedup:
            if name not in DEDUPS:
                raise ValueError(f"--dedup={','.join(self.dedup)!r}: {name!r} is unknown; "
                                 f"allowed: {', '.join(DEDUPS)} (comma-separated) or none")
        for name, key, _ in self.filter_params:
            if name not in self.filters:
                raise ValueError(f"--filter-param={name}.{key}: filter {name!r} is not in "
                                 f"--filters; allowed: {', '.join(self.filters) or 'none'}")
            allowed = filter_parameters(name)
            if key not in allowed:
                raise ValueError(f"--filter-param={name}.{key}: {name} has no parameter {key!r}; "
                                 f"allowed: {', '.join(allowed)}")
        for key in ("minhash_ngrams", "minhash_bands", "minhash_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')}={getattr(self, key)}; allowed: >= 1")
        if self.output_format not in FORMATS:
            raise ValueError(f"--output-format={self.output_format!r}; allowed: "
                             f"{', '.join(FORMATS)}")
        if self.samples < 0:
            raise ValueError(f"--samples={self.samples}; allowed: >= 0")
        if not self.text_key:
            raise ValueError("--text-key=''; allowed: a non-empty field name")
        if self.nltk_data:
            punkt = Path(self.nltk_data).expanduser() / "tokenizers" / "punkt_tab" / "english"
            if not punkt.is_dir():
                raise ValueError(
                    f"--nltk-data={self.nltk_data!r} has no tokenizers/punkt_tab/english/; "
                    "allowed: an NLTK data directory holding it (copy it from one made with "
                    "`python -m nltk.downloader punkt_tab` where there is internet)")
        if self.block_domains:
            read_block_list(self.block_domains)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["filter_params"] = [[n, k, v] for n, k, v in self.filter_params]
        d["filters"], d["dedup"] = list(self.filters), list(self.dedup)
        return d


def parse_filter_param(text: str) -> tuple[str, str, Any]:
    """'gopher.min_doc_words=30' -> ('gopher', 'min_doc_words', 30): the value a Python literal."""
    name, dot, rest = text.partition(".")
    key, eq, value = rest.partition("=")
    if not (dot and eq and name and key):
        raise ValueError(f"--filter-param={text!r}; allowed: FILTER.PARAMETER=VALUE, e.g. "
                         "gopher.min_doc_words=30")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise ValueError(f"--filter-param={text!r}: {value!r} is not a Python literal; allowed: "
                         "a number, True/False/None, a quoted string, a tuple or list") from None
    return name, key, parsed


def filter_parameters(name: str) -> list[str]:
    """The thresholds and switches of a filter (those of all its datatrove classes)."""
    return [p for cls in FILTERS[name] for p in inspect.signature(cls.__init__).parameters
            if p not in _OWN_PARAMS]


def read_block_list(path: str) -> list[str]:
    """Domains of a block list: one a line, '#' comments, a leading '*.' or '.' ignored."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--block-domains={path!r} cannot be read ({e})") from None
    domains = []
    for i, line in enumerate(lines):
        d = line.split("#", 1)[0].strip().lower().removeprefix("*.").removeprefix(".")
        if not d:
            continue
        if not re.fullmatch(r"[^\s/:@]+\.[^\s/:@.]+", d):
            raise ValueError(f"--block-domains={path!r} line {i + 1}: {line.strip()!r} is not a "
                             "domain; allowed: one domain a line, e.g. example.com")
        domains.append(d)
    return domains


def removal_probability(similarity: float, *, bands: int, rows: int) -> float:
    """Chance that MinHash LSH pairs two documents of this Jaccard similarity: 1-(1-s^r)^b."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def similarity_at(probability: float, *, bands: int, rows: int) -> float:
    """The Jaccard similarity that LSH pairs with this probability (the S-curve's inverse)."""
    return (1.0 - (1.0 - probability) ** (1.0 / bands)) ** (1.0 / rows)


def minhash_summary(opts: CleanOptions) -> dict[str, Any]:
    b, r = opts.minhash_bands, opts.minhash_rows
    return {"n_grams": opts.minhash_ngrams, "bands": b, "rows": r, "hashes": b * r,
            "similarity_at_50": similarity_at(0.5, bands=b, rows=r),
            "similarity_at_90": similarity_at(0.9, bands=b, rows=r)}


# ---- the plan: inputs, options, task count; every task checks it is the same ----


def make_plan(inputs: Sequence[str], opts: CleanOptions, tasks: int) -> dict[str, Any]:
    """What every task of a clean must agree on (work/plan.json): inputs, files, options, tasks."""
    opts.validate()
    if not 1 <= tasks <= MAX_TASKS:
        raise ValueError(f"tasks={tasks}; allowed: 1 to {MAX_TASKS}")
    files = collect_files(inputs)
    block = Path(opts.block_domains).expanduser() if opts.block_domains else None
    plan = {
        "version": REPORT_VERSION,
        "inputs": list(inputs),
        "files": [str(f) for f in files],
        "sizes": [_size(f) for f in files],
        "tasks": tasks,
        "options": opts.to_json(),
        "block_domains_sha256": hashlib.sha256(block.read_bytes()).hexdigest() if block else "",
    }
    return json.loads(json.dumps(plan))  # as it reads back from disk (tuples become lists)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # skipped, by name, when read


def start(out: Path, plan: dict[str, Any], *, overwrite: bool = False) -> None:
    """Make out ready for plan: new, or an unfinished clean of the same plan (resumed)."""
    if overwrite and out.exists():
        if not (out / CLEAN_PLAN).is_file() and not (out / CLEAN_REPORT).is_file() \
                and any(out.iterdir()):
            raise ValueError(f"--out={str(out)!r} is not a clean output; not overwriting it")
        shutil.rmtree(out)
    if (out / CLEAN_REPORT).is_file():
        raise ValueError(f"--out={str(out)!r} is already cleaned; pass --overwrite to redo it")
    path = out / CLEAN_PLAN
    if path.is_file():
        check_plan(out, plan)
        return
    # work/ alone may be there already: made by another task starting at the same time.
    if out.exists() and (not out.is_dir() or set(os.listdir(out)) - {WORK}):
        raise ValueError(f"--out={str(out)!r} exists and is not empty; pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tasks starting together write the same files. work/stages is for launch/clean.sbatch.
    listing = "".join(f"{stage} {n}\n" for stage, n in stages(options_from_plan(plan),
                                                                plan["tasks"]))
    for name, text in (("stages", listing), ("plan.json", json.dumps(plan, indent=1) + "\n")):
        tmp = path.with_name(f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path.with_name(name))


def load_plan(out: Path) -> dict[str, Any]:
    path = out / CLEAN_PLAN
    if not path.is_file():
        raise ValueError(f"--out={str(out)!r} has no {CLEAN_PLAN}; run --stage filter first")
    return json.loads(path.read_text())


def check_plan(out: Path, plan: dict[str, Any]) -> None:
    found = load_plan(out)
    for key in ("inputs", "options", "tasks", "files", "sizes", "block_domains_sha256"):
        if found.get(key) != plan[key]:
            what = "input files" if key in ("files", "sizes") else key.replace("_", " ")
            raise ValueError(f"--out={str(out)!r} holds an unfinished clean with other {what} "
                             f"(see {out / CLEAN_PLAN}); allowed: the same command, or "
                             "--overwrite (one process) or another --out")


def options_from_plan(plan: dict[str, Any]) -> CleanOptions:
    o = dict(plan["options"])
    o["filters"], o["dedup"] = tuple(o["filters"]), tuple(o["dedup"])
    o["filter_params"] = tuple(tuple(p) for p in o["filter_params"])
    return CleanOptions(**o)


def stages(opts: CleanOptions, tasks: int) -> list[tuple[str, int]]:
    """(stage, number of tasks) in the order they must run."""
    out = [("filter", tasks)]
    if "exact" in opts.dedup:
        out.append(("exact", 1))
    if "minhash" in opts.dedup:
        out += [("minhash-signatures", tasks),
                ("minhash-buckets", min(opts.minhash_bands, tasks)), ("minhash-cluster", 1)]
    return out + [("write", tasks), ("report", 1)]


STAGES = ("filter", "exact", "minhash-signatures", "minhash-buckets", "minhash-cluster", "write",
          "report")


# ---- the word tokenizer of the filters and of MinHash ----


class EnglishWords(WordTokenizer):
    """Words and sentences for datatrove's English filters and MinHash shingles, with nothing to
    download: NLTK's Punkt sentence splitter (untrained, or NLTK's trained English punkt_tab from
    a local directory) and the Treebank words of NLTK's word_tokenize within each sentence.
    (datatrove 0.10 assigns English to spaCy's blank pipeline, about 200 MB more to install.)"""

    def __init__(self, nltk_data: str = "") -> None:
        super().__init__("en")
        self.nltk_data = nltk_data
        self._sentences: Any = None
        self._words: Any = None

    def _load(self) -> None:
        # nltk's import takes about a second: only in the stages that split text.
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTokenizer

        if self.nltk_data:
            import nltk.data

            nltk.data.path.insert(0, str(Path(self.nltk_data).expanduser()))
            self._sentences = PunktTokenizer("english")
        else:
            self._sentences = PunktSentenceTokenizer()
        self._words = NLTKWordTokenizer()

    def word_tokenize(self, text: str) -> list[str]:
        if self._words is None:
            self._load()
        return strip_strings([w for s in self._sentences.tokenize(text)
                              for w in self._words.tokenize(s)])

    def sent_tokenize(self, text: str) -> list[str]:
        if self._sentences is None:
            self._load()
        return strip_strings(self._sentences.tokenize(text))

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        if self._sentences is None:
            self._load()
        return list(self._sentences.span_tokenize(text))


# ---- the steps around datatrove's own ----


class SiteRemoval(BaseFilter):
    """Removes records whose URL's host is a listed domain or a subdomain of one (case-insensitive).
    A datatrove filter that reads hosts with tldextract as datatrove's URLFilter does, whose own
    matching (the registered domain or the whole host, case-sensitive) misses deeper subdomains
    of a listed subdomain and hosts outside the public-suffix list. Records without a URL are
    kept and counted. The public-suffix list is the snapshot inside tldextract: nothing is
    fetched, nothing cached."""

    name = "🚫 Site removal"

    def __init__(self, domains: list[str], account: Account) -> None:
        super().__init__(exclusion_writer=account)
        self.domains = frozenset(domains)
        self.account = account
        self.extract = TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        url = doc.metadata["url"]
        if not url:
            self.account.count("kept_without_url")
            return True
        parts = self.extract(url)
        labels = ".".join(p for p in (parts.subdomain, parts.domain, parts.suffix) if p)
        labels = labels.lower().split(".")
        for i in range(len(labels)):
            if ".".join(labels[i:]) in self.domains:
                site = parts.top_domain_under_public_suffix or ".".join(labels[i:])
                doc.metadata["blocked_domain"] = site.lower()
                return False, "domain" if i == 0 else "subdomain"
        return True


class PIIReplacement(PIIFormatter):
    """datatrove's PII formatter (e-mail addresses, public IP addresses), counting what it
    replaces."""

    def __init__(self, account: Account) -> None:
        super().__init__(email_replacement=EMAIL_REPLACEMENT, ip_replacement=IP_REPLACEMENT)
        self.account = account

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        with self.account:
            yield from super().run(data, rank, world_size)

    def format(self, text: str) -> str:
        emails = len(self.emails_replacer.regex.findall(text))
        out = self.emails_replacer.replace(text)
        ips = sum(map(self.ip_replacer.validator, self.ip_replacer.regex.findall(out)))
        out = self.ip_replacer.replace(out)
        if out != text:
            self.account.count("documents")
            self.account.count("emails", emails)
            self.account.count("ips", ips)
        return out


def normalized_text(doc: Document) -> str:
    return simplify_text(doc.text, EXACT_NORM)


def input_order_priority(doc: Document) -> int:
    return _PRIORITY_MAX - doc.metadata["task"]


# ---- stages ----


class Layout:
    """Where the parts of a clean output are: data/ and removed/ for the user, work/ for the
    stages (the filtered records, dedup signatures, datatrove's logs, each task's accounts)."""

    def __init__(self, out: Path) -> None:
        self.out, self.work = out, out / WORK
        self.data = out / DATA
        self.filtered = self.work / "filtered"
        self.exact_signatures = self.work / "exact" / "signatures"
        self.exact_duplicates = self.work / "exact" / "duplicates"
        self.minhash_signatures = self.work / "minhash" / "signatures"
        self.minhash_buckets = self.work / "minhash" / "buckets"
        self.minhash_remove = self.work / "minhash" / "remove"
        self.accounts = self.work / "accounts"
        self.logs = self.work / "logs"


def _exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=normalized_text, document_priority=input_order_priority)


def _minhash_config(opts: CleanOptions) -> MinhashConfig:
    return MinhashConfig(n_grams=opts.minhash_ngrams, num_buckets=opts.minhash_bands,
                         hashes_per_bucket=opts.minhash_rows, seed=MINHASH_SEED)


def _filters(opts: CleanOptions, words: EnglishWords, folder: Path, rank: int) -> list:
    steps = []
    for name in opts.filters:
        params = {k: v for n, k, v in opts.filter_params if n == name}
        for cls in FILTERS[name]:
            own = inspect.signature(cls.__init__).parameters
            step = _step_name(cls)
            kwargs = {k: v for k, v in params.items() if k in own}
            steps.append(cls(exclusion_writer=Account(folder, step, rank, samples=opts.samples),
                             language=words, **kwargs))
    return steps


def _step_name(cls: type) -> str:
    return {GopherRepetitionFilter: "gopher_repetition", GopherQualityFilter: "gopher_quality",
            C4QualityFilter: "c4", FineWebQualityFilter: "fineweb"}[cls]


def _pipeline(stage: str, rank: int, plan: dict[str, Any], where: Layout) -> list:
    opts = options_from_plan(plan)
    acc = where.accounts

    def account(step: str) -> Account:
        return Account(acc, step, rank, samples=opts.samples)

    exact, minhash = "exact" in opts.dedup, "minhash" in opts.dedup
    if stage == "filter":
        steps: list = [InputReader(plan, opts, account("input"))]
        if opts.block_domains:
            steps.append(SiteRemoval(read_block_list(opts.block_domains), account("site")))
        if opts.filters:
            steps += _filters(opts, EnglishWords(opts.nltk_data), acc, rank)
        steps.append(RecordWriter(where.filtered, opts, account("filtered"), keep_source=True))
        if exact:
            steps.append(ExactDedupSignature(str(where.exact_signatures), _exact_config()))
        return steps
    if stage == "exact":
        where.exact_duplicates.mkdir(parents=True, exist_ok=True)
        return [ExactFindDedups(str(where.exact_signatures), str(where.exact_duplicates),
                                _exact_config())]
    if stage == "minhash-signatures":
        steps = [ShardReader(where.filtered, opts)]
        if exact:
            steps.append(ExactDedupFilter(str(where.exact_duplicates), _exact_config()))
        return steps + [MinhashDedupSignature(str(where.minhash_signatures), _minhash_config(opts),
                                              language=EnglishWords(opts.nltk_data))]
    if stage == "minhash-buckets":
        return [MinhashDedupBuckets(str(where.minhash_signatures), str(where.minhash_buckets),
                                    config=_minhash_config(opts))]
    if stage == "minhash-cluster":
        where.minhash_remove.mkdir(parents=True, exist_ok=True)
        return [MinhashDedupCluster(str(where.minhash_buckets), str(where.minhash_remove),
                                    config=_minhash_config(opts))]
    assert stage == "write", stage
    steps = [ShardReader(where.filtered, opts)]
    if exact:
        steps.append(ExactDedupFilter(str(where.exact_duplicates), _exact_config(),
                                      exclusion_writer=account("exact")))
    if minhash:
        steps.append(MinhashDedupFilter(str(where.minhash_remove),
                                        exclusion_writer=account("minhash")))
    if opts.pii:
        steps.append(PIIReplacement(account("pii")))
    return steps + [RecordWriter(where.data, opts, account("output"), keep_source=False)]


class _Tasks(LocalPipelineExecutor):
    """datatrove's local executor for the ranks [local_rank_offset, + local_tasks) of `tasks`, one
    after another in this process: each rank is skipped when marked complete, else run, its
    stats saved and marked complete. Without the executor's multiprocess Manager (forking a
    process whose torch threads run can deadlock)."""

    def run(self) -> None:
        pipeline = self.pipeline
        for rank in range(self.local_rank_offset, self.local_rank_offset + self.local_tasks):
            self.pipeline = deepcopy(pipeline)
            self._run_for_rank(rank)


def run_stage(out: Path, stage: str, task: int, num_tasks: int, *, verbose: bool = False
              ) -> dict[str, Any] | None:
    """Task `task` of the `num_tasks` of a stage (a SLURM array task); the report stage returns
    the report. datatrove's log goes to work/logs/<stage>/logs/ (and stderr if verbose)."""
    plan = load_plan(out)
    if (out / CLEAN_REPORT).is_file():
        raise ValueError(f"--out={str(out)!r} is already cleaned; pass --overwrite to redo it")
    opts = options_from_plan(plan)
    expected = dict(stages(opts, plan["tasks"]))
    if stage not in expected:
        raise ValueError(f"--stage={stage!r}; allowed with these options: {', '.join(expected)}")
    if num_tasks != expected[stage] or not 0 <= task < num_tasks:
        raise ValueError(f"--stage={stage} --task={task}/{num_tasks}; allowed: I/{expected[stage]}"
                         f" with 0 <= I < {expected[stage]}")
    where = Layout(out)
    if stage == "report":
        return write_report(out, plan)
    if stage == "minhash-buckets":
        # datatrove wants one rank per band; task I of M runs a contiguous share of them.
        ranks = opts.minhash_bands
        lo, hi = task * ranks // num_tasks, (task + 1) * ranks // num_tasks
    else:
        ranks, lo, hi = num_tasks, task, task + 1
    executor = _Tasks(_pipeline(stage, task, plan, where), tasks=ranks, workers=1,
                      logging_dir=str(where.logs / stage), local_tasks=hi - lo,
                      local_rank_offset=lo)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            executor.run()
    finally:
        setup_default_logger()  # datatrove's logger back on the real stderr
    return None


def unfinished(out: Path, plan: dict[str, Any], upto: str) -> list[str]:
    """'stage task I' for each task before stage `upto` that is not marked complete."""
    opts, missing = options_from_plan(plan), []
    for stage, n in stages(opts, plan["tasks"]):
        if stage == upto:
            break
        ranks = opts.minhash_bands if stage == "minhash-buckets" else n
        done = Layout(out).logs / stage / "completions"
        missing += [f"{stage} task {r}" for r in range(ranks) if not (done / f"{r:05d}").is_file()]
    return missing


def clean(inputs: Sequence[str], out: Path, opts: CleanOptions, *, overwrite: bool = False,
          verbose: bool = False) -> dict[str, Any]:
    """Every stage in this process (one task each); resumes an unfinished clean of the same
    command in out. Returns the report."""
    out = out.expanduser()
    start(out, make_plan(inputs, opts, 1), overwrite=overwrite)
    report = None
    for stage, n in stages(opts, 1):
        for task in range(n):
            report = run_stage(out, stage, task, n, verbose=verbose)
    assert report is not None
    return report


# ---- the report ----


def _load_account(where: Layout, step: str, rank: int) -> dict[str, Any] | None:
    path = where.accounts / f"{step}-{rank:05d}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _step_names(opts: CleanOptions) -> list[str]:
    names = ["site"] if opts.block_domains else []
    names += [_step_name(cls) for f in opts.filters for cls in FILTERS[f]]
    return names + [d for d in DEDUPS if d in opts.dedup]


def write_report(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Sum every task's accounts into OUT/clean_report.json (written last) and OUT/removed/,
    then delete the intermediate files of work/ (its logs and accounts stay)."""
    missing = unfinished(out, plan, "report")
    if missing:
        raise ValueError(f"--out={str(out)!r}: not finished: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}; rerun those tasks")
    opts, where, tasks = options_from_plan(plan), Layout(out), plan["tasks"]

    def accounts(step: str) -> list[dict[str, Any]]:
        found = [_load_account(where, step, r) for r in range(tasks)]
        return [a for a in found if a is not None]

    inputs = accounts("input")
    report: dict[str, Any] = {
        "version": REPORT_VERSION, "inputs": plan["inputs"], "tasks": tasks,
        "options": plan["options"], "block_domains_sha256": plan["block_domains_sha256"],
        "in": {"files": len(plan["files"]), "documents": sum(a["documents"] for a in inputs),
               "bytes": sum(a["bytes"] for a in inputs),
               "skipped": [s for a in inputs for s in a["skipped"]]},
        "steps": [],
    }
    if "minhash" in opts.dedup:
        report["minhash"] = minhash_summary(opts)
    samples_dir = out / REMOVED
    samples_dir.mkdir(exist_ok=True)
    for step in _step_names(opts):
        accts = accounts(step)
        reasons, domains, counts = Counter(), Counter(), Counter()
        for a in accts:
            reasons.update(a["reasons"])
            domains.update(a["domains"])
            counts.update(a["counts"])
        entry = {"step": step, "documents": sum(a["documents"] for a in accts),
                 "bytes": sum(a["bytes"] for a in accts), "reasons": dict(reasons.most_common())}
        if step == "site":
            entry["top_domains"] = domains.most_common(10)
            entry["kept_without_url"] = counts["kept_without_url"]
        samples = [s for a in accts for s in a["samples"]][: opts.samples]
        sample_file = samples_dir / f"{step}.jsonl"
        sample_file.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        entry["samples"] = f"{REMOVED}/{sample_file.name}"
        report["steps"].append(entry)
    if opts.pii:
        counts = Counter()
        for a in accounts("pii"):
            counts.update(a["counts"])
        report["pii"] = {k: counts[k] for k in ("documents", "emails", "ips")}
    outputs = accounts("output")
    report["out"] = {"documents": sum(a["documents"] for a in outputs),
                     "bytes": sum(a["bytes"] for a in outputs), "format": opts.output_format}
    report["shards"] = [{"file": f"{DATA}/{s['file']}", "documents": s["documents"]}
                        for a in outputs for s in a["shards"]]
    tmp = out / f".{CLEAN_REPORT}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out / CLEAN_REPORT)
    for folder in ("filtered", "exact", "minhash"):
        shutil.rmtree(where.work / folder, ignore_errors=True)
    return report


STEP_TITLES = {"site": "site removal", "gopher_repetition": "gopher repetition filter",
               "gopher_quality": "gopher quality filter", "c4": "c4 quality filter",
               "fineweb": "fineweb quality filter", "exact": "exact duplicates",
               "minhash": "near duplicates (minhash)"}


def format_report(report: dict[str, Any], out: Path) -> str:
    """The printed account: in, each step's removals and why, out."""
    total_docs = max(report["in"]["documents"], 1)

    def row(what: str, docs: int, num_bytes: int, detail: str = "") -> str:
        return (f"| {what} | {docs:,} | {docs / total_docs:.1%} | {_human(num_bytes)} | "
                f"{detail} |")

    skipped = report["in"]["skipped"]
    lines = [f"{out}: cleaned {report['in']['files']:,} files in {report['tasks']} task(s)",
             "| step | documents | of input | text | detail |", "| --- | --- | --- | --- | --- |",
             row("in", report["in"]["documents"], report["in"]["bytes"],
                 f"{len(skipped)} file{'s' * (len(skipped) != 1)} skipped" if skipped else "")]
    for s in report["steps"]:
        detail = ", ".join(f"{k} {v:,}" for k, v in list(s["reasons"].items())[:6])
        if s["step"] == "site":
            detail = ", ".join([f"{d} {n:,}" for d, n in s["top_domains"][:5]]
                               + [f"kept without a URL: {s['kept_without_url']:,}"])
        if s["step"] == "minhash":
            m = report["minhash"]
            detail = (f"{m['n_grams']}-grams, {m['bands']} bands x {m['rows']} rows: pairs of "
                      f"Jaccard {m['similarity_at_50']:.2f} removed at 50%, "
                      f"{m['similarity_at_90']:.2f} at 90%")
        lines.append(row(f"- {STEP_TITLES[s['step']]}", s["documents"], s["bytes"], detail))
    lines.append(row("out", report["out"]["documents"], report["out"]["bytes"],
                     f"{len(report['shards'])} {report['out']['format']} shards in {out / DATA}"))
    if "pii" in report:
        p = report["pii"]
        lines.append(f"pii: {p['emails']:,} e-mail addresses and {p['ips']:,} IP addresses "
                     f"replaced in {p['documents']:,} documents")
    lines.append(f"samples of removed documents: {out / REMOVED}/<step>.jsonl; "
                 f"report: {out / CLEAN_REPORT}")
    return "\n".join(lines)


def _human(num_bytes: int) -> str:
    if num_bytes < 1000:
        return f"{num_bytes} B"
    exp = min(int(math.log10(num_bytes) // 3), 4)
    return f"{num_bytes / 1000 ** exp:.1f} {'BkMGT'[exp]}B"
