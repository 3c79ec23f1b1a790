"""Specification of ``pysnap config containerd``: the config.toml snippet wiring pysnap in."""
from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from pysnap.cli import main
from pysnap.config import Config, SnapshotterConfig
from pysnap.containerd_config import containerd_snippet, host_platform

REPO = Path(__file__).resolve().parents[2]
SOCKET = "/run/test/pysnap-snap.sock"


@pytest.fixture
def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text("")
    return path


def snippet(capsys, config: Path, *args: str) -> tuple[str, dict]:
    assert main(["--config", str(config), "config", "containerd", *args]) == 0
    text = capsys.readouterr().out
    return text, tomllib.loads(text)


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_the_snippet_parses_as_toml(capsys, empty_config, version):
    snippet(capsys, empty_config, "--version", version)


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_the_snippet_declares_a_snapshot_proxy_plugin_named_pysnap_on_the_socket(capsys, empty_config, version):
    _, toml = snippet(capsys, empty_config, "--version", version, "--snapshotter-address", SOCKET)
    plugin = toml["proxy_plugins"]["pysnap"]
    assert plugin["type"] == "snapshot"
    assert plugin["address"] == SOCKET


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_the_snippet_exports_the_snapshotter_root_for_cri(capsys, empty_config, version):
    _, toml = snippet(capsys, empty_config, "--version", version, "--snapshotter-root", "/srv/pysnap")
    assert toml["proxy_plugins"]["pysnap"]["exports"] == {"root": "/srv/pysnap"}


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_without_overrides_the_snippet_uses_the_default_socket_and_root(capsys, empty_config, version):
    _, toml = snippet(capsys, empty_config, "--version", version)
    plugin = toml["proxy_plugins"]["pysnap"]
    assert plugin["address"] == "/run/pysnap/snapshotter.sock"
    assert plugin["exports"]["root"] == "/var/lib/pysnap/snapshotter"


def test_the_snippet_takes_socket_and_root_from_the_config_file(capsys, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[snapshotter]\naddress = "/run/x/from-file.sock"\nroot = "/srv/from-file"\n')
    _, toml = snippet(capsys, config, "--version", "2")
    plugin = toml["proxy_plugins"]["pysnap"]
    assert (plugin["address"], plugin["exports"]["root"]) == ("/run/x/from-file.sock", "/srv/from-file")


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_plugins_snapshotter_wires_only_the_snapshot_proxy(capsys, empty_config, version):
    _, toml = snippet(capsys, empty_config, "--version", version, "--plugins", "snapshotter")
    assert set(toml["proxy_plugins"]) == {"pysnap"}
    assert "disabled_plugins" not in toml
    if version == "1.7":
        assert set(toml) == {"proxy_plugins"}


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_by_default_the_snippet_also_wires_the_content_proxy_and_disables_the_builtin_store(
    capsys, empty_config, version
):
    _, toml = snippet(capsys, empty_config, "--version", version, "--snapshotter-address", SOCKET)
    assert toml["proxy_plugins"]["pysnap"]["address"] == SOCKET
    assert toml["proxy_plugins"]["pysnap-content"]["type"] == "content"
    assert toml["disabled_plugins"] == ["io.containerd.content.v1.content"]


def test_an_unknown_plugin_part_exits_2(capsys, empty_config):
    assert main(["--config", str(empty_config), "config", "containerd", "--version", "2", "--plugins", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_2_snippet_lists_unpack_config_for_overlayfs_and_pysnap(capsys, empty_config):
    _, toml = snippet(capsys, empty_config, "--version", "2", "--snapshotter-address", SOCKET)
    unpack = toml["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert sorted(entry["snapshotter"] for entry in unpack) == ["overlayfs", "pysnap"]
    for entry in unpack:
        assert entry["platform"] == host_platform()
        assert entry["differ"] == "walking"


def test_the_2_snippet_keeps_overlayfs_first_so_the_default_stays_unpackable(capsys, empty_config):
    _, toml = snippet(capsys, empty_config, "--version", "2")
    unpack = toml["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert unpack[0]["snapshotter"] == "overlayfs"


def test_the_host_platform_is_an_oci_platform_string():
    os_, arch = host_platform().split("/")
    assert os_ == "linux"
    assert arch in {"amd64", "arm64", "arm", "ppc64le", "s390x", "riscv64", "386"}


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_a_socket_path_with_quotes_and_backslashes_survives_toml_quoting(version):
    odd = '/run/we"ird\\dir/pysnap.sock'
    config = Config(snapshotter=SnapshotterConfig(address=Path(odd)))
    toml = tomllib.loads(containerd_snippet(version, config))
    assert toml["proxy_plugins"]["pysnap"]["address"] == odd


def test_an_unsupported_containerd_version_is_rejected():
    with pytest.raises(ValueError, match="unsupported containerd version"):
        containerd_snippet("1.6", Config())


def test_the_console_script_prints_the_snippet(empty_config):
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "pysnap"), "--config", str(empty_config), "config", "containerd",
         "--version", "2", "--snapshotter-address", SOCKET],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["proxy_plugins"]["pysnap"]["address"] == SOCKET


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_the_snippet_turns_nri_on(version):
    snippet = tomllib.loads(containerd_snippet(version, Config()))
    assert snippet["plugins"]["io.containerd.nri.v1.nri"] == {"disable": False}


def test_the_snippet_points_nri_at_the_socket_the_plugin_dials():
    config = Config.from_toml('[nri]\nsocket = "/run/test/nri.sock"\n')
    snippet = tomllib.loads(containerd_snippet("1.7", config))
    assert snippet["plugins"]["io.containerd.nri.v1.nri"]["socket_path"] == "/run/test/nri.sock"


def test_the_snippet_leaves_nri_alone_when_not_asked():
    snippet = tomllib.loads(containerd_snippet("2", Config(), ("snapshotter",)))
    assert "io.containerd.nri.v1.nri" not in snippet.get("plugins", {})
