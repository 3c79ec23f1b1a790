"""The content store: blobs on disk, their metadata in SQLite, ingests beside them.

Layout under ``root`` (OCI image-layout compatible blob paths)::

    blobs/<algorithm>/<hex>   committed blobs, mode 0444
    ingest/<sha256(ref)>/     writes in progress, see ingest.py
    metadata.db               size, times and labels of every blob (SQLite, WAL)

Labels live in SQLite rather than in xattrs so that List with label filters is
one indexed query at 100 000 blobs instead of 100 000 getxattr calls, and so
that they survive filesystems without user xattrs.  The blob file is the truth
for existence: publishing renames the file first and records the row second,
and start-up reconciles the two (a file without a row gets one; a row without a
file is dropped), so a crash between any two steps loses at most the labels of
the blob being committed.

Every method is synchronous and may touch the disk: the gRPC layer runs them
in a thread pool.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

from pysnap.config import ContentConfig
from pysnap.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange
from pysnap.filters import AllOf, AnyOf, Filter, Operator, Selector, labels_adaptor, parse_all
from pysnap.sqlite import Database
from pysnap.validation import updated_labels, validate_labels, validate_name

from .digests import HEX_LENGTH, parse_digest
from .ingest import READ_CHUNK, RefLocks, Writer, ingest_dir_name, read_status
from .model import BlobInfo, IngestStatus

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
INFO_CACHE_SIZE = 4096
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT    PRIMARY KEY,
    size        INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS labels (
    digest  TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (digest, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS labels_by_key ON labels(key, value);
"""


class ContentStore:
    def __init__(self, config: ContentConfig, clock: Callable[[], int] = time.time_ns) -> None:
        self.root = Path(config.root)
        self._clock = clock
        self.blobs_root = self.root / "blobs"
        self.ingest_root = self.root / "ingest"
        for directory in (self.root, self.blobs_root, self.ingest_root):
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o755)
        self.db = Database(self.root / "metadata.db", _SCHEMA, SCHEMA_VERSION, durable=config.durable_metadata)
        self.locks = RefLocks(clock)
        # containerd asks Info before every small Read: recently seen infos stay in memory
        # (this process is the only writer, so invalidating on change is exact).
        self._infos: OrderedDict[str, BlobInfo] = OrderedDict()
        self._infos_lock = threading.Lock()
        self.reconcile()

    def close(self) -> None:
        self.db.close()

    # -- blobs -----------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algorithm, hex_part = parse_digest(digest)
        return self.blobs_root / algorithm / hex_part

    def exists(self, digest: str) -> bool:
        parse_digest(digest)
        with self.db.read() as db:
            return db.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone() is not None

    def cached_info(self, digest: str) -> BlobInfo | None:
        """The info of a blob if it is in memory (never touches the disk)."""
        with self._infos_lock:
            info = self._infos.get(digest)
            if info is not None:
                self._infos.move_to_end(digest)
            return info

    def _forget(self, digest: str) -> None:
        with self._infos_lock:
            self._infos.pop(digest, None)

    def info(self, digest: str) -> BlobInfo:
        cached = self.cached_info(digest)
        if cached is not None:
            return cached
        parse_digest(digest)
        with self.db.read() as db:
            row = db.execute("SELECT digest, size, created_ns, updated_ns FROM blobs WHERE digest = ?",
                             (digest,)).fetchone()
            if row is None:
                raise NotFound(f"content {digest}")
            labels = dict(db.execute("SELECT key, value FROM labels WHERE digest = ?", (digest,)))
            info = BlobInfo(*row, labels=labels)
            with self._infos_lock:  # inside the read transaction: no writer can interleave
                self._infos[digest] = info
                if len(self._infos) > INFO_CACHE_SIZE:
                    self._infos.popitem(last=False)
        return info

    def update(self, digest: str, labels: dict[str, str], fieldpaths: Sequence[str]) -> BlobInfo:
        parse_digest(digest)
        with self.db.write() as db:
            if db.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone() is None:
                raise NotFound(f"content {digest}")
            current = dict(db.execute("SELECT key, value FROM labels WHERE digest = ?", (digest,)))
            new = updated_labels(current, labels, fieldpaths, "content info")
            db.execute("DELETE FROM labels WHERE digest = ?", (digest,))
            db.executemany("INSERT INTO labels VALUES (?, ?, ?)", [(digest, k, v) for k, v in new.items()])
            db.execute("UPDATE blobs SET updated_ns = ? WHERE digest = ?", (self._clock(), digest))
            self._forget(digest)
        return self.info(digest)

    def list(self, filters: Sequence[str] = ()) -> list[BlobInfo]:
        try:
            selector = parse_all(filters)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        with self.db.read() as db:
            wanted = _candidates(db, selector)
            if wanted is None:  # scan everything
                labels = _labels_by_digest(db.execute("SELECT digest, key, value FROM labels"))
                rows = db.execute("SELECT digest, size, created_ns, updated_ns FROM blobs ORDER BY digest").fetchall()
            else:  # only the blobs the index says can match
                chosen = sorted(wanted)
                rows, label_rows = [], []
                for i in range(0, len(chosen), 500):
                    batch = chosen[i:i + 500]
                    marks = ",".join("?" * len(batch))
                    rows += db.execute(f"SELECT digest, size, created_ns, updated_ns FROM blobs "
                                       f"WHERE digest IN ({marks})", batch).fetchall()
                    label_rows += db.execute(f"SELECT digest, key, value FROM labels WHERE digest IN ({marks})",
                                             batch).fetchall()
                rows.sort()
                labels = _labels_by_digest(label_rows)
        infos = [BlobInfo(*row, labels=labels.get(row[0], {})) for row in rows]
        return [i for i in infos if selector.match(labels_adaptor({"digest": i.digest}, i.labels))]

    def delete(self, digest: str) -> None:
        """Remove a blob; a missing one is not an error (containerd's GC relies on that)."""
        path = self.blob_path(digest)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        with self.db.write() as db:
            db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
            self._forget(digest)

    def read_range(self, digest: str, offset: int, size: int) -> tuple[int, int]:
        """[start, end) of a Read request, checked against the blob's size."""
        info = self.info(digest)
        start = max(offset, 0)
        if start > info.size:
            raise OutOfRange(f"read past object length {info.size} bytes")
        end = info.size if size <= 0 or start + size > info.size else start + size
        return start, end

    def open_reader(self, digest: str, offset: int, size: int) -> "BlobReader":
        """Open a Read request's range and read its first chunk, in one step: containerd
        reads blobs in many small ranges, so each costs one trip to the thread pool."""
        start, end = self.read_range(digest, offset, size)
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content {digest}") from None
        reader = BlobReader(fd, start, end)
        reader.prefetch()
        return reader

    def publish(self, data: Path, digest: str, size: int, labels: dict[str, str]) -> None:
        """Move a verified ingest file into place and record it."""
        validate_labels(labels)
        target = self.blob_path(digest)
        if target.exists():
            raise AlreadyExists(f"content {digest}")
        if not target.parent.is_dir():
            target.parent.mkdir(mode=0o755, exist_ok=True)
            os.chmod(target.parent, 0o755)  # whatever the umask
        os.chmod(data, 0o444)
        os.rename(data, target)
        _fsync_dir(target.parent)
        now = self._clock()
        with self.db.write() as db:
            db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", (digest, size, now, now))
            db.execute("DELETE FROM labels WHERE digest = ?", (digest,))
            db.executemany("INSERT INTO labels VALUES (?, ?, ?)",
                           [(digest, k, v) for k, v in labels.items() if v])
            self._forget(digest)

    def counts(self) -> dict[str, int]:
        """Number and total size of blobs, and open ingests (metrics, status, health probe)."""
        with self.db.read() as db:
            blobs, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs").fetchone()
        try:
            ingests = len(os.listdir(self.ingest_root))
        except FileNotFoundError:
            ingests = 0
        return {"blobs": blobs, "bytes": size, "ingests": ingests}

    # -- ingests ---------------------------------------------------------------
    def open_writer(self, ref: str, total: int, expected: str) -> Writer:
        validate_name(ref, "ref")
        if expected:
            parse_digest(expected)
        self.locks.acquire(ref)
        try:
            if expected and self.exists(expected):
                raise AlreadyExists(f"content {expected}")
            return Writer(self, ref, total, self._clock)
        except BaseException:
            self.locks.release(ref)
            raise

    def status(self, ref: str) -> IngestStatus:
        validate_name(ref, "ref")
        try:
            return read_status(self.ingest_root / ingest_dir_name(ref))
        except (FileNotFoundError, ValueError):
            raise NotFound(f'could not get status for ref "{ref}"') from None

    def list_statuses(self, filters: Sequence[str] = ()) -> list[IngestStatus]:
        try:
            selector = parse_all(filters)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        statuses = []
        try:
            entries = sorted(os.listdir(self.ingest_root))
        except FileNotFoundError:
            return []
        for entry in entries:
            try:
                status = read_status(self.ingest_root / entry)
            except (OSError, ValueError):
                continue  # vanished or half-made meanwhile
            if selector.match(labels_adaptor({"ref": status.ref})):
                statuses.append(status)
        return statuses

    def abort(self, ref: str) -> None:
        """Drop an ingest; a missing one is not an error."""
        validate_name(ref, "ref")
        shutil.rmtree(self.ingest_root / ingest_dir_name(ref), ignore_errors=True)

    # -- start-up ----------------------------------------------------------------
    def reconcile(self) -> None:
        """Make metadata.db agree with blobs/ after a crash or a manual change."""
        on_disk: dict[str, os.stat_result] = {}
        for algorithm in HEX_LENGTH:
            directory = self.blobs_root / algorithm
            if not directory.is_dir():
                continue
            with os.scandir(directory) as entries:
                for entry in entries:
                    digest = f"{algorithm}:{entry.name}"
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        parse_digest(digest)
                    except InvalidArgument:
                        log.warning("ignoring %s: its name is not a %s digest", entry.path, algorithm)
                        continue
                    on_disk[digest] = entry.stat(follow_symlinks=False)
        with self.db.write() as db:
            known = {row[0] for row in db.execute("SELECT digest FROM blobs")}
            missing = known - on_disk.keys()
            db.executemany("DELETE FROM blobs WHERE digest = ?", [(d,) for d in missing])
            added = [(d, st.st_size, st.st_mtime_ns, st.st_mtime_ns) for d, st in on_disk.items() if d not in known]
            db.executemany("INSERT INTO blobs VALUES (?, ?, ?, ?)", added)
        if missing or added:
            log.warning("metadata reconciled with blobs/: %d rows dropped, %d blobs recorded", len(missing), len(added))


def _labels_by_digest(rows) -> dict[str, dict[str, str]]:
    labels: dict[str, dict[str, str]] = {}
    for digest, key, value in rows:
        labels.setdefault(digest, {})[key] = value
    return labels


def _candidates(db, selector: Filter) -> set[str] | None:
    """Digests that can match ``selector``, found through the label index; None when the
    filter cannot narrow the search (it is still applied to every result afterwards)."""
    if isinstance(selector, AnyOf):
        found: set[str] = set()
        for member in selector.members:
            part = _candidates(db, member)
            if part is None:
                return None
            found |= part
        return found
    if isinstance(selector, AllOf):
        parts = [p for p in (_candidates(db, m) for m in selector.members) if p is not None]
        return set.intersection(*parts) if parts else None
    if not isinstance(selector, Selector):
        return None
    path, op = selector.fieldpath, selector.operator
    if path == ("digest",) and op is Operator.EQUAL:
        return {selector.value}
    if len(path) > 1 and path[0] == "labels" and op in (Operator.EQUAL, Operator.PRESENT):
        key = ".".join(path[1:])
        if op is Operator.EQUAL:
            rows = db.execute("SELECT digest FROM labels WHERE key = ? AND value = ?", (key, selector.value))
        else:
            rows = db.execute("SELECT digest FROM labels WHERE key = ?", (key,))
        return {row[0] for row in rows}
    return None


class BlobReader:
    """An open byte range of a blob, read in chunks of at most READ_CHUNK bytes."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd, self.start, self.end = fd, start, end
        self.position = start
        self._ready: bytes | None = None

    def prefetch(self) -> None:
        self._ready = self._read()

    def next_chunk(self) -> bytes:
        """The next chunk; empty once the range is done."""
        chunk, self._ready = (self._ready, None) if self._ready is not None else (self._read(), None)
        self.position += len(chunk)
        return chunk

    def _read(self) -> bytes:
        if self.position >= self.end:
            return b""
        return os.pread(self.fd, min(READ_CHUNK, self.end - self.position), self.position)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

