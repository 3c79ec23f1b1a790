"""Specification of the systemd units in systemd/ (what `pysnap install` writes)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pysnap import install
from pysnap.config import Config

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
PROXIES = ("snapshotter", "content")
ALL = ("snapshotter", "content", "nri")
VENV_PYSNAP = Path(sys.executable).parent / "pysnap"

# Options that make systemd give a service a mount namespace of its own (systemd.exec(5)).
MOUNT_NAMESPACE_OPTIONS = {
    "PrivateMounts", "MountFlags", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "PrivateUsers", "DynamicUser", "RootDirectory",
    "RootImage", "MountAPIVFS", "PrivateIPC",
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} (comments and blank lines dropped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNITS / install.unit_name(name))


def one(section: dict[str, list[str]], key: str) -> str:
    assert len(section.get(key, [])) == 1, f"expected exactly one {key}=, got {section.get(key)}"
    return section[key][0]


def words(section: dict[str, list[str]], key: str) -> list[str]:
    return [w for value in section.get(key, []) for w in value.split()]


def test_systemd_analyze_verify_reports_nothing_for_the_three_units(tmp_path):
    # verify needs ExecStart's binary to exist: check copies pointing at this checkout's pysnap.
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/provision.sh installs the systemd package"
    assert VENV_PYSNAP.is_file()
    copies = []
    for name in ALL:
        text = (UNITS / install.unit_name(name)).read_text()
        assert str(install.BIN) in text
        copy = tmp_path / install.unit_name(name)
        copy.write_text(text.replace(str(install.BIN), str(VENV_PYSNAP)))
        copies.append(str(copy))
    result = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", output


@pytest.mark.parametrize("name", ALL)
def test_each_unit_is_type_notify_with_main_only_notify_access_and_a_30s_watchdog(name):
    service = unit(name)["Service"]
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "WatchdogSec") == "30s"


@pytest.mark.parametrize("name", ALL)
def test_each_unit_runs_the_installed_pysnap_with_the_installed_config(name):
    argv = one(unit(name)["Service"], "ExecStart").split()
    assert argv == [str(install.BIN), "--config", str(install.CONFIG), "serve", name]


@pytest.mark.parametrize("name", PROXIES)
def test_the_proxy_units_start_before_containerd_which_wants_them_without_requiring_them(name):
    sections = unit(name)
    assert "containerd.service" in words(sections["Unit"], "Before")
    assert "containerd.service" in words(sections["Install"], "WantedBy")
    for key in ("Requires", "BindsTo", "PartOf", "Requisite", "After"):
        assert "containerd.service" not in words(sections["Unit"], key), key
    assert "RequiredBy" not in sections["Install"]


def test_the_nri_unit_starts_after_containerd_and_survives_its_restarts():
    sections = unit("nri")
    assert "containerd.service" in words(sections["Unit"], "After")
    assert "containerd.service" in words(sections["Unit"], "Wants")
    assert "containerd.service" in words(sections["Install"], "WantedBy")
    for key in ("Requires", "BindsTo", "PartOf", "Requisite", "Before"):
        assert "containerd.service" not in words(sections["Unit"], key), key


def test_the_nri_unit_stays_in_the_host_mount_namespace_and_may_mount():
    service = unit("nri")["Service"]
    assert not MOUNT_NAMESPACE_OPTIONS & set(service), MOUNT_NAMESPACE_OPTIONS & set(service)
    caps = words(service, "CapabilityBoundingSet")
    assert "CAP_SYS_ADMIN" in caps
    # overlayfs checks and copies up with the mounter's credentials
    assert {"CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_CHOWN", "CAP_FOWNER", "CAP_MKNOD"} <= set(caps)
    assert "@mount" in words(service, "SystemCallFilter")


@pytest.mark.parametrize("name", PROXIES)
def test_the_proxy_units_are_sandboxed_without_mount_or_admin_capabilities(name):
    service = unit(name)["Service"]
    assert one(service, "NoNewPrivileges") == "yes"
    assert one(service, "ProtectSystem") in ("full", "strict")
    assert one(service, "PrivateTmp") == "yes"
    assert "CAP_SYS_ADMIN" not in words(service, "CapabilityBoundingSet")
    assert words(service, "CapabilityBoundingSet"), "an empty bounding set would not even allow chown"
    assert "@mount" not in words(service, "SystemCallFilter")


@pytest.mark.parametrize("name", ALL)
def test_each_unit_restarts_always_within_start_limits_but_not_after_a_config_error(name):
    sections = unit(name)
    assert one(sections["Service"], "Restart") == "always"
    assert int(one(sections["Unit"], "StartLimitBurst")) > 1
    assert int(one(sections["Unit"], "StartLimitIntervalSec")) > 0
    # pysnap exits 2 on a configuration error (pysnap/cli.py): restarting would only loop
    assert one(sections["Service"], "RestartPreventExitStatus") == "2"


@pytest.mark.parametrize("name", ALL)
def test_each_unit_gives_a_sigterm_drain_time_to_finish_before_sigkill(name):
    service = unit(name)["Service"]
    assert int(one(service, "TimeoutStopSec").removesuffix("s")) >= 30  # daemons wait up to 30 s
    assert one(service, "KillMode") == "mixed"
    assert int(one(service, "LimitNOFILE")) >= 65536


@pytest.mark.parametrize("name", ALL)
def test_each_unit_shares_and_preserves_the_runtime_directory_holding_the_sockets(name):
    service = unit(name)["Service"]
    assert one(service, "RuntimeDirectory") == "pysnap"
    assert one(service, "RuntimeDirectoryPreserve") == "yes"
    defaults = Config()
    for address in (defaults.snapshotter.address, defaults.content.address, defaults.nri.mount_root):
        assert address.is_relative_to("/run/pysnap")


@pytest.mark.parametrize("name", PROXIES)
def test_the_proxy_units_state_directory_is_the_configured_default_root(name):
    state = one(unit(name)["Service"], "StateDirectory")
    assert Path("/var/lib") / state == getattr(Config(), name).root


def test_install_takes_the_units_from_this_directory():
    assert install.unit_source_dir() == UNITS
