"""Looking after a snapshotter root from outside the daemon: ``pysnap status``,
``pysnap fsck --snapshotter`` and ``pysnap gc``.

Reading is always safe while the daemon runs: metadata.db is opened read-only
(``mode=ro``) and in WAL mode a reader never blocks the daemon.

Changing is safe too, without stopping the daemon, because it takes the lock
the daemon itself works under: metadata.db's SQLite write lock, which is
cross-process.  The daemon makes every directory change that a row depends on
inside a write transaction (Prepare creates its ``new-*`` staging directory
and renames it to the snapshot's ID before committing), so while this process
holds the lock, a directory under ``snapshots/`` is either owned by a row or
garbage.  Orphans are then removed with the daemon's own reaper procedure:
renamed to ``reaping-*`` under the lock, deleted after it is released.  The
daemon waits 5 s for the lock, so only renames happen while it is held.

A snapshot that has a row is never deleted here: containerd owns it.
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pysnap.report import Finding, Removal
from pysnap.sqlite import RootError, immediate, integrity_problems, snapshot
from pysnap.sqlite import open_metadata as sqlite_open_metadata

from .kernel import MountEntry, in_use_by_mounts, mount_entries
from .metastore import SCHEMA_VERSION
from .model import Kind
from . import orphans
from .orphans import REAPING_PREFIX
from .usage import disk_usage

COMPONENT = "snapshotter"


@dataclass(frozen=True)
class Row:
    id: int
    name: str
    kind: Kind
    parent_id: int | None
    size: int
    inodes: int


def open_metadata(root: Path, *, writable: bool = False) -> sqlite3.Connection:
    return sqlite_open_metadata(root, COMPONENT, SCHEMA_VERSION, writable=writable)


def read_rows(connection: sqlite3.Connection) -> dict[int, Row]:
    with snapshot(connection):
        rows = connection.execute("SELECT id, name, kind, parent_id, size, inodes FROM snapshots").fetchall()
    return {r[0]: Row(r[0], r[1], Kind(r[2]), r[3], r[4], r[5]) for r in rows}


def _listing(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


def summary(root: Path) -> dict:
    """Snapshots by kind, bytes recorded for committed ones, and orphan directories."""
    root = Path(root)
    connection = open_metadata(root)
    try:
        listing = _listing(root / "snapshots")
        rows = read_rows(connection)
    finally:
        connection.close()
    by_kind = {kind.label: 0 for kind in (Kind.VIEW, Kind.ACTIVE, Kind.COMMITTED)}
    for row in rows.values():
        by_kind[row.kind.label] = by_kind.get(row.kind.label, 0) + 1
    live = {str(i) for i in rows}
    return {
        "snapshots": by_kind,
        "total": len(rows),
        "committed_bytes": sum(r.size for r in rows.values() if r.kind is Kind.COMMITTED),
        "orphan_directories": len(listing - live),
    }


def _orphan_reason(name: str) -> str:
    if name.startswith("new-"):
        return "staging directory of a Prepare that never finished"
    if name.startswith("stale-"):
        return "left by a crash, set aside when its ID was reused"
    if name.startswith(REAPING_PREFIX):
        return "being deleted (or left by an interrupted deletion)"
    if name.isdigit():
        return "no snapshot row owns it"
    return "not a snapshot directory"


# -- fsck --------------------------------------------------------------------------------------------

def check(root: Path, *, mounts: list[MountEntry] | None = None) -> list[Finding]:
    """Every inconsistency between metadata.db and snapshots/ (read-only).

    Rows are read before and after listing the directory so that a change the
    daemon commits meanwhile is not reported: an orphan is a directory that no
    row owned after it was listed, a missing directory one whose row existed
    both before and after."""
    root = Path(root)
    snapshots_dir = root / "snapshots"
    connection = open_metadata(root)
    findings: list[Finding] = []
    try:
        damage = integrity_problems(connection)
        before = read_rows(connection)
        listing = _listing(snapshots_dir)
        after = read_rows(connection)
    except sqlite3.DatabaseError as exc:
        damage, before, after, listing = [str(exc)], {}, {}, _listing(snapshots_dir)
    finally:
        connection.close()
    if damage:
        # Which directories the rows own is unknown: nothing else can be checked (or repaired).
        return [Finding(
            COMPONENT, "corrupt-metadata", "metadata.db", str(root / "metadata.db"),
            "SQLite integrity check failed: " + "; ".join(damage[:3]),
            advice="stop the snapshotter and restore metadata.db from a backup; until then pysnap removes "
                   "no snapshot directory")]
    entries = mount_entries() if mounts is None else mounts
    live = {str(i) for i in after}
    for name in sorted(listing - live):
        path = snapshots_dir / name
        busy = in_use_by_mounts(path, entries)
        findings.append(Finding(
            COMPONENT, "orphan-directory", name, str(path), _orphan_reason(name),
            fix="" if busy else "remove it",
            advice=f"in use ({busy}): unmount it, then run pysnap gc" if busy else ""))
    for row in sorted((r for i, r in after.items() if i in before), key=lambda r: r.id):
        directory = snapshots_dir / str(row.id)
        where = f"{row.kind.label} snapshot {row.name!r} (id {row.id})"
        if str(row.id) not in listing:
            findings.append(Finding(
                COMPONENT, "missing-directory", row.name, str(directory), f"{where} has no directory",
                advice="its files are gone: remove the snapshot through containerd (ctr snapshots "
                       "--snapshotter pysnap rm) and pull or recreate what used it",
                evidence={"id": row.id, "kind": row.kind.label}))
        elif not (directory / "fs").is_dir():
            findings.append(Finding(
                COMPONENT, "missing-fs", row.name, str(directory / "fs"), f"{where} has no fs/ directory",
                advice="its files are gone: remove the snapshot through containerd and pull or recreate "
                       "what used it", evidence={"id": row.id, "kind": row.kind.label}))
        elif row.kind is Kind.ACTIVE and not (directory / "work").is_dir():
            findings.append(Finding(
                COMPONENT, "missing-workdir", row.name, str(directory / "work"),
                f"{where} has no overlay work/ directory: it can't be mounted",
                fix="recreate the empty work/ directory", evidence={"id": row.id}))
    findings += _parent_problems(after, snapshots_dir)
    return findings


def _parent_problems(rows: dict[int, Row], snapshots_dir: Path) -> list[Finding]:
    """Rows whose parent chain is broken: a parent without a row, a parent that is not
    committed, or a loop.  Each breakage is reported once, at the row where it is."""
    findings = []
    in_loops: set[int] = set()
    for row in sorted(rows.values(), key=lambda r: r.id):
        if row.parent_id is None:
            continue
        parent = rows.get(row.parent_id)
        detail = ""
        if parent is None:
            detail = f"its parent (id {row.parent_id}) has no row"
        elif parent.kind is not Kind.COMMITTED:
            detail = f"its parent {parent.name!r} is {parent.kind.label}, not committed"
        elif row.id not in in_loops:
            loop = _loop_through(row, rows)
            if loop:
                in_loops |= loop
                detail = "its parent chain loops back to itself"
        if detail:
            findings.append(Finding(
                COMPONENT, "broken-parent", row.name, str(snapshots_dir / str(row.id)),
                f"{row.kind.label} snapshot {row.name!r} (id {row.id}): {detail}",
                advice="metadata.db is inconsistent: remove the snapshot and its children through "
                       "containerd, or restore metadata.db from a backup",
                evidence={"id": row.id, "parent_id": row.parent_id}))
    return findings


def _loop_through(row: Row, rows: dict[int, Row]) -> set[int]:
    """The IDs of the loop ``row``'s parent chain runs around, if ``row`` is on one."""
    chain: list[int] = []
    current: Row | None = row
    while current is not None and current.parent_id is not None:
        if current.id in chain:
            loop = set(chain[chain.index(current.id):])
            return loop if row.id in loop else set()
        chain.append(current.id)
        current = rows.get(current.parent_id)
    return set()


def repair(root: Path, findings: Iterable[Finding], *, mounts: list[MountEntry] | None = None) -> None:
    """Repair what can be repaired (marks each finding repaired or with why not):
    orphan directories are removed, missing work/ directories recreated."""
    findings = [f for f in findings if f.component == COMPONENT]
    if any(f.problem == "corrupt-metadata" for f in findings):
        for finding in findings:
            if finding.fix:
                finding.repair_error = "metadata.db is damaged: nothing repaired"
        return
    findings = [f for f in findings if f.fix]
    orphans = {f.subject: f for f in findings if f.problem == "orphan-directory"}
    if orphans:
        results = {r.name: r for r in remove_orphans(root, names=set(orphans), mounts=mounts)}
        for name, finding in orphans.items():
            result = results.get(name)
            if result is None:  # gone meanwhile, or owned by a row by now
                finding.repair_error = "no longer an orphan"
            elif result.removed:
                finding.repaired = True
            else:
                finding.repair_error = result.error
    workdirs = [f for f in findings if f.problem == "missing-workdir"]
    if not workdirs:
        return
    connection = open_metadata(root, writable=True)
    try:
        for finding in workdirs:
            work = Path(finding.path)
            try:
                with immediate(connection):
                    row = connection.execute("SELECT kind FROM snapshots WHERE id = ?",
                                             (finding.evidence["id"],)).fetchone()
                    if row is None or Kind(row[0]) is not Kind.ACTIVE:
                        finding.repair_error = "no longer an active snapshot"
                        continue
                    if not work.parent.is_dir():
                        finding.repair_error = "its directory is gone"
                        continue
                    if not work.is_dir():
                        work.mkdir()
                        os.chmod(work, 0o711)
                finding.repaired = True
            except (OSError, sqlite3.Error) as exc:
                finding.repair_error = str(exc)
    finally:
        connection.close()


# -- gc ----------------------------------------------------------------------------------------------

def remove_orphans(root: Path, *, names: set[str] | None = None, dry_run: bool = False,
                   mounts: list[MountEntry] | None = None) -> list[Removal]:
    """Remove the directories under snapshots/ that no row owns (all, or those in ``names``):
    ``new-*`` and ``stale-*`` left by crashes, ``reaping-*`` left by an interrupted
    deletion, and ID directories without a row.  One in use by a mount is kept."""
    root = Path(root)
    snapshots_dir = root / "snapshots"
    entries = mount_entries() if mounts is None else mounts
    results: list[Removal] = []
    doomed: list[tuple[Removal, Path]] = []
    connection = open_metadata(root, writable=not dry_run)
    try:
        if dry_run:
            live = {str(i) for i in read_rows(connection)}
            names_now = _listing(snapshots_dir)
        else:
            damage = integrity_problems(connection)  # before the lock: the daemon waits only 5 s for it
            if damage:
                raise RootError(f"{root / 'metadata.db'} is damaged ({'; '.join(damage[:2])}): not removing "
                                "anything, since which directories are orphans is unknown")
            # Only renames while the daemon's lock is held; the slow deletion comes after.
            with immediate(connection):
                live = {str(row[0]) for row in connection.execute("SELECT id FROM snapshots")}
                names_now = _listing(snapshots_dir)
                for name in sorted(names_now - live):
                    if names is not None and name not in names:
                        continue
                    removal, target = _set_aside(snapshots_dir, name, entries)
                    if removal is not None:
                        results.append(removal)
                    if removal is not None and target is not None:
                        doomed.append((removal, target))
    except sqlite3.DatabaseError as exc:
        raise RootError(f"{root / 'metadata.db'}: {exc}: not removing anything") from None
    finally:
        connection.close()
    if dry_run:
        for name in sorted(names_now - live):
            if names is not None and name not in names:
                continue
            path = snapshots_dir / name
            busy = in_use_by_mounts(path, entries)
            results.append(Removal(COMPONENT, "snapshot-directory", name, str(path), _orphan_reason(name),
                                   bytes=_size(path), error=f"in use: {busy}" if busy else ""))
        return results
    for removal, target in doomed:
        removal.bytes = _size(target)
        try:
            orphans.delete(target)
            removal.removed = True
        except OSError as exc:
            removal.error = f"could not delete {target}: {exc.strerror or exc}"
    return results


def _set_aside(snapshots_dir: Path, name: str, entries: list[MountEntry]) -> tuple[Removal | None, Path | None]:
    """Set an orphan aside (under the lock): (what happened, where it is now);
    (None, None) if it vanished meanwhile (the daemon's reaper removed it)."""
    path = snapshots_dir / name
    removal = Removal(COMPONENT, "snapshot-directory", name, str(path), _orphan_reason(name))
    try:
        return removal, orphans.set_aside(snapshots_dir, name, entries)
    except orphans.DirectoryInUse as exc:
        removal.error = f"in use: {exc}"
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        removal.error = f"could not set it aside: {exc.strerror or exc}"
    return removal, None


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return disk_usage(path).size
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


