"""The overlayfs snapshotter: domain core, plain Python, no gRPC.

Layout under ``root`` (same as containerd's built-in ``overlayfs``)::

    metadata.db            SQLite (WAL) metadata, see metastore.py
    snapshots/<id>/fs      the snapshot's files (upperdir of an active snapshot)
    snapshots/<id>/work    overlay workdir, active snapshots only

Every method is synchronous and may touch the disk: callers on an event loop run
them in a thread pool.  Directory removal is never done by an RPC: Remove and
Cleanup wake the reaper, which deletes directories no snapshot owns in the
background.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from pysnap.config import SnapshotterConfig
from pysnap.errors import FailedPrecondition, InvalidArgument, NotFound, Unknown
from pysnap.filters import parse_all
from pysnap.validation import updated_labels, validate_labels, validate_name

from . import orphans
from .kernel import OverlayFeatures, is_tmpfs, mount_entries
from .metastore import MetaStore, Record, Transaction
from .model import Info, Kind, Usage
from .mounts import GID_MAPPING_LABEL, UID_MAPPING_LABEL, Mount, snapshot_mounts
from .usage import disk_usage

log = logging.getLogger(__name__)

UPPERDIR_LABEL = "containerd.io/snapshot/overlay.upperdir"


class OverlaySnapshotter:
    def __init__(
        self,
        config: SnapshotterConfig,
        features: OverlayFeatures | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.root = Path(config.root)
        self.config = config
        self._clock = clock
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(exist_ok=True)
        os.chmod(self.snapshots_dir, 0o700)
        features = features or OverlayFeatures.probe()
        self.overlay_options = tuple(features.overlay_options(list(config.mount_options), is_tmpfs(self.root)))
        self.store = MetaStore(self.root / "metadata.db", durable=config.durable_metadata)
        self.reaper = DirectoryReaper(self)

    def close(self) -> None:
        self.reaper.stop()
        self.store.close()

    # -- paths ---------------------------------------------------------------
    def upper_dir(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "fs"

    def work_dir(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "work"

    # -- RPCs ----------------------------------------------------------------
    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels or {})

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels or {})

    def mounts(self, key: str) -> list[Mount]:
        with self.store.read() as tx:
            record = tx.find(key)
            if record is None:
                raise NotFound(f"failed to get active mount: snapshot {key} does not exist")
            return self._mounts(tx, record)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        labels = labels or {}
        validate_name(name, "name")
        validate_labels(labels)
        with self.store.read() as tx:
            record = tx.find(key)
        if record is None:
            raise NotFound(f"failed to commit snapshot {key}: snapshot does not exist")
        # Counting usage walks the whole layer: do it before taking the write lock.
        usage = disk_usage(self.upper_dir(record.id)) if record.kind is Kind.ACTIVE else Usage()
        with self.store.write() as tx:
            record = tx.find(key)
            if record is None:
                raise NotFound(f"failed to commit snapshot {key}: snapshot does not exist")
            tx.ensure_absent(name, "committed snapshot")
            if record.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f'snapshot "{key}" is not active')
            tx.commit(record, name, labels, usage, self._clock())

    def remove(self, key: str) -> None:
        with self.store.write() as tx:
            record = tx.find(key)
            if record is None:
                raise NotFound(f"failed to remove snapshot {key}: snapshot {key}")
            tx.remove(record)
        self.reaper.wake()

    def stat(self, key: str) -> Info:
        with self.store.read() as tx:
            record = tx.find(key)
        if record is None:
            raise NotFound(f"snapshot {key} does not exist")
        return self._info(record)

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        with self.store.write() as tx:
            record = tx.find(info.name)
            if record is None:
                raise NotFound(f"snapshot {info.name}")
            labels = updated_labels(record.labels, info.labels, fieldpaths, f'snapshot "{info.name}"')
            record = tx.replace_labels(record, labels, self._clock())
        return self._info(record)

    def usage(self, key: str) -> Usage:
        with self.store.read() as tx:
            record = tx.find(key)
        if record is None:
            raise NotFound(f"snapshot {key} does not exist")
        if record.kind is Kind.ACTIVE:
            return disk_usage(self.upper_dir(record.id))
        return record.usage

    def list(self, filters: Sequence[str] = ()) -> list[Info]:
        try:
            selector = parse_all(filters)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        with self.store.read() as tx:
            records = tx.all()
        # Filter the stored info, then add the upperdir label, as containerd's Walk does.
        return [self._info(r) for r in records if selector.match(_field_adaptor(r.info()))]

    def cleanup(self) -> None:
        self.reaper.wake()

    def count_by_kind(self) -> dict[Kind, int]:
        """Snapshots per kind (metrics; also the health probe: a real query)."""
        with self.store.read() as tx:
            counts = tx.count_by_kind()
        return {kind: counts.get(kind, 0) for kind in (Kind.VIEW, Kind.ACTIVE, Kind.COMMITTED)}

    # -- internals -------------------------------------------------------------
    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        validate_name(key)
        validate_labels(labels)
        with self.store.write() as tx:
            parent_record = None
            if parent:
                parent_record = tx.find(parent)
                if parent_record is None:
                    raise NotFound(f'failed to create snapshot: missing parent "{parent}" bucket')
                if parent_record.kind is not Kind.COMMITTED:
                    raise InvalidArgument(f'parent "{parent}" is not committed snapshot')
            tx.ensure_absent(key, "snapshot")
            staging = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
            try:
                os.chmod(staging, 0o700)
                (staging / "fs").mkdir()
                os.chmod(staging / "fs", 0o755)
                if kind is Kind.ACTIVE:
                    (staging / "work").mkdir()
                    os.chmod(staging / "work", 0o711)
                self._chown_root(staging / "fs", parent_record, labels)
                record = tx.create(key, kind, parent_record, labels, self._clock())
                final = self.snapshots_dir / str(record.id)
                if os.path.lexists(final):
                    # Left by a crash before its row was committed: the reaper removes it.
                    os.rename(final, self.snapshots_dir / f"stale-{record.id}-{self._clock()}")
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return self._mounts(tx, record)

    def _chown_root(self, fs: Path, parent: Record | None, labels: dict[str, str]) -> None:
        if UID_MAPPING_LABEL in labels or GID_MAPPING_LABEL in labels:
            uid = _host_id_of_root(labels.get(UID_MAPPING_LABEL, "0:0:1"), UID_MAPPING_LABEL)
            gid = _host_id_of_root(labels.get(GID_MAPPING_LABEL, "0:0:1"), GID_MAPPING_LABEL)
            os.lchown(fs, uid, gid)
        elif parent is not None:
            st = os.lstat(self.upper_dir(parent.id))
            os.lchown(fs, st.st_uid, st.st_gid)

    def _mounts(self, tx: Transaction, record: Record) -> list[Mount]:
        lowers = [self.upper_dir(i) for i in tx.parent_ids(record.id)]
        return snapshot_mounts(
            record.name, record.kind, self.upper_dir(record.id), self.work_dir(record.id), lowers,
            self.overlay_options,
        )

    def _info(self, record: Record) -> Info:
        info = record.info()
        if self.config.upperdir_label:
            info.labels[UPPERDIR_LABEL] = str(self.upper_dir(record.id))
        return info


def _field_adaptor(info: Info) -> Callable[[Sequence[str]], tuple[str, bool]]:
    def lookup(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return info.kind.label, True
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels" and len(path) > 1:
            key = ".".join(path[1:])
            return info.labels.get(key, ""), key in info.labels
        return "", False

    return lookup


def _host_id_of_root(mapping: str, label: str) -> int:
    """Host ID that container ID 0 maps to in a ``ctr:host:size[,…]`` label."""
    for entry in mapping.split(","):
        try:
            container, host, size = (int(part) for part in entry.split(":"))
        except ValueError:
            raise Unknown(f"invalid mapping {entry!r} in label {label}") from None
        if container <= 0 < container + size:
            return host - container
    raise Unknown(f"label {label}={mapping!r} does not map container ID 0")


class DirectoryReaper:
    """Deletes, in a background thread, every entry of ``snapshots/`` that no
    snapshot owns (removed snapshots, failed prepares, crash leftovers).

    The list of orphans is taken under the metadata write lock, so a Prepare in
    flight (whose staging directory is not yet recorded) is never mistaken for
    one.  Directories with something mounted below them are left for a later
    pass instead of being emptied through the mount.
    """

    def __init__(self, snapshotter: OverlaySnapshotter) -> None:
        self._snapshotter = snapshotter
        self._wakeup = threading.Condition()
        self._pending = False
        self._busy = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="pysnap-reaper", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with self._wakeup:
            self._pending = True
            self._wakeup.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no pass is pending or running (tests, shutdown)."""
        with self._wakeup:
            return self._wakeup.wait_for(lambda: not self._pending and not self._busy, timeout)

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify_all()
        self._thread.join()

    def reap_once(self) -> list[str]:
        """One pass (see orphans.py); returns the names it removed."""
        snapshots_dir = self._snapshotter.snapshots_dir
        doomed: list[tuple[str, Path]] = []
        with self._snapshotter.store.write() as tx:
            live = {str(i) for i in tx.live_ids()}
            mounts = mount_entries()
            for name in os.listdir(snapshots_dir):
                if name in live:
                    continue
                try:
                    doomed.append((name, orphans.set_aside(snapshots_dir, name, mounts)))
                except orphans.DirectoryInUse as exc:
                    log.warning("not removing %s: %s", snapshots_dir / name, exc)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not set %s aside for removal: %s", snapshots_dir / name, exc)
        removed = []
        for name, path in doomed:
            try:
                orphans.delete(path)
                removed.append(name)
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)
        return removed

    def _run(self) -> None:
        while True:
            with self._wakeup:
                self._wakeup.wait_for(lambda: self._pending or self._stopped)
                if self._stopped:
                    return
                self._pending = False
                self._busy = True
            try:
                removed = self.reap_once()
                if removed:
                    log.info("removed %d unused snapshot directories", len(removed))
            except Exception:  # keep the reaper alive whatever one pass hits
                log.exception("snapshot directory cleanup failed")
            finally:
                with self._wakeup:
                    self._busy = False
                    self._wakeup.notify_all()
