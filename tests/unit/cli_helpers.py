"""Helpers shared by the tests of the operator commands (doctor, status, fsck, gc).

Roots are real: made by ``OverlaySnapshotter`` and ``ContentStore`` on a temporary
directory, exactly as the daemons make them.  Commands run in-process through
``pysnap.cli.main``.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from content.ingest import WriteSession, ingest_dir_name
from content.model import WriteAction, WriteRequest
from content.store import ContentStore
from pysnap.cli import main
from pysnap.config import ContentConfig, SnapshotterConfig
from snapshot_helpers import HOST_FEATURES
from snapshotter.overlay import OverlaySnapshotter

REPO = Path(__file__).resolve().parents[2]
PYSNAP = REPO / ".venv" / "bin" / "pysnap"


@dataclass
class Node:
    """A pysnap configuration file and the paths it names."""

    config: Path
    snapshotter_root: Path
    content_root: Path
    snapshotter_socket: Path
    content_socket: Path
    nri_socket: Path

    def snapshotter(self) -> OverlaySnapshotter:
        return OverlaySnapshotter(SnapshotterConfig(root=self.snapshotter_root, durable_metadata=False),
                                  HOST_FEATURES)

    def content(self) -> ContentStore:
        return ContentStore(ContentConfig(root=self.content_root, durable_metadata=False))


def make_node(tmp: Path, sockets: Path, extra: str = "") -> Node:
    node = Node(tmp / "pysnap.toml", tmp / "snapshotter", tmp / "content", sockets / "snap.sock",
                sockets / "content.sock", sockets / "nri.sock")
    node.config.write_text(
        f'[snapshotter]\nroot = "{node.snapshotter_root}"\naddress = "{node.snapshotter_socket}"\n'
        f'[content]\nroot = "{node.content_root}"\naddress = "{node.content_socket}"\n'
        f'[nri]\nsocket = "{node.nri_socket}"\nmetrics_address = "off"\n' + extra)
    return node


def run(capsys, node: Node, *args: str) -> tuple[int, str, str]:
    """``pysnap --config <node> ARGS``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(["--config", str(node.config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, node: Node, *args: str) -> tuple[int, object]:
    code, out, _ = run(capsys, node, *args, "--json")
    return code, json.loads(out)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(store: ContentStore, data: bytes) -> str:
    session = WriteSession(store, WriteRequest(ref=f"ref-{sha256(data)}", total=len(data)))
    try:
        return session.handle(WriteRequest(WriteAction.COMMIT, data=data)).digest
    finally:
        session.close()


def start_ingest(store: ContentStore, ref: str, data: bytes, total: int) -> Path:
    """Leave an open ingest of ``ref`` holding ``data`` out of ``total`` bytes."""
    session = WriteSession(store, WriteRequest(ref=ref, total=total))
    session.handle(WriteRequest(WriteAction.WRITE, data=data))
    session.close()
    return store.ingest_root / ingest_dir_name(ref)


def age_ingest(directory: Path, seconds: float) -> None:
    """Make an ingest look untouched for ``seconds``."""
    then = time.time_ns() - int(seconds * 1e9)
    (directory / "updatedat").write_text(str(then))
    os.utime(directory / "data", ns=(then, then))


def corrupt(path: Path, offset: int = 0) -> None:
    """Flip one byte of a (read-only) blob file."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as blob:
        blob.seek(offset)
        byte = blob.read(1)
        blob.seek(offset)
        blob.write(bytes([byte[0] ^ 0xFF]))


def listening_socket(path: Path, mode: int = 0o660) -> socket.socket:
    """A unix socket accepting connections at ``path`` (stands in for a daemon's)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    os.chmod(path, mode)
    return server


def accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def start_daemon(node: Node, daemon: str, log: Path, timeout: float = 20.0) -> subprocess.Popen:
    """``pysnap serve DAEMON`` with the node's config, once its socket accepts connections."""
    address = node.snapshotter_socket if daemon == "snapshotter" else node.content_socket
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(PYSNAP), "--config", str(node.config), "serve", daemon],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{daemon} exited with {proc.returncode}:\n{log.read_text()}")
        if accepts_connections(address):
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{daemon} not serving after {timeout}s:\n{log.read_text()}")


def stop_daemon(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def damage_table(database: Path, table: str) -> None:
    """Overwrite the root page of ``table`` with garbage, as a disk fault would."""
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root_page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    db.close()
    with open(database, "r+b") as data:
        data.seek((root_page - 1) * page_size)
        data.write(b"\xa5" * page_size)
