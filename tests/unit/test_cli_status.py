"""Specification of ``pysnap status``: counts, disk usage, ingests, daemons."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import age_ingest, make_node, run, run_json, start_daemon, start_ingest, stop_daemon, write_blob


@pytest.fixture
def node(tmp_path: Path, short_tmp: Path):
    return make_node(tmp_path, short_tmp)


@pytest.fixture
def populated(node):
    """2 committed, 1 active, 1 view; 3 blobs of 10 + 20 + 30 bytes; one open ingest."""
    sn = node.snapshotter()
    sn.prepare("a")
    sn.commit("A", "a")
    sn.prepare("b", "A")
    sn.commit("B", "b")
    sn.prepare("container", "B")
    sn.view("view", "A")
    sn.close()
    store = node.content()
    for size in (10, 20, 30):
        write_blob(store, bytes([size]) * size)
    start_ingest(store, "pull-1", b"x" * 7, total=100)
    store.close()
    return node


def test_status_json_has_the_counts(capsys, populated):
    code, report = run_json(capsys, populated, "status")
    assert code == 0
    snap, content = report["snapshotter"], report["content"]
    assert snap["snapshots"] == {"committed": 2, "active": 1, "view": 1}
    assert snap["total"] == 4
    assert (content["blobs"], content["blob_bytes"]) == (3, 60)
    [ingest] = content["ingests"]
    assert (ingest["ref"], ingest["offset"], ingest["total"]) == ("pull-1", 7, 100)
    assert 0 <= ingest["age_s"] < 60


def test_status_json_shows_the_age_of_an_old_ingest(capsys, populated):
    age_ingest(next((populated.content_root / "ingest").iterdir()), 3600)
    _, report = run_json(capsys, populated, "status")
    [ingest] = report["content"]["ingests"]
    assert 3590 < ingest["idle_s"] < 3700


def test_status_json_has_the_filesystem_of_each_root(capsys, populated):
    _, report = run_json(capsys, populated, "status")
    for part in ("snapshotter", "content"):
        fs = report[part]["filesystem"]
        assert fs["type"] and fs["total_bytes"] >= fs["free_bytes"] > 0


def test_status_du_walks_the_roots_for_their_real_usage(capsys, populated):
    (populated.snapshotter_root / "snapshots" / "3" / "fs" / "big").write_bytes(b"x" * 200_000)
    _, report = run_json(capsys, populated, "status", "--du")
    assert report["snapshotter"]["usage"]["bytes"] >= 200_000
    assert report["content"]["usage"]["inodes"] > 3


def test_status_counts_orphan_directories(capsys, populated):
    (populated.snapshotter_root / "snapshots" / "new-123").mkdir()
    code, out, _ = run(capsys, populated, "status")
    assert code == 0
    assert "1 directories without a snapshot (`pysnap gc` removes them)" in out


def test_status_reports_daemons_unreachable_when_their_sockets_are_missing(capsys, populated):
    _, report = run_json(capsys, populated, "status")
    assert report["snapshotter"]["daemon"]["reachable"] is False
    assert report["content"]["daemon"]["reachable"] is False


def test_status_reports_a_running_daemon_as_serving(capsys, populated, tmp_path):
    daemon = start_daemon(populated, "snapshotter", tmp_path / "snapshotter.log")
    try:
        _, report = run_json(capsys, populated, "status")
    finally:
        stop_daemon(daemon)
    assert report["snapshotter"]["daemon"] == {
        "address": str(populated.snapshotter_socket), "reachable": True, "health": "SERVING", "error": ""}
    assert report["snapshotter"]["snapshots"]["committed"] == 2


def test_status_of_a_node_without_roots_says_so_and_exits_0(capsys, node):
    code, report = run_json(capsys, node, "status")
    assert code == 0
    assert report["snapshotter"]["present"] is False
    assert "does not exist" in report["snapshotter"]["error"]


def test_status_text_shows_counts_and_ingests(capsys, populated):
    code, out, _ = run(capsys, populated, "status")
    assert code == 0
    assert "snapshots  4: 2 committed" in out
    assert "blobs      3 (60 B)" in out
    assert "pull-1  7 B/100 B" in out
