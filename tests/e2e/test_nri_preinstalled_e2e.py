"""pysnap's NRI plugin pre-registered: containerd launches it from its plugin directory and
hands it the NRI socket as fd 3 (NRI_PLUGIN_SOCKET), on containerd 1.7.24 and 2.1.9."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from support.containerd import PYSNAP, VERSIONS, Containerd

pytestmark = pytest.mark.e2e

REGISTERED = "registered with the runtime as 10-pysnap"


def processes_running(marker: str) -> list[int]:
    """pids whose command line mentions ``marker`` (a path unique to this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def wait_for(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {timeout}s:\n" + (
            path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)")
        time.sleep(0.1)


@pytest.mark.parametrize("version", VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def test_containerd_launches_the_plugin_which_registers_and_exits_with_containerd(version, tmp_path):
    config, log = tmp_path / "pysnap-nri.toml", tmp_path / "nri-plugin.log"
    config.write_text(f"[nri]\nmount_root = {json.dumps(str(tmp_path / 'mounts'))}\n")
    containerd = Containerd(version, tmp_path / "containerd", nri=True)
    containerd.nri_plugin_path.mkdir(parents=True)
    launcher = containerd.nri_plugin_path / "10-pysnap"
    launcher.write_text(f"#!/bin/sh\nexec {PYSNAP} --config {config} serve nri >>{log} 2>&1\n")
    launcher.chmod(0o755)
    containerd.start()
    try:
        wait_for(log, REGISTERED)
        assert processes_running(str(config)), "the launched plugin is not running"
    finally:
        containerd.stop()
    deadline = time.monotonic() + 20
    while processes_running(str(config)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_running(str(config)), "the launched plugin outlived containerd"
