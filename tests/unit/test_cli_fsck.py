"""Specification of ``pysnap fsck``: blob digests and snapshot metadata against the disk.

Roots are made by the real OverlaySnapshotter and ContentStore; damage is done by
hand, as a disk fault, a crash or an operator would do it.
"""
from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import pytest

from cli_helpers import (
    age_ingest, corrupt, damage_table, listening_socket, make_node, run, run_json, sha256, start_ingest, write_blob,
)
from pysnap.progress import Progress


@pytest.fixture
def node(tmp_path: Path, short_tmp: Path):
    return make_node(tmp_path, short_tmp)


@pytest.fixture
def populated(node):
    """Two blobs, and a committed layer with an active snapshot and a view on it."""
    store = node.content()
    digests = [write_blob(store, b"layer one" * 1000), write_blob(store, b"config")]
    store.close()
    sn = node.snapshotter()
    sn.prepare("extract")
    (sn.upper_dir(1) / "file").write_text("content")
    sn.commit("layer", "extract")
    sn.prepare("container", "layer")
    sn.view("view", "layer")
    sn.close()
    return node, digests


def blob_path(node, digest: str) -> Path:
    algorithm, _, hex_part = digest.partition(":")
    return node.content_root / "blobs" / algorithm / hex_part


def findings(report: dict, problem: str) -> list[dict]:
    return [f for f in report["findings"] if f["problem"] == problem]


def blob_rows(node) -> set[str]:
    with sqlite3.connect(node.content_root / "metadata.db") as db:
        return {row[0] for row in db.execute("SELECT digest FROM blobs")}


def snapshot_names(node) -> set[str]:
    with sqlite3.connect(node.snapshotter_root / "metadata.db") as db:
        return {row[0] for row in db.execute("SELECT name FROM snapshots")}


def test_fsck_of_sound_roots_finds_nothing_and_exits_0(capsys, populated):
    node, _ = populated
    code, report = run_json(capsys, node, "fsck")
    assert (code, report["findings"], report["outstanding"]) == (0, [], 0)


def test_fsck_detects_a_corrupted_blob_and_exits_1(capsys, populated):
    node, (digest, _) = populated
    corrupt(blob_path(node, digest), offset=10)
    code, report = run_json(capsys, node, "fsck")
    assert code == 1
    [finding] = findings(report, "corrupt-blob")
    assert finding["subject"] == digest
    assert finding["evidence"]["actual"] != digest


def test_fsck_without_repair_changes_nothing(capsys, populated):
    node, (digest, _) = populated
    corrupt(blob_path(node, digest))
    (node.snapshotter_root / "snapshots" / "42" / "fs").mkdir(parents=True)
    damaged = blob_path(node, digest).read_bytes()
    run(capsys, node, "fsck")
    assert blob_path(node, digest).read_bytes() == damaged
    assert digest in blob_rows(node)
    assert (node.snapshotter_root / "snapshots" / "42").is_dir()
    assert not (node.content_root / "quarantine").exists()


def test_fsck_repair_quarantines_a_corrupted_blob_and_drops_its_row(capsys, populated):
    node, (digest, other) = populated
    corrupt(blob_path(node, digest))
    damaged = blob_path(node, digest).read_bytes()
    code, report = run_json(capsys, node, "fsck", "--repair")
    assert code == 0
    assert findings(report, "corrupt-blob")[0]["repaired"]
    assert not blob_path(node, digest).exists()
    assert (node.content_root / "quarantine" / digest.replace(":", "-")).read_bytes() == damaged
    assert blob_rows(node) == {other}
    assert run(capsys, node, "fsck")[0] == 0


def test_fsck_detects_an_orphaned_snapshot_directory(capsys, populated):
    node, _ = populated
    (node.snapshotter_root / "snapshots" / "42" / "fs").mkdir(parents=True)
    code, report = run_json(capsys, node, "fsck")
    assert code == 1
    assert [f["subject"] for f in findings(report, "orphan-directory")] == ["42"]


def test_fsck_repair_removes_an_orphaned_snapshot_directory_and_keeps_the_snapshots(capsys, populated):
    node, _ = populated
    orphan = node.snapshotter_root / "snapshots" / "42"
    (orphan / "fs").mkdir(parents=True)
    (orphan / "fs" / "data").write_text("left behind")
    code, report = run_json(capsys, node, "fsck", "--repair")
    assert code == 0
    assert findings(report, "orphan-directory")[0]["repaired"]
    assert not orphan.exists()
    assert sorted(os.listdir(node.snapshotter_root / "snapshots")) == ["1", "2", "3"]
    assert snapshot_names(node) == {"layer", "container", "view"}


def test_fsck_repair_drops_the_row_of_a_blob_whose_file_is_gone(capsys, populated):
    node, (digest, other) = populated
    os.unlink(blob_path(node, digest))
    code, report = run_json(capsys, node, "fsck", "--repair")
    assert code == 0
    assert findings(report, "missing-file")[0]["subject"] == digest
    assert blob_rows(node) == {other}


def test_fsck_repair_records_a_sound_blob_file_that_has_no_row(capsys, populated):
    node, (digest, other) = populated
    with sqlite3.connect(node.content_root / "metadata.db") as db:
        db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
    assert run_json(capsys, node, "fsck")[1]["findings"][0]["problem"] == "unrecorded-blob"
    code, _ = run_json(capsys, node, "fsck", "--repair")
    assert code == 0
    assert blob_rows(node) == {digest, other}


def test_fsck_never_deletes_a_snapshot_whose_directory_is_missing(capsys, populated):
    node, _ = populated
    # Snapshot "view" (id 3) loses its directory: only containerd may remove the snapshot.
    import shutil
    shutil.rmtree(node.snapshotter_root / "snapshots" / "3")
    code, report = run_json(capsys, node, "fsck", "--repair")
    assert code == 1
    [finding] = findings(report, "missing-directory")
    assert (finding["subject"], finding["repaired"], finding["fix"]) == ("view", False, "")
    assert "containerd" in finding["advice"]
    assert "view" in snapshot_names(node)


def test_fsck_repair_recreates_the_work_directory_of_an_active_snapshot(capsys, populated):
    node, _ = populated
    work = node.snapshotter_root / "snapshots" / "2" / "work"
    work.rmdir()
    code, report = run_json(capsys, node, "fsck", "--repair")
    assert code == 0
    assert findings(report, "missing-workdir")[0]["subject"] == "container"
    assert work.is_dir()


def test_fsck_detects_a_broken_parent_chain(capsys, populated):
    node, _ = populated
    with sqlite3.connect(node.snapshotter_root / "metadata.db") as db:
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("UPDATE snapshots SET parent_id = 99 WHERE name = 'container'")
    code, report = run_json(capsys, node, "fsck", "--snapshotter")
    assert code == 1
    [finding] = findings(report, "broken-parent")
    assert finding["subject"] == "container"
    assert "no row" in finding["detail"]


def test_fsck_snapshotter_checks_only_the_snapshotter_root(capsys, populated):
    node, (digest, _) = populated
    corrupt(blob_path(node, digest))
    code, report = run_json(capsys, node, "fsck", "--snapshotter")
    assert (code, report["findings"], list(report["checked"])) == (0, [], ["snapshotter"])


def test_fsck_content_checks_only_the_content_root(capsys, populated):
    node, _ = populated
    (node.snapshotter_root / "snapshots" / "new-1234").mkdir()
    code, report = run_json(capsys, node, "fsck", "--content")
    assert (code, report["findings"], list(report["checked"])) == (0, [], ["content"])


def test_fsck_refuses_snapshotter_and_content_together_with_exit_2(capsys, populated):
    node, _ = populated
    with pytest.raises(SystemExit) as exc:
        run(capsys, node, "fsck", "--snapshotter", "--content")
    assert exc.value.code == 2


def test_fsck_reports_a_stale_ingest_as_a_warning_without_failing(capsys, populated):
    node, _ = populated
    store = node.content()
    directory = start_ingest(store, "pull-abandoned", b"partial", total=100)
    store.close()
    age_ingest(directory, 2 * 86400)
    code, report = run_json(capsys, node, "fsck", "--content")
    assert code == 0
    [finding] = findings(report, "stale-ingest")
    assert (finding["subject"], finding["severity"]) == ("pull-abandoned", "warning")


def test_fsck_repair_is_consistent_beside_open_stores(capsys, populated):
    node, (digest, other) = populated
    # As the daemons do, the stores keep their SQLite connections open while fsck repairs.
    store, sn = node.content(), node.snapshotter()
    try:
        corrupt(blob_path(node, digest))
        (node.snapshotter_root / "snapshots" / "new-crash").mkdir()
        assert run(capsys, node, "fsck", "--repair")[0] == 0
        assert not store.exists(digest) and store.exists(other)
        assert write_blob(store, b"layer one" * 1000) == digest  # a re-pull heals it
        sn.prepare("after-repair", "layer")
        assert {i.name for i in sn.list()} == {"layer", "container", "view", "after-repair"}
    finally:
        store.close()
        sn.close()
    assert run(capsys, node, "fsck")[0] == 0


def test_fsck_draws_no_progress_bar_when_stderr_is_not_a_terminal(capsys, populated):
    node, _ = populated
    _, _, err = run(capsys, node, "fsck")
    assert err == ""


def test_the_progress_bar_shows_count_total_and_throughput():
    stream = io.StringIO()
    ticks = iter([0.0, 1.0, 2.0, 2.0])
    progress = Progress("verifying blobs", 2, 4_000_000, stream=stream, enabled=True, clock=lambda: next(ticks))
    progress.advance(4_000_000, items=2)
    progress.close()
    line = stream.getvalue().strip().split("\r")[-1]
    assert "2/2" in line and "4.0/4.0 MB" in line and "2.0 MB/s" in line


def test_fsck_text_output_says_what_repair_would_do(capsys, populated):
    node, (digest, _) = populated
    corrupt(blob_path(node, digest))
    code, out, _ = run(capsys, node, "fsck")
    assert code == 1
    assert "corrupt-blob" in out and digest in out and "--repair will move it to" in out
    assert "`pysnap fsck --repair` fixes 1" in out


def test_a_blob_digest_is_checked_against_its_bytes_not_its_size(capsys, populated):
    node, _ = populated
    # Same size, other bytes: only hashing can tell.
    store = node.content()
    digest = write_blob(store, b"abcdef")
    store.close()
    corrupt(blob_path(node, digest), offset=5)
    assert sha256(blob_path(node, digest).read_bytes()) != digest
    code, report = run_json(capsys, node, "fsck", "--content")
    assert [f["subject"] for f in findings(report, "corrupt-blob")] == [digest]


def test_fsck_repair_removes_nothing_when_the_snapshot_metadata_is_damaged(capsys, populated):
    node, _ = populated
    damage_table(node.snapshotter_root / "metadata.db", "snapshots")
    code, report = run_json(capsys, node, "fsck", "--snapshotter", "--repair")
    assert code == 1
    assert findings(report, "corrupt-metadata") or report["errors"]
    assert sorted(os.listdir(node.snapshotter_root / "snapshots")) == ["1", "2", "3"]


def test_fsck_reports_damaged_blob_metadata_instead_of_crashing(capsys, populated):
    node, (digest, _) = populated
    damage_table(node.content_root / "metadata.db", "blobs")
    code, report = run_json(capsys, node, "fsck", "--content", "--repair")
    assert code == 1
    assert findings(report, "corrupt-metadata") or report["errors"]
    assert blob_path(node, digest).exists()


def test_fsck_refuses_content_repairs_while_the_content_daemon_answers(capsys, populated):
    node, (digest, _) = populated
    corrupt(blob_path(node, digest))
    daemon = listening_socket(node.content_socket)  # stands in for the running content daemon
    try:
        code, report = run_json(capsys, node, "fsck", "--repair")
    finally:
        daemon.close()
    assert code == 1
    [finding] = findings(report, "corrupt-blob")
    assert not finding["repaired"] and "stop it first" in finding["repair_error"]
    assert blob_path(node, digest).exists()


def test_fsck_repairs_content_under_a_running_daemon_with_force(capsys, populated):
    node, (digest, _) = populated
    corrupt(blob_path(node, digest))
    daemon = listening_socket(node.content_socket)
    try:
        code, report = run_json(capsys, node, "fsck", "--repair", "--force")
    finally:
        daemon.close()
    assert code == 0
    assert findings(report, "corrupt-blob")[0]["repaired"]
    assert not blob_path(node, digest).exists()


def test_fsck_repairs_the_snapshotter_while_its_daemon_answers(capsys, populated):
    node, _ = populated
    (node.snapshotter_root / "snapshots" / "new-crash").mkdir()
    daemon = listening_socket(node.snapshotter_socket)
    try:
        code, _ = run_json(capsys, node, "fsck", "--repair")
    finally:
        daemon.close()
    assert code == 0
    assert not (node.snapshotter_root / "snapshots" / "new-crash").exists()
