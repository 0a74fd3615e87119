"""launch/fabric.sh on fake /sys/class/infiniband trees: which fabric and NCCL settings it picks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

FABRIC_SH = Path(__file__).resolve().parents[1] / "launch" / "fabric.sh"


def add_port(
    sysfs: Path,
    device: str,
    port: int,
    *,
    link_layer: str,
    state: str = "4: ACTIVE",
    gids: dict[int, tuple[str, str]] | None = None,
) -> None:
    """One port of an RDMA device as the kernel lists it; gids: index -> (type, gid)."""
    port_dir = sysfs / device / "ports" / str(port)
    (port_dir / "gid_attrs" / "types").mkdir(parents=True)
    (port_dir / "gids").mkdir()
    (port_dir / "state").write_text(state + "\n")
    (port_dir / "link_layer").write_text(link_layer + "\n")
    for index, (gid_type, gid) in (gids or {}).items():
        (port_dir / "gid_attrs" / "types" / str(index)).write_text(gid_type + "\n")
        (port_dir / "gids" / str(index)).write_text(gid + "\n")


def source_fabric(sysfs: Path, **env: str) -> tuple[dict[str, str], str, int]:
    """Source fabric.sh in a clean bash; return the environment it leaves, its output, status."""
    script = f'source "{FABRIC_SH}" >&2 || exit $?; env -0'
    proc = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": os.environ["PATH"], "INFINIBAND_SYSFS": str(sysfs), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    pairs = (item.partition("=") for item in proc.stdout.split("\0") if item)
    return {key: value for key, _, value in pairs}, proc.stderr, proc.returncode


def default_route_interface() -> str | None:
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return fields[0]
    return None


LINK_LOCAL = "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
IPV4_MAPPED = "0000:0000:0000:0000:0000:ffff:0a00:0001"
ZERO = "0000:0000:0000:0000:0000:0000:0000:0000"


def test_infiniband_ports_select_ib_and_list_only_active_infiniband_ports(tmp_path):
    add_port(tmp_path, "mlx5_0", 1, link_layer="InfiniBand")
    add_port(tmp_path, "mlx5_1", 1, link_layer="InfiniBand")
    add_port(tmp_path, "mlx5_1", 2, link_layer="InfiniBand", state="1: DOWN")
    add_port(tmp_path, "mlx5_2", 1, link_layer="InfiniBand", state="1: DOWN")
    add_port(tmp_path, "mlx5_3", 1, link_layer="Ethernet")

    env, out, rc = source_fabric(tmp_path)

    assert rc == 0
    assert env["FABRIC"] == "ib"
    assert env["NCCL_IB_HCA"] == "mlx5_0:1,mlx5_1:1"
    assert env["NCCL_IB_DISABLE"] == "0"
    assert "NCCL_IB_GID_INDEX" not in env
    assert "NCCL_SOCKET_IFNAME" not in env
    lines = out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fabric: ib (active InfiniBand ports: mlx5_0:1 mlx5_1:1)")


def test_roce_picks_the_ipv4_roce_v2_gid_index(tmp_path):
    add_port(tmp_path, "mlx5_0", 1, link_layer="Ethernet", gids={
        0: ("IB/RoCE v1", LINK_LOCAL),
        1: ("RoCE v2", LINK_LOCAL),
        2: ("IB/RoCE v1", IPV4_MAPPED),
        3: ("RoCE v2", ZERO),
        4: ("IB/RoCE v1", IPV4_MAPPED),
        5: ("RoCE v2", IPV4_MAPPED),
    })
    add_port(tmp_path, "mlx5_1", 1, link_layer="Ethernet")

    env, out, rc = source_fabric(tmp_path)

    assert rc == 0
    assert env["FABRIC"] == "roce"
    assert env["NCCL_IB_HCA"] == "mlx5_0:1,mlx5_1:1"
    assert env["NCCL_IB_GID_INDEX"] == "5"
    assert "RoCE v2 GID index 5" in out


def test_roce_with_only_a_link_local_v2_gid_uses_it(tmp_path):
    add_port(tmp_path, "mlx5_0", 1, link_layer="Ethernet", gids={
        0: ("IB/RoCE v1", LINK_LOCAL),
        1: ("RoCE v2", LINK_LOCAL),
    })

    env, _, rc = source_fabric(tmp_path)

    assert rc == 0
    assert env["NCCL_IB_GID_INDEX"] == "1"


def test_roce_without_any_v2_gid_falls_back_to_index_3(tmp_path):
    add_port(tmp_path, "mlx5_0", 1, link_layer="Ethernet", gids={0: ("IB/RoCE v1", LINK_LOCAL)})

    env, out, rc = source_fabric(tmp_path)

    assert rc == 0
    assert env["FABRIC"] == "roce"
    assert env["NCCL_IB_GID_INDEX"] == "3"
    assert "no RoCE v2 GID found" in out


@pytest.mark.parametrize("tree", ["missing", "only_down_ports"])
def test_no_active_rdma_port_means_sockets_on_the_default_route_interface(tmp_path, tree):
    sysfs = tmp_path / "sys"
    if tree == "only_down_ports":
        add_port(sysfs, "mlx5_0", 1, link_layer="InfiniBand", state="1: DOWN")

    env, out, rc = source_fabric(sysfs)

    assert rc == 0
    assert env["FABRIC"] == "socket"
    assert env["NCCL_IB_DISABLE"] == "1"
    assert "NCCL_IB_HCA" not in env
    assert env.get("NCCL_SOCKET_IFNAME") == default_route_interface()
    assert out.startswith("fabric: socket (no active RDMA port under")


def test_fabric_set_by_the_user_overrides_detection(tmp_path):
    add_port(tmp_path, "mlx5_0", 1, link_layer="InfiniBand")

    env, out, rc = source_fabric(tmp_path, FABRIC="socket")

    assert rc == 0
    assert env["FABRIC"] == "socket"
    assert env["NCCL_IB_DISABLE"] == "1"
    assert "NCCL_IB_HCA" not in env
    assert "FABRIC=socket set by the user" in out


def test_nccl_variables_set_by_the_user_win_over_detected_values(tmp_path):
    add_port(tmp_path, "mlx5_0", 1, link_layer="Ethernet", gids={5: ("RoCE v2", IPV4_MAPPED)})

    env, _, rc = source_fabric(
        tmp_path, NCCL_IB_HCA="=mlx5_7:1", NCCL_IB_GID_INDEX="7", NCCL_SOCKET_IFNAME="ib0"
    )

    assert rc == 0
    assert env["FABRIC"] == "roce"
    assert env["NCCL_IB_HCA"] == "=mlx5_7:1"
    assert env["NCCL_IB_GID_INDEX"] == "7"
    assert env["NCCL_SOCKET_IFNAME"] == "ib0"


def test_user_socket_interface_wins_on_a_socket_fabric(tmp_path):
    env, _, rc = source_fabric(tmp_path / "none", NCCL_SOCKET_IFNAME="lo", NCCL_IB_DISABLE="0")

    assert rc == 0
    assert env["NCCL_SOCKET_IFNAME"] == "lo"
    assert env["NCCL_IB_DISABLE"] == "0"


def test_unknown_fabric_is_an_error_naming_the_value_and_the_choices(tmp_path):
    env, out, rc = source_fabric(tmp_path, FABRIC="ethernet")

    assert rc != 0
    assert env == {}
    assert out.strip() == (
        "fabric: FABRIC is 'ethernet'; allowed: ib, roce, socket (or unset to detect)"
    )


def test_flight_recorder_dumps_into_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"

    env, _, rc = source_fabric(tmp_path / "none", RUN_DIR=str(run_dir))

    assert rc == 0
    assert env["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == f"{run_dir}/nccl_trace/rank_"
    assert (run_dir / "nccl_trace").is_dir()


def test_flight_recorder_settings_of_the_user_win_under_either_name(tmp_path):
    env, _, rc = source_fabric(
        tmp_path / "none",
        RUN_DIR=str(tmp_path / "run"),
        TORCH_NCCL_TRACE_BUFFER_SIZE="500",
        TORCH_NCCL_DEBUG_INFO_TEMP_FILE="/scratch/fr_",
        TORCH_NCCL_DUMP_ON_TIMEOUT="0",
    )

    assert rc == 0
    assert "TORCH_FR_BUFFER_SIZE" not in env
    assert "TORCH_FR_DUMP_TEMP_FILE" not in env
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "500"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"
