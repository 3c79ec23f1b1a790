"""Specification of ``pysnap doctor``: every check one line, OK / WARN / FAIL with advice,
exit 1 when anything FAILs.

The kernel's answers come from fake /proc and /sys files (``doctor.HOST``), and
``containerd`` on PATH is a script printing the version under test, so the
checks don't depend on the machine running the tests.  Sockets and daemons are
real.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cli_helpers import listening_socket, make_node, run, run_json, start_daemon, stop_daemon
from pysnap import doctor
from pysnap.config import Config
from pysnap.containerd_config import containerd_snippet

VERSION_OUTPUT = {
    "1.7": "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1",
    "2": "containerd github.com/containerd/containerd/v2 2.1.9+unknown ",
}


@pytest.fixture
def host(tmp_path: Path, monkeypatch) -> Path:
    """A kernel with overlay, index=Y and redirect_dir/metacopy off, outside user namespaces."""
    proc = tmp_path / "proc-filesystems"
    proc.write_text("nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\toverlay\n")
    params = tmp_path / "overlay-parameters"
    params.mkdir()
    for name, value in {"index": "Y", "redirect_dir": "N", "metacopy": "N", "xino_auto": "N"}.items():
        (params / name).write_text(value + "\n")
    monkeypatch.setattr(doctor, "HOST", doctor.Host(proc, params, in_user_namespace=False, kernel=(6, 1)))
    return params


@pytest.fixture
def containerd(tmp_path: Path, monkeypatch):
    """``set(version)`` puts a ``containerd`` printing that version first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '')}")

    def set_version(version: str) -> None:
        script = bin_dir / "containerd"
        script.write_text(f"#!/bin/sh\necho '{VERSION_OUTPUT[version]}'\n")
        script.chmod(0o755)
    return set_version


@pytest.fixture
def node(tmp_path: Path, short_tmp: Path, host, containerd):
    node = make_node(tmp_path, short_tmp)
    node.snapshotter().close()  # the roots exist, as after a first start
    node.content().close()
    return node


def nri_section(node, disable: bool = False) -> str:
    return f'\n[plugins."io.containerd.nri.v1.nri"]\n  disable = {str(disable).lower()}\n' \
           f'  socket_path = "{node.nri_socket}"\n'


def good_config(node, version: str = "2") -> str:
    """What pysnap's own snippet says (NRI enabled on the plugin's socket included)."""
    header = "version = 3\n" if version == "2" else "version = 2\n"
    return header + containerd_snippet(version, Config.load(node.config))


def doctor_json(capsys, node, containerd_toml: str, tmp_path: Path) -> tuple[int, dict[str, dict]]:
    path = tmp_path / "containerd.toml"
    path.write_text(containerd_toml)
    code, checks = run_json(capsys, node, "doctor", "--containerd-config", str(path))
    assert isinstance(checks, list)
    return code, {c["check"]: c for c in checks}


@pytest.fixture
def daemons(node, tmp_path: Path):
    """The snapshotter and content daemons serving, and a stand-in for containerd's NRI socket."""
    procs = [start_daemon(node, "snapshotter", tmp_path / "snapshotter.log"),
             start_daemon(node, "content", tmp_path / "content.log")]
    nri = listening_socket(node.nri_socket)
    yield node
    nri.close()
    for proc in procs:
        stop_daemon(proc)


def test_doctor_passes_a_correct_setup_with_every_check_ok_and_exit_0(capsys, daemons, containerd, tmp_path):
    containerd("2")
    code, checks = doctor_json(capsys, daemons, good_config(daemons), tmp_path)
    assert {name: c["status"] for name, c in checks.items() if c["status"] != "OK"} == {}
    assert code == 0
    for name in ("kernel.overlay", "kernel.overlay.index", "kernel.overlay.userxattr", "root.snapshotter",
                 "containerd.version", "containerd.config.version", "containerd.config.snapshotter",
                 "containerd.config.content", "containerd.config.transfer", "containerd.config.nri",
                 "socket.snapshotter", "health.snapshotter", "socket.content", "health.content", "socket.nri"):
        assert name in checks
    assert "SERVING" in checks["health.snapshotter"]["message"]


def test_doctor_passes_a_correct_containerd_17_setup(capsys, daemons, containerd, tmp_path):
    containerd("1.7")
    code, checks = doctor_json(capsys, daemons, good_config(daemons, "1.7"), tmp_path)
    assert {name: c["status"] for name, c in checks.items() if c["status"] != "OK"} == {}
    assert code == 0
    assert "containerd.config.transfer" not in checks  # 1.7 has no transfer unpack_config to check


def test_doctor_fails_and_says_to_start_the_daemon_when_the_snapshotter_socket_is_missing(
        capsys, node, containerd, tmp_path):
    containerd("2")
    code, checks = doctor_json(capsys, node, good_config(node), tmp_path)
    assert code == 1
    check = checks["socket.snapshotter"]
    assert check["status"] == "FAIL"
    assert "missing" in check["message"] and str(node.snapshotter_socket) in check["message"]
    assert "systemctl start pysnap-snapshotter.service" in check["advice"]


def test_doctor_fails_on_a_stale_socket_nothing_listens_on(capsys, node, containerd, tmp_path):
    containerd("2")
    listening_socket(node.snapshotter_socket).close()  # the file stays, nobody accepts
    code, checks = doctor_json(capsys, node, good_config(node), tmp_path)
    assert code == 1
    assert checks["socket.snapshotter"]["status"] == "FAIL"
    assert "refuses connections" in checks["socket.snapshotter"]["message"]
    assert "systemctl restart pysnap-snapshotter.service" in checks["socket.snapshotter"]["advice"]


def test_doctor_fails_when_the_snapshotter_socket_is_world_accessible(capsys, node, containerd, tmp_path):
    containerd("2")
    server = listening_socket(node.snapshotter_socket, mode=0o666)
    try:
        code, checks = doctor_json(capsys, node, good_config(node), tmp_path)
    finally:
        server.close()
    assert code == 1
    assert checks["socket.snapshotter"]["status"] == "FAIL"
    assert "0666" in checks["socket.snapshotter"]["message"]
    assert f"chmod 0660 {node.snapshotter_socket}" in checks["socket.snapshotter"]["advice"]


def test_doctor_fails_and_says_how_to_enable_nri_when_it_is_disabled(capsys, node, containerd, tmp_path):
    containerd("2")
    config = good_config(node).replace("disable = false", "disable = true")
    code, checks = doctor_json(capsys, node, config, tmp_path)
    assert code == 1
    check = checks["containerd.config.nri"]
    assert check["status"] == "FAIL" and "disabled" in check["message"]
    assert 'disable = false under [plugins."io.containerd.nri.v1.nri"]' in check["advice"]


def test_doctor_fails_when_containerd_17_leaves_nri_off_by_default(capsys, node, containerd, tmp_path):
    containerd("1.7")
    config = "version = 2\n" + containerd_snippet("1.7", Config.load(node.config), ("snapshotter", "content"))
    code, checks = doctor_json(capsys, node, config, tmp_path)
    assert code == 1
    check = checks["containerd.config.nri"]
    assert check["status"] == "FAIL" and "off by default in containerd 1.7" in check["message"]
    assert "disable = false" in check["advice"]


def test_doctor_fails_when_nri_listens_on_another_socket_than_the_plugin_dials(capsys, node, containerd, tmp_path):
    containerd("2")
    config = good_config(node).replace(str(node.nri_socket), "/run/elsewhere/nri.sock")
    code, checks = doctor_json(capsys, node, config, tmp_path)
    assert code == 1
    assert checks["containerd.config.nri"]["status"] == "FAIL"
    assert "/run/elsewhere/nri.sock" in checks["containerd.config.nri"]["message"]


def test_doctor_fails_on_config_version_3_for_containerd_17(capsys, node, containerd, tmp_path):
    containerd("1.7")
    config = "version = 3\n" + containerd_snippet("1.7", Config.load(node.config))
    code, checks = doctor_json(capsys, node, config, tmp_path)
    assert code == 1
    check = checks["containerd.config.version"]
    assert check["status"] == "FAIL" and "refuses to start" in check["message"]
    assert "set version = 2" in check["advice"]


def test_doctor_fails_on_a_version_1_config_for_containerd_17(capsys, node, containerd, tmp_path):
    containerd("1.7")
    config = containerd_snippet("1.7", Config.load(node.config))  # no version key
    code, checks = doctor_json(capsys, node, config, tmp_path)
    assert code == 1
    assert checks["containerd.config.version"]["status"] == "FAIL"


def test_doctor_warns_that_containerd_2_migrates_a_version_2_config_at_every_start(
        capsys, node, containerd, tmp_path):
    containerd("2")
    config = good_config(node).replace("version = 3", "version = 2")
    _, checks = doctor_json(capsys, node, config, tmp_path)
    check = checks["containerd.config.version"]
    assert check["status"] == "WARN" and "containerd config migrate" in check["advice"]


def test_doctor_fails_when_the_builtin_content_store_is_not_disabled(capsys, node, containerd, tmp_path):
    containerd("2")
    config = good_config(node).replace('disabled_plugins = ["io.containerd.content.v1.content"]', "")
    code, checks = doctor_json(capsys, node, config, tmp_path)
    assert code == 1
    check = checks["containerd.config.content"]
    assert check["status"] == "FAIL" and "built-in content store is still enabled" in check["message"]
    assert '"io.containerd.content.v1.content" to the top-level disabled_plugins' in check["advice"]


def test_doctor_fails_when_the_snapshotter_proxy_dials_another_socket(capsys, node, containerd, tmp_path):
    containerd("2")
    config = good_config(node).replace(f'address = "{node.snapshotter_socket}"', 'address = "/run/other.sock"')
    code, checks = doctor_json(capsys, node, config, tmp_path)
    assert code == 1
    check = checks["containerd.config.snapshotter"]
    assert check["status"] == "FAIL" and "/run/other.sock" in check["message"]


def test_doctor_fails_when_containerd_knows_no_pysnap_proxy(capsys, node, containerd, tmp_path):
    containerd("2")
    code, checks = doctor_json(capsys, node, "version = 3\n" + nri_section(node), tmp_path)
    assert code == 1
    check = checks["containerd.config.snapshotter"]
    assert check["status"] == "FAIL" and "pysnap config containerd --version 2" in check["advice"]


def test_doctor_fails_when_containerd_2_cannot_unpack_into_pysnap(capsys, node, containerd, tmp_path):
    containerd("2")
    config = "version = 3\n" + containerd_snippet("2", Config.load(node.config), ("snapshotter",)).split(
        "[[plugins")[0] + nri_section(node)
    code, checks = doctor_json(capsys, node, config, tmp_path)
    assert code == 1
    check = checks["containerd.config.transfer"]
    assert check["status"] == "FAIL" and "unpack_config" in check["message"]


def test_doctor_reads_the_pysnap_sections_from_an_imported_drop_in(capsys, node, containerd, tmp_path):
    containerd("2")
    drop_in = tmp_path / "conf.d"
    drop_in.mkdir()
    (drop_in / "pysnap.toml").write_text(good_config(node).replace("version = 3\n", ""))
    code, checks = doctor_json(capsys, node, 'version = 3\nimports = ["conf.d/*.toml"]\n', tmp_path)
    assert "1 imported file" in checks["containerd.config"]["message"]
    for name in ("containerd.config.snapshotter", "containerd.config.content", "containerd.config.transfer",
                 "containerd.config.nri"):
        assert checks[name]["status"] == "OK", checks[name]


def test_doctor_fails_when_the_containerd_config_is_missing(capsys, node, containerd, tmp_path):
    containerd("2")
    code, checks = run_json(capsys, node, "doctor", "--containerd-config", str(tmp_path / "absent.toml"))
    checks = {c["check"]: c for c in checks}
    assert code == 1
    assert checks["containerd.config"]["status"] == "FAIL"
    assert "pysnap config containerd" in checks["containerd.config"]["advice"]


def test_doctor_fails_on_containerd_older_than_17(capsys, node, containerd, tmp_path):
    containerd("2")
    script = Path(os.environ["PATH"].split(":")[0]) / "containerd"
    script.write_text("#!/bin/sh\necho 'containerd github.com/containerd/containerd v1.6.20 abc'\n")
    code, checks = doctor_json(capsys, node, good_config(node, "1.7"), tmp_path)
    assert code == 1
    assert checks["containerd.version"]["status"] == "FAIL"
    assert "1.6.20" in checks["containerd.version"]["message"]


def test_doctor_fails_without_overlay_in_the_kernel(capsys, node, containerd, tmp_path):
    containerd("2")
    doctor.HOST.proc_filesystems.write_text("nodev\tsysfs\n\text4\n")
    code, checks = doctor_json(capsys, node, good_config(node), tmp_path)
    assert code == 1
    assert checks["kernel.overlay"]["status"] == "FAIL"
    assert "modprobe overlay" in checks["kernel.overlay"]["advice"]


def test_doctor_warns_when_the_overlay_module_enables_metacopy(capsys, node, containerd, host, tmp_path):
    containerd("2")
    (host / "metacopy").write_text("Y\n")
    _, checks = doctor_json(capsys, node, good_config(node), tmp_path)
    check = checks["kernel.overlay.metacopy"]
    assert check["status"] == "WARN"
    assert '"metacopy=off" to [snapshotter] mount_options' in check["advice"]


def test_doctor_fails_inside_a_user_namespace_on_a_kernel_before_511(
        capsys, node, containerd, monkeypatch, tmp_path):
    containerd("2")
    monkeypatch.setattr(doctor, "HOST", doctor.Host(doctor.HOST.proc_filesystems, doctor.HOST.overlay_parameters,
                                                    in_user_namespace=True, kernel=(5, 10)))
    _, checks = doctor_json(capsys, node, good_config(node), tmp_path)
    assert checks["kernel.overlay.userxattr"]["status"] == "FAIL"


def test_doctor_prints_one_line_per_check_with_its_status_and_advice(capsys, node, containerd, tmp_path):
    containerd("2")
    path = tmp_path / "containerd.toml"
    path.write_text(good_config(node).replace("disable = false", "disable = true"))
    code, out, _ = run(capsys, node, "doctor", "--containerd-config", str(path))
    assert code == 1
    lines = out.splitlines()
    nri = [line for line in lines if " containerd.config.nri " in line]
    assert len(nri) == 1 and nri[0].startswith("FAIL ") and "-- fix: add disable = false" in nri[0]
    assert all(line.split()[0] in ("OK", "WARN", "FAIL") for line in lines[:-1])
    assert lines[-1].endswith("OK") and "FAIL" in lines[-1]


def test_doctor_changes_nothing(capsys, node, containerd, tmp_path):
    containerd("2")

    def tree(root: Path) -> dict[str, tuple[int, int]]:
        return {str(p): (stat.S_IMODE(p.lstat().st_mode), p.lstat().st_size) for p in root.rglob("*")
                if not p.name.startswith("metadata.db")}
    before = tree(tmp_path)
    doctor_json(capsys, node, good_config(node), tmp_path)
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k not in before and not k.endswith("containerd.toml")} == {}


def test_doctor_fails_when_a_daemon_accepts_connections_but_never_answers(capsys, node, containerd, tmp_path):
    containerd("2")
    wedged = listening_socket(node.snapshotter_socket)  # never accepts nor answers: a wedged daemon
    try:
        code, checks = doctor_json(capsys, node, good_config(node), tmp_path)
    finally:
        wedged.close()
    assert code == 1
    assert checks["socket.snapshotter"]["status"] == "OK"
    check = checks["health.snapshotter"]
    assert check["status"] == "FAIL" and "wedged" in check["message"]
    assert "systemctl restart pysnap-snapshotter.service" in check["advice"]
