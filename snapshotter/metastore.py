"""Transactional snapshot metadata in SQLite (WAL mode).

Every mutation is one ``BEGIN IMMEDIATE`` transaction, so the store has a single
writer, like containerd's bolt store.  The snapshotter performs the directory
step of an operation (rename of a freshly made directory) *inside* the
transaction, before it commits: a crash at any point leaves either no row (and an
orphan directory that Cleanup removes) or a row with its directory.

Snapshot IDs come from ``AUTOINCREMENT`` and are never reused, so an ID names at
most one directory for the lifetime of the root.  A commit keeps the ID of the
active snapshot it came from (the directory stays where it is) and only renames
the row.  Parent chains are resolved with one recursive query.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pysnap.errors import AlreadyExists, FailedPrecondition, NotFound
from pysnap.sqlite import Database

from .model import Kind, Record, Usage

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE,
    kind        INTEGER NOT NULL,
    parent_id   INTEGER REFERENCES snapshots(id),
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key         TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, key)
) WITHOUT ROWID;
"""

_SELECT = """
SELECT s.id, s.name, s.kind, COALESCE(p.name, ''), s.created_ns, s.updated_ns, s.size, s.inodes
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""

_CHAIN = """
WITH RECURSIVE chain(id, parent_id, depth) AS (
    SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
    UNION ALL
    SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
)
SELECT id FROM chain WHERE depth > 0 ORDER BY depth
"""


class MetaStore:
    """Owner of ``metadata.db``; hands out read and write transactions."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self._db = Database(path, _SCHEMA, SCHEMA_VERSION, durable=durable)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def read(self) -> Iterator["Transaction"]:
        with self._db.read() as connection:
            yield Transaction(connection)

    @contextmanager
    def write(self) -> Iterator["Transaction"]:
        with self._db.write() as connection:
            yield Transaction(connection)


class Transaction:
    """Queries and mutations valid inside one transaction of a MetaStore."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- reads -------------------------------------------------------------
    def find(self, name: str) -> Record | None:
        row = self._db.execute(_SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return None if row is None else self._record(row, self._labels_of(row[0]))

    def get(self, name: str) -> Record:
        record = self.find(name)
        if record is None:
            raise NotFound(f"snapshot {name}")
        return record

    def parent_ids(self, snapshot_id: int) -> tuple[int, ...]:
        """IDs of every ancestor, immediate parent first, base layer last."""
        return tuple(row[0] for row in self._db.execute(_CHAIN, (snapshot_id,)))

    def all(self) -> list[Record]:
        """Every snapshot, ordered bytewise by name as containerd's bolt store walks them."""
        labels: dict[int, dict[str, str]] = {}
        for sid, key, value in self._db.execute("SELECT snapshot_id, key, value FROM labels"):
            labels.setdefault(sid, {})[key] = value
        rows = self._db.execute(_SELECT + " ORDER BY s.name").fetchall()
        return [self._record(row, labels.get(row[0], {})) for row in rows]

    def live_ids(self) -> set[int]:
        return {row[0] for row in self._db.execute("SELECT id FROM snapshots")}

    def has_children(self, snapshot_id: int) -> bool:
        return self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot_id,)).fetchone() is not None

    def count_by_kind(self) -> dict[Kind, int]:
        return {Kind(k): n for k, n in self._db.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind")}

    # -- writes ------------------------------------------------------------
    def create(self, name: str, kind: Kind, parent: Record | None, labels: dict[str, str], now_ns: int) -> Record:
        cursor = self._db.execute(
            "INSERT INTO snapshots (name, kind, parent_id, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?)",
            (name, int(kind), parent.id if parent else None, now_ns, now_ns),
        )
        self._set_labels(cursor.lastrowid, labels)
        return self.get(name)

    def commit(self, active: Record, name: str, labels: dict[str, str], usage: Usage, now_ns: int) -> Record:
        self._db.execute(
            "UPDATE snapshots SET name = ?, kind = ?, created_ns = ?, updated_ns = ?, size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), now_ns, now_ns, usage.size, usage.inodes, active.id),
        )
        self._db.execute("DELETE FROM labels WHERE snapshot_id = ?", (active.id,))
        self._set_labels(active.id, labels)
        return self.get(name)

    def remove(self, record: Record) -> None:
        if self.has_children(record.id):
            raise FailedPrecondition(f"failed to remove snapshot {record.name}: cannot remove snapshot with child")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (record.id,))

    def replace_labels(self, record: Record, labels: dict[str, str], now_ns: int) -> Record:
        self._db.execute("DELETE FROM labels WHERE snapshot_id = ?", (record.id,))
        self._set_labels(record.id, labels)
        self._db.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (now_ns, record.id))
        return self.get(record.name)

    def ensure_absent(self, name: str, what: str) -> None:
        if self.find(name) is not None:
            raise AlreadyExists(f"{what} {name}")

    # -- helpers -----------------------------------------------------------
    def _labels_of(self, snapshot_id: int) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM labels WHERE snapshot_id = ?", (snapshot_id,)))

    def _set_labels(self, snapshot_id: int, labels: dict[str, str]) -> None:
        # An empty value means "no label", as in containerd's store.
        self._db.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(snapshot_id, k, v) for k, v in labels.items() if v != ""],
        )

    @staticmethod
    def _record(row: tuple, labels: dict[str, str]) -> Record:
        sid, name, kind, parent, created, updated, size, inodes = row
        return Record(sid, name, Kind(kind), parent, created, updated, labels, Usage(size, inodes))
