"""Fixtures shared by the unit tests of the snapshotter."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pysnap.config import SnapshotterConfig
from snapshot_helpers import HOST_FEATURES, FakeClock
from snapshotter.kernel import OverlayFeatures
from snapshotter.overlay import OverlaySnapshotter


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeSnapshotter = Callable[..., OverlaySnapshotter]


@pytest.fixture
def make_snapshotter(tmp_path: Path) -> Iterator[MakeSnapshotter]:
    """``make(root=None, *, features=HOST_FEATURES, clock=time.time_ns, **config)``.

    Every snapshotter made is closed at teardown (closing twice is harmless).
    """
    made: list[OverlaySnapshotter] = []

    def make(
        root: Path | None = None,
        *,
        features: OverlayFeatures = HOST_FEATURES,
        clock: Callable[[], int] = time.time_ns,
        **config,
    ) -> OverlaySnapshotter:
        config.setdefault("durable_metadata", False)
        cfg = SnapshotterConfig(root=root or tmp_path / "root", **config)
        snapshotter = OverlaySnapshotter(cfg, features, clock)
        made.append(snapshotter)
        return snapshotter

    yield make
    for snapshotter in made:
        snapshotter.close()


@pytest.fixture
def sn(make_snapshotter: MakeSnapshotter, clock: FakeClock) -> OverlaySnapshotter:
    """A snapshotter on ``tmp_path/root`` with host features and the fake ``clock``."""
    return make_snapshotter(clock=clock)


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a short path, for unix sockets (sun_path holds only 107 bytes)."""
    path = tmp_path_factory.mktemp("s", numbered=True)
    assert len(str(path)) < 70, path
    return path
