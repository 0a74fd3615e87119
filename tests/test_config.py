"""Config loading: TOML + overrides, and one clear line for every mistake."""

import glob
import subprocess
import sys

import pytest

from llamatrain.config import Config, load_config, reference_markdown, split_cli, to_toml


def test_overrides_apply_on_top_of_the_file_with_or_without_dashes():
    cfg = load_config("configs/tiny.toml", ["--train.steps=50", "model.dim=128",
                                            "--run.dir=/tmp/x", "--checkpoint.async=true"])
    assert (cfg.train.steps, cfg.model.dim, cfg.run.dir) == (50, 128, "/tmp/x")
    assert cfg.checkpoint.async_save is True
    assert cfg.model.n_layers == 4  # from the file


def test_ints_are_accepted_for_floats_and_strings_need_no_quotes():
    cfg = load_config("configs/tiny.toml", ["--train.lr=1", "--data.source=/some/dir"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.source == "/some/dir"


def test_resolved_toml_loads_back_to_the_same_config(tmp_path):
    cfg = load_config("configs/llama2_70b.toml", ["--train.steps=10", "--train.warmup_steps=2"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--trian.steps=3", "unknown section [trian]; did you mean 'train'?"),
        ("--train.stpes=3", "unknown key train.stpes; did you mean 'steps'?"),
        ("--train.steps=ten", "train.steps = 'ten': expected an integer"),
        ("--train.lr=fast", "train.lr = 'fast': expected a number"),
        ("--parallel.compile=3", "parallel.compile = 3: expected true or false"),
        ("--model.n_kv_heads=3", "model.n_kv_heads = 3: must divide model.n_heads = 8"),
        ("--model.dim=100", "model.dim = 100: must be divisible by model.n_heads = 8"),
        ("--train.lr=-0.1", "train.lr = -0.1: expected a number > 0"),
        ("--train.steps=0", "train.steps = 0: expected a number > 0"),
        ("--train.warmup_steps=300", "train.warmup_steps = 300: must be shorter than"),
        ("--kernels.backend=cuda", "kernels.backend = 'cuda': expected one of auto, triton, torch"),
        ("--kernels.attention_backward=fast",
         "kernels.attention_backward = 'fast': expected one of atomic, deterministic"),
        ("--train.dtype=fp8", "train.dtype = 'fp8': expected one of auto, bf16, fp32"),
        ("--train.float8=fp8",
         "train.float8 = 'fp8': expected one of none, tensorwise, rowwise"),
        ("--train.seq_len=1024", "train.seq_len = 1024: exceeds model.max_seq_len = 256"),
        ("--parallel.dp_shard=0", "parallel.dp_shard = 0: expected -1"),
        ("train.steps", "override 'train.steps': expected section.key=value"),
        ('--data.mix=[{source="/a", weight="heavy"}]',
         "data.mix[0].weight = 'heavy': expected a number"),
        ('--data.mix=[{source="/a"}, {sorce="/b"}]',
         "unknown key data.mix[1].sorce; did you mean 'source'? (allowed: source, weight, name)"),
        ("--data.mix=[{weight=1}]", "data.mix[0].source: required"),
        ('--data.mix=[{source="/a", weight=0}]', "data.mix[0].weight = 0.0: expected a number > 0"),
        ("--data.mix=3", "data.mix = 3: expected an array of tables ([[data.mix]])"),
        ("--data.prefetch=-1", "data.prefetch = -1: expected a number >= 0"),
        ('--data.mix=[{source="/a", weight=1e308}, {source="/b", weight=1e308}]',
         "data.mix weights = 1e+308, 1e+308: their sum is not a finite number; weights are "
         "relative: scale them down (e.g. 1 and 1)"),
        ("--model.n_heads=0", "model.n_heads = 0: expected an integer from 1 to 1,024"),
        ("--model.vocab_size=1000000000000",
         "model.vocab_size = 1000000000000: expected an integer from 1 to 1,048,576 "
         "(config.MODEL_LIMITS)"),
        ("--model.ffn_dim_multiplier=1e6", "model.ffn_dim_multiplier = 1000000.0: gives an FFN "
         "hidden size of 682,000,000, above 1,048,576"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ValueError) as err:
        load_config("configs/tiny.toml", [override])
    assert message in str(err.value)


def test_missing_file_names_the_path():
    with pytest.raises(ValueError, match="config file 'configs/nope.toml' not found"):
        load_config("configs/nope.toml")


def test_unknown_key_in_the_file_is_reported(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\ndimm = 3\n")
    with pytest.raises(ValueError, match="unknown key model.dimm; did you mean 'dim'"):
        load_config(path)


def test_split_cli_reads_config_and_overrides_in_both_spellings():
    assert split_cli(["--config", "a.toml", "--train.steps=3", "--run.dir", "d"]) == (
        "a.toml", ["--train.steps=3", "--run.dir=d"])
    with pytest.raises(ValueError, match="expected --config PATH"):
        split_cli(["oops"])


def test_cli_prints_one_line_and_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llamatrain.train", "--config", "configs/tiny.toml",
         "--model.n_kv_heads=3", f"--run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model.n_kv_heads = 3: must divide model.n_heads = 8"]


def test_readme_configuration_reference_matches_the_dataclasses():
    with open("README.md") as f:
        readme = f.read()
    assert reference_markdown() in readme, "regenerate: python -m llamatrain.config --markdown"


def test_defaults_are_valid():
    assert load_config(None) == Config()


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.toml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.dim % cfg.model.n_heads == 0


def test_sft_config_carries_section_3_1():
    cfg = load_config("configs/llama2_7b_sft.toml")
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.epochs) == (2e-5, 0.1, 2.0)
    assert cfg.train.global_batch_tokens // cfg.train.seq_len == 64 and cfg.train.seq_len == 4096
    assert cfg.data.format == "sft"


def test_train_help_lists_every_key_with_its_default_and_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "llamatrain.train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--model.n_kv_heads" in proc.stdout and "(default 32)" in proc.stdout
    assert "75 (REQUEUE_EXIT_CODE)" in proc.stdout


def test_a_mixture_loads_from_array_tables_and_round_trips(tmp_path):
    path = tmp_path / "mix.toml"
    path.write_text('[[data.mix]]\nsource = "/corpora/web"\nweight = 0.7\n'
                    '[[data.mix]]\nsource = "/corpora/books"\nweight = 3\nname = "books"\n')
    cfg = load_config(path)
    assert [(m.source, m.weight, m.name) for m in cfg.data.mix] == [
        ("/corpora/web", 0.7, ""), ("/corpora/books", 3.0, "books")]
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "again.toml") == cfg
    cli = load_config(None, ['--data.mix=[{source="/a", weight=2}]'])
    assert [(m.source, m.weight) for m in cli.data.mix] == [("/a", 2.0)]


def test_data_source_and_data_mix_together_are_refused():
    with pytest.raises(ValueError, match="data.source = '/b' and data.mix are both set"):
        load_config(None, ['--data.mix=[{source="/a"}]', "--data.source=/b"])


def test_benchmarks_during_training_are_refused_under_tensor_parallelism():
    with pytest.raises(ValueError, match=r"^eval.tasks = 'commonsense' with parallel.tp = 2: "
                                         r"benchmarks during training need parallel.tp = 1"):
        load_config("configs/tiny.toml", ["--eval.tasks=commonsense", "--parallel.tp=2"])
