"""carbon.py: Table 2 reproduced, run accounting from NVML or TDP, projections through plan.py's
layouts and step-time model."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from llamatrain import carbon, flops, hardware
from llamatrain.config import CarbonConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv: str):
    assert carbon.main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("model", "gpu_hours", "power_w", "tco2eq"), carbon.TABLE2)
def test_estimate_cli_reproduces_table2_within_0_1_percent(capsys, model, gpu_hours, power_w,
                                                           tco2eq):
    out = run_main(capsys, "estimate", "--gpu-hours", str(gpu_hours), "--power-w", str(power_w),
                   "--json")
    result = json.loads(out)
    assert set(result) == {"gpu_hours", "energy_kwh", "tco2eq"}
    assert result["gpu_hours"] == gpu_hours
    assert result["energy_kwh"] == pytest.approx(gpu_hours * power_w / 1000)
    assert result["tco2eq"] == pytest.approx(tco2eq, rel=1e-3)


def test_estimate_applies_pue_and_intensity(capsys):
    out = run_main(capsys, "estimate", "--gpu-hours", "1000", "--power-w", "300", "--pue", "1.5",
                   "--intensity", "0.2", "--json")
    result = json.loads(out)
    assert result["energy_kwh"] == pytest.approx(450.0)
    assert result["tco2eq"] == pytest.approx(0.09)


def test_account_charges_tdp_per_device_without_a_measurement():
    acct = carbon.account(CarbonConfig(), num_devices=8, wall_s=1800.0,
                          device_name="NVIDIA A100-SXM4-80GB", measured_kwh=None)
    assert acct["gpu_hours"] == 4.0
    assert acct["energy_source"] == "tdp"
    assert acct["power_w"] == 400.0
    assert acct["energy_kwh"] == pytest.approx(1.6)
    assert acct["tco2eq"] == pytest.approx(1.6 * 0.4235 / 1000)
    h100 = carbon.account(None, num_devices=1, wall_s=3600.0, device_name="NVIDIA H100 80GB HBM3",
                          measured_kwh=None)
    assert h100["power_w"] == 700.0


def test_account_prefers_configured_power_and_multiplies_pue():
    cfg = CarbonConfig(power_w=350.0, pue=1.1, intensity_kg_per_kwh=0.5)
    acct = carbon.account(cfg, num_devices=2, wall_s=3600.0, device_name="NVIDIA A100",
                          measured_kwh=None)
    assert acct["energy_kwh"] == pytest.approx(2 * 0.35 * 1.1)
    assert acct["tco2eq"] == pytest.approx(2 * 0.35 * 1.1 * 0.5 / 1000)


def test_account_uses_measured_energy_and_reports_average_power():
    cfg = CarbonConfig(power_w=400.0, pue=1.2)
    acct = carbon.account(cfg, num_devices=4, wall_s=900.0, device_name="NVIDIA H200",
                          measured_kwh=0.5)
    assert acct["energy_source"] == "nvml"
    assert acct["gpu_hours"] == 1.0
    assert acct["energy_kwh"] == pytest.approx(0.6)
    assert acct["power_w"] == pytest.approx(500.0)


def test_account_on_cpu_counts_device_hours():
    acct = carbon.account(CarbonConfig(), num_devices=2, wall_s=360.0, device_name="cpu",
                          measured_kwh=None)
    assert acct["power_w"] == hardware.CPU_W
    line = carbon.format_accounting(acct)
    assert line.startswith("device-hours 0.2")
    # 0.2 h x 100 W = 0.02 kWh -> 8.47 g at 0.4235 kg/kWh
    assert line.endswith("| 0.02 kWh (tdp 100 W, PUE 1.00) | 8.47 gCO2eq")


def test_format_accounting_shows_the_numbers():
    acct = carbon.account(CarbonConfig(), num_devices=2048, wall_s=90 * 3600.0,
                          device_name="NVIDIA A100-SXM4-80GB", measured_kwh=None)
    assert carbon.format_accounting(acct) == (
        "GPU-hours 184,320 | 73,728 kWh (tdp 400 W, PUE 1.00) | 31.22 tCO2eq"
    )


def test_account_rejects_bad_input_naming_the_key():
    with pytest.raises(ValueError, match="num_devices = 0"):
        carbon.account(None, num_devices=0, wall_s=1.0, device_name="cpu", measured_kwh=None)
    with pytest.raises(ValueError, match="carbon.power_w = -1"):
        carbon.account(CarbonConfig(power_w=-1.0), num_devices=1, wall_s=1.0, device_name="cpu",
                       measured_kwh=None)


def test_energy_meter_reads_nothing_on_cpu():
    assert carbon.EnergyMeter("cpu").kwh() is None


def fake_pynvml(counter: list[int], fail_init: bool = False) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    mod.nvmlInit = init
    mod.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    mod.nvmlDeviceGetTotalEnergyConsumption = lambda handle: counter[0]
    return mod


def test_energy_meter_converts_the_nvml_millijoule_counter(monkeypatch):
    counter = [5_000_000]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counter))
    meter = carbon.EnergyMeter("cuda:0")
    counter[0] += 7_200_000_000  # 7.2 MJ = 2 kWh
    assert meter.kwh() == pytest.approx(2.0)


def test_energy_meter_never_raises_when_nvml_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([0], fail_init=True))
    assert carbon.EnergyMeter("cuda:0").kwh() is None


# Layouts the trainer accepts at 2,048 GPUs: 1,024 sequences per step leave at most 1,024
# data-parallel ranks, so tensor parallelism takes the rest.
AT_2048 = {"7b": ("--parallel.tp=2", "--train.micro_batch_size=1"), "70b": ("--parallel.tp=8",)}


@pytest.mark.parametrize(("name", "table2_hours"), [("7b", 184_320), ("70b", 1_720_320)])
def test_project_with_the_paper_mfu_lands_within_5_percent_of_table2(capsys, name, table2_hours):
    out = run_main(capsys, "project", "--config", str(ROOT / f"configs/llama2_{name}.toml"),
                   "--tokens", "2e12", "--gpus", "2048", "--device", "a100", "--json",
                   *AT_2048[name])
    result = json.loads(out)
    assert result["mfu"] == carbon.PAPER_MFU
    assert result["gpu_hours"] == pytest.approx(table2_hours, rel=0.05)
    assert result["days"] == pytest.approx(result["gpu_hours"] / 2048 / 24)
    # An A100's TDP is Table 2's 400 W, so the carbon lands near the table's too.
    assert result["tco2eq"] == pytest.approx(table2_hours * 0.4 * 0.4235 / 1000, rel=0.05)


def test_project_from_a_measured_throughput_inverts_mfu(capsys):
    cfg = str(ROOT / "configs/llama2_7b.toml")
    out = run_main(capsys, "project", "--config", cfg, "--tokens", "1e12", "--gpus", "64",
                   "--device", "h100", "--tokens-per-s-per-gpu", "5000", "--json")
    result = json.loads(out)
    assert result["gpu_hours"] == pytest.approx(1e12 / 5000 / 3600)
    fpt = flops.flops_per_token(load_config(cfg).model, 4096)
    assert result["mfu"] == pytest.approx(5000 * fpt / 989e12)
    assert result["power_w"] == 700.0  # the H100's TDP, not the config's A100 figure


def scaling(capsys, name: str, *extra: str) -> dict[int, dict]:
    out = run_main(capsys, "project", "--config", str(ROOT / f"configs/llama2_{name}.toml"),
                   "--tokens", "2e12", "--gpus", "1024", "--device", "a100", "--json", *extra)
    return {row["gpus"]: row for row in json.loads(out)["scaling"]}


def test_the_pure_fsdp_70b_is_infeasible_beyond_1024_gpus_and_gets_no_efficiency(capsys):
    rows = scaling(capsys, "70b")  # full FSDP over every GPU, tp = 1
    for g in (2048, 4096, 8192):
        assert not rows[g]["feasible"] and rows[g]["ib_efficiency"] is None
        assert rows[g]["roce_efficiency"] is None
        assert rows[g]["refusal"].startswith("train.global_batch_tokens = 4194304: not a "
                                             f"multiple of data-parallel ranks x micro_batch_size"
                                             f" x seq_len = {g} x 1 x 4096")
    assert all(rows[g]["feasible"] for g in (8, 64, 1024))


def test_tensor_parallel_70b_at_2048_gpus_pays_for_nvlink_traffic_then_falls_off(capsys):
    rows = scaling(capsys, "70b", "--parallel.tp=8")
    at_2048 = rows[2048]
    assert (at_2048["tp"], at_2048["dp_shard"]) == (8, 256)
    # Sequence-parallel all-gathers and reduce-scatters on NVLink cost about 14% of compute, and
    # the config's full activation checkpointing a forward of every block (a third more block
    # FLOPs): 0.86 / 1.33 = 0.67 of the model FLOPs' time.
    assert 0.62 < at_2048["roce_efficiency"] <= at_2048["ib_efficiency"] < 0.70
    assert at_2048["ib_efficiency"] - at_2048["roce_efficiency"] < 0.01
    assert all(r["roce_efficiency"] <= r["ib_efficiency"] for r in rows.values())
    # At a fixed 4M-token batch, 8,192 GPUs leave too little compute to hide the traffic.
    assert rows[8192]["ib_efficiency"] < 0.5


def test_fsdp_traffic_per_node_is_two_bf16_gathers_and_an_fp32_reduce_scatter(capsys):
    n = flops.num_params(load_config(ROOT / "configs/llama2_70b.toml").model)
    rows = scaling(capsys, "70b")  # full FSDP over every GPU
    for g in (64, 1024):
        assert rows[g]["dp_shard"] == g
        assert rows[g]["node_gb_per_step"] == pytest.approx((g - 1) / g * n * (2 + 2 + 4) / 1e9)
    # With tp = 8 each node carries 8 rings of an eighth of the model over 256 data ranks.
    tp8 = scaling(capsys, "70b", "--parallel.tp=8")[2048]
    assert tp8["node_gb_per_step"] == pytest.approx(255 / 256 * n * (2 + 2 + 4) / 1e9)


def test_slower_links_lower_the_scaling_efficiency(capsys):
    fast = scaling(capsys, "7b", *AT_2048["7b"])[2048]
    slow = scaling(capsys, "7b", *AT_2048["7b"], "--link-gbps", "50")[2048]
    # A quarter of the bandwidth: the inter-node part takes four times as long; NVLink's does not.
    assert slow["ib_comm_s"] > 2 * fast["ib_comm_s"]
    assert slow["ib_efficiency"] < fast["ib_efficiency"] - 0.3


def test_project_with_a_fabric_divides_gpu_hours_by_its_efficiency(capsys):
    cfg = str(ROOT / "configs/llama2_7b.toml")
    args = ("--tokens", "2e12", "--gpus", "4096", "--parallel.tp=4",
            "--train.micro_batch_size=1", "--json")
    base = json.loads(run_main(capsys, "project", "--config", cfg, *args))
    roce = json.loads(run_main(capsys, "project", "--config", cfg, *args, "--fabric", "roce"))
    assert roce["scaling_efficiency"] < 0.9
    assert roce["gpu_hours"] == pytest.approx(base["gpu_hours"] / roce["scaling_efficiency"])


def test_project_prints_a_scaling_table(capsys):
    out = run_main(capsys, "project", "--config", str(ROOT / "configs/llama2_70b.toml"),
                   "--tokens", "2e12", "--gpus", "1024", "--fabric", "ib")
    assert "InfiniBand scaling efficiency" in out
    assert "RoCE eff" in out
    assert any(line.split()[0] == "1024" for line in out.splitlines() if line.strip())
    assert any(line.split()[:2] == ["2048", "infeasible:"] for line in out.splitlines()
               if line.strip())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["estimate", "--gpu-hours", "-5", "--power-w", "400"], "gpu_hours = -5.0"),
        (["project", "--config", "configs/llama2_7b.toml", "--tokens", "1e12", "--gpus", "8",
          "--device", "cpu", "--mfu", "0.4"], "device = 'cpu'"),
        (["project", "--config", "configs/llama2_7b.toml", "--tokens", "1e12", "--gpus", "12",
          "--gpus-per-node", "4"],
         "must multiply to the world size 12 (at 12 GPUs)"),
        (["project", "--config", "configs/llama2_70b.toml", "--tokens", "2e12", "--gpus", "2048",
          "--fabric", "roce"], "(at 2048 GPUs); the trainer accepts --parallel.tp=2 "),
        (["project", "--config", "configs/llama2_70b.toml", "--tokens", "2e12", "--gpus", "2048",
          "--gpus-per-node", "4", "--parallel.tp=8"], "parallel.tp = 8: must divide the 4 GPUs "
         "per node"),
        (["estimate", "--gpu-hours", "5"], "--power-w"),
    ],
)
def test_cli_mistakes_are_one_line_on_stderr(argv, message):
    proc = subprocess.run([sys.executable, "-m", "llamatrain.carbon", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
