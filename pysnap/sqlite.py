"""A SQLite database in WAL mode with one writer at a time, shared by the daemons.

``read()`` and ``write()`` yield the connection inside a transaction; ``write()``
uses ``BEGIN IMMEDIATE`` and rolls back on any exception.  One connection guarded
by a lock keeps things simple: each transaction is short (sub-millisecond), and
slow work (walking directories, hashing) is done outside them.
"""
from __future__ import annotations

import sqlite3
import threading
import urllib.parse
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


# -- access from other processes (pysnap status / fsck / gc) ----------------------------------------

def _uri(path: Path, mode: str) -> str:
    return "file:" + urllib.parse.quote(str(Path(path).absolute())) + f"?mode={mode}"


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that can only read the existing database ``path``.

    Safe beside a running daemon: in WAL mode readers never block the writer
    and see the last committed state.  Raises ``sqlite3.OperationalError`` if
    the file is missing."""
    return sqlite3.connect(_uri(path, "ro"), uri=True, isolation_level=None, check_same_thread=False)


def connect_writer(path: Path, timeout: float = 30.0) -> sqlite3.Connection:
    """A read-write connection to the existing database ``path`` (never creates it).

    Changes go through ``immediate()``: the same cross-process write lock the
    daemons take, so a change made here is serialised with theirs.  A daemon
    waits 5 s for that lock (sqlite3's default busy timeout), so transactions
    made here must stay short."""
    connection = sqlite3.connect(_uri(path, "rw"), uri=True, isolation_level=None, timeout=timeout,
                                 check_same_thread=False)
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


@contextmanager
def immediate(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A ``BEGIN IMMEDIATE`` transaction: committed at the end, rolled back on any exception."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


@contextmanager
def snapshot(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction: every query inside sees the same committed state."""
    connection.execute("BEGIN")
    try:
        yield connection
    finally:
        connection.execute("COMMIT")


def schema_version(connection: sqlite3.Connection) -> int:
    return connection.execute("PRAGMA user_version").fetchone()[0]


def integrity_problems(connection: sqlite3.Connection) -> list[str]:
    """``PRAGMA quick_check`` results other than "ok" (empty when the file is sound)."""
    rows = [row[0] for row in connection.execute("PRAGMA quick_check")]
    return [] if rows == ["ok"] else rows


class RootError(Exception):
    """A daemon's root can't be looked at: missing, unreadable, or written by another pysnap."""


def open_metadata(root: Path, what: str, version: int, *, writable: bool = False) -> sqlite3.Connection:
    """Open ``root``/metadata.db of a pysnap ``what`` (``snapshotter``, ``content``) from outside
    its daemon, refusing a schema other than ``version``."""
    path = Path(root) / "metadata.db"
    if not path.is_file():
        raise RootError(f"{path} does not exist: {root} is not a pysnap {what} root (yet)")
    try:
        connection = connect_writer(path) if writable else connect_readonly(path)
        found = schema_version(connection)
    except sqlite3.Error as exc:
        raise RootError(f"{path}: {exc}") from None
    if found != version:
        connection.close()
        raise RootError(f"{path}: metadata schema {found} is not the one this pysnap uses ({version})")
    return connection
