"""A SQLite database in WAL mode with one writer at a time, shared by the daemons.

``read()`` and ``write()`` yield the connection inside a transaction; ``write()``
uses ``BEGIN IMMEDIATE`` and rolls back on any exception.  One connection guarded
by a lock keeps things simple: each transaction is short (sub-millisecond), and
slow work (walking directories, hashing) is done outside them.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Database:
    def __init__(self, path: Path, schema: str, version: int, *, durable: bool = True) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            found = self._db.execute("PRAGMA user_version").fetchone()[0]
            if found not in (0, version):
                raise RuntimeError(f"{path}: metadata schema {found} is not the one this pysnap uses ({version})")
            self._db.executescript(schema)
            self._db.execute(f"PRAGMA user_version={version}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
