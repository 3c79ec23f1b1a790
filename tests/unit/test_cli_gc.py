"""Specification of ``pysnap gc``: remove what no metadata owns, nothing else."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from cli_helpers import age_ingest, damage_table, make_node, run, run_json, start_ingest, write_blob
from snapshotter import maintenance
from snapshotter.kernel import MountEntry

ORPHANS = ("new-abc123", "stale-7-1700000000", "reaping-0f0f", "42")


@pytest.fixture
def node(tmp_path: Path, short_tmp: Path):
    return make_node(tmp_path, short_tmp)


@pytest.fixture
def live(node):
    """A committed layer, an active snapshot and a view on it; one blob."""
    sn = node.snapshotter()
    sn.prepare("extract")
    (sn.upper_dir(1) / "file").write_text("content")
    sn.commit("layer", "extract")
    sn.prepare("container", "layer")
    sn.view("view", "layer")
    sn.close()
    store = node.content()
    write_blob(store, b"a blob")
    store.close()
    return node


def make_orphans(node) -> None:
    snapshots = node.snapshotter_root / "snapshots"
    for name in ORPHANS:
        (snapshots / name / "fs").mkdir(parents=True)
        (snapshots / name / "fs" / "junk").write_bytes(b"x" * 5000)


def listing(node) -> list[str]:
    return sorted(os.listdir(node.snapshotter_root / "snapshots"))


def test_gc_removes_orphan_directories_and_leaves_live_snapshots(capsys, live):
    node = live
    make_orphans(node)
    code, out, _ = run(capsys, node, "gc")
    assert code == 0
    assert listing(node) == ["1", "2", "3"]
    for name in ORPHANS:
        assert f"removed      snapshotter snapshot-directory {name} " in out
    assert (node.snapshotter_root / "snapshots" / "1" / "fs" / "file").read_text() == "content"
    assert (node.snapshotter_root / "snapshots" / "2" / "work").is_dir()


def test_gc_dry_run_removes_nothing_and_says_what_it_would_remove(capsys, live):
    node = live
    make_orphans(node)
    code, report = run_json(capsys, node, "gc", "--dry-run")
    assert code == 0
    assert sorted(r["name"] for r in report["removed"]) == sorted(ORPHANS)
    assert not any(r["removed"] for r in report["removed"])
    assert listing(node) == sorted(["1", "2", "3", *ORPHANS])


def test_gc_json_lists_each_removal_with_its_size(capsys, live):
    node = live
    (node.snapshotter_root / "snapshots" / "new-1" / "fs").mkdir(parents=True)
    (node.snapshotter_root / "snapshots" / "new-1" / "fs" / "big").write_bytes(b"x" * 100_000)
    code, report = run_json(capsys, node, "gc")
    assert code == 0
    [removal] = report["removed"]
    assert (removal["component"], removal["what"], removal["name"], removal["removed"]) == (
        "snapshotter", "snapshot-directory", "new-1", True)
    assert removal["bytes"] >= 100_000


def test_gc_removes_ingests_untouched_for_longer_than_ingest_age_and_keeps_fresh_ones(capsys, live):
    node = live
    store = node.content()
    old = start_ingest(store, "abandoned-pull", b"partial", total=1000)
    fresh = start_ingest(store, "running-pull", b"partial", total=1000)
    store.close()
    age_ingest(old, 3 * 3600)
    code, report = run_json(capsys, node, "gc", "--ingest-age", "2h")
    assert code == 0
    assert [(r["what"], r["name"]) for r in report["removed"]] == [("ingest", "abandoned-pull")]
    assert not old.exists() and fresh.is_dir()


def test_gc_keeps_ingests_younger_than_the_default_24h(capsys, live):
    node = live
    store = node.content()
    directory = start_ingest(store, "slow-pull", b"partial", total=1000)
    store.close()
    age_ingest(directory, 23 * 3600)
    code, report = run_json(capsys, node, "gc")
    assert (code, report["removed"]) == (0, [])
    assert directory.is_dir()


def test_gc_never_touches_blobs(capsys, live):
    node = live
    before = sorted((node.content_root / "blobs" / "sha256").iterdir())
    run(capsys, node, "gc", "--ingest-age", "0")
    assert sorted((node.content_root / "blobs" / "sha256").iterdir()) == before


def test_gc_rejects_a_malformed_ingest_age_with_exit_2(capsys, live):
    with pytest.raises(SystemExit) as exc:
        run(capsys, live, "gc", "--ingest-age", "soon")
    assert exc.value.code == 2


def test_gc_keeps_an_orphan_an_overlay_still_uses_as_a_layer(live):
    node = live
    orphan = node.snapshotter_root / "snapshots" / "42"
    (orphan / "fs").mkdir(parents=True)
    mounts = [MountEntry("/run/containerd/rootfs", "overlay", "overlay",
                         f"rw,lowerdir={orphan}/fs:{node.snapshotter_root}/snapshots/1/fs,"
                         f"upperdir=/x/fs,workdir=/x/work")]
    [removal] = maintenance.remove_orphans(node.snapshotter_root, mounts=mounts)
    assert not removal.removed and "uses it as a layer" in removal.error
    assert orphan.is_dir()


def test_gc_while_the_snapshotter_is_open_leaves_it_working(capsys, live):
    node = live
    sn = node.snapshotter()  # as the daemon holds it: connection open, reaper thread running
    try:
        make_orphans(node)
        assert run(capsys, node, "gc")[0] == 0
        sn.prepare("next", "layer")
        assert listing(node) == ["1", "2", "3", "4"]
        assert sn.stat("next").parent == "layer"
    finally:
        sn.close()


def test_gc_exits_1_and_says_why_when_the_root_is_not_a_pysnap_root(capsys, node):
    node.snapshotter_root.mkdir()
    code, out, _ = run(capsys, node, "gc")
    assert code == 1
    assert "not a pysnap snapshotter root" in out


def test_gc_on_a_node_without_roots_has_nothing_to_do(capsys, node):
    code, report = run_json(capsys, node, "gc")
    assert (code, report["removed"], report["errors"]) == (0, [], [])


def test_gc_keeps_every_directory_that_has_a_row(capsys, live):
    node = live
    with sqlite3.connect(node.snapshotter_root / "metadata.db") as db:
        ids = {str(row[0]) for row in db.execute("SELECT id FROM snapshots")}
    run(capsys, node, "gc")
    assert ids <= set(listing(node))


def test_gc_removes_nothing_when_the_snapshot_metadata_is_damaged(capsys, live):
    node = live
    make_orphans(node)
    damage_table(node.snapshotter_root / "metadata.db", "snapshots")
    code, out, _ = run(capsys, node, "gc")
    assert code == 1
    assert "not removing anything" in out
    assert listing(node) == sorted(["1", "2", "3", *ORPHANS])
