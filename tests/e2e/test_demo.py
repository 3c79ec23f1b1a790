"""The README's main job, `scripts/demo.sh`, runs headless end to end."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from support.containerd import mounts_under

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_runs_end_to_end_and_leaves_nothing_behind():
    before = set(Path("/tmp").glob("pysnap-demo-*"))
    proc = subprocess.run([str(REPO / "scripts" / "demo.sh")], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    for step in ("ctr images pull", "hello from a pysnap rootfs", "weights of a very small model",
                 "Read-only file system", "nothing left mounted", "demo finished"):
        assert step in proc.stdout, f"{step!r} missing from the demo's output:\n{proc.stdout[-4000:]}"
    new = set(Path("/tmp").glob("pysnap-demo-*")) - before
    assert not new, f"the demo left its sandbox behind: {new}"
    assert not [m for m in mounts_under("/tmp") if "pysnap-demo-" in m]
