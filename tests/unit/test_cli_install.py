"""Specification of `pysnap install` on a scratch root (--prefix)."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pysnap import install
from pysnap.cli import main
from pysnap.config import Config
from support.toolchain import require

REPO = Path(__file__).resolve().parents[2]
VENV_PYSNAP = Path(sys.executable).parent / "pysnap"
UNITS = ("pysnap-snapshotter.service", "pysnap-content.service", "pysnap-nri.service")
DEBIAN_MAIN = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""  # what Debian's containerd packages (1.7.24 and 2.1.9 alike) ship as /etc/containerd/config.toml


def run(capsys, root: Path, *args: str, version: str = "2") -> tuple[int, str, str]:
    argv = ["install", "--prefix", str(root), *args]
    if version:
        argv += ["--containerd-version", version]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree(root: Path) -> dict[str, tuple]:
    """Everything under ``root``: path → (kind, content or link target, mode)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path), None)
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", None, stat.S_IMODE(st.st_mode))
            else:
                found[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return found


def at(root: Path, path) -> Path:
    return root / str(path).lstrip("/")


def write(root: Path, path, text: str) -> Path:
    target = at(root, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def imports_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"\s*imports\s*=", line)]


# -------------------------------------------------------------------------- dry run, writes, idempotence

def test_dry_run_on_a_scratch_root_prints_a_diff_of_every_file_and_writes_nothing(capsys, tmp_path):
    write(tmp_path, install.CONTAINERD_CONFIG, DEBIAN_MAIN)
    before = tree(tmp_path)
    code, out, _ = run(capsys, tmp_path, "--dry-run")
    assert code == 0
    assert tree(tmp_path) == before
    for path in [*(install.UNIT_DIR / u for u in UNITS), install.CONFIG, install.DROPIN, install.BIN]:
        assert f"--- /dev/null\n+++ {path}\n" in out, path
    assert f"--- {install.CONTAINERD_CONFIG}\n+++ {install.CONTAINERD_CONFIG}\n" in out
    assert f'+imports = ["{install.IMPORTS_GLOB}"]' in out
    assert "+ExecStart=/usr/local/bin/pysnap --config /etc/pysnap/config.toml serve snapshotter" in out
    assert "nothing written" in out


def test_install_writes_units_config_dropin_imports_line_and_the_binary_link(capsys, tmp_path):
    code, out, _ = run(capsys, tmp_path)
    assert code == 0, out
    for name in UNITS:
        installed = at(tmp_path, install.UNIT_DIR / name)
        assert installed.read_text() == (REPO / "systemd" / name).read_text()
        assert stat.S_IMODE(installed.stat().st_mode) == 0o644
    assert os.readlink(at(tmp_path, install.BIN)) == str(VENV_PYSNAP)
    assert Config.from_toml(at(tmp_path, install.CONFIG).read_text()) == Config()
    dropin = tomllib.loads(at(tmp_path, install.DROPIN).read_text())
    assert dropin["version"] == 3
    assert set(dropin["proxy_plugins"]) == {"pysnap", "pysnap-content"}
    assert dropin["disabled_plugins"] == ["io.containerd.content.v1.content"]
    assert dropin["plugins"]["io.containerd.nri.v1.nri"] == {"disable": False}
    main_config = tomllib.loads(at(tmp_path, install.CONTAINERD_CONFIG).read_text())
    assert main_config == {"version": 3, "imports": ["/etc/containerd/conf.d/*.toml"]}


def test_install_enables_the_units_exactly_as_systemctl_enable_would(capsys, tmp_path):
    assert run(capsys, tmp_path)[0] == 0
    systemctl = shutil.which("systemctl")
    assert systemctl, "systemctl is missing: scripts/provision.sh installs the systemd package"
    for name in UNITS:
        result = subprocess.run([systemctl, f"--root={tmp_path}", "is-enabled", name],
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "enabled", (name, result.stdout, result.stderr)
        link = at(tmp_path, install.UNIT_DIR / "containerd.service.wants" / name)
        assert os.readlink(link) == str(install.UNIT_DIR / name)


def test_a_second_install_changes_nothing_and_says_so(capsys, tmp_path):
    write(tmp_path, install.CONTAINERD_CONFIG, DEBIAN_MAIN)
    assert run(capsys, tmp_path)[0] == 0
    before = tree(tmp_path)
    code, out, _ = run(capsys, tmp_path)
    assert code == 0
    assert tree(tmp_path) == before
    assert "nothing to change" in out
    code, out, _ = run(capsys, tmp_path, "--dry-run")
    assert (code, tree(tmp_path)) == (0, before)
    assert "nothing to change" in out and "---" not in out


def test_an_existing_operator_config_is_kept_and_its_sockets_are_wired_in(capsys, tmp_path):
    mine = '[snapshotter]\naddress = "/run/mine/snap.sock"\nroot = "/srv/snapshots"\n'
    write(tmp_path, install.CONFIG, mine)
    code, out, _ = run(capsys, tmp_path)
    assert code == 0
    assert at(tmp_path, install.CONFIG).read_text() == mine
    assert str(install.CONFIG) not in out
    plugin = tomllib.loads(at(tmp_path, install.DROPIN).read_text())["proxy_plugins"]["pysnap"]
    assert plugin["address"] == "/run/mine/snap.sock"
    assert plugin["exports"]["root"] == "/srv/snapshots"


def test_an_invalid_operator_config_stops_install_before_anything_is_written(capsys, tmp_path):
    write(tmp_path, install.CONFIG, "[snapshotter]\nno_such_key = 1\n")
    before = tree(tmp_path)
    code, _, err = run(capsys, tmp_path)
    assert code == 2 and "no_such_key" in err
    assert tree(tmp_path) == before


# -------------------------------------------------------------------------- containerd's main config

MAIN_CONFIGS = {
    "absent": None,
    "debian": DEBIAN_MAIN,
    "imports-one-line": 'version = 3\nimports = ["/etc/containerd/other.d/*.toml"]\n\n[plugins]\n',
    "imports-multi-line": 'version = 3\nimports = [\n  "/a.toml",  # first\n  "/b.toml"\n]\n[grpc]\n  gid = 5\n',
    "imports-already": 'version = 3\nimports = ["conf.d/*.toml"]\n',
    "version-not-first": 'root = "/var/lib/containerd"  # x\nversion = 3\n[plugins."io.containerd.internal.v1.opt"]\n'
                         '  path = "/opt/x"\n',
}


@pytest.mark.parametrize("case", MAIN_CONFIGS)
def test_the_containerd_main_config_gets_exactly_one_imports_line_covering_the_dropin(capsys, tmp_path, case):
    if MAIN_CONFIGS[case] is not None:
        write(tmp_path, install.CONTAINERD_CONFIG, MAIN_CONFIGS[case])
    for _ in range(2):
        assert run(capsys, tmp_path)[0] == 0
    text = at(tmp_path, install.CONTAINERD_CONFIG).read_text()
    assert len(imports_lines(text)) == 1, text
    data = tomllib.loads(text)
    covering = [p for p in data["imports"] if install._import_covers(p)]
    assert len(covering) == 1, data["imports"]
    original = tomllib.loads(MAIN_CONFIGS[case] or "")
    for key, value in original.items():  # nothing else changed
        if key != "imports":
            assert data[key] == value
    assert set(original.get("imports", [])) <= set(data["imports"])


def test_an_edited_containerd_config_is_backed_up_first_and_only_once(capsys, tmp_path):
    write(tmp_path, install.CONTAINERD_CONFIG, DEBIAN_MAIN)
    run(capsys, tmp_path)
    run(capsys, tmp_path)
    backups = list(at(tmp_path, install.CONTAINERD_CONFIG).parent.glob("config.toml.pysnap-backup-*"))
    assert len(backups) == 1
    assert backups[0].read_text() == DEBIAN_MAIN
    assert not list(at(tmp_path, install.DROPIN_DIR).glob("*backup*")), "a backup there would be imported"


def test_an_unparsable_containerd_config_is_refused_and_left_alone(capsys, tmp_path):
    write(tmp_path, install.CONTAINERD_CONFIG, "version = 2\n[plugins\n")
    before = tree(tmp_path)
    code, _, err = run(capsys, tmp_path)
    assert code == 1 and "not valid TOML" in err
    assert tree(tmp_path) == before


def test_a_version_1_containerd_config_is_refused_with_the_fix(capsys, tmp_path):
    write(tmp_path, install.CONTAINERD_CONFIG, "[plugins.cri]\n  sandbox_image = 'x'\n")
    before = tree(tmp_path)
    code, _, err = run(capsys, tmp_path, version="1.7")
    assert code == 1 and "version = 2" in err and "containerd config migrate" in err
    assert tree(tmp_path) == before


def test_on_containerd_17_nri_is_switched_on_inside_an_existing_nri_section_keeping_its_keys(capsys, tmp_path):
    main_text = DEBIAN_MAIN + '  [plugins."io.containerd.nri.v1.nri"]\n    disable = true\n' \
                              '    plugin_request_timeout = "3s"\n'
    write(tmp_path, install.CONTAINERD_CONFIG, main_text)
    assert run(capsys, tmp_path, version="1.7")[0] == 0
    nri = tomllib.loads(at(tmp_path, install.CONTAINERD_CONFIG).read_text())["plugins"]["io.containerd.nri.v1.nri"]
    assert nri == {"disable": False, "plugin_request_timeout": "3s"}
    # 1.7 replaces a whole plugin section from an import: the drop-in must not carry one
    assert "plugins" not in tomllib.loads(at(tmp_path, install.DROPIN).read_text())


def test_on_containerd_2_the_dropin_keeps_the_main_files_own_unpack_config_entries(capsys, tmp_path):
    write(tmp_path, install.CONTAINERD_CONFIG, 'version = 3\n[[plugins."io.containerd.transfer.v1.local".'
                                               'unpack_config]]\n  platform = "linux/arm64"\n'
                                               '  snapshotter = "zfs"\n  differ = "walking"\n')
    assert run(capsys, tmp_path)[0] == 0
    dropin = tomllib.loads(at(tmp_path, install.DROPIN).read_text())
    entries = dropin["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert {e["snapshotter"] for e in entries} == {"overlayfs", "pysnap", "zfs"}


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_containerd_sees_pysnap_through_the_imports_line(capsys, tmp_path, version):
    """The real containerd binary merges the installed files as intended (`containerd config dump`)."""
    binary = Path(require("PYSNAP_CONTAINERD_17" if version == "1.7" else "PYSNAP_CONTAINERD_21")) / "containerd"
    main_text = DEBIAN_MAIN
    if version == "1.7":
        main_text += '  [plugins."io.containerd.nri.v1.nri"]\n    plugin_request_timeout = "3s"\n'
    write(tmp_path, install.CONTAINERD_CONFIG, main_text)
    assert run(capsys, tmp_path, version=version)[0] == 0
    # the imports entry is absolute on the node: point a copy of the main file at the scratch root
    installed = at(tmp_path, install.CONTAINERD_CONFIG).read_text()
    main_copy = tmp_path / "main-for-dump.toml"
    main_copy.write_text(installed.replace(str(install.DROPIN_DIR), str(at(tmp_path, install.DROPIN_DIR))))
    result = subprocess.run([str(binary), "--config", str(main_copy), "config", "dump"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    merged = tomllib.loads(result.stdout)
    assert "io.containerd.content.v1.content" in merged["disabled_plugins"]
    assert merged["proxy_plugins"]["pysnap"]["address"] == "/run/pysnap/snapshotter.sock"
    assert merged["proxy_plugins"]["pysnap-content"]["type"] == "content"
    nri = merged["plugins"]["io.containerd.nri.v1.nri"]
    assert nri["disable"] is False
    assert merged["plugins"]["io.containerd.internal.v1.opt"]["path"] == "/var/lib/containerd/opt"
    if version == "1.7":
        assert nri["plugin_request_timeout"] == "3s"
        assert merged["plugins"]["io.containerd.grpc.v1.cri"]["cni"]["bin_dir"] == "/usr/lib/cni"
    else:
        snapshotters = {e["snapshotter"] for e in
                        merged["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]}
        assert {"overlayfs", "pysnap"} <= snapshotters


# -------------------------------------------------------------------------- components and NRI modes

def test_with_installs_only_the_chosen_daemons(capsys, tmp_path):
    assert run(capsys, tmp_path, "--with", "snapshotter")[0] == 0
    unit_dir = at(tmp_path, install.UNIT_DIR)
    assert sorted(p.name for p in unit_dir.glob("*.service")) == ["pysnap-snapshotter.service"]
    dropin = tomllib.loads(at(tmp_path, install.DROPIN).read_text())
    assert set(dropin["proxy_plugins"]) == {"pysnap"}
    assert "disabled_plugins" not in dropin
    assert "io.containerd.nri.v1.nri" not in dropin.get("plugins", {})


def test_an_unknown_daemon_in_with_is_refused_and_nothing_is_written(capsys, tmp_path):
    code, _, err = run(capsys, tmp_path, "--with", "snapshotter,bogus")
    assert code == 1 and "bogus" in err
    assert tree(tmp_path) == {}


def test_preinstalled_nri_mode_writes_an_nn_name_launcher_instead_of_the_unit(capsys, tmp_path):
    assert run(capsys, tmp_path, "--nri-mode", "preinstalled")[0] == 0
    plugins = at(tmp_path, install.NRI_PLUGIN_DIR)
    entries = list(plugins.iterdir())
    assert [p.name for p in entries] == ["10-pysnap"]
    assert re.fullmatch(r"[0-9]{2}-[a-z0-9-]+", entries[0].name)
    assert stat.S_IMODE(entries[0].stat().st_mode) == 0o755
    assert not at(tmp_path, install.UNIT_DIR / "pysnap-nri.service").exists()
    assert at(tmp_path, install.UNIT_DIR / "pysnap-snapshotter.service").exists()
    assert at(tmp_path, install.LOGROTATE).exists()


def test_the_launcher_execs_pysnap_by_absolute_path_and_logs_to_a_file(capsys, tmp_path):
    assert run(capsys, tmp_path, "--nri-mode", "preinstalled")[0] == 0
    script = at(tmp_path, install.NRI_PLUGIN_DIR / "10-pysnap").read_text()
    assert script.startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    exec_line = [line for line in script.splitlines() if line.startswith("exec ")]
    assert len(exec_line) == 1
    argv = exec_line[0].split()
    assert argv[1] == str(install.BIN) and argv[-4:-2] == ["serve", "nri"]
    assert argv[-2] == f">>{install.NRI_LOG}" and argv[-1] == "2>&1"
    assert re.search(r"^PATH=/", script, re.M), "containerd passes no PATH; mount(8) needs one"


def test_the_launcher_starts_pysnap_with_only_containerds_three_variables_and_no_stdio(tmp_path):
    """Run as containerd runs it: env -i with the NRI_* variables, no stdio; it must start pysnap."""
    script = install.launcher_text(Config().nri)
    log = tmp_path / "nri.log"
    fake_bin = tmp_path / "pysnap"
    fake_bin.write_text("#!/bin/sh\necho \"argv: $*\"\necho \"PATH=$PATH NRI_PLUGIN_SOCKET=$NRI_PLUGIN_SOCKET\"\n")
    fake_bin.chmod(0o755)
    launcher = tmp_path / "10-pysnap"
    launcher.write_text(script.replace(str(install.BIN), str(fake_bin))
                              .replace(str(install.NRI_LOG.parent), str(tmp_path))
                              .replace(str(install.NRI_LOG), str(log)))
    launcher.chmod(0o755)
    result = subprocess.run(["env", "-i", "NRI_PLUGIN_NAME=pysnap", "NRI_PLUGIN_IDX=10", "NRI_PLUGIN_SOCKET=3",
                             str(launcher)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=30, cwd="/")
    assert result.returncode == 0
    text = log.read_text()
    assert "argv: --config /etc/pysnap/config.toml serve nri" in text
    assert "NRI_PLUGIN_SOCKET=3" in text and "PATH=/usr/local/sbin:" in text


def test_switching_nri_mode_disables_or_removes_the_other_modes_files(capsys, tmp_path):
    assert run(capsys, tmp_path)[0] == 0
    wants = at(tmp_path, install.UNIT_DIR / "containerd.service.wants" / "pysnap-nri.service")
    assert wants.is_symlink()
    code, out, _ = run(capsys, tmp_path, "--nri-mode", "preinstalled")
    assert code == 0
    assert not os.path.lexists(wants)
    assert "systemctl stop pysnap-nri.service" in out
    assert at(tmp_path, install.NRI_PLUGIN_DIR / "10-pysnap").exists()
    assert run(capsys, tmp_path, "--nri-mode", "external")[0] == 0
    assert wants.is_symlink()
    assert list(at(tmp_path, install.NRI_PLUGIN_DIR).iterdir()) == []
    assert not at(tmp_path, install.LOGROTATE).exists()


def test_a_foreign_nri_plugin_is_never_touched(capsys, tmp_path):
    other = write(tmp_path, install.NRI_PLUGIN_DIR / "05-other", "#!/bin/sh\nexec /usr/bin/other\n")
    other.chmod(0o755)
    assert run(capsys, tmp_path, "--nri-mode", "preinstalled")[0] == 0
    assert run(capsys, tmp_path, "--nri-mode", "external")[0] == 0
    assert other.read_text() == "#!/bin/sh\nexec /usr/bin/other\n"


def test_a_plugin_name_unfit_for_a_launcher_file_name_is_refused(capsys, tmp_path):
    write(tmp_path, install.CONFIG, '[nri]\nplugin_name = "Py Snap"\n')
    before = tree(tmp_path)
    code, _, err = run(capsys, tmp_path, "--nri-mode", "preinstalled")
    assert code == 1 and "plugin_name" in err
    assert tree(tmp_path) == before
