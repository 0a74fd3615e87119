"""Benchmarks through lm-evaluation-harness (§2.3): our LM against lm-eval's own Hugging Face
backend on the `convert to-hf` export, KV-cache generation against uncached, 2 processes against
1, offline errors, and the Table 3 report. Tasks and data: tests/eval_tasks (tiny, local)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from llamatrain import convert
from llamatrain.checkpoint.dcp import save_model_weights
from llamatrain.config import Config, DataConfig, ModelConfig, TrainConfig, to_toml
from llamatrain.data.datasets import load_dataset
from llamatrain.data.tokenizer import load_tokenizer
from llamatrain.evaluate import (
    TABLE3,
    LlamaLM,
    Suite,
    SuiteTask,
    length_batches,
    load_checkpoint,
    report_markdown,
    resolve_tasks,
    summarize,
)
from llamatrain.inference import Sampling, generate
from llamatrain.model import Transformer

TASKS = str(REPO / "tests/eval_tasks")
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, multiple_of=32,
                  max_seq_len=128)


@pytest.fixture(scope="module")
def run_dir(prepared_data, tmp_path_factory) -> Path:
    """A run directory (config.toml, tokenizer.model, checkpoints/step-60) of a tiny model trained
    in-process for 60 steps: sure enough of its next tokens that greedy choices are not ties."""
    torch.manual_seed(0)
    data = load_dataset(prepared_data, DataConfig(), seq_len=64)
    model = Transformer(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        batch = data.get_batch([(step * 8 + i) % len(data) for i in range(8)])
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.0
    run = tmp_path_factory.mktemp("evalrun")
    (run / "config.toml").write_text(to_toml(Config(model=CFG, train=TrainConfig(seq_len=64))))
    (run / "tokenizer.model").write_bytes((prepared_data / "tokenizer.model").read_bytes())
    save_model_weights({k: v.detach() for k, v in model.state_dict().items()},
                       run / "checkpoints/step-60")
    return run


@pytest.fixture(scope="module")
def ours(run_dir):
    model, tok = load_checkpoint(run_dir / "checkpoints/step-60", device=torch.device("cpu"),
                                 dtype=torch.float32)
    return LlamaLM(model, tok, batch_tokens=512)


@pytest.fixture(scope="module")
def suite(monkeypatch_module):
    monkeypatch_module.chdir(REPO)  # the tasks' data_files are relative to the repository
    return Suite(resolve_tasks("tiny_mc,tiny_gen"), include_path=TASKS)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _instance(kind: str, args: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihoods_and_scores_equal_lm_evals_hf_backend_on_the_export(
        run_dir, ours, suite, tmp_path):
    from lm_eval.models.huggingface import HFLM

    state_dict, cfg = convert.checkpoint_to_state_dict(run_dir / "checkpoints/step-60")
    convert.save_hf(state_dict, cfg, tmp_path, dtype=torch.float32,
                    tokenizer=load_tokenizer(run_dir / "tokenizer.model"))
    hflm = HFLM(pretrained=str(tmp_path), device="cpu", batch_size=4, dtype="float32")

    long_context = "    def step(self, batch):\n" * 30  # over max_length: cut on the left
    requests = [_instance("loglikelihood", pair) for pair in [
        ("import data", " = 42"), ("", "class model:"), ("return self. ", "value"),
        ("x = 1\n", "print(x)"), (long_context, "    return loss"), ("for i in", " range(10)")]]
    theirs, mine = hflm.loglikelihood(requests), ours.loglikelihood(requests)
    for (lp_h, greedy_h), (lp_o, greedy_o) in zip(theirs, mine, strict=True):
        assert abs(lp_h - lp_o) < 1e-4 and greedy_h == greedy_o
    assert min(lp for lp, _ in mine) < -5  # real numbers, not zeros

    results = {name: suite.run(lm, log_samples=True) for name, lm in (("hf", hflm), ("ours", ours))}
    for task in ("tiny_mc", "tiny_gen"):
        h, o = results["hf"]["results"][task], results["ours"]["results"][task]
        assert {k: v for k, v in h.items() if "stderr" not in k} == \
            {k: v for k, v in o.items() if "stderr" not in k}
        for sh, so in zip(results["hf"]["samples"][task], results["ours"]["samples"][task],
                          strict=True):
            if task == "tiny_gen":
                assert sh["resps"] == so["resps"]
            else:
                for (a, _), (b, _) in ((x[0], y[0]) for x, y in zip(sh["resps"], so["resps"],
                                                                   strict=True)):
                    assert abs(a - b) < 1e-4
    generated = [s["resps"][0][0] for s in results["ours"]["samples"]["tiny_gen"]]
    assert any(generated) and all("\n" not in g and "return" not in g for g in generated)

    # Rolling log-likelihoods: HFLM's tokenizer call would add a second BOS after the window's
    # prefix BOS; without it, lm-eval's own windows give our numbers.
    hflm = HFLM(pretrained=str(tmp_path), device="cpu", batch_size=4, dtype="float32",
                add_bos_token=False)
    docs = [_instance("loglikelihood_rolling", (text,)) for text in (
        "def train(self, batch):\n    return self.loss(batch)\n" * 6, "x = 1")]
    for h, o in zip(hflm.loglikelihood_rolling(docs), ours.loglikelihood_rolling(docs),
                    strict=True):
        assert abs(h - o) < 1e-3


def test_loglikelihood_rolling_is_the_sum_over_the_document_after_bos(ours):
    text = "def train(self, batch):\n    return self.loss(batch)\n" * 6
    ids, n = ours.tok.encode(text), ours.max_length
    assert n < len(ids) <= 2 * n  # two windows
    (total,) = ours.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])

    def logprob(context: list[int], targets: list[int]) -> float:
        with torch.no_grad():
            lp = ours.model(torch.tensor([context])).log_softmax(-1)[0, -len(targets):]
        return lp.gather(-1, torch.tensor(targets)[:, None]).sum().item()

    # The first n tokens after BOS, then the rest with a full window of context before each.
    expected = logprob([ours.tok.bos_id, *ids[: n - 1]], ids[:n])
    expected += logprob(ids[len(ids) - n - 1 : -1], ids[n:])
    assert abs(total - expected) < 1e-3


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.9, top_k=40, top_p=0.9,
                                                           seed=3)])
def test_kv_cache_generation_equals_generation_without_it(ours, sampling):
    prompts = [ours.tok_encode(t) for t in ("def", "class model:\n    ", "x = 12\nfor i in")]
    stop = lambda toks: "return" in ours.tok.decode(toks)  # noqa: E731
    cached = generate(ours.model, prompts, max_new_tokens=24, eos_id=2, sampling=sampling,
                      stop=stop)
    uncached = generate(ours.model, prompts, max_new_tokens=24, eos_id=2, sampling=sampling,
                        stop=stop, use_cache=False)
    assert cached == uncached
    assert sum(map(len, cached)) > 24  # rows really generated
    one_by_one = [generate(ours.model, [p], max_new_tokens=24, eos_id=2, sampling=sampling,
                           stop=stop)[0] for p in prompts]
    if sampling.temperature == 0:  # batching changes nothing (draws are per batch when sampling)
        assert one_by_one == cached


def _cli(*args, nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    prefix = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([*prefix, "-m", "llamatrain.evaluate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def test_two_sharded_processes_give_the_results_of_one(run_dir, tmp_path):
    step = run_dir / "checkpoints/step-60"
    common = ["--tasks", "tiny_mc,tiny_gen", "--include-path", TASKS, "--batch-tokens", "300"]
    one = _cli(step, *common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(step, *common, "--out", tmp_path / "two", "--fsdp", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one/results.json").read_text())[str(step)]
    r2 = json.loads((tmp_path / "two/results.json").read_text())[str(step)]
    assert r1["scores"] == r2["scores"] and r1["results"] == r2["results"]
    assert r1["n-samples"]["tiny_mc"]["effective"] == 12
    report = (tmp_path / "two/report.md").read_text()
    assert f"| {step} | {r1['scores']['tiny_mc']:.1f} | {r1['scores']['tiny_gen']:.1f} |" in report


def test_a_missing_dataset_is_one_line_naming_the_task_and_the_fix(run_dir, tmp_path):
    (tmp_path / "hub.yaml").write_text(
        "task: hub_only\ndataset_path: llamatrain-tests/not-downloaded\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    proc = _cli(run_dir / "checkpoints/step-60", "--tasks", "hub_only", "--include-path",
                tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: task 'hub_only': dataset not available here (Couldn't reach "
                           "'llamatrain-tests/not-downloaded' on the Hub (OfflineModeIsEnabled))")
    assert line.endswith(f"`python -m llamatrain.evaluate --download --tasks hub_only` and copy "
                         f"{tmp_path / 'hf'} to this machine's HF_HOME, or point the task's YAML "
                         "(--include-path) at local files")


def test_a_task_needing_a_missing_package_is_one_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    text = (REPO / "tests/eval_tasks/tiny_mc.yaml").read_text()
    (tmp_path / "needs.yaml").write_text(text.replace("task: tiny_mc", "task: tiny_needs") +
                                         "process_results: !function helper.process\n")
    (tmp_path / "helper.py").write_text("import llamatrain_no_such_package\n")
    with pytest.raises(ValueError, match="task 'tiny_needs' needs a package that is not "
                                         "installed \\(No module named "
                                         "'llamatrain_no_such_package'\\); install it"):
        Suite([SuiteTask("tiny_needs")], include_path=str(tmp_path))


def test_code_tasks_run_only_when_confirmed(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    text = (REPO / "tests/eval_tasks/tiny_mc.yaml").read_text()
    (tmp_path / "unsafe.yaml").write_text(text.replace("task: tiny_mc", "task: tiny_code") +
                                          "unsafe_code: true\n")
    with pytest.raises(ValueError, match="task 'tiny_code' executes model-written code: pass "
                                         "--confirm-run-unsafe-code"):
        Suite([SuiteTask("tiny_code")], include_path=str(tmp_path))
    said = []
    tasks = [SuiteTask("tiny_code", "code"), SuiteTask("tiny_mc", "commonsense")]
    (tmp_path / "mc.yaml").write_text(text)
    suite = Suite(tasks, include_path=str(tmp_path), log=said.append)
    assert [t.task for t in suite.tasks] == ["tiny_mc"]
    assert said == ["tiny_code: skipped, it executes model-written code (pass "
                    "--confirm-run-unsafe-code to run it)"]
    confirmed = Suite(tasks, include_path=str(tmp_path), confirm_run_unsafe_code=True)
    assert [t.task for t in confirmed.tasks] == ["tiny_code", "tiny_mc"]


def test_table3_suite_names_exist_in_lm_eval():
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    assert [t.task for t in TABLE3 if t.task not in known] == ["quac"]


def test_table3_categories_average_their_tasks_as_the_paper_defines_them():
    tasks = resolve_tasks("table3")
    assert {t.task: t.num_fewshot for t in tasks if t.num_fewshot} == {
        "mbpp": 3, "commonsense_qa": 7, "nq_open": 5, "triviaqa": 5, "gsm8k": 8,
        "minerva_math": 4, "mmlu": 5, "bbh_fewshot": 3, "agieval_en": 3}
    assert [t.task for t in resolve_tasks("reading,boolq")] == ["squadv2", "quac", "boolq"]
    results = {
        "results": {
            "piqa": {"acc,none": 0.5, "acc_norm,none": 0.78}, "social_iqa": {"acc,none": 0.48},
            "hellaswag": {"acc_norm,none": 0.77}, "winogrande": {"acc,none": 0.69},
            "arc_easy": {"acc_norm,none": 0.75}, "arc_challenge": {"acc_norm,none": 0.46},
            "openbookqa": {"acc_norm,none": 0.58}, "commonsense_qa": {"acc,none": 0.57},
            "squadv2": {"exact,none": 0.6, "f1,none": 0.7}, "boolq": {"acc,none": 0.8},
            "gsm8k": {"exact_match,strict-match": 0.14, "exact_match,flexible-extract": 0.9},
            "minerva_math_algebra": {"exact_match,none": 0.04},
            "minerva_math_geometry": {"exact_match,none": 0.02},
            "mmlu": {"acc,none": 0.453, "acc_stderr,none": 0.01},
        },
        "group_subtasks": {"minerva_math": ["minerva_math_algebra", "minerva_math_geometry"]},
    }
    scores = summarize(results, tasks)
    assert scores["Commonsense Reasoning"] == pytest.approx(
        100 * (0.78 + 0.48 + 0.77 + 0.69 + 0.75 + 0.46 + 0.58 + 0.57) / 8)
    assert scores["Reading Comprehension"] == pytest.approx(70.0)  # SQuAD EM and BoolQ
    assert scores["Math"] == pytest.approx((14 + 3) / 2)  # MATH: the mean of its subtasks
    assert scores["MMLU"] == pytest.approx(45.3)
    assert "Code" not in scores and "World Knowledge" not in scores
    report = report_markdown([("step-100", scores), ("step-200", scores)], tasks)
    header, rule, row = report.splitlines()[:3]
    assert header == ("| checkpoint | Commonsense Reasoning | Reading Comprehension | Math | "
                      "MMLU |")
    assert row == "| step-100 | 63.5 | 70.0 | 8.5 | 45.3 |"
    assert "| piqa (0-shot) |" in report and "| commonsense_qa (7-shot) |" in report


def test_length_batches_keep_the_token_budget_and_every_index():
    lengths = [5, 17, 3, 17, 9, 1, 40]
    batches = length_batches(lengths, max_tokens=36)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [6]  # longer than the budget: alone
    assert all(len(b) * lengths[b[0]] <= 36 for b in batches[1:])
    assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in batches)


def test_a_run_benchmarks_its_live_sharded_model_every_interval(prepared_data, tmp_path,
                                                                monkeypatch):
    from conftest import run_train, tiny_args

    from llamatrain.metrics import read_metrics

    run = tmp_path / "run"
    proc = run_train(tiny_args(prepared_data, run, **{
        "eval.tasks": "tiny_mc,tiny_gen", "eval.interval": 6, "eval.limit": 4,
        "eval.include_path": TASKS}), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "eval/tiny_mc" in r}
    assert sorted(records) == [6, 12]
    assert "step 12: benchmarks tiny_mc" in proc.stdout
    report = (run / "report.md").read_text()
    assert "## Benchmarks (§2.3, Table 3)" in report
    assert f"| step 12 | {records[12]['eval/tiny_mc']:.1f} | {records[12]['eval/tiny_gen']:.1f} |" \
        in report
    # The live, sharded model scored what its checkpoint scores in one process.
    monkeypatch.chdir(REPO)
    model, tok = load_checkpoint(run / "checkpoints/step-12", device=torch.device("cpu"),
                                 dtype=torch.float32)
    tasks = resolve_tasks("tiny_mc,tiny_gen")
    offline = summarize(Suite(tasks, include_path=TASKS).run(LlamaLM(model, tok), limit=4), tasks)
    assert offline == {k.removeprefix("eval/"): v for k, v in records[12].items()
                       if k.startswith("eval/")}


def test_an_unknown_eval_task_stops_the_run_before_it_trains(run_dir):
    from llamatrain.config import EvalConfig
    from llamatrain.evaluate import TrainingBenchmarks

    tok = load_tokenizer(run_dir / "tokenizer.model")
    with pytest.raises(ValueError) as e:
        TrainingBenchmarks(EvalConfig(tasks="no_such_task", include_path=TASKS), tok)
    assert str(e.value) == ("eval.tasks = 'no_such_task': task 'no_such_task': not an lm-eval "
                            f"task or group (nor in --include-path {TASKS})")


def test_hf_meta_and_converted_directories_load_the_same_model(run_dir, ours, tmp_path):
    from llamatrain.evaluate import expand_checkpoints

    state_dict, cfg = convert.checkpoint_to_state_dict(run_dir / "checkpoints/step-60")
    tok = load_tokenizer(run_dir / "tokenizer.model")
    convert.save_hf(state_dict, cfg, tmp_path / "hf", dtype=torch.float32, tokenizer=tok)
    convert.save_meta(state_dict, cfg, tmp_path / "meta/7B", num_shards=2, dtype=torch.float32)
    tok.save(tmp_path / "meta/tokenizer.model")  # Meta's layout: the tokenizer one level up
    assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "init")]) == 0
    expected = ours.model.state_dict()
    for name in ("hf", "meta/7B", "init"):
        model, loaded_tok = load_checkpoint(tmp_path / name, device=torch.device("cpu"),
                                            dtype=torch.float32)
        assert loaded_tok.sha256 == tok.sha256, name
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), name
    # A run directory stands for all of its checkpoints, oldest first.
    shutil.copytree(run_dir / "checkpoints/step-60", run_dir / "checkpoints/step-7")
    try:
        assert expand_checkpoints([str(run_dir)]) == [run_dir / "checkpoints/step-7",
                                                      run_dir / "checkpoints/step-60"]
    finally:
        shutil.rmtree(run_dir / "checkpoints/step-7")
    with pytest.raises(ValueError, match="expected RUN_DIR/checkpoints/step-N, a run directory"):
        expand_checkpoints([str(tmp_path)])


def test_a_checkpoint_without_checksums_loads_only_with_no_verify(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    step = run / "checkpoints/step-60"
    (step / "trainer.json").unlink()
    with pytest.raises(ValueError, match=r"^checkpoint = '.*step-60': it has no trainer.json, so "
                       r"its files cannot be verified .* pass --no-verify$"):
        load_checkpoint(step, device=torch.device("cpu"), dtype=torch.float32)
    model, _ = load_checkpoint(step, device=torch.device("cpu"), dtype=torch.float32,
                               verify=False)
    assert "WARNING: checkpoint = " in capsys.readouterr().err
    assert model.cfg == CFG


def test_a_model_toml_with_zero_heads_is_one_line(run_dir, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(run_dir / "checkpoints/step-60", init)
    (init / "model.toml").write_text(convert._model_toml(CFG).replace("n_heads = 4",
                                                                      "n_heads = 0"))
    with pytest.raises(ValueError, match=rf"^'{init / 'model.toml'}': model.n_heads = 0: "
                       r"expected an integer from 1 to 1,024 \(config.MODEL_LIMITS\)$"):
        load_checkpoint(init, device=torch.device("cpu"), dtype=torch.float32)
