"""containerd 1.7.24's snapshots/testsuite against `pysnap serve snapshotter` through
containerd's snapshots proxy client, one fresh pysnap process per case (semantics.md D1)."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.gosuite import run_suite

pytestmark = pytest.mark.conformance

SUBTESTS = (
    "Basic", "StatActive", "StatComitted", "TransitivityTest", "PreareViewFailingtest", "Update",
    "Remove", "Walk", "LayerFileupdate", "RemoveDirectoryInLowerLayer", "Chown",
    "DirectoryPermissionOnCommit", "RemoveIntermediateSnapshot", "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer", "ViewReadonly", "StatInWalk", "CloseTwice", "RootPermission", "Rename",
    "128LayersMount",
)


def test_every_case_of_containerds_snapshotter_suite_passes(tmp_path: Path) -> None:
    run_suite("TestSnapshotterSuite", SUBTESTS, tmp_path, needs_root=True)
