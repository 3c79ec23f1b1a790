"""Fixtures for the end-to-end tests against real containerd (1.7.24 and 2.1.9).

Session: the test images (tests/support/images.py) and a registry on 127.0.0.1 holding them.
Module, once per containerd version: `pysnap serve snapshotter` (started first), then an isolated containerd whose
config holds `pysnap config containerd --version V --snapshotter-address SOCK ...` verbatim.  Tests of one module
share that stack, in file order: keep the test that removes every image last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from support import images as img
from support.containerd import VERSIONS, Containerd, mounts_under, unmount_all_under
from support.pysnapd import PysnapDaemon
from support.registry import Registry
from support.toolchain import require

SNAPSHOTTER = "pysnap"


@dataclass
class BuiltImages:
    busybox: img.Image
    multilayer: img.Image


@dataclass
class Refs:
    busybox: str
    multilayer: str


@dataclass
class Stack:
    version: str
    workdir: Path
    containerd: Containerd
    daemon: PysnapDaemon
    refs: Refs
    content: PysnapDaemon | None = None  # `pysnap serve content`, when the stack uses pysnap's content store

    snapshotter = SNAPSHOTTER

    @property
    def snapshotter_root(self) -> Path:
        return self.daemon.root

    @property
    def overlayfs_root(self) -> Path:
        return self.containerd.root / "io.containerd.snapshotter.v1.overlayfs"

    def ctr(self, *args: str, **kwargs):
        return self.containerd.ctr(*args, **kwargs)


@pytest.fixture(scope="session")
def test_images() -> BuiltImages:
    busybox = require("PYSNAP_BUSYBOX")
    return BuiltImages(busybox=img.busybox_image(busybox), multilayer=img.multilayer_image(busybox))


@pytest.fixture(scope="session")
def refs(tmp_path_factory: pytest.TempPathFactory, test_images: BuiltImages):
    """References of the test images in a registry on 127.0.0.1 that lives for the session."""
    with Registry(require("PYSNAP_REGISTRY"), tmp_path_factory.mktemp("registry")) as registry:
        yield Refs(busybox=registry.push(test_images.busybox, "e2e/busybox"),
                   multilayer=registry.push(test_images.multilayer, "e2e/multilayer"))


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, refs: Refs):
    version = request.param
    workdir = tmp_path_factory.mktemp(f"e2e-{version}")
    daemon = PysnapDaemon(workdir / "pysnap-root", workdir / "pysnap.sock", workdir / "pysnap.log")
    daemon.start()
    containerd = Containerd(version, workdir / "containerd", snapshotter_address=daemon.address,
                            snapshotter_root=daemon.root)
    try:
        containerd.start()
        yield Stack(version, workdir, containerd, daemon, refs)
    finally:
        try:
            containerd.stop()
        finally:
            daemon.stop()
            unmount_all_under(workdir)
    assert not mounts_under(workdir)
    assert daemon.returncode == 0, f"pysnap exited {daemon.returncode} on SIGTERM; log:\n{daemon.log_tail()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On failure, attach the tails of the pysnap and containerd logs of the stack the test used."""
    outcome = yield
    report = outcome.get_result()
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(stack, Stack):
        report.sections.append((f"pysnap log ({stack.daemon.log_path})", stack.daemon.log_tail(80)))
        if stack.content is not None:
            report.sections.append((f"pysnap content log ({stack.content.log_path})", stack.content.log_tail(80)))
        report.sections.append((f"containerd {stack.version} log ({stack.containerd.log_path})",
                                stack.containerd.log_tail(80)))
