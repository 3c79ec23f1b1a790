"""Looking after a content root from outside the daemon: ``pysnap status``,
``pysnap fsck --content`` and ``pysnap gc``.

Reading is always safe while the daemon runs: metadata.db is opened read-only
(``mode=ro``; in WAL mode a reader never blocks the daemon) and blob files are
only read.

Repairs are made one blob at a time under metadata.db's write lock, the
cross-process SQLite lock the daemon takes for every change, and re-check
their premise under it: a corrupted blob is moved to ``quarantine/`` only if
it is still the very file that was hashed (same inode, size and mtime), a row
is dropped only if its file is still missing.  The daemon publishes a blob by
renaming its file into place first and recording the row second, so these
steps interleave with a concurrent publish of the same digest consistently.
That keeps files and rows consistent; but the daemon also keeps recently read
blob infos in memory, which a repair made by another process can't invalidate,
so ``pysnap fsck`` repairs content only while the daemon is stopped (or, with
``--force``, to be followed by a restart of the daemon).

Stale ingests are removed by renaming the ingest directory out of ``ingest/``
first (a writer resuming the ref at that moment starts a fresh ingest), then
deleting it; an open writer finds its ingest aborted, as after containerd's
Abort.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pysnap.errors import InvalidArgument
from pysnap.report import WARNING, Finding, Removal, human_seconds
from pysnap.sqlite import RootError, immediate, integrity_problems, snapshot
from pysnap.sqlite import open_metadata as sqlite_open_metadata

from .digests import HEX_LENGTH, parse_digest
from .ingest import read_status
from .store import SCHEMA_VERSION

COMPONENT = "content"
QUARANTINE = "quarantine"
GC_PREFIX = ".gc-"
CHUNK = 1 << 20
DAY_NS = 24 * 3600 * 10**9


def open_metadata(root: Path, *, writable: bool = False) -> sqlite3.Connection:
    return sqlite_open_metadata(root, COMPONENT, SCHEMA_VERSION, writable=writable)


def read_rows(connection: sqlite3.Connection) -> dict[str, int]:
    """digest → recorded size."""
    with snapshot(connection):
        return dict(connection.execute("SELECT digest, size FROM blobs"))


# -- ingests -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ingest:
    directory: Path
    ref: str
    offset: int
    total: int
    started_ns: int
    updated_ns: int
    readable: bool = True  # False: half-made or half-removed, its files don't say what it is

    def as_json(self, now_ns: int) -> dict:
        return {"ref": self.ref, "offset": self.offset, "total": self.total,
                "age_s": round((now_ns - self.started_ns) / 1e9, 3),
                "idle_s": round((now_ns - self.updated_ns) / 1e9, 3),
                "directory": self.directory.name, "readable": self.readable}


def read_ingest(directory: Path) -> Ingest | None:
    """What ``directory`` records (None if it is gone)."""
    try:
        status = read_status(directory)
        return Ingest(directory, status.ref, status.offset, status.total, status.started_ns, status.updated_ns)
    except (OSError, ValueError):
        pass
    newest, size = 0, 0
    try:
        newest = os.lstat(directory).st_mtime_ns
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                newest = max(newest, st.st_mtime_ns)
                if entry.name == "data":
                    size = st.st_size
    except FileNotFoundError:
        return None
    except OSError:
        pass
    return Ingest(directory, "", size, 0, newest, newest, readable=False)


def list_ingests(root: Path) -> list[Ingest]:
    ingest_root = Path(root) / "ingest"
    try:
        names = sorted(os.listdir(ingest_root))
    except FileNotFoundError:
        return []
    return [i for i in (read_ingest(ingest_root / name) for name in names) if i is not None]


# -- status --------------------------------------------------------------------------------------------

def summary(root: Path, now_ns: int | None = None) -> dict:
    """Blobs and their bytes, open ingests, quarantined files."""
    root = Path(root)
    now_ns = time.time_ns() if now_ns is None else now_ns
    connection = open_metadata(root)
    try:
        with snapshot(connection):
            blobs, size = connection.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs").fetchone()
    finally:
        connection.close()
    ingests = list_ingests(root)
    try:
        quarantined = len(os.listdir(root / QUARANTINE))
    except FileNotFoundError:
        quarantined = 0
    return {
        "blobs": blobs,
        "blob_bytes": size,
        "ingests": [i.as_json(now_ns) for i in ingests],
        "ingest_bytes": sum(i.offset for i in ingests),
        "quarantined": quarantined,
    }


# -- fsck ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlobFile:
    path: Path
    size: int
    identity: tuple


def _blob_files(blobs_root: Path) -> tuple[dict[str, BlobFile], list[tuple[Path, str]]]:
    """Blob files by digest, and the entries under blobs/ that are not blobs."""
    files: dict[str, BlobFile] = {}
    strays: list[tuple[Path, str]] = []
    try:
        algorithms = sorted(os.scandir(blobs_root), key=lambda e: e.name)
    except FileNotFoundError:
        return files, strays
    for algorithm in algorithms:
        if algorithm.name not in HEX_LENGTH or not algorithm.is_dir(follow_symlinks=False):
            strays.append((Path(algorithm.path), "not a digest algorithm directory"))
            continue
        with os.scandir(algorithm.path) as entries:
            for entry in entries:
                digest = f"{algorithm.name}:{entry.name}"
                if not entry.is_file(follow_symlinks=False):
                    strays.append((Path(entry.path), "not a regular file"))
                    continue
                try:
                    parse_digest(digest)
                except InvalidArgument:
                    strays.append((Path(entry.path), f"its name is not a {algorithm.name} digest"))
                    continue
                st = entry.stat(follow_symlinks=False)
                files[digest] = BlobFile(Path(entry.path), st.st_size, _identity(st))
    return files, strays


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def hash_file(path: Path, algorithm: str, progress: Callable[[int], None] | None = None) -> str:
    hasher = hashlib.new(algorithm)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as blob:
        while n := blob.readinto(buffer):
            hasher.update(view[:n])
            if progress is not None:
                progress(n)
    return f"{algorithm}:{hasher.hexdigest()}"


class Meter:
    """What ``check`` reports its progress to (pysnap.progress.Progress fits)."""

    def advance(self, nbytes: int = 0, items: int = 0) -> None: ...

    def close(self) -> None: ...


def check(root: Path, *, ingest_max_age_ns: int = DAY_NS, now_ns: int | None = None,
          meter: Callable[[int, int], Meter] | None = None) -> list[Finding]:
    """Every problem of the content root (read-only): blobs whose bytes don't hash to
    their digest, rows without files, files without rows, stale ingests.

    ``meter(count, total_bytes)`` makes the progress meter of the hashing pass."""
    root = Path(root)
    now_ns = time.time_ns() if now_ns is None else now_ns
    findings: list[Finding] = []
    connection = open_metadata(root)
    try:
        try:
            damage = integrity_problems(connection)
            before = read_rows(connection)
            files, strays = _blob_files(root / "blobs")
            after = read_rows(connection)
        except sqlite3.DatabaseError as exc:
            damage, before, after = [str(exc)], {}, {}
            files, strays = _blob_files(root / "blobs")
        if damage:
            findings.append(Finding(
                COMPONENT, "corrupt-metadata", "metadata.db", str(root / "metadata.db"),
                "SQLite integrity check failed: " + "; ".join(damage[:3]),
                advice="stop the content daemon and restore metadata.db from a backup (or move it away: "
                       "the daemon records every blob file again at start, without labels)"))
        progress = meter(len(files), sum(f.size for f in files.values())) if meter else Meter()
        unrecorded: list[str] = []
        try:
            for digest in sorted(files):
                blob = files[digest]
                try:
                    actual = hash_file(blob.path, digest.partition(":")[0], lambda n: progress.advance(n))
                except OSError as exc:
                    findings.append(Finding(
                        COMPONENT, "unreadable-blob", digest, str(blob.path), f"can't be read: {exc.strerror or exc}",
                        advice="check the disk (dmesg) and the file's permissions"))
                    continue
                finally:
                    progress.advance(items=1)
                if actual != digest:
                    findings.append(Finding(
                        COMPONENT, "corrupt-blob", digest, str(blob.path),
                        f"its {blob.size} bytes hash to {actual}",
                        fix=f"move it to {root / QUARANTINE}/ and drop its row (containerd pulls it again)",
                        evidence={"actual": actual, "size": blob.size, "recorded": digest in after},
                        identity=blob.identity))
                elif digest in after and after[digest] != blob.size:
                    findings.append(Finding(
                        COMPONENT, "size-mismatch", digest, str(blob.path),
                        f"recorded as {after[digest]} bytes, the file has {blob.size}",
                        fix="record the file's size", evidence={"recorded_size": after[digest], "size": blob.size},
                        identity=blob.identity))
                elif digest not in after:
                    unrecorded.append(digest)
        finally:
            progress.close()
        # Asked again after the (long) hashing pass: a publish records its row right after its rename.
        try:
            rows_now = read_rows(connection) if unrecorded and not damage else after
        except sqlite3.DatabaseError:
            rows_now = after
    finally:
        connection.close()
    for digest in ([] if damage else unrecorded):
        if digest not in rows_now:
            blob = files[digest]
            findings.append(Finding(
                COMPONENT, "unrecorded-blob", digest, str(blob.path),
                "a sound blob file without a row: containerd can't see it, and a pull of it fails with "
                "AlreadyExists", fix="record it (as the daemon does at start)", evidence={"size": blob.size},
                identity=blob.identity))
    for digest in sorted(set(before) & set(after) - set(files)):
        path = _blob_path(root, digest)
        if not os.path.lexists(path):
            findings.append(Finding(
                COMPONENT, "missing-file", digest, str(path), "recorded, but its file is gone",
                fix="drop its row (containerd pulls it again)"))
    for path, reason in strays:
        findings.append(Finding(
            COMPONENT, "stray-file", path.name, str(path), reason, severity=WARNING,
            advice="pysnap never reads it: move it out of blobs/"))
    for ingest in list_ingests(root):
        idle = now_ns - ingest.updated_ns
        if idle > ingest_max_age_ns:
            what = f"ingest of ref {ingest.ref!r}" if ingest.readable else "half-made ingest"
            findings.append(Finding(
                COMPONENT, "stale-ingest", ingest.ref or ingest.directory.name, str(ingest.directory),
                f"{what} untouched for {human_seconds(idle / 1e9)} ({ingest.offset} bytes)", severity=WARNING,
                advice="pysnap gc removes ingests untouched for longer than --ingest-age",
                evidence={"idle_s": idle / 1e9, "offset": ingest.offset}))
    return findings


def _blob_path(root: Path, digest: str) -> Path:
    algorithm, hex_part = parse_digest(digest)
    return Path(root) / "blobs" / algorithm / hex_part


def repair(root: Path, findings: Iterable[Finding]) -> None:
    """Repair what can be repaired, one blob per short write transaction (marks each
    finding repaired, or with why not)."""
    root = Path(root)
    findings = [f for f in findings if f.component == COMPONENT]
    if any(f.problem == "corrupt-metadata" for f in findings):
        for finding in findings:
            if finding.fix:
                finding.repair_error = "metadata.db is damaged: nothing repaired"
        return
    findings = [f for f in findings if f.fix]
    if not findings:
        return
    connection = open_metadata(root, writable=True)
    try:
        for finding in findings:
            try:
                _repair_one(root, connection, finding)
            except (OSError, sqlite3.Error) as exc:
                finding.repair_error = getattr(exc, "strerror", None) or str(exc)
    finally:
        connection.close()


def _repair_one(root: Path, connection: sqlite3.Connection, finding: Finding) -> None:
    digest, path = finding.subject, Path(finding.path)
    if finding.problem == "corrupt-blob":
        quarantine = root / QUARANTINE
        quarantine.mkdir(mode=0o700, exist_ok=True)
        target = quarantine / digest.replace(":", "-")
        if os.path.lexists(target):
            target = quarantine / f"{digest.replace(':', '-')}.{time.time_ns()}"
        with immediate(connection):
            if not _unchanged(path, finding):
                return
            os.rename(path, target)
            connection.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        finding.evidence["quarantined_to"] = str(target)
    elif finding.problem == "missing-file":
        with immediate(connection):
            if os.path.lexists(path):
                finding.repair_error = "its file is back"
                return
            connection.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
    elif finding.problem == "unrecorded-blob":
        with immediate(connection):
            if not _unchanged(path, finding):
                return
            st = os.lstat(path)
            connection.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?)",
                                (digest, st.st_size, st.st_mtime_ns, st.st_mtime_ns))
    elif finding.problem == "size-mismatch":
        with immediate(connection):
            if not _unchanged(path, finding):
                return
            connection.execute("UPDATE blobs SET size = ? WHERE digest = ?", (finding.evidence["size"], digest))
    else:
        return
    finding.repaired = True


def _unchanged(path: Path, finding: Finding) -> bool:
    try:
        same = _identity(os.lstat(path)) == finding.identity
    except FileNotFoundError:
        finding.repair_error = "its file is gone meanwhile"
        return False
    if not same:
        finding.repair_error = "the file changed since it was checked: run fsck again"
    return same


# -- gc ------------------------------------------------------------------------------------------------

def remove_stale_ingests(root: Path, *, max_age_ns: int = DAY_NS, now_ns: int | None = None,
                         dry_run: bool = False) -> list[Removal]:
    """Remove ingests untouched for longer than ``max_age_ns`` (and what an interrupted
    run of this left behind)."""
    root = Path(root)
    clock = time.time_ns if now_ns is None else (lambda: now_ns)
    results: list[Removal] = []
    for leftover in sorted(root.glob(f"{GC_PREFIX}*")):
        removal = Removal(COMPONENT, "ingest", leftover.name, str(leftover),
                          "left by an interrupted pysnap gc", bytes=_size(leftover))
        if not dry_run:
            _remove_tree(leftover, removal)
        results.append(removal)
    for ingest in list_ingests(root):
        idle = clock() - ingest.updated_ns
        if idle <= max_age_ns:
            continue
        what = f"ref {ingest.ref!r}" if ingest.readable else "half-made ingest"
        removal = Removal(COMPONENT, "ingest", ingest.ref or ingest.directory.name, str(ingest.directory),
                          f"{what} untouched for {human_seconds(idle / 1e9)}", bytes=ingest.offset)
        if dry_run:
            results.append(removal)
            continue
        current = read_ingest(ingest.directory)  # aborted or resumed meanwhile: not garbage any more
        if current is None or clock() - current.updated_ns <= max_age_ns:
            continue
        results.append(removal)
        target = root / f"{GC_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(ingest.directory, target)
        except FileNotFoundError:
            results.pop()
            continue
        except OSError as exc:
            removal.error = f"could not set it aside: {exc.strerror or exc}"
            continue
        _remove_tree(target, removal)
    return results


def _remove_tree(path: Path, removal: Removal) -> None:
    try:
        shutil.rmtree(path)
        removal.removed = True
    except FileNotFoundError:
        removal.removed = True
    except OSError as exc:
        removal.error = f"could not delete {path}: {exc.strerror or exc}"


def _size(path: Path) -> int:
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total
